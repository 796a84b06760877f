"""net.ipv4.ip_local_reserved_ports: autobind (bind to port 0, connect, sendto without bind)
never picks a port listed there. Per network namespace; it covers IPv6 too."""

from __future__ import annotations

from pathlib import Path

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
