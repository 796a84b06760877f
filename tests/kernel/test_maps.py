"""guard.kernel.Map against real maps: batched reads, writes and deletes agree with the
element-at-a-time operations they replace."""

from __future__ import annotations

import os

import pytest

from guard.kernel import layout
from guard.kernel import libbpf as kernel

pytestmark = pytest.mark.kernel


def applied_ports_map(sandbox, spec: str) -> kernel.Map:
    sandbox.write_config(sandbox.owner_block([spec], "owner"))
    sandbox.cli("apply")
    fd = kernel.get_pinned(sandbox.pin_dir / f"maps-{layout.LAYOUT}" / "ports")
    assert fd is not None
    return kernel.Map(fd, layout.PortKey, layout.PortVal)


def fields(pairs) -> set[tuple]:
    return {(k.slot, k.proto, k.port, v.set) for k, v in pairs}


def test_batched_reads_return_what_the_element_walk_returns(sandbox):
    ports = applied_ports_map(sandbox, "20000-22499")  # 5,000 entries: more than one batch
    try:
        batched = fields(ports.items())
        assert len(batched) == 5000
        assert batched == fields(ports._walk())
    finally:
        os.close(ports.fd)


def test_batched_writes_and_deletes_skip_keys_already_gone(sandbox):
    ports = applied_ports_map(sandbox, "7000")
    spare = 1 - _active(sandbox)  # the slot no program reads
    try:
        ports.update_many([(spare, 6, p) for p in range(1, 10)], [(0, 0)] * 9)
        assert {k.port for k, _ in ports.items() if k.slot == spare} == set(range(1, 10))
        keys = [layout.PortKey(spare, 6, p) for p in (1, 2, 99, 3, *range(4, 10))]
        assert ports.delete_many(keys) == 9  # 99 was never there
        assert not [k for k, _ in ports.items() if k.slot == spare]
    finally:
        os.close(ports.fd)


def _active(sandbox) -> int:
    fd = kernel.get_pinned(sandbox.pin_dir / f"maps-{layout.LAYOUT}" / "state")
    try:
        return kernel.Map(fd, layout.U32, layout.State).lookup(0).active
    finally:
        os.close(fd)
