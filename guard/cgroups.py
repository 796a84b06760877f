"""The cgroup2 hierarchy: where it is mounted, and cgroup paths <-> ids."""

from __future__ import annotations

import os
from pathlib import Path

MOUNTS = Path("/proc/mounts")


class CgroupError(RuntimeError):
    pass


def cgroup2_mount(mounts: Path = MOUNTS) -> Path:
    """The cgroup2 mount point (/sys/fs/cgroup, or /sys/fs/cgroup/unified in hybrid layouts)."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError as exc:
        raise CgroupError(f"cannot read {mounts}: {exc.strerror}") from exc
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1].replace("\\040", " "))
    raise CgroupError("no cgroup2 file system is mounted (portguard needs the unified hierarchy)")


def directory(path: str, root: Path | None = None) -> Path:
    """Directory of a cgroup path relative to the cgroup2 root ("/system.slice/x.service")."""
    root = root or cgroup2_mount()
    return root / path.lstrip("/")


def cgroup_id(path: str, root: Path | None = None) -> int | None:
    """The cgroup's id (its directory's inode number), or None when it does not exist."""
    try:
        return os.stat(directory(path, root)).st_ino
    except FileNotFoundError:
        return None


def level(path: str) -> int:
    """Depth below the cgroup2 root: "/" is 0, "/a/b" is 2."""
    return len([part for part in path.split("/") if part])


def path_of_current_process() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise CgroupError("this process is not in a cgroup2 hierarchy")


UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")


def unit_of_cgroup(path: str) -> str | None:
    """The systemd unit a cgroup path belongs to (the deepest one), or None outside any unit."""
    for component in reversed(path.split("/")):
        if component.endswith(UNIT_SUFFIXES) and not component.startswith("."):
            return component
    return None
