"""Which ports are held in this network namespace, from /proc/net: the cheap first look
apply takes (at boot) before anything heavier. Imports nothing of portguard's."""

from __future__ import annotations

from pathlib import Path

PROC_NET = Path("/proc/net")


def bound_ports(proc_net: Path = PROC_NET) -> set[tuple[int, str]]:
    """(port, protocol) pairs that a listening TCP or a bound UDP socket holds in this network
    namespace, from /proc/net: a cheap first look before the sock_diag query (apply runs at
    boot). TCP sockets bound without listen() are not listed there; holders() sees them."""
    found: set[tuple[int, str]] = set()
    for name, protocol in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or (protocol == "tcp" and fields[3] != "0A"):  # 0A: LISTEN
                continue
            found.add((int(fields[1].rsplit(":", 1)[1], 16), protocol))
    return found
