"""READY=1 to systemd: the guard is in force, the boot may go on.

portguard.service is Type=notify: systemd holds sysinit.target (and rpcbind, the network)
until `portguard apply` says READY=1, and apply says it the moment the guard is in force (the
transaction of guard/kernel/apply.py has returned: links attached and pinned, the active slot
flipped), before it writes its records and looks for squatters (guard/commands.py), or when
guard/quick.py finds the pinned guard to be the one asked for. The message goes to
$NOTIFY_SOCKET as sd_notify(3) sends it: one datagram on an AF_UNIX socket, a name starting
with '@' being in the abstract namespace. Without $NOTIFY_SOCKET (apply run by hand, or as
ExecReload=, which systemd gives none under NotifyAccess=main) nothing is sent.

_socket, not socket.py: its enums cost ~5 ms of CPU at every boot (guard/observe/procnet.py).
"""

from __future__ import annotations

import _socket
import os
import sys

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def ready() -> None:
    """Send READY=1 to $NOTIFY_SOCKET, once: the variable is taken out of the environment, so
    a second call and the programs apply runs send nothing. A socket that cannot be reached is
    said on stderr (the journal) and changes nothing else: the guard is in force either way,
    and systemd's start timeout then says the rest."""
    address = os.environ.pop(NOTIFY_SOCKET, "")
    if not address:
        return
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        try:
            sock.sendto(b"READY=1", address)
        finally:
            sock.close()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in a path name
        sys.stderr.write(f"portguard: cannot tell systemd the guard is in force: {exc}\n")
        sys.stderr.flush()
