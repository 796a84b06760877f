"""Python mirror of bpf/guard.h: the constants, the map keys and values, the maps.

bpf/guard.h is the contract; tests/unit/test_contract.py checks everything here against
the BTF of the compiled object (every struct member's offset and size, every constant,
each map's type, key, value and max entries, the event record the monitor unpacks).
LAYOUT, the digest of guard.h, names the pin sub-directory, so maps of another layout
are never reused.
"""

from __future__ import annotations

import ctypes as C
import os

from guard.kernel.sources import bpf_source_dir, sha256
from guard.policy.plan import Limits
from guard.policy.ports import PROTOCOL_NUMBERS as PROTOCOLS
from guard.tuples import NamedTuple

# enum pg_limits
SLOTS = 2
MAX_OWNERS = 64
MAX_OWNER_PATHS = 4096
MAX_SETS = 4096
MAX_PORTS = 65535 * 2
PATH_MAX = 256  # including the terminating NUL
EVENT_BYTES = 256 * 1024
SET_LEVELS = 4
MEMBER_WORDS = 4096 // 64
PORTS_PER_VALUE = 32
PORT_VALUES = 65536 // 32
SYSCTL_WORDS = 65536 // 64
# enum pg_mode
MODE_ENFORCE = 0
MODE_AUDIT = 1
# enum pg_verdict
VERDICT_DENIED = 0
VERDICT_AUDIT = 1
# enum pg_port_entry
PORT_SET = 0x0FFF
PORT_RESERVED = 0x4000
PORT_CONTAIN = 0x8000

LIMITS = Limits(
    owners_per_port=MAX_OWNERS,
    owner_paths=MAX_OWNER_PATHS,
    owner_sets=MAX_SETS,
    set_levels=SET_LEVELS,
)

# C enum name -> {constant: value}, as the BTF of the object must say
ENUMS: dict[str, dict[str, int]] = {
    "pg_limits": {
        "PG_SLOTS": SLOTS,
        "PG_MAX_OWNERS": MAX_OWNERS,
        "PG_MAX_OWNER_PATHS": MAX_OWNER_PATHS,
        "PG_MAX_SETS": MAX_SETS,
        "PG_MAX_PORTS": MAX_PORTS,
        "PG_PATH_MAX": PATH_MAX,
        "PG_EVENT_BYTES": EVENT_BYTES,
        "PG_SET_LEVELS": SET_LEVELS,
        "PG_MEMBER_WORDS": MEMBER_WORDS,
        "PG_PORTS_PER_VALUE": PORTS_PER_VALUE,
        "PG_PORT_VALUES": PORT_VALUES,
        "PG_SYSCTL_WORDS": SYSCTL_WORDS,
    },
    "pg_mode": {"PG_MODE_ENFORCE": MODE_ENFORCE, "PG_MODE_AUDIT": MODE_AUDIT},
    "pg_verdict": {"PG_VERDICT_DENIED": VERDICT_DENIED, "PG_VERDICT_AUDIT": VERDICT_AUDIT},
    "pg_port_entry": {
        "PG_PORT_SET": PORT_SET,
        "PG_PORT_RESERVED": PORT_RESERVED,
        "PG_PORT_CONTAIN": PORT_CONTAIN,
    },
}

PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}


class PortEntries(C.Structure):
    _fields_ = [("entry", C.c_uint16 * PORTS_PER_VALUE)]


class SetVal(C.Structure):
    _fields_ = [
        ("count", C.c_uint32),
        ("owner", C.c_uint16 * MAX_OWNERS),
        ("nlevels", C.c_uint32),
        ("level", C.c_uint8 * SET_LEVELS),
        ("members", C.c_uint64 * MEMBER_WORDS),
    ]


class PathKey(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("path", C.c_char * PATH_MAX)]


class OwnerKey(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("idx", C.c_uint32)]


class OwnerVal(C.Structure):
    _fields_ = [("id", C.c_uint64), ("level", C.c_uint32), ("pad", C.c_uint32)]


class IdKey(C.Structure):
    _fields_ = [("id", C.c_uint64), ("slot", C.c_uint32), ("pad", C.c_uint32)]


class Config(C.Structure):
    _fields_ = [
        ("netns_cookie", C.c_uint64),
        ("deny_errno", C.c_uint32),
        ("mode", C.c_uint32),
        ("scope_id", C.c_uint64),
        ("scope_level", C.c_uint32),
        ("netns_ino", C.c_uint32),
    ]


class State(C.Structure):
    _fields_ = [("active", C.c_uint32), ("pad", C.c_uint32)]


class CountKey(C.Structure):
    _fields_ = [("proto", C.c_uint8), ("pad", C.c_uint8), ("port", C.c_uint16)]


class Event(C.Structure):
    _fields_ = [
        ("ts_ns", C.c_uint64),
        ("cgroup_id", C.c_uint64),
        ("pid", C.c_uint32),
        ("uid", C.c_uint32),
        ("port", C.c_uint16),
        ("proto", C.c_uint8),
        ("family", C.c_uint8),
        ("verdict", C.c_uint8),
        ("pad", C.c_uint8 * 3),
        ("set", C.c_uint32),
        ("comm", C.c_char * 16),
        ("addr", C.c_uint8 * 16),
    ]


class Meta(C.Structure):
    _fields_ = [("object", C.c_char * 64)]


# C struct name -> its mirror
STRUCTS: dict[str, type[C.Structure]] = {
    "pg_port_entries": PortEntries,
    "pg_set_val": SetVal,
    "pg_path_key": PathKey,
    "pg_owner_key": OwnerKey,
    "pg_owner_val": OwnerVal,
    "pg_id_key": IdKey,
    "pg_config": Config,
    "pg_state": State,
    "pg_count_key": CountKey,
    "pg_event": Event,
    "pg_meta": Meta,
}

U8, U16, U32, U64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64

# bpf_map_type numbers (UAPI)
HASH, ARRAY, PROG_ARRAY, PERCPU_HASH, PERCPU_ARRAY, RINGBUF = 1, 2, 3, 5, 6, 27


class MapSpec(NamedTuple):
    type: int
    key: type
    value: type
    max_entries: int

    @property
    def percpu(self) -> bool:
        """Per-CPU maps hold one value per possible CPU."""
        return self.type in (PERCPU_HASH, PERCPU_ARRAY)


# The maps the controller reads and writes (events and scratch are the programs' own).
MAPS: dict[str, MapSpec] = {
    "ports": MapSpec(ARRAY, U32, PortEntries, SLOTS * 2 * PORT_VALUES),
    "sets": MapSpec(ARRAY, U32, SetVal, SLOTS * MAX_SETS),
    "paths": MapSpec(HASH, PathKey, U32, SLOTS * MAX_OWNER_PATHS),
    "owners": MapSpec(HASH, OwnerKey, OwnerVal, SLOTS * MAX_OWNER_PATHS),
    "owner_ids": MapSpec(HASH, IdKey, U32, SLOTS * MAX_OWNER_PATHS),
    "config": MapSpec(ARRAY, U32, Config, SLOTS),
    "state": MapSpec(ARRAY, U32, State, 1),
    "denied": MapSpec(PERCPU_HASH, CountKey, U64, MAX_PORTS),
    "contained": MapSpec(PERCPU_HASH, CountKey, U64, MAX_PORTS),
    "lost": MapSpec(PERCPU_ARRAY, U32, U64, 1),
    "meta": MapSpec(ARRAY, U32, Meta, 1),
    "sysctl_added": MapSpec(ARRAY, U32, U64, SYSCTL_WORDS),
}
#: sysctl_added as layouts before the bitmap kept it (port -> 1), read when apply takes
#: their maps over so that no upgrade forgets a port portguard added to the sysctl.
SYSCTL_ADDED_HASH = MapSpec(HASH, U16, U8, 65536)
#: The maps sized to the policy when they are created (the object's max_entries is the
#: ceiling): their hash buckets are allocated by max_entries, so a worst-case size costs
#: megabytes a small policy never uses.
SIZED_MAPS = ("sets", "paths", "owners", "owner_ids", "denied", "contained")
MIN_ENTRIES = 64


def map_sizes(pairs: int, contained: int, sets: int, paths: int) -> dict[str, int]:
    """max_entries for a policy of `pairs` (protocol, port) reservations, `contained` of
    them with containment, `sets` owner sets and `paths` owner cgroups (the ports array and
    the sysctl bitmap have one fixed size). Both slots are full at once during an apply (the
    old one and the new one), and counters of the old policy live until the new one is in
    force: so twice the policy, rounded up to a power of two."""

    def fit(name: str, entries: int) -> int:
        rounded = 1 << max(entries - 1, 0).bit_length()
        return min(MAPS[name].max_entries, max(MIN_ENTRIES, rounded))

    return {
        "sets": fit("sets", SLOTS * sets),
        "paths": fit("paths", SLOTS * paths),
        "owners": fit("owners", SLOTS * paths),
        "owner_ids": fit("owner_ids", 2 * SLOTS * paths),
        "denied": fit("denied", 2 * pairs),
        "contained": fit("contained", 2 * contained),
    }


#: hook_judge: pinned beside the maps directories, shared by every layout: the program array
#: whose one entry is the security_socket_bind road's judge (bpf/guard.h); never changes.
JUDGE = MapSpec(PROG_ARRAY, U32, U32, 1)

# The programs' own maps: events (pg_event records the monitor reads raw) and scratch.
EVENTS = MapSpec(RINGBUF, type(None), type(None), EVENT_BYTES)
SCRATCH = MapSpec(PERCPU_ARRAY, U32, PathKey, 1)


def _layout_digest() -> str:
    with open(os.path.join(bpf_source_dir(), "guard.h"), "rb") as f:
        header = f.read()
    return sha256(header).hexdigest()[:12]


LAYOUT = _layout_digest()


def port_index(slot: int, proto: int, port: int) -> tuple[int, int]:
    """(index in ports, entry in that value) of a (slot, protocol, port), as guard.bpf.c
    reads it."""
    udp = 1 if proto == PROTOCOLS["udp"] else 0
    return (slot * 2 + udp) * PORT_VALUES + port // PORTS_PER_VALUE, port % PORTS_PER_VALUE


def slot_of_port_index(index: int) -> int:
    return index // (2 * PORT_VALUES)


def set_index(slot: int, set_id: int) -> int:
    """The index of a slot's owner set in sets, as guard.bpf.c reads it."""
    return set_id * SLOTS + slot
