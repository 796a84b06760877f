"""The command line end to end, as an installed portguard runs it: --help, --version,
apply --dry-run, check, and every exit code of status (4, 0, 5, 3, 2, 1).

By default this checkout's portguard (the venv on Debian's python3-click); `./dev.sh wheel`
runs the same tests against the wheel installed with what PyPI serves today
(PORTGUARD_PROGRAM=its portguard script). Only exit codes and our own sentences are asserted.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.kernel.sandbox import PORTGUARD

pytestmark = pytest.mark.kernel

PROGRAM = [os.environ["PORTGUARD_PROGRAM"]] if os.environ.get("PORTGUARD_PROGRAM") else PORTGUARD
PORT = 7661
FREE = 7662


def cli(sandbox, *args: str):
    proc = sandbox.cli(*args, check=False, program=PROGRAM)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_help_and_version_end_with_0(sandbox):
    helped = cli(sandbox, "--help")
    assert helped.returncode == 0 and "Race-free port reservations" in helped.stdout
    for command in ("apply", "status", "check", "monitor", "remove", "import-portreserve"):
        assert command in helped.stdout
    versioned = cli(sandbox, "--version")
    assert versioned.returncode == 0 and re.fullmatch(r"portguard \d+\.\d+\S*\n", versioned.stdout)


def test_apply_dry_run_says_valid_or_file_and_line_and_loads_nothing(sandbox):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    dry = cli(sandbox, "apply", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("portguard: the configuration is valid")
    sandbox.write_config(sandbox.owner_block(["70000"], "owner"))
    broken = cli(sandbox, "apply", "-n")
    assert broken.returncode == 2
    assert f"{sandbox.config_path}:6: port 70000 is out of range" in broken.stderr
    assert cli(sandbox, "status").returncode == 4  # nothing was loaded


def test_every_status_exit_code(sandbox):
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp"], "owner"))
    assert cli(sandbox, "status").returncode == 4  # no guard
    assert cli(sandbox, "apply").returncode == 0
    ok = cli(sandbox, "status", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["config_matches"] is True
    checked = cli(sandbox, "check", f"{PORT}/tcp")
    assert checked.returncode == 0 and f"{PORT}/tcp" in checked.stdout
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp", f"{FREE}/udp"], "owner"))
    differs = cli(sandbox, "status")
    assert differs.returncode == 5  # edited, not reloaded
    assert f"{FREE}/udp is in the files but not guarded" in differs.stderr
    squatter = sandbox.start("stranger", "hold", ["v4", "udp", FREE])
    assert squatter.stdout.readline(), squatter.stderr.read()
    assert cli(sandbox, "apply").returncode == 0
    squatted = cli(sandbox, "status", "--format", "prometheus")
    assert squatted.returncode == 3 and "portguard_squatter_present" in squatted.stdout
    assert cli(sandbox, "status", "--format", "xml").returncode == 2  # a usage error
    sandbox.write_config(
        sandbox.owner_block([f"{PORT}/tcp"], "owner"), pin_dir=str(sandbox.work / "pins")
    )
    failed = cli(sandbox, "apply")  # a runtime failure
    assert failed.returncode == 1 and "is not on a BPF file system" in failed.stderr
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp"], "owner"))
    assert cli(sandbox, "remove").returncode == 0
    assert cli(sandbox, "status").returncode == 4
