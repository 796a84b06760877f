"""Configuration: TOML files -> validated settings and reservation blocks. Pure.

Every error names file:line; loading either returns a whole Config or raises ConfigError,
so a bad file never leads to a partial apply.
"""

from __future__ import annotations

import errno as errno_mod
import os
import stat

from guard import paths
from guard.policy.ports import PortRange, PortSpecError, Services, parse_port_spec
from guard.tuples import NamedTuple

# pathlib and re only where files are parsed: a boot with the last boot's plan parses none
# (pathlib with re, fnmatch and urllib.parse cost ~7 ms of its imports); collections.abc
# (annotations only) would import collections
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

MappingProxyType = type(type.__dict__)  # types.MappingProxyType, without importing types

DEFAULT_CONFIG = paths.DEFAULT_CONFIG
DENY_ERRNOS = ("EADDRINUSE", "EPERM", "EACCES")
MODES = ("enforce", "audit")
# where a refused bind is refused: the kernel side chooses the first its kernel offers
# ("auto"), or the one named (guard/kernel/host.py)
REFUSE_AT = ("auto", "cgroup", "security_socket_bind", "cgroup-eperm")
MAX_PATH_BYTES = 254  # the kernel key holds 256 bytes incl. NUL; longer paths are refused
MAX_FILE_BYTES = 1 << 20  # a configuration file larger than this is refused, not read

PORTRESERVE_DIR = "/etc/portreserve"
OWNER_KEYS = {
    "cgroup": "cgroup",
    "cgroups": "cgroup",
    "unit": "unit",
    "units": "unit",
    "slice": "slice",
    "slices": "slice",
}
RESERVE_KEYS = {"ports", "if_installed", "comment", "contain", *OWNER_KEYS}


class Origin(NamedTuple):
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class OwnerRef(NamedTuple):
    """An owner as written: a cgroup path, a systemd unit or a slice."""

    kind: str
    name: str
    origin: Origin


class ReserveBlock(NamedTuple):
    ports: tuple[tuple[PortRange, Origin], ...]
    owners: tuple[OwnerRef, ...]
    origin: Origin
    if_installed: bool = False
    contain: bool = False  # drop traffic of non-owner sockets on these ports


# ---- [guard]: each key with its default (Settings) and its check (GUARD_KEYS) ----------------
# A check takes (key, value, where, problems) and returns the value to keep, or None after
# recording a problem.


def _boolean(key: str, value: object, where: Origin, problems: list[str]) -> bool | None:
    if not isinstance(value, bool):
        problems.append(f"{where}: {key} must be true or false")
        return None
    return value


def _text(check):
    def checked(key: str, value: object, where: Origin, problems: list[str]) -> str | None:
        if not isinstance(value, str):
            problems.append(f"{where}: {key} must be a string")
            return None
        return check(key, value, where, problems)

    return checked


def _one_of(choices: tuple[str, ...], upper: bool = False):
    def check(key: str, value: str, where: Origin, problems: list[str]) -> str | None:
        chosen = value.upper() if upper else value
        if chosen not in choices:
            problems.append(f"{where}: {key} {value!r} is not one of {', '.join(choices)}")
            return None
        return chosen

    return _text(check)


def _absolute(empty_allowed: bool):
    def check(key: str, value: str, where: Origin, problems: list[str]) -> str | None:
        if value.startswith("/") or (empty_allowed and not value):
            return value
        also = ' or ""' if empty_allowed else ""
        problems.append(f"{where}: {key} {value!r} must be an absolute path{also}")
        return None

    return _text(check)


def _attach_cgroup(key: str, value: str, where: Origin, problems: list[str]) -> str | None:
    return _check_cgroup_path(value, where, problems)


def _seconds(most: int):
    def check(key: str, value: object, where: Origin, problems: list[str]) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= most:
            problems.append(f"{where}: {key} must be a number of seconds, 0 to {most}")
            return None
        return float(value)

    return check


class Settings(NamedTuple):
    """The [guard] table: one field per key and its default; GUARD_KEYS, right below, says how
    each key's value is checked."""

    cgroup: str = "/"  # attach point
    pin_dir: str = "/sys/fs/bpf/portguard"
    deny_errno: str = "EADDRINUSE"
    mode: str = "enforce"
    trust_init: bool = False
    # None: the default policy applies when no file exists
    use_defaults: bool | None = None
    # "" turns reading portreserve's files off
    portreserve_dir: str = PORTRESERVE_DIR
    contain: bool = False  # contain = true for every reservation
    # monitor --journal: at most one entry per (caller cgroup, port, protocol) per this many
    # seconds, with the count of the refusals it stands for; 0: one entry per refusal
    journal_interval: float = 30.0
    # read X-PortGuard-Reserve= from systemd unit files and drop-ins (guard/policy/declared.py)
    unit_files: bool = True
    refuse_at: str = "auto"

    @property
    def deny_errno_number(self) -> int:
        return getattr(errno_mod, self.deny_errno)


# [guard] key -> its check, in Settings' order (a unit test holds the two to the same keys)
GUARD_KEYS = {
    "cgroup": _text(_attach_cgroup),
    "pin_dir": _absolute(empty_allowed=False),
    "deny_errno": _one_of(DENY_ERRNOS, upper=True),
    "mode": _one_of(MODES),
    "trust_init": _boolean,
    "use_defaults": _boolean,
    "portreserve_dir": _absolute(empty_allowed=True),
    "contain": _boolean,
    "journal_interval": _seconds(86400),
    "unit_files": _boolean,
    "refuse_at": _one_of(REFUSE_AT),
}


class Config(NamedTuple):
    settings: Settings = Settings()
    blocks: tuple[ReserveBlock, ...] = ()
    files: tuple[str, ...] = ()
    # [guard] key -> where it was set (read-only: a NamedTuple's default is shared)
    origins: Mapping[str, Origin] = MappingProxyType({})
    # X-PortGuard-Reserve= in unit files: units whose declarations are not applied (and why),
    # and declarations systemd itself would not load; apply goes on without them, loudly
    unit_problems: tuple[str, ...] = ()
    unit_notes: tuple[str, ...] = ()


class ConfigError(ValueError):
    """One or more problems, each "file:line: message"; nothing was applied."""

    def __init__(self, problems: list[str]):
        problems = list(dict.fromkeys(problems))  # e.g. one port's problem for tcp and udp
        super().__init__("\n".join(problems))
        self.problems = problems


class _Lines:
    """Finds the line of a table, key or value in the raw text (tomllib keeps no positions)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def tables(self, name: str, array: bool) -> list[int]:
        import re

        pattern = re.compile(
            rf"^\s*\[\[\s*{re.escape(name)}\s*\]\]"
            if array
            else rf"^\s*\[\s*{re.escape(name)}\s*\]"
        )
        return [i + 1 for i, line in enumerate(self.lines) if pattern.match(line)]

    def key(self, start: int, end: int, key: str) -> int:
        import re

        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for number in range(start, min(end, len(self.lines) + 1)):
            if pattern.match(self.lines[number - 1]):
                return number
        return start

    def value(self, start: int, end: int, value: str, fallback: int) -> int:
        for quoted in (f'"{value}"', f"'{value}'", str(value)):
            for number in range(start, min(end, len(self.lines) + 1)):
                if quoted in self.lines[number - 1]:
                    return number
        return fallback


def _block_bounds(
    starts: list[int], index: int, total_lines: int, all_headers: list[int]
) -> tuple[int, int]:
    start = starts[index] if index < len(starts) else 1
    following = [h for h in all_headers if h > start]
    return start, (min(following) if following else total_lines + 1)


def _check_cgroup_path(path: object, where: Origin, problems: list[str]) -> str | None:
    if not isinstance(path, str):
        problems.append(f"{where}: owner cgroup must be a string, not {path!r}")
        return None
    if not path.startswith("/"):
        problems.append(
            f"{where}: owner cgroup {path!r} must be absolute (relative to the cgroup2 root)"
        )
        return None
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts) or "\0" in path:
        problems.append(f"{where}: owner cgroup {path!r} may not contain '.', '..' or NUL")
        return None
    normal = "/" + "/".join(parts)
    if len(normal.encode()) > MAX_PATH_BYTES:
        problems.append(
            f"{where}: owner cgroup path is {len(normal.encode())} bytes; at most "
            f"{MAX_PATH_BYTES} fit the kernel's key (a truncated key could match another cgroup)"
        )
        return None
    return normal


def read_limited(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file (symlinks followed) of at most limit bytes. A FIFO, device or
    directory raises OSError instead of blocking or reading forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno_mod.EINVAL, "not a regular file", str(path))
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise OSError(errno_mod.EFBIG, f"larger than {limit} bytes", str(path))
    return b"".join(chunks)


def _parse_file(path: Path, services: dict, problems: list[str]) -> tuple[dict, list[ReserveBlock]]:
    name = str(path)
    try:
        raw = read_limited(path)
    except OSError as exc:
        problems.append(f"{name}:1: cannot read: {exc.strerror or exc}")
        return {}, []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problems.append(f"{name}:{line}: not valid UTF-8")
        return {}, []
    return _parse_text(name, text, services, problems)


def _parse_text(
    name: str, text: str, services: dict, problems: list[str]
) -> tuple[dict[str, tuple[object, Origin]], list[ReserveBlock]]:
    """The file's [guard] keys as key -> (value, where), and its reservation blocks."""
    import tomllib  # here: status and check from a compiled plan (policy/compiled.py) parse none

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        import re

        match = re.search(r"at line (\d+)", str(exc))
        line = match.group(1) if match else "1"
        problems.append(f"{name}:{line}: TOML syntax error: {str(exc).split(' (at line')[0]}")
        return {}, []
    except RecursionError:  # tomllib recurses per nesting level of arrays and inline tables
        problems.append(f"{name}:1: TOML syntax error: arrays or tables nested too deeply")
        return {}, []

    lines = _Lines(text)
    all_headers = sorted(lines.tables("reserve", True) + lines.tables("guard", False))
    total = len(lines.lines)
    guard: dict = {}
    blocks: list[ReserveBlock] = []
    for key, value in data.items():
        if key == "guard":
            start, end = _block_bounds(lines.tables("guard", False), 0, total, all_headers)
            if not isinstance(value, dict):
                problems.append(f"{name}:{start}: [guard] must be a table")
                continue
            for gkey, gvalue in value.items():
                where = Origin(name, lines.key(start, end, gkey))
                if gkey not in GUARD_KEYS:
                    problems.append(
                        f"{where}: unknown key {gkey!r} in [guard] "
                        f"(known: {', '.join(sorted(GUARD_KEYS))})"
                    )
                    continue
                checked = _check_guard_value(gkey, gvalue, where, problems)
                if checked is not None:
                    guard[gkey] = (checked, where)
        elif key == "reserve":
            starts = lines.tables("reserve", True)
            if not isinstance(value, list):
                problems.append(
                    f"{name}:{lines.key(1, total + 1, 'reserve')}: "
                    "reserve must be [[reserve]] tables"
                )
                continue
            for index, table in enumerate(value):
                start, end = _block_bounds(starts, index, total, all_headers)
                block = _parse_block(table, Origin(name, start), lines, end, services, problems)
                if block is not None:
                    blocks.append(block)
        else:
            problems.append(
                f"{name}:{lines.key(1, total + 1, key)}: unknown table or key {key!r} "
                "(expected [guard] and [[reserve]])"
            )
    return guard, blocks


def _check_guard_value(key: str, value: object, where: Origin, problems: list[str]) -> object:
    return GUARD_KEYS[key](key, value, where, problems)


def _parse_block(
    table: object, origin: Origin, lines: _Lines, end: int, services: dict, problems: list[str]
) -> ReserveBlock | None:
    if not isinstance(table, dict):
        problems.append(f"{origin}: [[reserve]] must be a table")
        return None
    before = len(problems)
    for key in table:
        if key not in RESERVE_KEYS:
            problems.append(
                f"{Origin(origin.file, lines.key(origin.line, end, key))}: unknown key "
                f"{key!r} in [[reserve]] (known: {', '.join(sorted(RESERVE_KEYS))})"
            )
    ports_value = table.get("ports")
    ports_line = lines.key(origin.line, end, "ports")
    ports: list[tuple[PortRange, Origin]] = []
    if ports_value is None:
        problems.append(f"{origin}: [[reserve]] needs ports = [...]")
    elif not isinstance(ports_value, list) or not ports_value:
        problems.append(
            f"{Origin(origin.file, ports_line)}: ports must be a non-empty list of strings"
        )
    else:
        for spec in ports_value:
            spec_text = str(spec)
            where = Origin(origin.file, lines.value(origin.line, end, spec_text, ports_line))
            if isinstance(spec, int) and not isinstance(spec, bool):
                spec = str(spec)  # ports = [631] reads naturally too
            try:
                ports.append((parse_port_spec(spec, services), where))
            except PortSpecError as exc:
                problems.append(f"{where}: {exc}")
    owners: list[OwnerRef] = []
    for key, kind in OWNER_KEYS.items():
        if key not in table:
            continue
        key_line = lines.key(origin.line, end, key)
        plural = key.endswith("s")
        values = table[key] if plural else [table[key]]
        if not isinstance(values, list) or (plural and not values):
            problems.append(f"{Origin(origin.file, key_line)}: {key} must be a non-empty list")
            continue
        for value in values:
            where = Origin(origin.file, lines.value(origin.line, end, str(value), key_line))
            if kind == "cgroup":
                path = _check_cgroup_path(value, where, problems)
                if path is not None:
                    owners.append(OwnerRef("cgroup", path, where))
            elif not isinstance(value, str) or not value:
                problems.append(f"{where}: {key} must name a systemd {kind}")
            else:
                owners.append(OwnerRef(kind, value, where))
    if not owners and not any(k in table for k in OWNER_KEYS):
        problems.append(
            f"{origin}: [[reserve]] needs an owner: cgroup, cgroups, unit, units or slice"
        )
    if_installed = table.get("if_installed", False)
    if not isinstance(if_installed, bool):
        problems.append(
            f"{Origin(origin.file, lines.key(origin.line, end, 'if_installed'))}: "
            "if_installed must be true or false"
        )
    contain = table.get("contain", False)
    if not isinstance(contain, bool):
        problems.append(
            f"{Origin(origin.file, lines.key(origin.line, end, 'contain'))}: "
            "contain must be true or false"
        )
    if len(problems) > before:
        return None
    return ReserveBlock(tuple(ports), tuple(owners), origin, if_installed, contain)


def config_files(main: str | Path) -> list[Path]:
    """The main file (if present) then its drop-ins conf.d/*.toml in lexical order. A path
    that cannot be looked at raises ConfigError; what is there but not a plain file (a
    directory named x.toml, a FIFO) is listed, and reading it reports it with file:line.
    Dangling drop-in symlinks are skipped (a package's file removed, its link left)."""
    from pathlib import Path

    main = Path(main)
    files: list[Path] = []
    try:
        main.stat()
        files.append(main)
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. a directory the caller may not search: conf.d neither
        raise ConfigError([f"{main}: {exc.strerror}"]) from None
    dropins = main.parent / "conf.d"
    try:
        names = sorted(
            entry.name
            for entry in os.scandir(dropins)
            if entry.name.endswith(".toml") and not entry.name.startswith(".")
        )
    except (FileNotFoundError, NotADirectoryError):
        names = []
    except OSError as exc:
        raise ConfigError([f"{dropins}: {exc.strerror}"]) from None
    return files + [dropins / name for name in names if os.path.exists(dropins / name)]


def load(
    paths: list[Path], services_file: Path | None = None, unit_dirs: list[Path] | None = None
) -> Config:
    """Parse and validate files in order; [guard] keys of later files override earlier ones,
    reservations accumulate. The embedded default policy joins when no file exists (or
    use_defaults = true), portreserve's files are read as they are (portreserve_dir), and
    X-PortGuard-Reserve= from the unit files in unit_dirs (default: systemd's search path;
    unit_files = false: none). Raises ConfigError listing every problem of the TOML and
    portreserve files; a unit file's problem leaves that unit out (Config.unit_problems)."""
    services = Services(services_file) if services_file else Services()
    problems: list[str] = []
    guard: dict = {}
    blocks: list[ReserveBlock] = []
    names = [str(p) for p in paths]
    for path in paths:
        file_guard, file_blocks = _parse_file(path, services, problems)
        guard.update(file_guard)
        blocks.extend(file_blocks)
    values = {key: value for key, (value, _) in guard.items()}
    if values.get("use_defaults", not paths):
        from guard.policy.defaults import DEFAULT_POLICY_NAME, default_policy_text

        _, default_blocks = _parse_text(
            DEFAULT_POLICY_NAME, default_policy_text(), services, problems
        )
        blocks.extend(default_blocks)
        names.append(DEFAULT_POLICY_NAME)
    portreserve_dir = values.get("portreserve_dir", PORTRESERVE_DIR)
    if portreserve_dir:
        from pathlib import Path

        blocks.extend(_portreserve_blocks(Path(portreserve_dir), services, problems))

    if problems:
        raise ConfigError(problems)
    cfg = _config(guard, blocks, names)
    if not cfg.settings.unit_files:
        return cfg
    from guard.policy import declared, units

    found = declared.read(unit_dirs if unit_dirs is not None else units.search_dirs(), services)
    return cfg._replace(
        blocks=cfg.blocks + found.blocks,
        unit_problems=found.problems,
        unit_notes=found.notes,
    )


def _config(guard: dict[str, tuple[object, Origin]], blocks: list, names: list[str]) -> Config:
    settings = Settings(**{key: value for key, (value, _) in guard.items()})
    origins = {key: where for key, (_, where) in guard.items()}
    return Config(settings, tuple(blocks), tuple(names), origins)


def _portreserve_blocks(directory: Path, services: dict, problems: list[str]) -> list[ReserveBlock]:
    """portreserve's files as reservations owned by the service the file is named after.
    portreserve held IPv4 sockets only; these reservations cover IPv6 too."""
    from guard.policy.portreserve import PortreserveError, read_portreserve

    try:
        entries = read_portreserve(directory)
    except PortreserveError as exc:
        problems.append(str(exc))
        return []
    blocks = []
    for entry in entries:
        where = Origin(entry.file, entry.line)
        try:
            port_range = parse_port_spec(entry.spec, services)
        except PortSpecError as exc:
            problems.append(f"{where}: {exc}")
            continue
        blocks.append(
            ReserveBlock(((port_range, where),), (OwnerRef("unit", entry.unit, where),), where)
        )
    return blocks


def loads(text: str, name: str = "<config>", services_file: Path | None = None) -> Config:
    """Parse one configuration given as text (tests, the embedded default policy)."""
    services = Services(services_file) if services_file else Services()
    problems: list[str] = []
    guard, blocks = _parse_text(name, text, services, problems)
    if problems:
        raise ConfigError(problems)
    return _config(guard, blocks, [name])


def load_settings(paths: list[Path]) -> Settings:
    """Just the [guard] settings, ignoring reservation problems: status and remove must work
    while a broken file waits to be fixed. Raises ConfigError when [guard] itself is bad."""
    import tomllib

    problems: list[str] = []
    guard: dict = {}
    for path in paths:
        try:
            data = tomllib.loads(read_limited(path).decode())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
            continue
        section = data.get("guard")
        if isinstance(section, dict):
            for key, value in section.items():
                if key in GUARD_KEYS:
                    checked = _check_guard_value(key, value, Origin(str(path), 1), problems)
                    if checked is not None:
                        guard[key] = checked
    if problems:
        raise ConfigError(problems)
    return Settings(**guard)
