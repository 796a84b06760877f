"""The only module that talks to libbpf: load the object, pin, attach, read and write maps.

libbpf.so.1 (Debian's libbpf1, which bcc links too) is reached through ctypes; nothing here
compiles anything, so a host needs neither LLVM nor kernel headers to load the guard.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_FUNC_get_netns_cookie = 122
BPF_FUNC_get_current_ancestor_cgroup_id = 123
BPF_FUNC_set_retval = 187
BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_INET_EGRESS = 1
BPF_CGROUP_INET4_BIND = 8
BPF_CGROUP_INET6_BIND = 9
BPF_ANY = 0
BPF_NOEXIST = 1
LINK_TYPE_RAW_TRACEPOINT = 1  # tp_btf programs attached with bpf_raw_tracepoint_open
LINK_TYPE_TRACING = 2
LINK_TYPE_CGROUP = 3
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BIND_ATTACH_TYPES = {"bind4": BPF_CGROUP_INET4_BIND, "bind6": BPF_CGROUP_INET6_BIND}
PACKET_ATTACH_TYPES = {"ingress": BPF_CGROUP_INET_INGRESS, "egress": BPF_CGROUP_INET_EGRESS}
BATCH = 4096  # elements per batched map syscall
ENOTSUPP = 524  # the kernel's internal "operation not supported", seen by user space
NO_BATCH = {errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP}


class BpfError(OSError):
    """A bpf() operation failed; the message says which and why."""


# Test hook for the fault tests (tests/kernel/test_faults.py): with PORTGUARD_FAULT_AFTER=N
# in the environment, the process SIGKILLs itself right after its N-th state-changing step
# (map write or delete, load, pin, unpin, attach, link update, sysctl write), so every step of
# apply and remove can be interrupted. Unset (always, outside tests) it is one comparison.
_FAULT_AFTER = int(os.environ.get("PORTGUARD_FAULT_AFTER") or 0)
_steps = 0


def step() -> None:
    """Count one state-changing step (and die here when the fault hook says so)."""
    global _steps
    _steps += 1
    if _FAULT_AFTER and _steps >= _FAULT_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


_LIB: C.CDLL | None = None
_LOG: list[str] = []
_PRINT_FN = C.CFUNCTYPE(C.c_int, C.c_int, C.c_char_p, C.c_void_p)
_RING_SAMPLE_FN = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p, C.c_size_t)


@_PRINT_FN
def _collect_libbpf_log(level: int, fmt: bytes, args: int) -> int:
    buf = C.create_string_buffer(1024)
    _libc().vsnprintf(buf, len(buf), fmt, C.c_void_p(args))
    _LOG.append(buf.value.decode(errors="replace"))
    del _LOG[:-200]
    return 0


def _libc() -> C.CDLL:
    libc = C.CDLL(None, use_errno=True)
    libc.vsnprintf.argtypes = [C.c_char_p, C.c_size_t, C.c_char_p, C.c_void_p]
    return libc


def lib() -> C.CDLL:
    """libbpf, loaded once, with argument types declared."""
    global _LIB
    if _LIB is not None:
        return _LIB
    try:
        bpf = C.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise BpfError(
            errno.ENOENT, "libbpf.so.1 not found: install libbpf1 (apt install libbpf1)"
        ) from exc
    P, INT, U32, VP = C.c_void_p, C.c_int, C.c_uint32, C.c_void_p
    sigs = {
        "bpf_object__open_file": (P, [C.c_char_p, P]),
        "bpf_object__load": (INT, [P]),
        "bpf_object__close": (None, [P]),
        "bpf_object__find_program_by_name": (P, [P, C.c_char_p]),
        "bpf_object__find_map_by_name": (P, [P, C.c_char_p]),
        "bpf_program__fd": (INT, [P]),
        "bpf_program__set_autoload": (INT, [P, C.c_bool]),
        "bpf_map__fd": (INT, [P]),
        "bpf_map__set_pin_path": (INT, [P, C.c_char_p]),
        "bpf_obj_pin": (INT, [INT, C.c_char_p]),
        "bpf_obj_get": (INT, [C.c_char_p]),
        "bpf_link_create": (INT, [INT, INT, INT, P]),
        "bpf_link_update": (INT, [INT, INT, P]),
        "bpf_raw_tracepoint_open": (INT, [C.c_char_p, INT]),
        "bpf_map_update_elem": (INT, [INT, VP, VP, C.c_uint64]),
        "bpf_map_lookup_elem": (INT, [INT, VP, VP]),
        "bpf_map_delete_elem": (INT, [INT, VP]),
        "bpf_map_get_next_key": (INT, [INT, VP, VP]),
        "bpf_map_lookup_batch": (INT, [INT, VP, VP, VP, VP, C.POINTER(U32), P]),
        "bpf_map_update_batch": (INT, [INT, VP, VP, C.POINTER(U32), P]),
        "bpf_map_delete_batch": (INT, [INT, VP, C.POINTER(U32), P]),
        "bpf_obj_get_info_by_fd": (INT, [INT, VP, C.POINTER(U32)]),
        "bpf_prog_get_fd_by_id": (INT, [U32]),
        "bpf_link_get_fd_by_id": (INT, [U32]),
        "libbpf_probe_bpf_helper": (INT, [INT, INT, P]),
        "libbpf_num_possible_cpus": (INT, []),
        "libbpf_set_print": (P, [_PRINT_FN]),
        "ring_buffer__new": (P, [INT, _RING_SAMPLE_FN, P, P]),
        "ring_buffer__poll": (INT, [P, INT]),
        "ring_buffer__free": (None, [P]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(bpf, name)
        fn.restype = restype
        fn.argtypes = argtypes
    bpf.libbpf_set_print(_collect_libbpf_log)
    _LIB = bpf
    return bpf


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = C.get_errno() or -ret
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def libbpf_log_tail(lines: int = 15) -> str:
    return "".join(_LOG[-lines:])


def close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


def possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "counting possible CPUs")


def has_set_retval() -> bool:
    """Whether cgroup sock_addr programs may call bpf_set_retval (Linux >= 5.18)."""
    return (
        lib().libbpf_probe_bpf_helper(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_FUNC_set_retval, None)
        == 1
    )


@dataclass(frozen=True)
class Features:
    """What the running kernel offers the guard (see lifecycle.check_features)."""

    set_retval: bool = True  # bpf_set_retval in bind programs (5.18)
    netns_cookie: bool = True  # bpf_get_netns_cookie in bind programs (5.7)
    ancestor_cgroup: bool = True  # bpf_get_current_ancestor_cgroup_id in bind programs (5.7)
    bpf_link: bool = True  # BPF_LINK_CREATE for cgroup programs (5.7)
    btf: bool = True  # /sys/kernel/btf/vmlinux: CO-RE and tp_btf trackers (5.5)


def _helper(func: int) -> bool:
    return lib().libbpf_probe_bpf_helper(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, func, None) == 1


def _has_bpf_link() -> bool:
    # With bad fds a kernel that knows BPF_LINK_CREATE says EBADF; one that does not, EINVAL.
    if lib().bpf_link_create(-1, -1, BPF_CGROUP_INET4_BIND, None) >= 0:
        return True
    return C.get_errno() == errno.EBADF


def probe_features() -> Features:
    return Features(
        set_retval=has_set_retval(),
        netns_cookie=_helper(BPF_FUNC_get_netns_cookie),
        ancestor_cgroup=_helper(BPF_FUNC_get_current_ancestor_cgroup_id),
        bpf_link=_has_bpf_link(),
        btf=VMLINUX_BTF.exists(),
    )


def object_kind(fd: int) -> tuple[str, str]:
    """("link", "cgroup"), ("map", "1"), ("prog", "18")...: what a bpf fd is, from fdinfo."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("link_type", "map_type", "prog_type"):
            return key.removesuffix("_type"), value.strip()
    return "other", "?"


def has_packet_netns_cookie() -> bool:
    """Whether cgroup_skb programs may call bpf_get_netns_cookie, which containment needs to
    leave other network namespaces alone (accepted on 6.18; older kernels refuse it)."""
    return (
        lib().libbpf_probe_bpf_helper(BPF_PROG_TYPE_CGROUP_SKB, BPF_FUNC_get_netns_cookie, None)
        == 1
    )


@dataclass
class LoadedObject:
    """A loaded (verified) object: program fds by name, map fds by name. Owns the fds."""

    handle: int
    programs: dict[str, int]
    maps: dict[str, int]

    def close(self) -> None:
        lib().bpf_object__close(self.handle)


def load_object(
    path: Path, maps_dir: Path, programs: list[str], maps: list[str], skip: tuple[str, ...] = ()
) -> LoadedObject:
    """Load and verify the object; its maps are reused from maps_dir when pinned there
    (same layout), else created and pinned there. Programs named in skip are not loaded
    (this kernel would refuse them)."""
    bpf = lib()
    _LOG.clear()
    handle = bpf.bpf_object__open_file(str(path).encode(), None)
    if not handle:
        err = C.get_errno()
        raise BpfError(err, f"opening BPF object {path}: {os.strerror(err)}")
    try:
        map_fds_pending = {}
        for name in maps:
            m = bpf.bpf_object__find_map_by_name(handle, name.encode())
            if not m:
                raise BpfError(errno.ENOENT, f"map {name} missing from {path}")
            _check(
                bpf.bpf_map__set_pin_path(m, str(maps_dir / name).encode()), f"pin path for {name}"
            )
            map_fds_pending[name] = m
        for name in skip:
            p = bpf.bpf_object__find_program_by_name(handle, name.encode())
            if p:
                _check(bpf.bpf_program__set_autoload(p, False), f"not loading {name}")
        ret = bpf.bpf_object__load(handle)
        if ret < 0:
            err = C.get_errno() or -ret
            raise BpfError(
                err, f"loading BPF programs failed: {os.strerror(err)}\n{libbpf_log_tail()}"
            )
        prog_fds = {}
        for name in programs:
            if name in skip:
                continue
            p = bpf.bpf_object__find_program_by_name(handle, name.encode())
            if not p:
                raise BpfError(errno.ENOENT, f"program {name} missing from {path}")
            prog_fds[name] = _check(bpf.bpf_program__fd(p), f"fd of {name}")
        map_fds = {
            name: _check(bpf.bpf_map__fd(m), f"fd of {name}") for name, m in map_fds_pending.items()
        }
    except BaseException:
        bpf.bpf_object__close(handle)
        raise
    step()
    return LoadedObject(handle, prog_fds, map_fds)


def pin(fd: int, path: Path) -> None:
    _check(lib().bpf_obj_pin(fd, str(path).encode()), f"pinning {path}")
    step()


def unpin(path: Path) -> bool:
    """Remove a pin (an unpinned link detaches once no fd holds it); False when absent."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    step()
    return True


def rename_pin(source: Path, target: Path) -> None:
    """Move a pin or a pin directory; an existing target pin is replaced in the same step."""
    os.replace(source, target)
    step()


def get_pinned(path: Path) -> int | None:
    """fd of the object pinned at path, or None when nothing is pinned there."""
    fd = lib().bpf_obj_get(str(path).encode())
    if fd < 0:
        err = C.get_errno()
        if err == errno.ENOENT:
            return None
        raise BpfError(err, f"opening pinned {path}: {os.strerror(err)}")
    return fd


def attach_cgroup(prog_fd: int, cgroup_dir: Path, attach_type: int) -> int:
    """A bpf_link from the program to the cgroup (multi-attach semantics: programs of
    descendant cgroups run too and cannot override it). Returns the link fd."""
    cg_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _check(
            lib().bpf_link_create(prog_fd, cg_fd, attach_type, None),
            f"attaching to cgroup {cgroup_dir}",
        )
    finally:
        os.close(cg_fd)
    step()
    return fd


def attach_tracing(prog_fd: int) -> int:
    """A raw tracepoint link for a tp_btf program; returns the link fd."""
    fd = _check(lib().bpf_raw_tracepoint_open(None, prog_fd), "attaching tracepoint program")
    step()
    return fd


def update_link(link_fd: int, prog_fd: int) -> None:
    """Swap the link's program in one step: no instant without a program."""
    _check(lib().bpf_link_update(link_fd, prog_fd, None), "replacing program of link")
    step()


def _info(fd: int, size: int) -> bytes:
    buf = C.create_string_buffer(size)
    length = C.c_uint32(size)
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, C.byref(length)), "reading object info")
    return buf.raw


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    cgroup_id: int | None
    attach_type: int | None


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 48)
    link_type, link_id, prog_id = (int.from_bytes(raw[o : o + 4], "little") for o in (0, 4, 8))
    if link_type == LINK_TYPE_CGROUP:
        return LinkInfo(
            link_id,
            link_type,
            prog_id,
            int.from_bytes(raw[16:24], "little"),
            int.from_bytes(raw[24:28], "little"),
        )
    return LinkInfo(link_id, link_type, prog_id, None, None)


def prog_map_ids(prog_id: int) -> set[int]:
    """Ids of the maps a loaded program uses."""
    fd = _check(lib().bpf_prog_get_fd_by_id(prog_id), f"opening program {prog_id}")
    try:
        count = int.from_bytes(_info(fd, 64)[52:56], "little")  # bpf_prog_info.nr_map_ids
        ids = (C.c_uint32 * max(count, 1))()
        buf = C.create_string_buffer(64)
        C.memmove(C.addressof(buf) + 52, C.byref(C.c_uint32(count)), 4)
        C.memmove(C.addressof(buf) + 56, C.byref(C.c_uint64(C.addressof(ids))), 8)
        length = C.c_uint32(64)
        _check(lib().bpf_obj_get_info_by_fd(fd, buf, C.byref(length)), "reading program info")
        return set(ids[:count])
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 88)
    u32 = [int.from_bytes(raw[o : o + 4], "little") for o in (0, 4, 8, 12, 16)]
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(u32[1], u32[0], u32[2], u32[3], u32[4], name)


class Map:
    """A map seen through the ctypes key/value types of guard.layout."""

    def __init__(self, fd: int, key_type: type, value_type: type, percpu: bool = False):
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        self.ncpu = possible_cpus() if percpu else 1

    def lookup(self, key) -> object | None:
        """The value (a list of per-CPU values for per-CPU maps), or None."""
        key = self._key(key)
        buf = (self.value_type * self.ncpu)()
        if lib().bpf_map_lookup_elem(self.fd, C.byref(key), buf) < 0:
            err = C.get_errno()
            if err == errno.ENOENT:
                return None
            raise BpfError(err, f"map lookup: {os.strerror(err)}")
        return list(buf) if self.percpu else buf[0]

    def update(self, key, value, flags: int = BPF_ANY) -> bool:
        """Write one element; False when BPF_NOEXIST found it present."""
        key = self._key(key)
        if not isinstance(value, self.value_type):
            value = self.value_type(value)
        if self.percpu:
            values = (self.value_type * self.ncpu)(*([value] * self.ncpu))
        else:
            values = value
        if lib().bpf_map_update_elem(self.fd, C.byref(key), C.byref(values), flags) < 0:
            err = C.get_errno()
            if err == errno.EEXIST and flags == BPF_NOEXIST:
                return False
            raise BpfError(err, f"map update: {os.strerror(err)}")
        step()
        return True

    def delete(self, key) -> bool:
        key = self._key(key)
        if lib().bpf_map_delete_elem(self.fd, C.byref(key)) < 0:
            err = C.get_errno()
            if err == errno.ENOENT:
                return False
            raise BpfError(err, f"map delete: {os.strerror(err)}")
        step()
        return True

    def keys(self) -> list:
        """All keys (copies), read in batches."""
        return [key for key, _ in self.items()]

    def items(self) -> list[tuple[object, object]]:
        """All (key, value) pairs, read in batches of BATCH elements per syscall (Linux >=
        5.6; older kernels: one element at a time). Structures are views into the batch
        buffers (no per-element copy); keys of plain integer types come as key_type
        instances, values as lookup() returns them."""
        bpf = lib()
        value_type = self.value_type * self.ncpu if self.percpu else self.value_type
        token_size = max(C.sizeof(self.key_type), 8)  # hash maps: a bucket index; arrays: a key
        tokens = [C.create_string_buffer(token_size), C.create_string_buffer(token_size)]
        pairs: list[tuple[object, object]] = []
        first = True
        while True:
            keys = (self.key_type * BATCH)()
            values = (value_type * BATCH)()
            count = C.c_uint32(BATCH)
            ret = bpf.bpf_map_lookup_batch(
                self.fd, None if first else tokens[0], tokens[1], keys, values, C.byref(count), None
            )
            err = C.get_errno() if ret < 0 else 0
            if err in NO_BATCH and first:
                return self._walk()
            if err not in (0, errno.ENOENT):
                raise BpfError(err, f"map batch read: {os.strerror(err)}")
            batch_keys = keys[: count.value]
            if issubclass(self.key_type, C._SimpleCData):
                batch_keys = [self.key_type(k) for k in batch_keys]
            batch_values = values[: count.value]
            if self.percpu:
                batch_values = [list(v) for v in batch_values]
            pairs.extend(zip(batch_keys, batch_values, strict=True))
            if err == errno.ENOENT:  # that was the last batch
                return pairs
            tokens.reverse()
            first = False

    def _walk(self) -> list[tuple[object, object]]:
        """items() one element at a time: get_next_key, then lookup."""
        bpf = lib()
        found = []
        prev = None
        while True:
            nxt = self.key_type()
            ret = bpf.bpf_map_get_next_key(
                self.fd, C.byref(prev) if prev is not None else None, C.byref(nxt)
            )
            if ret < 0:
                err = C.get_errno()
                if err == errno.ENOENT:
                    break
                raise BpfError(err, f"map walk: {os.strerror(err)}")
            found.append(nxt)
            prev = nxt
        pairs = []
        for key in found:
            value = self.lookup(key)
            if value is not None:
                pairs.append((key, value))
        return pairs

    def update_many(self, keys: list, values: list) -> None:
        """Write many elements (BPF_ANY), BATCH per syscall where the kernel can. Keys and
        values as ctypes instances, ints or field tuples (PortKey fields: (slot, proto, port))."""
        bpf = lib()
        for start in range(0, len(keys), BATCH):
            n = len(keys[start : start + BATCH])
            key_buf = (self.key_type * n)(*keys[start : start + BATCH])
            value_buf = (self.value_type * n)(*values[start : start + BATCH])
            if self.percpu or not self._batch(bpf.bpf_map_update_batch, key_buf, value_buf, n):
                for i in range(n):
                    self.update(key_buf[i], value_buf[i])

    def delete_many(self, keys: list) -> int:
        """Delete these keys, BATCH per syscall where the kernel can; keys already gone
        (a cgroup tracker may delete meanwhile) are skipped. Returns how many were deleted."""
        bpf = lib()
        deleted = 0
        pending = [self._key(k) for k in keys]
        while pending:
            chunk = pending[:BATCH]
            buf = (self.key_type * len(chunk))(*chunk)
            count = C.c_uint32(len(chunk))
            if bpf.bpf_map_delete_batch(self.fd, buf, C.byref(count), None) == 0:
                step()
                deleted += len(chunk)
                pending = pending[len(chunk) :]
                continue
            err = C.get_errno()
            if err in NO_BATCH:
                return deleted + sum(self.delete(k) for k in pending)
            if err != errno.ENOENT:
                raise BpfError(err, f"map batch delete: {os.strerror(err)}")
            deleted += count.value  # the element after those is gone already: skip it
            pending = pending[count.value + 1 :]
        return deleted

    def _batch(self, fn, keys, values, n: int) -> bool:
        """One batched write; False when the kernel has no batch operations for this map."""
        count = C.c_uint32(n)
        if fn(self.fd, keys, values, C.byref(count), None) == 0:
            step()
            return True
        err = C.get_errno()
        if err in NO_BATCH and count.value == 0:
            return False
        raise BpfError(err, f"map batch write: {os.strerror(err)}")

    def _key(self, key):
        return key if isinstance(key, self.key_type) else self.key_type(key)


_STOP_POLL = -errno.ECANCELED


class RingBuffer:
    """The consumer of a BPF ring buffer map: poll() hands every record, as bytes, to
    on_record, which returns False to end the poll after that record. The map has one
    consumer position, so one consumer at a time."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], bool]):
        self._on_record = on_record
        self._failure: BaseException | None = None
        self._callback = _RING_SAMPLE_FN(self._sample)  # kept alive as long as the buffer
        self._handle = lib().ring_buffer__new(map_fd, self._callback, None, None)
        if not self._handle:
            err = C.get_errno()
            raise BpfError(err, f"opening the event ring buffer: {os.strerror(err)}")

    def _sample(self, _ctx: int, data: int, size: int) -> int:
        try:
            go_on = self._on_record(C.string_at(data, size))
        except BaseException as exc:  # noqa: BLE001 - raised again in poll(): a callback cannot raise
            self._failure = exc
            return _STOP_POLL  # the record counts as consumed
        return 0 if go_on else _STOP_POLL

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records and consume all that are there: their number."""
        ret = lib().ring_buffer__poll(self._handle, timeout_ms)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if ret in (-errno.EINTR, _STOP_POLL):  # a signal, or on_record said enough
            return 0
        return _check(ret, "polling the event ring buffer")

    def close(self) -> None:
        if self._handle:
            lib().ring_buffer__free(self._handle)
            self._handle = None
