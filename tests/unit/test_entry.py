"""The boot path's `portguard apply` (guard/entry.py, without click) ends exactly as the click
CLI's apply does: the same stdout, stderr, exit code and failure record; every other command
line still reaches click."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from guard import entry

REPO = Path(__file__).resolve().parents[2]
FAST = [sys.executable, "-m", "guard"]  # guard/__main__.py: the console script's entry
CLICK = [sys.executable, "-c", "from guard.cli import main; main(prog_name='portguard')"]


def run(program: list[str], args: list[str], run_dir: Path, nobody: bool = False, **env: str):
    prefix = []
    if nobody:
        if os.geteuid() != 0:
            pass  # already unprivileged
        elif not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to drop root")
        else:
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    environment = {k: v for k, v in os.environ.items() if k != "PORTGUARD_CONFIG"}
    environment.update(PORTGUARD_RUN_DIR=str(run_dir), **env)
    return subprocess.run(
        [*prefix, *program, *args], capture_output=True, text=True, cwd=REPO, env=environment
    )


def both(tmp_path: Path, args: list[str], nobody: bool = False, **env: str):
    """The command line through the fast path and through click, each with its own /run."""
    ends = []
    for name, program in (("fast", FAST), ("click", CLICK)):
        run_dir = tmp_path / f"run-{name}"
        run_dir.mkdir(mode=0o777)
        run_dir.chmod(0o777)
        proc = run(program, args, run_dir, nobody, **env)
        records = {
            p.name: p.read_text().split("\n", 1)[1]  # without the time it was written
            for p in run_dir.iterdir()
        }
        ends.append((proc.returncode, proc.stdout, proc.stderr, records))
    assert ends[0] == ends[1]
    return ends[0]


@pytest.fixture
def reachable():
    """A directory the unprivileged user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="portguard-entry-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _config(tmp_path: Path, reserve: str) -> Path:
    path = tmp_path / "portguard.toml"
    path.write_text(f'[guard]\nportreserve_dir = ""\npin_dir = "{tmp_path}/pins"\n\n{reserve}')
    tmp_path.chmod(0o755)
    path.chmod(0o644)
    return path


GOOD = '[[reserve]]\nports = ["8000/tcp"]\ncgroups = ["/app"]\n'
BAD = '[[reserve]]\nports = ["70000"]\ncgroup = "/a"\n'
RECORD = "apply-failed{}-pins"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["apply"], (True, None)),
        (["--config", "/x.toml", "apply"], (True, "/x.toml")),
        (["--config=/x.toml", "apply"], (True, "/x.toml")),
        (["apply", "--help"], (False, None)),
        (["apply", "-h"], (False, None)),
        (["apply", "--dry-run"], (False, None)),
        (["apply", "-n"], (False, None)),
        (["--version"], (False, None)),
        (["--help"], (False, None)),
        ([], (False, None)),
        (["status"], (False, None)),
        (["--config", "/x.toml", "status"], (False, None)),
        (["apply", "--config", "/x.toml"], (False, None)),  # click's error, not ours
        (["--config", "--version", "apply"], (False, None)),
        (["--config=", "apply"], (False, None)),
        (["--config", "/x.toml", "--config", "/y.toml", "apply"], (False, None)),
    ],
)
def test_only_a_plain_apply_takes_the_path_without_click(args, expected, monkeypatch):
    monkeypatch.delenv("PORTGUARD_CONFIG", raising=False)
    assert entry.plain_apply(args) == expected


def test_a_plain_apply_reads_the_config_from_the_environment_as_click_does(monkeypatch):
    monkeypatch.setenv("PORTGUARD_CONFIG", "/env.toml")
    assert entry.plain_apply(["apply"]) == (True, "/env.toml")
    assert entry.plain_apply(["--config", "/x.toml", "apply"]) == (True, "/x.toml")
    monkeypatch.setenv("PORTGUARD_CONFIG", "")  # click: empty is unset
    assert entry.plain_apply(["apply"]) == (True, None)


@pytest.mark.parametrize("form", ["--config PATH", "--config=PATH", "PORTGUARD_CONFIG"])
def test_a_bad_config_is_exit_2_with_file_and_line_on_both_paths(tmp_path, form):
    path = _config(tmp_path, BAD)
    if form == "PORTGUARD_CONFIG":
        code, out, err, records = both(tmp_path, ["apply"], PORTGUARD_CONFIG=str(path))
    elif form == "--config PATH":
        code, out, err, records = both(tmp_path, ["--config", str(path), "apply"])
    else:
        code, out, err, records = both(tmp_path, [f"--config={path}", "apply"])
    assert (code, out) == (2, "")
    assert err.startswith("Error: invalid configuration, nothing applied:\n")
    assert f"{path}:6: port 70000 is out of range" in err and "Traceback" not in err
    record = RECORD.format(str(tmp_path).replace("/", "-"))
    assert list(records) == [record] and "port 70000 is out of range" in records[record]


def test_a_missing_config_is_exit_2_on_both_paths(tmp_path):
    missing = tmp_path / "nope.toml"
    code, out, err, _ = both(tmp_path, [f"--config={missing}", "apply"])
    assert (code, out, err) == (2, "", f"Error: {missing}: no such configuration file\n")


def test_an_unreadable_config_is_exit_2_on_both_paths(reachable):
    tmp_path = reachable
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "portguard.toml").write_text("[guard]\n")
    tmp_path.chmod(0o755)
    etc.chmod(0o700)
    args = ["--config", str(etc / "portguard.toml"), "apply"]
    code, out, err, _ = both(tmp_path, args, nobody=True)
    assert (code, out) == (2, "")
    assert err == f"Error: cannot read the configuration: {etc}/portguard.toml: Permission denied\n"


def test_a_good_config_without_root_fails_alike_and_is_recorded_on_both_paths(reachable):
    tmp_path = reachable
    path = _config(tmp_path, GOOD)
    code, out, err, records = both(tmp_path, ["--config", str(path), "apply"], nobody=True)
    assert (code, out) == (1, "")
    assert err == "Error: portguard must run as root: it loads BPF programs into the kernel\n"
    assert list(records.values()) == [
        "portguard must run as root: it loads BPF programs into the kernel\n"
    ]


def test_apply_help_dry_run_and_version_still_reach_click(tmp_path):
    from importlib.metadata import version

    path = _config(tmp_path, GOOD)
    run_dir = tmp_path / "run"
    helped = run(FAST, ["apply", "--help"], run_dir)
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: ")
    assert "--dry-run" in helped.stdout
    dry = run(FAST, ["--config", str(path), "apply", "--dry-run"], run_dir)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("portguard: the configuration is valid; read:")
    versioned = run(FAST, ["--version"], run_dir)
    assert versioned.stdout == f"portguard {version('portguard')}\n"
    wrong = run(FAST, ["apply", "--config", str(path)], run_dir)
    assert wrong.returncode == 2 and "No such option: --config" in wrong.stderr
    assert not run_dir.exists()  # none of these is an apply: nothing recorded


def test_the_apply_path_does_not_import_click(tmp_path):
    path = _config(tmp_path, BAD)
    code = (
        "import sys\n"
        "import guard.entry, guard.commands, guard.kernel.apply, guard.kernel.host\n"
        "import guard.observe.display, guard.observe.outcome, guard.observe.procnet\n"
        "import guard.policy.resvport\n"
        f"sys.argv = ['portguard', '--config', {str(path)!r}, 'apply']\n"
        "try:\n"
        "    guard.entry.main()\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, sorted(m for m in sys.modules if m.split('.')[0] == 'click'))\n"
    )
    proc = run([sys.executable, "-c", code], [], tmp_path / "run")
    assert proc.stdout == "2 []\n", proc.stderr


# What `portguard apply` imports, also the modules commands.py and config.py import only when
# a step needs them (holders only when a reserved port is held: not the boot's case).
APPLY_PATH_MODULES = (
    "guard.entry, guard.commands, guard.errors, guard.kernel.apply, guard.kernel.host, "
    "guard.kernel.layout, guard.observe.display, guard.observe.outcome, guard.observe.procnet, "
    "guard.policy.declared, guard.policy.defaults, guard.policy.owners, guard.policy.plan, "
    "guard.policy.portreserve, guard.policy.resvport, guard.policy.units"
)


def test_the_apply_path_imports_neither_dataclasses_nor_click(reachable):
    """A dataclass costs ~0.9 ms at import and the module ~14 ms (inspect, ast, dis): apply
    runs at every boot. Imported, then run as far as an unprivileged apply goes."""
    path = _config(reachable, GOOD)
    code = (
        "import sys\n"
        f"import {APPLY_PATH_MODULES}\n"
        f"sys.argv = ['portguard', '--config', {str(path)!r}, 'apply']\n"
        "try:\n"
        "    guard.entry.main()\n"
        "except SystemExit as exc:\n"
        "    heavy = [m for m in sys.modules if m.split('.')[0] in ('dataclasses', 'click')]\n"
        "    print(exc.code, sorted(heavy))\n"
    )
    proc = run([sys.executable, "-c", code], [], reachable / "run", nobody=True)
    assert proc.stdout == "1 []\n", proc.stderr
