"""net.ipv4.ip_local_reserved_ports: autobind (bind to port 0, connect, sendto without bind)
never picks a port listed there. Per network namespace; it covers IPv6 too."""

from __future__ import annotations

from pathlib import Path

from guard.kernel import layout, libbpf
from guard.kernel.pins import open_map

RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


def parse(text: str) -> set[int]:
    ports: set[int] = set()
    for item in text.replace("\n", "").split(","):
        item = item.strip()
        if not item:
            continue
        low, _, high = item.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


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


def read(path: Path = RESERVED_PORTS) -> set[int]:
    return parse(path.read_text())


def write(ports: set[int], path: Path = RESERVED_PORTS) -> None:
    path.write_text(format_ports(ports) + "\n")


# ---- the ports portguard added, recorded in the pinned sysctl_added map --------------------
# Recorded before the write and forgotten after the drop: a killed run never forgets a port
# it added, and remove takes away only those.


def add(added: libbpf.Map, ports: set[int]) -> bool:
    current = read()
    missing = ports - current
    added.update_many(sorted(missing), [1] * len(missing))  # first: a crash never forgets them
    if missing:
        write(current | missing)
        libbpf.step()
    return bool(missing)


def drop(added: libbpf.Map, keep: set[int]) -> bool:
    stale = {k.value for k in added.keys()} - keep
    if not stale:
        return False
    current = read()
    if current & stale:
        write(current - stale)
        libbpf.step()
    added.delete_many(list(stale))  # forgotten last: a crash before this only repeats the drop
    return True


def records(maps_dir: Path) -> libbpf.Map | None:
    """The sysctl_added map of any maps directory (this layout's or an older one) whose map
    still has that name and shape, so no layout change forgets what portguard added."""
    fd = open_map(maps_dir / "sysctl_added", "sysctl_added")
    if fd is None:
        return None
    spec = layout.MAPS["sysctl_added"]
    return libbpf.Map(fd, spec.key, spec.value)
