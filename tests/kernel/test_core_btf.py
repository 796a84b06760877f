"""The minimal BTF (guard/kernel/corebtf.py) against the real kernel: apply makes it, a load
takes it, the guard it loads is right, and a damaged or stale one is never needed."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from guard.kernel import corebtf, objects
from guard.kernel import libbpf as kernel
from guard.kernel.programs import not_loaded

PORT = 7651
CASES = [("v4", "tcp", PORT), ("v6", "udp", PORT), ("mapped", "tcp", PORT)]
SKIP = not_loaded("retval", False)  # what a boot loads: the bind hooks and the trackers


@pytest.fixture
def bpftool():
    if corebtf.find_bpftool() is None:
        pytest.fail("bpftool is needed here (apt install bpftool: ./dev.sh installs it)")


def apply(sandbox) -> None:
    sandbox.cgroup("owner")
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    sandbox.cli("apply")


def owners_follow_restarts_and_strangers_are_refused(sandbox) -> None:
    """The trackers read the right fields: a restarted owner is found by its new id."""
    assert set(sandbox.bind("owner", CASES).values()) == {0}
    old_id = sandbox.cgroup_id("owner")
    sandbox.rmdir("owner")
    assert sandbox.status()["reservations"][0]["owners"][0]["id"] is None
    sandbox.cgroup("owner")
    assert sandbox.cgroup_id("owner") != old_id
    assert sandbox.status()["reservations"][0]["owners"][0]["id"] == sandbox.cgroup_id("owner")
    assert set(sandbox.bind("owner", CASES).values()) == {0}
    assert set(sandbox.bind("stranger", CASES).values()) == {errno.EADDRINUSE}


def load(sandbox, btf):
    """Load the object as a boot does, onto maps of its own; the BTF that served."""
    maps_dir = sandbox.pin_dir / "btf-load"
    maps_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    loaded = kernel.load_object(objects.ensure_object(), maps_dir, SKIP, core_btf=btf)
    try:
        return loaded.core_btf
    finally:
        loaded.close()
        for pin in maps_dir.iterdir():
            pin.unlink()
        maps_dir.rmdir()


def test_apply_makes_the_minimal_btf_and_a_load_takes_it(sandbox, bpftool):
    obj = objects.ensure_object()
    corebtf.discard(corebtf.path_for(obj))
    apply(sandbox)
    made = corebtf.cached(obj)
    assert made is not None and os.stat(made).st_size < 64 * 1024
    assert load(sandbox, made) == made  # libbpf took it: no second load with the kernel's


def test_the_guard_loaded_with_the_minimal_btf_follows_owners(sandbox, bpftool):
    obj = objects.ensure_object()
    assert corebtf.ensure(obj) is not None  # the next apply's load takes it
    apply(sandbox)
    assert corebtf.cached(obj) is not None
    owners_follow_restarts_and_strangers_are_refused(sandbox)


def empty_btf() -> bytes:
    """A valid BTF without a type: what a minimal BTF of another object could lack."""
    header = [(0xEB9F, 2), (1, 1), (0, 1), (24, 4), (0, 4), (0, 4), (0, 4), (1, 4)]
    return b"".join(v.to_bytes(n, sys.byteorder) for v, n in header) + b"\0"


@pytest.mark.parametrize(
    "content",
    [
        lambda good: b"\x00not a BTF at all" * 8,
        lambda good: good[: len(good) // 2],
        lambda good: empty_btf(),
    ],
    ids=["garbage", "truncated", "stale-no-types"],
)
def test_a_minimal_btf_libbpf_refuses_falls_back_to_the_kernels_and_is_made_anew(
    sandbox, bpftool, content
):
    obj = objects.ensure_object()
    good = corebtf.ensure(obj)
    assert good is not None
    good = Path(good)
    bad = content(good.read_bytes())
    good.write_bytes(bad)  # with a sidecar that vouches for it: only libbpf can refuse it
    good.with_suffix(".sha256").write_text(corebtf.sha256(bad).hexdigest() + "\n")
    assert corebtf.cached(obj) == str(good)
    assert load(sandbox, good) is None  # loaded all the same, with the kernel's BTF
    apply(sandbox)
    owners_follow_restarts_and_strangers_are_refused(sandbox)
    remade = corebtf.cached(obj)
    assert remade is not None and Path(remade).read_bytes() != bad
    assert load(sandbox, remade) == remade


def test_without_bpftool_apply_guards_with_the_kernels_btf(sandbox, monkeypatch):
    obj = objects.ensure_object()
    corebtf.discard(corebtf.path_for(obj))
    monkeypatch.setenv("PORTGUARD_BPFTOOL", "")  # inherited by the CLI
    apply(sandbox)
    assert corebtf.cached(obj) is None
    owners_follow_restarts_and_strangers_are_refused(sandbox)
