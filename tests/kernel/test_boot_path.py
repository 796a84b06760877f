"""The boot path: apply loads only the cached object built from the current sources, needs no
compiler once the cache is filled, and re-apply with an unchanged program loads nothing.

Every test gets its own object cache (never /var/cache/portguard). PORTGUARD_CLANG="" means
"there is no compiler on this host".
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from guard.kernel import layout, objects
from guard.kernel.libbpf import Map, get_pinned
from tests.kernel.sandbox import missing

pytestmark = pytest.mark.kernel

PORT = 7641
CASES = [("v4", "tcp", PORT), ("v6", "udp", PORT)]
NO_COMPILER = {"PORTGUARD_CLANG": ""}


@pytest.fixture
def cache(sandbox) -> Path:
    """A private cache filled by `portguard build`, as a postinst would."""
    if objects.find_clang() is None:
        missing("clang is needed to fill the object cache")
    path = sandbox.work / "cache"
    sandbox.cli("build", netns=None, env={"PORTGUARD_CACHE_DIR": str(path)})
    return path


def cached(cache: Path) -> Path:
    """The object apply would load here, named by the source digest."""
    found = sorted(cache.glob("guard-*.o"))
    assert len(found) == 1, found
    return found[0]


def apply(sandbox, cache: Path, env: dict | None = None, check: bool = True):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    return sandbox.cli("apply", check=check, env={"PORTGUARD_CACHE_DIR": str(cache), **(env or {})})


def nothing_loaded(sandbox) -> bool:
    return not sandbox.pin_dir.exists() or not any(sandbox.pin_dir.rglob("*"))


def test_apply_with_no_compiler_loads_a_good_cached_object(sandbox, cache):
    apply(sandbox, cache, NO_COMPILER)
    assert set(sandbox.bind("stranger", CASES).values()) == {errno.EADDRINUSE}
    assert sandbox.status()["program"] == cached(cache).stem


def test_an_object_whose_sidecar_digest_does_not_match_is_never_loaded(sandbox, cache):
    # An object that would load, but not the one the sidecar vouches for (libelf ignores
    # the byte appended to it).
    target = cached(cache)
    target.write_bytes(target.read_bytes() + b"\0")
    proc = apply(sandbox, cache, NO_COMPILER, check=False)
    assert proc.returncode == 1
    assert "portguard build" in proc.stderr and "Traceback" not in proc.stderr
    assert nothing_loaded(sandbox)


def test_a_damaged_cached_object_is_rebuilt_before_loading(sandbox, cache):
    target = cached(cache)
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 2])
    apply(sandbox, cache)
    assert target.read_bytes() == good
    assert target.with_suffix(".sha256").read_text().strip() == objects.sha256(good).hexdigest()
    assert set(sandbox.bind("stranger", CASES).values()) == {errno.EADDRINUSE}


def test_an_object_built_from_other_sources_is_not_used(sandbox, cache):
    # Intact (its sidecar matches), but named by another source digest: stale sources.
    current = cached(cache)
    stale = current.with_name(f"guard-{'0' * 16}.o")
    current.rename(stale)
    current.with_suffix(".sha256").rename(stale.with_suffix(".sha256"))
    proc = apply(sandbox, cache, NO_COMPILER, check=False)
    assert proc.returncode == 1
    assert "no intact compiled BPF object" in proc.stderr
    assert nothing_loaded(sandbox)


def test_reapply_with_an_unchanged_program_loads_nothing_and_only_updates_maps(sandbox, cache):
    apply(sandbox, cache)
    before = sandbox.status()
    sandbox.write_config(sandbox.owner_block([str(PORT), str(PORT + 1)], "owner"))
    out = sandbox.cli("apply", env={"PORTGUARD_CACHE_DIR": str(cache), **NO_COMPILER}).stdout
    assert "applied" in out
    after = sandbox.status()
    assert after["links"] == before["links"]  # same links, same program ids: nothing loaded
    assert after["program"] == before["program"]
    assert len(after["reservations"]) == len(before["reservations"]) + 2
    assert set(sandbox.bind("stranger", [("v4", "tcp", PORT + 1)]).values()) == {errno.EADDRINUSE}


def test_a_changed_program_is_swapped_into_the_same_links(sandbox, cache):
    apply(sandbox, cache)
    before = sandbox.status()
    meta = _pinned_map(sandbox, "meta")
    try:
        meta.update(0, layout.Meta(b"guard-0000000000000000"))  # as if the sources changed
    finally:
        os.close(meta.fd)
    apply(sandbox, cache)
    after = sandbox.status()
    for name, link in after["links"].items():
        assert link["prog_id"] != before["links"][name]["prog_id"]
    for name in ("bind4", "bind6"):  # swapped in place: the bind hooks were never empty
        assert after["links"][name]["link_id"] == before["links"][name]["link_id"]
    assert after["program"] == cached(cache).stem
    assert set(sandbox.bind("stranger", CASES).values()) == {errno.EADDRINUSE}
    assert set(sandbox.bind("owner", CASES).values()) == {0}


def _pinned_map(sandbox, name: str) -> Map:
    spec = layout.MAPS[name]
    fd = get_pinned(sandbox.pin_dir / f"maps-{layout.LAYOUT}" / name)
    assert fd is not None
    return Map(fd, spec.key, spec.value)
