"""Questions the tests ask a booted guest: the guard as `portguard status --json` shows it, what
a stranger unit's binds see, unit properties, and bounded waiting."""

from __future__ import annotations

import json
import time

from tests.systemd.machine import Machine

EADDRINUSE = 98
ALL_WAYS = ("v4/tcp", "v4/udp", "v6/tcp", "v6/udp")
TCP_WAYS = ("v4/tcp", "v6/tcp")


def status(machine: Machine) -> dict:
    """status --json of a loaded guard; its exits 3 (a squatter) and 5 (loaded, but not what
    the files say now: a broken drop-in the tests write on purpose) are states, not failures."""
    shown = machine.run("portguard", "status", "--json")
    if shown.returncode not in (0, 3, 5):
        raise AssertionError(f"portguard status failed ({shown.returncode}):\n{shown.stderr}")
    return json.loads(shown.stdout)


def reservation(machine: Machine, port: int, protocol: str) -> dict:
    found = [
        r for r in status(machine)["reservations"] if (r["port"], r["protocol"]) == (port, protocol)
    ]
    assert len(found) == 1, status(machine)
    return found[0]


def stranger_tries(machine: Machine, port: int) -> dict[str, int]:
    """errno per way of binding, seen by the unit pg-try@PORT.service."""
    machine.systemctl("start", f"pg-try@{port}.service")
    return machine.result(f"try-{port}.json")


def monotonic(machine: Machine, unit: str, prop: str) -> int:
    return int(machine.show(unit, prop)[prop])


def wait_for(probe, timeout: float = 60.0, interval: float = 0.5):
    """probe() until it returns something true; that value (or the last one after timeout)."""
    deadline = time.monotonic() + timeout
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value
