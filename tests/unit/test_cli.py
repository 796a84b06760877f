"""The command line without root: config errors, the portrelease shim, migration output."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
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
        [sys.executable, "-c", "from guard.entry import portrelease; portrelease()", "cups"],
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


def test_import_portreserve_drop_ins_declare_the_same_ports_and_never_overwrite(tmp_path):
    from guard.policy import declared
    from guard.policy.ports import Services

    portreserve, units = tmp_path / "portreserve", tmp_path / "units"
    portreserve.mkdir()
    (portreserve / "cups").write_text("ipp\n631/udp\n")
    (portreserve / "rsync").write_text("873/tcp\n")
    result = run("import-portreserve", "--drop-ins", str(units), str(portreserve))
    assert result.exit_code == 0, result.output
    assert f"wrote {units}/cups.service.d/portguard.conf" in result.output
    services = tmp_path / "services"
    services.write_text("ipp\t631/tcp\n")
    found = declared.read([units], Services(services))
    assert {b.owners[0].name: [str(p) for p, _ in b.ports] for b in found.blocks} == {
        "cups.service": ["631", "631/udp"],
        "rsync.service": ["873/tcp"],
    }
    again = run("import-portreserve", "--drop-ins", str(units), str(portreserve))
    assert again.exit_code == 0  # the same text: nothing to refuse
    (units / "rsync.service.d" / "portguard.conf").write_text("[Unit]\n# mine\n")
    (portreserve / "cups").write_text("ipp\n")
    clash = run("import-portreserve", "--drop-ins", str(units), str(portreserve))
    assert clash.exit_code == 2 and "exist and differ" in clash.output
    assert "631/udp" in (units / "cups.service.d" / "portguard.conf").read_text()  # none written


def test_help_lists_the_commands():
    out = run("--help").output
    for command in ("apply", "status", "check", "remove", "build", "demo", "import-portreserve"):
        assert command in out


def test_version_prints_the_package_version():
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        result = run(flag)
        assert result.exit_code == 0 and result.output == f"portguard {version('portguard')}\n"


def _dry_config(tmp_path, reserve: str) -> str:
    path = tmp_path / "portguard.toml"
    path.write_text(f'[guard]\nportreserve_dir = ""\npin_dir = "{tmp_path}/pins"\n\n{reserve}')
    return str(path)


def test_apply_dry_run_prints_the_plan_changes_nothing_and_exits_0(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTGUARD_RUN_DIR", str(tmp_path / "run"))
    path = _dry_config(
        tmp_path,
        '[[reserve]]\nports = ["8000-8099/tcp", "631"]\ncgroups = ["/app", "/other"]\n',
    )
    result = run("--config", path, "apply", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("portguard: the configuration is valid; read:")
    assert path in result.output
    table = lines[lines.index(next(x for x in lines if "PORTS" in x)) + 1 :]
    text = Path(path).read_text().splitlines()
    ports_line = text.index('ports = ["8000-8099/tcp", "631"]') + 1
    origin = f"portguard.toml:{ports_line}"
    assert [line.split()[:3] for line in table[:9]] == [
        ["631", "tcp", "/app"],
        ["/other"],
        ["from", table[2].split()[1]],
        ["631", "udp", "/app"],
        ["/other"],
        ["from", table[5].split()[1]],
        ["8000-8099", "tcp", "/app"],
        ["/other"],
        ["from", table[8].split()[1]],
    ]
    assert all(table[i].endswith(origin) for i in (2, 5, 8)), table
    assert all(len(line) <= 100 for line in lines)
    assert not (tmp_path / "pins").exists() and not (tmp_path / "run").exists()


def test_apply_dry_run_of_a_broken_file_exits_2_and_records_no_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTGUARD_RUN_DIR", str(tmp_path / "run"))
    path = _dry_config(tmp_path, '[[reserve]]\nports = ["70000"]\ncgroup = "/a"\n')
    result = run("--config", path, "apply", "-n")
    assert result.exit_code == 2 and "port 70000 is out of range" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["status", "apply", "remove"])
def test_a_configuration_directory_nobody_may_read_is_one_sentence_and_exit_2(
    nobody_modules, command
):
    from tests.unprivileged import run_python

    top = Path(tempfile.mkdtemp(prefix="portguard-etc-"))  # reachable: tmp_path may not be
    try:
        top.chmod(0o755)
        etc = top / "etc"
        etc.mkdir(mode=0o700)
        (etc / "portguard.toml").write_text("[guard]\n")
        proc = run_python(
            nobody_modules, ["-m", "guard", "--config", f"{etc}/portguard.toml", command]
        )
    finally:
        shutil.rmtree(top)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"Error: cannot read the configuration: {etc}/portguard.toml: Permission denied\n"
    )


def test_a_directory_among_the_dropins_is_an_error_not_skipped(tmp_path):
    (tmp_path / "conf.d" / "x.toml").mkdir(parents=True)
    main = tmp_path / "portguard.toml"
    main.write_text('[guard]\nportreserve_dir = ""\n')
    result = run("--config", str(main), "apply", "--dry-run")
    assert result.exit_code == 2
    assert f"{tmp_path}/conf.d/x.toml:1: cannot read: not a regular file" in result.output


def test_a_problem_of_a_port_for_tcp_and_udp_is_said_once(tmp_path):
    owners = ", ".join(f'"/a{i}"' for i in range(70))
    path = _dry_config(tmp_path, f'[[reserve]]\nports = ["7000"]\ncgroups = [{owners}]\n')
    result = run("--config", path, "apply", "--dry-run")
    assert result.exit_code == 2
    assert result.output.count("port 7000 has 70 owners") == 1
