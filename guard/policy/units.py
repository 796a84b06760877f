"""Resolve systemd unit and slice names to cgroup paths, the way systemd lays them out.

Owners in the configuration may be named as units (``cups.service``) or slices
(``user.slice``). The kernel side needs cgroup paths relative to the cgroup2 root (e.g.
``/system.slice/cups.service``). When systemd runs we ask it (:func:`ask_systemd`), because only
it knows about transient units, runtime drop-ins and ``systemctl set-property``. In early boot,
chroots and tests it is not there to ask, so :func:`unit_cgroup_path` derives the same answer from
the unit files, following systemd's own rules (src/basic/unit-name.c, src/basic/cgroup-util.c,
src/core/unit.c, src/shared/dropin.c):

- a unit's cgroup is ``<its slice's path>/<escaped unit name>``;
- a slice's path is its dash-separated prefix chain: ``a-b.slice`` -> ``/a.slice/a-b.slice``;
- ``Slice=`` in the unit file or a drop-in picks the slice; otherwise template instances go to
  ``system-<template>.slice`` and everything else to ``system.slice`` (``init.scope`` and
  ``-.slice`` are at the root);
- the first unit directory holding a file of that name wins; drop-ins from all directories are
  merged, a drop-in file name in a higher-priority directory hides the same name lower down, and
  they apply in file-name order, so the lexically last ``Slice=`` wins;
- an alias (a unit file that is a symlink to a differently named unit) is the unit it points to;
- a masked unit (symlink to ``/dev/null``, or an empty file) loads nothing: it keeps the default
  path for its name. Nothing can ever start in it, so reserving its ports still means
  "nobody gets them", which is the honest reading of a masked owner.

A unit that is not installed at all still gets the path its name implies. That is deliberate: the
in-kernel cgroup tracking makes the owner the owner from the instant systemd creates the cgroup,
so a package installed after ``portguard apply`` is covered once the config is re-applied.

User units are named ``user@UID.service/NAME`` (the path below the user manager). The user
manager's own cgroup is resolved like any system unit (``user@.service`` sets
``Slice=user-%i.slice``); the part below it is derived from the name alone with the user
manager's defaults (``app.slice``, ``app-<template>.slice``), plus ``Slice=`` from the system-wide
user unit directories. Users' home directories are never read: they may not be mounted at boot,
and a per-user override could only move the unit within that user's own subtree anyway.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

#: systemd's search path for system units, highest priority first (systemd.unit(5)).
#: /lib/systemd/system is kept for distributions that have not merged /usr.
SYSTEM_UNIT_DIRS: tuple[Path, ...] = (
    Path("/etc/systemd/system.control"),
    Path("/run/systemd/system.control"),
    Path("/run/systemd/transient"),
    Path("/run/systemd/generator.early"),
    Path("/etc/systemd/system"),
    Path("/etc/systemd/system.attached"),
    Path("/run/systemd/system"),
    Path("/run/systemd/system.attached"),
    Path("/run/systemd/generator"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
    Path("/run/systemd/generator.late"),
)

#: Replaces SYSTEM_UNIT_DIRS (colon-separated, highest priority first): chroots, tests.
UNIT_DIRS_ENV = "PORTGUARD_UNIT_DIRS"


def search_dirs() -> list[Path]:
    """The system unit search path: PORTGUARD_UNIT_DIRS when set, else systemd's."""
    value = os.environ.get(UNIT_DIRS_ENV)
    if value:
        return [Path(p) for p in value.split(":") if p]
    return list(SYSTEM_UNIT_DIRS)


#: System-wide user unit directories; home directories are left out on purpose (module docstring).
USER_UNIT_DIRS: tuple[Path, ...] = (
    Path("/etc/systemd/user"),
    Path("/run/systemd/user"),
    Path("/usr/local/lib/systemd/user"),
    Path("/usr/lib/systemd/user"),
)

#: Unit types that have a cgroup, with the unit-file section where their Slice= lives.
#: Slices have no Slice= (their parent is implied by the name).
CGROUP_UNIT_SECTIONS: dict[str, str | None] = {
    "service": "Service",
    "socket": "Socket",
    "scope": "Scope",
    "mount": "Mount",
    "swap": "Swap",
    "slice": None,
}
#: Valid unit types that never own processes, so cannot own a port.
CGROUPLESS_UNIT_TYPES = frozenset({"target", "device", "automount", "timer", "path"})

UNIT_NAME_MAX = 255  # systemd's UNIT_NAME_MAX is 256 including the terminating NUL
ROOT_SLICE = "-.slice"
INIT_SCOPE = "init.scope"
SYSTEMCTL_TIMEOUT = 3.0  # seconds; a hung PID 1 must not hang `portguard apply`

_VALID_CHARS = re.compile(r"[A-Za-z0-9:_.\\-]")
_NAME_CHARS = re.compile(r"[A-Za-z0-9:_.\\@-]+")
# cgroup file names a unit name must not collide with (cg_needs_escape in cgroup-util.c).
_CGROUP_CONTROLLERS = (
    "cpu",
    "cpuacct",
    "cpuset",
    "io",
    "blkio",
    "memory",
    "devices",
    "pids",
    "bpf-firewall",
    "bpf-devices",
    "bpf-foreign",
    "bpf-socket-bind",
    "bpf-restrict-network-interfaces",
)


class UnitError(ValueError):
    """A unit or slice name that systemd would reject, or that cannot own a port."""


class UnitName(NamedTuple):
    """A unit name split the way systemd splits it: ``prefix@instance.type``.

    ``instance`` is None for a plain unit and ``""`` for a template (``foo@.service``).
    """

    prefix: str
    instance: str | None
    type: str

    @property
    def name(self) -> str:
        at = "" if self.instance is None else "@" + self.instance
        return f"{self.prefix}{at}.{self.type}"

    @property
    def template(self) -> str | None:
        """``foo@.service`` for an instance or template, None for a plain unit."""
        return None if self.instance is None else f"{self.prefix}@.{self.type}"


class UnitInfo(NamedTuple):
    """What the unit files say about one unit: enough to place it and to explain the placement."""

    requested: str  # the name as given
    name: str  # the primary name after following aliases; the cgroup directory is named after it
    fragment: Path | None  # the unit file that was loaded, None when not installed or masked
    masked: bool
    slice: str  # the slice unit it is placed in
    cgroup_path: str  # relative to the cgroup2 root
    files: tuple[Path, ...] = ()  # the unit file then its drop-ins, in the order systemd reads


def parse_unit_name(unit: str) -> UnitName:
    """Validate ``unit`` as systemd's unit_name_is_valid() does and split it.

    Raises UnitError naming what is wrong, so a config error says more than "invalid".
    """
    if not unit:
        raise UnitError("empty unit name")
    if len(unit) > UNIT_NAME_MAX:
        raise UnitError(f"unit name {unit!r} is longer than {UNIT_NAME_MAX} characters")
    stem, dot, unit_type = unit.rpartition(".")
    if not dot or not stem:
        raise UnitError(f"{unit!r} is not a unit name: it needs a type suffix such as .service")
    if unit_type not in CGROUP_UNIT_SECTIONS and unit_type not in CGROUPLESS_UNIT_TYPES:
        raise UnitError(f"{unit!r} has unknown unit type {unit_type!r}")
    if not _NAME_CHARS.fullmatch(stem):
        bad = sorted({c for c in stem if not _NAME_CHARS.fullmatch(c)})
        raise UnitError(
            f"{unit!r} contains characters systemd does not allow in unit names: {bad!r}"
            " (escape them with systemd-escape)"
        )
    prefix, at, instance = stem.partition("@")
    if at and not prefix:
        raise UnitError(f"{unit!r} is not a unit name: nothing before '@'")
    return UnitName(prefix, instance if at else None, unit_type)


def _owner_unit_name(unit: str) -> UnitName:
    """parse_unit_name, plus the checks that make a unit usable as a port owner."""
    parsed = parse_unit_name(unit)
    if parsed.type in CGROUPLESS_UNIT_TYPES:
        raise UnitError(
            f"{unit!r} is a .{parsed.type} unit, which runs no processes and has no cgroup;"
            " name the service, socket, scope or slice that binds the port"
        )
    if parsed.instance == "":
        raise UnitError(
            f"{unit!r} is a template; name an instance (e.g. {parsed.prefix}@NAME.{parsed.type})"
            f" or the template's slice (system-{unit_name_escape(parsed.prefix)}.slice)"
        )
    return parsed


def unit_name_escape(text: str) -> str:
    """Escape ``text`` like systemd's unit_name_escape(): ``/`` -> ``-``, others -> ``\\xNN``.

    Needed for a template's implicit slice: ``foo-bar@x.service`` lives in
    ``system-foo\\x2dbar.slice`` so that the dash does not make a deeper slice.
    """
    out = []
    for i, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif (i == 0 and char == ".") or char in "-\\" or not _VALID_CHARS.fullmatch(char):
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
        else:
            out.append(char)
    return "".join(out)


def unit_name_unescape(text: str) -> str:
    """The inverse of unit_name_escape, for the ``%I``/``%J``/``%P`` specifiers."""
    raw = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text.replace("-", "/"))
    return raw.encode("latin-1", errors="replace").decode("utf-8", errors="replace")


def cgroup_escape(name: str) -> str:
    """The cgroup directory name systemd uses for a unit (cg_escape in cgroup-util.c).

    Names that could collide with cgroupfs's own files (``cgroup.*``, ``memory.*``, ...) or start
    with ``_``/``.`` get a leading ``_``. Unit-name escapes such as ``\\x2d`` are kept as they are.
    """
    needs = (
        name[0] in "_."
        or name in ("notify_on_release", "release_agent", "tasks")
        or name.startswith("cgroup.")
        or any(name.startswith(c + ".") for c in _CGROUP_CONTROLLERS)
    )
    return "_" + name if needs else name


def slice_cgroup_path(slice_name: str) -> str:
    """The cgroup path of a slice: every dash starts a parent slice (cg_slice_to_path).

    ``a-b-c.slice`` -> ``/a.slice/a-b.slice/a-b-c.slice``; ``-.slice`` -> ``/``.
    """
    if slice_name == ROOT_SLICE:
        return "/"
    parsed = parse_unit_name(slice_name)
    if parsed.type != "slice":
        raise UnitError(f"{slice_name!r} is not a slice (it must end in .slice)")
    if parsed.instance is not None:
        raise UnitError(f"{slice_name!r}: slices cannot be templates or instances")
    prefix = parsed.prefix
    if prefix.startswith("-") or prefix.endswith("-") or "--" in prefix:
        raise UnitError(
            f"{slice_name!r}: a slice name may not start or end with '-' or contain '--'"
            " (each '-' separates a parent slice)"
        )
    parts = prefix.split("-")
    chain = ["-".join(parts[: i + 1]) + ".slice" for i in range(len(parts))]
    return "/" + "/".join(cgroup_escape(name) for name in chain)


def _join(parent: str, name: str) -> str:
    return parent.rstrip("/") + "/" + cgroup_escape(name)


# --- unit files ---------------------------------------------------------------------------------


def assignments(path: Path, key: str, text: str | None = None) -> list[tuple[str | None, int, str]]:
    """Every assignment of ``key`` in a systemd unit file as (section, line, value), in file
    order; ``line`` is where the assignment starts.

    A small reader for systemd's ini dialect: ``#``/``;`` comments, trailing-backslash
    continuations, and repeated keys (the caller decides what repetition means). configparser
    gets continuations and repeated keys wrong for this format.
    """
    if text is None:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
    found: list[tuple[str | None, int, str]] = []
    current = None
    pending, pending_line = "", 0

    def take(line: str, number: int) -> None:
        name, eq, value = line.partition("=")
        if eq and name.strip() == key:
            found.append((current, number, value.strip()))

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if pending:
            if line.startswith(("#", ";")):
                continue
            line = pending + " " + line
            pending = ""
        elif not line or line.startswith(("#", ";")):
            continue
        else:
            pending_line = number
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        take(line, pending_line)
    if pending:
        take(pending, pending_line)
    return found


def _assignments(path: Path, section: str, key: str) -> list[str]:
    """Every value of ``key`` in ``[section]`` of a unit file, in file order."""
    return [value for where, _, value in assignments(path, key) if where == section]


def _is_masked(path: Path) -> bool:
    """systemd treats a unit file that is /dev/null or empty as masked (null_or_empty)."""
    try:
        resolved = path.resolve()
        return str(resolved) == os.devnull or (resolved.is_file() and resolved.stat().st_size == 0)
    except OSError:
        return False


# Within a listing_cache() block, each unit directory is listed once and every "is there a
# file or directory of this name?" of the block is answered from that listing: apply asks it
# for ~40 units in ~15 directories, several names each (~40 ms of a boot's apply otherwise).
_listings: dict[Path, frozenset[str]] | None = None


@contextmanager
def listing_cache() -> Iterator[None]:
    """Answer existence questions about unit directories from one listing each, for a block
    in which the unit files are taken as they are (one apply, one dry run)."""
    global _listings
    previous = _listings
    _listings = {} if previous is None else previous
    try:
        yield
    finally:
        _listings = previous


def _exists(directory: Path, name: str) -> bool:
    """Whether directory/name exists (a dangling symlink too), from the block's listing."""
    if _listings is None:
        return os.path.lexists(directory / name)
    names = _listings.get(directory)
    if names is None:
        try:
            names = frozenset(os.listdir(directory))
        except OSError:
            names = frozenset()
        _listings[directory] = names
    return name in names


def _find_fragment(name: UnitName, dirs: Sequence[Path]) -> Path | None:
    """The unit file systemd loads: the first directory holding the name, else the template."""
    candidates = [name.name] + ([name.template] if name.instance else [])
    for candidate in candidates:
        for directory in dirs:
            if _exists(directory, candidate):
                return directory / candidate
    return None


def _follow_alias(name: UnitName, fragment: Path) -> UnitName:
    """The primary name behind a symlinked unit file (``sshd.service`` -> ``ssh.service``).

    A symlink to a file with the same name is a linked unit, not an alias. An alias of a template
    carries the instance over (``foo@x`` via ``foo@.service`` -> ``bar@.service`` is ``bar@x``).
    """
    try:
        target = fragment.resolve()
    except OSError:
        return name
    if target.name == fragment.name:
        return name
    try:
        aliased = parse_unit_name(target.name)
    except UnitError:
        return name  # a symlink to an oddly named file; systemd loads it under the asked name
    if aliased.type != name.type:
        return name
    if aliased.instance == "" and name.instance:
        return UnitName(aliased.prefix, name.instance, aliased.type)
    return aliased


def _dropin_stems(unit: str) -> list[str]:
    """Names whose ``.d`` directories hold drop-ins for ``unit``, most specific first.

    Mirrors unit_file_find_dirs() in systemd's dropin.c: the name, its template, and then the
    dash-prefix hierarchy (``foo-bar-baz.service`` also reads ``foo-bar-.service.d`` and
    ``foo-.service.d``).
    """
    parsed = parse_unit_name(unit)
    stems = [unit]
    if parsed.instance:
        stems += _dropin_stems(parsed.template or unit)
    prefix = parsed.prefix
    dash = prefix.rfind("-")
    if dash == len(prefix) - 1 and dash > 0:  # "foo-.service" itself: step up once more
        prefix = prefix[:-1]
        dash = prefix.rfind("-")
    if dash <= 0:
        return stems
    instance = f"@{parsed.instance}" if parsed.instance else ""
    stems += _dropin_stems(f"{prefix[: dash + 1]}{instance}.{parsed.type}")
    return list(dict.fromkeys(stems))


def dropin_files(names: Sequence[str], dirs: Sequence[Path]) -> list[Path]:
    """The drop-in ``*.conf`` files systemd applies for a unit known by ``names``, in order.

    Files are collected from every unit directory; a file name seen in a higher-priority (or
    more specific) directory hides the same name elsewhere, and the survivors apply sorted by
    file name, as conf_files_list does. The top-level ``<type>.d`` directories come last.
    """
    unit_type = parse_unit_name(names[0]).type
    stems = list(dict.fromkeys(stem for name in names for stem in _dropin_stems(name)))
    directories = [(d, f"{stem}.d") for d in dirs for stem in stems]
    directories += [(d, f"{unit_type}.d") for d in dirs]
    chosen: dict[str, Path] = {}
    for parent, name in directories:
        if not _exists(parent, name):
            continue
        directory = parent / name
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".conf") and entry.name not in chosen:
                chosen[entry.name] = entry
    return [chosen[key] for key in sorted(chosen)]


def _expand_specifiers(value: str, name: UnitName) -> str:
    """Resolve the name-derived specifiers systemd allows in ``Slice=`` (e.g. ``user-%i.slice``).

    Host-dependent specifiers (%H, %u, ...) are refused: the answer would depend on the machine
    running portguard rather than on the unit, so it cannot be derived purely.
    """
    instance = name.instance or ""
    prefix_last = name.prefix.rsplit("-", 1)[-1]
    table = {
        "%": "%",
        "n": name.name,
        "N": name.name.rsplit(".", 1)[0],
        "p": name.prefix,
        "P": unit_name_unescape(name.prefix),
        "i": instance,
        "I": unit_name_unescape(instance),
        "j": prefix_last,
        "J": unit_name_unescape(prefix_last),
    }

    def replace(match: re.Match[str]) -> str:
        spec = match.group(1)
        if spec not in table:
            raise UnitError(
                f"{name.name}: Slice= uses specifier %{spec}, which portguard cannot resolve"
                " without systemd; ask systemd (run it) or spell the slice out"
            )
        return table[spec]

    return re.sub(r"%(.)", replace, value)


def _slice_setting(name: UnitName, files: Sequence[Path]) -> str | None:
    """The effective ``Slice=`` across the unit file and its drop-ins: the last valid one.

    systemd ignores an assignment that does not name a valid slice (logging a warning), so an
    invalid or empty value here leaves the previous one in force.
    """
    section = CGROUP_UNIT_SECTIONS.get(name.type)
    if section is None:
        return None
    chosen = None
    for path in files:
        for value in _assignments(path, section, "Slice"):
            expanded = _expand_specifiers(value, name)
            try:
                slice_cgroup_path(expanded)
            except UnitError:
                continue
            chosen = expanded
    return chosen


def _default_slice(name: UnitName, *, user: bool) -> str:
    """Where systemd puts a unit that sets no Slice= (unit_set_default_slice in unit.c)."""
    if name.name == INIT_SCOPE:
        return ROOT_SLICE
    if name.instance:
        template_slice = unit_name_escape(name.prefix)
        return f"app-{template_slice}.slice" if user else f"system-{template_slice}.slice"
    return "app.slice" if user else "system.slice"


def load_unit(
    unit: str, *, unit_dirs: Sequence[Path] | None = None, user: bool = False
) -> UnitInfo:
    """Read what the unit files say about ``unit`` and place it; see the module docstring.

    ``user=True`` applies the user manager's defaults (paths are then relative to the user
    manager's cgroup) and, unless ``unit_dirs`` is given, reads the system-wide user unit dirs.
    """
    parsed = _owner_unit_name(unit)
    dirs = (
        list(unit_dirs)
        if unit_dirs is not None
        else list(USER_UNIT_DIRS if user else SYSTEM_UNIT_DIRS)
    )
    if parsed.type == "slice":
        fragment = _find_fragment(parsed, dirs)
        masked = fragment is not None and _is_masked(fragment)
        files = _unit_files(fragment, masked, [unit], dirs)
        return UnitInfo(
            requested=unit,
            name=unit,
            fragment=fragment,
            masked=masked,
            slice=unit,
            cgroup_path=slice_cgroup_path(unit),
            files=files,
        )

    names = [parsed]
    fragment = _find_fragment(parsed, dirs)
    masked = fragment is not None and _is_masked(fragment)
    seen = {parsed.name}
    while fragment is not None and not masked:
        primary = _follow_alias(names[-1], fragment)
        if primary.name in seen:
            break
        seen.add(primary.name)
        names.append(primary)
        # The file is found by its primary name first (a higher-priority copy wins), else it is
        # the symlink's target itself, which may live outside the search path.
        fragment = _find_fragment(primary, dirs) or fragment.resolve()
        masked = fragment is not None and _is_masked(fragment)
    primary = names[-1]

    if masked:
        # A masked unit loads neither its file nor its drop-ins; its name decides the path.
        slice_name = _default_slice(parsed, user=user)
        return UnitInfo(
            unit,
            parsed.name,
            None,
            True,
            slice_name,
            _join(_slice_path(slice_name, user), parsed.name),
        )

    files = _unit_files(fragment, False, [n.name for n in reversed(names)], dirs)
    slice_name = _slice_setting(primary, files) or _default_slice(primary, user=user)
    return UnitInfo(
        requested=unit,
        name=primary.name,
        fragment=fragment,
        masked=False,
        slice=slice_name,
        cgroup_path=_join(_slice_path(slice_name, user), primary.name),
        files=files,
    )


def load_template(template: str, *, unit_dirs: Sequence[Path] | None = None) -> UnitInfo:
    """What the unit files say about every instance of ``template`` (``foo@.service``): its
    files (the template's own and its drop-ins) and the slice all its instances are placed in,
    whose cgroup is ``cgroup_path``. A ``Slice=`` that depends on the instance (``%i``) has no
    single answer and raises UnitError."""
    parsed = parse_unit_name(template)
    if parsed.instance != "" or parsed.type not in CGROUP_UNIT_SECTIONS:
        raise UnitError(f"{template!r} is not a template of a unit type with a cgroup")
    dirs = list(unit_dirs) if unit_dirs is not None else list(SYSTEM_UNIT_DIRS)
    fragment = _find_fragment(parsed, dirs)
    masked = fragment is not None and _is_masked(fragment)
    files = _unit_files(fragment, masked, [template], dirs)
    section = CGROUP_UNIT_SECTIONS[parsed.type]
    for path in files:
        for value in _assignments(path, section, "Slice") if section else ():
            if re.search(r"%[iInNjJ]", value):
                raise UnitError(
                    f"{path}: Slice={value} differs per instance of {template}; "
                    "declare the ports in each instance's drop-in (NAME@INSTANCE.service.d)"
                )
    slice_name = _slice_setting(parsed, files) or f"system-{unit_name_escape(parsed.prefix)}.slice"
    return UnitInfo(
        template, template, fragment, masked, slice_name, slice_cgroup_path(slice_name), files
    )


def _unit_files(
    fragment: Path | None, masked: bool, names: Sequence[str], dirs: Sequence[Path]
) -> tuple[Path, ...]:
    """The unit file, then the drop-ins of a unit known by ``names``, in the order systemd
    reads them; nothing for a masked unit (systemd loads neither)."""
    if masked:
        return ()
    return ((fragment,) if fragment is not None else ()) + tuple(dropin_files(names, dirs))


def _slice_path(slice_name: str, user: bool) -> str:
    """A slice's path; in a user manager ``-.slice`` is the manager's own cgroup, shown as ''."""
    path = slice_cgroup_path(slice_name)
    return "" if user and path == "/" else path


def _split_user_unit(unit: str) -> tuple[str, str] | None:
    """``user@1000.service/app.slice/foo.service`` -> (``user@1000.service``, ``foo.service``).

    Intermediate components are accepted only when they match where the unit really lives, so a
    typo cannot silently point at a different cgroup.
    """
    if "/" not in unit:
        return None
    manager, *rest = unit.split("/")
    if not re.fullmatch(r"user@[0-9]+\.service", manager):
        raise UnitError(f"{unit!r}: only user units are named with a '/', as user@UID.service/NAME")
    if not rest or not rest[-1]:
        raise UnitError(f"{unit!r}: name the user unit after {manager}/")
    return manager, "/".join(rest)


def unit_cgroup_path(unit: str, *, unit_dirs: Sequence[Path] | None = None) -> str:
    """The cgroup path of ``unit`` relative to the cgroup2 root, derived from unit files only.

    Pure given the directories: nothing is asked of systemd. ``unit_dirs`` replaces the system
    search path (highest priority first); for a user unit (``user@UID.service/NAME``) it is used
    for the user manager and the system-wide user unit directories are read for NAME.
    """
    split = _split_user_unit(unit)
    if split is None:
        return load_unit(unit, unit_dirs=unit_dirs).cgroup_path
    manager, inner = split
    return _user_unit_path(load_unit(manager, unit_dirs=unit_dirs).cgroup_path, unit, inner)


def _user_unit_path(manager_path: str, unit: str, inner: str) -> str:
    leaf = inner.rsplit("/", 1)[-1]
    relative = load_unit(leaf, user=True).cgroup_path
    if relative == "/":
        return manager_path
    if "/" in inner and relative != "/" + inner and relative.lstrip("/") != inner:
        raise UnitError(f"{unit!r}: {leaf} lives at {relative} below the user manager")
    return manager_path.rstrip("/") + (relative if relative.startswith("/") else "/" + relative)


# --- asking systemd -----------------------------------------------------------------------------


def systemd_running() -> bool:
    """True when systemd is PID 1 of this system (the sd_booted() test)."""
    return Path("/run/systemd/system").is_dir()


#: What ask_systemd and manager_cgroup_root read; asked for together, so one answer serves both.
SHOWN_PROPERTIES = ("Id", "ControlGroup", "Slice", "LoadState")

#: systemd's answers per unit while a batch is open (see :func:`systemd_batch`); None outside.
_answers: dict[str, dict[str, str] | None] | None = None


def _run_systemctl_show(
    names: Sequence[str], properties: Sequence[str]
) -> list[dict[str, str]] | None:
    """One ``systemctl show`` for all ``names``: one property block per unit, in order.

    None when systemctl fails or hangs (systemd then knows nothing, as if it did not run);
    [] when the answer cannot be split into one block per unit."""
    command = ["systemctl", "show", "--no-pager"]
    for prop in properties:
        command += ["-p", prop]
    command += ["--", *names]
    import subprocess  # here: apply at boot, before systemd answers, never needs it

    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    # Blocks are separated by one empty line; every requested property is printed, empty or not.
    blocks: list[dict[str, str]] = [{}]
    for line in result.stdout.splitlines():
        if not line:
            blocks.append({})
            continue
        key, eq, value = line.partition("=")
        if eq:
            blocks[-1][key] = value
    blocks = [block for block in blocks if block]
    return blocks if len(blocks) == len(names) else []


def _systemctl_show(unit: str, properties: Sequence[str]) -> dict[str, str] | None:
    """systemd's properties of one unit: from the open batch when it holds the unit, else asked."""
    if _answers is not None and unit in _answers:
        return _answers[unit]
    blocks = _run_systemctl_show([unit], properties)
    shown = blocks[0] if blocks else None
    if _answers is not None:
        _answers[unit] = shown
    return shown


@contextmanager
def systemd_batch(names: Iterable[str]) -> Iterator[None]:
    """Ask systemd once about ``names`` (and ``-.slice``, for manager_cgroup_root) and answer
    every ask_systemd inside the block from that one reply; a unit not named is asked once and
    remembered. Outside a block every question is a ``systemctl show`` of its own. One process
    instead of one per question: with systemd running, apply used to start ~25 of them."""
    global _answers
    previous = _answers
    _answers = {} if previous is None else previous
    try:
        if systemd_running():
            wanted = list(dict.fromkeys([ROOT_SLICE, *names]))
            wanted = [name for name in wanted if name not in _answers]
            if wanted:
                blocks = _run_systemctl_show(wanted, SHOWN_PROPERTIES)
                if blocks is None:  # no answer now: do not ask (and wait) again per unit
                    _answers.update(dict.fromkeys(wanted))
                elif blocks:
                    _answers.update(zip(wanted, blocks, strict=True))
        yield
    finally:
        _answers = previous


def manager_cgroup_root() -> str:
    """The cgroup the running systemd manages, relative to the cgroup2 root (no trailing slash).

    ``""`` on a host. A systemd nested in a container without a cgroup namespace (e.g.
    systemd-nspawn with ``SYSTEMD_NSPAWN_USE_CGNS=0``) manages a subtree, and every cgroup it
    creates lies below it: running units report it in ``ControlGroup``, but slice names do not
    carry it, so paths built from them need it as a prefix. It is ``-.slice``'s ControlGroup.
    """
    if not systemd_running():
        return ""
    shown = _systemctl_show(ROOT_SLICE, SHOWN_PROPERTIES) or {}
    return shown.get("ControlGroup", "").rstrip("/")


def ask_systemd(unit: str) -> str | None:
    """Ask the running systemd where ``unit``'s cgroup is (or will be).

    A running unit reports its ControlGroup. A unit that has not started has an empty
    ControlGroup, so the path is built from its Slice property and primary name (Id), which
    systemd has already resolved through aliases, drop-ins and runtime properties. Returns None
    when systemd is not running, does not answer in time, or knows no slice for the unit; the
    caller then derives the path from the unit files. Paths are relative to systemd's cgroup
    root, which in a container is the container's cgroup namespace root.
    """
    _owner_unit_name(unit)
    if not systemd_running():
        return None
    shown = _systemctl_show(unit, SHOWN_PROPERTIES)
    if shown is None:
        return None
    if shown.get("ControlGroup"):
        return shown["ControlGroup"]
    slice_name = shown.get("Slice", "")
    primary = shown.get("Id") or unit
    if shown.get("LoadState") in ("not-found", "masked") or not slice_name:
        return None
    try:
        return _join(manager_cgroup_root() + slice_cgroup_path(slice_name), primary)
    except UnitError:
        return None


def resolve_unit(unit: str, *, unit_dirs: Sequence[Path] | None = None) -> str:
    """The cgroup path of ``unit``: systemd's answer when it runs, the unit files' otherwise.

    ``unit_dirs`` being given means "derive from these files" (tests, chroots), so systemd is not
    asked then. A not-found or masked unit is derived from files too: systemd reports no slice
    for it, but its name still fixes where its cgroup would be.
    """
    split = _split_user_unit(unit)
    if split is not None:
        manager, inner = split
        manager_path = resolve_unit(manager, unit_dirs=unit_dirs)
        return _user_unit_path(manager_path, unit, inner)
    if unit_dirs is None:
        asked = ask_systemd(unit)
        if asked is not None:
            return asked
        return manager_cgroup_root() + unit_cgroup_path(unit)
    return unit_cgroup_path(unit, unit_dirs=unit_dirs)


# --- socket units -------------------------------------------------------------------------------


def socket_service(unit: str, *, unit_dirs: Sequence[Path] | None = None) -> tuple[str, bool]:
    """The service a socket unit activates, and whether it is an ``Accept=yes`` socket.

    ``Service=`` (last assignment across the file and drop-ins) wins; otherwise it is the
    same-named ``.service`` -- a template ``NAME@.service`` for ``Accept=yes`` sockets.
    """
    parsed = _owner_unit_name(unit)
    if parsed.type != "socket":
        raise UnitError(f"{unit!r} is not a socket unit")
    dirs = list(unit_dirs) if unit_dirs is not None else list(SYSTEM_UNIT_DIRS)
    info = load_unit(unit, unit_dirs=dirs)
    files = ([info.fragment] if info.fragment is not None else []) + (
        [] if info.masked else dropin_files([unit, info.name], dirs)
    )
    service = None
    accept = False
    for path in files:
        for value in _assignments(path, "Socket", "Service"):
            service = _expand_specifiers(value, parse_unit_name(info.name)) if value else None
        for value in _assignments(path, "Socket", "Accept"):
            accept = value.lower() in ("1", "yes", "true", "on")
    base = parse_unit_name(info.name)
    if service is None:
        at = "@" if accept else ("" if base.instance is None else "@" + base.instance)
        service = f"{base.prefix}{at}.service"
    return service, accept


_LISTEN_PROTOCOLS = {"ListenStream": "tcp", "ListenDatagram": "udp"}


def _listen_port(value: str) -> int | None:
    """The port of a ListenStream=/ListenDatagram= value: "631", "0.0.0.0:631", "[::]:631",
    "127.0.0.1:631%lo"; None for a Unix socket path, an abstract name or a vsock address."""
    if value.startswith(("/", "@", "vsock:")):
        return None
    tail = value.rsplit("]", 1)[-1] if value.startswith("[") else value
    tail = tail.rsplit(":", 1)[-1].split("%", 1)[0]
    return int(tail) if tail.isdigit() and 0 < int(tail) < 65536 else None


def socket_listen_ports(
    unit: str, *, unit_dirs: Sequence[Path] | None = None
) -> frozenset[tuple[str, int]]:
    """The (protocol, port) pairs a socket unit's ListenStream= (tcp) and ListenDatagram=
    (udp) lines name, drop-ins included (an empty assignment clears the list, as in systemd).
    A socket unit with no unit file here listens on nothing."""
    dirs = list(unit_dirs) if unit_dirs is not None else list(SYSTEM_UNIT_DIRS)
    info = load_unit(unit, unit_dirs=dirs)
    if info.fragment is None or info.masked:
        return frozenset()
    files = [info.fragment, *dropin_files([unit, info.name], dirs)]
    found: set[tuple[str, int]] = set()
    for key, protocol in _LISTEN_PROTOCOLS.items():
        ports: list[int] = []
        for path in files:
            for value in _assignments(path, "Socket", key):
                if not value:
                    ports.clear()
                elif (port := _listen_port(value)) is not None:
                    ports.append(port)
        found.update((protocol, port) for port in ports)
    return frozenset(found)


def socket_unit_owner_paths(
    unit: str,
    *,
    unit_dirs: Sequence[Path] | None = None,
    resolve: Callable[[str], str] | None = None,
) -> list[str]:
    """The cgroups that bind a socket unit's ports: ``/init.scope``, the socket unit's own
    cgroup, and the activated service.

    systemd binds a ``.socket`` unit's listening sockets itself and hands them to the service.
    Where BPF firewalling is supported (a unified cgroup hierarchy: every system where the
    guard works, unless systemd runs in hybrid mode) it creates IPv4/IPv6 sockets in a forked
    helper, ``(sd-listen)``, placed in the socket unit's own cgroup
    (``/system.slice/cups.socket``), so that cgroup BPF programs see the right unit
    (socket_address_listen_in_cgroup() in src/core/socket.c); otherwise PID 1 binds from
    ``/init.scope``. The service is included because many daemons (cupsd, rsync) also bind the
    port themselves when started without their socket. ``Accept=yes`` sockets start one
    instance per connection that receives an already accepted socket and never binds, so the
    service is left out for them -- granting the template's slice would trust every instance
    for nothing.

    Whether ``/init.scope`` is trusted at all is the caller's policy (a config setting); this
    function only says which cgroups a socket-activated owner needs. ``resolve`` maps unit
    names (``init.scope``, the socket, the service) to paths (e.g. :func:`resolve_unit`, which
    knows where a nested systemd's units are); by default the unit files are read.
    """
    service, accept = socket_service(unit, unit_dirs=unit_dirs)
    if resolve is None:

        def resolve(name: str) -> str:
            return unit_cgroup_path(name, unit_dirs=unit_dirs)

    names = [INIT_SCOPE, unit] if accept else [INIT_SCOPE, unit, service]
    return [resolve(name) for name in names]
