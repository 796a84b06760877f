"""Structured entries for the systemd journal through its native protocol, no library needed.

One datagram per entry to /run/systemd/journal/socket: "KEY=value\\n" per field, or, for a
value holding a newline, "KEY\\n" + its length as 64-bit little endian + value + "\\n" (see
systemd's "Native Journal Protocol"). A field may repeat (one PORTGUARD_OWNER per owner).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

SOCKET = Path(os.environ.get("PORTGUARD_JOURNAL_SOCKET", "/run/systemd/journal/socket"))
IDENTIFIER = "portguard"
PRIORITY_WARNING = 4
PRIORITY_NOTICE = 5

_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")


class JournalError(RuntimeError):
    pass


def encode(fields: Iterable[tuple[str, object]]) -> bytes:
    """One journal entry from (name, value) pairs; names are upper case, digits and '_',
    not starting with '_' (those are the journal's own, trusted fields)."""
    out = bytearray()
    for name, value in fields:
        if not _FIELD_NAME.fullmatch(name) or name[0].isdigit():
            raise ValueError(f"invalid journal field name {name!r}")
        data = value if isinstance(value, bytes) else str(value).encode()
        if b"\n" in data:
            out += name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class Journal:
    """A connected datagram socket to journald."""

    def __init__(self, path: Path = SOCKET):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise JournalError(
                f"no systemd journal to log to: cannot connect to {path} "
                f"({exc.strerror}); run without --journal to print the events"
            ) from None

    def send(self, fields: Iterable[tuple[str, object]]) -> None:
        self.sock.send(encode([*fields, ("SYSLOG_IDENTIFIER", IDENTIFIER)]))

    def close(self) -> None:
        self.sock.close()
