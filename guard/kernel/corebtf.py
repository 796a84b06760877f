"""A minimal BTF of the running kernel for the object's CO-RE relocations, kept in the cache.

libbpf resolves the object's CO-RE relocations (the trackers' and the security_socket_bind
program's reads of kernel structs) against the kernel's BTF, and parsing all of
/sys/kernel/btf/vmlinux (~5 MB) is most of what loading the object costs.
`bpftool gen min_core_btf` writes the few types those relocations need (under 1 KB); handed to
libbpf as btf_custom_path it gives the same offsets for a fraction of the work.

The file is only right for the kernel and the object it was made from: a file made on another
kernel could give other offsets, the programs would load and read the wrong fields. So its name
carries a digest of the object's content and of the running kernel's build: the kernel image's
GNU build id (/sys/kernel/notes: a hash of the linked image, its code and its BTF), /proc/version
and the BTF's size; a kernel without a build id is known by a CRC-32 of its BTF instead (~2 ms
here, against ~17 ms for SHA-256). A sidecar holds the file's own digest, as for the object.

It is never needed: no file, a damaged one, no bpftool, a bpftool too old for min_core_btf or a
load that fails with it (libbpf.load_object tries again), and the kernel's own BTF serves.
It is made after an apply has put the guard in force (`ensure`), never before a load.
"""

from __future__ import annotations

import os
import sys

from guard.kernel import objects
from guard.kernel.sources import sha256

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
KERNEL_NOTES = "/sys/kernel/notes"
PROC_VERSION = "/proc/version"
NT_GNU_BUILD_ID = 3
PREFIX = "vmlinux-"  # vmlinux-<object digest>-<kernel digest>.btf in the cache directory


def build_id(notes: bytes) -> bytes | None:
    """The GNU build id among the kernel's ELF notes (/sys/kernel/notes, in the host's byte
    order), or None."""
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, kind = (
            int.from_bytes(notes[at + i : at + i + 4], sys.byteorder) for i in (0, 4, 8)
        )
        name_at = at + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if end > len(notes):
            return None
        if kind == NT_GNU_BUILD_ID and notes[name_at : name_at + namesz] == b"GNU\0" and descsz:
            return notes[desc_at : desc_at + descsz]
        at = end
    return None


def kernel_identity() -> bytes:
    """What tells the running kernel's BTF from every other's: its build id (else a CRC-32 of
    the BTF), its version string and the BTF's size."""
    btf = VMLINUX_BTF
    try:
        found = build_id(_read(KERNEL_NOTES))
    except OSError:
        found = None
    if found is not None:
        found = b"build-id:" + found.hex().encode()
    else:
        import zlib

        found = b"crc32:%08x" % zlib.crc32(_read(btf))
    return b"\0".join((found, _read(PROC_VERSION), b"%d" % os.stat(btf).st_size))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _object_digest(object_path: str) -> str:
    """The object's content digest, from the sidecar its loader has just checked."""
    return _read(objects.sidecar_of(os.fspath(object_path))).decode().strip()


def path_for(object_path: str) -> str:
    """Where the minimal BTF of this object and the running kernel is kept."""
    kernel = sha256(kernel_identity()).hexdigest()[:16]
    name = f"{PREFIX}{_object_digest(object_path)[:16]}-{kernel}.btf"
    return os.path.join(objects.cache_dir(), name)


def cached(object_path: str) -> str | None:
    """The intact minimal BTF of this object for the running kernel, or None."""
    try:
        path = path_for(object_path)
    except OSError:  # no BTF (the load will say so), an object without its sidecar
        return None
    return path if objects.intact(path) else None


def discard(path: str) -> None:
    """Remove a minimal BTF libbpf refused (the next `ensure` makes it anew)."""
    path = os.fspath(path)
    for stale in (objects.sidecar_of(path), path):  # the sidecar first: never taken again
        _unlink(stale)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def find_bpftool() -> str | None:
    """bpftool: $PORTGUARD_BPFTOOL when set ("" for none, tests), else on PATH or in /usr/sbin
    (Debian's, outside an ordinary user's PATH)."""
    import shutil

    override = os.environ.get("PORTGUARD_BPFTOOL")
    if override is not None:
        return shutil.which(override) if override else None
    return shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")


def ensure(object_path: str) -> str | None:
    """The minimal BTF of this object for the running kernel, made with bpftool when the cache
    has none; None when it cannot be made. Never raises: the kernel's BTF always serves."""
    found = cached(object_path)
    if found is not None:
        return found
    bpftool = find_bpftool()
    if bpftool is None:
        return None
    import subprocess
    import tempfile

    try:
        path = path_for(object_path)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
            out = os.path.join(tmp, os.path.basename(path))
            made = subprocess.run(
                [bpftool, "gen", "min_core_btf", str(VMLINUX_BTF), out, str(object_path)],
                capture_output=True,
                timeout=60,
            )
            if made.returncode != 0 or not os.path.isfile(out):
                return None
            sidecar = objects.sidecar_of(out)
            with open(sidecar, "w") as f:
                f.write(objects.file_digest(out) + "\n")
            # the sidecar last: until it is in place, the file is not taken
            os.replace(out, path)
            os.replace(sidecar, objects.sidecar_of(path))
    except (OSError, subprocess.SubprocessError):
        return None
    _prune(keep=path)
    return path


def _prune(keep: str) -> None:
    """Remove the minimal BTFs of other objects (an upgrade's old ones); other kernels' stay
    (a machine may boot either of two kernels; each file is under 1 KB)."""
    directory, name = os.path.split(keep)
    mine = name[: len(PREFIX) + 16]
    for other in os.listdir(directory):
        if other.startswith(PREFIX) and not other.startswith(mine):
            _unlink(os.path.join(directory, other))
