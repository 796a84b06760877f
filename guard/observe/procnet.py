"""Which ports are held in this network namespace: the cheap first look apply takes (at boot)
before anything heavier, and the sock_diag request both this and holders.py speak. Imports
nothing of portguard's, and of the standard library only what an unchanged re-apply
(guard/quick.py, which compares the sockets on reserved ports) can afford: not socket.py,
whose enums cost ~5 ms, nor pathlib."""

from __future__ import annotations

import _socket
import os
import struct

PROC_NET = "/proc/net"
IPPROTO_TCP, IPPROTO_UDP = 6, 17

# include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h
NLMSG_HDRLEN = 16
INET_DIAG_MSG_LEN = 72  # struct inet_diag_msg, after which a reply's attributes start
_INET_DIAG_SOCKID_LEN = 48  # ports, addresses, interface, cookie
# in inet_diag_msg: family, state, timer, retrans, the socket id, expires, rqueue, wqueue, uid
_INET_DIAG_INODE = 4 + _INET_DIAG_SOCKID_LEN + 16
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
RECV_BYTES = 1 << 16
SS_LISTEN = 10


def bound_ports(proc_net: str = PROC_NET) -> set[tuple[int, str]]:
    """(port, protocol) pairs that a listening TCP or a bound UDP socket holds in this network
    namespace: a cheap first look before the full sock_diag query of holders.py (apply runs at
    boot). TCP sockets bound without listen() are not counted here; holders() sees them.

    Listening TCP sockets come from sock_diag, asked for the LISTEN state only: the kernel then
    walks its listening hash alone, where reading /proc/net/tcp and tcp6 walks the whole
    established hash too (~5 ms of CPU each on a host with a large one). UDP comes from
    /proc/net (one table, cheap). Without sock_diag, /proc/net/tcp{,6} it is."""
    try:
        found = {(port, "tcp") for port in listening_tcp_ports()}
    except OSError:
        found = proc_net_ports(proc_net, ("tcp", "tcp6"))
    return found | proc_net_ports(proc_net, ("udp", "udp6"))


def proc_net_ports(proc_net: str, names: tuple[str, ...]) -> set[tuple[int, str]]:
    """(port, protocol) of the listening TCP / bound UDP sockets in /proc/net/NAME files."""
    return {(port, name[:3]) for name, port, _ in proc_net_sockets(proc_net, names)}


def proc_net_sockets(proc_net: str, names: tuple[str, ...]) -> set[tuple[str, int, int]]:
    """(file name, port, inode) of the listening TCP / bound UDP sockets in /proc/net/NAME."""
    found: set[tuple[str, int, int]] = set()
    for name in names:
        try:
            with open(os.path.join(proc_net, name)) as table:
                lines = table.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or (name.startswith("tcp") and fields[3] != "0A"):  # 0A: LISTEN
                continue
            inode = int(fields[9]) if len(fields) > 9 else 0
            found.add((name, int(fields[1].rsplit(":", 1)[1], 16), inode))
    return found


def listening_tcp_ports() -> set[int]:
    """Local ports of the listening TCP sockets (IPv4 and IPv6) of this network namespace."""
    return {port for port, _ in listening_tcp_sockets()}


def listening_tcp_sockets() -> list[tuple[int, int]]:
    """(local port, inode) of the listening TCP sockets (IPv4 and IPv6) of this namespace."""
    found: list[tuple[int, int]] = []
    nl = _socket.socket(
        _socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )
    try:
        nl.bind((0, 0))
        for seq, family in enumerate((_socket.AF_INET, _socket.AF_INET6), start=1):
            nl.sendall(diag_request(family, IPPROTO_TCP, 1 << SS_LISTEN, seq))
            done = False
            while not done:
                data = nl.recv(RECV_BYTES)
                offsets, done = diag_replies(data, seq)
                for offset in offsets:  # inet_diag_msg: family, state, timer, retrans, sport
                    msg = offset + NLMSG_HDRLEN
                    (port,) = struct.unpack_from(">H", data, msg + 4)
                    (inode,) = struct.unpack_from("=I", data, msg + _INET_DIAG_INODE)
                    found.append((port, inode))
    finally:
        nl.close()
    return found


def reserved_sockets(reserved: list[tuple[int, int]]) -> frozenset[tuple[int, int, int]]:
    """(protocol, port, socket inode) of the listening TCP and bound UDP sockets on reserved
    (protocol, port) pairs, taken as bound_ports takes them."""
    wanted = set(reserved)
    found = {(IPPROTO_TCP, port, inode) for port, inode in listening_tcp_sockets()}
    for _, port, inode in proc_net_sockets(PROC_NET, ("udp", "udp6")):
        found.add((IPPROTO_UDP, port, inode))
    return frozenset(item for item in found if item[:2] in wanted)


def diag_request(family: int, ipproto: int, states: int, seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request: nlmsghdr + struct inet_diag_req_v2 (every socket of
    the family and protocol in the given states; the socket id left empty)."""
    request = struct.pack("=BBBBI", family, ipproto, 0, 0, states) + bytes(_INET_DIAG_SOCKID_LEN)
    flags = _NLM_F_REQUEST | _NLM_F_DUMP
    return struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + request


def diag_replies(data: bytes, seq: int) -> tuple[list[int], bool]:
    """The offsets of the socket replies (nlmsghdr + inet_diag_msg) in one receive buffer of
    dump `seq`, and whether the dump is done. A netlink error (e.g. a kernel without
    inet_diag for this family) raises OSError."""
    offsets: list[int] = []
    offset = 0
    while offset + NLMSG_HDRLEN <= len(data):
        length, msg_type, _, msg_seq, _ = struct.unpack_from("=IHHII", data, offset)
        if length < NLMSG_HDRLEN:
            break
        if msg_seq == seq:
            if msg_type == _NLMSG_DONE:
                return offsets, True
            if msg_type == _NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", data, offset + NLMSG_HDRLEN)
                if error:
                    raise OSError(-error, f"sock_diag: {os.strerror(-error)}")
                return offsets, True
            if msg_type == SOCK_DIAG_BY_FAMILY and length >= NLMSG_HDRLEN + INET_DIAG_MSG_LEN:
                offsets.append(offset)
        offset += (length + 3) & ~3
    return offsets, False
