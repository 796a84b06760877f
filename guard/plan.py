"""Reservations + owner cgroup paths -> the desired contents of one map slot. Pure.

A port reserved in several blocks (or several files) belongs to the union of their owners:
any of them may bind it. Owner sets are shared between ports, so a range owned by one
service costs one set however many ports it spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guard import layout
from guard.config import MAX_PATH_BYTES, Config, ConfigError, Origin, Settings

PROTO_NUMBERS = layout.PROTOCOLS


@dataclass(frozen=True)
class Plan:
    settings: Settings
    ports: dict[tuple[int, int], int] = field(default_factory=dict)  # (proto, port) -> set id
    sets: dict[int, tuple[int, ...]] = field(default_factory=dict)  # set id -> owner indices
    paths: tuple[str, ...] = ()  # owner index -> cgroup path
    owner_names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # path -> units/slices
    contained: frozenset[tuple[int, int]] = frozenset()  # (proto, port) with contain on

    def owners_of(self, proto: int, port: int) -> tuple[str, ...]:
        set_id = self.ports.get((proto, port))
        return () if set_id is None else tuple(self.paths[i] for i in self.sets[set_id])

    def reserved(self) -> list[tuple[int, int]]:
        return sorted(self.ports, key=lambda pp: (pp[1], pp[0]))


def build(
    config: Config,
    owner_paths: dict[int, list[tuple[str, str | None]]],
    extra_owners: tuple[str, ...] = (),
    limits: dict[int, dict[str, frozenset[tuple[str, int]]]] | None = None,
) -> Plan:
    """owner_paths: for each block (by index) its resolved owners as (cgroup path, name);
    extra_owners: paths trusted for every reserved port (e.g. /init.scope); limits: per block,
    owner paths trusted only for some (protocol name, port) pairs (a socket unit's, see
    owners.listen_limits)."""
    # One owner set per block, shared by all its ports (a range of thousands of ports
    # costs one frozenset); a port named by several blocks gets the union.
    owners_by_port: dict[tuple[int, int], frozenset[str]] = {}
    contained: set[tuple[int, int]] = set()
    problems: list[str] = []
    first_origin: dict[tuple[int, int], Origin] = {}
    names: dict[str, set[str]] = {}
    extra = frozenset(extra_owners)
    for index, block in enumerate(config.blocks):
        resolved = owner_paths.get(index, [])
        if not resolved:
            continue  # e.g. if_installed and no owner installed
        for path, name in resolved:
            if name:
                names.setdefault(path, set()).add(name)
        limited = (limits or {}).get(index, {})
        block_owners = frozenset(p for p, _ in resolved if p not in limited) | extra
        for port_range, origin in block.ports:
            for proto_name, port in port_range.pairs():
                key = (PROTO_NUMBERS[proto_name], port)
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
                if block.contain or config.settings.contain:
                    contained.add(key)
    for key, owners in owners_by_port.items():
        if len(owners) > layout.MAX_OWNERS:
            problems.append(
                f"{first_origin[key]}: port {key[1]} has {len(owners)} owners; "
                f"at most {layout.MAX_OWNERS} per port"
            )
    distinct_owners = set(owners_by_port.values())
    paths = tuple(sorted({p for owners in distinct_owners for p in owners}))
    for path in paths:  # e.g. a unit's cgroup: the kernel key would be truncated
        if len(path.encode()) > MAX_PATH_BYTES:
            problems.append(
                f"{config.files[0] if config.files else '<config>'}:1: owner cgroup "
                f"{path[:60]}... is {len(path.encode())} bytes; at most "
                f"{MAX_PATH_BYTES} fit the kernel's key (a truncated key could match "
                "another cgroup)"
            )
    if len(paths) > layout.MAX_OWNER_PATHS:
        problems.append(
            f"{config.files[0] if config.files else '<config>'}:1: {len(paths)} owner "
            f"cgroups; at most {layout.MAX_OWNER_PATHS}"
        )
    index_of = {path: i for i, path in enumerate(paths)}
    members_of = {owners: tuple(sorted(index_of[p] for p in owners)) for owners in distinct_owners}
    distinct = sorted(set(members_of.values()))
    if len(distinct) > layout.MAX_SETS:
        problems.append(
            f"{config.files[0] if config.files else '<config>'}:1: {len(distinct)} "
            f"distinct owner combinations; at most {layout.MAX_SETS}"
        )
    if problems:
        raise ConfigError(problems)
    set_of = {members: set_id for set_id, members in enumerate(distinct)}
    set_of_owners = {owners: set_of[members] for owners, members in members_of.items()}
    ports = {key: set_of_owners[owners] for key, owners in sorted(owners_by_port.items())}
    return Plan(
        config.settings,
        ports,
        dict(enumerate(distinct)),
        paths,
        {p: tuple(sorted(n)) for p, n in names.items()},
        frozenset(contained),
    )


def _owners_for(
    unlimited: frozenset[str], limited: dict[str, frozenset[tuple[str, int]]], pair: tuple[str, int]
) -> frozenset[str]:
    """The block's owners of one port: a limited path only where it listens (usually not at
    all, so most ports share the one unlimited set)."""
    extra = {path for path, pairs in limited.items() if pair in pairs}
    return unlimited | extra if extra else unlimited
