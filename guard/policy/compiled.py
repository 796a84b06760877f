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

from guard import paths as names
from guard.fingerprint import (  # noqa: F401 (ENVIRONMENT: tests)
    ENVIRONMENT,
    RACY_NS,
    fingerprint,
    seal,
    unsealed,
)
from guard.policy.config import Config, Origin, Settings
from guard.policy.ports import SERVICES
from guard.tuples import NamedTuple

POLICY_CODE = os.path.dirname(os.path.realpath(__file__))
LIMITS_CODE = os.path.join(os.path.dirname(POLICY_CODE), "kernel", "layout.py")  # the limits


class Compiled(NamedTuple):
    """What apply resolved from unchanged files: the plan (its settings included), and what it
    said of the unit files."""

    plan: object  # guard.policy.plan.Plan
    unit_problems: tuple[str, ...]
    unit_notes: tuple[str, ...]


def inputs(cfg: Config, main: str) -> tuple[list[str], list[str]]:
    """(files, directories) whose stat decides whether cfg's plan still holds."""
    from guard.policy import units

    main = names.normal(main)
    files = [main, str(SERVICES), LIMITS_CODE]
    files += sorted(
        os.path.join(POLICY_CODE, name)
        for name in os.listdir(POLICY_CODE)
        if os.path.splitext(name)[1] in (".py", ".toml")
    )
    files += [name for name in cfg.files if name.startswith("/")]
    dirs = [names.join(os.path.dirname(main), "conf.d")]
    if cfg.settings.portreserve_dir:
        dirs.append(cfg.settings.portreserve_dir)
    dirs += [str(d) for d in (*units.search_dirs(), *units.USER_UNIT_DIRS)]
    return files, dirs


def dumps(cfg: Config, plan, main: str, since_ns: int) -> bytes | None:
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
    # the body marshalled on its own: guard/quick.py's record names it by its digest
    return seal(str(main), files, dirs, seen, cfg.settings.pin_dir, marshal.dumps(body))


def loads(data: bytes, main: str) -> Compiled | None:
    """What a record holds, when every one of its inputs is unchanged; else None."""
    opened = unsealed(data, str(main))
    if opened is None:
        return None
    try:
        body = marshal.loads(opened[1])
    except (EOFError, ValueError, TypeError):
        return None
    from guard.policy.plan import Plan

    settings, ports, sets, paths, owner_names, contained, origins, problems, notes = body
    settings = Settings(*settings)
    origins = {pair: tuple(Origin(*o) for o in found) for pair, found in origins.items()}
    plan = Plan(settings, ports, sets, paths, owner_names, contained, origins)
    return Compiled(plan, problems, notes)
