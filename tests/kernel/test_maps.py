"""guard.kernel.Map against real maps: batched reads, writes and deletes agree with the
element-at-a-time operations they replace."""

from __future__ import annotations

import os

import pytest

from guard.kernel import layout
from guard.kernel import libbpf as kernel

pytestmark = pytest.mark.kernel


def hash_map(entries: int) -> kernel.Map:
    """A fresh hash map (u32 -> u64), filled with `entries` elements one at a time."""
    fd = kernel.lib().bpf_map_create(layout.HASH, b"pg_test_hash", 4, 8, 8192, None)
    assert fd >= 0
    m = kernel.Map(fd, layout.U32, layout.U64)
    for i in range(entries):
        m.update(i, i * 3)
    return m


def test_batched_reads_return_what_the_element_walk_returns():
    m = hash_map(5000)  # more than one batch
    try:
        batched = {(k.value, v) for k, v in m.items()}
        assert batched == {(i, i * 3) for i in range(5000)}
        assert batched == {(k.value, v) for k, v in m._walk()}
    finally:
        os.close(m.fd)


def test_batched_writes_and_deletes_skip_keys_already_gone():
    m = hash_map(0)
    try:
        m.update_many(list(range(1, 10)), [7] * 9)
        assert {k.value: v for k, v in m.items()} == dict.fromkeys(range(1, 10), 7)
        assert m.delete_many([1, 2, 99, 3, *range(4, 10)]) == 9  # 99 was never there
        assert m.items() == []
    finally:
        os.close(m.fd)


def test_a_range_of_the_ports_array_reads_as_its_elements_do_mapped_or_batched(sandbox):
    sandbox.write_config(sandbox.owner_block(["20000-22499/tcp", "53/udp"], "owner"))
    sandbox.cli("apply")
    fd = kernel.get_pinned(sandbox.pin_dir / f"maps-{layout.LAYOUT}" / "ports")
    assert fd is not None
    ports = kernel.Map(fd, layout.U32, layout.PortEntries)
    try:
        total = layout.MAPS["ports"].max_entries
        whole = ports.read_range(0, total)
        part = ports.read_range(1000, 3000)
        assert ports._memory() is not None  # BPF_F_MMAPABLE: read as memory
        assert bytes(ports._read_range(1000, 3000)) == bytes(part)  # as the batched read
        for i in (0, 999, 1000, 1001, 3999, 4000, total - 1):
            assert bytes(whole[i]) == bytes(ports.lookup(i))
        assert [bytes(v) for v in part] == [bytes(v) for v in whole[1000:4000]]
        slot = _active(sandbox)
        index, position = layout.port_index(slot, layout.PROTOCOLS["udp"], 53)
        assert whole[index].entry[position] & layout.PORT_RESERVED
        reserved = {(i, p) for i, v in enumerate(whole) for p, e in enumerate(v.entry) if e}
        assert len(reserved) == 2501
    finally:
        ports.release()
        os.close(fd)


def _active(sandbox) -> int:
    fd = kernel.get_pinned(sandbox.pin_dir / f"maps-{layout.LAYOUT}" / "state")
    try:
        return kernel.Map(fd, layout.U32, layout.State).lookup(0).active
    finally:
        os.close(fd)


def test_programs_loaded_anew_over_the_pinned_maps_leave_only_the_new_plan_in_them(sandbox):
    """A load that reuses the pinned maps (here another road: refuse_at changed) must clear
    what the old plan left in them; only maps the load itself made are known empty."""
    sandbox.cgroup("owner")
    sandbox.write_config(sandbox.owner_block(["20001/tcp"], "owner"))
    sandbox.cli("apply")
    before = _reserved_entries(sandbox)
    sandbox.write_config(sandbox.owner_block(["20002/tcp"], "owner"), refuse_at="cgroup-eperm")
    sandbox.cli("apply")
    slot = _active(sandbox)
    assert before == {(1 - slot, 6, 20001)}  # the old plan, in the slot that was active
    assert _reserved_entries(sandbox) == {(slot, 6, 20002)}  # the new one alone


def _reserved_entries(sandbox) -> set[tuple[int, int, int]]:
    """(slot, protocol, port) of every entry of the pinned ports array."""
    fd = kernel.get_pinned(sandbox.pin_dir / f"maps-{layout.LAYOUT}" / "ports")
    ports = kernel.Map(fd, layout.U32, layout.PortEntries)
    try:
        whole = ports.read_range(0, layout.MAPS["ports"].max_entries)
    finally:
        ports.release()
        os.close(fd)
    found = set()
    for index, value in enumerate(whole):
        for position, entry in enumerate(value.entry):
            if entry:
                slot, within = divmod(index, 2 * layout.PORT_VALUES)
                proto = (layout.PROTOCOLS["udp"], layout.PROTOCOLS["tcp"])[
                    within < layout.PORT_VALUES
                ]
                port = (within % layout.PORT_VALUES) * layout.PORTS_PER_VALUE + position
                found.add((slot, proto, port))
    return found
