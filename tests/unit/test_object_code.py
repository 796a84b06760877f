"""The compiled programs' instructions, read from the object (no root, nothing loaded), for
what a behavioural test cannot make happen on purpose.

The refusal counters are added to with atomic instructions: cgroup programs run with migration
disabled but stay preemptible, so two binds on one CPU could interleave a plain load, add and
store and lose a count. Losing one takes a preemption between two given instructions, which
no test can arrange (the counting test with parallel binders passes with plain adds too), so
the instructions themselves are checked.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from guard.kernel import objects

SHF_EXECINSTR = 0x4
LD_IMM64 = 0x18  # the one instruction of 16 bytes
LDX_DW, STX_DW, ATOMIC_DW = 0x79, 0x7B, 0xDB
ADD64_IMM, ADD64_REG = 0x07, 0x0F
STACK = 10  # r10, the frame pointer


@pytest.fixture(scope="module")
def object_path(tmp_path_factory) -> Path:
    path = objects.cached_object()
    if path is None:
        if objects.find_clang() is None:
            pytest.skip("no compiled object and no clang to build one")
        path = objects.build(directory=tmp_path_factory.mktemp("object"))
    return Path(path)


def code_sections(data: bytes) -> Iterator[tuple[str, bytes, str]]:
    """(name, bytes, struct byte order) of every executable section of an ELF64 object."""
    order = "<" if data[5] == 1 else ">"
    (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from(order + "HHH", data, 0x3A)
    headers = [
        struct.unpack_from(order + "IIQQQQ", data, shoff + i * entsize) for i in range(count)
    ]
    names = headers[names_index][4]
    for name, _, flags, _, offset, size in headers:
        if flags & SHF_EXECINSTR:
            start = names + name
            yield (
                data[start : data.index(b"\0", start)].decode(),
                data[offset : offset + size],
                order,
            )


def instructions(code: bytes, order: str) -> list[tuple[int, int, int, int, int]]:
    """(index, opcode, dst, src, offset) of each instruction."""
    out, at = [], 0
    while at < len(code):
        opcode, regs, offset, _ = struct.unpack_from(order + "BBhi", code, at)
        dst, src = (regs & 0xF, regs >> 4) if order == "<" else (regs >> 4, regs & 0xF)
        out.append((at // 8, opcode, dst, src, offset))
        at += 16 if opcode == LD_IMM64 else 8
    return out


def plain_increments(insns: list[tuple[int, int, int, int, int]]) -> list[int]:
    """Indexes of 64-bit stores outside the stack whose value was loaded from the same place
    and added to in the instructions just before: `*p += n` without an atomic instruction."""
    found = []
    for n, (index, opcode, dst, src, offset) in enumerate(insns):
        if opcode != STX_DW or dst == STACK:
            continue
        recent = insns[max(0, n - 4) : n]
        loaded = any(o == LDX_DW and (d, s, f) == (src, dst, offset) for _, o, d, s, f in recent)
        added = any(o in (ADD64_IMM, ADD64_REG) and d == src for _, o, d, _, _ in recent)
        if loaded and added:
            found.append(index)
    return found


def test_no_program_adds_to_memory_with_a_plain_load_add_store(object_path):
    sections = {
        name: instructions(code, order)
        for name, code, order in code_sections(object_path.read_bytes())
    }
    for name in ("cgroup/bind4", "cgroup/bind6", "cgroup_skb/ingress", "cgroup_skb/egress"):
        # the counters are there, counted atomically (this reads the right code)
        assert any(opcode == ATOMIC_DW for _, opcode, *_ in sections[name]), name
    assert {name: plain_increments(insns) for name, insns in sections.items()} == dict.fromkeys(
        sections, []
    )
