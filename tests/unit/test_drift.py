"""status's "is the loaded guard the one the files ask for?" (guard/drift.py)."""

from __future__ import annotations

from guard.kernel.layout import LIMITS
from guard.observe import drift
from guard.observe.state import GuardState, OwnerState, ReservationState
from guard.policy import config, owners, plan


def planned(text: str) -> plan.Plan:
    cfg = config.loads(text)
    return plan.build(cfg.settings, owners.resolve(cfg), owners.extra_owners(cfg), LIMITS)


FILES = """
[guard]
mode = "enforce"
[[reserve]]
ports = ["631/tcp"]
cgroups = ["/system.slice/cups.service"]
"""


def loaded(*reservations: ReservationState, **changes) -> GuardState:
    values = {
        "loaded": True,
        "pin_dir": "/sys/fs/bpf/portguard",
        "program": "guard-retval-0123",
        "mode": "enforce",
        "deny_errno": 98,
        "reservations": reservations,
    }
    values.update(changes)
    return GuardState(**values)


CUPS = ReservationState(631, "tcp", (OwnerState("/system.slice/cups.service", 7),), 0)


def test_the_guard_the_files_ask_for_has_no_differences():
    assert drift.differences(planned(FILES), loaded(CUPS)) == []


def test_a_port_added_to_the_files_and_one_dropped_are_named():
    files = FILES.replace('"631/tcp"', '"631/udp"')
    assert drift.differences(planned(files), loaded(CUPS)) == [
        "631/tcp is guarded but no longer in the files",
        "631/udp is in the files but not guarded",
    ]


def test_other_owners_are_named_with_what_would_change():
    files = FILES.replace('cups.service"]', 'cups.service", "/system.slice/x.service"]')
    assert drift.differences(planned(files), loaded(CUPS)) == [
        "631/tcp: the files' owners differ (to add /system.slice/x.service)"
    ]


def test_mode_and_errno_are_compared_but_an_eperm_only_program_is_not_a_difference():
    files = FILES.replace('mode = "enforce"', 'mode = "audit"\ndeny_errno = "EACCES"')
    assert drift.differences(planned(files), loaded(CUPS)) == [
        "mode: the files say audit, the guard runs enforce",
        "deny_errno: the files say EACCES, the guard answers EADDRINUSE",
    ]
    eperm = loaded(CUPS, eperm_only=True, deny_errno=1)
    assert drift.differences(planned(FILES), eperm) == []


def test_a_road_the_files_name_is_compared_and_auto_takes_any():
    files = FILES.replace('mode = "enforce"', 'mode = "enforce"\nrefuse_at = "cgroup-eperm"')
    on_hook = loaded(CUPS, refuse_at="security_socket_bind")
    assert drift.differences(planned(files), on_hook) == [
        "refuse_at: the files say cgroup-eperm, the guard refuses at security_socket_bind"
    ]
    assert drift.differences(planned(FILES), on_hook) == []
