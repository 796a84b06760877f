"""The cgroup2 hierarchy: where it is mounted, and cgroup paths <-> ids."""

from __future__ import annotations

import os

from guard import paths

MOUNTS = "/proc/mounts"
CGROUP_NAMESPACE = "/proc/self/ns/cgroup"
INITIAL_CGROUP_NAMESPACE_INO = 0xEFFFFFFB  # PROC_CGROUP_INIT_INO, fixed by the kernel


class CgroupError(RuntimeError):
    pass


def mount_points(fstype: str, mounts: str = MOUNTS) -> list[str]:
    """Where file systems of this type are mounted, in /proc/mounts order (escapes undone)."""
    try:
        with open(mounts) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise CgroupError(f"cannot read {mounts}: {exc.strerror}") from exc
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == fstype:
            found.append(paths.normal(unescape_mount_path(fields[1])))
    return found


def cgroup2_mount(mounts: str = MOUNTS) -> str:
    """The cgroup2 mount point (/sys/fs/cgroup, or /sys/fs/cgroup/unified in hybrid layouts)."""
    found = mount_points("cgroup2", mounts)
    if not found:
        raise CgroupError(
            "no cgroup2 file system is mounted (portguard needs the unified hierarchy)"
        )
    return found[0]


def unescape_mount_path(path: str) -> str:
    """Undo the octal escapes of /proc/mounts (\\040 for a space and so on)."""
    pieces = path.split("\\")
    out = [pieces[0]]
    for piece in pieces[1:]:
        code = piece[:3]
        if len(code) == 3 and all(digit in "01234567" for digit in code):
            out.append(chr(int(code, 8)) + piece[3:])
        else:
            out.append("\\" + piece)
    return "".join(out)


def require_initial_namespace(namespace: str = CGROUP_NAMESPACE) -> None:
    """Refuse to work inside a cgroup namespace.

    The kernel's cgroup_mkdir tracepoint reports paths from the real cgroup2 root and BPF
    cgroup levels count from there, but inside a cgroup namespace /proc, the cgroup2 mount and
    systemd all show paths relative to the namespace's root: owners would resolve to paths the
    tracker never sees and to wrong levels, so every owner would be refused.
    """
    try:
        inode = os.stat(namespace).st_ino
    except OSError:
        return  # no cgroup namespaces in this kernel: nothing to be inside of
    if inode != INITIAL_CGROUP_NAMESPACE_INO:
        raise CgroupError(
            "portguard must run in the host's cgroup namespace (this process is inside another "
            "one, where cgroup paths differ from the kernel's): for systemd-nspawn set "
            "SYSTEMD_NSPAWN_USE_CGNS=0"
        )


def directory(path: str, root: str | os.PathLike | None = None) -> str:
    """Directory of a cgroup path relative to the cgroup2 root ("/system.slice/x.service")."""
    root = root or cgroup2_mount()
    return paths.join(root, path.lstrip("/"))


def cgroup_id(path: str, root: str | os.PathLike | None = None) -> int | None:
    """The cgroup's id (its directory's inode number), or None when it does not exist."""
    try:
        return os.stat(directory(path, root)).st_ino
    except FileNotFoundError:
        return None


def level(path: str) -> int:
    """Depth below the cgroup2 root: "/" is 0, "/a/b" is 2."""
    return len([part for part in path.split("/") if part])


def path_of_current_process() -> str:
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
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
