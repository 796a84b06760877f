from __future__ import annotations

import pytest

from guard.kernel import sysctl
from guard.policy.ports import (
    PortRange,
    PortSpecError,
    parse_check_target,
    parse_port_spec,
    read_services,
)

SERVICES = {"ipp": {"tcp": 631}, "domain": {"tcp": 53, "udp": 53}, "bootpc": {"udp": 68}}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("631", PortRange(631, 631, ("tcp", "udp"))),
        ("ipp", PortRange(631, 631, ("tcp", "udp"))),
        ("ipp/udp", PortRange(631, 631, ("udp",))),
        ("bootpc/tcp", PortRange(68, 68, ("tcp",))),
        ("8000-8010/TCP", PortRange(8000, 8010, ("tcp",))),
        (" 53/udp ", PortRange(53, 53, ("udp",))),
        ("1-65535", PortRange(1, 65535, ("tcp", "udp"))),
    ],
)
def test_port_specs(spec, expected):
    assert parse_port_spec(spec, SERVICES) == expected


@pytest.mark.parametrize("spec", ["0", "65536", "9-3", "x", "/tcp", "1/icmp", "1-", "-5"])
def test_bad_port_specs(spec):
    with pytest.raises(PortSpecError):
        parse_port_spec(spec, SERVICES)


def test_check_takes_one_port():
    assert parse_check_target("631/tcp", SERVICES) == [("tcp", 631)]
    with pytest.raises(PortSpecError):
        parse_check_target("1-2", SERVICES)


def test_services_file_with_aliases_and_comments(tmp_path):
    path = tmp_path / "services"
    path.write_text(
        "# comment\nkerberos-adm 749/tcp   # kadmin\nldaps 636/tcp\nldaps 636/udp\n"
        "www 80/tcp http\nbroken line\n"
    )
    services = read_services(path)
    assert services["kerberos-adm"] == {"tcp": 749}
    assert services["http"] == {"tcp": 80}
    assert services["ldaps"] == {"tcp": 636, "udp": 636}


@pytest.mark.parametrize(
    "text, ports",
    [
        ("", set()),
        ("\n", set()),
        ("5555", {5555}),
        ("1,3-5,9", {1, 3, 4, 5, 9}),
    ],
)
def test_reserved_ports_round_trip(text, ports):
    assert sysctl.parse(text) == ports
    assert sysctl.parse(sysctl.format_ports(ports)) == ports


def test_reserved_ports_are_written_compactly():
    assert sysctl.format_ports({631, 632, 633, 873, 40000}) == "631-633,873,40000"
