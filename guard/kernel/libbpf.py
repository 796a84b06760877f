"""The only module that talks to libbpf: load the object, pin, attach, read and write maps,
read the object's BTF.

libbpf.so.1 (Debian's libbpf1, which bcc links too) is reached through ctypes; nothing here
compiles anything, so a host needs neither LLVM nor kernel headers to load the guard.
"""

from __future__ import annotations

import ctypes as C
import errno
import os

from guard.tuples import NamedTuple

TYPE_CHECKING = False  # annotations only: collections.abc would import collections
if TYPE_CHECKING:
    from collections.abc import Callable

BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_TRACING = 26
BPF_MODIFY_RETURN = 26  # the attach type of fmod_ret programs
BTF_KIND_FUNC = 12
SOCKET_BIND_HOOK = "security_socket_bind"
BPF_FUNC_get_netns_cookie = 122
BPF_FUNC_get_current_ancestor_cgroup_id = 123
BPF_FUNC_set_retval = 187
BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_INET_EGRESS = 1
BPF_CGROUP_INET4_BIND = 8
BPF_CGROUP_INET6_BIND = 9
BPF_ANY = 0
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_NOEXIST = 1
BPF_F_MMAPABLE = 1 << 10  # an array whose values user space may mmap
LINK_TYPE_RAW_TRACEPOINT = 1  # raw_tp (and tp_btf) programs, bpf_raw_tracepoint_open
LINK_TYPE_TRACING = 2
LINK_TYPE_CGROUP = 3
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

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
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_LIB: C.CDLL | None = None
_LOG: list[str] = []
_PRINT_FN = C.CFUNCTYPE(C.c_int, C.c_int, C.c_char_p, C.c_void_p)
_RING_SAMPLE_FN = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p, C.c_size_t)


LIBBPF_DEBUG = 2  # enum libbpf_print_level: WARN 0, INFO 1, DEBUG 2


@_PRINT_FN
def _collect_libbpf_log(level: int, fmt: bytes, args: int) -> int:
    """Keep libbpf's warnings and notes (a failed load's verifier log is a warning); its ~400
    debug lines per load are not even formatted (a vsnprintf through ctypes each: ~5 ms of a
    boot's apply in a cProfile, which inflates Python calls; not measured without it)."""
    if level >= LIBBPF_DEBUG:
        return 0
    buf = C.create_string_buffer(1024)
    _libc().vsnprintf(buf, len(buf), fmt, C.c_void_p(args))
    _LOG.append(buf.value.decode(errors="replace"))
    del _LOG[:-200]
    return 0


_LIBC: C.CDLL | None = None


def _libc() -> C.CDLL:
    """The C library, loaded once (libbpf calls the log callback hundreds of times a load)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = C.CDLL(None, use_errno=True)
        _LIBC.vsnprintf.argtypes = [C.c_char_p, C.c_size_t, C.c_char_p, C.c_void_p]
    return _LIBC


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
        "bpf_map__set_max_entries": (INT, [P, U32]),
        "bpf_obj_pin": (INT, [INT, C.c_char_p]),
        "bpf_obj_get": (INT, [C.c_char_p]),
        "bpf_link_create": (INT, [INT, INT, INT, P]),
        "bpf_link_update": (INT, [INT, INT, P]),
        "bpf_raw_tracepoint_open": (INT, [C.c_char_p, INT]),
        "bpf_prog_load": (INT, [INT, C.c_char_p, C.c_char_p, VP, C.c_size_t, P]),
        "btf__load_vmlinux_btf": (P, []),
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
        "bpf_object__next_program": (P, [P, P]),
        "bpf_object__next_map": (P, [P, P]),
        "bpf_object__btf": (P, [P]),
        "bpf_program__name": (C.c_char_p, [P]),
        "bpf_program__section_name": (C.c_char_p, [P]),
        "bpf_map__name": (C.c_char_p, [P]),
        "bpf_map__type": (INT, [P]),
        "bpf_map__key_size": (U32, [P]),
        "bpf_map__value_size": (U32, [P]),
        "bpf_map__max_entries": (U32, [P]),
        "bpf_map__map_flags": (U32, [P]),
        "bpf_map__btf_key_type_id": (U32, [P]),
        "bpf_map__btf_value_type_id": (U32, [P]),
        "bpf_map__is_internal": (C.c_bool, [P]),
        "bpf_map_create": (INT, [INT, C.c_char_p, U32, U32, U32, P]),
        "btf__type_cnt": (U32, [P]),
        "btf__type_by_id": (P, [P, U32]),
        "btf__name_by_offset": (C.c_char_p, [P, U32]),
        "btf__parse": (P, [C.c_char_p, P]),
        "btf__free": (None, [P]),
        "btf__find_by_name_kind": (INT, [P, C.c_char_p, U32]),
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


class Features(NamedTuple):
    """What the running kernel offers the guard (see lifecycle.check_features)."""

    set_retval: bool = True  # bpf_set_retval in bind programs (5.18)
    netns_cookie: bool = True  # bpf_get_netns_cookie in bind programs (5.7)
    ancestor_cgroup: bool = True  # bpf_get_current_ancestor_cgroup_id in bind programs (5.7)
    bpf_link: bool = True  # BPF_LINK_CREATE for cgroup programs (5.7)
    btf: bool = True  # /sys/kernel/btf/vmlinux: CO-RE, which the trackers need (5.5)


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
        btf=os.path.exists(VMLINUX_BTF),
    )


class _ProgLoadOpts(C.Structure):
    """The leading fields of libbpf's struct bpf_prog_load_opts (sz says how many)."""

    _fields_ = [
        ("sz", C.c_size_t),
        ("attempts", C.c_int),
        ("expected_attach_type", C.c_uint32),
        ("prog_btf_fd", C.c_uint32),
        ("prog_flags", C.c_uint32),
        ("prog_ifindex", C.c_uint32),
        ("kern_version", C.c_uint32),
        ("attach_btf_id", C.c_uint32),
    ]


# r0 = 0; exit: an fmod_ret program that changes nothing
_RETURN_ZERO = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


def hook_refusal() -> str | None:
    """Why this kernel refuses an fmod_ret program on security_socket_bind, or None when one
    loads and attaches. The probe attaches a program that returns 0 (every bind goes on as
    if it were not there) and detaches it at once; a process killed meanwhile takes it along."""
    bpf = lib()
    if not os.path.exists(VMLINUX_BTF):
        return f"it has no kernel BTF ({VMLINUX_BTF})"
    btf = bpf.btf__load_vmlinux_btf()
    if not btf:
        return f"its BTF cannot be read: {os.strerror(C.get_errno())}"
    try:
        func = bpf.btf__find_by_name_kind(btf, SOCKET_BIND_HOOK.encode(), BTF_KIND_FUNC)
    finally:
        bpf.btf__free(btf)
    if func <= 0:
        return f"its BTF has no function {SOCKET_BIND_HOOK} (CONFIG_SECURITY_NETWORK off?)"
    opts = _ProgLoadOpts(
        sz=C.sizeof(_ProgLoadOpts), expected_attach_type=BPF_MODIFY_RETURN, attach_btf_id=func
    )
    insns = C.create_string_buffer(_RETURN_ZERO, len(_RETURN_ZERO))
    prog = bpf.bpf_prog_load(BPF_PROG_TYPE_TRACING, b"pg_probe", b"GPL", insns, 2, C.byref(opts))
    if prog < 0:
        return f"loading an fmod_ret program failed: {os.strerror(C.get_errno() or -prog)}"
    try:
        link = bpf.bpf_raw_tracepoint_open(None, prog)
        if link < 0:
            return f"attaching an fmod_ret program failed: {os.strerror(C.get_errno() or -link)}"
        os.close(link)
    finally:
        os.close(prog)
    return None


def object_kind(fd: int) -> tuple[str, str]:
    """("link", "cgroup"), ("map", "1"), ("prog", "18")...: what a bpf fd is, from fdinfo."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        lines = f.read().splitlines()
    for line in lines:
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


class IncompatiblePinnedMap(BpfError):
    """A map pinned where the object's map would be pinned has another definition (type,
    key or value size, max entries or flags): libbpf would refuse to reuse it."""

    def __init__(self, name: str, path: str, differences: list[str]):
        super().__init__(
            errno.EINVAL,
            f"the map pinned at {path} is not the object's {name}: " + ", ".join(differences),
        )
        self.name = name
        self.path = path


class LoadedObject:
    """A loaded (verified) object: program fds by name, map fds by name. Owns the fds."""

    __slots__ = ("handle", "programs", "maps", "core_btf")

    def __init__(
        self,
        handle: int,
        programs: dict[str, int],
        maps: dict[str, int],
        core_btf: str | None = None,
    ) -> None:
        self.handle = handle
        self.programs = programs
        self.maps = maps
        self.core_btf = core_btf  # the minimal BTF the relocations used; None: the kernel's

    def close(self) -> None:
        lib().bpf_object__close(self.handle)


def _programs(handle: int) -> dict[str, int]:
    """name -> struct bpf_program * of every program of an opened object."""
    bpf, found, prog = lib(), {}, None
    while prog := bpf.bpf_object__next_program(handle, prog):
        found[bpf.bpf_program__name(prog).decode()] = prog
    return found


def _maps(handle: int) -> dict[str, int]:
    """name -> struct bpf_map * of the object's own maps (not .rodata and the like)."""
    bpf, found, m = lib(), {}, None
    while m := bpf.bpf_object__next_map(handle, m):
        if not bpf.bpf_map__is_internal(m):
            found[bpf.bpf_map__name(m).decode()] = m
    return found


class _ObjectOpenOpts(C.Structure):
    """The leading fields of libbpf's struct bpf_object_open_opts (sz says how many)."""

    _fields_ = [
        ("sz", C.c_size_t),
        ("object_name", C.c_char_p),
        ("relaxed_maps", C.c_bool),
        ("pin_root_path", C.c_char_p),
        ("_attach_prog_fd", C.c_uint32),  # removed from libbpf, its room kept
        ("kconfig", C.c_char_p),
        ("btf_custom_path", C.c_char_p),
    ]


def _open_object(path: str, core_btf: str | None = None) -> int:
    """Open (not load) the object; core_btf, when given, is the BTF libbpf resolves the CO-RE
    relocations against instead of the kernel's (/sys/kernel/btf/vmlinux)."""
    opts = None
    if core_btf is not None:
        opts = C.byref(
            _ObjectOpenOpts(sz=C.sizeof(_ObjectOpenOpts), btf_custom_path=str(core_btf).encode())
        )
    handle = lib().bpf_object__open_file(str(path).encode(), opts)
    if not handle:
        err = C.get_errno()
        raise BpfError(err, f"opening BPF object {path}: {os.strerror(err)}")
    return handle


def _check_reusable(name: str, m: int, path: str) -> None:
    """Raise IncompatiblePinnedMap when a map pinned at path differs from the object's map
    (what libbpf compares before it reuses a pinned map)."""
    fd = get_pinned(path)
    if fd is None:
        return
    try:
        info = map_info(fd)
    finally:
        os.close(fd)
    bpf = lib()
    want = {
        "type": bpf.bpf_map__type(m),
        "key_size": bpf.bpf_map__key_size(m),
        "value_size": bpf.bpf_map__value_size(m),
        "max_entries": bpf.bpf_map__max_entries(m),
        "map_flags": bpf.bpf_map__map_flags(m),
    }
    differences = [
        f"{field} {getattr(info, field)} instead of {value}"
        for field, value in want.items()
        if getattr(info, field) != value
    ]
    if differences:
        raise IncompatiblePinnedMap(name, path, differences)


def load_object(
    path: str,
    maps_dir: str,
    skip: tuple[str, ...] = (),
    sizes: dict[str, int] | None = None,
    pinned_at: dict[str, str] | None = None,
    core_btf: str | None = None,
) -> LoadedObject:
    """Load and verify the object; each of its maps is reused from maps_dir when pinned
    there, else created and pinned there (IncompatiblePinnedMap when a pinned one differs);
    a map named in pinned_at lives at that path instead.
    Programs named in skip are not loaded (the other denial style, or programs this kernel
    would refuse); maps named in sizes get that max_entries instead of the object's.
    core_btf, when given, is a minimal BTF of the running kernel for the CO-RE relocations
    (guard/kernel/corebtf.py): a load that fails with it is done again with the kernel's
    own BTF (LoadedObject.core_btf says which one served). Program and map names are the
    object's own."""
    if core_btf is not None:
        try:
            return _load(path, maps_dir, skip, sizes, pinned_at, core_btf)
        except IncompatiblePinnedMap:
            raise
        except BpfError:  # a damaged or foreign minimal BTF; a failed load unpinned its maps
            pass
    return _load(path, maps_dir, skip, sizes, pinned_at, None)


def _load(
    path: str,
    maps_dir: str,
    skip: tuple[str, ...],
    sizes: dict[str, int] | None,
    pinned_at: dict[str, str] | None,
    core_btf: str | None,
) -> LoadedObject:
    bpf = lib()
    _LOG.clear()
    handle = _open_object(path, core_btf)
    try:
        maps = _maps(handle)
        for name, entries in (sizes or {}).items():
            if name in maps:
                _check(bpf.bpf_map__set_max_entries(maps[name], entries), f"sizing {name}")
        for name, m in maps.items():
            pin_path = (pinned_at or {}).get(name) or os.path.join(maps_dir, name)
            _check_reusable(name, m, pin_path)
            _check(bpf.bpf_map__set_pin_path(m, str(pin_path).encode()), f"pin path for {name}")
        programs = _programs(handle)
        for name in skip:
            if name in programs:
                _check(bpf.bpf_program__set_autoload(programs[name], False), f"not loading {name}")
        ret = bpf.bpf_object__load(handle)
        if ret < 0:
            err = C.get_errno() or -ret
            raise BpfError(
                err, f"loading BPF programs failed: {os.strerror(err)}\n{libbpf_log_tail()}"
            )
        prog_fds = {
            name: _check(bpf.bpf_program__fd(prog), f"fd of {name}")
            for name, prog in programs.items()
            if name not in skip
        }
        map_fds = {name: _check(bpf.bpf_map__fd(m), f"fd of {name}") for name, m in maps.items()}
    except BaseException:
        bpf.bpf_object__close(handle)
        raise
    step()
    return LoadedObject(handle, prog_fds, map_fds, core_btf)


def wait_for_programs() -> None:
    """Return once every BPF program that was running when called has finished (an RCU
    grace period: programs run under rcu_read_lock). The kernel waits so for an update
    of a map-in-map, to tell user space that no program still uses the old inner map;
    a throwaway outer map gives the same guarantee here, on every kernel configuration."""
    bpf = lib()
    inner = _check(
        bpf.bpf_map_create(BPF_MAP_TYPE_ARRAY, b"pg_grace", 4, 4, 1, None), "creating a map"
    )
    try:
        opts = _MapCreateOpts(sz=C.sizeof(_MapCreateOpts), inner_map_fd=inner)
        outer = _check(
            bpf.bpf_map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, b"pg_grace", 4, 4, 1, C.byref(opts)),
            "creating a map-in-map",
        )
        try:
            key, value = C.c_uint32(0), C.c_uint32(inner)
            _check(
                bpf.bpf_map_update_elem(outer, C.byref(key), C.byref(value), BPF_ANY),
                "waiting for running BPF programs",
            )
        finally:
            os.close(outer)
    finally:
        os.close(inner)


class _MapCreateOpts(C.Structure):
    _fields_ = [
        ("sz", C.c_size_t),
        ("btf_fd", C.c_uint32),
        ("btf_key_type_id", C.c_uint32),
        ("btf_value_type_id", C.c_uint32),
        ("btf_vmlinux_value_type_id", C.c_uint32),
        ("inner_map_fd", C.c_uint32),
        ("map_flags", C.c_uint32),
        ("map_extra", C.c_uint64),
        ("numa_node", C.c_uint32),
        ("map_ifindex", C.c_uint32),
    ]


def pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, str(path).encode()), f"pinning {path}")
    step()


def unpin(path: str) -> bool:
    """Remove a pin (an unpinned link detaches once no fd holds it); False when absent."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    step()
    return True


def rename_pin(source: str, target: str) -> None:
    """Move a pin or a pin directory; an existing target pin is replaced in the same step."""
    os.replace(source, target)
    step()


def get_pinned(path: str) -> int | None:
    """fd of the object pinned at path, or None when nothing is pinned there."""
    fd = lib().bpf_obj_get(str(path).encode())
    if fd < 0:
        err = C.get_errno()
        if err == errno.ENOENT:
            return None
        raise BpfError(err, f"opening pinned {path}: {os.strerror(err)}")
    return fd


def attach_cgroup(prog_fd: int, cgroup_dir: str, attach_type: int) -> int:
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


def attach_tracing(prog_fd: int, tracepoint: str | None = None) -> int:
    """A link for a raw_tp program on the named tracepoint, or (tracepoint None) for an
    fmod_ret program on the function it was loaded for; returns the link fd."""
    name = tracepoint.encode() if tracepoint else None
    fd = _check(
        lib().bpf_raw_tracepoint_open(name, prog_fd),
        f"attaching to tracepoint {tracepoint}" if tracepoint else "attaching tracing program",
    )
    step()
    return fd


def update_link(link_fd: int, prog_fd: int) -> None:
    """Swap the link's program in one step: no instant without a program."""
    _check(lib().bpf_link_update(link_fd, prog_fd, None), "replacing program of link")
    step()


class _LinkCgroup(C.Structure):
    _fields_ = [("cgroup_id", C.c_uint64), ("attach_type", C.c_uint32)]


class _LinkDetails(C.Union):
    _fields_ = [("cgroup", _LinkCgroup), ("_size", C.c_uint8 * 32)]


class LinkInfo(C.Structure):
    """struct bpf_link_info (UAPI), as far as portguard reads it."""

    _anonymous_ = ("details",)
    _fields_ = [
        ("type", C.c_uint32),
        ("id", C.c_uint32),
        ("prog_id", C.c_uint32),
        ("details", _LinkDetails),  # 8-aligned: offset 16
    ]


class ProgInfo(C.Structure):
    """struct bpf_prog_info (UAPI) up to the program's name."""

    _fields_ = [
        ("type", C.c_uint32),
        ("id", C.c_uint32),
        ("tag", C.c_uint8 * 8),
        ("jited_prog_len", C.c_uint32),
        ("xlated_prog_len", C.c_uint32),
        ("jited_prog_insns", C.c_uint64),
        ("xlated_prog_insns", C.c_uint64),
        ("load_time", C.c_uint64),
        ("created_by_uid", C.c_uint32),
        ("nr_map_ids", C.c_uint32),
        ("map_ids", C.c_uint64),  # user pointer to nr_map_ids u32s
        ("name", C.c_char * 16),
    ]


class MapInfo(C.Structure):
    """struct bpf_map_info (UAPI)."""

    _fields_ = [
        ("type", C.c_uint32),
        ("id", C.c_uint32),
        ("key_size", C.c_uint32),
        ("value_size", C.c_uint32),
        ("max_entries", C.c_uint32),
        ("map_flags", C.c_uint32),
        ("name", C.c_char * 16),
        ("ifindex", C.c_uint32),
        ("btf_vmlinux_value_type_id", C.c_uint32),
        ("netns_dev", C.c_uint64),
        ("netns_ino", C.c_uint64),
        ("btf_id", C.c_uint32),
        ("btf_key_type_id", C.c_uint32),
        ("btf_value_type_id", C.c_uint32),
        ("_pad", C.c_uint32),
        ("map_extra", C.c_uint64),
    ]


def _info(fd: int, info: C.Structure) -> C.Structure:
    length = C.c_uint32(C.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(length)), "reading object info")
    return info


def link_info(fd: int) -> LinkInfo:
    """The link's type, id and program; for cgroup links (type LINK_TYPE_CGROUP) also
    .cgroup.cgroup_id and .cgroup.attach_type."""
    return _info(fd, LinkInfo())


def prog_info(fd: int) -> ProgInfo:
    return _info(fd, ProgInfo())


def prog_map_ids(prog_id: int) -> set[int]:
    """Ids of the maps a loaded program uses."""
    fd = _check(lib().bpf_prog_get_fd_by_id(prog_id), f"opening program {prog_id}")
    try:
        count = prog_info(fd).nr_map_ids
        ids = (C.c_uint32 * max(count, 1))()
        info = ProgInfo(nr_map_ids=count, map_ids=C.addressof(ids))
        _info(fd, info)
        return set(ids[: min(count, info.nr_map_ids)])
    finally:
        os.close(fd)


def map_info(fd: int) -> MapInfo:
    return _info(fd, MapInfo())


def reopen_program(prog_id: int) -> int:
    """A new fd of the loaded program with this id."""
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"reopening program {prog_id}")


# ---- the object's BTF: what the compiled object says the contract is -----------------------

BTF_INT, BTF_PTR, BTF_ARRAY, BTF_STRUCT, BTF_UNION, BTF_ENUM = 1, 2, 3, 4, 5, 6
BTF_TYPEDEF, BTF_VOLATILE, BTF_CONST, BTF_RESTRICT, BTF_TYPE_TAG = 8, 9, 10, 11, 18
_BTF_QUALIFIERS = (BTF_TYPEDEF, BTF_VOLATILE, BTF_CONST, BTF_RESTRICT, BTF_TYPE_TAG)


class _BtfType(C.Structure):
    _fields_ = [("name_off", C.c_uint32), ("info", C.c_uint32), ("size_or_type", C.c_uint32)]


class _BtfArray(C.Structure):
    _fields_ = [("type", C.c_uint32), ("index_type", C.c_uint32), ("nelems", C.c_uint32)]


class _BtfMember(C.Structure):
    _fields_ = [("name_off", C.c_uint32), ("type", C.c_uint32), ("offset", C.c_uint32)]


class _BtfEnum(C.Structure):
    _fields_ = [("name_off", C.c_uint32), ("val", C.c_int32)]


class StructLayout(NamedTuple):
    size: int
    members: tuple[tuple[str, int, int], ...]  # (name, byte offset, byte size)


class MapDefinition(NamedTuple):
    type: int
    key: str  # BTF type name: "pg_port_key", "__u32"; "" when the map has no key type
    value: str
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


class ObjectDescription(NamedTuple):
    """An object's programs (name -> ELF section), maps, structs and enums, from its BTF."""

    programs: dict[str, str]
    maps: dict[str, MapDefinition]
    structs: dict[str, StructLayout]
    enums: dict[str, dict[str, int]]


class _Btf:
    def __init__(self, btf: int):
        self.btf = btf

    def type(self, type_id: int) -> _BtfType:
        return _BtfType.from_address(lib().btf__type_by_id(self.btf, type_id))

    def name(self, offset: int) -> str:
        return (lib().btf__name_by_offset(self.btf, offset) or b"").decode()

    @staticmethod
    def kind(t: _BtfType) -> int:
        return (t.info >> 24) & 0x1F

    def _after(self, t: _BtfType, record: type, count: int):
        return (record * count).from_address(C.addressof(t) + C.sizeof(_BtfType))

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        while self.kind(self.type(type_id)) in _BTF_QUALIFIERS:
            type_id = self.type(type_id).size_or_type
        return type_id

    def size(self, type_id: int) -> int:
        t = self.type(self.resolve(type_id))
        kind = self.kind(t)
        if kind == BTF_ARRAY:
            array = self._after(t, _BtfArray, 1)[0]
            return array.nelems * self.size(array.type)
        if kind == BTF_PTR:
            return 8
        return t.size_or_type

    def struct(self, t: _BtfType) -> StructLayout:
        kflag = t.info >> 31
        members = []
        for m in self._after(t, _BtfMember, t.info & 0xFFFF):
            bits = m.offset & 0xFFFFFF if kflag else m.offset
            members.append((self.name(m.name_off), bits // 8, self.size(m.type)))
        return StructLayout(t.size_or_type, tuple(members))

    def enum(self, t: _BtfType) -> dict[str, int]:
        values = self._after(t, _BtfEnum, t.info & 0xFFFF)
        return {self.name(e.name_off): e.val for e in values}


def describe_object(path: str) -> ObjectDescription:
    """Read an object's contract from its BTF, without loading it (no root needed)."""
    bpf = lib()
    handle = _open_object(path)
    try:
        raw = bpf.bpf_object__btf(handle)
        if not raw:
            raise BpfError(errno.ENOENT, f"{path} carries no BTF (built without -g?)")
        btf = _Btf(raw)
        structs, enums = {}, {}
        for type_id in range(1, bpf.btf__type_cnt(raw)):
            t = btf.type(type_id)
            name = btf.name(t.name_off)
            if not name:
                continue
            if btf.kind(t) == BTF_STRUCT:
                structs[name] = btf.struct(t)
            elif btf.kind(t) == BTF_ENUM:
                enums[name] = btf.enum(t)
        maps = {}
        for name, m in _maps(handle).items():
            key_id, value_id = bpf.bpf_map__btf_key_type_id(m), bpf.bpf_map__btf_value_type_id(m)
            maps[name] = MapDefinition(
                type=bpf.bpf_map__type(m),
                key=btf.name(btf.type(key_id).name_off) if key_id else "",
                value=btf.name(btf.type(value_id).name_off) if value_id else "",
                key_size=bpf.bpf_map__key_size(m),
                value_size=bpf.bpf_map__value_size(m),
                max_entries=bpf.bpf_map__max_entries(m),
                map_flags=bpf.bpf_map__map_flags(m),
            )
        programs = {
            name: bpf.bpf_program__section_name(prog).decode()
            for name, prog in _programs(handle).items()
        }
        return ObjectDescription(programs, maps, structs, enums)
    finally:
        bpf.bpf_object__close(handle)


def btf_structs(path: str, names: list[str]) -> dict[str, StructLayout]:
    """The named structs of a BTF file (the kernel's: /sys/kernel/btf/vmlinux); absent
    names are left out."""
    bpf = lib()
    raw = bpf.btf__parse(str(path).encode(), None)
    if not raw:
        err = C.get_errno()
        raise BpfError(err, f"reading BTF from {path}: {os.strerror(err)}")
    try:
        btf, found = _Btf(raw), {}
        for name in names:
            type_id = bpf.btf__find_by_name_kind(raw, name.encode(), BTF_STRUCT)
            if type_id > 0:
                found[name] = btf.struct(btf.type(type_id))
        return found
    finally:
        bpf.btf__free(raw)


class Map:
    """A map seen through the ctypes key/value types of guard.layout."""

    def __init__(self, fd: int, key_type: type, value_type: type, percpu: bool = False):
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        self.ncpu = possible_cpus() if percpu else 1
        self._max_entries: int | None = None
        self._mapped = None  # mmap.mmap, False (cannot be), None (not tried)

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

    def update_percpu(self, key, values: list) -> None:
        """Write one element of a per-CPU map, one value per possible CPU."""
        key = self._key(key)
        buf = (self.value_type * self.ncpu)(*values)
        if lib().bpf_map_update_elem(self.fd, C.byref(key), buf, BPF_ANY) < 0:
            err = C.get_errno()
            raise BpfError(err, f"map update: {os.strerror(err)}")
        step()

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

    @property
    def max_entries(self) -> int:
        if self._max_entries is None:
            self._max_entries = map_info(self.fd).max_entries
        return self._max_entries

    def read_range(self, start: int, count: int):
        """Values start .. start + count - 1 of an array map, as one ctypes array: copied from
        the map's memory when it is BPF_F_MMAPABLE (no syscall), else read in one batched
        syscall where the kernel can (Linux >= 5.6), else one element at a time."""
        memory = self._memory()
        if memory is not None:
            size = C.sizeof(self.value_type)  # elements are 8-byte aligned: see _memory
            return (
                (self.value_type * count).from_buffer_copy(memory, start * size)
                if (start + count) * size <= len(memory)
                else self._read_range(start, count)
            )
        return self._read_range(start, count)

    def _memory(self):
        """The array's values mapped read-only (mmap), or None when the map cannot be."""
        if self._mapped is None:
            self._mapped = False
            info = map_info(self.fd)
            self._max_entries = info.max_entries
            size = C.sizeof(self.value_type)
            if info.map_flags & BPF_F_MMAPABLE and size % 8 == 0 and not self.percpu:
                import mmap

                try:
                    self._mapped = mmap.mmap(
                        self.fd, info.max_entries * size, mmap.MAP_SHARED, mmap.PROT_READ
                    )
                except OSError:
                    pass
        return self._mapped or None

    def release(self) -> None:
        """Unmap the values, if mapped (the fd is the owner's to close)."""
        if self._mapped:
            self._mapped.close()
        self._mapped = None

    def _read_range(self, start: int, count: int):
        values = (self.value_type * count)()
        keys = (self.key_type * count)()
        prev = (self.key_type * 1)(start - 1) if start else None  # the batch starts after it
        out = (self.key_type * 1)()
        n = C.c_uint32(count)
        if lib().bpf_map_lookup_batch(self.fd, prev, out, keys, values, C.byref(n), None) < 0:
            err = C.get_errno()
            if err in NO_BATCH and n.value == 0:
                for i in range(count):
                    found = self.lookup(start + i)
                    if found is not None:
                        values[i] = found
                return values
            if err != errno.ENOENT or n.value != count:
                raise BpfError(err, f"map batch read: {os.strerror(err)}")
        return values

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
