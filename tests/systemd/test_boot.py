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
import time

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


def test_the_boot_goes_on_at_ready_and_apply_keeps_its_records_after(machine: Machine):
    """Type=notify: the unit was active (READY=1: the guard in force) before apply exited."""
    active = monotonic(machine, "portguard.service", "ActiveEnterTimestampMonotonic")
    exited = monotonic(machine, "portguard.service", "ExecMainExitTimestampMonotonic")
    assert 0 < active <= exited
    assert machine.show("portguard.service", "ExecMainStatus") == {"ExecMainStatus": "0"}


def _unit_warnings(machine: Machine) -> list[str]:
    """What the journal holds for portguard.service at warning priority or above (apply's own
    lines go in at info)."""
    shown = machine.run("journalctl", "-b", "-q", "-o", "cat", "-p", "warning", "-u", "portguard")
    return shown.stdout.splitlines()


def test_reload_waits_for_its_apply_and_restart_hears_ready_from_the_quick_path(
    machine: Machine,
):
    """ExecReload= gets no $NOTIFY_SOCKET (NotifyAccess=main): a reload ends when its apply
    has exited, with its records kept, and warns nothing; a restart's unchanged apply (the
    quick path, as ExecStart=) says READY=1 itself, or the unit would fail."""
    warned = _unit_warnings(machine)
    time.sleep(1.2)  # inputs changed less than a second before apply reads them keep no records
    machine.run("sh", "-c", "rm -f /run/portguard/guard-*", check=True)
    machine.systemctl("reload", "portguard.service")
    kept = machine.run("sh", "-c", "ls /run/portguard", check=True).stdout.split()
    assert any(name.startswith("guard-") for name in kept), kept
    done = {"ActiveState": "active", "SubState": "exited", "Result": "success"}

    def exited_well() -> bool:
        return machine.show("portguard.service", *done) == done

    for _ in range(2):  # the second restart finds the guard unchanged
        machine.systemctl("restart", "portguard.service")
        assert wait_for(exited_well, timeout=30), machine.show("portguard.service", *done)
    said = machine.run("journalctl", "-b", "-q", "-o", "cat", "-u", "portguard", check=True)
    assert "portguard: unchanged" in said.stdout, said.stdout[-300:]
    assert _unit_warnings(machine) == warned


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


def journal_of(machine: Machine, *matches: str) -> list[dict]:
    out = machine.run("journalctl", "-q", "-o", "json", *matches).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_monitor_unit_logs_refusals_to_the_journal_with_portguard_fields(machine: Machine):
    monitor = "portguard-monitor.service"
    where = (f"_SYSTEMD_UNIT={monitor}", f"PORTGUARD_UNIT=pg-stay@{OWNER_PORT}.service")
    machine.systemctl("start", monitor)
    try:
        try:
            said = wait_for(
                lambda: (
                    "monitoring refused binds"
                    in machine.run("journalctl", "-q", "-o", "cat", "-u", monitor).stdout
                )
            )
            assert said, machine.run("journalctl", "-q", "-u", monitor).stdout
            # A stranger that stays: the monitor names the caller's cgroup and unit when it
            # reads the event, and a oneshot's cgroup can be gone by then on a loaded machine.
            machine.systemctl("start", f"pg-stay@{OWNER_PORT}.service")
            stayed = machine.result(f"stay-{OWNER_PORT}.json")
            assert stayed == dict.fromkeys(ALL_WAYS, EADDRINUSE)
            # the first refusal of each caller, port and protocol at once: tcp and udp
            first = wait_for(
                lambda: found if len(found := journal_of(machine, *where)) >= 2 else []
            )
        finally:
            machine.systemctl("stop", monitor)
        # the second (IPv6) refusal of each protocol within the interval: one entry at the stop
        logged = wait_for(lambda: found if len(found := journal_of(machine, *where)) >= 4 else [])
    finally:
        machine.systemctl("stop", f"pg-stay@{OWNER_PORT}.service")
    assert len(first) == 2 and len(logged) == 4, logged
    ways = sorted(f"{e['PORTGUARD_FAMILY']}/{e['PORTGUARD_PROTOCOL']}" for e in logged)
    assert ways == ["ipv4/tcp", "ipv4/udp", "ipv6/tcp", "ipv6/udp"]
    assert [e.get("PORTGUARD_SUPPRESSED") for e in logged] == [None, None, "1", "1"]
    owner_cgroup = f"{machine.cgroup}/system.slice/pg-owner.service"
    for entry in logged:
        assert entry["PORTGUARD_PORT"] == str(OWNER_PORT)
        assert entry["PORTGUARD_VERDICT"] == "denied"
        assert entry["PRIORITY"] == "4"  # warning
        assert entry["PORTGUARD_OWNER"].lstrip("/") == owner_cgroup.lstrip("/")
        # a template's instances live in its own slice: system-pg\x2dstay.slice
        assert entry["PORTGUARD_CGROUP"].startswith(f"/{machine.cgroup.lstrip('/')}/system.slice/")
        assert entry["PORTGUARD_CGROUP"].endswith(f"/pg-stay@{OWNER_PORT}.service")
    assert logged[0]["MESSAGE"].startswith("refused bind of ")
    assert logged[2]["MESSAGE"].startswith("refused 1 more binds of ")


STOPS = 20


def invocation_log(machine: Machine, invocation: str) -> str:
    return machine.run(
        "journalctl", "-q", "-o", "cat", f"_SYSTEMD_INVOCATION_ID={invocation}"
    ).stdout


def test_monitor_unit_stops_cleanly_20_times_under_a_spinning_stranger(machine: Machine):
    """systemctl stop while pg-hammer binds 631 in a loop: every stop ends with the monitor's
    own exit 0 ("Deactivated successfully"), never the stop timeout's SIGKILL. The stop
    latencies are printed (figures, not assertions: the machine is shared)."""
    monitor = "portguard-monitor.service"
    machine.systemctl("start", "pg-hammer.service")
    latencies = []
    try:
        for _ in range(STOPS):
            machine.systemctl("start", monitor)
            invocation = machine.show(monitor, "InvocationID")["InvocationID"]
            started = wait_for(
                lambda inv=invocation: "monitoring refused binds" in invocation_log(machine, inv)
            )
            assert started, machine.run("journalctl", "-q", "-u", monitor).stdout
            timed = machine.run(
                "sh",
                "-c",
                f"a=$(date +%s%N); systemctl stop {monitor}; b=$(date +%s%N); echo $((b - a))",
                check=True,
            )
            latencies.append(int(timed.stdout) / 1e9)
            # generous: it stopped on SIGTERM, not at the 90 s timeout with SIGKILL
            assert latencies[-1] < 30, latencies
            said = wait_for(
                lambda inv=invocation: [
                    e["MESSAGE"]
                    for e in journal_of(machine, f"INVOCATION_ID={inv}", "_PID=1")
                    if "Deactivated" in e["MESSAGE"] or "Stopped" in e["MESSAGE"]
                ]
            )
            systemd_said = " | ".join(
                e["MESSAGE"] for e in journal_of(machine, f"INVOCATION_ID={invocation}", "_PID=1")
            )
            assert any("Deactivated successfully" in m for m in said), systemd_said
            assert "Killing" not in systemd_said and "code=killed" not in systemd_said
            assert "Failed with result" not in systemd_said, systemd_said
            log = invocation_log(machine, invocation)
            assert "Traceback" not in log and "stopped by SIGTERM" in log, log
    finally:
        machine.systemctl("stop", "pg-hammer.service")
    print(
        f"portguard-monitor.service stop latencies under a spinning stranger ({STOPS} stops, s): "
        + ", ".join(f"{t:.3f}" for t in latencies)
        + f"; max {max(latencies):.3f}"
    )


def _entries_in(machine: Machine, seconds: float, dropin: str | None) -> list[dict]:
    """Journal entries portguard-monitor writes in `seconds` while pg-hammer spins."""
    monitor = "portguard-monitor.service"
    path = "/etc/portguard/conf.d/50-journal.toml"
    if dropin:
        machine.run("sh", "-c", f"mkdir -p /etc/portguard/conf.d && echo '{dropin}' > {path}")
    machine.systemctl("start", "pg-hammer.service")
    try:
        machine.systemctl("start", monitor)
        invocation = machine.show(monitor, "InvocationID")["InvocationID"]
        time.sleep(seconds)
        machine.systemctl("stop", monitor)
    finally:
        machine.systemctl("stop", "pg-hammer.service")
        machine.run("rm", "-f", path)
    machine.run("journalctl", "--sync", timeout=300)  # everything sent is written
    entries = journal_of(machine, f"_SYSTEMD_INVOCATION_ID={invocation}")
    return [e for e in entries if "PORTGUARD_PORT" in e]


def test_a_spinning_stranger_cannot_flood_the_journal(machine: Machine):
    """Per minute of pg-hammer (631 tcp and udp, one cgroup): one entry per refusal without the
    limit (journal_interval = 0; journald drops beyond its own limit), a handful with it."""
    seconds = 20
    # the limited run first: journald's own rate limit (a burst scaled by free disk space per
    # 30 s) is spent by the unlimited run's flood, and a run right after it lost its entries
    entries = _entries_in(machine, seconds, None)
    unlimited = len(_entries_in(machine, seconds, "[guard]\njournal_interval = 0"))
    per_minute = 60 / seconds
    print(
        f"journal entries per minute from a spinning stranger: {unlimited * per_minute:.0f} "
        f"without the limit, {len(entries) * per_minute:.0f} with journal_interval = 30"
    )
    # per caller cgroup (this pg-hammer's, and the last one's refusals left in the buffer) and
    # protocol: the first refusal at once, at most one entry per interval, the rest at the stop
    keys = {(e["PORTGUARD_CGROUP_ID"], e["PORTGUARD_PROTOCOL"]) for e in entries}
    assert 2 <= len(keys) <= 4
    assert len(entries) <= len(keys) * (2 + seconds // 30)
    assert unlimited > 10 * len(entries)


def test_metrics_unit_writes_a_textfile_prometheus_parses(machine: Machine):
    parser = pytest.importorskip("prometheus_client.parser")
    assert machine.show("portguard-metrics.timer", "UnitFileState")["UnitFileState"] == "disabled"
    machine.systemctl("start", "portguard-metrics.service")
    shown = machine.show("portguard-metrics.service", "Result")
    assert shown == {"Result": "success"}
    text = machine.run("cat", "/var/lib/prometheus/node-exporter/portguard.prom", check=True).stdout
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("portguard_guard_loaded", ())] == 1
    assert samples[("portguard_config_matches", ())] == 1
    owner_tcp = (("port", str(OWNER_PORT)), ("protocol", "tcp"))
    assert samples[("portguard_holders", owner_tcp)] == 2  # pg-owner: IPv4 and IPv6
    assert samples[("portguard_squatter_present", owner_tcp)] == 0


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
