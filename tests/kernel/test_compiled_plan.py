"""status and check from the compiled plan (guard/policy/compiled.py) say exactly what the full
path says, and a configuration changed since the apply is read again: the record is a shortcut,
never another answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.sandbox import REPO, in_netns

pytestmark = pytest.mark.kernel

PORT = 7671
OLD = time.time() - 3600


def records() -> list[Path]:
    return sorted(Path(os.environ["PORTGUARD_RUN_DIR"]).glob("plan-*"))


def applied_long_ago(sandbox, ports: list[str]) -> Path:
    """Apply files an hour old: apply keeps their compiled plan."""
    for old in records():
        old.unlink()
    path = sandbox.write_config(sandbox.owner_block(ports, "owner", "other"))
    for item in (path, path.parent):
        os.utime(item, (OLD, OLD))
    time.sleep(1.1)  # and changed (ctime) more than a second before apply reads them
    sandbox.cli("apply")
    [record] = records()
    assert record.name == "plan" + str(path).replace("/", "-")
    return record


def ends(sandbox, *args: str) -> tuple[int, str, str]:
    proc = sandbox.cli(*args, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_status_and_check_from_the_record_say_what_the_full_path_says(sandbox):
    sandbox.cgroup("owner")
    record = applied_long_ago(sandbox, [f"{PORT}/tcp", f"{PORT + 1}"])
    commands = [
        ("status",),
        ("status", "--json"),
        ("status", "--format", "prometheus"),
        ("check", str(PORT)),
        ("check", "--json", f"{PORT + 1}/udp"),
        ("check", str(PORT + 2)),
    ]
    from_record = [ends(sandbox, *c) for c in commands]
    assert record.exists()  # still valid: the files did not change
    record.unlink()
    from_files = [ends(sandbox, *c) for c in commands]
    assert from_record == from_files
    assert from_record[0][0] == 0 and json.loads(from_record[1][1])["config_matches"] is True
    assert f"{sandbox.config_path}:" in from_record[3][1]  # the origin, file:line


def test_files_edited_after_the_apply_are_read_again(sandbox):
    applied_long_ago(sandbox, [f"{PORT}/tcp"])
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp", f"{PORT + 1}/udp"], "owner"))
    code, _, err = ends(sandbox, "status")
    assert code == 5 and f"{PORT + 1}/udp is in the files but not guarded" in err
    code, out, _ = ends(sandbox, "check", f"{PORT}/tcp")
    assert code == 0 and f"{sandbox.config_path}:" in out


def in_process(sandbox, command: str) -> str:
    """The command run through the console entry: its output, then its exit code and whether
    it imported the TOML parser."""
    code = (
        "import sys\n"
        "from guard import entry\n"
        f"sys.argv = ['portguard', '--config', {str(sandbox.config_path)!r}, {command!r}]\n"
        "try:\n"
        "    entry.main()\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, 'tomllib' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [*in_netns(sandbox.netns), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return proc.stdout + proc.stderr


def test_status_from_the_record_parses_no_toml(sandbox):
    applied_long_ago(sandbox, [f"{PORT}/tcp"])
    said = in_process(sandbox, "status")
    assert said.endswith("0 False\n"), said


def test_an_unchanged_reapply_from_the_record_parses_nothing_and_an_edit_is_applied(sandbox):
    applied_long_ago(sandbox, [f"{PORT}/tcp"])
    again = in_process(sandbox, "apply")
    assert "portguard: unchanged" in again and again.endswith("0 False\n"), again
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp", f"{PORT + 1}/udp"], "owner"))
    edited = in_process(sandbox, "apply")
    assert "portguard: applied" in edited and edited.endswith("0 True\n"), edited
    assert sandbox.status()["config_matches"] is True
    ports = {(r["port"], r["protocol"]) for r in sandbox.status()["reservations"]}
    assert ports == {(PORT, "tcp"), (PORT + 1, "udp")}
