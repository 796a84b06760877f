"""The command line without root: config errors, the portrelease shim, migration output."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from click.testing import CliRunner

from guard import cli


def run(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def test_bad_config_exits_2_with_file_and_line_and_no_traceback(tmp_path):
    path = tmp_path / "portguard.toml"
    path.write_text('[guard]\nportreserve_dir = ""\n[[reserve]]\nports = ["0"]\ncgroup = "/a"\n')
    result = run("--config", str(path), "apply")
    assert result.exit_code == 2
    assert f"{path}:4: port 0 is out of range" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_missing_explicit_config_exits_2(tmp_path):
    result = run("--config", str(tmp_path / "nope.toml"), "apply")
    assert result.exit_code == 2 and "no such configuration file" in result.output


def test_check_rejects_a_range_as_usage_error():
    assert run("check", "1-5").exit_code == 2


def test_portrelease_succeeds_and_does_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from guard.cli import portrelease; portrelease()", "cups"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_import_portreserve_prints_equivalent_toml(tmp_path):
    (tmp_path / "cups").write_text("ipp\n")
    (tmp_path / "rsync").write_text("873/tcp\n")
    result = run("import-portreserve", str(tmp_path))
    assert result.exit_code == 0
    data = tomllib.loads(result.output)
    assert {(tuple(b["ports"]), b["unit"]) for b in data["reserve"]} == {
        (("ipp",), "cups.service"),
        (("873/tcp",), "rsync.service"),
    }


def test_help_lists_the_commands():
    out = run("--help").output
    for command in ("apply", "status", "check", "remove", "build", "demo", "import-portreserve"):
        assert command in out
