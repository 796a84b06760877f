"""The outcome of the last `apply` for a pin directory, kept in /run so that `status` can say
why no guard is loaded (or why the loaded one is older than the configuration).

`apply` runs at boot and from maintainer scripts, where nobody reads its output; a failed
apply writes its sentence here and a successful one removes it. /run is a tmpfs: the record
lives as long as the boot it describes. The pinned guard itself stays the source of truth.
"""

from __future__ import annotations

import os
import time

from guard import paths
from guard.tuples import NamedTuple


class Failure(NamedTuple):
    when: str  # local time, as a log line would give it
    message: str


def _path(pin_dir: str) -> str:
    return paths.failure_record(pin_dir)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)


def record_failure(pin_dir: str, message: str) -> None:
    """Best effort: a read-only /run must not hide apply's own error."""
    path = _path(pin_dir)
    try:
        _make_parent(path)
        tmp = path + ".tmp"
        with open(tmp, "w") as out:
            out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n{message}\n")
        os.replace(tmp, path)
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        pass


def clear(pin_dir: str) -> None:
    """A successful apply: no failure to report, and a guard this boot (``applied``, which
    portguard-generator reads at a daemon-reload to ask for a re-apply)."""
    try:
        _unlink(_path(pin_dir))
    except (OSError, ValueError):
        pass
    try:
        _make_parent(_applied())
        os.close(os.open(_applied(), os.O_WRONLY | os.O_CREAT, 0o666))
        os.utime(_applied())  # as Path.touch: there already, its times are now
    except OSError:
        pass


def _plan_path(config_main: str) -> str:
    return paths.plan_record(str(config_main))


def first_of_boot() -> bool:
    """No apply has succeeded in this boot yet (/run is a tmpfs); False when that cannot be
    told (/run/portguard unreadable: not root, and apply says so next)."""
    try:
        os.stat(_applied())
    except (FileNotFoundError, NotADirectoryError):
        return True

    except OSError:
        return False
    return False


def save_plan(config_main: str, record: bytes | None, boot: bool = False) -> None:
    """Keep the compiled plan of these files (guard/policy/compiled.py), or drop an old one
    (record None); with boot, also for the next boot's first apply, in /var/lib/portguard when
    that directory exists (never made here: a /var not mounted yet at boot is not written
    under). Best effort: status and check then take the full path."""
    targets = [_plan_path(config_main)]
    if boot and os.path.isdir(paths.state_dir()):
        targets.append(paths.boot_plan_record(str(config_main)))
    for path in targets:
        try:
            if record is None:
                _unlink(path)
                continue
            _make_parent(path)
            paths.write_record(path, record)
        except (OSError, ValueError):
            pass


def plan_record(config_main: str, boot: bool = False) -> bytes | None:
    """The compiled plan kept in /run; with boot, the one the last boot's first apply kept."""
    path = paths.boot_plan_record(str(config_main)) if boot else _plan_path(config_main)
    try:
        with open(path, "rb") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def removed() -> None:
    """After `portguard remove`: a daemon-reload must not bring the guard back."""
    try:
        _unlink(_applied())
    except OSError:
        pass


def _applied() -> str:
    return paths.applied_mark()


def last_failure(pin_dir: str) -> Failure | None:
    try:
        with open(_path(pin_dir)) as f:
            when, _, message = f.read().partition("\n")
    except (OSError, ValueError):
        return None
    return Failure(when, message.strip())
