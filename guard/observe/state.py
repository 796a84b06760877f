"""The guard as the kernel holds it, read from the pins alone (any fresh process, after apply
has exited): links, the active slot's reservations and owners, counters."""

from __future__ import annotations

import errno
import os

from guard.errors import GuardError
from guard.kernel import cgroups, layout, libbpf, slots
from guard.kernel.host import require_root
from guard.kernel.pins import Maps, Pins, reading_program
from guard.kernel.programs import (
    BIND_AND_PACKET_LINKS,
    BIND_LINKS,
    CGROUP_BIND_LINKS,
    HOOK_LINK,
    LINK_NAMES,
    PACKET_LINKS,
)
from guard.policy.config import Settings
from guard.tuples import NamedTuple


class LinkState(NamedTuple):
    name: str
    link_id: int
    prog_id: int
    cgroup_id: int | None


class OwnerState(NamedTuple):
    cgroup: str
    id: int | None  # as the kernel knows it right now; None: the cgroup does not exist
    unit: str | None = None  # the systemd unit the cgroup belongs to, if any


class ReservationState(NamedTuple):
    port: int
    protocol: str
    owners: tuple[OwnerState, ...]
    denied: int
    contain: bool = False
    contained_drops: int = 0  # packets of non-owner sockets on the port dropped (or, audit, seen)
    holders: tuple = ()  # holders.HolderState, filled by holders.with_holders
    origins: tuple[str, ...] = ()  # file:line that reserve it in the files now (with_origins)


class GuardState(NamedTuple):
    loaded: bool
    pin_dir: str
    links: tuple[LinkState, ...] = ()
    program: str | None = None
    mode: str | None = None
    deny_errno: int | None = None
    # the programs cannot choose the errno (a kernel without bpf_set_retval, Linux < 5.18):
    # refused binds see EPERM, whatever deny_errno says
    eperm_only: bool = False
    # where binds are refused: "cgroup" (the cgroup bind hooks, bpf_set_retval),
    # "security_socket_bind" (the fmod_ret program) or "cgroup-eperm" (the bind hooks, EPERM)
    refuse_at: str | None = None
    netns_cookie: int | None = None
    # the guarded network namespace's inode, where the guard knows it by that (the
    # security_socket_bind road: its program cannot read a cookie on every kernel)
    netns_ino: int | None = None
    reservations: tuple[ReservationState, ...] = ()
    lost_events: int = 0
    containment: bool = False  # packet programs attached (some reservation has contain on)
    holders_checked: bool = False  # holders are only seen from the guarded network namespace
    # An apply or remove was interrupted: the bind links may still enforce other maps than
    # these (shown here), or leftovers wait to be dropped. The next apply settles it.
    interrupted: bool = False


def read_state(settings: Settings, only: list[tuple[str, int]] | None = None) -> GuardState:
    """What the kernel holds now, from the pins alone (works from any fresh process);
    with `only` (protocol name, port) pairs, just the reservations of those ports."""
    require_root("portguard status", "the pinned maps are root-only")
    pins = Pins(settings.pin_dir)
    if not os.path.isdir(pins.root):
        return GuardState(False, settings.pin_dir)
    try:
        return _read_state(pins, settings, only)
    except libbpf.BpfError as exc:
        raise GuardError(str(exc)) from None


def _links(pins: Pins) -> list[LinkState]:
    found = []
    for name in LINK_NAMES:
        fd = libbpf.get_pinned(pins.link(name))
        if fd is None:
            continue
        try:
            info = libbpf.link_info(fd)
        finally:
            libbpf.close(fd)
        cgroup_id = info.cgroup.cgroup_id if info.type == libbpf.LINK_TYPE_CGROUP else None
        found.append(LinkState(name, info.id, info.prog_id, cgroup_id))
    return found


def _counts(counters: libbpf.Map, wanted: list[tuple[int, int]] | None) -> dict:
    if wanted is None:
        return {(k.proto, k.port): sum(v) for k, v in counters.items()}
    found = {}
    for proto, port in wanted:
        count = counters.lookup(layout.CountKey(proto, 0, port))
        if count is not None:
            found[(proto, port)] = sum(count)
    return found


def _read_state(pins: Pins, settings: Settings, only: list[tuple[str, int]] | None) -> GuardState:
    link_states = _links(pins)
    leftovers = bool(pins.other_maps_dirs()) or any(
        os.path.exists(pins.staged_link(n)) for n in LINK_NAMES
    )
    maps = Maps.open_pinned(pins.maps_dir)
    if maps is None:
        return GuardState(
            bool(link_states),
            settings.pin_dir,
            tuple(link_states),
            interrupted=bool(link_states) or leftovers,
        )
    try:
        state_id = libbpf.map_info(maps.fds["state"]).id
        readers = [
            reading_program(pins, ls.name, ls.prog_id)
            for ls in link_states
            if ls.name in BIND_AND_PACKET_LINKS
        ]
        elsewhere = any(not r or state_id not in libbpf.prog_map_ids(r) for r in readers)
        active = maps.active
        wanted = None if only is None else [(layout.PROTOCOLS[proto], port) for proto, port in only]
        slot = slots.read_slot(maps, active, wanted)
        cfg = maps.config.lookup(active)
        ids = slots.owner_ids(maps, active)
        path_of = slot.path_of()
        denied, drops = _counts(maps.denied, wanted), _counts(maps.contained, wanted)
        reservations = []
        for (proto, port), set_id in sorted(
            slot.ports.items(), key=lambda kv: (kv[0][1], kv[0][0])
        ):
            owners = tuple(
                OwnerState(
                    path_of.get(i, "?"),
                    ids.get(i),
                    cgroups.unit_of_cgroup(path_of.get(i, "")),
                )
                for i in slot.sets.get(set_id, ())
            )
            reservations.append(
                ReservationState(
                    port,
                    layout.PROTOCOL_NAMES.get(proto, str(proto)),
                    owners,
                    denied.get((proto, port), 0),
                    (proto, port) in slot.contained,
                    drops.get((proto, port), 0),
                )
            )
        meta = maps.meta.lookup(0)
        lost = maps.lost.lookup(0)
        names = {ls.name for ls in link_states}
        if HOOK_LINK in names:
            refuse_at = "security_socket_bind"
        elif names & set(CGROUP_BIND_LINKS):
            refuse_at = "cgroup" if cfg and cfg.deny_errno else "cgroup-eperm"
        else:
            refuse_at = None
        return GuardState(
            loaded=bool(names & set(BIND_LINKS)),
            pin_dir=settings.pin_dir,
            links=tuple(link_states),
            # the object's name (the road it was loaded for follows it)
            program=meta.object.decode().split()[0] if meta and meta.object else None,
            mode="audit" if cfg and cfg.mode == layout.MODE_AUDIT else "enforce",
            # 0 means a program without bpf_set_retval: the binder sees plain EPERM
            deny_errno=(cfg.deny_errno or errno.EPERM) if cfg else None,
            eperm_only=bool(cfg) and not cfg.deny_errno,
            refuse_at=refuse_at,
            netns_cookie=cfg.netns_cookie if cfg else None,
            netns_ino=cfg.netns_ino if cfg and refuse_at == "security_socket_bind" else None,
            reservations=tuple(reservations),
            lost_events=sum(lost) if lost else 0,
            containment=all(name in {ls.name for ls in link_states} for name in PACKET_LINKS),
            interrupted=leftovers or elsewhere,
        )
    finally:
        maps.close()


def with_origins(state: GuardState, origins: dict[tuple[str, int], tuple]) -> GuardState:
    """The state with each reservation's origins in the configuration files (plan.origins):
    the pins hold no file names, so they come from the files as they are now."""
    return state._replace(
        reservations=tuple(
            res._replace(origins=tuple(str(o) for o in origins.get((res.protocol, res.port), ())))
            for res in state.reservations
        ),
    )
