"""guard/layout.py mirrors bpf/guard.h: every struct's fields, in order, with their sizes."""

from __future__ import annotations

import ctypes
import re

from guard import layout
from guard.sources import bpf_source_dir

C_SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "char": 1, "int": 4}


def header_structs() -> dict[str, list[tuple[str, int]]]:
    text = (bpf_source_dir() / "guard.h").read_text()
    defines = {m[0]: int(m[1]) for m in re.findall(r"#define (PG_\w+) \(?(\d+)", text)}
    structs = {}
    for name, body in re.findall(r"struct (pg_\w+) \{(.*?)\};", text, re.S):
        fields = []
        for ctype, field, count in re.findall(
            r"(__u8|__u16|__u32|__u64|char|int) (\w+)(?:\[(\w+)\])?;", body
        ):
            n = int(defines.get(count, count)) if count else 1
            fields.append((field, C_SIZES[ctype] * n))
        structs[name] = fields
    return structs


PAIRS = {
    "pg_port_key": layout.PortKey,
    "pg_port_val": layout.PortVal,
    "pg_set_key": layout.SetKey,
    "pg_set_val": layout.SetVal,
    "pg_path_key": layout.PathKey,
    "pg_owner_key": layout.OwnerKey,
    "pg_owner_val": layout.OwnerVal,
    "pg_config": layout.Config,
    "pg_state": layout.State,
    "pg_count_key": layout.CountKey,
    "pg_event": layout.Event,
    "pg_meta": layout.Meta,
}


def test_every_header_struct_is_mirrored_field_by_field():
    structs = header_structs()
    assert set(structs) == set(PAIRS)
    for name, fields in structs.items():
        mirror = PAIRS[name]
        mine = [(f, ctypes.sizeof(t)) for f, t in mirror._fields_]
        assert mine == fields, name


def test_layout_hash_names_the_header_version():
    assert re.fullmatch(r"[0-9a-f]{12}", layout.LAYOUT)
