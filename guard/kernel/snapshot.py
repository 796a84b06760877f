"""The pinned guard as identities: what an unchanged re-apply compares with what the last full
apply left (guard/quick.py), in well under a millisecond and without libbpf.

A snapshot is: the names in the pin directory and in each maps directory; for every pinned
link its bpf_link_info (the link's id, its program's id and where it is attached: the cgroup's
id, or the hook); for every pinned map its bpf_map_info (its id, type, sizes, flags); and the
values of the small arrays (state, config, meta: which slot is active, each slot's settings,
which object and road were loaded). The kernel never reuses an id while its object lives, so
an equal snapshot means: the same links, attached at the same places to the same programs,
reading the same maps, with the same active slot and settings. What only `apply` writes (the
slots' contents) is vouched for by the guard record being taken away, under the pin
directory's lock, before any apply or remove changes anything.

Only three bpf() commands are used, read-only, through the system call itself: BPF_OBJ_GET,
BPF_OBJ_GET_INFO_BY_FD and BPF_MAP_LOOKUP_ELEM. Loading libbpf (guard/kernel/libbpf.py, the
module that talks to libbpf) would cost as much as this whole check.
"""

from __future__ import annotations

import ctypes as C
import os
import sys

BPF_MAP_LOOKUP_ELEM = 1
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_TYPE_ARRAY = 2
SMALL_ARRAY = 4  # arrays of at most this many entries are read whole: state, config, meta
INFO_BYTES = 128  # more than bpf_link_info and bpf_map_info have; the kernel says how much
# the bpf() system call's number (asm/unistd.h); another machine: no snapshot, the full path
SYSCALLS = {
    "x86_64": 321,
    "aarch64": 280,
    "riscv64": 280,
    "loongarch64": 280,
    "armv7l": 386,
    "armv6l": 386,
    "i686": 357,
    "i386": 357,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
    "mips64": 5315,
}


SO_NETNS_COOKIE = 71


def parse_ports(text: str) -> set[int]:
    """The ports of net.ipv4.ip_local_reserved_ports as the kernel prints them ("1,5-9")."""
    ports: set[int] = set()
    for item in text.replace("\n", "").split(","):
        item = item.strip()
        if not item:
            continue
        low, _, high = item.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


def netns_cookie() -> int:
    """This network namespace's cookie, or 0 (guard every namespace) on kernels that cannot
    report it to userspace (SO_NETNS_COOKIE: Linux >= 5.14). Through _socket: socket.py's
    enums cost ~5 ms of CPU at every apply."""
    import _socket
    import errno

    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        raw = sock.getsockopt(_socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return 0
        raise
    finally:
        sock.close()
    return int.from_bytes(raw, sys.byteorder)


def netns_inode() -> int:
    """This network namespace's inode number (user space can read it on every kernel)."""
    return os.stat("/proc/self/ns/net").st_ino


class Unreadable(Exception):
    """The pinned guard cannot be read this way (a pin that is neither map nor link, a failed
    system call, an unknown machine): the caller takes the full path."""


_call = None


def _bpf(cmd: int, attr: C.Array) -> int:
    global _call
    if _call is None:
        number = SYSCALLS.get(os.uname().machine)
        if number is None:
            raise Unreadable(f"bpf() system call number unknown on {os.uname().machine}")
        syscall = C.CDLL(None, use_errno=True).syscall
        syscall.restype = C.c_long
        syscall.argtypes = [C.c_long, C.c_long, C.c_void_p, C.c_uint]
        _call = (syscall, number)
    syscall, number = _call
    ret = syscall(number, cmd, C.addressof(attr), C.sizeof(attr))
    if ret < 0:
        raise Unreadable(os.strerror(C.get_errno()))
    return ret


def _obj_get(path: str) -> int:
    name = C.create_string_buffer(path.encode())
    attr = (C.c_uint64 * 2)(C.addressof(name), 0)
    return _bpf(BPF_OBJ_GET, attr)


def _info(fd: int) -> bytes:
    info = C.create_string_buffer(INFO_BYTES)
    attr = (C.c_uint32 * 4)(fd, INFO_BYTES, 0, 0)
    C.c_uint64.from_buffer(attr, 8).value = C.addressof(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info.raw[: attr[1]]


def _lookup(fd: int, index: int, value_size: int) -> bytes:
    key = C.c_uint32(index)
    value = C.create_string_buffer(value_size)
    attr = (C.c_uint64 * 4)(fd, C.addressof(key), C.addressof(value), 0)
    _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    return value.raw


def _map(path: str) -> tuple:
    fd = _obj_get(path)
    try:
        info = _info(fd)
        # bpf_map_info: type, id, key_size, value_size, max_entries, ...
        kind, _, _, value_size, entries = (
            int.from_bytes(info[i : i + 4], sys.byteorder) for i in range(0, 20, 4)
        )
        values = ()
        if kind == BPF_MAP_TYPE_ARRAY and entries <= SMALL_ARRAY:
            values = tuple(_lookup(fd, i, value_size) for i in range(entries))
        return (info, values)
    finally:
        os.close(fd)


def _link(path: str) -> bytes:
    fd = _obj_get(path)
    try:
        return _info(fd)
    finally:
        os.close(fd)


def take(pin_dir: str) -> tuple:
    """The snapshot of the guard pinned in pin_dir (Unreadable when it cannot be taken)."""
    try:
        names = sorted(os.listdir(pin_dir))
        found = []
        for name in names:
            path = os.path.join(pin_dir, name)
            if name.startswith("maps-"):
                inner = sorted(os.listdir(path))
                found.append((name, tuple((m, _map(os.path.join(path, m))) for m in inner)))
            else:
                found.append((name, _link(path)))
    except OSError as exc:
        raise Unreadable(str(exc)) from None
    return tuple(found)
