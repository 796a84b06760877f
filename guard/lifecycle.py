"""apply / remove / read the guard: the plan meets the kernel here.

Every change of behaviour happens at one instant, the flip of state.active: apply fills the
inactive slot completely (config, owner paths, owner ids, owner sets, ports) and then flips.
Links are attached while the active slot is empty (no reservations), so attaching changes
nothing either. A process killed at any point leaves either the old guard or the new one.

Maps the bind links do not read (an older layout's, a half-created set, leftovers of a killed
run) are never trusted: apply loads fresh maps, fills them completely while the old links
keep enforcing, and only then swaps each bind link's program (bpf_link_update, one step per
address family). The trackers of the new maps are pinned beside the old ones until then,
and the old maps go last. The `meta` map's object digest is written last of all: while it
is stale the next apply redoes the whole load.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from guard import cgroups, kernel, layout, objects, sources, sysctl
from guard.config import Settings
from guard.plan import Plan

PROGRAMS = {
    "bind4": "portguard_bind4",
    "bind6": "portguard_bind6",
    "mkdir": "portguard_cgroup_mkdir",
    "rmdir": "portguard_cgroup_rmdir",
    "ingress": "portguard_ingress",
    "egress": "portguard_egress",
}
# Attached only while some reservation has contain on: without it no packet pays for them.
PACKET_LINKS = tuple(kernel.PACKET_ATTACH_TYPES)
CORE_LINKS = tuple(name for name in PROGRAMS if name not in PACKET_LINKS)
CGROUP_ATTACH_TYPES = {**kernel.BIND_ATTACH_TYPES, **kernel.PACKET_ATTACH_TYPES}
PERCPU_MAPS = {"denied", "contained", "lost"}
MAP_NAMES = [*layout.MAPS, "events", "scratch"]
BPF_FS_MAGIC_NAME = "bpf"
SO_NETNS_COOKIE = 71
LOCK_DIR = Path("/run/portguard")


class GuardError(RuntimeError):
    """A runtime failure, stated as one sentence for the user."""


@dataclass
class Pins:
    """Where everything lives in bpffs."""

    root: Path

    @property
    def maps_dir(self) -> Path:
        return self.root / f"maps-{layout.LAYOUT}"

    def link(self, name: str) -> Path:
        return self.root / f"link_{name}"

    def staged_link(self, name: str) -> Path:
        return self.root / f"link_{name}_new"  # bpffs refuses names with a dot

    def other_maps_dirs(self) -> list[Path]:
        """Maps of other layouts or retired ones: not what this version reads."""
        return sorted(d for d in self.root.glob("maps-*") if d != self.maps_dir)


class Maps:
    """The pinned maps, opened with their layout types. Owns the fds."""

    def __init__(self, fds: dict[str, int]):
        self.fds = fds
        self.by_name = {
            name: kernel.Map(fds[name], key, value, percpu=name in PERCPU_MAPS)
            for name, (key, value) in layout.MAPS.items()
        }

    def __getattr__(self, name: str) -> kernel.Map:
        try:
            return self.__dict__["by_name"][name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def open_pinned(cls, maps_dir: Path) -> Maps | None:
        """The complete set of maps of this layout, or None when any is missing or is not
        what the layout says (a half-created set, a foreign or damaged pin)."""
        fds: dict[str, int] = {}
        try:
            for name, (key, value) in layout.MAPS.items():
                fd = _open_map(maps_dir / name, key, value)
                if fd is None:
                    return None
                fds[name] = fd
        finally:
            if len(fds) < len(layout.MAPS):
                for other in fds.values():
                    os.close(other)
        return cls(fds)

    def ids(self) -> set[int]:
        return {kernel.map_info(fd).id for fd in self.fds.values()}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    @property
    def active(self) -> int:
        st = self.state.lookup(0)
        return st.active & 1 if st else 0


def _open_map(path: Path, key: type, value: type) -> int | None:
    """fd of the map pinned at path when it has the layout's key and value sizes."""
    try:
        fd = kernel.get_pinned(path)
    except kernel.BpfError:
        return None
    if fd is None:
        return None
    kind, _ = kernel.object_kind(fd)
    if kind == "map":
        info = kernel.map_info(fd)
        if (info.key_size, info.value_size) == (C.sizeof(key), C.sizeof(value)):
            return fd
    os.close(fd)
    return None


def _bpffs_mounts(mounts: Path = cgroups.MOUNTS) -> list[Path]:
    found = []
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == BPF_FS_MAGIC_NAME:
            found.append(Path(fields[1]))
    return found


def _on_bpffs(path: Path, mounts: Path = cgroups.MOUNTS) -> bool:
    return any(path == m or m in path.parents for m in _bpffs_mounts(mounts))


def _mount(source: str, target: str, fstype: str, data: str) -> None:
    libc = C.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, data.encode()) != 0:
        err = C.get_errno()
        raise GuardError(f"cannot mount {fstype} at {target}: {os.strerror(err)}")


def preflight(
    settings: Settings, *, mount_bpffs: bool, mounts: Path = cgroups.MOUNTS
) -> tuple[Path, Path]:
    """Root, cgroup2, bpffs, the attach cgroup: (cgroup2 mount, attach dir) or GuardError."""
    if os.geteuid() != 0:
        raise GuardError("portguard must run as root: it loads BPF programs into the kernel")
    try:
        cgroups.require_initial_namespace()
        root = cgroups.cgroup2_mount(mounts)
    except cgroups.CgroupError as exc:
        raise GuardError(str(exc)) from None
    attach_dir = cgroups.directory(settings.cgroup, root)
    if not attach_dir.is_dir():
        raise GuardError(f"the attach cgroup {settings.cgroup} does not exist under {root}")
    pin_dir = Path(settings.pin_dir)
    if not _on_bpffs(pin_dir, mounts):
        default = Path("/sys/fs/bpf")
        if mount_bpffs and (pin_dir == default or default in pin_dir.parents) and default.is_dir():
            _mount("bpf", str(default), "bpf", "mode=0700")
        else:
            raise GuardError(
                f"{pin_dir} is not on a BPF file system (mount -t bpf bpf /sys/fs/bpf)"
            )
    return root, attach_dir


def netns_cookie() -> int:
    """This network namespace's cookie, or 0 (guard every namespace) on kernels that cannot
    report it to userspace (SO_NETNS_COOKIE: Linux >= 5.14)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as exc:
            if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                return 0
            raise
    return int.from_bytes(raw, "little")


NO_NETNS_COOKIE = (
    "this kernel cannot tell userspace its network namespace cookie (SO_NETNS_COOKIE, Linux >= "
    "5.14): the guard applies in every network namespace, containers with their own included"
)


def lock_path(pin_dir: Path, role: str = "") -> Path:
    """The lock file of one role (apply/remove, monitor, ...) for one pin directory."""
    try:
        LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        lock_dir = LOCK_DIR
    except OSError:
        lock_dir = Path("/tmp")
    name = sources.sha256(str(pin_dir).encode()).hexdigest()[:16]
    return lock_dir / f"portguard-{role + '-' if role else ''}{name}.lock"


@contextmanager
def _locked(pin_dir: Path) -> Iterator[None]:
    """One apply/remove at a time per pin directory."""
    with open(lock_path(pin_dir), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ---- slot contents -------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotContents:
    ports: dict[tuple[int, int], int]
    sets: dict[int, tuple[int, ...]]
    paths: dict[str, int]
    contained: frozenset[tuple[int, int]] = frozenset()


def read_slot(maps: Maps, slot: int, only: list[tuple[int, int]] | None = None) -> SlotContents:
    """The slot's contents; with `only` (protocol, port) pairs, just those ports, looked up
    one by one instead of walking every reservation."""
    if only is None:
        entries = [(k, v) for k, v in maps.ports.items() if k.slot == slot]
    else:
        keys = [layout.PortKey(slot, *pair) for pair in only]
        entries = [(key, value) for key in keys if (value := maps.ports.lookup(key)) is not None]
    ports = {(k.proto, k.port): v.set for k, v in entries}
    contained = frozenset((k.proto, k.port) for k, v in entries if v.flags & layout.PORT_CONTAIN)
    sets = {k.set: tuple(v.owner[: v.count]) for k, v in maps.sets.items() if k.slot == slot}
    paths = {k.path.decode(): v for k, v in maps.paths.items() if k.slot == slot}
    return SlotContents(ports, sets, paths, contained)


def _desired(plan: Plan) -> SlotContents:
    return SlotContents(
        dict(plan.ports), dict(plan.sets), {p: i for i, p in enumerate(plan.paths)}, plan.contained
    )


def _config_value(plan: Plan, cookie: int, variant: str) -> layout.Config:
    deny = plan.settings.deny_errno_number if variant == "retval" else 0
    mode = layout.MODE_AUDIT if plan.settings.mode == "audit" else layout.MODE_ENFORCE
    return layout.Config(cookie, deny, mode)


def _same_config(a: layout.Config | None, b: layout.Config) -> bool:
    return a is not None and (a.netns_cookie, a.deny_errno, a.mode) == (
        b.netns_cookie,
        b.deny_errno,
        b.mode,
    )


def clear_slot(maps: Maps, slot: int) -> None:
    """Paths first: once they are gone the cgroup trackers write no more owners of the slot."""
    for m in (maps.paths, maps.owners, maps.sets, maps.ports):
        m.delete_many([k for k in m.keys() if k.slot == slot])


def fill_slot(maps: Maps, slot: int, plan: Plan, cfg: layout.Config, cgroup_root: Path) -> None:
    maps.config.update(slot, cfg)
    for idx, path in enumerate(plan.paths):
        key = layout.PathKey(slot, path.encode())
        maps.paths.update(key, idx)
    # After the paths: a cgroup made from here on is recorded by the mkdir tracker; one that
    # exists already is seeded here. NOEXIST: never overwrite a newer id the tracker wrote.
    for idx, path in enumerate(plan.paths):
        cg_id = cgroups.cgroup_id(path, cgroup_root)
        if cg_id is not None:
            maps.owners.update(
                layout.OwnerKey(slot, idx),
                layout.OwnerVal(cg_id, cgroups.level(path), 0),
                kernel.BPF_NOEXIST,
            )
    for set_id, members in plan.sets.items():
        value = layout.SetVal(len(members))
        for i, member in enumerate(members):
            value.owner[i] = member
        maps.sets.update(layout.SetKey(slot, set_id), value)
    flags = {pair: layout.PORT_CONTAIN for pair in plan.contained}
    maps.ports.update_many(
        [(slot, proto, port) for proto, port in plan.ports],
        [(set_id, flags.get(pair, 0)) for pair, set_id in plan.ports.items()],
    )


def flip(maps: Maps, slot: int) -> None:
    maps.state.update(0, layout.State(slot, 0))


# ---- sysctl -------------------------------------------------------------------------------------


def _sysctl_add(added: kernel.Map, ports: set[int]) -> bool:
    current = sysctl.read()
    missing = ports - current
    added.update_many(sorted(missing), [1] * len(missing))  # first: a crash never forgets them
    if missing:
        sysctl.write(current | missing)
        kernel.step()
    return bool(missing)


def _sysctl_drop(added: kernel.Map, keep: set[int]) -> bool:
    stale = {k.value for k in added.keys()} - keep
    if not stale:
        return False
    current = sysctl.read()
    if current & stale:
        sysctl.write(current - stale)
        kernel.step()
    added.delete_many(list(stale))  # forgotten last: a crash before this only repeats the drop
    return True


def _sysctl_records(maps_dir: Path) -> kernel.Map | None:
    """The sysctl_added map of any maps directory (this layout's or an older one) whose map
    still has that name and shape, so no layout change forgets what portguard added."""
    key, value = layout.MAPS["sysctl_added"]
    fd = _open_map(maps_dir / "sysctl_added", key, value)
    return None if fd is None else kernel.Map(fd, key, value)


# ---- apply --------------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    changed: bool
    loaded_program: bool
    variant: str
    warnings: list[str]


def check_features(features: kernel.Features) -> None:
    """Refuse, naming what is missing, when the guard cannot hold on this kernel."""
    missing = []
    if not features.btf:
        missing.append(
            f"kernel BTF ({kernel.VMLINUX_BTF}, CONFIG_DEBUG_INFO_BTF): without it the "
            "owner-cgroup trackers cannot load, and a restarted owner would be refused"
        )
    if not features.bpf_link:
        missing.append(
            "BPF links for cgroup programs (Linux >= 5.7): without them the guard could "
            "not be swapped atomically nor outlive apply safely"
        )
    if not features.ancestor_cgroup:
        missing.append(
            "bpf_get_current_ancestor_cgroup_id in bind programs (Linux >= 5.7): "
            "without it owners (and their sub-cgroups) cannot be recognised"
        )
    if not features.netns_cookie:
        missing.append(
            "bpf_get_netns_cookie in bind programs (Linux >= 5.7): without it the guard "
            "would also refuse binds inside every container's own network namespace"
        )
    if missing:
        raise GuardError(
            "this kernel cannot run portguard, nothing was loaded; it lacks "
            + "; and ".join(missing)
        )


def choose_variant(
    settings: Settings, features: kernel.Features | None = None
) -> tuple[str, list[str]]:
    features = features or kernel.probe_features()
    check_features(features)
    if features.set_retval:
        return "retval", []
    notes = []
    if settings.deny_errno != "EPERM":
        notes.append(
            f"this kernel lacks bpf_set_retval (Linux < 5.18): refused binds fail with EPERM, "
            f"not {settings.deny_errno}"
        )
    return "eperm", notes


def apply(plan: Plan) -> ApplyResult:
    settings = plan.settings
    cgroup_root, attach_dir = preflight(settings, mount_bpffs=True)
    try:
        variant, notes = choose_variant(settings)
        if netns_cookie() == 0:
            notes.append(NO_NETNS_COOKIE)
        object_path = objects.ensure_object(variant)
        can_contain = kernel.has_packet_netns_cookie()
    except (objects.BuildError, kernel.BpfError) as exc:
        raise GuardError(str(exc)) from None
    if plan.contained and not can_contain:
        raise GuardError(
            "contain = true needs cgroup_skb programs that may call bpf_get_netns_cookie, "
            "which this kernel refuses; nothing applied (turn contain off)"
        )
    pins = Pins(Path(settings.pin_dir))
    with _locked(pins.root):
        try:
            pins.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(pins.root, 0o700)
        except OSError as exc:
            raise GuardError(f"cannot use the pin directory {pins.root}: {exc.strerror}") from None
        try:
            result = _apply_locked(
                plan, pins, object_path, variant, cgroup_root, attach_dir, can_contain
            )
        except kernel.BpfError as exc:
            raise GuardError(str(exc)) from None
        except OSError as exc:
            raise GuardError(f"{exc.filename or pins.root}: {exc.strerror}") from None
    result.warnings[:0] = notes
    return result


def _open_links(pins: Pins) -> dict[str, int | None]:
    """The pinned links; a pin under a link's name that is not such a link is refused."""
    links: dict[str, int | None] = {}
    try:
        for name in PROGRAMS:
            fd = links[name] = kernel.get_pinned(pins.link(name))
            if fd is None:
                continue
            kind, kind_type = kernel.object_kind(fd)
            if kind != "link" or not _expected_link(name, kernel.link_info(fd)):
                raise GuardError(
                    f"{pins.link(name)} is not a portguard {name} link (a foreign or "
                    f"damaged pin: {kind} {kind_type}): remove it or choose "
                    "another pin_dir"
                )
    except BaseException:
        for fd in links.values():
            kernel.close(fd)
        raise
    return links


def _expected_link(name: str, info: kernel.LinkInfo) -> bool:
    if name in CGROUP_ATTACH_TYPES:
        return (
            info.type == kernel.LINK_TYPE_CGROUP and info.attach_type == CGROUP_ATTACH_TYPES[name]
        )
    return info.type in (kernel.LINK_TYPE_RAW_TRACEPOINT, kernel.LINK_TYPE_TRACING)


def _reads_maps(link_fd: int, maps: Maps) -> bool:
    """Whether the link's program uses these maps (and not an older set)."""
    state_id = kernel.map_info(maps.fds["state"]).id
    return state_id in kernel.prog_map_ids(kernel.link_info(link_fd).prog_id)


def _retire(maps_dir: Path) -> None:
    """Move maps this version cannot trust out of the way; links may still use them, so they
    are deleted only once no link does (end of apply)."""
    if maps_dir.exists():
        kernel.rename_pin(maps_dir, maps_dir.with_name(f"maps-retired-{secrets.token_hex(4)}"))


def _load(
    object_path: Path, pins: Pins, reused: bool, skip: tuple[str, ...]
) -> tuple[kernel.LoadedObject, bool]:
    """Load, reusing this layout's pinned maps when reused; maps libbpf cannot reuse (their
    definition changed without a layout change) are retired and made afresh."""
    pins.maps_dir.mkdir(mode=0o700, exist_ok=True)
    programs = list(PROGRAMS.values())
    try:
        return kernel.load_object(object_path, pins.maps_dir, programs, MAP_NAMES, skip), reused
    except kernel.BpfError as exc:
        if "reuse pinned map" not in str(exc):
            raise
    _retire(pins.maps_dir)
    pins.maps_dir.mkdir(mode=0o700)
    return kernel.load_object(object_path, pins.maps_dir, programs, MAP_NAMES, skip), False


def _apply_locked(
    plan: Plan,
    pins: Pins,
    object_path: Path,
    variant: str,
    cgroup_root: Path,
    attach_dir: Path,
    can_contain: bool,
) -> ApplyResult:
    digest = object_path.stem.encode()
    cookie = netns_cookie()
    links = _open_links(pins)
    maps = Maps.open_pinned(pins.maps_dir)
    loaded = None
    contain = bool(plan.contained)
    wanted_links = CORE_LINKS + (PACKET_LINKS if contain else ())
    try:
        # bind and packet links: what enforces, and which maps it reads
        bind_links = [links[name] for name in CGROUP_ATTACH_TYPES if links[name] is not None]
        readers = [fd for fd in bind_links if maps is not None and _reads_maps(fd, maps)]
        takeover = len(readers) < len(bind_links)  # some link enforces maps we do not trust
        stale_program = maps is None or maps.meta.lookup(0).object != digest
        need_load = stale_program or takeover or any(links[name] is None for name in wanted_links)
        if need_load:
            if maps is None:
                _retire(pins.maps_dir)
            skip = () if can_contain else tuple(PROGRAMS[name] for name in PACKET_LINKS)
            loaded, reused = _load(object_path, pins, maps is not None, skip)
            if not reused:
                if maps is not None:
                    maps.close()
                maps = Maps({name: os.dup(loaded.maps[name]) for name in layout.MAPS})
                readers, takeover = [], bool(bind_links)
            _carry_sysctl_records(pins, maps)
            if not readers:
                # No link reads these maps: start from an empty active slot whatever was left.
                clear_slot(maps, 0)
                clear_slot(maps, 1)
                for counters in (maps.denied, maps.contained):  # counts of a guard that is gone
                    for key in list(counters.keys()):
                        counters.delete(key)
                maps.config.update(0, _config_value(plan, cookie, variant))
                flip(maps, 0)
            staged = _stage_trackers(pins, loaded)
            if takeover:
                # Complete the new guard before any link reads it; the old one enforces meanwhile
                # (so its ports stay in the sysctl until the final _apply_maps below).
                _apply_maps(maps, plan, cookie, variant, cgroup_root, drop_stale=False)
            _attach_cgroup_links(pins, links, loaded, attach_dir, contain)
            for name in staged:
                kernel.rename_pin(pins.staged_link(name), pins.link(name))
            maps.meta.update(0, layout.Meta(digest))
        _reattach_if_moved(pins, links, attach_dir)
        dropped = _drop_other_maps(pins, maps)
        changed = _apply_maps(maps, plan, cookie, variant, cgroup_root)
        if not contain:
            # After the flip: no active reservation contains any more, the programs are idle.
            for name in PACKET_LINKS:
                if links[name] is not None:
                    kernel.close(links[name])
                    links[name] = None
                    kernel.unpin(pins.link(name))
                    changed = True
        return ApplyResult(changed or need_load or dropped, need_load, variant, [])
    finally:
        for fd in links.values():
            kernel.close(fd)
        if maps is not None:
            maps.close()
        if loaded is not None:
            loaded.close()


def _carry_sysctl_records(pins: Pins, maps: Maps) -> None:
    for other in pins.other_maps_dirs():
        records = _sysctl_records(other)
        if records is None:
            continue
        try:
            for key in list(records.keys()):
                maps.sysctl_added.update(key.value, 1)
        finally:
            os.close(records.fd)


def _drop_other_maps(pins: Pins, maps: Maps) -> bool:
    """Maps no link reads any more (older layouts, retired sets, a killed run's): their sysctl
    records are carried over (again: a run killed after loading may not have), the rest is
    dead."""
    others = pins.other_maps_dirs()
    _carry_sysctl_records(pins, maps)
    for other in others:
        for entry in other.iterdir():
            kernel.unpin(entry)
        other.rmdir()
        kernel.step()
    return bool(others)


def _stage_trackers(pins: Pins, loaded: kernel.LoadedObject) -> list[str]:
    """Attach the new cgroup trackers beside the old ones (both keep their maps current until
    the bind links switch); pinned as link_<name>_new until then."""
    staged = []
    for name in ("mkdir", "rmdir"):
        kernel.unpin(pins.staged_link(name))  # a killed run's, never switched to
        fd = kernel.attach_tracing(loaded.programs[PROGRAMS[name]])
        try:
            kernel.pin(fd, pins.staged_link(name))
        finally:
            os.close(fd)
        staged.append(name)
    return staged


def _attach_cgroup_links(
    pins: Pins,
    links: dict[str, int | None],
    loaded: kernel.LoadedObject,
    attach_dir: Path,
    contain: bool,
) -> None:
    for name, attach_type in CGROUP_ATTACH_TYPES.items():
        prog = loaded.programs.get(PROGRAMS[name])
        if links[name] is None:
            # Packet programs are attached before the flip that turns containment on; while
            # the active slot has no contained port they pass everything.
            if name in PACKET_LINKS and not contain:
                continue
            links[name] = kernel.attach_cgroup(prog, attach_dir, attach_type)
            kernel.pin(links[name], pins.link(name))
        elif prog is not None:
            kernel.update_link(links[name], prog)


def _reattach_if_moved(pins: Pins, links: dict[str, int | None], attach_dir: Path) -> None:
    """The attach cgroup changed in the config (or was removed): attach there, then let go
    of the old one."""
    want = os.stat(attach_dir).st_ino
    for name, attach_type in CGROUP_ATTACH_TYPES.items():
        fd = links[name]
        if fd is None:
            continue
        info = kernel.link_info(fd)
        if info.cgroup_id == want:
            continue
        prog_fd = kernel.lib().bpf_prog_get_fd_by_id(info.prog_id)
        if prog_fd < 0:
            raise kernel.BpfError(C.get_errno(), f"reopening program {info.prog_id}")
        try:
            new = kernel.attach_cgroup(prog_fd, attach_dir, attach_type)
        finally:
            os.close(prog_fd)
        _pin_replace(new, pins.link(name))
        kernel.close(fd)
        links[name] = new


def _pin_replace(fd: int, path: Path) -> None:
    tmp = path.with_name(path.name + "_new")  # bpffs refuses names with a dot
    kernel.unpin(tmp)
    kernel.pin(fd, tmp)
    kernel.rename_pin(tmp, path)


def _apply_maps(
    maps: Maps, plan: Plan, cookie: int, variant: str, cgroup_root: Path, drop_stale: bool = True
) -> bool:
    active = maps.active
    cfg = _config_value(plan, cookie, variant)
    wanted_ports = {port for _, port in plan.ports}
    if read_slot(maps, active) == _desired(plan) and _same_config(maps.config.lookup(active), cfg):
        # Unchanged, but a killed run may have left a half-filled inactive slot and sysctl
        # entries behind, or someone edited the sysctl: settle both.
        clear_slot(maps, 1 - active)
        added = _sysctl_add(maps.sysctl_added, wanted_ports)
        return _sysctl_drop(maps.sysctl_added, wanted_ports) or added
    inactive = 1 - active
    clear_slot(maps, inactive)
    fill_slot(maps, inactive, plan, cfg, cgroup_root)
    _sysctl_add(maps.sysctl_added, wanted_ports)
    flip(maps, inactive)
    clear_slot(maps, active)
    reserved = {(proto, port) for proto, port in plan.ports}
    for counters in (maps.denied, maps.contained):
        counters.delete_many([k for k in counters.keys() if (k.proto, k.port) not in reserved])
    if drop_stale:
        _sysctl_drop(maps.sysctl_added, wanted_ports)
    return True


# ---- remove -------------------------------------------------------------------------------------


def remove(settings: Settings) -> bool:
    """Detach and unpin everything, restore the sysctl. False when nothing was there."""
    if os.geteuid() != 0:
        raise GuardError("portguard must run as root: it loads BPF programs into the kernel")
    pins = Pins(Path(settings.pin_dir))
    if not pins.root.is_dir():
        return False
    with _locked(pins.root):
        try:
            _remove_locked(pins)
        except kernel.BpfError as exc:
            raise GuardError(str(exc)) from None
        except OSError as exc:
            raise GuardError(f"{exc.filename or pins.root}: {exc.strerror}") from None
        leftovers = sorted(p.name for p in pins.root.iterdir())
        if leftovers:
            raise GuardError(
                f"removed the guard, but {pins.root} holds foreign pins: {', '.join(leftovers)}"
            )
        pins.root.rmdir()
    return True


def _remove_locked(pins: Pins) -> None:
    maps = Maps.open_pinned(pins.maps_dir)
    if maps is not None:
        try:
            empty = 1 - maps.active
            clear_slot(maps, empty)
            current = maps.config.lookup(maps.active)
            if current is not None:
                maps.config.update(empty, current)
            flip(maps, empty)  # no reservation from here on
        finally:
            maps.close()
    maps_dirs = sorted(pins.root.glob("maps-*"))
    for maps_dir in maps_dirs:  # older layouts' records too
        records = _sysctl_records(maps_dir)
        if records is not None:
            try:
                _sysctl_drop(records, set())
            finally:
                os.close(records.fd)
    for name in PROGRAMS:
        kernel.unpin(pins.link(name))
        kernel.unpin(pins.staged_link(name))
    for maps_dir in maps_dirs:
        for entry in maps_dir.iterdir():
            kernel.unpin(entry)
        maps_dir.rmdir()
        kernel.step()


# ---- read ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkState:
    name: str
    link_id: int
    prog_id: int
    cgroup_id: int | None


@dataclass(frozen=True)
class OwnerState:
    cgroup: str
    id: int | None  # as the kernel knows it right now; None: the cgroup does not exist
    unit: str | None = None  # the systemd unit the cgroup belongs to, if any


@dataclass(frozen=True)
class ReservationState:
    port: int
    protocol: str
    owners: tuple[OwnerState, ...]
    denied: int
    contain: bool = False
    contained_drops: int = 0  # packets of non-owner sockets on the port dropped (or, audit, seen)
    holders: tuple = ()  # squatters.HolderState, filled by squatters.with_holders


@dataclass(frozen=True)
class GuardState:
    loaded: bool
    pin_dir: str
    links: tuple[LinkState, ...] = ()
    program: str | None = None
    mode: str | None = None
    deny_errno: int | None = None
    netns_cookie: int | None = None
    reservations: tuple[ReservationState, ...] = ()
    lost_events: int = 0
    containment: bool = False  # packet programs attached (some reservation has contain on)
    holders_checked: bool = False  # holders are only seen from the guarded network namespace
    # An apply or remove was interrupted: the bind links may still enforce other maps than
    # these (shown here), or leftovers wait to be dropped. The next apply settles it.
    interrupted: bool = False


def read_state(settings: Settings, only: list[tuple[str, int]] | None = None) -> GuardState:
    """What the kernel holds now, from the pins alone (works from any fresh process);
    with `only` (protocol name, port) pairs, just the reservations of those ports."""
    if os.geteuid() != 0:
        raise GuardError("portguard status must run as root: the pinned maps are root-only")
    pins = Pins(Path(settings.pin_dir))
    if not pins.root.is_dir():
        return GuardState(False, settings.pin_dir)
    try:
        return _read_state(pins, settings, only)
    except kernel.BpfError as exc:
        raise GuardError(str(exc)) from None


def _read_state(pins: Pins, settings: Settings, only: list[tuple[str, int]] | None) -> GuardState:
    link_states = []
    for name in PROGRAMS:
        fd = kernel.get_pinned(pins.link(name))
        if fd is None:
            continue
        try:
            info = kernel.link_info(fd)
        finally:
            os.close(fd)
        link_states.append(LinkState(name, info.id, info.prog_id, info.cgroup_id))
    leftovers = bool(pins.other_maps_dirs()) or any(pins.staged_link(n).exists() for n in PROGRAMS)
    maps = Maps.open_pinned(pins.maps_dir)
    if maps is None:
        return GuardState(
            bool(link_states),
            settings.pin_dir,
            tuple(link_states),
            interrupted=bool(link_states) or leftovers,
        )
    try:
        state_id = kernel.map_info(maps.fds["state"]).id
        elsewhere = any(
            state_id not in kernel.prog_map_ids(ls.prog_id)
            for ls in link_states
            if ls.name in CGROUP_ATTACH_TYPES
        )
        active = maps.active
        wanted = None if only is None else [(layout.PROTOCOLS[proto], port) for proto, port in only]
        slot = read_slot(maps, active, wanted)
        cfg = maps.config.lookup(active)
        owner_ids = {k.idx: v.id for k, v in maps.owners.items() if k.slot == active}
        path_of = {idx: path for path, idx in slot.paths.items()}
        if wanted is None:
            denied = {(k.proto, k.port): sum(v) for k, v in maps.denied.items()}
            drops = {(k.proto, k.port): sum(v) for k, v in maps.contained.items()}
        else:
            keys = {pair: layout.CountKey(pair[0], 0, pair[1]) for pair in wanted}
            denied, drops = (
                {
                    pair: sum(count)
                    for pair, key in keys.items()
                    if (count := counters.lookup(key)) is not None
                }
                for counters in (maps.denied, maps.contained)
            )
        reservations = []
        for (proto, port), set_id in sorted(
            slot.ports.items(), key=lambda kv: (kv[0][1], kv[0][0])
        ):
            owners = tuple(
                OwnerState(
                    path_of.get(i, "?"),
                    owner_ids.get(i) or None,
                    cgroups.unit_of_cgroup(path_of.get(i, "")),
                )
                for i in slot.sets.get(set_id, ())
            )
            reservations.append(
                ReservationState(
                    port,
                    layout.PROTOCOL_NAMES.get(proto, str(proto)),
                    owners,
                    denied.get((proto, port), 0),
                    (proto, port) in slot.contained,
                    drops.get((proto, port), 0),
                )
            )
        meta = maps.meta.lookup(0)
        lost = maps.lost.lookup(0)
        return GuardState(
            loaded=any(ls.name in ("bind4", "bind6") for ls in link_states),
            pin_dir=settings.pin_dir,
            links=tuple(link_states),
            program=meta.object.decode() if meta else None,
            mode="audit" if cfg and cfg.mode == layout.MODE_AUDIT else "enforce",
            # 0 means a program without bpf_set_retval: the binder sees plain EPERM
            deny_errno=(cfg.deny_errno or errno.EPERM) if cfg else None,
            netns_cookie=cfg.netns_cookie if cfg else None,
            reservations=tuple(reservations),
            lost_events=sum(lost) if lost else 0,
            containment=all(name in {ls.name for ls in link_states} for name in PACKET_LINKS),
            interrupted=leftovers or elsewhere,
        )
    finally:
        maps.close()


def errno_name(number: int | None) -> str:
    if number is None:
        return "-"
    return errno.errorcode.get(number, str(number)) if number else "EPERM"
