"""Reservations + owner cgroup paths -> the desired contents of one map slot. Pure.

A port reserved in several blocks (or several files) belongs to the union of their owners:
any of them may bind it. Owner sets are shared between ports, so a range owned by one
service costs one set however many ports it spans.
"""

from __future__ import annotations

from guard.policy.config import MAX_PATH_BYTES, ConfigError, Origin, Settings
from guard.policy.ports import PROTOCOL_NUMBERS
from guard.tuples import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:  # resolved owners come in; status and check from a compiled plan resolve none
    from collections.abc import Iterable, Sequence  # (annotations: it imports collections)

    from guard.policy.owners import Block, Owner


class Limits(NamedTuple):
    """What one slot of the kernel's maps can hold (guard.kernel.layout.LIMITS)."""

    owners_per_port: int
    owner_paths: int
    owner_sets: int
    set_levels: int = 4  # distinct depths (below the cgroup2 root) of one port's owners


class Plan(NamedTuple):
    settings: Settings
    ports: dict[tuple[int, int], int]  # (proto, port) -> set id
    sets: dict[int, tuple[int, ...]]  # set id -> owner indices
    paths: tuple[str, ...]  # owner index -> cgroup path
    owner_names: dict[str, tuple[str, ...]]  # path -> units/slices
    contained: frozenset[tuple[int, int]]  # (proto, port) with contain on
    # (protocol name, port) -> every file:line that reserves it, in reading order
    origins: dict[tuple[str, int], tuple[Origin, ...]]

    def owners_of(self, proto: int, port: int) -> tuple[str, ...]:
        set_id = self.ports.get((proto, port))
        return () if set_id is None else tuple(self.paths[i] for i in self.sets[set_id])

    def reserved(self) -> list[tuple[int, int]]:
        return sorted(self.ports, key=lambda pp: (pp[1], pp[0]))


def build(
    settings: Settings, blocks: Sequence[Block], extra_owners: Sequence[Owner], limits: Limits
) -> Plan:
    """The slot contents for these resolved blocks; extra_owners own every reserved port.
    Every problem names the file:line it comes from."""
    # One owner set per block, shared by all its ports (a range of thousands of ports
    # costs one frozenset); a port named by several blocks gets the union.
    owners_by_port: dict[tuple[int, int], frozenset[str]] = {}
    contained: set[tuple[int, int]] = set()
    problems: list[str] = []
    first_origin: dict[tuple[int, int], Origin] = {}
    path_origin: dict[str, Origin] = {}  # where each owner cgroup was first named
    names: dict[str, set[str]] = {}
    extra = frozenset(o.path for o in extra_owners)
    for owner in extra_owners:
        path_origin.setdefault(owner.path, owner.origin)
    for block in blocks:
        if not block.owners:
            continue  # e.g. if_installed and no owner installed
        for owner in block.owners:
            path_origin.setdefault(owner.path, owner.origin)
            if owner.name:
                names.setdefault(owner.path, set()).add(owner.name)
        unlimited = frozenset(o.path for o in block.owners if o.only is None)
        block_owners = unlimited | extra
        limited = _limited(block.owners, unlimited)
        for port_range, origin in block.ports:
            for proto_name, port in port_range.pairs():
                key = (PROTOCOL_NUMBERS[proto_name], port)
                port_owners = (
                    _owners_for(block_owners, limited, (proto_name, port))
                    if limited
                    else block_owners
                )
                if not port_owners:
                    problems.append(
                        f"{origin}: none of the owners binds {port}/{proto_name}: a socket "
                        "unit owns only the ports its ListenStream=/ListenDatagram= name"
                    )
                    continue
                known = owners_by_port.get(key)
                if known is None:
                    owners_by_port[key] = port_owners
                    first_origin[key] = origin
                elif not port_owners <= known:
                    owners_by_port[key] = known | port_owners
                if block.contain:
                    contained.add(key)
    for key, owners in owners_by_port.items():
        if len(owners) > limits.owners_per_port:
            problems.append(
                f"{first_origin[key]}: port {key[1]} has {len(owners)} owners; "
                f"at most {limits.owners_per_port} per port"
            )
    distinct_owners = set(owners_by_port.values())
    used = {p for owners in distinct_owners for p in owners}
    for path in (p for p in path_origin if p in used):
        # e.g. a unit's cgroup: the kernel key would be truncated
        if len(path.encode()) > MAX_PATH_BYTES:
            problems.append(
                f"{path_origin[path]}: owner cgroup {path[:60]}... is {len(path.encode())} "
                f"bytes; at most {MAX_PATH_BYTES} fit the kernel's key (a truncated key could "
                "match another cgroup)"
            )
    if len(used) > limits.owner_paths:
        beyond = [p for p in path_origin if p in used][limits.owner_paths]
        problems.append(
            f"{path_origin[beyond]}: {len(used)} owner cgroups; at most {limits.owner_paths}"
        )
    paths = tuple(sorted(used))
    index_of = {path: i for i, path in enumerate(paths)}
    members_of = {owners: tuple(sorted(index_of[p] for p in owners)) for owners in distinct_owners}
    distinct = sorted(set(members_of.values()))
    for members in distinct:
        depths = {len([part for part in paths[i].split("/") if part]) for i in members}
        if len(depths) > limits.set_levels:
            problems.append(
                f"{path_origin[paths[members[-1]]]}: the owners of one port sit at "
                f"{len(depths)} different depths of the cgroup tree; at most {limits.set_levels}"
            )
    if len(distinct) > limits.owner_sets:
        first_use: dict[tuple[int, ...], Origin] = {}
        for key, owners in owners_by_port.items():  # in the order the ports were named
            first_use.setdefault(members_of[owners], first_origin[key])
        beyond = list(first_use.values())[limits.owner_sets]
        problems.append(
            f"{beyond}: {len(distinct)} distinct owner combinations; at most {limits.owner_sets}"
        )
    if problems:
        raise ConfigError(problems)
    set_of = {members: set_id for set_id, members in enumerate(distinct)}
    set_of_owners = {owners: set_of[members] for owners, members in members_of.items()}
    ports = {key: set_of_owners[owners] for key, owners in sorted(owners_by_port.items())}
    return Plan(
        settings,
        ports,
        dict(enumerate(distinct)),
        paths,
        {p: tuple(sorted(n)) for p, n in names.items()},
        frozenset(contained),
        port_origins(block for block in blocks if block.owners),
    )


def port_origins(
    blocks: Iterable, only: Iterable[tuple[str, int]] | None = None
) -> dict[tuple[str, int], tuple[Origin, ...]]:
    """(protocol name, port) -> the file:line of every block that reserves it, in order;
    with `only`, just those pairs (a range is then tested, not walked)."""
    wanted = None if only is None else list(only)
    found: dict[tuple[str, int], dict[Origin, None]] = {}
    for block in blocks:
        for port_range, origin in block.ports:
            pairs = (
                port_range.pairs()
                if wanted is None
                else [
                    (proto, port)
                    for proto, port in wanted
                    if proto in port_range.protocols and port_range.first <= port <= port_range.last
                ]
            )
            for pair in pairs:
                found.setdefault(pair, {})[origin] = None
    return {pair: tuple(origins) for pair, origins in found.items()}


def _limited(owners: Sequence[Owner], unlimited: frozenset[str]) -> dict[str, frozenset]:
    """Owner paths trusted only for some ports (a socket unit's, see owners.resolve_owner);
    a path the block also names without a limit is not limited."""
    limited: dict[str, frozenset] = {}
    for owner in owners:
        if owner.only is not None and owner.path not in unlimited:
            limited[owner.path] = limited.get(owner.path, frozenset()) | owner.only
    return limited


def _owners_for(
    unlimited: frozenset[str], limited: dict[str, frozenset], pair: tuple[str, int]
) -> frozenset[str]:
    """The block's owners of one port: a limited path only where it listens (usually not at
    all, so most ports share the one unlimited set)."""
    extra = {path for path, pairs in limited.items() if pair in pairs}
    return unlimited | extra if extra else unlimited
