"""The command lines guard/entry.py runs without click (the boot path's `portguard apply`, the
common forms of `status` and `check PORT`) end exactly as the click CLI's do: the same stdout,
stderr, exit code, failure record and --output file; every other command line still reaches
click."""

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


def both(
    tmp_path: Path, args: list[str], nobody: bool = False, written: Path | None = None, **env: str
):
    """The command line through the fast path and through click, each with its own /run;
    written: a file the command writes (taken away after each, its text part of the end)."""
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
        text = None
        if written is not None and written.exists():
            text = written.read_text()
            written.unlink()
        ends.append((proc.returncode, proc.stdout, proc.stderr, records, text))
    assert ends[0] == ends[1]
    return ends[0][:4] if written is None else ends[0]


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


def plain_apply(args: list[str]) -> tuple[bool, str | None]:
    """(True, the --config value or None) when entry.py runs args as a plain apply."""
    fast = entry.fast_command(args)
    return (True, fast.config_path) if fast and fast.command == "apply" else (False, None)


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
    assert plain_apply(args) == expected


def test_a_plain_apply_reads_the_config_from_the_environment_as_click_does(monkeypatch):
    monkeypatch.setenv("PORTGUARD_CONFIG", "/env.toml")
    assert plain_apply(["apply"]) == (True, "/env.toml")
    assert plain_apply(["--config", "/x.toml", "apply"]) == (True, "/x.toml")
    monkeypatch.setenv("PORTGUARD_CONFIG", "")  # click: empty is unset
    assert plain_apply(["apply"]) == (True, None)


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


# ---- status and check -----------------------------------------------------------------------

STATUS_PLAIN = {"output_format": "text", "verbose": False, "output": None}


def _status(**options) -> entry.Fast:
    return entry.Fast("status", None, {**STATUS_PLAIN, **options})


@pytest.mark.parametrize(
    "args, expected",
    [
        (["status"], _status()),
        (["status", "--json"], _status(output_format="json")),
        (["status", "-v"], _status(verbose=True)),
        (
            ["status", "--verbose", "--format", "prometheus"],
            _status(output_format="prometheus", verbose=True),
        ),
        (["status", "--format=text", "--json"], _status(output_format="json")),  # --json wins
        (["status", "--json", "--format", "prometheus"], _status(output_format="json")),
        (
            ["status", "--output", "/x/m.prom", "--format=prometheus"],
            _status(output_format="prometheus", output="/x/m.prom"),
        ),
        (["status", "--output=/x/m.prom"], _status(output="/x/m.prom")),
        (["status", "-o", "/x/m.prom", "-v"], _status(output="/x/m.prom", verbose=True)),
        (["check", "80"], entry.Fast("check", None, {"port": "80", "as_json": False})),
        (["check", "--json", "http"], entry.Fast("check", None, {"port": "http", "as_json": True})),
        (
            ["check", "631/tcp", "--json"],
            entry.Fast("check", None, {"port": "631/tcp", "as_json": True}),
        ),
        (
            ["--config", "/x.toml", "check", "80"],
            entry.Fast("check", "/x.toml", {"port": "80", "as_json": False}),
        ),
        (["--config=/x.toml", "status"], entry.Fast("status", "/x.toml", STATUS_PLAIN)),
    ],
)
def test_the_common_status_and_check_forms_take_the_path_without_click(args, expected, monkeypatch):
    monkeypatch.delenv("PORTGUARD_CONFIG", raising=False)
    assert entry.fast_command(args) == expected


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--help"],
        ["status", "-h"],
        ["status", "--json", "--json"],  # click takes it; we leave repeats to click
        ["status", "-v", "--verbose"],
        ["status", "--format"],
        ["status", "--format", "xml"],
        ["status", "--format=JSON"],
        ["status", "--format", "--json"],
        ["status", "--output"],
        ["status", "--output="],
        ["status", "--output", "-v"],
        ["status", "-o", "/"],  # a directory: click.Path refuses it
        ["status", "-ofile"],
        ["status", "-vo", "file"],
        ["status", "--json=1"],
        ["status", "--unknown"],
        ["status", "extra"],
        ["status", "--", "--json"],
        ["check"],
        ["check", "--json"],
        ["check", "80", "443"],
        ["check", "-1"],
        ["check", "80", "--json", "--json"],
        ["check", "--", "80"],
        ["check", "80", "--help"],
        ["status", "--config", "/x.toml"],
        ["remove"],
        ["monitor"],
    ],
)
def test_other_status_and_check_forms_go_to_click_as_they_are(args, monkeypatch):
    monkeypatch.delenv("PORTGUARD_CONFIG", raising=False)
    assert entry.fast_command(args) is None


def test_an_output_file_click_would_refuse_goes_to_click(tmp_path, monkeypatch):
    monkeypatch.delenv("PORTGUARD_CONFIG", raising=False)
    existing = tmp_path / "m.prom"
    existing.write_text("")
    assert entry.fast_command(["status", "-o", str(existing)]) is not None
    assert entry.fast_command(["status", "-o", str(tmp_path)]) is None


# Without root, status and check stop at the pins (exit 1); as root, a pin directory that does
# not exist is no guard: status exits 4, check says the ports are not reserved.
AS_ROOT = os.geteuid() == 0
STATUS_END = 4 if AS_ROOT else 1
ROOT_ERROR = "Error: portguard status must run as root: the pinned maps are root-only\n"

STATUS_FORMS = [
    [],
    ["--json"],
    ["-v"],
    ["--verbose", "--format", "prometheus"],
    ["--format=json", "-v"],
    ["--json", "--format=prometheus"],
    ["--format", "text"],
]


@pytest.mark.parametrize("options", STATUS_FORMS)
@pytest.mark.parametrize("config", ["GOOD", "BAD"])
def test_status_ends_alike_on_both_paths(tmp_path, options, config):
    path = _config(tmp_path, {"GOOD": GOOD, "BAD": BAD}[config])
    code, out, err, records = both(tmp_path, ["--config", str(path), "status", *options])
    assert code == STATUS_END and records == {}
    if not AS_ROOT:
        assert (out, err) == ("", ROOT_ERROR)
    elif "--json" in options or "--format=json" in options:
        assert '"loaded": false' in out
    elif "prometheus" in options[-1:]:
        assert "portguard_guard_loaded 0" in out
    else:
        assert "not loaded" in out


@pytest.mark.parametrize("form", ["--output", "--output=", "-o"])
def test_status_output_writes_the_same_file_on_both_paths(tmp_path, form):
    path = _config(tmp_path, GOOD)
    written = tmp_path / "portguard.prom"
    target = [f"--output={written}"] if form.endswith("=") else [form, str(written)]
    args = ["--config", str(path), "status", "--format", "prometheus", *target]
    code, out, err, _, text = both(tmp_path, args, written=written)
    assert (code, out) == (STATUS_END, "")
    assert (text is not None) == AS_ROOT
    if AS_ROOT:
        assert "portguard_guard_loaded 0" in text


@pytest.mark.parametrize(
    "options", [["8000"], ["8000/tcp", "--json"], ["--json", "8000"], ["http"], ["7/udp"]]
)
@pytest.mark.parametrize("config", ["GOOD", "BAD"])
def test_check_ends_alike_on_both_paths(tmp_path, options, config):
    path = _config(tmp_path, {"GOOD": GOOD, "BAD": BAD}[config])
    code, out, err, records = both(tmp_path, ["--config", str(path), "check", *options])
    assert records == {}
    if config == "BAD":
        assert "port 70000 is out of range" in err
    if not AS_ROOT:
        assert (code, out) == (1, "") and err.endswith(ROOT_ERROR)
    else:
        assert code == 0 and ("not reserved" in out or '"reserved": false' in out)


@pytest.mark.parametrize("command", [["status"], ["check", "8000"]])
def test_a_missing_config_is_exit_2_for_status_and_check_on_both_paths(tmp_path, command):
    missing = tmp_path / "nope.toml"
    code, out, err, _ = both(tmp_path, [f"--config={missing}", *command])
    assert (code, out) == (2, "")  # check warns first, then stops (as it always has)
    assert err.endswith(f"Error: {missing}: no such configuration file\n")


def test_status_and_check_reach_click_for_help_and_usage_errors(tmp_path):
    path = _config(tmp_path, GOOD)
    run_dir = tmp_path / "run"
    helped = run(FAST, ["status", "--help"], run_dir)
    assert helped.returncode == 0 and "--format [text|json|prometheus]" in helped.stdout
    bad_format = run(FAST, ["--config", str(path), "status", "--format", "xml"], run_dir)
    assert bad_format.returncode == 2 and "Invalid value for '--format'" in bad_format.stderr
    directory = run(FAST, ["--config", str(path), "status", "-o", str(tmp_path)], run_dir)
    assert directory.returncode == 2 and "is a directory" in directory.stderr
    bad_port = run(FAST, ["--config", str(path), "check", "no-such-service-here"], run_dir)
    assert bad_port.returncode == 2 and bad_port.stderr.startswith("Usage: ")
    no_port = run(FAST, ["--config", str(path), "check"], run_dir)
    assert no_port.returncode == 2 and "Missing argument 'PORT'" in no_port.stderr


# What `status` and `check` import, also the modules they import only when a step needs them.
READ_PATH_MODULES = (
    "guard.entry, guard.commands, guard.reports, guard.errors, guard.kernel.host, "
    "guard.kernel.layout, guard.observe.display, guard.observe.drift, guard.observe.holders, "
    "guard.observe.outcome, guard.observe.procnet, guard.observe.state, guard.policy.owners, "
    "guard.policy.plan, guard.policy.ports, guard.policy.resvport"
)


@pytest.mark.parametrize(
    "command", [["status"], ["status", "--json"], ["check", "8000"], ["check", "--json", "80"]]
)
def test_the_status_and_check_paths_import_neither_dataclasses_nor_click(reachable, command):
    """click costs ~39 ms (inspect) and dataclasses ~30 ms of a status under /usr/bin/python3:
    operators and monitoring run these every few seconds. Imported, then run."""
    path = _config(reachable, GOOD)
    code = (
        "import sys\n"
        f"import {READ_PATH_MODULES}\n"
        f"sys.argv = ['portguard', '--config', {str(path)!r}, *{command!r}]\n"
        "try:\n"
        "    guard.entry.main()\n"
        "except SystemExit as exc:\n"
        "    heavy = [m for m in sys.modules if m.split('.')[0] in ('dataclasses', 'click')]\n"
        "    print(exc.code, sorted(heavy), file=sys.stderr)\n"
    )
    proc = run([sys.executable, "-c", code], [], reachable / "run")
    end = {"status": STATUS_END, "check": 0 if AS_ROOT else 1}[command[0]]
    assert proc.stderr.endswith(f"{end} []\n"), proc.stderr
