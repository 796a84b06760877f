"""The embedded default policy is valid, stays in the bindresvport range and names real owners."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from guard.policy.defaults import default_policy_text, installed_units
from guard.policy.units import parse_unit_name, slice_cgroup_path, unit_cgroup_path

OWNER_KEYS = ("unit", "units", "slice", "slices", "cgroup", "cgroups")


@pytest.fixture(scope="module")
def blocks() -> list[dict]:
    return tomllib.loads(default_policy_text())["reserve"]


def _ports(spec: str) -> tuple[int, tuple[str, ...]]:
    match = re.fullmatch(r"(\d+)(?:/(tcp|udp))?", spec)
    assert match, f"default policy port {spec!r} should be a plain number, maybe with /tcp|/udp"
    return int(match.group(1)), (match.group(2),) if match.group(2) else ("tcp", "udp")


def test_default_policy_is_toml_with_only_reserve_blocks():
    data = tomllib.loads(default_policy_text())
    assert set(data) == {"reserve"}
    assert data["reserve"]


def test_every_reserved_port_is_in_the_bindresvport_range(blocks):
    for block in blocks:
        for spec in block["ports"]:
            port, _ = _ports(spec)
            assert 512 <= port <= 1023, f"{spec} is outside 512-1023"


def test_every_block_has_owners_and_applies_only_where_installed(blocks):
    for block in blocks:
        owners = [key for key in OWNER_KEYS if block.get(key)]
        assert owners, f"block for {block['ports']} names no owner"
        assert block.get("if_installed") is True, f"block for {block['ports']} is unconditional"
        assert block.get("units") or block.get("unit"), "if_installed needs units to look for"


def test_every_owner_name_resolves_to_a_cgroup_path(blocks, tmp_path):
    for block in blocks:
        for unit in block.get("units", []) + ([block["unit"]] if "unit" in block else []):
            assert unit_cgroup_path(unit, unit_dirs=[tmp_path]).startswith("/")
        if "slice" in block:
            assert slice_cgroup_path(block["slice"]).startswith("/")


def test_issue_ports_are_covered_with_their_usual_owners(blocks):
    owners: dict[tuple[str, int], set[str]] = {}
    for block in blocks:
        for spec in block["ports"]:
            port, protocols = _ports(spec)
            for proto in protocols:
                owners.setdefault((proto, port), set()).update(block.get("units", []))
    assert {"cups.service", "cups.socket"} <= owners[("tcp", 631)]
    assert "cups.service" in owners[("udp", 631)]
    assert "slapd.service" in owners[("tcp", 636)]
    assert {"krb5-admin-server.service", "kadmin.service"} <= owners[("tcp", 749)]
    assert {"spamd.service", "spamassassin.service"} <= owners[("tcp", 783)]
    assert {"rsync.service", "rsyncd.service"} <= owners[("tcp", 873)]
    assert "dovecot.service" in owners[("tcp", 993)]
    assert "dovecot.service" in owners[("tcp", 995)]


def test_socket_owners_are_paired_with_their_service(blocks):
    for block in blocks:
        names = block.get("units", [])
        for name in names:
            if parse_unit_name(name).type == "socket":
                service = name.removesuffix(".socket") + ".service"
                assert service in names, f"{name} without {service}"


def test_default_policy_loads_with_the_config_parser():
    from guard.policy import config

    loaded = config.loads(default_policy_text(), name="<default policy>")
    assert loaded.blocks
    assert all(block.if_installed for block in loaded.blocks)


def test_installed_units_lists_those_with_unit_files_in_order(tmp_path):
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    etc.mkdir()
    usr.mkdir()
    (usr / "dovecot.service").write_text("[Service]\nExecStart=/usr/sbin/dovecot -F\n")
    (usr / "cups.socket").write_text("[Socket]\nListenStream=631\n")
    (usr / "tinc@.service").write_text("[Service]\nExecStart=/usr/sbin/tincd -n %i\n")
    (usr / "spamd.service").write_text("[Service]\nExecStart=/usr/sbin/spamd\n")
    os.symlink("spamd.service", usr / "spamassassin.service")
    (usr / "slapd.service").write_text("[Service]\nExecStart=/usr/sbin/slapd\n")
    os.symlink(os.devnull, etc / "slapd.service")
    wanted = [
        "cups.socket",
        "cups.service",
        "slapd.service",
        "tinc@vpn.service",
        "spamassassin.service",
        "dovecot.service",
    ]
    assert installed_units(wanted, unit_dirs=[etc, usr]) == [
        "cups.socket",
        "tinc@vpn.service",
        "spamassassin.service",
        "dovecot.service",
    ]


def test_installed_units_of_an_empty_system_is_empty(tmp_path: Path):
    assert installed_units(["cups.service", "slapd.service"], unit_dirs=[tmp_path]) == []


def _plan_with(tmp_path, monkeypatch, unit_files: dict[str, str], text: str):
    from guard.kernel.layout import LIMITS
    from guard.policy import config, owners, plan

    units = tmp_path / "units"
    units.mkdir()
    for name, content in unit_files.items():
        (units / name).write_text(content)
    monkeypatch.setenv(owners.UNIT_DIRS_ENV, str(units))
    monkeypatch.setattr(config, "PORTRESERVE_DIR", "")
    cfg = config.loads(text)
    return plan.build(cfg.settings, owners.resolve(cfg), owners.extra_owners(cfg), LIMITS)


def _owners(built, port, proto="tcp"):
    from guard.policy.ports import PROTOCOL_NUMBERS

    return set(built.owners_of(PROTOCOL_NUMBERS[proto], port))


SERVICE = "[Service]\nExecStart=/bin/true\n"


def test_a_socket_unit_and_pid_1_are_trusted_only_for_the_ports_it_listens_on(
    tmp_path, monkeypatch
):
    built = _plan_with(
        tmp_path,
        monkeypatch,
        {
            "cups.service": SERVICE,
            "cups.socket": "[Socket]\nListenStream=/run/cups/cups.sock\n",  # Debian's
            "dovecot.service": SERVICE,
            "dovecot.socket": "[Socket]\nListenStream=143\nListenStream=993\n",
        },
        '[[reserve]]\nports = ["631"]\nunits = ["cups.service", "cups.socket"]\n'
        '[[reserve]]\nports = ["993/tcp", "995/tcp"]\n'
        'units = ["dovecot.service", "dovecot.socket"]\n',
    )
    assert _owners(built, 631) == _owners(built, 631, "udp") == {"/system.slice/cups.service"}
    assert _owners(built, 993) == {
        "/init.scope",
        "/system.slice/dovecot.socket",
        "/system.slice/dovecot.service",
    }
    assert _owners(built, 995) == {"/system.slice/dovecot.service"}


def test_pid_1_named_as_an_owner_itself_is_not_limited(tmp_path, monkeypatch):
    files = {"x.service": SERVICE, "x.socket": "[Socket]\nListenDatagram=700\n"}
    text = '[[reserve]]\nports = ["700"]\nunits = ["x.socket", "init.scope"]\n'
    built = _plan_with(tmp_path, monkeypatch, files, text)
    assert "/init.scope" in _owners(built, 700, "tcp")
    assert _owners(built, 700, "tcp") - {"/init.scope"} == {"/system.slice/x.service"}
    assert "/system.slice/x.socket" in _owners(built, 700, "udp")


def test_a_block_whose_only_owner_is_a_socket_not_listening_on_the_port_is_an_error(
    tmp_path, monkeypatch
):
    from guard.policy import config

    with pytest.raises(config.ConfigError, match="none of the owners binds 701/tcp"):
        _plan_with(
            tmp_path,
            monkeypatch,
            {"y.socket": "[Socket]\nListenStream=702\nAccept=yes\n"},
            '[[reserve]]\nports = ["701/tcp"]\nunit = "y.socket"\n',
        )
