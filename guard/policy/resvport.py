"""Which reserved ports bindresvport() would still stop at, when refusals are not EADDRINUSE.

glibc's and libtirpc's bindresvport() walk 600-1023, then 512-599, and move on to the next
port only when a bind fails with EADDRINUSE; on any other error they give up, and the RPC
daemon (rpcbind, rpc.statd, NFS helpers) fails to start. Kernels without bpf_set_retval
(< 5.18) can only refuse with EPERM, and deny_errno may say EPERM or EACCES. libtirpc skips the
ports listed in /etc/bindresvport.blacklist before it tries them, so there the exposure is
exactly the reserved ports in 512-1023 that file does not list.
"""

from __future__ import annotations

import errno
import os

from guard.paths import normal

TYPE_CHECKING = False  # annotations only: collections.abc would import collections
if TYPE_CHECKING:
    from collections.abc import Iterable

BLACKLIST = normal(
    os.environ.get("PORTGUARD_BINDRESVPORT_BLACKLIST", "/etc/bindresvport.blacklist")
)
FIRST, LAST = 512, 1023  # the ports bindresvport() hands out


def read_blacklist(path: str | os.PathLike = BLACKLIST) -> set[int]:
    """The ports the file lists, one per line, '#' comments; a missing file lists none."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return set()
    ports = set()
    for line in text.splitlines():
        word = line.split("#", 1)[0].strip()
        if word.isdigit() and 0 < int(word) < 65536:
            ports.add(int(word))
    return ports


def exposed(
    reserved: Iterable[int], deny_errno: int | None, blacklist: set[int] | None = None
) -> list[int]:
    """Reserved ports bindresvport() may try and give up at: none while refusals are
    EADDRINUSE; else those in 512-1023 missing from the blacklist."""
    if deny_errno in (None, errno.EADDRINUSE):
        return []
    listed = read_blacklist() if blacklist is None else blacklist
    return sorted({port for port in reserved if FIRST <= port <= LAST} - listed)


def warning(ports: list[int], errno_name: str, path: str | os.PathLike = BLACKLIST) -> str:
    """What to do about exposed ports, naming each one."""
    names = ", ".join(map(str, ports))
    return (
        f"refused binds see {errno_name}, not EADDRINUSE, and bindresvport() gives up on that "
        f"instead of moving on (rpcbind, rpc.statd and NFS daemons would fail to start) except "
        f"at the ports {path} lists; add the reserved port(s) {names} to it, one per line"
    )
