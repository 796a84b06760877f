"""Python mirror of bpf/guard.h: the map keys and values, field by field.

The header is the single truth; tests/kernel compare these sizes with the maps the kernel
created, and LAYOUT names the pin sub-directory so maps of another layout are never reused.
"""

from __future__ import annotations

import ctypes as C
import hashlib

from guard.sources import bpf_source_dir

SLOTS = 2
MAX_OWNERS = 64
MAX_OWNER_PATHS = 4096
MAX_SETS = 4096
PATH_MAX = 256  # including the terminating NUL
MODE_ENFORCE = 0
MODE_AUDIT = 1
VERDICT_DENIED = 0
VERDICT_AUDIT = 1
PORT_CONTAIN = 1  # PortVal.flags

PROTOCOLS = {"tcp": 6, "udp": 17}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}


class PortKey(C.Structure):
    _fields_ = [("slot", C.c_uint8), ("proto", C.c_uint8), ("port", C.c_uint16)]


class PortVal(C.Structure):
    _fields_ = [("set", C.c_uint32), ("flags", C.c_uint32)]


class SetKey(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("set", C.c_uint32)]


class SetVal(C.Structure):
    _fields_ = [("count", C.c_uint32), ("owner", C.c_uint16 * MAX_OWNERS)]


class PathKey(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("path", C.c_char * PATH_MAX)]


class OwnerKey(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("idx", C.c_uint32)]


class OwnerVal(C.Structure):
    _fields_ = [("id", C.c_uint64), ("level", C.c_uint32), ("pad", C.c_uint32)]


class Config(C.Structure):
    _fields_ = [("netns_cookie", C.c_uint64), ("deny_errno", C.c_uint32), ("mode", C.c_uint32)]


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


U32 = C.c_uint32
U16 = C.c_uint16
U8 = C.c_uint8
U64 = C.c_uint64

# map name -> (key type, value type); per-CPU maps hold one value per possible CPU
MAPS: dict[str, tuple[type, type]] = {
    "ports": (PortKey, PortVal),
    "sets": (SetKey, SetVal),
    "paths": (PathKey, U32),
    "owners": (OwnerKey, OwnerVal),
    "config": (U32, Config),
    "state": (U32, State),
    "denied": (CountKey, U64),
    "contained": (CountKey, U64),
    "lost": (U32, U64),
    "meta": (U32, Meta),
    "sysctl_added": (U16, U8),
}


def _layout_digest() -> str:
    header = (bpf_source_dir() / "guard.h").read_bytes()
    return hashlib.sha256(header).hexdigest()[:12]


LAYOUT = _layout_digest()
