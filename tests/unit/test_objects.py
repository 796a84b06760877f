"""The object cache: names carry the source digest, a sidecar vouches for the content."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from guard.kernel import objects


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTGUARD_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_an_object_without_its_sidecar_is_not_offered(cache):
    Path(objects.object_path()).write_bytes(b"\x7fELF whatever")
    assert objects.cached_object() is None


def test_an_object_whose_sidecar_names_other_content_is_not_offered(cache):
    path = Path(objects.object_path())
    path.write_bytes(b"\x7fELF one")
    path.with_suffix(".sha256").write_text(objects.sha256(b"\x7fELF two").hexdigest() + "\n")
    assert objects.cached_object() is None


def test_an_intact_object_for_the_current_sources_is_offered(cache):
    path = Path(objects.object_path())
    path.write_bytes(b"\x7fELF one")
    path.with_suffix(".sha256").write_text(objects.sha256(b"\x7fELF one").hexdigest() + "\n")
    assert objects.cached_object() == str(path)


def test_objects_of_other_sources_are_never_offered(cache):
    stale = cache / f"guard-{'0' * 16}.o"
    stale.write_bytes(b"\x7fELF old")
    stale.with_suffix(".sha256").write_text(objects.sha256(b"\x7fELF old").hexdigest() + "\n")
    assert objects.cached_object() is None


def test_no_compiler_names_the_fix(cache, monkeypatch):
    monkeypatch.setenv("PORTGUARD_CLANG", "")
    with pytest.raises(objects.BuildError, match="portguard build"):
        objects.ensure_object()


def test_build_removes_objects_of_other_sources(cache):
    if objects.find_clang() is None:
        pytest.skip("no clang")
    stale = cache / f"guard-{'0' * 16}.o"
    stale.write_bytes(b"old")
    stale.with_suffix(".sha256").write_text("x\n")
    per_style = cache / f"guard-eperm-{'0' * 16}.o"  # older versions built one per denial style
    per_style.write_bytes(b"old")
    built = objects.build()
    assert objects.cached_object() == str(built)
    assert not stale.exists() and not stale.with_suffix(".sha256").exists()
    assert not per_style.exists()


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """The directory an installed package carries its objects in (guard/bpf)."""
    path = tmp_path / "shipped"
    path.mkdir()
    monkeypatch.setattr(objects, "shipped_dir", lambda: path)
    return path


def _put(directory, content: bytes, vouched: bytes | None = None):
    path = directory / objects.object_name()
    path.write_bytes(content)
    digest = objects.sha256(content if vouched is None else vouched).hexdigest()
    path.with_suffix(".sha256").write_text(digest + "\n")
    return path


def test_the_object_a_package_ships_is_preferred_to_the_cache(cache, shipped):
    _put(cache, b"\x7fELF cached")
    ours = _put(shipped, b"\x7fELF shipped")
    assert objects.cached_object() == str(ours)


def test_a_damaged_shipped_object_is_passed_over_for_an_intact_cached_one(cache, shipped):
    _put(shipped, b"\x7fELF damaged", vouched=b"\x7fELF shipped")
    cached = _put(cache, b"\x7fELF cached")
    assert objects.cached_object() == str(cached)


def test_a_damaged_shipped_object_without_a_compiler_names_the_package(cache, shipped, monkeypatch):
    _put(shipped, b"\x7fELF damaged", vouched=b"\x7fELF shipped")
    monkeypatch.setenv("PORTGUARD_CLANG", "")
    with pytest.raises(objects.BuildError, match="reinstall the portguard package"):
        objects.ensure_object()


def test_each_byte_order_has_its_own_object_name():
    little, big = (objects.object_name(t) for t in ("bpfel", "bpfeb"))
    assert little != big
    assert objects.object_name() == {"little": little, "big": big}[sys.byteorder]


def test_a_package_build_keeps_both_byte_orders(tmp_path):
    if objects.find_clang() is None:
        pytest.skip("no clang")
    for target in objects.TARGETS.values():
        objects.build(target, tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.o"))
    assert names == sorted(objects.object_name(t) for t in objects.TARGETS.values())
