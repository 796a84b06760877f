"""The one command line guard/entry.py runs without click, the boot's `portguard apply`, ends
exactly as the click CLI's apply does: the same stdout, stderr, exit code and failure record.
Every other command line (status and check too) reaches click as it is; those tests assert our
exit codes and sentences, never click's wording."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from guard import entry
from tests.unprivileged import run_python

REPO = Path(__file__).resolve().parents[2]
FAST = ["-m", "guard"]  # guard/__main__.py: the console script's entry
CLICK = ["-c", "from guard.cli import main; main(prog_name='portguard')"]


def run(program: list[str], args: list[str], run_dir: Path, nobody: Path | None = None, **env):
    """python PROGRAM ARGS with its own /run; nobody: run as nobody, importing from there
    (tests/unprivileged.py)."""
    environment = {k: v for k, v in os.environ.items() if k != "PORTGUARD_CONFIG"}
    environment.update(PORTGUARD_RUN_DIR=str(run_dir), **env)
    if nobody is not None:
        environment.pop("PYTHONPATH", None)
        return run_python(nobody, [*program, *args], environment)
    return subprocess.run(
        [sys.executable, *program, *args], capture_output=True, text=True, cwd=REPO, env=environment
    )


def both(tmp_path: Path, args: list[str], nobody: Path | None = None, **env: str):
    """The command line through the path without click and through click, each with its own
    /run: (exit code, stdout, stderr, the failure records written), the same for both."""
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
        (["status", "--json"], (False, None)),
        (["check", "631"], (False, None)),
        (["--config", "/x.toml", "check", "631"], (False, None)),
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


def test_an_unreadable_config_is_exit_2_on_both_paths(reachable, nobody_modules):
    tmp_path = reachable
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "portguard.toml").write_text("[guard]\n")
    tmp_path.chmod(0o755)
    etc.chmod(0o700)
    args = ["--config", str(etc / "portguard.toml"), "apply"]
    code, out, err, _ = both(tmp_path, args, nobody=nobody_modules)
    assert (code, out) == (2, "")
    assert err == f"Error: cannot read the configuration: {etc}/portguard.toml: Permission denied\n"


def test_a_good_config_without_root_fails_alike_and_is_recorded_on_both_paths(
    reachable, nobody_modules
):
    tmp_path = reachable
    path = _config(tmp_path, GOOD)
    code, out, err, records = both(
        tmp_path, ["--config", str(path), "apply"], nobody=nobody_modules
    )
    assert (code, out) == (1, "")
    assert err == "Error: portguard must run as root: it loads BPF programs into the kernel\n"
    assert list(records.values()) == [
        "portguard must run as root: it loads BPF programs into the kernel\n"
    ]


def test_apply_help_dry_run_and_version_reach_click_and_end_with_our_codes(tmp_path):
    from importlib.metadata import version

    path = _config(tmp_path, GOOD)
    run_dir = tmp_path / "run"
    helped = run(FAST, ["apply", "--help"], run_dir)
    assert helped.returncode == 0 and "--dry-run" in helped.stdout
    assert "Load or update the guard" in helped.stdout  # our docstring, as click shows it
    dry = run(FAST, ["--config", str(path), "apply", "--dry-run"], run_dir)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("portguard: the configuration is valid; read:")
    versioned = run(FAST, ["--version"], run_dir)
    assert versioned.stdout == f"portguard {version('portguard')}\n"
    for wrong in (["apply", "--config", str(path)], ["--config"], ["apply", "--bogus"]):
        misused = run(FAST, wrong, run_dir)  # click's usage errors: exit 2, no traceback
        assert misused.returncode == 2 and "Traceback" not in misused.stderr, wrong
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
    proc = run(["-c", code], [], tmp_path / "run")
    assert proc.stdout == "2 []\n", proc.stderr


# What `portguard apply` imports, also the modules commands.py and config.py import only when
# a step needs them (holders only when a reserved port is held: not the boot's case).
APPLY_PATH_MODULES = (
    "guard.entry, guard.commands, guard.errors, guard.kernel.apply, guard.kernel.host, "
    "guard.kernel.layout, guard.observe.display, guard.observe.outcome, guard.observe.procnet, "
    "guard.policy.declared, guard.policy.defaults, guard.policy.owners, guard.policy.plan, "
    "guard.policy.portreserve, guard.policy.resvport, guard.policy.units"
)


def test_the_apply_path_imports_neither_dataclasses_nor_click(reachable, nobody_modules):
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
    proc = run(["-c", code], [], reachable / "run", nobody=nobody_modules)
    assert proc.stdout == "1 []\n", proc.stderr


# What a boot's `portguard apply` imports when it takes the plan the last boot kept (or an
# unchanged re-apply answered by guard/quick.py), lazy imports included: squatters only when a
# reserved port is held (not at boot), configuration files never parsed.
BOOT_PATH_MODULES = (
    "guard.entry, guard.quick, guard.notify, guard.paths, guard.fingerprint, guard.errors, "
    "guard.commands, guard.kernel.apply, guard.kernel.host, guard.kernel.corebtf, "
    "guard.kernel.layout, guard.kernel.snapshot, guard.observe.display, guard.observe.outcome, "
    "guard.observe.procnet, guard.policy.compiled, guard.policy.plan, guard.policy.resvport"
)
# pathlib brings re (with enum), fnmatch, ntpath and urllib.parse (with ipaddress): ~7 ms of a
# boot's imports; typing ~2 ms, and re again
NOT_AT_BOOT = ("pathlib", "typing", "re", "enum", "fnmatch", "ntpath", "urllib", "ipaddress")


def heavy_imports(modules: str) -> subprocess.CompletedProcess:
    """Import the modules under python -S; prints which of NOT_AT_BOOT came with them."""
    code = (
        "import sys\n"
        f"import {modules}\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {NOT_AT_BOOT!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=REPO
    )


def test_the_boot_path_imports_neither_pathlib_nor_typing():
    """As the Debian package's launcher starts it (python3 -S: no site, whose hooks import
    pathlib and re themselves). tests/kernel/test_quick_reapply.py runs such a boot for real."""
    proc = heavy_imports(BOOT_PATH_MODULES)
    assert proc.stdout == "[]\n", proc.stdout + proc.stderr


def test_an_apply_that_finds_a_reserved_port_held_imports_neither_pathlib_nor_typing():
    """The squatter scan (guard.observe.holders) runs in every
    apply that finds a reserved port held: a re-apply with the services up, a package's."""
    proc = heavy_imports(f"{BOOT_PATH_MODULES}, guard.observe.holders")
    assert proc.stdout == "[]\n", proc.stdout + proc.stderr


# ---- status and check: through click, ending with our codes and sentences --------------------

# Without root, status and check stop at the pins (exit 1); as root, a pin directory that does
# not exist is no guard: status exits 4, check says the ports are not reserved.
AS_ROOT = os.geteuid() == 0
STATUS_END = 4 if AS_ROOT else 1
ROOT_ERROR = "Error: portguard status must run as root: the pinned maps are root-only\n"


@pytest.mark.parametrize(
    "options, says",
    [
        ([], "not loaded"),
        (["--json"], '"loaded": false'),
        (["-v"], "not loaded"),
        (["--verbose", "--format", "prometheus"], "portguard_guard_loaded 0"),
        (["--format=json", "-v"], '"loaded": false'),
        (["--json", "--format=prometheus"], '"loaded": false'),  # --json wins
    ],
)
@pytest.mark.parametrize("config", ["GOOD", "BAD"])
def test_status_without_a_guard_exits_4_in_every_format(tmp_path, options, says, config):
    path = _config(tmp_path, {"GOOD": GOOD, "BAD": BAD}[config])
    proc = run(FAST, ["--config", str(path), "status", *options], tmp_path / "run")
    assert proc.returncode == STATUS_END and "Traceback" not in proc.stderr
    assert says in proc.stdout if AS_ROOT else (proc.stdout, proc.stderr) == ("", ROOT_ERROR)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("form", ["--output", "--output=", "-o"])
def test_status_output_writes_the_file_and_nothing_to_stdout(tmp_path, form):
    path = _config(tmp_path, GOOD)
    written = tmp_path / "portguard.prom"
    target = [f"--output={written}"] if form.endswith("=") else [form, str(written)]
    args = ["--config", str(path), "status", "--format", "prometheus", *target]
    proc = run(FAST, args, tmp_path / "run")
    assert (proc.returncode, proc.stdout) == (STATUS_END, "")
    assert written.exists() == AS_ROOT
    if AS_ROOT:
        assert "portguard_guard_loaded 0" in written.read_text()
        assert written.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "options", [["8000"], ["8000/tcp", "--json"], ["--json", "8000"], ["http"], ["7/udp"]]
)
@pytest.mark.parametrize("config", ["GOOD", "BAD"])
def test_check_says_a_port_is_not_reserved_without_a_guard(tmp_path, options, config):
    path = _config(tmp_path, {"GOOD": GOOD, "BAD": BAD}[config])
    proc = run(FAST, ["--config", str(path), "check", *options], tmp_path / "run")
    if config == "BAD":  # a broken file is said, and check goes on with the [guard] settings
        assert "port 70000 is out of range" in proc.stderr
    if not AS_ROOT:
        assert (proc.returncode, proc.stdout) == (1, "") and proc.stderr.endswith(ROOT_ERROR)
    else:
        assert proc.returncode == 0
        assert "not reserved" in proc.stdout or '"reserved": false' in proc.stdout


@pytest.mark.parametrize("command", [["status"], ["check", "8000"]])
def test_a_missing_config_is_exit_2_for_status_and_check(tmp_path, command):
    missing = tmp_path / "nope.toml"
    proc = run(FAST, [f"--config={missing}", *command], tmp_path / "run")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.endswith(f"Error: {missing}: no such configuration file\n")


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--format", "xml"],
        ["status", "-o", "{tmp}"],  # a directory is no file to write
        ["status", "--unknown"],
        ["check", "no-such-service-here"],
        ["check"],
        ["check", "80", "443"],
    ],
)
def test_status_and_check_usage_errors_exit_2_without_a_traceback(tmp_path, args):
    path = _config(tmp_path, GOOD)
    args = [a.format(tmp=tmp_path) for a in args]
    proc = run(FAST, ["--config", str(path), *args], tmp_path / "run")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr


def test_status_help_names_its_formats(tmp_path):
    helped = run(FAST, ["status", "--help"], tmp_path / "run")
    assert helped.returncode == 0
    assert all(name in helped.stdout for name in ("text", "json", "prometheus", "--output"))


@pytest.mark.parametrize(("args", "collecting"), [(["apply"], False), (["status", "--help"], True)])
def test_only_apply_runs_without_the_cyclic_garbage_collector(tmp_path, args, collecting):
    """apply is short-lived (every boot, every reload): no cyclic GC; monitor, status and the
    other commands keep it (monitor runs for months)."""
    path = _config(tmp_path, BAD)
    code = (
        "import gc, sys\n"
        "from guard import entry\n"
        f"sys.argv = ['portguard', '--config', {str(path)!r}, *{args!r}]\n"
        "try:\n"
        "    entry.main()\n"
        "except SystemExit:\n"
        "    print('collecting', gc.isenabled())\n"
    )
    proc = run(["-c", code], [], tmp_path / "run")
    assert proc.stdout.splitlines()[-1] == f"collecting {collecting}", proc.stderr


def test_the_console_script_ends_cleanly_without_a_stdout(tmp_path):
    """entry.console flushes what Python would at exit; a process started without fd 1
    (sys.stdout None) ends with apply's own exit code and sentence, not a traceback."""
    path = _config(tmp_path, BAD)
    proc = subprocess.run(
        ["sh", "-c", f"exec {sys.executable} -m guard --config {path} apply >&-"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PORTGUARD_RUN_DIR": str(tmp_path / "run")},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("Error: invalid configuration, nothing applied:"), proc.stderr
