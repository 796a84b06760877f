"""What stat says of a set of files and directories: the fingerprint that decides whether a
record made from them (the compiled plan, guard/policy/compiled.py; the guard record,
guard/quick.py) still holds. Imports nothing but os and sys: the unchanged re-apply checks
it before anything else is imported.

The fingerprint is what stat says of each file, each directory and each of their entries (and
of the entries of their NAME.d/ sub-directories): inode, size, modification time, type; for a
symlink also its target and what it points to. Below /run (VOLATILE), which is made anew at
every boot -- systemd's generators write their units there before portguard.service starts --
an entry is known by its content instead (type, size, SHA-256; a symlink by its target and
what that holds): the same generated units at the next boot give the same fingerprint, so the
plan kept in /var/lib/portguard serves the next boot's apply (guard/commands.py).
"""

from __future__ import annotations

import marshal
import os
import sys

from guard.paths import sha256

# The records' format: a record of another format, or made by another interpreter, or under
# an environment that redirects the inputs, is never used.
FORMAT = 5
# An input modified this close to (or after) the moment apply began to read is not trusted: a
# second change within the same timestamp tick would leave stat saying the same.
RACY_NS = 1_000_000_000
# Made anew at every boot: known by content (PORTGUARD_VOLATILE_DIRS, colon-separated: tests).
VOLATILE = ("/run",)
VOLATILE_ENV = "PORTGUARD_VOLATILE_DIRS"
# Environment that changes what the files resolve to (units.UNIT_DIRS_ENV: tests, chroots).
ENVIRONMENT = ("PORTGUARD_UNIT_DIRS", VOLATILE_ENV)


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
    sub-directories), and the newest modification or change time among them (volatile
    entries, known by content, have none). A directory that is one already read under another
    name (/lib/systemd/system and /usr/lib/systemd/system where /usr is merged) is known by
    that: its device and inode, and the name it was read under."""
    value = os.environ.get(VOLATILE_ENV)
    volatile = tuple(p.rstrip("/") + "/" for p in value.split(":") if p) if value else None
    volatile = volatile or tuple(p + "/" for p in VOLATILE)
    found = []
    newest = 0
    read: dict[tuple[int, int], str] = {}

    def add(path: str) -> None:
        nonlocal newest
        if (path + "/").startswith(volatile):
            found.append(content_of(path))
            return
        item = stat_of(path)
        found.append(item)
        if len(item) > 2:
            newest = max(newest, item[-2], item[-1])  # mtime, ctime

    for path in files:
        add(path)
    for directory in dirs:
        add(directory)
        try:
            st = os.stat(directory)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in read:
            found.append((directory, st.st_dev, st.st_ino, read[st.st_dev, st.st_ino]))
            continue
        read[st.st_dev, st.st_ino] = directory
        pending = [directory]
        while pending:
            current = pending.pop()
            try:
                entries = sorted(os.scandir(current), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                add(entry.path)
                if current == directory and entry.name.endswith(".d") and entry.is_dir():
                    pending.append(entry.path)
    return tuple(found), newest


def content_of(path: str) -> tuple:
    """(path, type, size, SHA-256) of a regular file; of a symlink its target and what it
    points to; of another entry its type."""
    try:
        link = os.lstat(path)
        if link.st_mode & 0o170000 != 0o120000:
            return (path, *_held(path, link))
        target = os.readlink(path)
        try:
            pointed = os.stat(path)
        except OSError:
            return (path, target, "dangling")
        return (path, target, *_held(path, pointed))
    except OSError:
        return (path, None)


def _held(path: str, st: os.stat_result) -> tuple:
    if st.st_mode & 0o170000 != 0o100000:  # not a regular file: its type
        return (st.st_mode,)
    with open(path, "rb") as f:
        return (st.st_mode, st.st_size, sha256(f.read()).hexdigest())


def stat_of(path: str) -> tuple:
    """(path, mode, inode, size, mtime, ctime) of path, and of what a symlink points to. The
    ctime too: a copy that keeps the old modification time (cp -p, tar, rsync -t) still
    changes it, and nobody can set it back."""
    try:
        link = os.lstat(path)
    except OSError:
        return (path, None)
    if link.st_mode & 0o170000 == 0o120000:  # a symlink: what it points to counts too
        try:
            target = os.stat(path)
            if target.st_mode & 0o170000 not in (0o100000, 0o040000):
                # not a file or directory: a device (a unit masked by a link to /dev/null,
                # which every boot and every nspawn start makes anew), a FIFO, a socket: only
                # what it is counts, not its times.
                return (path, os.readlink(path), target.st_mode, link.st_mtime_ns, link.st_ctime_ns)
            return (
                path,
                os.readlink(path),
                target.st_mode,
                target.st_ino,
                target.st_size,
                max(link.st_mtime_ns, target.st_mtime_ns),
                max(link.st_ctime_ns, target.st_ctime_ns),
            )
        except OSError:
            return (path, "dangling", link.st_mtime_ns, link.st_ctime_ns)
    return (path, link.st_mode, link.st_ino, link.st_size, link.st_mtime_ns, link.st_ctime_ns)
