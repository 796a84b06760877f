"""X-PortGuard-Reserve= under a real systemd (Debian bookworm booted with systemd-nspawn, the
built .deb installed before boot): a drop-in on an owner unit reserves its port at boot, a
stranger is refused, and editing the drop-in + `systemctl daemon-reload` moves the guard
(portguard-generator -> portguard-reload.path -> reload of portguard.service) while a stranger
hammers a port that stays reserved: it never gets it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.systemd.conftest import booted
from tests.systemd.guest_files import (
    ADDED_PORT,
    DECLARED_PORT,
    DECLARING_DROPIN,
    DECLARING_UNITS,
    OWNER_PORT,
    PGNET,
    UNIT_DIR,
    declaration,
)
from tests.systemd.machine import GUEST_RESULTS, Machine
from tests.systemd.probes import ALL_WAYS, EADDRINUSE, reservation, stranger_tries, wait_for

pytestmark = pytest.mark.kernel

PORT, ADDED, DROPIN = DECLARED_PORT, ADDED_PORT, DECLARING_DROPIN
UNITS = {
    **DECLARING_UNITS,
    f"{UNIT_DIR}/pg-hammer@.service": f"""\
[Unit]
Description=portguard test: a stranger binding %i in a loop

[Service]
Type=notify
ExecStart={PGNET} hammer %i {GUEST_RESULTS}/hammer-%i.json
""",
}


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    with booted(extra=UNITS) as box:
        yield box


def check(machine: Machine, port: int) -> dict:
    shown = machine.run("portguard", "check", f"{port}/tcp", "--json", check=True)
    return json.loads(shown.stdout)[0]


def test_a_drop_in_reserves_its_units_port_at_boot_and_says_where(machine: Machine):
    res = reservation(machine, PORT, "tcp")
    (owner,) = res["owners"]
    assert owner["cgroup"].endswith("/system.slice/pg-decl.service") and owner["id"]
    assert res["origins"] == [f"{DROPIN}:2"]
    assert check(machine, PORT)["origins"] == [f"{DROPIN}:2"]
    assert machine.show("pg-decl.service", "ActiveState")["ActiveState"] == "active"
    assert stranger_tries(machine, PORT) == dict.fromkeys(ALL_WAYS, EADDRINUSE)
    assert machine.show("portguard-reload.path", "ActiveState")["ActiveState"] == "active"


def test_systemd_analyze_verify_is_clean_on_the_declaring_unit(machine: Machine):
    verify = machine.run("systemd-analyze", "verify", f"{UNIT_DIR}/pg-decl.service")
    assert verify.returncode == 0, verify.stderr
    assert "X-PortGuard" not in verify.stdout + verify.stderr


def test_edit_and_daemon_reload_moves_the_guard_while_a_stranger_hammers(machine: Machine):
    machine.systemctl("start", f"pg-hammer@{PORT}.service")
    try:
        machine.write(DROPIN, declaration(PORT, ADDED))
        start = time.monotonic()
        machine.systemctl("daemon-reload")
        reserved = wait_for(lambda: check(machine, ADDED)["reserved"], timeout=30, interval=0.05)
        delay = time.monotonic() - start
        assert reserved, "daemon-reload did not re-apply"
        print(f"daemon-reload -> {ADDED}/tcp guarded: {delay:.2f} s")
        assert stranger_tries(machine, ADDED) == dict.fromkeys(ALL_WAYS, EADDRINUSE)
        machine.write(DROPIN, declaration(PORT))
        machine.systemctl("daemon-reload")
        assert wait_for(lambda: not check(machine, ADDED)["reserved"], timeout=30, interval=0.05)
    finally:
        machine.systemctl("stop", f"pg-hammer@{PORT}.service")
    hammer = machine.result(f"hammer-{PORT}.json")
    assert hammer["attempts"] > 0 and hammer["bound"] == 0, hammer
    assert reservation(machine, PORT, "tcp")["origins"] == [f"{DROPIN}:2"]


def test_a_bad_value_leaves_that_unit_out_loudly_and_every_other_port_guarded(machine: Machine):
    machine.write(DROPIN, declaration(PORT, "no-such-service"))
    try:
        machine.systemctl("daemon-reload")
        assert wait_for(lambda: not check(machine, PORT)["reserved"], timeout=30, interval=0.05)
        shown = machine.run("portguard", "status")
        assert shown.returncode == 5, shown.stderr
        assert f"{DROPIN}:2: X-PortGuard-Reserve=no-such-service" in shown.stderr
        assert reservation(machine, OWNER_PORT, "tcp")["owners"]  # the TOML's port: still there
        journal = machine.run("journalctl", "-b", "-u", "portguard.service", "--no-pager").stdout
        assert f"warning: {DROPIN}:2" in journal
    finally:
        machine.write(DROPIN, declaration(PORT))
        machine.systemctl("daemon-reload")
    assert wait_for(lambda: check(machine, PORT)["reserved"], timeout=30, interval=0.05)


def test_after_portguard_remove_a_daemon_reload_does_not_bring_the_guard_back(machine: Machine):
    machine.run("portguard", "remove", check=True)
    try:
        machine.systemctl("daemon-reload")
        time.sleep(2)
        assert not check(machine, PORT)["reserved"]
        assert machine.run("portguard", "status").returncode == 4
    finally:
        machine.systemctl("reload", "portguard.service")
    assert check(machine, PORT)["reserved"]
