"""portguard monitor: every refused (or, in audit mode, would-be refused) bind, as it happens.

The guard writes one record per denial into the pinned `events` ring buffer; when the buffer is
full the record is dropped and the per-CPU `lost` counter goes up instead (the `denied` counters
stay exact either way). The monitor consumes the buffer, names the caller's cgroup and the
reservation's owners, and reports every increase of `lost` as "lost N events": never silent.

A ring buffer has one consumer position, so one monitor runs at a time per pin directory (a
second one is refused). Records still in the buffer when the monitor starts (denials made while
no monitor ran) are delivered first, with the time they happened; losses from before the start
are not reported here (`status` shows the total since the guard was loaded).
"""

from __future__ import annotations

import signal
import socket
import struct
import time
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
    pid: int
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


class Sink(Protocol):
    def start(self) -> None: ...
    def denial(self, denial: Denial) -> None: ...
    def lost(self, count: int) -> None: ...
    def flush(self) -> None: ...


@dataclass
class Summary:
    received: int = 0
    lost: int = 0


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

    def __init__(self, cgroup_names: CgroupNames, owner_names: OwnerNames):
        self.cgroup_names = cgroup_names
        self.owner_names = owner_names
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC, as is time.monotonic() on Linux
        self.epoch_offset = time.time() - time.monotonic()

    def decode(self, raw: bytes) -> Denial:
        (ts_ns, cgroup_id, pid, uid, port, proto, family, verdict, _set, comm, addr) = (
            EVENT.unpack_from(raw)
        )
        if family == socket.AF_INET:
            address = socket.inet_ntop(socket.AF_INET, addr[:4])
        else:
            address = socket.inet_ntop(socket.AF_INET6, addr)
        cgroup, unit = self.cgroup_names.names(cgroup_id, pid)
        return Denial(
            time=ts_ns / 1e9 + self.epoch_offset,
            pid=pid,
            uid=uid,
            comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
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


def _stop_on_sigterm() -> None:
    def stop(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


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
    SIGINT/SIGTERM. stall_until (for tests): consume nothing until that file exists."""
    require_root("portguard monitor", "the pinned maps are root-only")
    pins = Pins(pin_dir)
    summary = Summary()
    # One consumer per ring buffer: a second monitor would split the events with the first.
    busy = (
        f"another portguard monitor is reading the events of {pin_dir}: "
        "the event buffer has a single reader"
    )
    with locked(pins.root, "monitor", wait=False, busy=busy):
        try:
            maps = Maps.open_pinned(pins.maps_dir)
            events_fd = libbpf.get_pinned(pins.maps_dir / "events")
        except libbpf.BpfError as exc:
            raise GuardError(str(exc)) from None
        if maps is None or events_fd is None:
            libbpf.close(events_fd)
            raise GuardError(
                f"the guard is not loaded (nothing pinned in {pin_dir}): run portguard apply first"
            )
        try:
            _stop_on_sigterm()
            _consume(maps, events_fd, sink, summary, count, duration, stall_until, on_ready)
        except KeyboardInterrupt:
            pass
        except libbpf.BpfError as exc:
            raise GuardError(str(exc)) from None
        finally:
            sink.flush()
            libbpf.close(events_fd)
            maps.close()
    return summary


def _consume(
    maps: Maps,
    events_fd: int,
    sink: Sink,
    summary: Summary,
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
    decoder = Decoder(CgroupNames(cgroup_root), owner_names)

    def on_record(raw: bytes) -> bool:
        sink.denial(decoder.decode(raw))
        summary.received += 1
        return count is None or summary.received + summary.lost < count

    lost_seen = lost_total(maps)
    ring = libbpf.RingBuffer(events_fd, on_record)
    try:
        sink.start()
        on_ready()
        while stall_until is not None and not stall_until.exists():
            time.sleep(0.05)
        deadline = None if duration is None else time.monotonic() + duration
        while True:
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
