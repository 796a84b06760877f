"""The compiled plan: what a successful apply resolved, kept for as long as its inputs are
unchanged, so that `status`, `check` and an unchanged re-apply (systemctl reload, a
daemon-reload or dpkg trigger that changed nothing portguard reads) need neither the TOML
parser, the unit-file scan nor `systemctl show` to know what the files ask for.

Its inputs are everything configuration and plan read: the configuration files and their
conf.d, portreserve's directory, /etc/services, the embedded default policy, the unit search
path (every unit file and drop-in, one level below each directory and in its NAME.d/; whether
systemd runs is /run/systemd/system, one of them), the policy code itself, and the environment
that redirects any of them. What stat says of each (inode, size, modification time, type) is
the fingerprint; a record is used only when every one of them still says the same. A file
changed less than RACY_NS before apply began to read could change again within the same
timestamp: then no record is kept (git's "racily clean" problem), and the next reader takes
the full path. Any doubt -- another format, another interpreter, a file that cannot be read --
and the full path runs.

The record is marshal's encoding of plain tuples: it imports nothing and loads in
microseconds. Only root writes it (in /run/portguard, beside apply's other records).
"""

from __future__ import annotations

import marshal
import os
import sys
from pathlib import Path
from typing import NamedTuple

from guard.policy.config import Config, Origin, Settings
from guard.policy.ports import SERVICES

FORMAT = 2
# An input modified this close to (or after) the moment apply began to read is not trusted: a
# second change within the same timestamp tick would leave stat saying the same.
RACY_NS = 1_000_000_000
POLICY_CODE = Path(__file__).resolve().parent
LIMITS_CODE = POLICY_CODE.parent / "kernel" / "layout.py"  # the plan's limits
# Environment that changes what the files resolve to (units.UNIT_DIRS_ENV: tests, chroots).
ENVIRONMENT = ("PORTGUARD_UNIT_DIRS",)


class Compiled(NamedTuple):
    """What apply resolved from unchanged files: the plan (its settings included), and what it
    said of the unit files."""

    plan: object  # guard.policy.plan.Plan
    unit_problems: tuple[str, ...]
    unit_notes: tuple[str, ...]


def inputs(cfg: Config, main: Path) -> tuple[list[str], list[str]]:
    """(files, directories) whose stat decides whether cfg's plan still holds."""
    from guard.policy import units

    files = [str(main), str(SERVICES), str(LIMITS_CODE)]
    files += sorted(str(p) for p in POLICY_CODE.iterdir() if p.suffix in (".py", ".toml"))
    files += [name for name in cfg.files if name.startswith("/")]
    dirs = [str(main.parent / "conf.d")]
    if cfg.settings.portreserve_dir:
        dirs.append(cfg.settings.portreserve_dir)
    dirs += [str(d) for d in (*units.search_dirs(), *units.USER_UNIT_DIRS)]
    return files, dirs


def fingerprint(files: list[str], dirs: list[str]) -> tuple[tuple, int]:
    """What stat says of files and of dirs with their entries (and the entries of their NAME.d/
    sub-directories), and the newest modification time among them."""
    found = [_stat(path) for path in files]
    for directory in dirs:
        found.append(_stat(directory))
        pending = [directory]
        while pending:
            current = pending.pop()
            try:
                entries = sorted(os.scandir(current), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                found.append(_stat(entry.path))
                if current == directory and entry.name.endswith(".d") and entry.is_dir():
                    pending.append(entry.path)
    newest = max((item[-1] for item in found if len(item) > 2), default=0)
    return tuple(found), newest


def _stat(path: str) -> tuple:
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


def _key() -> tuple:
    return (FORMAT, sys.version, tuple(os.environ.get(name) for name in ENVIRONMENT))


def dumps(cfg: Config, plan, main: Path, since_ns: int) -> bytes | None:
    """The record of the plan made from cfg, which was read from the files after since_ns
    (time.time_ns()); None when an input changed too close to that moment, or after it."""
    files, dirs = inputs(cfg, main)
    seen, newest = fingerprint(files, dirs)
    if newest > since_ns - RACY_NS:
        return None
    settings = tuple(cfg.settings)
    origins = {pair: tuple(tuple(o) for o in found) for pair, found in plan.origins.items()}
    body = (
        settings,
        plan.ports,
        plan.sets,
        plan.paths,
        plan.owner_names,
        plan.contained,
        origins,
        cfg.unit_problems,
        cfg.unit_notes,
    )
    return marshal.dumps((_key(), str(main), files, dirs, seen, body))


def loads(data: bytes, main: Path) -> Compiled | None:
    """What a record holds, when every one of its inputs is unchanged; else None."""
    try:
        key, recorded_main, files, dirs, seen, body = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return None
    if key != _key() or recorded_main != str(main) or fingerprint(files, dirs)[0] != seen:
        return None
    from guard.policy.plan import Plan

    settings, ports, sets, paths, owner_names, contained, origins, problems, notes = body
    settings = Settings(*settings)
    origins = {pair: tuple(Origin(*o) for o in found) for pair, found in origins.items()}
    plan = Plan(settings, ports, sets, paths, owner_names, contained, origins)
    return Compiled(plan, problems, notes)
