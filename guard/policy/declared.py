"""Reservations declared in systemd unit files: ``X-PortGuard-Reserve=`` in ``[Unit]``. Pure
given the unit directories.

A unit file or drop-in in systemd's unit search path may carry::

    [Unit]
    X-PortGuard-Reserve=ipp 631/udp

Values use the TOML ``ports`` syntax (number, range, /etc/services name, optional /tcp or /udp),
space-separated; the key may repeat, and an empty assignment drops what came before it (unit
file first, then drop-ins in systemd's order), as systemd's own list settings do. systemd
ignores every key that starts with ``X-``, so such a unit needs no change to systemd and
``systemd-analyze verify`` stays quiet. ``[Unit]`` because every unit type has it: a drop-in
reads the same for a service, a socket or a slice.

The declaring unit owns the ports, resolved exactly as a TOML ``unit =`` owner: aliases are
followed, a socket unit owns them with its service, a template's declaration (``foo@.service``
or ``foo@.service.d/*.conf``) is owned by the slice of all its instances, an instance's own
drop-in (``foo@bar.service.d/``) by that instance.

What is applied when a unit's declarations are wrong: nothing of that unit (never half of
it), everything else; the problem is returned for apply to print, and ``status`` exits 5
saying which unit's ports are not guarded. A masked unit loads no file, so its declarations
are not applied either (a note says so). User units and home directories are not read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from guard.policy import units
from guard.policy.config import Origin, OwnerRef, ReserveBlock
from guard.policy.ports import PortRange, PortSpecError, Services, parse_port_spec

KEY = "X-PortGuard-Reserve"
SECTION = "Unit"
_MARK = KEY.encode()
MAX_UNIT_FILE_BYTES = 1 << 20


class Declarations(NamedTuple):
    blocks: tuple[ReserveBlock, ...] = ()
    problems: tuple[str, ...] = ()  # a unit whose declarations are not applied, and why
    notes: tuple[str, ...] = ()  # declarations systemd itself would not load (masked, ...)


def _has_key(path: str) -> bool:
    """Whether the file mentions the key at all: most unit files are passed over on this.
    os.open/os.read on the path string: this runs for every unit file at every apply."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _MARK in os.read(fd, MAX_UNIT_FILE_BYTES)
    except OSError:  # a directory, say
        return False
    finally:
        os.close(fd)


_SUFFIXES = tuple(f".{t}" for t in units.CGROUP_UNIT_SECTIONS)


def _candidates(dirs: Sequence[Path]) -> tuple[list[str], list[str]]:
    """The units that a file carrying the key may apply to, and notes about such files that
    systemd applies to many units at once (``service.d/``, ``foo-.service.d/``)."""
    names: dict[str, None] = {}
    notes: list[str] = []
    for directory in dirs:
        try:
            entries = sorted((e.name, e.path) for e in os.scandir(directory))
        except OSError:
            continue
        for name, path in entries:
            if name.endswith(".d"):
                stem = name[:-2]
                if not stem.endswith(_SUFFIXES) and stem not in units.CGROUP_UNIT_SECTIONS:
                    continue  # e.g. a target's .d: not an owner, systemd reads no port from it
                if not any(_has_key(conf) for conf in _dropin_confs(path)):
                    continue
                if _is_unit_name(stem) and not units.parse_unit_name(stem).prefix.endswith("-"):
                    names[stem] = None
                else:
                    notes.append(
                        f"{path}: {KEY}= is not read from a drop-in directory shared by "
                        "several units; put it in the owner unit's own NAME.d/"
                    )
            elif name.endswith(_SUFFIXES) and _has_key(path) and _is_unit_name(name):
                names[name] = None
    return list(names), notes


def _shared(path: Path) -> bool:
    """A drop-in of a directory systemd applies to many units (``service.d/``,
    ``foo-.service.d/``): not read for the key (_candidates notes it)."""
    directory = path.parent.name
    if not directory.endswith(".d"):
        return False
    stem = directory[:-2]
    return stem in units.CGROUP_UNIT_SECTIONS or (
        _is_unit_name(stem) and units.parse_unit_name(stem).prefix.endswith("-")
    )


def _dropin_confs(directory: str) -> list[str]:
    try:
        return sorted(e.path for e in os.scandir(directory) if e.name.endswith(".conf"))
    except OSError:
        return []


def _is_unit_name(name: str) -> bool:
    try:
        parsed = units.parse_unit_name(name)
    except units.UnitError:
        return False
    return parsed.type in units.CGROUP_UNIT_SECTIONS


def _fold(
    files: Sequence[Path], services: Services
) -> tuple[list[tuple[PortRange, Origin]], list[str], list[str]]:
    """The ports the files declare, in systemd's reading order (an empty assignment
    drops the ones before it); problems (bad values) and notes (the key in another section)."""
    ports: list[tuple[PortRange, Origin]] = []
    problems: list[str] = []
    notes: list[str] = []
    for path in files:
        for section, line, value in units.assignments(path, KEY):
            where = Origin(str(path), line)
            if section != SECTION:
                notes.append(f"{where}: {KEY}= is read in [{SECTION}] only, not in [{section}]")
                continue
            if not value:
                ports.clear()
                continue
            for spec in value.split():
                try:
                    ports.append((parse_port_spec(spec, services), where))
                except PortSpecError as exc:
                    problems.append(f"{where}: {KEY}={spec}: {exc}")
    return ports, problems, notes


def read(dirs: Sequence[Path], services: Services) -> Declarations:
    """Every unit's declared reservations; see the module docstring."""
    names, notes = _candidates(dirs)
    blocks: list[ReserveBlock] = []
    problems: list[str] = []
    done: set[str] = set()
    for name in names:
        try:
            parsed = units.parse_unit_name(name)
            if parsed.instance == "":
                info = units.load_template(name, unit_dirs=dirs)
                owner_kind, owner = "slice", info.slice
            else:
                info = units.load_unit(name, unit_dirs=dirs)
                owner_kind, owner = "unit", info.name
        except units.UnitError as exc:
            problems.append(f"{name}: {exc}; its {KEY}= ports are not reserved")
            continue
        if info.name in done:
            continue  # an alias of a unit already read
        done.add(info.name)
        if info.masked:
            notes.append(f"{name} is masked: systemd loads none of its files, nor does portguard")
            continue
        ports, bad, unit_notes = _fold([f for f in info.files if not _shared(f)], services)
        notes.extend(unit_notes)
        if bad:
            problems.extend(
                f"{problem}; nothing of {info.name}'s {KEY}= is reserved" for problem in bad
            )
            continue
        if ports:
            origin = ports[0][1]
            blocks.append(
                ReserveBlock(tuple(ports), (OwnerRef(owner_kind, owner, origin),), origin)
            )
    return Declarations(tuple(blocks), tuple(problems), tuple(dict.fromkeys(notes)))
