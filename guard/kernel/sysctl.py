"""net.ipv4.ip_local_reserved_ports: autobind (bind to port 0, connect, sendto without bind)
never picks a port listed there. Per network namespace; it covers IPv6 too."""

from __future__ import annotations

import os

from guard.kernel import layout, libbpf, snapshot
from guard.kernel.pins import open_map

RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"


def parse(text: str) -> set[int]:
    return snapshot.parse_ports(text)


def format_ports(ports: set[int]) -> str:
    """Compact "1,5-9" form, as the kernel prints it."""
    out, run = [], []
    for port in sorted(ports):
        if run and port == run[-1] + 1:
            run.append(port)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [port]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def read(path: str = RESERVED_PORTS) -> set[int]:
    with open(path) as f:
        return parse(f.read())


def write(ports: set[int], path: str = RESERVED_PORTS) -> None:
    with open(path, "w") as f:
        f.write(format_ports(ports) + "\n")


# ---- the ports portguard added, recorded in the pinned sysctl_added bitmap ------------------
# Recorded before the write and forgotten after the drop: a killed run never forgets a port
# it added, and remove takes away only those.


def recorded(added: libbpf.Map) -> set[int]:
    """The ports the bitmap records."""
    words = added.read_range(0, layout.SYSCTL_WORDS)
    return {
        index * 64 + bit
        for index, word in enumerate(words)
        if word
        for bit in range(64)
        if word >> bit & 1
    }


def record(added: libbpf.Map, before: set[int], after: set[int]) -> None:
    """Write the words in which `before` and `after` differ."""
    words: dict[int, int] = {}
    for port in after:
        words[port // 64] = words.get(port // 64, 0) | 1 << port % 64
    changed = sorted({port // 64 for port in before ^ after})
    added.update_many(changed, [words.get(index, 0) for index in changed])


def add(added: libbpf.Map, ports: set[int]) -> bool:
    current = read()
    missing = ports - current
    if missing:
        known = recorded(added)
        record(added, known, known | missing)  # first: a crash never forgets them
        write(current | missing)
        libbpf.step()
    return bool(missing)


def drop(added: libbpf.Map, keep: set[int]) -> bool:
    known = recorded(added)
    stale = known - keep
    if not stale:
        return False
    release(stale)
    record(added, known, known - stale)  # forgotten last: a crash only repeats the drop
    return True


def release(ports: set[int]) -> None:
    """Take these ports out of the sysctl (those still in it)."""
    current = read()
    if current & ports:
        write(current - ports)
        libbpf.step()


def records(maps_dir: str) -> set[int] | None:
    """The ports recorded in the sysctl_added map of any maps directory (this layout's or an
    older one, whose map may still be the hash of earlier layouts), so no layout change
    forgets what portguard added; None when there is no such map."""
    fd = open_map(os.path.join(maps_dir, "sysctl_added"), "sysctl_added")
    if fd is not None:
        spec = layout.MAPS["sysctl_added"]
        bitmap = libbpf.Map(fd, spec.key, spec.value)
        try:
            return recorded(bitmap)
        finally:
            bitmap.release()
            os.close(fd)
    legacy = layout.SYSCTL_ADDED_HASH
    fd = open_map(os.path.join(maps_dir, "sysctl_added"), "sysctl_added", legacy)

    if fd is None:
        return None
    try:
        return {key.value for key in libbpf.Map(fd, legacy.key, legacy.value).keys()}
    finally:
        os.close(fd)
