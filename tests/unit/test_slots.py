"""The slot encoder/decoder and the order of apply's map steps, against in-memory maps."""

from __future__ import annotations

import os

import pytest

from guard.kernel import apply, layout, libbpf, slots, sysctl
from guard.kernel.layout import LIMITS
from guard.policy import config, owners, plan
from tests.unit.memory_maps import MemoryMaps

TCP, UDP = layout.PROTOCOLS["tcp"], layout.PROTOCOLS["udp"]
SLOTTED = {"ports", "sets", "paths", "owners", "config"}


def make_plan(text: str, **settings) -> plan.Plan:
    guard = "".join(f"{k} = {v}\n" for k, v in {"portreserve_dir": '""', **settings}.items())
    cfg = config.loads(f"[guard]\n{guard}{text}")
    return plan.build(cfg.settings, owners.resolve(cfg), owners.extra_owners(cfg), LIMITS)


CFG = layout.Config(3, 98, layout.MODE_ENFORCE)


@pytest.fixture
def cgroup_root(tmp_path):
    (tmp_path / "a").mkdir()
    return tmp_path


def test_a_filled_slot_reads_back_as_the_plan(cgroup_root):
    p = make_plan(
        '[[reserve]]\nports = ["631", "8000-8002/udp"]\ncgroups = ["/a", "/b/c"]\n'
        '[[reserve]]\nports = ["873/tcp"]\ncgroup = "/b/c"\ncontain = true\n'
    )
    maps = MemoryMaps()
    slots.fill_slot(maps, 1, p, CFG, cgroup_root)
    assert slots.read_slot(maps, 1) == slots.desired(p)
    assert slots.read_slot(maps, 0) == slots.SlotContents({}, {}, {})
    assert slots.read_slot(maps, 1).contained == frozenset({(TCP, 873)})
    # owners that exist are seeded with their id and depth; the others wait for the tracker
    a = p.paths.index("/a")
    assert slots.owner_ids(maps, 1) == {a: os.stat(cgroup_root / "a").st_ino}
    assert maps.owners.lookup(layout.OwnerKey(1, a)).level == 1
    assert maps.config.lookup(1).deny_errno == 98


def test_reading_some_ports_decodes_just_those_with_their_owners(cgroup_root):
    p = make_plan(
        '[[reserve]]\nports = ["631"]\ncgroup = "/a"\n'
        '[[reserve]]\nports = ["873"]\ncgroups = ["/b", "/c"]\n'
    )
    maps = MemoryMaps()
    slots.fill_slot(maps, 0, p, CFG, cgroup_root)
    some = slots.read_slot(maps, 0, [(TCP, 873), (UDP, 9)])
    assert set(some.ports) == {(TCP, 873)}
    assert some.owners_of(TCP, 873) == ("/b", "/c")
    assert some.owners_of(UDP, 9) == ()


def test_clearing_a_slot_leaves_the_other_whole(cgroup_root):
    p = make_plan('[[reserve]]\nports = ["631"]\ncgroup = "/a"\n')
    maps = MemoryMaps()
    slots.fill_slot(maps, 0, p, CFG, cgroup_root)
    slots.fill_slot(maps, 1, p, CFG, cgroup_root)
    slots.clear_slot(maps, 0)
    assert slots.read_slot(maps, 0) == slots.SlotContents({}, {}, {})
    assert slots.read_slot(maps, 1) == slots.desired(p)
    # paths go first: once gone, the cgroup trackers write no more owners of that slot
    deleted = [name for name, op, slot in maps.log if op == "delete"]
    assert deleted[0] == "paths"


@pytest.fixture
def host_effects(monkeypatch):
    """sysctl and the wait for running programs, logged into the maps' log."""
    maps = MemoryMaps()
    reserved: set[int] = set()

    def write(ports):
        reserved.clear()
        reserved.update(ports)
        maps.log.append(("sysctl", "write", None))

    monkeypatch.setattr(sysctl, "read", lambda: set(reserved))
    monkeypatch.setattr(sysctl, "write", write)
    monkeypatch.setattr(
        libbpf, "wait_for_programs", lambda: maps.log.append(("programs", "wait", None))
    )
    return maps


def test_reapply_flips_once_and_clears_the_old_slot_only_after_its_readers_are_gone(
    host_effects, cgroup_root
):
    maps = host_effects
    first = make_plan('[[reserve]]\nports = ["631", "636"]\ncgroup = "/a"\n')
    second = make_plan('[[reserve]]\nports = ["631", "873"]\ncgroup = "/b"\n')
    apply.apply_maps(maps, first, CFG, cgroup_root)
    old = maps.active
    before = slots.read_slot(maps, old)
    maps.log.clear()
    assert apply.apply_maps(maps, second, CFG, cgroup_root)
    new = maps.active
    assert new != old and slots.read_slot(maps, new) == slots.desired(second)
    log = maps.log
    flips = [i for i, entry in enumerate(log) if entry[:2] == ("state", "update")]
    assert len(flips) == 1
    flip = flips[0]
    wait = log.index(("programs", "wait", None))
    # before the flip only the new slot is written (and the sysctl learns the new ports)
    assert {slot for name, _, slot in log[:flip] if name in SLOTTED} == {new}
    assert ("sysctl", "write", None) in log[:flip]
    # after the flip, nothing touches the old slot until no program can be reading it
    old_writes = [i for i, (name, _, slot) in enumerate(log) if name in SLOTTED and slot == old]
    assert old_writes and flip < wait < min(old_writes)
    assert before == slots.desired(first)
    assert slots.read_slot(maps, old) == slots.SlotContents({}, {}, {})
    # the port that left the plan leaves the sysctl last of all
    assert log[-1][0] in ("sysctl", "sysctl_added")


def test_reapply_of_the_same_plan_writes_no_slot(host_effects, cgroup_root):
    maps = host_effects
    p = make_plan('[[reserve]]\nports = ["631"]\ncgroup = "/a"\n')
    apply.apply_maps(maps, p, CFG, cgroup_root)
    maps.log.clear()
    assert not apply.apply_maps(maps, p, CFG, cgroup_root)
    assert [entry for entry in maps.log if entry[0] in SLOTTED | {"state"}] == []


def test_the_first_apply_has_no_old_slot_to_wait_for(host_effects, cgroup_root):
    maps = host_effects
    assert apply.apply_maps(
        maps, make_plan('[[reserve]]\nports = ["1"]\ncgroup = "/a"\n'), CFG, cgroup_root
    )
    assert ("programs", "wait", None) not in maps.log
