"""The minimal-BTF cache: its key tells kernels and objects apart, a sidecar vouches for the
file, and nothing about it can fail an apply."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from guard.kernel import corebtf
from guard.kernel.sources import sha256

BUILD_ID = bytes(range(1, 21))


def note(kind: int, name: bytes, desc: bytes) -> bytes:
    """One ELF note as /sys/kernel/notes holds them (host byte order, 4-byte padding)."""

    def pad(data: bytes) -> bytes:
        return data + b"\0" * (-len(data) % 4)

    head = b"".join(n.to_bytes(4, sys.byteorder) for n in (len(name), len(desc), kind))
    return head + pad(name) + pad(desc)


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernel of files: its BTF, its notes (a Xen note, then the build id) and version."""
    btf, notes, version = tmp_path / "vmlinux", tmp_path / "notes", tmp_path / "version"
    btf.write_bytes(b"BTF" * 1000)
    notes.write_bytes(note(6, b"Linux\0", b"6.1.0\0") + note(3, b"GNU\0", BUILD_ID))
    version.write_bytes(b"Linux version 6.1.0-99-amd64 #1 SMP Debian 6.1.999-1\n")
    monkeypatch.setattr(corebtf, "VMLINUX_BTF", btf)
    monkeypatch.setattr(corebtf, "KERNEL_NOTES", notes)
    monkeypatch.setattr(corebtf, "PROC_VERSION", version)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("PORTGUARD_CACHE_DIR", str(cache))
    return tmp_path


@pytest.fixture
def obj(tmp_path):
    """An object with its sidecar, as objects.cached_object offers it."""
    path = tmp_path / "guard-0123456789abcdef.o"
    path.write_bytes(b"\x7fELF object")
    path.with_suffix(".sha256").write_text(sha256(path.read_bytes()).hexdigest() + "\n")
    return path


def test_the_build_id_is_found_among_the_kernels_notes():
    notes = note(6, b"Linux\0", b"6.1.0\0") + note(3, b"GNU\0", BUILD_ID) + note(1, b"Xen\0", b"x")
    assert corebtf.build_id(notes) == BUILD_ID


@pytest.mark.parametrize(
    "notes",
    [b"", note(6, b"Linux\0", b"6.1.0\0"), note(3, b"XYZ\0", BUILD_ID), note(3, b"GNU\0", b"")],
)
def test_notes_without_a_gnu_build_id_have_none(notes):
    assert corebtf.build_id(notes) is None


def test_truncated_notes_have_no_build_id():
    assert corebtf.build_id(note(3, b"GNU\0", BUILD_ID)[:-4]) is None


def test_the_same_kernel_and_object_give_the_same_file(kernel, obj):
    assert corebtf.path_for(obj) == corebtf.path_for(obj)


@pytest.mark.parametrize(
    "change",
    [
        # another build of the same release: same version string and BTF size, another image
        lambda k: (k / "notes").write_bytes(note(3, b"GNU\0", bytes(20))),
        # what /proc/version says differs (another release, build number or compiler)
        lambda k: (k / "version").write_bytes(b"Linux version 6.1.0-99-amd64 #2 SMP\n"),
        # a BTF of another size
        lambda k: (k / "vmlinux").write_bytes(b"BTF" * 1001),
    ],
    ids=["build-id", "version", "btf-size"],
)
def test_another_kernel_gets_another_file(kernel, obj, change):
    before = corebtf.path_for(obj)
    change(kernel)
    assert corebtf.path_for(obj) != before


def test_another_object_gets_another_file(kernel, obj, tmp_path):
    other = tmp_path / "guard-fedcba9876543210.o"
    other.write_bytes(b"\x7fELF another object")
    other.with_suffix(".sha256").write_text(sha256(other.read_bytes()).hexdigest() + "\n")
    assert corebtf.path_for(other) != corebtf.path_for(obj)


def test_without_a_build_id_the_btf_content_tells_kernels_apart(kernel, obj):
    (kernel / "notes").write_bytes(note(6, b"Linux\0", b"6.1.0\0"))
    before = corebtf.path_for(obj)
    (kernel / "vmlinux").write_bytes(b"BTG" * 1000)  # same size, same version, other content
    assert corebtf.path_for(obj) != before


def test_unreadable_notes_fall_back_to_the_btf_content(kernel, obj):
    (kernel / "notes").unlink()
    before = corebtf.path_for(obj)
    (kernel / "vmlinux").write_bytes(b"BTG" * 1000)
    assert corebtf.path_for(obj) != before


def made(path: str | Path, content: bytes = b"\x9f\xeb min btf") -> Path:
    path = Path(path)
    path.write_bytes(content)
    path.with_suffix(".sha256").write_text(sha256(content).hexdigest() + "\n")
    return path


def test_an_intact_file_for_this_kernel_and_object_is_offered(kernel, obj):
    assert corebtf.cached(obj) is None
    made(corebtf.path_for(obj))
    assert corebtf.cached(obj) == corebtf.path_for(obj)


def test_a_file_without_its_sidecar_or_another_content_is_not_offered(kernel, obj):
    path = Path(corebtf.path_for(obj))
    path.write_bytes(b"\x9f\xeb min btf")
    assert corebtf.cached(obj) is None
    path.with_suffix(".sha256").write_text(sha256(b"other").hexdigest() + "\n")
    assert corebtf.cached(obj) is None


def test_a_file_made_on_another_kernel_is_not_offered(kernel, obj):
    made(corebtf.path_for(obj))
    (kernel / "notes").write_bytes(note(3, b"GNU\0", bytes(20)))
    assert corebtf.cached(obj) is None


def test_no_kernel_btf_or_no_sidecar_of_the_object_means_no_file(kernel, obj):
    obj.with_suffix(".sha256").unlink()
    assert corebtf.cached(obj) is None
    assert corebtf.ensure(obj) is None


def fake_bpftool(tmp_path: Path, body: str) -> str:
    tool = tmp_path / "bpftool"
    tool.write_text("#!/bin/sh\n" + body + "\n")
    tool.chmod(0o755)
    return str(tool)


def test_ensure_makes_the_file_with_bpftool_and_its_sidecar(kernel, obj, tmp_path, monkeypatch):
    # bpftool gen min_core_btf VMLINUX OUT OBJECT
    monkeypatch.setenv(
        "PORTGUARD_BPFTOOL", fake_bpftool(tmp_path, 'printf "min of %s" "$5" > "$4"')
    )
    path = Path(corebtf.ensure(obj))
    assert str(path) == corebtf.path_for(obj) == corebtf.cached(obj)
    assert path.read_bytes() == b"min of " + str(obj).encode()
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_ensure_removes_the_files_of_other_objects_and_keeps_other_kernels(
    kernel, obj, tmp_path, monkeypatch
):
    cache = Path(os.environ["PORTGUARD_CACHE_DIR"])
    old_object = made(cache / "vmlinux-aaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb.btf")
    digest = obj.with_suffix(".sha256").read_text()[:16]
    other_kernel = made(cache / f"vmlinux-{digest}-cccccccccccccccc.btf")
    monkeypatch.setenv("PORTGUARD_BPFTOOL", fake_bpftool(tmp_path, 'echo min > "$4"'))
    assert corebtf.ensure(obj) is not None
    assert not old_object.exists() and not old_object.with_suffix(".sha256").exists()
    assert other_kernel.exists()


@pytest.mark.parametrize(
    "body",
    ["exit 1", "true", 'echo "Error: unknown command min_core_btf" >&2; exit 255'],
    ids=["fails", "writes-nothing", "too-old"],
)
def test_a_bpftool_that_makes_nothing_leaves_no_file(kernel, obj, tmp_path, monkeypatch, body):
    monkeypatch.setenv("PORTGUARD_BPFTOOL", fake_bpftool(tmp_path, body))
    assert corebtf.ensure(obj) is None
    assert list(Path(os.environ["PORTGUARD_CACHE_DIR"]).iterdir()) == []


def test_without_bpftool_ensure_does_nothing(kernel, obj, monkeypatch):
    monkeypatch.setenv("PORTGUARD_BPFTOOL", "")
    assert corebtf.ensure(obj) is None


def test_an_unwritable_cache_is_no_error(kernel, obj, tmp_path, monkeypatch):
    monkeypatch.setenv("PORTGUARD_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("PORTGUARD_BPFTOOL", fake_bpftool(tmp_path, 'echo min > "$4"'))
    assert corebtf.ensure(obj) is None


def test_a_refused_file_is_discarded_sidecar_and_all(kernel, obj):
    path = made(corebtf.path_for(obj))
    corebtf.discard(path)
    assert not path.exists() and not path.with_suffix(".sha256").exists()
    assert corebtf.cached(obj) is None
