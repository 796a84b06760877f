"""The Debian package that the systemd (nspawn) tests and the VM matrix install: what an
administrator installs, built from this tree by `./dev.sh deb`.

PORTGUARD_DEB names an already built package (CI builds it once from its clean clone and
passes it on); otherwise it is built here, once per process. `upgrade_package()` builds the
same tree under a higher version, to exercise upgrades; `new_program_package()` a still higher
version whose BPF source differs by a comment, so that the upgrade swaps a new program in.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEB_ENV = "PORTGUARD_DEB"
UPGRADE_VERSION_SUFFIX = "+upgrade1"
NEW_PROGRAM_VERSION_SUFFIX = "+upgrade2"


class DebError(RuntimeError):
    """The package could not be built."""


def version_of(deb: Path) -> str:
    out = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Version"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@functools.cache
def package(version: str | None = None) -> Path:
    """The .deb of this tree (version None: as debian/changelog says, or PORTGUARD_DEB)."""
    if version is None and os.environ.get(DEB_ENV):
        deb = Path(os.environ[DEB_ENV]).resolve()
        if not deb.is_file():
            raise DebError(f"{DEB_ENV}={deb}: no such file")
        return deb
    return _build(REPO, version)


def _build(tree: Path, version: str | None) -> Path:
    out = Path(tempfile.mkdtemp(prefix="portguard-deb-"))
    atexit.register(shutil.rmtree, out, True)  # the package serves this process only
    env = {**os.environ, "PORTGUARD_DEB_DIR": str(out)}
    if version:
        env["PORTGUARD_DEB_VERSION"] = version
    proc = subprocess.run(
        [str(tree / "dev.sh"), "deb"], env=env, capture_output=True, text=True, check=False
    )
    built = sorted(out.glob("portguard_*_all.deb"))
    if proc.returncode != 0 or len(built) != 1:
        raise DebError(f"./dev.sh deb failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return built[0]


def upgrade_package() -> Path:
    """The same tree as a higher version: installing it over package() is an upgrade."""
    return package(version_of(package()) + UPGRADE_VERSION_SUFFIX)


def tree_files(root: Path) -> list[str]:
    """The files git tracks (or would track) in root, as `./dev.sh deb` packs them."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


def copy_tree(root: Path, into: Path) -> None:
    """tree_files(root), copied below into."""
    for name in tree_files(root):
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, into / name)


@functools.cache
def new_program_package() -> Path:
    """A version above upgrade_package() whose BPF program is new: the source gains a comment,
    so its digest, the object's name and the loaded program change (the maps' layout, from
    guard.h, does not)."""
    tree = Path(tempfile.mkdtemp(prefix="portguard-src-"))
    try:
        copy_tree(REPO, tree)
        source = tree / "bpf/guard.bpf.c"
        source.write_text(
            source.read_text() + "\n/* tests/debs.py: a new program for upgrades */\n"
        )
        # dev.sh deb packs what git lists: make the copy a repository of its own.
        subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
        subprocess.run(["git", "add", "-A"], cwd=tree, check=True)
        return _build(tree, version_of(package()) + NEW_PROGRAM_VERSION_SUFFIX)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
