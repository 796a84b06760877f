"""portguard under a real systemd: Debian bookworm booted with systemd-nspawn --boot.

portguard is the built .deb, installed into the guest's root file system before boot (which has
no clang and no libbpf-dev); its postinst enabled portguard.service, which applies the
configuration at early boot: the packaged /etc/portguard/portguard.toml (default policy) and the
tests' drop-in: 631 tcp+udp owned by pg-owner.service (enabled, started at boot), 873/tcp owned
by the socket unit pg-sock.socket. Stranger units try the same ports. The guest's kernel is the
host's.
"""

from __future__ import annotations

import json

import pytest

from tests import debs
from tests.systemd.conftest import package
from tests.systemd.guest_files import OWNER_PORT, PGNET, SOCKET_PORT
from tests.systemd.machine import Machine
from tests.systemd.probes import (
    ALL_WAYS,
    EADDRINUSE,
    TCP_WAYS,
    monotonic,
    reservation,
    stranger_tries,
    wait_for,
)

pytestmark = pytest.mark.kernel


def test_the_guest_runs_the_installed_package_and_has_no_compiler_nor_libbpf_dev(
    machine: Machine,
):
    assert machine.run("dpkg-query", "-S", "/usr/bin/portguard", check=True).stdout.startswith(
        "portguard: /usr/bin/portguard"
    )
    version = machine.run("dpkg-query", "-W", "-f=${Version}", "portguard", check=True).stdout
    assert version == debs.version_of(package())
    for absent in ("clang", "libbpf-dev"):
        installed = machine.run("dpkg-query", "-W", "-f=${db:Status-Status}", absent).stdout
        assert installed in ("", "not-installed"), f"{absent} is in the guest"
    assert machine.run("sh", "-c", "command -v clang").returncode != 0
    assert machine.run("test", "-e", "/usr/include/bpf/libbpf.h").returncode != 0


def test_the_package_installed_before_boot_enabled_its_unit_and_started_nothing(
    machine: Machine,
):
    # dpkg -i ran in a chroot (no systemd): the postinst only enabled the unit.
    assert "portguard:" not in machine.install_output, machine.install_output
    assert machine.systemctl("is-enabled", "portguard.service").stdout.strip() == "enabled"
    assert (
        machine.systemctl("is-enabled", "portguard-monitor.service", check=False).stdout.strip()
        == "disabled"
    )
    shown = machine.show("portguard.service", "FragmentPath")["FragmentPath"]
    assert shown.endswith("/lib/systemd/system/portguard.service"), shown
    started = machine.run("journalctl", "-q", "-o", "cat", "-u", "portguard.service", check=True)
    assert started.stdout.count("portguard: applied") == 1, started.stdout


def test_portguard_service_applies_at_boot_before_rpcbind(machine: Machine):
    shown = machine.show("portguard.service", "ActiveState", "Result")
    assert shown == {"ActiveState": "active", "Result": "success"}
    guarded = monotonic(machine, "portguard.service", "ActiveEnterTimestampMonotonic")
    assert guarded > 0
    for unit in ("rpcbind.socket", "rpcbind.service"):
        assert machine.show(unit, "ActiveState")["ActiveState"] == "active"
        started = monotonic(machine, unit, "InactiveExitTimestampMonotonic")
        assert guarded <= started, f"{unit} started before portguard.service had finished"


def test_status_shows_owners_by_unit_name(machine: Machine):
    for protocol in ("tcp", "udp"):
        owners = reservation(machine, OWNER_PORT, protocol)["owners"]
        assert [o["unit"] for o in owners] == ["pg-owner.service"]
        assert owners[0]["cgroup"] == f"{machine.cgroup}/system.slice/pg-owner.service"
        assert owners[0]["id"] is not None  # started at boot, tracked by the kernel
    owners = reservation(machine, SOCKET_PORT, "tcp")["owners"]
    assert {o["unit"] for o in owners} == {"init.scope", "pg-sock.socket", "pg-sock.service"}
    assert all(o["cgroup"].startswith(machine.cgroup + "/") for o in owners)


def test_owner_unit_started_at_boot_holds_its_port(machine: Machine):
    assert machine.show("pg-owner.service", "ActiveState")["ActiveState"] == "active"
    listening = machine.run("ss", "-Hltn", f"sport = :{OWNER_PORT}", check=True).stdout
    assert len(listening.splitlines()) == 2  # IPv4 and IPv6


def test_stranger_unit_gets_eaddrinuse_while_the_owner_runs_and_while_it_is_stopped(
    machine: Machine,
):
    denied_before = reservation(machine, OWNER_PORT, "udp")["denied"]
    assert stranger_tries(machine, OWNER_PORT) == dict.fromkeys(ALL_WAYS, EADDRINUSE)
    machine.systemctl("stop", "pg-owner.service")
    try:
        # Nobody holds the port now: only the guard refuses.
        assert stranger_tries(machine, OWNER_PORT) == dict.fromkeys(ALL_WAYS, EADDRINUSE)
    finally:
        machine.systemctl("start", "pg-owner.service")
    assert reservation(machine, OWNER_PORT, "udp")["denied"] >= denied_before + 4


def test_owner_restarted_100_times_while_a_stranger_hammers_the_port(machine: Machine):
    cgroup_id_before = reservation(machine, OWNER_PORT, "tcp")["owners"][0]["id"]
    machine.systemctl("start", "pg-hammer.service")  # ready once it has tried every way
    restarts = machine.run(
        "sh",
        "-c",
        """
        failed=0
        for i in $(seq 100); do systemctl restart pg-owner.service || failed=$((failed + 1)); done
        echo $failed""",
        timeout=600,
        check=True,
    )
    machine.systemctl("stop", "pg-hammer.service")
    assert restarts.stdout.split() == ["0"], restarts.stderr
    assert machine.show("pg-owner.service", "ActiveState")["ActiveState"] == "active"
    hammer = machine.result("hammer.json")
    assert hammer["attempts"] > 0
    assert hammer["bound"] == 0
    assert set(hammer["errors"]) == {str(EADDRINUSE)}
    # Every restart made a new cgroup; the kernel's tracker followed it.
    assert reservation(machine, OWNER_PORT, "tcp")["owners"][0]["id"] != cgroup_id_before


def test_socket_activated_owner_serves_and_its_port_is_refused_to_strangers(machine: Machine):
    assert machine.show("pg-sock.socket", "ActiveState")["ActiveState"] == "active"
    greeting = machine.run(*PGNET.split(), "connect", str(SOCKET_PORT), check=True).stdout
    assert greeting.startswith("hello from pid")
    machine.systemctl("stop", "pg-sock.socket")
    try:
        tried = stranger_tries(machine, SOCKET_PORT)
    finally:
        machine.systemctl("start", "pg-sock.socket")
    assert {way: tried[way] for way in TCP_WAYS} == dict.fromkeys(TCP_WAYS, EADDRINUSE)
    assert {way: tried[way] for way in ("v4/udp", "v6/udp")} == {"v4/udp": 0, "v6/udp": 0}
    greeting = machine.run(*PGNET.split(), "connect", str(SOCKET_PORT), check=True).stdout
    assert greeting.startswith("hello from pid")


def test_monitor_unit_logs_each_refusal_to_the_journal_with_portguard_fields(machine: Machine):
    monitor = "portguard-monitor.service"
    machine.systemctl("start", monitor)
    try:
        said = wait_for(
            lambda: (
                "monitoring refused binds"
                in machine.run("journalctl", "-q", "-o", "cat", "-u", monitor).stdout
            )
        )
        assert said, machine.run("journalctl", "-q", "-u", monitor).stdout
        # A stranger that stays: the monitor names the caller's cgroup and unit when it reads
        # the event, and a oneshot's cgroup can be gone by then on a loaded machine.
        machine.systemctl("start", f"pg-stay@{OWNER_PORT}.service")
        assert machine.result(f"stay-{OWNER_PORT}.json") == dict.fromkeys(ALL_WAYS, EADDRINUSE)

        def entries() -> list[dict]:
            out = machine.run(
                "journalctl",
                "-q",
                "-o",
                "json",
                f"_SYSTEMD_UNIT={monitor}",
                f"PORTGUARD_UNIT=pg-stay@{OWNER_PORT}.service",
            ).stdout
            found = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            return found if len(found) >= len(ALL_WAYS) else []

        logged = wait_for(entries)
    finally:
        machine.systemctl("stop", monitor, f"pg-stay@{OWNER_PORT}.service")
    ways = sorted(f"{e['PORTGUARD_FAMILY']}/{e['PORTGUARD_PROTOCOL']}" for e in logged)
    assert ways == ["ipv4/tcp", "ipv4/udp", "ipv6/tcp", "ipv6/udp"]
    owner_cgroup = f"{machine.cgroup}/system.slice/pg-owner.service"
    for entry in logged:
        assert entry["PORTGUARD_PORT"] == str(OWNER_PORT)
        assert entry["PORTGUARD_VERDICT"] == "denied"
        assert entry["PRIORITY"] == "4"  # warning
        assert entry["PORTGUARD_OWNER"].lstrip("/") == owner_cgroup.lstrip("/")
        # a template's instances live in its own slice: system-pg\x2dstay.slice
        assert entry["PORTGUARD_CGROUP"].startswith(f"/{machine.cgroup.lstrip('/')}/system.slice/")
        assert entry["PORTGUARD_CGROUP"].endswith(f"/pg-stay@{OWNER_PORT}.service")
        assert entry["MESSAGE"].startswith("refused bind of ")


def test_apply_asks_systemd_once(machine: Machine):
    """systemctl is started once per apply, however many units the configuration names."""
    wrapper = '#!/bin/sh\\necho "$*" >> /run/pg-count/log\\nexec /usr/bin/systemctl "$@"\\n'
    script = (
        "mkdir -p /run/pg-count && rm -f /run/pg-count/log"
        f" && printf '{wrapper}' > /run/pg-count/systemctl && chmod +x /run/pg-count/systemctl"
        " && PATH=/run/pg-count:$PATH portguard apply >/dev/null && cat /run/pg-count/log"
    )
    log = machine.run("sh", "-c", script, check=True).stdout.splitlines()
    assert len(log) == 1, log
    assert log[0].startswith("show ")
