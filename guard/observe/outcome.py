"""The outcome of the last `apply` for a pin directory, kept in /run so that `status` can say
why no guard is loaded (or why the loaded one is older than the configuration).

`apply` runs at boot and from maintainer scripts, where nobody reads its output; a failed
apply writes its sentence here and a successful one removes it. /run is a tmpfs: the record
lives as long as the boot it describes. The pinned guard itself stays the source of truth.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

from guard import paths


class Failure(NamedTuple):
    when: str  # local time, as a log line would give it
    message: str


def _path(pin_dir: str) -> Path:
    return Path(paths.failure_record(pin_dir))


def record_failure(pin_dir: str, message: str) -> None:
    """Best effort: a read-only /run must not hide apply's own error."""
    path = _path(pin_dir)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n{message}\n")
        os.replace(tmp, path)
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        pass


def clear(pin_dir: str) -> None:
    """A successful apply: no failure to report, and a guard this boot (``applied``, which
    portguard-generator reads at a daemon-reload to ask for a re-apply)."""
    try:
        _path(pin_dir).unlink(missing_ok=True)
    except (OSError, ValueError):
        pass
    try:
        _applied().parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _applied().touch()
    except OSError:
        pass


def _plan_path(config_main: Path) -> Path:
    return Path(paths.plan_record(str(config_main)))


def first_of_boot() -> bool:
    """No apply has succeeded in this boot yet (/run is a tmpfs); False when that cannot be
    told (/run/portguard unreadable: not root, and apply says so next)."""
    try:
        return not _applied().exists()
    except OSError:
        return False


def save_plan(config_main: Path, record: bytes | None, boot: bool = False) -> None:
    """Keep the compiled plan of these files (guard/policy/compiled.py), or drop an old one
    (record None); with boot, also for the next boot's first apply, in /var/lib/portguard when
    that directory exists (never made here: a /var not mounted yet at boot is not written
    under). Best effort: status and check then take the full path."""
    targets = [_plan_path(config_main)]
    if boot and Path(paths.state_dir()).is_dir():
        targets.append(Path(paths.boot_plan_record(str(config_main))))
    for path in targets:
        try:
            if record is None:
                path.unlink(missing_ok=True)
                continue
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            paths.write_record(str(path), record)
        except (OSError, ValueError):
            pass


def plan_record(config_main: Path, boot: bool = False) -> bytes | None:
    """The compiled plan kept in /run; with boot, the one the last boot's first apply kept."""
    path = Path(paths.boot_plan_record(str(config_main))) if boot else _plan_path(config_main)
    try:
        return path.read_bytes()
    except (OSError, ValueError):
        return None


def removed() -> None:
    """After `portguard remove`: a daemon-reload must not bring the guard back."""
    try:
        _applied().unlink(missing_ok=True)
    except OSError:
        pass


def _applied() -> Path:
    return Path(paths.applied_mark())


def last_failure(pin_dir: str) -> Failure | None:
    try:
        when, _, message = _path(pin_dir).read_text().partition("\n")
    except (OSError, ValueError):
        return None
    return Failure(when, message.strip())
