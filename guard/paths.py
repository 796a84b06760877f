"""Where portguard keeps its files (their names, and how a record is written), importing
nothing but os.

guard/quick.py reads these before anything else is imported (an unchanged re-apply), so the
names live here once, for it and for the modules that write the files (guard/observe/outcome.py,
guard/kernel/host.py, guard/kernel/apply.py).
"""

from __future__ import annotations

import os

try:
    # CPython's built-in SHA-256: hashlib would load OpenSSL's libcrypto, a measurable part of
    # an apply at boot for a few small digests.
    from _sha256 import sha256
except ImportError:  # other Pythons (3.12 calls it _sha2)
    from hashlib import sha256  # noqa: F401 (used by the modules that name files and records)

DEFAULT_CONFIG = "/etc/portguard/portguard.toml"


def normal(path: str | os.PathLike) -> str:
    """A path spelled as str(pathlib.Path(path)) spells it on Linux (no empty or "." parts,
    no trailing slash; ".." kept), without importing pathlib: the boot's modules name their
    files with str and os.path (pathlib brings re, fnmatch, urllib.parse: ~7 ms at boot)."""
    path = os.fspath(path)
    parts = [part for part in path.split("/") if part and part != "."]
    lead = "//" if path.startswith("//") and not path.startswith("///") else "/"
    joined = "/".join(parts)
    if path.startswith("/"):
        return lead + joined
    return joined or "."


def join(*parts: str | os.PathLike) -> str:
    """pathlib.Path(first) / second / ... as a str (see normal)."""
    return normal(os.path.join(*parts))


DEFAULT_RUN_DIR = "/run/portguard"
DEFAULT_STATE_DIR = "/var/lib/portguard"


def write_record(path: str, data: bytes) -> None:
    """Write a record whole or not at all (a temporary file renamed over it), root-only."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def run_dir() -> str:
    """/run/portguard, or where PORTGUARD_RUN_DIR says (tests: each sandbox its own)."""
    return os.environ.get("PORTGUARD_RUN_DIR", DEFAULT_RUN_DIR)


def _named(prefix: str, path: str) -> str:
    return os.path.join(run_dir(), prefix + path.rstrip("/").replace("/", "-"))


def failure_record(pin_dir: str) -> str:
    """The last failed apply's sentence, for one pin directory."""
    return _named("apply-failed", pin_dir)


def applied_mark() -> str:
    """Present once a guard was applied in this boot (portguard-generator reads it)."""
    return os.path.join(run_dir(), "applied")


def plan_record(config_main: str) -> str:
    """The compiled plan of one main configuration file (guard/policy/compiled.py)."""
    return os.path.join(run_dir(), "plan" + config_main.replace("/", "-"))


def state_dir() -> str:
    """/var/lib/portguard (the package makes it), or where PORTGUARD_STATE_DIR says (tests)."""
    return os.environ.get("PORTGUARD_STATE_DIR", DEFAULT_STATE_DIR)


def boot_plan_record(config_main: str) -> str:
    """The compiled plan the last boot's first apply made, for the next boot's."""
    return os.path.join(state_dir(), "plan" + config_main.replace("/", "-"))


def guard_record(pin_dir: str) -> str:
    """What the last successful apply left in the kernel, for one pin directory
    (guard/quick.py)."""
    return _named("guard", pin_dir)


def lock_name(pin_dir: str, role: str = "") -> str:
    """The file name of one role's lock (apply/remove, monitor, ...) for one pin directory."""
    name = sha256(pin_dir.encode()).hexdigest()[:16]
    return f"portguard-{role + '-' if role else ''}{name}.lock"
