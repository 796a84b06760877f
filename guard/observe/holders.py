"""Who holds a port right now, and whether that holder is one of its owners (else: a squatter).

Sockets: sock_diag sockets mapped to processes, cgroups and units.

The kernel is asked through sock_diag (a netlink dump spoken here with struct and socket, no
library) for the sockets that occupy a local port in the current network namespace. Each answer
carries the socket inode and ``INET_DIAG_CGROUP_ID``, the cgroup the socket was created in (not
necessarily the cgroup its process lives in now), read from the reply's attribute list
(``cgroup_id_attribute``).

Inodes are mapped to processes by one scan of ``/proc/*/fd``, cgroup ids to paths by one walk of
the cgroup2 tree; both only when there is something to map, and both stop as soon as everything
asked for is found, so a call with no holders costs four netlink round trips.

Owners or squatters: a holder is an owner when the socket was created in an owner cgroup (or
below it) AND the process holding it lives in an owner cgroup (or below) now. The first half is
what sock_diag reports (INET_DIAG_CGROUP_ID is fixed at socket creation); the second catches a
process that was moved out of the owner's cgroup with the port still open, or a socket handed to
another process. Every other holder is a squatter: it bound the port before the guard was loaded
(or was moved out since) and keeps the port until it closes it; the guard cannot take it back.
Holders are read in the calling process's network namespace: callers check that it is the
guarded one.
"""

from __future__ import annotations

import _socket as socket  # socket.py's enums cost ~5 ms of CPU of every status and apply
import os
import struct

from guard.kernel.cgroups import CgroupError, cgroup2_mount, unit_of_cgroup
from guard.observe.procnet import (
    INET_DIAG_MSG_LEN,
    NETLINK_SOCK_DIAG,
    NLMSG_HDRLEN,
    RECV_BYTES,
    SS_LISTEN,
    diag_replies,
    diag_request,
)
from guard.tuples import NamedTuple

TYPE_CHECKING = False  # annotations only: collections.abc would import collections, and
if TYPE_CHECKING:  # apply's squatter look needs nothing of the state status reads
    from collections.abc import Iterable, Sequence

    from guard.observe.state import GuardState

PROC = "/proc"  # a str, and no pathlib: the apply that finds a holder imports this module

# include/uapi/linux/inet_diag.h: the attribute's type (a u64); a reply is struct nlmsghdr then
# struct inet_diag_msg, after which the attributes start (the request: procnet.py).
INET_DIAG_CGROUP_ID = 21
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

_SS_ESTABLISHED = 1
_SS_CLOSE = 7
# TCP_BOUND_INACTIVE (Linux 6.3+): a pseudo-state that must be asked for explicitly and makes
# the kernel also dump TCP sockets that are bound but neither listening nor connected (they are
# reported with state CLOSE). Older kernels ignore the bit, so such sockets are then not seen.
_SS_BOUND_INACTIVE = 13

# A TCP socket holds its port for others' bind() when it listens or is merely bound. Connected
# sockets also sit on their local port, but nearly all of them are accepted children of a
# listener (already reported) or clients on ephemeral ports, so listing them would bury the
# answer.
_TCP_HOLDING_STATES = (1 << SS_LISTEN) | (1 << _SS_BOUND_INACTIVE)
# Every UDP socket in the table is bound: unconnected ones are CLOSE, connected ones ESTABLISHED.
_UDP_HOLDING_STATES = (1 << _SS_CLOSE) | (1 << _SS_ESTABLISHED)

_PROTOCOLS = {
    "tcp": (socket.IPPROTO_TCP, _TCP_HOLDING_STATES),
    "udp": (socket.IPPROTO_UDP, _UDP_HOLDING_STATES),
}


class Holder(NamedTuple):
    """One socket that occupies a local port, and what it belongs to.

    ``pid``/``comm`` name the lowest-numbered process that has the socket open (for a forking
    server that is normally the parent, for a socket-activated service PID 1); both are None when
    no process has it open or it could not be read. ``cgroup``/``unit`` describe the cgroup the
    socket was created in, None when that cgroup is gone or cgroup2 is not mounted.
    """

    port: int
    protocol: str
    family: int
    address: str
    pid: int | None
    comm: str | None
    cgroup_id: int
    cgroup: str | None
    unit: str | None
    inode: int


class _Socket(NamedTuple):
    port: int
    protocol: str
    family: int
    address: str
    inode: int
    cgroup_id: int


def holders(
    ports: Iterable[tuple[int, str]] | None = None,
    *,
    cgroup_root: str | os.PathLike | None = None,
    listening: bool = False,
) -> list[Holder]:
    """Return the TCP and UDP sockets holding local ports in this network namespace.

    ``ports`` limits the answer to the given (port, "tcp"|"udp") pairs; None means every port.
    ``cgroup_root`` is the cgroup2 mount that cgroup paths are made relative to; by default it is
    found in /proc/self/mountinfo. Sorted by port, protocol, family, address and pid.
    ``listening``: TCP sockets that listen, not those merely bound (apply's look, see find).
    """
    return _holders_and_cgroups(ports, cgroup_root, listening)[0]


def _holders_and_cgroups(
    ports: Iterable[tuple[int, str]] | None,
    cgroup_root: str | os.PathLike | None,
    listening: bool,
) -> tuple[list[Holder], dict[int, str | None]]:
    """holders(), and the cgroup each holding process lives in now (pid -> path, None when
    gone), read once for both the sockets' cgroup paths and classify."""
    wanted = None if ports is None else {(port, protocol) for port, protocol in ports}
    protocols = _PROTOCOLS if wanted is None else {p for _, p in wanted}
    unknown = set(protocols) - set(_PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s): {', '.join(sorted(unknown))}")
    if not protocols:
        return [], {}

    sockets = [
        sock
        for sock in _dump_sockets(sorted(protocols), listening)
        if wanted is None or (sock.port, sock.protocol) in wanted
    ]
    if not sockets:
        return [], {}

    owners = socket_owners({sock.inode for sock in sockets})
    # where the holding processes live now: nearly always where their sockets were made
    now = {pid: process_cgroup(pid) for pid, _ in owners.values()}
    likely = {path for path in now.values() if path is not None}
    paths = cgroup_paths({sock.cgroup_id for sock in sockets}, cgroup_root, likely)
    result = []
    for sock in sockets:
        pid, comm = owners.get(sock.inode, (None, None))
        cgroup = paths.get(sock.cgroup_id)
        result.append(
            Holder(
                port=sock.port,
                protocol=sock.protocol,
                family=sock.family,
                address=sock.address,
                pid=pid,
                comm=comm,
                cgroup_id=sock.cgroup_id,
                cgroup=cgroup,
                unit=None if cgroup is None else unit_of_cgroup(cgroup),
                inode=sock.inode,
            )
        )
    result.sort(key=lambda h: (h.port, h.protocol, h.family, h.address, h.pid or 0, h.inode))
    return result, now


def _dump_sockets(protocols: Iterable[str], listening: bool = False) -> list[_Socket]:
    """Ask sock_diag for the port-holding sockets of the given protocols, IPv4 and IPv6: one
    netlink dump per protocol and family, spoken directly (struct, socket). Importing
    pyroute2 for this cost ~270 ms of CPU, more than the rest of `status` together.

    Port filtering happens in Python: a dump of listening/bound sockets is small. Asked for TCP
    sockets bound but not listening, the kernel walks its whole bind hash (~1.2 ms of CPU per
    family with 65,536 buckets); asked for listening ones alone (listening), only the
    listening hash.
    """
    found: list[_Socket] = []
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        nl.bind((0, 0))
        seq = 0
        for protocol in protocols:
            ipproto, states = _PROTOCOLS[protocol]
            if listening and protocol == "tcp":
                states = 1 << SS_LISTEN
            for family in (socket.AF_INET, socket.AF_INET6):
                seq += 1
                nl.sendall(diag_request(family, ipproto, states, seq))
                done = False
                while not done:
                    done = parse_diag_replies(nl.recv(RECV_BYTES), protocol, seq, found)
    finally:
        nl.close()
    return found


def parse_diag_replies(data: bytes, protocol: str, seq: int, found: list[_Socket]) -> bool:
    """Append the sockets of one receive buffer of a dump to found; True once the dump is
    done. A netlink error (e.g. a kernel without inet_diag for this family) raises OSError."""
    offsets, done = diag_replies(data, seq)
    found.extend(_diag_socket(data, offset, protocol) for offset in offsets)
    return done


def _diag_socket(data: bytes, offset: int, protocol: str) -> _Socket:
    """One struct inet_diag_msg (after its nlmsghdr at offset) as a _Socket."""
    body = offset + NLMSG_HDRLEN
    family = data[body]
    (port,) = struct.unpack_from(">H", data, body + 4)
    source = data[body + 8 : body + 8 + (4 if family == socket.AF_INET else 16)]
    (inode,) = struct.unpack_from("=I", data, body + 68)
    return _Socket(
        port=port,
        protocol=protocol,
        family=family,
        address=socket.inet_ntop(family, source),
        inode=inode,
        cgroup_id=cgroup_id_attribute(data, offset),
    )


def cgroup_id_attribute(data: bytes, offset: int = 0) -> int:
    """INET_DIAG_CGROUP_ID of the sock_diag reply message at ``offset`` in ``data`` (a receive
    buffer may hold several), read from its attribute list; 0 when it has none."""
    (length,) = struct.unpack_from("=I", data, offset)
    end = min(offset + length, len(data))
    position = offset + NLMSG_HDRLEN + INET_DIAG_MSG_LEN
    while position + 4 <= end:
        attr_length, attr_type = struct.unpack_from("=HH", data, position)
        if attr_length < 4:
            break  # malformed: the kernel never sends one, stop rather than loop
        if attr_type & _NLA_TYPE_MASK == INET_DIAG_CGROUP_ID and attr_length >= 12:
            return struct.unpack_from("=Q", data, position + 4)[0]
        position += (attr_length + 3) & ~3
    return 0


def socket_owners(
    inodes: set[int], *, proc_root: str | os.PathLike = PROC
) -> dict[int, tuple[int, str | None]]:
    """Map socket inodes to (pid, comm) of the lowest-numbered process that has them open.

    One pass over ``proc_root/*/fd``, in pid order, ending once every inode is found. Processes
    that exit meanwhile or cannot be read (not root) are skipped; their sockets stay unmapped.
    """
    if not inodes:
        return {}
    targets = {f"socket:[{inode}]": inode for inode in inodes}
    owners: dict[int, tuple[int, str | None]] = {}
    try:
        pids = sorted(int(name) for name in os.listdir(proc_root) if name.isdigit())
    except OSError:
        return owners
    for pid in pids:
        try:  # each link read relative to the open directory: half the CPU of a path each
            fd_dir = os.open(os.path.join(proc_root, str(pid), "fd"), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            comm = None
            for fd in os.listdir(fd_dir):
                try:
                    inode = targets.get(os.readlink(fd, dir_fd=fd_dir))
                except OSError:
                    continue
                if inode is None or inode in owners:
                    continue
                if comm is None:
                    comm = _read_comm(proc_root, pid)
                owners[inode] = (pid, comm)
        except OSError:
            continue
        finally:
            os.close(fd_dir)
        if len(owners) == len(inodes):
            break
    return owners


def _read_comm(proc_root: str | os.PathLike, pid: int) -> str | None:
    """Return /proc/PID/comm, or None if the process has gone."""
    try:
        return _read_text(os.path.join(proc_root, str(pid), "comm")).rstrip("\n")
    except OSError:
        return None


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def cgroup_paths(
    ids: set[int], cgroup_root: str | os.PathLike | None, likely: Iterable[str] = ()
) -> dict[int, str]:
    """Map cgroup ids to paths relative to the cgroup2 root ("/" for the root itself).

    A cgroup2 directory's inode number is its cgroup id, so one walk of the tree, stopped as soon
    as every id is found, answers all of them. Ids of removed cgroups stay unmapped. The
    paths in likely (those of the holding processes) are tried first, one stat each: on a
    host with thousands of cgroups the walk is then rarely needed.
    """
    ids = {cgroup_id for cgroup_id in ids if cgroup_id}
    if not ids:
        return {}
    if cgroup_root is None:
        try:
            cgroup_root = cgroup2_mount()
        except CgroupError:
            return {}
    paths: dict[int, str] = {}
    try:
        root_inode = os.stat(cgroup_root).st_ino

    except OSError:
        return paths
    if root_inode in ids:
        paths[root_inode] = "/"
    for path in likely:
        try:
            inode = os.stat(f"{cgroup_root}{path}" if path != "/" else cgroup_root).st_ino
        except OSError:
            continue
        if inode in ids:
            paths[inode] = path
    pending = [(str(cgroup_root), "")]
    while pending and len(paths) < len(ids):
        directory, relative = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    path = f"{relative}/{entry.name}"
                    if entry.inode() in ids:
                        paths[entry.inode()] = path
                    pending.append((entry.path, path))
        except OSError:
            continue  # removed while walking
    return paths


# ---- owners and squatters ---------------------------------------------------------------

FAMILY_NAMES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


class HolderState(NamedTuple):
    """One socket on a reserved port. ``cgroup``/``unit`` are where the holding process lives
    now (the socket's creation cgroup when no process is known); ``socket_cgroup`` is where
    the socket was created."""

    pid: int | None
    comm: str | None
    cgroup: str | None
    unit: str | None
    owner: bool
    family: str
    address: str
    socket_cgroup: str | None


class Squatter(NamedTuple):
    port: int
    protocol: str
    holder: HolderState


def within(cgroup: str, owner: str) -> bool:
    """Whether cgroup is the owner cgroup or below it (paths relative to the cgroup2 root)."""
    return owner == "/" or cgroup == owner or cgroup.startswith(owner.rstrip("/") + "/")


def process_cgroup(pid: int, proc_root: str | os.PathLike = PROC) -> str | None:
    """The cgroup2 path of a process now ("0::" line of /proc/PID/cgroup), None if gone."""
    try:
        lines = _read_text(os.path.join(proc_root, str(pid), "cgroup")).splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def classify(
    holder: Holder,
    owners: Sequence[str],
    proc_root: str | os.PathLike = PROC,
    now: dict[int, str | None] | None = None,
) -> HolderState:
    """now: the holding processes' cgroups, read already (_holders_and_cgroups)."""
    if now is not None and holder.pid in now:
        current = now[holder.pid]
    else:
        current = process_cgroup(holder.pid, proc_root) if holder.pid else None
    known = [c for c in (holder.cgroup, current) if c is not None]
    is_owner = bool(known) and all(any(within(c, o) for o in owners) for c in known)
    cgroup = current or holder.cgroup
    return HolderState(
        pid=holder.pid,
        comm=holder.comm,
        cgroup=cgroup,
        unit=unit_of_cgroup(cgroup) if cgroup else None,
        owner=is_owner,
        family=FAMILY_NAMES.get(holder.family, str(holder.family)),
        address=holder.address,
        socket_cgroup=holder.cgroup,
    )


def holder_states(
    reservations: Iterable[tuple[int, str, Sequence[str]]],
    proc_root: str | os.PathLike = PROC,
    listening: bool = False,
) -> dict[tuple[int, str], list[HolderState]]:
    """(port, protocol) -> its holders, for reservations given as (port, protocol, owner
    cgroup paths). Ports nobody holds are absent. listening: as holders() takes it."""
    owners_of = {(port, protocol): owners for port, protocol, owners in reservations}
    if not owners_of:
        return {}
    found: dict[tuple[int, str], list[HolderState]] = {}
    found_holders, now = _holders_and_cgroups(owners_of, None, listening)
    for holder in found_holders:
        key = (holder.port, holder.protocol)
        state = classify(holder, owners_of[key], proc_root, now if proc_root == PROC else None)
        found.setdefault(key, []).append(state)
    return found


def find(reservations: Iterable[tuple[int, str, Sequence[str]]]) -> list[Squatter]:
    """The holders of reserved ports that are not owners, as apply looks at them (every boot):
    the holders of listening TCP and bound UDP sockets, the ports procnet.bound_ports found
    held. A TCP socket merely bound (not listening) is left to `status`, whose look costs the
    kernel a walk of its whole bind hash."""
    return [
        Squatter(port, protocol, h)
        for (port, protocol), states in sorted(holder_states(reservations, listening=True).items())
        for h in states
        if not h.owner
    ]


def with_holders(
    state: GuardState, current_netns_cookie: int, current_netns_ino: int | None = None
) -> GuardState:
    """The state with each reservation's holders, when read from the guarded network
    namespace (a guard with no namespace filter is checked in the caller's). The namespace
    is known by its cookie, or by its inode where the guard knows it so (the
    security_socket_bind road, where kernels before 5.14 give no cookie)."""
    if not state.loaded or (state.netns_cookie and state.netns_cookie != current_netns_cookie):
        return state
    if state.netns_ino and current_netns_ino is not None and state.netns_ino != current_netns_ino:
        return state
    found = holder_states(
        (r.port, r.protocol, [o.cgroup for o in r.owners]) for r in state.reservations
    )
    reservations = tuple(
        r._replace(holders=tuple(found.get((r.port, r.protocol), ()))) for r in state.reservations
    )
    return state._replace(reservations=reservations, holders_checked=True)


def of_state(state: GuardState) -> list[Squatter]:
    return [
        Squatter(r.port, r.protocol, h)
        for r in state.reservations
        for h in r.holders
        if not h.owner
    ]
