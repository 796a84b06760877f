"""What stat says of a set of files and directories: the fingerprint that decides whether a
record made from them (the compiled plan, guard/policy/compiled.py; the guard record,
guard/quick.py) still holds. Imports nothing but os and sys: the unchanged re-apply checks
it before anything else is imported.

The fingerprint is what stat says of each file, each directory and each of their entries (and
of the entries of their NAME.d/ sub-directories): inode, size, modification time, type; for a
symlink also its target and what it points to.
"""

from __future__ import annotations

import marshal
import os
import sys

# The records' format: a record of another format, or made by another interpreter, or under
# an environment that redirects the inputs, is never used.
FORMAT = 3
# An input modified this close to (or after) the moment apply began to read is not trusted: a
# second change within the same timestamp tick would leave stat saying the same.
RACY_NS = 1_000_000_000
# Environment that changes what the files resolve to (units.UNIT_DIRS_ENV: tests, chroots).
ENVIRONMENT = ("PORTGUARD_UNIT_DIRS",)


def key() -> tuple:
    return (FORMAT, sys.version, tuple(os.environ.get(name) for name in ENVIRONMENT))


def seal(
    main: str, files: list[str], dirs: list[str], seen: tuple, pin_dir: str, body: bytes
) -> bytes:
    """A compiled plan's record: the plan (body, marshalled) made from main's files, the inputs
    and what stat said of them (seen), and the pin directory the plan applies to."""
    return marshal.dumps((key(), main, files, dirs, seen, pin_dir, body))


def unsealed(data: bytes, main: str) -> tuple[str, bytes] | None:
    """(pin directory, body) of a record made from main's files, when every one of its
    inputs is unchanged; else None."""
    try:
        recorded_key, recorded_main, files, dirs, seen, pin_dir, body = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return None
    if recorded_key != key() or recorded_main != main or fingerprint(files, dirs)[0] != seen:
        return None
    return pin_dir, body


def sealed_body(data: bytes) -> bytes:
    """The body of a record seal() just made (unchecked: its maker vouches for it)."""
    return marshal.loads(data)[-1]


def fingerprint(files: list[str], dirs: list[str]) -> tuple[tuple, int]:
    """What stat says of files and of dirs with their entries (and the entries of their NAME.d/
    sub-directories), and the newest modification time among them."""
    found = [stat_of(path) for path in files]
    for directory in dirs:
        found.append(stat_of(directory))
        pending = [directory]
        while pending:
            current = pending.pop()
            try:
                entries = sorted(os.scandir(current), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                found.append(stat_of(entry.path))
                if current == directory and entry.name.endswith(".d") and entry.is_dir():
                    pending.append(entry.path)
    newest = max((item[-1] for item in found if len(item) > 2), default=0)
    return tuple(found), newest


def stat_of(path: str) -> tuple:
    """(path, mode, inode, size, mtime) of path, and of what a symlink points to."""
    try:
        link = os.lstat(path)
    except OSError:
        return (path, None)
    if link.st_mode & 0o170000 == 0o120000:  # a symlink: what it points to counts too
        try:
            target = os.stat(path)
            return (
                path,
                os.readlink(path),
                target.st_mode,
                target.st_ino,
                target.st_size,
                max(link.st_mtime_ns, target.st_mtime_ns),
            )
        except OSError:
            return (path, "dangling", link.st_mtime_ns)
    return (path, link.st_mode, link.st_ino, link.st_size, link.st_mtime_ns)
