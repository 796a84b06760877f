"""Is the loaded guard the one the configuration files ask for? Pure: a plan against a state.

`status` answers it for monitoring (its own exit code): after an edit without a reload, or when
the last apply failed, the kernel enforces something other than the files, and that is worth an
alert even when every port is fine right now.
"""

from __future__ import annotations

from guard.observe.display import errno_name
from guard.observe.state import GuardState
from guard.policy.plan import Plan
from guard.policy.ports import PROTOCOL_NUMBERS

PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}


def differences(plan: Plan, state: GuardState) -> list[str]:
    """What differs between the loaded guard and the plan, one sentence each (empty: the
    same). Reservations in port order, then the settings."""
    loaded = {(res.protocol, res.port): res for res in state.reservations}
    planned = {(PROTOCOL_NAMES[proto], port): (proto, port) for proto, port in plan.reserved()}
    found = []
    for key in sorted(planned.keys() | loaded.keys(), key=lambda k: (k[1], k[0])):
        name = f"{key[1]}/{key[0]}"
        res = loaded.get(key)
        if key not in planned:
            found.append(f"{name} is guarded but no longer in the files")
            continue
        if res is None:
            found.append(f"{name} is in the files but not guarded")
            continue
        wanted = set(plan.owners_of(*planned[key]))
        have = {owner.cgroup for owner in res.owners}
        if wanted != have:
            more, fewer = sorted(wanted - have), sorted(have - wanted)
            change = [f"to add {', '.join(more)}"] if more else []
            change += [f"to drop {', '.join(fewer)}"] if fewer else []
            found.append(f"{name}: the files' owners differ ({'; '.join(change)})")
        if res.contain != (planned[key] in plan.contained):
            want = "on" if planned[key] in plan.contained else "off"
            found.append(f"{name}: the files turn contain {want}")
    settings = plan.settings
    if state.mode is not None and state.mode != settings.mode:
        found.append(f"mode: the files say {settings.mode}, the guard runs {state.mode}")
    # a program without bpf_set_retval always refuses with EPERM, whatever the files say
    if (
        state.deny_errno is not None
        and not state.eperm_only
        and state.deny_errno != settings.deny_errno_number
    ):
        found.append(
            f"deny_errno: the files say {settings.deny_errno}, "
            f"the guard answers {errno_name(state.deny_errno)}"
        )
    # "auto" takes what the kernel offers; a road the files name is the one that must guard
    if state.refuse_at is not None and settings.refuse_at not in ("auto", state.refuse_at):
        found.append(
            f"refuse_at: the files say {settings.refuse_at}, the guard refuses at {state.refuse_at}"
        )
    return found
