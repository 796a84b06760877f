"""Who holds each reserved port right now, and whether that holder is one of its owners.

A holder is an owner when the socket was created in an owner cgroup (or below it) AND the
process holding it lives in an owner cgroup (or below) now. The first half is what sock_diag
reports (INET_DIAG_CGROUP_ID is fixed at socket creation); the second catches a process that
was moved out of the owner's cgroup with the port still open, or a socket handed to another
process. Every other holder is a squatter: it bound the port before the guard was loaded (or
was moved out since) and keeps the port until it closes it; the guard cannot take it back.

Holders are read in the calling process's network namespace: callers check that it is the
guarded one.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from guard import holders as holders_mod
from guard.holders import Holder, unit_of_cgroup
from guard.lifecycle import GuardState

PROC = Path("/proc")
FAMILY_NAMES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


@dataclass(frozen=True)
class HolderState:
    """One socket on a reserved port. ``cgroup``/``unit`` are where the holding process lives
    now (the socket's creation cgroup when no process is known); ``socket_cgroup`` is where
    the socket was created."""

    pid: int | None
    comm: str | None
    cgroup: str | None
    unit: str | None
    owner: bool
    family: str
    address: str
    socket_cgroup: str | None


@dataclass(frozen=True)
class Squatter:
    port: int
    protocol: str
    holder: HolderState

    def describe(self) -> str:
        holder = self.holder
        who = f"pid {holder.pid} ({holder.comm})" if holder.pid else "a socket of no process"
        return (
            f"port {self.port}/{self.protocol} is held by {who} in cgroup "
            f"{holder.cgroup or '(removed)'}, not an owner: it keeps the port until it "
            "closes it"
        )


def within(cgroup: str, owner: str) -> bool:
    """Whether cgroup is the owner cgroup or below it (paths relative to the cgroup2 root)."""
    return owner == "/" or cgroup == owner or cgroup.startswith(owner.rstrip("/") + "/")


def process_cgroup(pid: int, proc_root: Path = PROC) -> str | None:
    """The cgroup2 path of a process now ("0::" line of /proc/PID/cgroup), None if gone."""
    try:
        lines = (proc_root / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def classify(holder: Holder, owners: Sequence[str], proc_root: Path = PROC) -> HolderState:
    current = process_cgroup(holder.pid, proc_root) if holder.pid else None
    known = [c for c in (holder.cgroup, current) if c is not None]
    is_owner = bool(known) and all(any(within(c, o) for o in owners) for c in known)
    cgroup = current or holder.cgroup
    return HolderState(
        pid=holder.pid,
        comm=holder.comm,
        cgroup=cgroup,
        unit=unit_of_cgroup(cgroup) if cgroup else None,
        owner=is_owner,
        family=FAMILY_NAMES.get(holder.family, str(holder.family)),
        address=holder.address,
        socket_cgroup=holder.cgroup,
    )


def holder_states(
    reservations: Iterable[tuple[int, str, Sequence[str]]], proc_root: Path = PROC
) -> dict[tuple[int, str], list[HolderState]]:
    """(port, protocol) -> its holders, for reservations given as (port, protocol, owner
    cgroup paths). Ports nobody holds are absent."""
    owners_of = {(port, protocol): owners for port, protocol, owners in reservations}
    if not owners_of:
        return {}
    found: dict[tuple[int, str], list[HolderState]] = {}
    for holder in holders_mod.holders(owners_of):
        key = (holder.port, holder.protocol)
        found.setdefault(key, []).append(classify(holder, owners_of[key], proc_root))
    return found


def find(reservations: Iterable[tuple[int, str, Sequence[str]]]) -> list[Squatter]:
    """The holders of reserved ports that are not owners."""
    return [
        Squatter(port, protocol, h)
        for (port, protocol), states in sorted(holder_states(reservations).items())
        for h in states
        if not h.owner
    ]


def with_holders(state: GuardState, current_netns_cookie: int) -> GuardState:
    """The state with each reservation's holders, when read from the guarded network
    namespace (a guard with no namespace filter is checked in the caller's)."""
    if not state.loaded or (state.netns_cookie and state.netns_cookie != current_netns_cookie):
        return state
    found = holder_states(
        (r.port, r.protocol, [o.cgroup for o in r.owners]) for r in state.reservations
    )
    reservations = tuple(
        replace(r, holders=tuple(found.get((r.port, r.protocol), ()))) for r in state.reservations
    )
    return replace(state, reservations=reservations, holders_checked=True)


def of_state(state: GuardState) -> list[Squatter]:
    return [
        Squatter(r.port, r.protocol, h)
        for r in state.reservations
        for h in r.holders
        if not h.owner
    ]
