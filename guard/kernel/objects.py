"""The compiled BPF object: built once with clang, named by the digest of its sources.

The object uses only UAPI types plus CO-RE relocations resolved against the running
kernel's BTF at load time, so one build serves every kernel: no kernel headers, and no
compiler on the host. A wheel or Debian package compiles it when the package is built
(setup.py) and ships it beside the sources in ``guard/bpf``; a source checkout compiles it
into the cache (`portguard build`, or the first apply). Every file name carries the source
digest and a sidecar holds the object's own digest: an object built from other sources, or
damaged, is never loaded.

BPF objects carry the byte order of their target, not a CPU architecture: the package ships
a little- and a big-endian build (``bpfel``/``bpfeb``) and the host's byte order picks one,
so the package is the same on every architecture. There is one object per byte order, not
one per kernel: how a refused bind is denied is chosen when the object is loaded.
"""

from __future__ import annotations

import os
import sys

from guard.kernel.sources import bpf_source_dir, sha256

DEFAULT_CACHE_DIR = "/var/cache/portguard"
SOURCES = ("guard.bpf.c", "guard.h")
# the clang target for each byte order (sys.byteorder)
TARGETS = {"little": "bpfel", "big": "bpfeb"}
CLANGS = ("clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14")


class BuildError(RuntimeError):
    """The object is missing and cannot be built here; the message names the fix."""


def cache_dir() -> str:
    return os.environ.get("PORTGUARD_CACHE_DIR", DEFAULT_CACHE_DIR)


def shipped_dir() -> str:
    """Where an installed package carries its prebuilt objects (absent in a checkout)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "bpf")


def sidecar_of(path: str) -> str:
    """The sha256 sidecar of an object or BTF file: its name with the suffix replaced."""
    return os.path.splitext(path)[0] + ".sha256"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def host_target() -> str:
    return TARGETS[sys.byteorder]


def _flags(target: str) -> list[str]:
    import sysconfig

    include = [f"-I{bpf_source_dir()}"]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        include.append(f"-I/usr/include/{multiarch}")
    return ["-O2", "-g", "-target", target, *include]


def source_digest(target: str | None = None) -> str:
    digest = sha256()
    for name in SOURCES:
        digest.update(_read(os.path.join(bpf_source_dir(), name)))
    target = target or host_target()
    if target != "bpfel":  # keeps the little-endian names that caches and pins already carry
        digest.update(target.encode())
    return digest.hexdigest()[:16]


def object_name(target: str | None = None) -> str:
    return f"guard-{source_digest(target)}.o"


def object_path() -> str:
    return os.path.join(cache_dir(), object_name())


def file_digest(path: str) -> str:
    return sha256(_read(path)).hexdigest()


def intact(path: str) -> bool:
    """Whether the file's sidecar holds its digest (an object, or a minimal BTF)."""
    try:
        return _read(sidecar_of(path)).decode().strip() == file_digest(path)
    except OSError:
        return False


def cached_object() -> str | None:
    """The object for the current sources, if present and intact: the one the package
    shipped first, else the one in the cache."""
    name = object_name()
    for path in (os.path.join(shipped_dir(), name), os.path.join(cache_dir(), name)):
        if intact(path):
            return path
    return None


def find_clang() -> str | None:
    import shutil  # the compiler tools stay off the apply path: only a cache miss builds

    override = os.environ.get("PORTGUARD_CLANG")
    if override is not None:
        return shutil.which(override) if override else None
    for name in CLANGS:
        found = shutil.which(name)
        if found:
            return found
    return None


def build(target: str | None = None, directory: str | os.PathLike | None = None) -> str:
    """Compile the object (for `target`, default the host's byte order) into `directory`
    (default the cache), atomically, and return its path."""
    import subprocess
    import tempfile

    clang = find_clang()
    if clang is None:
        where = f"cached in {cache_dir()}"
        if os.path.isdir(shipped_dir()):  # an installed package (a checkout has no guard/bpf)
            where = f"shipped in {shipped_dir()} or {where}"
        raise BuildError(
            f"no intact compiled BPF object for this portguard version ({where}) and no clang "
            "to build one: reinstall the portguard package, or install clang and libbpf-dev "
            "(apt install clang libbpf-dev) and run `portguard build`"
        )
    target = target or host_target()
    path = os.path.join(os.fspath(directory or cache_dir()), object_name(target))
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        out = os.path.join(tmp, os.path.basename(path))
        source = os.path.join(bpf_source_dir(), "guard.bpf.c")
        cmd = [clang, *_flags(target), "-c", source, "-o", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            hint = ""
            if "bpf/bpf_helpers.h" in proc.stderr or "linux/bpf.h" in proc.stderr:
                hint = " (install libbpf-dev and linux-libc-dev)"
            raise BuildError(f"compiling the BPF object failed{hint}:\n{proc.stderr.strip()}")
        sidecar = sidecar_of(out)
        with open(sidecar, "w") as f:
            f.write(file_digest(out) + "\n")
        os.replace(out, path)
        os.replace(sidecar, sidecar_of(path))
    _prune(keep=path)
    return path


def _prune(keep: str) -> None:
    """Remove objects built from other sources (a package upgrade leaves the old version's,
    older versions built one per denial style): they are never loaded, only taking room.
    Objects for the other byte order, built beside them for a package, stay."""
    current = {object_name(target) for target in TARGETS.values()}
    directory = os.path.dirname(keep)
    for name in os.listdir(directory):
        if name.startswith("guard-") and name.endswith(".o") and name not in current:
            for path in (os.path.join(directory, name), sidecar_of(os.path.join(directory, name))):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


def ensure_object() -> str:
    """The object for the current sources, building it when neither package nor cache has it."""
    return cached_object() or build()
