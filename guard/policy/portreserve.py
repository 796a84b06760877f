"""Read portreserve's configuration as it is, so distributions can migrate without rewriting it.

portreserve(1) reads every file in ``/etc/portreserve`` whose name contains no ``.`` and no ``~``
(so ``cups.rpmsave``, ``cups.dpkg-old`` and editor backups ``cups~`` are skipped). Each line is a
service name from /etc/services or a port number, optionally followed by ``/tcp`` or ``/udp``;
without a protocol both are reserved. The file's name is the service that owns the ports, which
portguard reads as the systemd unit ``NAME.service`` (``cups`` -> ``cups.service``).

Differences that matter when migrating:

- portreserve only ever held IPv4 sockets, so IPv6 binds were never protected. portguard
  reserves both families: the same entry guards 631 on IPv4 and IPv6.
- portreserve released a port for good once ``portrelease NAME`` ran; portguard never releases,
  the owner's cgroup may bind at any time and everyone else is refused, across restarts. That is
  why ``portrelease`` is kept as a no-op that succeeds.
- When two files named the same port, portreserve released it with the first; in portguard the
  port simply has both owners.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from guard.policy.units import UnitError, parse_unit_name

PORTRESERVE_DIR = Path("/etc/portreserve")

# A service name as /etc/services spells one, or a port number, then an optional protocol.
_SPEC = re.compile(r"(?P<port>[0-9]+|[A-Za-z][A-Za-z0-9+._-]*)(?:/(?P<proto>tcp|udp))?")


class PortreserveError(ValueError):
    """A portreserve file that cannot be read or understood; the message starts "file:line:"."""


class PortreserveEntry(NamedTuple):
    """One reserved port as portreserve's config states it.

    ``spec`` is kept as written (``ipp``, ``873/tcp``) because portguard's port syntax accepts the
    same forms; resolving service names is the config parser's job, with its own file:line errors.
    """

    spec: str
    unit: str
    file: str
    line: int


def is_config_name(name: str) -> bool:
    """Whether portreserve would read a file of this name (no '.' and no '~', not hidden)."""
    return bool(name) and "." not in name and "~" not in name


def _parse_spec(text: str, where: str) -> str:
    match = _SPEC.fullmatch(text)
    if match is None:
        raise PortreserveError(
            f"{where}: {text!r} is not a service name or port number,"
            " optionally followed by /tcp or /udp"
        )
    port = match.group("port")
    if port.isdigit() and not 1 <= int(port) <= 65535:
        raise PortreserveError(f"{where}: port {port} is out of range (1-65535)")
    return text


def read_file(path: Path) -> list[PortreserveEntry]:
    """The entries of one portreserve file; its name is the owning service."""
    unit = f"{path.name}.service"
    try:
        parse_unit_name(unit)
    except UnitError as exc:
        raise PortreserveError(f"{path}:1: the file name does not name a service: {exc}") from exc
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PortreserveError(f"{path}:1: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PortreserveError(f"{path}:{line}: not valid UTF-8") from exc
    entries = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        spec = _parse_spec(line, f"{path}:{number}")
        entries.append(PortreserveEntry(spec=spec, unit=unit, file=str(path), line=number))
    return entries


def read_portreserve(directory: Path = PORTRESERVE_DIR) -> list[PortreserveEntry]:
    """Every entry in a portreserve directory, files in name order; no directory means none.

    Only regular files (or symlinks to them) are read, as portreserve does; subdirectories and
    skipped names are ignored silently because package managers leave such files behind.
    """
    try:
        candidates = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    except NotADirectoryError as exc:
        raise PortreserveError(f"{directory}:1: not a directory") from exc
    except OSError as exc:
        raise PortreserveError(f"{directory}:1: cannot list: {exc.strerror or exc}") from exc
    entries: list[PortreserveEntry] = []
    for path in candidates:
        if is_config_name(path.name) and path.is_file():
            entries.extend(read_file(path))
    return entries


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'


def _comment(text: str) -> str:
    """Keep a file name from breaking out of a TOML comment."""
    return re.sub(r"[\x00-\x1f\x7f]", "?", text)


def _by_unit(entries: Iterable[PortreserveEntry]) -> dict[str, tuple[list[str], list[str]]]:
    """unit -> (its specs, the files they come from), in first-seen order, each once."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for entry in entries:
        specs, files = found.setdefault(entry.unit, ([], []))
        if entry.spec not in specs:
            specs.append(entry.spec)
        if entry.file not in files:
            files.append(entry.file)
    return found


#: The drop-in file name `import-portreserve --drop-ins` writes below UNIT.d/.
DROPIN_NAME = "portguard.conf"


def to_dropins(entries: Iterable[PortreserveEntry]) -> dict[str, str]:
    """unit -> the text of a drop-in declaring its ports (X-PortGuard-Reserve=, see
    guard/policy/declared.py), equivalent to ``entries``."""
    return {
        unit: "\n".join(
            [
                f"# Converted from portreserve ({', '.join(_comment(f) for f in files)}) by",
                "# portguard import-portreserve. portguard reserves these for IPv4 and IPv6.",
                "[Unit]",
                f"X-PortGuard-Reserve={' '.join(specs)}",
            ]
        )
        + "\n"
        for unit, (specs, files) in _by_unit(entries).items()
    }


def to_toml(entries: Iterable[PortreserveEntry]) -> str:
    """portguard configuration equivalent to ``entries``: one [[reserve]] block per owning unit.

    Blocks appear in the order their units first appear; repeated specs are written once.
    """
    lines = [
        "# Converted from portreserve. portreserve only reserved IPv4;",
        "# portguard reserves each port for both IPv4 and IPv6.",
    ]
    for unit, (specs, files) in _by_unit(entries).items():
        lines += [
            "",
            f"# from {', '.join(_comment(f) for f in files)}",
            "[[reserve]]",
            f"ports = [{', '.join(_toml_string(s) for s in specs)}]",
            f"unit = {_toml_string(unit)}",
        ]
    return "\n".join(lines) + "\n"
