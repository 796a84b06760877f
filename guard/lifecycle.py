"""apply / remove / read the guard: the plan meets the kernel here.

Every change of behaviour happens at one instant, the flip of state.active: apply fills the
inactive slot completely (config, owner paths, owner ids, owner sets, ports) and then flips.
Links are attached while the active slot is empty (no reservations), so attaching changes
nothing either. A process killed at any point leaves either the old guard or the new one.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import os
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
        fds: dict[str, int] = {}
        for name in layout.MAPS:
            fd = kernel.get_pinned(maps_dir / name)
            if fd is None:
                for other in fds.values():
                    os.close(other)
                return None
            fds[name] = fd
        return cls(fds)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    @property
    def active(self) -> int:
        st = self.state.lookup(0)
        return st.active & 1 if st else 0


def _bpffs_mounts() -> list[Path]:
    mounts = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == BPF_FS_MAGIC_NAME:
            mounts.append(Path(fields[1]))
    return mounts


def _on_bpffs(path: Path) -> bool:
    return any(path == m or m in path.parents for m in _bpffs_mounts())


def _mount(source: str, target: str, fstype: str, data: str) -> None:
    libc = C.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, data.encode()) != 0:
        err = C.get_errno()
        raise GuardError(f"cannot mount {fstype} at {target}: {os.strerror(err)}")


def preflight(settings: Settings, *, mount_bpffs: bool) -> tuple[Path, Path]:
    """Root, cgroup2, bpffs, the attach cgroup: (cgroup2 mount, attach dir) or GuardError."""
    if os.geteuid() != 0:
        raise GuardError("portguard must run as root: it loads BPF programs into the kernel")
    try:
        cgroups.require_initial_namespace()
        root = cgroups.cgroup2_mount()
    except cgroups.CgroupError as exc:
        raise GuardError(str(exc)) from None
    attach_dir = cgroups.directory(settings.cgroup, root)
    if not attach_dir.is_dir():
        raise GuardError(f"the attach cgroup {settings.cgroup} does not exist under {root}")
    pin_dir = Path(settings.pin_dir)
    if not _on_bpffs(pin_dir):
        default = Path("/sys/fs/bpf")
        if mount_bpffs and (pin_dir == default or default in pin_dir.parents) and default.is_dir():
            _mount("bpf", str(default), "bpf", "mode=0700")
        else:
            raise GuardError(f"{pin_dir} is not on a BPF file system (mount -t bpf bpf /sys/fs/bpf)")
    return root, attach_dir


def netns_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


@contextmanager
def _locked(pin_dir: Path) -> Iterator[None]:
    """One apply/remove at a time per pin directory."""
    try:
        LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        lock_dir = LOCK_DIR
    except OSError:
        lock_dir = Path("/tmp")
    name = sources.sha256(str(pin_dir).encode()).hexdigest()[:16]
    with open(lock_dir / f"portguard-{name}.lock", "w") as lock:
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
    return SlotContents(dict(plan.ports), dict(plan.sets), {p: i for i, p in enumerate(plan.paths)},
                        plan.contained)


def _config_value(plan: Plan, cookie: int, variant: str) -> layout.Config:
    deny = plan.settings.deny_errno_number if variant == "retval" else 0
    mode = layout.MODE_AUDIT if plan.settings.mode == "audit" else layout.MODE_ENFORCE
    return layout.Config(cookie, deny, mode)


def _same_config(a: layout.Config | None, b: layout.Config) -> bool:
    return a is not None and (a.netns_cookie, a.deny_errno, a.mode) == (b.netns_cookie, b.deny_errno, b.mode)


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
            maps.owners.update(layout.OwnerKey(slot, idx),
                               layout.OwnerVal(cg_id, cgroups.level(path), 0), kernel.BPF_NOEXIST)
    for set_id, members in plan.sets.items():
        value = layout.SetVal(len(members))
        for i, member in enumerate(members):
            value.owner[i] = member
        maps.sets.update(layout.SetKey(slot, set_id), value)
    flags = {pair: layout.PORT_CONTAIN for pair in plan.contained}
    maps.ports.update_many([(slot, proto, port) for proto, port in plan.ports],
                           [(set_id, flags.get(pair, 0)) for pair, set_id in plan.ports.items()])


def flip(maps: Maps, slot: int) -> None:
    maps.state.update(0, layout.State(slot, 0))


# ---- sysctl -------------------------------------------------------------------------------------

def _sysctl_add(maps: Maps, ports: set[int]) -> None:
    current = sysctl.read()
    missing = ports - current
    added = sorted(missing)
    maps.sysctl_added.update_many(added, [1] * len(added))  # first: a crash never forgets them
    if missing:
        sysctl.write(current | missing)


def _sysctl_drop(maps: Maps, keep: set[int]) -> None:
    added = {k.value for k in maps.sysctl_added.keys()}
    stale = added - keep
    if not stale:
        return
    current = sysctl.read()
    if current & stale:
        sysctl.write(current - stale)
    maps.sysctl_added.delete_many(list(stale))


# ---- apply --------------------------------------------------------------------------------------

@dataclass
class ApplyResult:
    changed: bool
    loaded_program: bool
    variant: str
    warnings: list[str]


def choose_variant(settings: Settings) -> tuple[str, list[str]]:
    if kernel.has_set_retval():
        return "retval", []
    notes = []
    if settings.deny_errno != "EPERM":
        notes.append(f"this kernel lacks bpf_set_retval (Linux < 5.18): refused binds fail with EPERM, "
                     f"not {settings.deny_errno}, so bindresvport() callers give up instead of "
                     "moving to the next port")
    return "eperm", notes


def apply(plan: Plan) -> ApplyResult:
    settings = plan.settings
    cgroup_root, attach_dir = preflight(settings, mount_bpffs=True)
    try:
        variant, notes = choose_variant(settings)
        object_path = objects.ensure_object(variant)
        can_contain = kernel.has_packet_netns_cookie()
    except (objects.BuildError, kernel.BpfError) as exc:
        raise GuardError(str(exc)) from None
    if plan.contained and not can_contain:
        raise GuardError("contain = true needs cgroup_skb programs that may call bpf_get_netns_cookie, "
                         "which this kernel refuses; nothing applied (turn contain off)")
    pins = Pins(Path(settings.pin_dir))
    with _locked(pins.root):
        pins.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(pins.root, 0o700)
        try:
            result = _apply_locked(plan, pins, object_path, variant, cgroup_root, attach_dir,
                                   can_contain)
        except kernel.BpfError as exc:
            raise GuardError(str(exc)) from None
    result.warnings[:0] = notes
    return result


def _apply_locked(plan: Plan, pins: Pins, object_path: Path, variant: str,
                  cgroup_root: Path, attach_dir: Path, can_contain: bool) -> ApplyResult:
    digest = object_path.stem.encode()
    links = {name: kernel.get_pinned(pins.link(name)) for name in PROGRAMS}
    maps = Maps.open_pinned(pins.maps_dir)
    loaded = None
    contain = bool(plan.contained)
    wanted_links = CORE_LINKS + (PACKET_LINKS if contain else ())
    try:
        stale_program = maps is None or maps.meta.lookup(0).object != digest
        need_load = stale_program or any(links[name] is None for name in wanted_links)
        if need_load:
            pins.maps_dir.mkdir(mode=0o700, exist_ok=True)
            skip = () if can_contain else tuple(PROGRAMS[name] for name in PACKET_LINKS)
            loaded = kernel.load_object(object_path, pins.maps_dir, list(PROGRAMS.values()), MAP_NAMES,
                                        skip)
            if maps is None:
                maps = Maps({name: os.dup(loaded.maps[name]) for name in layout.MAPS})
            if links["bind4"] is None and links["bind6"] is None:
                # Nothing enforces yet: start from an empty active slot whatever was left.
                clear_slot(maps, 0)
                clear_slot(maps, 1)
                maps.config.update(0, _config_value(plan, netns_cookie(), variant))
                flip(maps, 0)
            _attach(pins, links, loaded, attach_dir, replace_program=stale_program, contain=contain)
            maps.meta.update(0, layout.Meta(digest))
        else:
            _reattach_if_moved(pins, links, attach_dir)
        changed = _apply_maps(maps, plan, netns_cookie(), variant, cgroup_root)
        if not contain:
            # After the flip: no active reservation contains any more, the programs are idle.
            for name in PACKET_LINKS:
                if links[name] is not None:
                    kernel.close(links[name])
                    links[name] = None
                    _unlink(pins.link(name))
                    changed = True
        return ApplyResult(changed or need_load, need_load, variant, [])
    finally:
        for fd in links.values():
            kernel.close(fd)
        if maps is not None:
            maps.close()
        if loaded is not None:
            loaded.close()


def _attach(pins: Pins, links: dict[str, int | None], loaded: kernel.LoadedObject,
            attach_dir: Path, replace_program: bool, contain: bool) -> None:
    for name in ("mkdir", "rmdir"):
        if links[name] is None or replace_program:
            # Old and new tracker briefly both run: they write the same owner ids.
            new = kernel.attach_tracing(loaded.programs[PROGRAMS[name]])
            _pin_replace(new, pins.link(name))
            kernel.close(links[name])
            links[name] = new
    for name, attach_type in CGROUP_ATTACH_TYPES.items():
        prog = loaded.programs.get(PROGRAMS[name])
        if links[name] is None:
            # Packet programs are attached before the flip that turns containment on; while
            # the active slot has no contained port they pass everything.
            if name in PACKET_LINKS and not contain:
                continue
            links[name] = kernel.attach_cgroup(prog, attach_dir, attach_type)
            kernel.pin(links[name], pins.link(name))
        elif replace_program and prog is not None:
            kernel.update_link(links[name], prog)
    _reattach_if_moved(pins, links, attach_dir)


def _reattach_if_moved(pins: Pins, links: dict[str, int | None], attach_dir: Path) -> None:
    """The attach cgroup changed in the config: attach there, then let go of the old one."""
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
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    kernel.pin(fd, tmp)
    os.replace(tmp, path)


def _apply_maps(maps: Maps, plan: Plan, cookie: int, variant: str, cgroup_root: Path) -> bool:
    active = maps.active
    cfg = _config_value(plan, cookie, variant)
    if read_slot(maps, active) == _desired(plan) and _same_config(maps.config.lookup(active), cfg):
        return False
    inactive = 1 - active
    clear_slot(maps, inactive)
    fill_slot(maps, inactive, plan, cfg, cgroup_root)
    wanted_ports = {port for _, port in plan.ports}
    _sysctl_add(maps, wanted_ports)
    flip(maps, inactive)
    clear_slot(maps, active)
    reserved = {(proto, port) for proto, port in plan.ports}
    for counters in (maps.denied, maps.contained):
        counters.delete_many([k for k in counters.keys() if (k.proto, k.port) not in reserved])
    _sysctl_drop(maps, wanted_ports)
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
            for maps_dir in sorted(pins.root.glob("maps-*")):
                maps = Maps.open_pinned(maps_dir) if maps_dir == pins.maps_dir else None
                if maps is not None:
                    try:
                        empty = 1 - maps.active
                        clear_slot(maps, empty)
                        current = maps.config.lookup(maps.active)
                        if current is not None:
                            maps.config.update(empty, current)
                        flip(maps, empty)  # no reservation from here on
                        _sysctl_drop(maps, set())
                    finally:
                        maps.close()
            for name in PROGRAMS:
                for path in (pins.link(name), pins.link(name).with_name(f"link_{name}_new")):
                    _unlink(path)
            for maps_dir in sorted(pins.root.glob("maps-*")):
                for entry in maps_dir.iterdir():
                    _unlink(entry)
                maps_dir.rmdir()
        except kernel.BpfError as exc:
            raise GuardError(str(exc)) from None
        leftovers = sorted(p.name for p in pins.root.iterdir())
        if leftovers:
            raise GuardError(f"removed the guard, but {pins.root} holds foreign pins: {', '.join(leftovers)}")
        pins.root.rmdir()
    return True


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
    maps = Maps.open_pinned(pins.maps_dir)
    if maps is None:
        return GuardState(bool(link_states), settings.pin_dir, tuple(link_states))
    try:
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
            denied, drops = ({pair: sum(count) for pair, key in keys.items()
                              if (count := counters.lookup(key)) is not None}
                             for counters in (maps.denied, maps.contained))
        reservations = []
        for (proto, port), set_id in sorted(slot.ports.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            owners = tuple(OwnerState(path_of.get(i, "?"), owner_ids.get(i) or None,
                                      cgroups.unit_of_cgroup(path_of.get(i, "")))
                           for i in slot.sets.get(set_id, ()))
            reservations.append(ReservationState(port, layout.PROTOCOL_NAMES.get(proto, str(proto)),
                                                 owners, denied.get((proto, port), 0),
                                                 (proto, port) in slot.contained,
                                                 drops.get((proto, port), 0)))
        meta = maps.meta.lookup(0)
        lost = maps.lost.lookup(0)
        return GuardState(
            loaded=any(ls.name in ("bind4", "bind6") for ls in link_states),
            pin_dir=settings.pin_dir,
            links=tuple(link_states),
            program=meta.object.decode() if meta else None,
            mode="audit" if cfg and cfg.mode == layout.MODE_AUDIT else "enforce",
            deny_errno=cfg.deny_errno if cfg else None,
            netns_cookie=cfg.netns_cookie if cfg else None,
            reservations=tuple(reservations),
            lost_events=sum(lost) if lost else 0,
            containment=all(name in {ls.name for ls in link_states} for name in PACKET_LINKS),
        )
    finally:
        maps.close()


def errno_name(number: int | None) -> str:
    if number is None:
        return "-"
    return errno.errorcode.get(number, str(number)) if number else "EPERM"

