"""portguard monitor: every refused (or, in audit mode, would-be refused) bind, as it happens.

The guard writes one record per denial into the pinned `events` ring buffer; when the buffer is
full the record is dropped and the per-CPU `lost` counter goes up instead (the `denied` counters
stay exact either way). The monitor consumes the buffer, names the caller's cgroup and the
reservation's owners, and reports every increase of `lost` as "lost N events": never silent.

A ring buffer has one consumer position, so one monitor runs at a time per pin directory (a
second one is refused). Records still in the buffer when the monitor starts (denials made while
no monitor ran) are delivered first, with the time they happened; losses from before the start
are not reported here (`status` shows the total since the guard was loaded).

SIGINT and SIGTERM only raise a flag, checked after every record and every poll: an exception
raised by a signal handler can land inside the ring buffer's ctypes callback, where ctypes
prints and swallows it and polling goes on. On the way out the records still in the buffer are
counted, not read: the denied counters say how many binds were refused since the start, so
"shown + lost + left in the buffer = refused since start" always holds.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from guard.errors import GuardError
from guard.kernel import cgroups, layout, libbpf, slots
from guard.kernel.host import locked, require_root
from guard.kernel.pins import Maps, Pins
from guard.observe.holders import FAMILY_NAMES, cgroup_paths, process_cgroup, unit_of_cgroup

POLL_MS = 100
VERDICTS = {layout.VERDICT_DENIED: "denied", layout.VERDICT_AUDIT: "audit"}
_CACHE_LIMIT = 4096


@dataclass(slots=True)
class Denial:
    time: float  # seconds since the epoch
    pid: int | None  # as the monitor's pid namespace numbers it; None: not known there
    uid: int
    comm: str
    cgroup_id: int
    cgroup: str | None  # None: the cgroup is gone (and the process with it)
    unit: str | None
    family: str  # "ipv4" | "ipv6"
    protocol: str  # "tcp" | "udp"
    address: str
    port: int
    owners: tuple[str, ...]
    verdict: str  # "denied" | "audit"
    host_pid: int | None = None  # as the initial pid namespace numbers it (the kernel's)


class Sink(Protocol):
    def start(self) -> None: ...
    def denial(self, denial: Denial) -> None: ...
    def lost(self, count: int) -> None: ...
    def flush(self) -> None: ...
    def finish(self) -> None: ...  # the monitor stops: write what is pending


@dataclass
class Summary:
    received: int = 0  # records shown (from before the start too)
    lost: int = 0  # records the full buffer dropped since the start
    received_before_start: int = 0  # of received: refused before the monitor started
    refused: int = 0  # binds refused since the start, by the kernel's exact counters
    stopped_by: str | None = None  # "SIGTERM", "SIGINT", "output closed"; None: count/duration

    @property
    def left(self) -> int:
        """Refused since the start but neither shown nor lost: still in the buffer at exit."""
        shown = self.received - self.received_before_start
        return max(0, self.refused - shown - self.lost)


class StopFlag:
    """Set by SIGINT/SIGTERM; the monitor looks at it between records and polls."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self, signum: int, _frame) -> None:
        self.signal = signal.Signals(signum).name

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def _signals_stop(flag: StopFlag) -> Iterator[None]:
    previous = {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class CgroupNames:
    """cgroup id -> (path, unit). The caller's /proc entry answers at once while it lives;
    else one walk of the cgroup2 tree. Answers (also "gone") are cached: ids are not reused."""

    def __init__(self, root: Path, proc_root: Path = Path("/proc")):
        self.root = root
        self.proc_root = proc_root
        self._names: dict[int, tuple[str | None, str | None]] = {}

    def names(self, cgroup_id: int, pid: int) -> tuple[str | None, str | None]:
        known = self._names.get(cgroup_id)
        if known is not None:
            return known
        if len(self._names) >= _CACHE_LIMIT:
            self._names.clear()
        path = process_cgroup(pid, self.proc_root)
        if path is None or cgroups.cgroup_id(path, self.root) != cgroup_id:
            path = cgroup_paths({cgroup_id}, self.root).get(cgroup_id)
        known = self._names[cgroup_id] = (path, unit_of_cgroup(path) if path else None)
        return known


PROC_PID_INIT_INO = 0xEFFFFFFC  # the initial pid namespace's inode number (include/linux/proc_ns.h)


class LocalPids:
    """The kernel records pids as the initial pid namespace numbers them. A monitor in another
    pid namespace (a container's) shows the caller's pid as that namespace numbers it, as
    status does: the caller's cgroup.procs lists its processes in the reader's numbering, and
    the one with the event's command is the caller. None when that is not unique (several
    processes with the same command) or the caller is gone or not visible from here; the
    kernel's pid stays in the event as host_pid."""

    def __init__(self, cgroup_root: Path, proc_root: Path = Path("/proc")):
        self.cgroup_root = cgroup_root
        self.proc_root = proc_root
        try:
            own = (proc_root / "self" / "ns" / "pid").stat().st_ino
        except OSError:
            own = PROC_PID_INIT_INO
        self.translate = own != PROC_PID_INIT_INO
        self._known: dict[tuple[int, int], int | None] = {}

    def local(self, host_pid: int, cgroup_id: int, cgroup: str | None, comm: str) -> int | None:
        if not self.translate:
            return host_pid
        key = (host_pid, cgroup_id)
        if key in self._known:
            return self._known[key]
        if len(self._known) >= _CACHE_LIMIT:
            self._known.clear()
        found = None if cgroup is None else self._find(cgroup, comm)
        if found is not None:  # not cached when unknown: the next event may find it
            self._known[key] = found
        return found

    def _find(self, cgroup: str, comm: str) -> int | None:
        try:
            directory = cgroups.directory(cgroup, self.cgroup_root)
            with open(os.path.join(directory, "cgroup.procs")) as f:
                procs = [int(x) for x in f.read().split()]
        except (OSError, ValueError, cgroups.CgroupError):
            return None
        matches = []
        for pid in procs:
            if pid == 0:  # a process of an outer pid namespace
                continue
            try:
                name = (self.proc_root / str(pid) / "comm").read_text().rstrip("\n")
            except OSError:
                continue
            if name == comm:
                matches.append(pid)
        return matches[0] if len(matches) == 1 else None


class OwnerNames:
    """(protocol, port) -> owner cgroup paths, as the active slot says; re-read after a flip."""

    def __init__(self, maps: Maps):
        self.maps = maps
        self.slot: int | None = None
        self._owners: dict[tuple[int, int], tuple[str, ...]] = {}
        self._paths: dict[str, int] | None = None  # the slot's owner paths, walked once

    def refresh(self) -> None:
        active = self.maps.active
        if active != self.slot:
            self.slot = active
            self._owners.clear()
            self._paths = None

    def owners(self, proto: int, port: int) -> tuple[str, ...]:
        key = (proto, port)
        if key not in self._owners:
            contents = slots.read_slot(self.maps, self.slot, [key], self._paths)
            self._paths = contents.paths
            self._owners[key] = contents.owners_of(proto, port)
        return self._owners[key]


# struct pg_event (bpf/guard.h, guard.kernel.layout.Event): unpacked with struct, several times
# faster than through ctypes on the monitor's hot path; a unit test compares the two.
EVENT = struct.Struct("=QQIIHBBB3xI16s16s")  # native order: the object is built for it


class Decoder:
    """Raw ring buffer records -> Denial."""

    def __init__(
        self,
        cgroup_names: CgroupNames,
        owner_names: OwnerNames,
        local_pids: LocalPids | None = None,
    ):
        self.cgroup_names = cgroup_names
        self.owner_names = owner_names
        self.local_pids = local_pids
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC, as is time.monotonic() on Linux
        self.epoch_offset = time.time() - time.monotonic()
        self.last_ts_ns = 0  # of the record decoded last

    def decode(self, raw: bytes) -> Denial:
        (ts_ns, cgroup_id, pid, uid, port, proto, family, verdict, _set, comm, addr) = (
            EVENT.unpack_from(raw)
        )
        self.last_ts_ns = ts_ns
        if family == socket.AF_INET:
            address = socket.inet_ntop(socket.AF_INET, addr[:4])
        else:
            address = socket.inet_ntop(socket.AF_INET6, addr)
        cgroup, unit = self.cgroup_names.names(cgroup_id, pid)
        name = comm.split(b"\0", 1)[0].decode(errors="replace")
        return Denial(
            time=ts_ns / 1e9 + self.epoch_offset,
            pid=pid
            if self.local_pids is None
            else self.local_pids.local(pid, cgroup_id, cgroup, name),
            host_pid=pid,
            uid=uid,
            comm=name,
            cgroup_id=cgroup_id,
            cgroup=cgroup,
            unit=unit,
            family=FAMILY_NAMES.get(family, str(family)),
            protocol=layout.PROTOCOL_NAMES.get(proto, str(proto)),
            address=address,
            port=port,
            owners=self.owner_names.owners(proto, port),
            verdict=VERDICTS.get(verdict, str(verdict)),
        )


def lost_total(maps: Maps) -> int:
    values = maps.lost.lookup(0)
    return sum(values) if values else 0


def denied_total(maps: Maps) -> int:
    return sum(sum(values) for _, values in maps.denied.items())


def run(
    pin_dir: Path,
    sink: Sink,
    *,
    count: int | None = None,
    duration: float | None = None,
    stall_until: Path | None = None,
    on_ready=lambda: None,
) -> Summary:
    """Report denials to sink until count events (delivered + lost) or duration seconds or
    SIGINT/SIGTERM or until the output is closed (BrokenPipeError). stall_until (for tests):
    consume nothing until that file exists."""
    require_root("portguard monitor", "the pinned maps are root-only")
    pins = Pins(pin_dir)
    summary = Summary()
    stop = StopFlag()
    # One consumer per ring buffer: a second monitor would split the events with the first.
    busy = (
        f"another portguard monitor is reading the events of {pin_dir}: "
        "the event buffer has a single reader"
    )
    with _signals_stop(stop), locked(pins.root, "monitor", wait=False, busy=busy):
        try:
            maps = Maps.open_pinned(pins.maps_dir)
            events_fd = libbpf.get_pinned(os.path.join(pins.maps_dir, "events"))

        except libbpf.BpfError as exc:
            raise GuardError(str(exc)) from None
        if maps is None or events_fd is None:
            libbpf.close(events_fd)
            raise GuardError(
                f"the guard is not loaded (nothing pinned in {pin_dir}): run portguard apply first"
            )
        try:
            denied_at_start = denied_total(maps)
            _consume(maps, events_fd, sink, summary, stop, count, duration, stall_until, on_ready)
        except BrokenPipeError:
            summary.stopped_by = "output closed"
        except libbpf.BpfError as exc:
            raise GuardError(str(exc)) from None
        finally:
            try:
                sink.finish()
            except BrokenPipeError:
                summary.stopped_by = "output closed"
            summary.refused = denied_total(maps) - denied_at_start
            if summary.stopped_by is None:
                summary.stopped_by = stop.signal
            libbpf.close(events_fd)
            maps.close()
    return summary


def _consume(
    maps: Maps,
    events_fd: int,
    sink: Sink,
    summary: Summary,
    stop: StopFlag,
    count: int | None,
    duration: float | None,
    stall_until: Path | None,
    on_ready,
) -> None:
    try:
        cgroup_root = cgroups.cgroup2_mount()
    except cgroups.CgroupError as exc:
        raise GuardError(str(exc)) from None
    owner_names = OwnerNames(maps)
    owner_names.refresh()
    decoder = Decoder(CgroupNames(cgroup_root), owner_names, LocalPids(cgroup_root))
    start_ns = time.monotonic_ns()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC too

    def on_record(raw: bytes) -> bool:
        denial = decoder.decode(raw)
        summary.received += 1
        if decoder.last_ts_ns < start_ns:
            summary.received_before_start += 1
        sink.denial(denial)
        if stop:
            return False  # this record is shown; the rest of the buffer is counted on the way out
        return count is None or summary.received + summary.lost < count

    lost_seen = lost_total(maps)
    ring = libbpf.RingBuffer(events_fd, on_record)
    try:
        sink.start()
        on_ready()
        while stall_until is not None and not stall_until.exists() and not stop:
            time.sleep(0.05)
        deadline = None if duration is None else time.monotonic() + duration
        while not stop:
            owner_names.refresh()
            ring.poll(POLL_MS)
            lost_now = lost_total(maps)
            if lost_now > lost_seen:
                sink.lost(lost_now - lost_seen)
                summary.lost += lost_now - lost_seen
                lost_seen = lost_now
            sink.flush()
            if count is not None and summary.received + summary.lost >= count:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
    finally:
        ring.close()
