"""apply / remove: the plan meets the kernel here.

Every change of behaviour happens at one instant, the flip of state.active: apply fills the
inactive slot completely (config, owner paths, owner ids, owner sets, ports) and then flips.
The old slot is cleared only once no program can still be reading it: a program that looked
up state.active before the flip may still be running (libbpf.wait_for_programs waits for
it). Links are attached while the active slot is empty (no reservations), so attaching
changes nothing either. A process killed at any point leaves either the old guard or the
new one.

Maps the bind links do not read (an older layout's, a half-created set, leftovers of a killed
run) are never trusted: apply loads fresh maps, fills them completely while the old links
keep enforcing, and only then swaps each bind link's program (bpf_link_update, one step per
address family). The trackers of the new maps are pinned beside the old ones until then,
and the old maps go last. The `meta` map's object digest is written last of all: while it
is stale the next apply redoes the whole load.

Where binds are refused (host.choose_denial: the cgroup bind links, or the fmod_ret link on
security_socket_bind) can change between two applies (refuse_at, an upgrade from a version
without the second road). The new road's links are attached and pinned before the old road's
are unpinned: for that moment both refuse strangers, and nobody is without a guard. Onto new
maps, the old road's links first judge from them too (_move_old_road), so the two roads never
judge from two guards at once. The security_socket_bind link cannot be updated in place
(tracing links have no bpf_link_update), and two fmod_ret programs on one function both judge
every bind; so the program attached there judges nothing itself: it tail-calls the judge in
the hook_judge program array (bpf/guard.h), and the judge moves to new maps or a new program
in one write of that array, the same step bpf_link_update is for the cgroup links. The
attached program is replaced only when it is not one that tail-calls this hook_judge (a
version before it) or its code changed: pinned as link_socket_bind_new, then renamed over
the old link.
"""

from __future__ import annotations

import ctypes as C
import os

from guard import paths
from guard.errors import GuardError
from guard.kernel import corebtf, host, layout, libbpf, objects, slots, sysctl
from guard.kernel.pins import Maps, Pins, open_map, reading_program, tail_calls_judge
from guard.kernel.programs import (
    BIND_AND_PACKET_LINKS,
    BIND_LINKS,
    BIND_PROGRAMS,
    CGROUP_ATTACH_TYPES,
    CGROUP_BIND_LINKS,
    HOOK_LINK,
    JUDGE,
    JUDGES,
    LINK_NAMES,
    PACKET_LINKS,
    TRACKER_LINKS,
    TRACKER_TRACEPOINTS,
    core_links,
    not_loaded,
    program_names,
)
from guard.policy.config import Settings
from guard.policy.plan import Plan

TYPE_CHECKING = False  # annotations only: collections.abc would import collections
if TYPE_CHECKING:
    from collections.abc import Callable


class ApplyResult:
    __slots__ = ("changed", "loaded_program", "denial", "warnings", "object_path", "attach_dir")

    def __init__(self, changed: bool, loaded_program: bool, denial: str, warnings: list[str]):
        self.changed = changed
        self.loaded_program = loaded_program
        self.denial = denial  # host.DENY_SET_RETVAL, DENY_SOCKET_BIND or DENY_EPERM
        self.warnings = warnings
        self.object_path = ""  # the object this guard's programs come from
        self.attach_dir = ""  # the attach cgroup's directory


def forget_record(pin_dir: str) -> None:
    """Take away the guard record of guard/quick.py (an unchanged re-apply's proof), under
    the pin directory's lock, before anything changes the guard: a run killed from here on
    leaves no record, and the next apply takes the full path."""
    record = paths.guard_record(paths.normal(pin_dir))
    try:
        os.unlink(record)
    except FileNotFoundError:
        pass
    except OSError as exc:  # it would vouch for a guard this run may change
        raise GuardError(f"cannot remove {record}: {exc.strerror}") from None


def apply(plan: Plan, settle: Callable[[ApplyResult], None] | None = None) -> ApplyResult:
    """Make the pinned guard what the plan says; settle(result), when given, runs once it is,
    still under the pin directory's lock (the records that describe this guard)."""
    settings = plan.settings
    cgroup_root, attach_dir = host.preflight(settings, mount_bpffs=True)
    try:
        denial, notes = host.choose_denial(settings)
        # the security_socket_bind program knows the guarded namespace by its inode
        if host.netns_cookie() == 0 and denial != host.DENY_SOCKET_BIND:
            notes.append(host.NO_NETNS_COOKIE)
        object_path = objects.ensure_object()
        can_contain = libbpf.has_packet_netns_cookie()
    except (objects.BuildError, libbpf.BpfError) as exc:
        raise GuardError(str(exc)) from None
    if plan.contained and not can_contain:
        raise GuardError(
            "contain = true needs cgroup_skb programs that may call bpf_get_netns_cookie, "
            "which this kernel refuses; nothing applied (turn contain off)"
        )
    pins = Pins(settings.pin_dir)
    with host.locked(pins.root):
        forget_record(pins.root)
        try:
            os.makedirs(pins.root, mode=0o700, exist_ok=True)
            os.chmod(pins.root, 0o700)
        except OSError as exc:
            raise GuardError(f"cannot use the pin directory {pins.root}: {exc.strerror}") from None
        try:
            try:
                result = _Transaction(
                    plan, pins, object_path, denial, cgroup_root, attach_dir, can_contain
                ).run()
            except libbpf.BpfError as exc:
                if denial != host.DENY_SOCKET_BIND or settings.refuse_at != "auto":
                    raise
                # The probe's program attached but the guard's did not (a verifier or a
                # kernel the probe cannot foresee): the last road, as after a kill at that
                # step followed by an apply on that road (tests/kernel/test_faults.py).
                notes.append(host.hook_failed(settings, str(exc).splitlines()[0]))
                result = _Transaction(
                    plan,
                    pins,
                    object_path,
                    host.DENY_EPERM,
                    cgroup_root,
                    attach_dir,
                    can_contain,
                ).run()
        except libbpf.BpfError as exc:
            raise GuardError(str(exc)) from None
        except OSError as exc:
            raise GuardError(f"{exc.filename or pins.root}: {exc.strerror}") from None
        result.warnings[:0] = notes
        result.object_path, result.attach_dir = str(object_path), str(attach_dir)

        if settle is not None:
            settle(result)
    return result


def _open_links(pins: Pins) -> dict[str, int | None]:
    """The pinned links; a pin under a link's name that is not such a link is refused."""
    links: dict[str, int | None] = {}
    try:
        for name in LINK_NAMES:
            fd = links[name] = libbpf.get_pinned(pins.link(name))
            if fd is None:
                continue
            kind, kind_type = libbpf.object_kind(fd)
            if kind != "link" or not _expected_link(name, libbpf.link_info(fd)):
                raise GuardError(
                    f"{pins.link(name)} is not a portguard {name} link (a foreign or "
                    f"damaged pin: {kind} {kind_type}): remove it or choose "
                    "another pin_dir"
                )
    except BaseException:
        for fd in links.values():
            libbpf.close(fd)
        raise
    return links


def _expected_link(name: str, info: libbpf.LinkInfo) -> bool:
    if name in CGROUP_ATTACH_TYPES:
        return (
            info.type == libbpf.LINK_TYPE_CGROUP
            and info.cgroup.attach_type == CGROUP_ATTACH_TYPES[name]
        )
    if name == HOOK_LINK:
        return info.type == libbpf.LINK_TYPE_TRACING
    return info.type in (libbpf.LINK_TYPE_RAW_TRACEPOINT, libbpf.LINK_TYPE_TRACING)


def _reads_maps(pins: Pins, name: str, link_fd: int, maps: Maps) -> bool:
    """Whether the link's program (the security_socket_bind link's judge) uses these maps
    (and not an older set)."""
    state_id = libbpf.map_info(maps.fds["state"]).id
    reader = reading_program(pins, name, libbpf.link_info(link_fd).prog_id)
    return reader != 0 and state_id in libbpf.prog_map_ids(reader)


def _retire(maps_dir: str) -> None:
    """Move maps this version cannot trust out of the way; links may still use them, so they
    are deleted only once no link does (end of apply)."""
    if os.path.exists(maps_dir):
        # os.urandom, not secrets: secrets imports hashlib, which loads libcrypto at boot
        retired = f"maps-retired-{os.urandom(4).hex()}"
        libbpf.rename_pin(maps_dir, os.path.join(os.path.dirname(maps_dir), retired))


def _mkdir(path: str) -> None:
    """A directory of mode 0700 (umask permitting), there already or not."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def _load(
    object_path: str, pins: Pins, reused: bool, skip: tuple[str, ...], sizes: dict[str, int]
) -> tuple[libbpf.LoadedObject, bool]:
    """Load, reusing this layout's pinned maps when reused; maps libbpf cannot reuse (their
    definition or size changed without a layout change) are retired and made afresh."""
    _mkdir(pins.maps_dir)
    shared = {"hook_judge": pins.judge}
    btf = corebtf.cached(object_path)  # None: the kernel's own BTF
    try:
        loaded = libbpf.load_object(object_path, pins.maps_dir, skip, sizes, shared, btf)
    except libbpf.IncompatiblePinnedMap:
        _retire(pins.maps_dir)
        os.mkdir(pins.maps_dir, 0o700)
        loaded = libbpf.load_object(object_path, pins.maps_dir, skip, sizes, shared, btf)
        reused = False
    if btf is not None and loaded.core_btf is None:
        corebtf.discard(btf)  # libbpf refused it: made anew once the guard is in force
    return loaded, reused


def _sizes(plan: Plan, pins: Pins, maps: Maps | None) -> tuple[dict[str, int], bool]:
    """max_entries for the maps (layout.map_sizes), and whether the pinned maps are too
    small for the plan. Pinned maps never shrink: a size they have and the plan fits in is
    kept, so they stay reusable."""
    wanted = layout.map_sizes(len(plan.ports), len(plan.contained), len(plan.sets), len(plan.paths))
    if maps is None:
        return wanted, False
    pinned = {name: libbpf.map_info(maps.fds[name]).max_entries for name in wanted}
    too_small = any(pinned[name] < entries for name, entries in wanted.items())
    return {name: max(entries, pinned[name]) for name, entries in wanted.items()}, too_small


class _Transaction:
    """One apply, under the pin directory's lock."""

    def __init__(
        self,
        plan: Plan,
        pins: Pins,
        object_path: str,
        denial: str,
        cgroup_root: str,
        attach_dir: str,
        can_contain: bool,
    ):
        self.plan, self.pins, self.object_path = plan, pins, object_path
        self.denial, self.cgroup_root, self.attach_dir = denial, cgroup_root, attach_dir
        self.can_contain = can_contain
        self.contain = bool(plan.contained)
        self.programs = program_names(denial)
        self.cookie = host.netns_cookie()
        scope = (os.stat(attach_dir).st_ino, _depth_below(attach_dir, cgroup_root))
        self.cfg = slots.config_value(plan, self.cookie, denial, scope, host.netns_inode())
        # The object and the road: another road (refuse_at changed) loads and swaps too.
        stem = os.path.splitext(os.path.basename(object_path))[0]
        self.digest = f"{stem} {denial}".encode()

    def run(self) -> ApplyResult:
        pins = self.pins
        _check_judge(pins)
        self._settle_staged_hook()
        links = _open_links(pins)
        maps = Maps.open_pinned(pins.maps_dir)
        loaded = None
        empty = False
        wanted_links = core_links(self.denial) + (PACKET_LINKS if self.contain else ())
        try:
            # bind and packet links: what enforces, and which maps it reads
            bind_links = [n for n in BIND_AND_PACKET_LINKS if links[n] is not None]
            readers = [
                n for n in bind_links if maps is not None and _reads_maps(pins, n, links[n], maps)
            ]
            takeover = len(readers) < len(bind_links)  # some link enforces maps we do not trust
            stale_program = maps is None or maps.meta.lookup(0).object != self.digest
            sizes, too_small = _sizes(self.plan, pins, maps)
            need_load = (
                stale_program
                or takeover
                or too_small  # new maps of the right size, swapped in like a new layout
                or any(links[n] is None for n in wanted_links)
                # pinned anew by the load (a hook program attached already keeps the one it
                # reads, unpinned, and is replaced by one that reads the new pin)
                or not os.path.lexists(pins.judge)
            )
            if need_load:
                if maps is None:
                    _retire(pins.maps_dir)
                # Packet programs only for a policy that contains: loading them costs time
                # at every boot; a later policy that contains loads the object again.
                skip = not_loaded(self.denial, self.can_contain and self.contain)
                old_road = self._old_road(links)
                skip = tuple(name for name in skip if name not in old_road)
                loaded, reused = _load(self.object_path, pins, maps is not None, skip, sizes)
                empty = not reused  # maps this load made: both slots and the counters empty
                if not reused:
                    if maps is not None:
                        maps.close()
                    maps = Maps({name: os.dup(loaded.maps[name]) for name in layout.MAPS})
                    readers, takeover = [], bool(bind_links)
                _carry_sysctl_records(pins, maps)
                if not readers and not empty:
                    # No link reads these maps: start from an empty active slot whatever was left.
                    slots.clear_slot(maps, 0)
                    slots.clear_slot(maps, 1)
                    for counters in (maps.denied, maps.contained):  # counts of a guard that is gone
                        for key in list(counters.keys()):
                            counters.delete(key)
                if not readers:
                    maps.config.update(0, self.cfg)
                    slots.flip(maps, 0)
                staged = self._stage_trackers(loaded)
                if takeover:
                    # Complete the new guard before any link reads it; the old one enforces
                    # meanwhile (so its ports stay in the sysctl until the final apply_maps).
                    apply_maps(
                        maps, self.plan, self.cfg, self.cgroup_root, drop_stale=False, empty=empty
                    )
                    empty = False
                    self._move_old_road(links, loaded, old_road)
                self._attach_cgroup_links(links, loaded)
                if self.denial == host.DENY_SOCKET_BIND:
                    self._attach_hook(links, loaded)
                self._drop_other_roads(links)
                for name in staged:
                    libbpf.rename_pin(pins.staged_link(name), pins.link(name))
                maps.meta.update(0, layout.Meta(self.digest))
            self._drop_other_roads(links)
            if links[HOOK_LINK] is None:
                _end_gate(pins)  # the pin an older version left on another road
            self._reattach_if_moved(links)
            dropped = _drop_other_maps(pins, maps)
            changed = apply_maps(maps, self.plan, self.cfg, self.cgroup_root, empty=empty)
            if not self.contain:
                # After the flip: no active reservation contains any more, the programs are idle.
                for name in PACKET_LINKS:
                    if links[name] is not None:
                        libbpf.close(links[name])
                        links[name] = None
                        libbpf.unpin(pins.link(name))
                        changed = True
            return ApplyResult(changed or need_load or dropped, need_load, self.denial, [])
        finally:
            for fd in links.values():
                libbpf.close(fd)
            if maps is not None:
                maps.close()
            if loaded is not None:
                loaded.close()

    def _settle_staged_hook(self) -> None:
        """A killed run's new security_socket_bind link (link_socket_bind_new): one that
        tail-calls this hook_judge takes link_socket_bind's place (the judge was written
        before it was attached, so it judges as the guard does), and so does an older
        version's that its hook_gate had made the judging one; any other goes."""
        staged = self.pins.staged_link(HOOK_LINK)
        fd = libbpf.get_pinned(staged)
        if fd is None:
            return
        try:
            ours = False
            if libbpf.object_kind(fd)[0] == "link":
                info = libbpf.link_info(fd)
                ours = _expected_link(HOOK_LINK, info) and (
                    tail_calls_judge(self.pins, info.prog_id) or _gate_names(self.pins, info)
                )
        finally:
            os.close(fd)
        if ours:
            _end_gate(self.pins)  # an older version's program still attached lets binds pass
            libbpf.rename_pin(staged, self.pins.link(HOOK_LINK))
        else:
            libbpf.unpin(staged)

    def _old_road(self, links: dict[str, int | None]) -> dict[str, str]:
        """The links of another road than this apply's (a change of road) -> the program of
        this object that can judge for them from new maps: the cgroup bind links take the
        EPERM programs (the security_socket_bind program refuses a bind before them, so only
        the kernel's own binds could tell), the security_socket_bind link the judge."""
        if self.denial == host.DENY_SOCKET_BIND:
            eperm = BIND_PROGRAMS[host.DENY_EPERM]
            return {eperm[n]: n for n in CGROUP_BIND_LINKS if links[n] is not None}
        if links[HOOK_LINK] is not None:
            return {JUDGES[host.DENY_SOCKET_BIND][JUDGE]: HOOK_LINK}
        return {}

    def _move_old_road(
        self,
        links: dict[str, int | None],
        loaded: libbpf.LoadedObject,
        old_road: dict[str, str],
    ) -> None:
        """A change of road onto new maps: before the new road is attached, the old road's
        links judge from the new maps too (one step per link, as a layout takeover does), so
        the two roads never judge from different guards at once (a bind passes only when both
        let it: an owner whose port changes hands in this apply would be refused)."""
        for program, name in old_road.items():
            if program not in loaded.programs:
                continue
            if name == HOOK_LINK:
                if tail_calls_judge(self.pins, libbpf.link_info(links[name]).prog_id):
                    _set_judge(loaded, program)
            else:
                libbpf.update_link(links[name], loaded.programs[program])

    def _stage_trackers(self, loaded: libbpf.LoadedObject) -> list[str]:
        """Attach the new cgroup trackers beside the old ones (both keep their maps current
        until the bind links switch); pinned as link_<name>_new until then."""
        staged = []
        for name in TRACKER_LINKS:
            libbpf.unpin(self.pins.staged_link(name))  # a killed run's, never switched to
            fd = libbpf.attach_tracing(
                loaded.programs[self.programs[name]], TRACKER_TRACEPOINTS[name]
            )
            try:
                libbpf.pin(fd, self.pins.staged_link(name))
            finally:
                os.close(fd)
            staged.append(name)
        return staged

    def _attach_cgroup_links(
        self, links: dict[str, int | None], loaded: libbpf.LoadedObject
    ) -> None:
        for name, attach_type in CGROUP_ATTACH_TYPES.items():
            if name not in self.programs:  # the bind hooks, on the security_socket_bind road
                continue
            prog = loaded.programs.get(self.programs[name])
            if links[name] is None:
                # Packet programs are attached before the flip that turns containment on;
                # while the active slot has no contained port they pass everything.
                if name in PACKET_LINKS and not self.contain:
                    continue
                links[name] = libbpf.attach_cgroup(prog, self.attach_dir, attach_type)
                libbpf.pin(links[name], self.pins.link(name))
            elif prog is not None:
                libbpf.update_link(links[name], prog)

    def _attach_hook(self, links: dict[str, int | None], loaded: libbpf.LoadedObject) -> None:
        """Make the loaded judge the one hook_judge holds (one write: the bind before it
        meets the old judge, the bind after it the new one); then, unless the attached
        program already hands its binds to hook_judge and is this object's, attach this
        object's, pinned as link_socket_bind_new and renamed over the old link."""
        _set_judge(loaded, self.programs[JUDGE])
        dispatcher = loaded.programs[self.programs[HOOK_LINK]]
        old = links[HOOK_LINK]
        if old is not None:
            info = libbpf.link_info(old)
            if tail_calls_judge(self.pins, info.prog_id) and _same_code(info.prog_id, dispatcher):
                return
        staged = self.pins.staged_link(HOOK_LINK)
        # An older version's program judges from its own maps: from here until the rename
        # both judge (a bind passes when both let it).
        new = libbpf.attach_tracing(dispatcher)
        try:
            libbpf.unpin(staged)
            libbpf.pin(new, staged)
            _end_gate(self.pins)
            libbpf.rename_pin(staged, self.pins.link(HOOK_LINK))
        except BaseException:
            os.close(new)
            raise
        libbpf.close(old)
        links[HOOK_LINK] = new

    def _drop_other_roads(self, links: dict[str, int | None]) -> None:
        """Unpin the bind links of the other roads, once this road's are all in place."""
        mine = BIND_PROGRAMS[self.denial]
        if any(links[name] is None for name in mine):
            return
        for name in BIND_LINKS:
            if name not in mine and links[name] is not None:
                libbpf.close(links[name])
                links[name] = None
                libbpf.unpin(self.pins.link(name))
                if name == HOOK_LINK:  # no program tail-calls the judge any more
                    _let_judge_go(self.pins)

    def _reattach_if_moved(self, links: dict[str, int | None]) -> None:
        """The attach cgroup changed in the config (or was removed): attach there, then let
        go of the old one."""
        want = os.stat(self.attach_dir).st_ino
        for name, attach_type in CGROUP_ATTACH_TYPES.items():
            fd = links[name]
            if fd is None:
                continue
            info = libbpf.link_info(fd)
            if info.cgroup.cgroup_id == want:
                continue
            prog_fd = libbpf.reopen_program(info.prog_id)
            try:
                new = libbpf.attach_cgroup(prog_fd, self.attach_dir, attach_type)
            finally:
                os.close(prog_fd)
            _pin_replace(new, self.pins.link(name))
            libbpf.close(fd)
            links[name] = new


def _check_judge(pins: Pins) -> None:
    """Refuse a pin under hook_judge's name that is not such a program array (libbpf would
    not reuse it, and no new maps would help)."""
    if not os.path.lexists(pins.judge):
        return
    fd = open_map(pins.judge, "hook_judge", layout.JUDGE)
    if fd is None or libbpf.map_info(fd).max_entries != layout.JUDGE.max_entries:
        if fd is not None:
            os.close(fd)
        raise GuardError(
            f"{pins.judge} is not portguard's hook judge (a foreign or damaged pin): remove it "
            "or choose another pin_dir"
        )
    os.close(fd)


def _set_judge(loaded: libbpf.LoadedObject, program: str) -> None:
    """Make the loaded object's program the judge hook_judge holds: one write."""
    judge = libbpf.Map(loaded.maps["hook_judge"], layout.JUDGE.key, layout.JUDGE.value)
    judge.update(0, loaded.programs[program])


def _let_judge_go(pins: Pins) -> None:
    """Empty hook_judge, so that a judge no program calls does not keep its maps alive."""
    fd = open_map(pins.judge, "hook_judge", layout.JUDGE)
    if fd is not None:
        try:
            libbpf.Map(fd, layout.JUDGE.key, layout.JUDGE.value).delete(0)
        finally:
            os.close(fd)


class _OldGate(C.Structure):
    """struct pg_gate of the versions just before hook_judge."""

    _fields_ = [("live", C.c_uint32), ("pad", C.c_uint32)]


def _old_gate(pins: Pins) -> libbpf.Map | None:
    """The hook_gate those versions pinned, when it is such a map (the caller closes it)."""
    fd = libbpf.get_pinned(pins.gate)
    if fd is None:
        return None
    if libbpf.object_kind(fd)[0] == "map" and libbpf.map_info(fd).value_size == C.sizeof(_OldGate):
        return libbpf.Map(fd, C.c_uint32, _OldGate)
    os.close(fd)
    return None


def _gate_names(pins: Pins, info: libbpf.LinkInfo) -> bool:
    """Whether an older version's hook_gate names the maps of the link's program (which
    then judges, and the program of link_socket_bind lets every bind pass)."""
    gate = _old_gate(pins)
    if gate is None:
        return False
    try:
        value = gate.lookup(0)
    finally:
        os.close(gate.fd)
    return value is not None and value.live in libbpf.prog_map_ids(info.prog_id) - {0}


def _same_code(prog_id: int, prog_fd: int) -> bool:
    """Whether the loaded program with this id has the instructions of the one at prog_fd."""
    fd = libbpf.reopen_program(prog_id)
    try:
        return bytes(libbpf.prog_info(fd).tag) == bytes(libbpf.prog_info(prog_fd).tag)
    finally:
        os.close(fd)


def _end_gate(pins: Pins) -> None:
    """The versions just before hook_judge judged in their own security_socket_bind program
    while the map pinned at hook_gate held their maps' id: zero it (no maps have that id) so
    that such a program, still attached, lets every bind pass, and unpin it (the program
    keeps the map)."""
    if not os.path.lexists(pins.gate):  # every apply but the first after such a version
        return
    gate = _old_gate(pins)
    if gate is not None:
        try:
            gate.update(0, _OldGate(0, 0))
        finally:
            os.close(gate.fd)
    libbpf.unpin(pins.gate)


def _carry_sysctl_records(pins: Pins, maps: Maps) -> None:
    carried: set[int] = set()
    for other in pins.other_maps_dirs():
        carried |= sysctl.records(other) or set()
    if not carried:  # as at every boot: no other maps
        return
    known = sysctl.recorded(maps.sysctl_added)
    if carried - known:
        sysctl.record(maps.sysctl_added, known, known | carried)


def _drop_other_maps(pins: Pins, maps: Maps) -> bool:
    """Maps no link reads any more (older layouts, retired sets, a killed run's): their sysctl
    records are carried over (again: a run killed after loading may not have), the rest is
    dead."""
    others = pins.other_maps_dirs()
    _carry_sysctl_records(pins, maps)
    _carry_counters(others, maps)
    for other in others:
        _unpin_dir(other)
    return bool(others)


def _unpin_dir(directory: str) -> None:
    """Unpin everything in a maps directory, then remove it."""
    for name in os.listdir(directory):
        libbpf.unpin(os.path.join(directory, name))
    os.rmdir(directory)
    libbpf.step()


def _depth_below(directory: str, root: str) -> int:
    """How many components below root a directory is (both from cgroups.directory)."""
    if directory != root and not directory.startswith(root.rstrip("/") + "/"):
        raise ValueError(f"{directory!r} is not in the subpath of {root!r}")
    return len([part for part in directory[len(root) :].split("/") if part])


def _carry_counters(others: list[str], maps: Maps) -> None:
    """Add the refusal counts of maps no link reads any more (older layouts, maps too small
    for the policy) to the current ones, so counts survive new maps. Each key is taken out
    of the old map once added: a run killed in between counts that one key twice at most."""
    olds = []
    for other in others:
        for name in ("denied", "contained"):
            fd = open_map(os.path.join(other, name), name)
            if fd is not None:
                spec = layout.MAPS[name]
                olds.append((name, libbpf.Map(fd, spec.key, spec.value, percpu=True)))
    try:
        if any(old.keys() for _, old in olds):
            libbpf.wait_for_programs()  # an old program may still be counting
        for name, old in olds:
            current = getattr(maps, name)
            for key, values in old.items():
                now = current.lookup(key) or [0] * current.ncpu
                current.update_percpu(key, [a + b for a, b in zip(now, values, strict=True)])
                old.delete(key)
    finally:
        for _, old in olds:
            os.close(old.fd)


def _pin_replace(fd: int, path: str) -> None:
    tmp = path + "_new"  # bpffs refuses names with a dot
    libbpf.unpin(tmp)
    libbpf.pin(fd, tmp)
    libbpf.rename_pin(tmp, path)


def apply_maps(
    maps: Maps,
    plan: Plan,
    cfg: layout.Config,
    cgroup_root: str,
    drop_stale: bool = True,
    empty: bool = False,
) -> bool:
    """Make the active slot say what the plan says: fill the inactive slot, flip, wait until
    no program reads the old slot, clear it. False when it said so already. empty: the maps
    were made by this apply's load and nothing was written to them but the active slot's
    config and the sysctl records carried from other maps (as at boot): there is no slot to
    clear, nor counters to drop."""
    active = maps.active
    wanted_ports = {port for _, port in plan.ports}
    unchanged = (
        not empty
        and slots.read_slot(maps, active) == slots.desired(plan)
        and slots.same_config(maps.config.lookup(active), cfg)
    )
    if unchanged:
        # A killed run may have left a half-filled inactive slot and sysctl entries behind,
        # or someone edited the sysctl: settle both.
        slots.clear_slot(maps, 1 - active, libbpf.wait_for_programs)
        added = sysctl.add(maps.sysctl_added, wanted_ports)
        return sysctl.drop(maps.sysctl_added, wanted_ports) or added
    inactive = 1 - active
    if not empty:
        slots.clear_slot(maps, inactive, libbpf.wait_for_programs)  # leftovers of a killed run
    slots.fill_slot(maps, inactive, plan, cfg, cgroup_root)
    sysctl.add(maps.sysctl_added, wanted_ports)
    slots.flip(maps, inactive)
    # A program that read state.active just before the flip may still be looking up the old
    # slot: clearing it under that program would let a stranger in (its port gone) or keep
    # an owner out (its set or owner gone). Wait until every such program has finished (one
    # RCU grace period; nothing to wait for when the old slot was empty, as at boot).
    if not empty:
        slots.clear_slot(maps, active, libbpf.wait_for_programs)
        reserved = set(plan.ports)
        for counters in (maps.denied, maps.contained):
            counters.delete_many([k for k in counters.keys() if (k.proto, k.port) not in reserved])
    if drop_stale:  # ports another layout's maps added (carried into these) and no longer wanted
        sysctl.drop(maps.sysctl_added, wanted_ports)
    return True


def remove(settings: Settings) -> bool:
    """Detach and unpin everything, restore the sysctl. False when nothing was there."""
    host.require_root("portguard")
    pins = Pins(settings.pin_dir)
    if not os.path.isdir(pins.root):
        return False
    with host.locked(pins.root):
        forget_record(pins.root)
        try:
            _remove_locked(pins)
        except libbpf.BpfError as exc:
            raise GuardError(str(exc)) from None
        except OSError as exc:
            raise GuardError(f"{exc.filename or pins.root}: {exc.strerror}") from None
        leftovers = sorted(os.listdir(pins.root))
        if leftovers:
            raise GuardError(
                f"removed the guard, but {pins.root} holds foreign pins: {', '.join(leftovers)}"
            )
        os.rmdir(pins.root)
    return True


def _remove_locked(pins: Pins) -> None:
    maps = Maps.open_pinned(pins.maps_dir)
    if maps is not None:
        try:
            empty = 1 - maps.active
            slots.clear_slot(maps, empty, libbpf.wait_for_programs)
            current = maps.config.lookup(maps.active)
            if current is not None:
                maps.config.update(empty, current)
            slots.flip(maps, empty)  # no reservation from here on
        finally:
            maps.close()
    maps_dirs = pins.maps_dirs()
    added: set[int] = set()
    for maps_dir in maps_dirs:  # older layouts' records too
        added |= sysctl.records(maps_dir) or set()
    sysctl.release(added)  # the records go with their maps below
    for name in LINK_NAMES:
        libbpf.unpin(pins.link(name))
        libbpf.unpin(pins.staged_link(name))
    libbpf.unpin(pins.judge)  # no program tail-calls it once the links are gone
    libbpf.unpin(pins.gate)  # an older version's
    for maps_dir in maps_dirs:
        _unpin_dir(maps_dir)
