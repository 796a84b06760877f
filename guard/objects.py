"""The compiled BPF object: built once with clang, cached by the digest of its sources.

The object uses only UAPI types plus CO-RE relocations resolved against the running
kernel's BTF at load time, so one build serves every kernel: no kernel headers, and no
compiler at boot once `portguard build` (or the first apply) has filled the cache.
The cache file name carries the source digest and a sidecar holds the object's own
digest: an object built from other sources, or damaged, is never loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from guard.sources import bpf_source_dir, sha256

DEFAULT_CACHE_DIR = Path("/var/cache/portguard")
SOURCES = ("guard.bpf.c", "guard.h")
VARIANTS = {
    "retval": [],  # denial errno chosen at run time via bpf_set_retval (Linux >= 5.18)
    "eperm": ["-DPG_NO_SET_RETVAL"],  # older kernels: the binder sees EPERM
}
CLANGS = ("clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14")


class BuildError(RuntimeError):
    """The object is missing and cannot be built here; the message names the fix."""


def cache_dir() -> Path:
    return Path(os.environ.get("PORTGUARD_CACHE_DIR", DEFAULT_CACHE_DIR))


def _flags(variant: str) -> list[str]:
    import sysconfig

    include = [f"-I{bpf_source_dir()}"]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        include.append(f"-I/usr/include/{multiarch}")
    return ["-O2", "-g", "-target", "bpf", *include, *VARIANTS[variant]]


def source_digest(variant: str) -> str:
    digest = sha256()
    for name in SOURCES:
        digest.update((bpf_source_dir() / name).read_bytes())
    digest.update(" ".join(VARIANTS[variant]).encode())
    return digest.hexdigest()[:16]


def object_path(variant: str) -> Path:
    return cache_dir() / f"guard-{variant}-{source_digest(variant)}.o"


def _file_digest(path: Path) -> str:
    return sha256(path.read_bytes()).hexdigest()


def cached_object(variant: str) -> Path | None:
    """The cached object for the current sources, if present and intact."""
    path = object_path(variant)
    sidecar = path.with_suffix(".sha256")
    try:
        if sidecar.read_text().strip() == _file_digest(path):
            return path
    except OSError:
        pass
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


def build(variant: str) -> Path:
    """Compile the object into the cache (atomically) and return its path."""
    import subprocess
    import tempfile

    clang = find_clang()
    if clang is None:
        raise BuildError(
            f"no compiled BPF object for this portguard version in {cache_dir()} and no clang "
            "to build one: install clang and libbpf-dev (apt install clang libbpf-dev), then run "
            "`portguard build`"
        )
    target = object_path(variant)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [clang, *_flags(variant), "-c", str(bpf_source_dir() / "guard.bpf.c"), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            hint = ""
            if "bpf/bpf_helpers.h" in proc.stderr or "linux/bpf.h" in proc.stderr:
                hint = " (install libbpf-dev and linux-libc-dev)"
            raise BuildError(f"compiling the BPF object failed{hint}:\n{proc.stderr.strip()}")
        sidecar = Path(tmp) / (target.stem + ".sha256")
        sidecar.write_text(_file_digest(out) + "\n")
        os.replace(out, target)
        os.replace(sidecar, target.with_suffix(".sha256"))
    _prune(variant, keep=target)
    return target


def _prune(variant: str, keep: Path) -> None:
    """Remove this variant's objects built from other sources (a package upgrade leaves
    the old version's): they are never loaded, only taking room."""
    for stale in keep.parent.glob(f"guard-{variant}-*.o"):
        if stale != keep:
            for path in (stale, stale.with_suffix(".sha256")):
                path.unlink(missing_ok=True)


def ensure_object(variant: str) -> Path:
    """The object for this variant, building it when the cache lacks it."""
    return cached_object(variant) or build(variant)
