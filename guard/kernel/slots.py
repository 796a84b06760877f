"""The two slots of every configuration-dependent map: encode a plan into one, decode one
into plain contents, clear one, flip which one the programs read.

The programs read only the slot state.active names. Apply fills the inactive slot
completely, flips, waits until no program still runs on the old slot, and only then
clears it. The contents are decoded here and nowhere else (apply, status, monitor).
"""

from __future__ import annotations

import ctypes as C
import struct

from guard.kernel import cgroups, layout, libbpf
from guard.kernel.pins import Maps
from guard.policy.plan import Plan
from guard.tuples import NamedTuple

TYPE_CHECKING = False  # annotations only: collections.abc would import collections
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


class SlotContents(NamedTuple):
    ports: dict[tuple[int, int], int]  # (proto, port) -> set id
    sets: dict[int, tuple[int, ...]]  # set id -> owner indices
    paths: dict[str, int]  # owner cgroup path -> owner index
    contained: frozenset[tuple[int, int]] = frozenset()

    def path_of(self) -> dict[int, str]:
        return {idx: path for path, idx in self.paths.items()}

    def owners_of(self, proto: int, port: int) -> tuple[str, ...]:
        """The owner cgroup paths of a reserved port ("?" for an index without a path)."""
        set_id = self.ports.get((proto, port))
        if set_id is None:
            return ()
        path_of = self.path_of()
        return tuple(path_of.get(i, "?") for i in self.sets.get(set_id, ()))


def desired(plan: Plan) -> SlotContents:
    return SlotContents(
        dict(plan.ports), dict(plan.sets), {p: i for i, p in enumerate(plan.paths)}, plan.contained
    )


def read_slot(
    maps: Maps,
    slot: int,
    only: Iterable[tuple[int, int]] | None = None,
    paths: dict[str, int] | None = None,
) -> SlotContents:
    """The slot's contents; with `only` (protocol, port) pairs, just those ports (and the
    sets they use), looked up one by one instead of reading every port entry; with `paths`
    (as an earlier read of this slot returned them), without walking the owner paths again."""
    if only is None:
        entries = read_port_entries(maps, slot)
        sets = {
            index // layout.SLOTS: tuple(value.owner[: value.count])
            for index, value in _set_values(maps, slot).items()
        }
    else:
        entries = {}
        values: dict[int, layout.PortEntries | None] = {}
        for proto, port in only:
            index, position = layout.port_index(slot, proto, port)
            if index not in values:
                values[index] = maps.ports.lookup(index)
            value = values[index]
            if value is not None and value.entry[position] & layout.PORT_RESERVED:
                entries[(proto, port)] = value.entry[position]
        sets = {}
        for set_id in {entry & layout.PORT_SET for entry in entries.values()}:
            members = maps.sets.lookup(layout.set_index(slot, set_id))
            if members is not None and members.count:
                sets[set_id] = tuple(members.owner[: members.count])
    ports = {pair: entry & layout.PORT_SET for pair, entry in entries.items()}
    contained = frozenset(pair for pair, entry in entries.items() if entry & layout.PORT_CONTAIN)
    if paths is None:
        paths = {k.path.decode(): v for k, v in maps.paths.items() if k.slot == slot}
    return SlotContents(ports, sets, paths, contained)


_PROTOCOL_OF = (layout.PROTOCOLS["tcp"], layout.PROTOCOLS["udp"])
_VALUE_BYTES = C.sizeof(layout.PortEntries)
_EMPTY_VALUE = bytes(_VALUE_BYTES)
_BLOCK_BYTES = 64 * _VALUE_BYTES
_EMPTY_BLOCK = bytes(_BLOCK_BYTES)
_ENTRIES = struct.Struct(f"={layout.PORTS_PER_VALUE}H")


def _port_values(maps: Maps, slot: int) -> dict[int, bytes]:
    """index -> raw value, for the nonzero values of the slot's part of the ports array."""
    first = slot * 2 * layout.PORT_VALUES
    raw = bytes(maps.ports.read_range(first, 2 * layout.PORT_VALUES))
    found = {}
    # most of it is zeros: compare blocks of values first (a memcmp each), then the values
    # of the blocks that are not empty
    for block in range(0, len(raw), _BLOCK_BYTES):
        if raw[block : block + _BLOCK_BYTES] == _EMPTY_BLOCK:
            continue
        for start in range(block, min(block + _BLOCK_BYTES, len(raw)), _VALUE_BYTES):
            value = raw[start : start + _VALUE_BYTES]
            if value != _EMPTY_VALUE:
                found[first + start // _VALUE_BYTES] = value
    return found


def _set_values(maps: Maps, slot: int) -> dict[int, layout.SetVal]:
    """index -> value, for the sets of the slot (count > 0)."""
    values = maps.sets.read_range(0, maps.sets.max_entries)
    return {
        index: value
        for index in range(slot, len(values), layout.SLOTS)
        if (value := values[index]).count
    }


def read_port_entries(maps: Maps, slot: int) -> dict[tuple[int, int], int]:
    """(protocol, port) -> entry (enum pg_port_entry) of every port reserved in the slot."""
    entries = {}
    for index, value in _port_values(maps, slot).items():
        within = index - slot * 2 * layout.PORT_VALUES
        proto = _PROTOCOL_OF[within // layout.PORT_VALUES]
        base = (within % layout.PORT_VALUES) * layout.PORTS_PER_VALUE
        for position, entry in enumerate(_ENTRIES.unpack(value)):
            if entry & layout.PORT_RESERVED:
                entries[(proto, base + position)] = entry
    return entries


def owner_ids(maps: Maps, slot: int) -> dict[int, int]:
    """owner index -> the cgroup id the kernel knows for it now (absent: no such cgroup)."""
    return {k.idx: v.id for k, v in maps.owners.items() if k.slot == slot and v.id}


def config_value(
    plan: Plan, cookie: int, denial: str, scope: tuple[int, int], netns_ino: int
) -> layout.Config:
    """The slot's config; deny_errno 0 means the programs deny with plain EPERM. scope is
    the attach cgroup's (id, depth below the cgroup2 root)."""
    deny = plan.settings.deny_errno_number if denial in ("retval", "socket_bind") else 0
    mode = layout.MODE_AUDIT if plan.settings.mode == "audit" else layout.MODE_ENFORCE
    scope_id, scope_level = scope
    return layout.Config(cookie, deny, mode, scope_id, scope_level, netns_ino)


def same_config(a: layout.Config | None, b: layout.Config) -> bool:
    return a is not None and bytes(a) == bytes(b)


def clear_slot(maps: Maps, slot: int, readers_gone: Callable[[], None] | None = None) -> None:
    """Empty the slot. Paths first: once they are gone the cgroup trackers write no more
    owners of the slot; the port entries last. readers_gone (libbpf.wait_for_programs) is
    called before the first deletion, when there is anything to delete, for a slot programs
    may still be reading."""
    for m in (maps.paths, maps.owners, maps.owner_ids):
        keys = [k for k in m.keys() if k.slot == slot]
        if keys and readers_gone is not None:
            readers_gone()
            readers_gone = None
        m.delete_many(keys)
    for m, indices, empty in (
        (maps.sets, sorted(_set_values(maps, slot)), layout.SetVal()),
        (maps.ports, sorted(_port_values(maps, slot)), layout.PortEntries()),
    ):
        if indices and readers_gone is not None:
            readers_gone()
            readers_gone = None
        m.update_many(indices, [empty] * len(indices))


def fill_slot(maps: Maps, slot: int, plan: Plan, cfg: layout.Config, cgroup_root: str) -> None:
    """Write the plan into a slot that clear_slot emptied."""
    maps.config.update(slot, cfg)
    for idx, path in enumerate(plan.paths):
        key = layout.PathKey(slot, path.encode())
        maps.paths.update(key, idx)
    # After the paths: a cgroup made from here on is recorded by the mkdir tracker; one that
    # exists already is seeded here. NOEXIST: never overwrite a newer id the tracker wrote.
    # owner_ids before owners, as the tracker does; an id of a cgroup removed meanwhile is
    # harmless there (ids are never reused, no task can be in a removed cgroup).
    for idx, path in enumerate(plan.paths):
        cg_id = cgroups.cgroup_id(path, cgroup_root)
        if cg_id is not None:
            maps.owner_ids.update(layout.IdKey(cg_id, slot, 0), idx)
            maps.owners.update(
                layout.OwnerKey(slot, idx),
                layout.OwnerVal(cg_id, cgroups.level(path), 0),
                libbpf.BPF_NOEXIST,
            )
    for set_id, members in plan.sets.items():
        maps.sets.update(layout.set_index(slot, set_id), set_value(members, plan.paths))
    # last, after the sets they name
    values = port_values(slot, plan.ports, plan.contained)
    maps.ports.update_many(list(values), list(values.values()))


def port_values(
    slot: int, ports: dict[tuple[int, int], int], contained: frozenset[tuple[int, int]]
) -> dict[int, layout.PortEntries]:
    """The nonzero values of the slot's part of the ports array (see ports in guard.h)."""
    values: dict[int, layout.PortEntries] = {}
    for (proto, port), set_id in ports.items():
        index, position = layout.port_index(slot, proto, port)
        value = values.get(index)
        if value is None:
            value = values[index] = layout.PortEntries()
        entry = layout.PORT_RESERVED | set_id
        if (proto, port) in contained:
            entry |= layout.PORT_CONTAIN
        value.entry[position] = entry
    return values


def set_value(members: tuple[int, ...], paths: tuple[str, ...]) -> layout.SetVal:
    """An owner set as the kernel reads it: the owner list (for status), the levels the
    owner test visits and the membership bitmap it tests."""
    value = layout.SetVal(len(members))
    for i, member in enumerate(members):
        value.owner[i] = member
        value.members[member // 64] |= 1 << (member % 64)
    depths = sorted({cgroups.level(paths[member]) for member in members})
    value.nlevels = len(depths)
    for i, depth in enumerate(depths):
        value.level[i] = depth
    return value


def flip(maps: Maps, slot: int) -> None:
    maps.state.update(0, layout.State(slot, 0))
