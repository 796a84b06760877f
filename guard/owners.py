"""Owners as written (cgroup paths, systemd units, slices) -> cgroup paths.

Units resolve the way systemd lays them out (guard.units): asking systemd when it runs,
reading unit files otherwise (early boot, chroots, tests). A unit that is not started yet
still has a path; the kernel's cgroup tracker makes it the owner the moment it appears.
"""

from __future__ import annotations

import os
from pathlib import Path

from guard import cgroups, units
from guard.config import Config, ConfigError, OwnerRef, ReserveBlock
from guard.plan import Plan

UNIT_DIRS_ENV = "PORTGUARD_UNIT_DIRS"  # colon-separated unit directories (chroots, tests)


def unit_dirs() -> list[Path] | None:
    value = os.environ.get(UNIT_DIRS_ENV)
    return [Path(p) for p in value.split(":") if p] if value else None


def resolve_owner(owner: OwnerRef) -> list[tuple[str, str | None]]:
    """(cgroup path, unit or slice name or None) pairs for one owner."""
    try:
        if owner.kind == "cgroup":
            return [(owner.name, None)]
        if owner.kind == "slice":
            return [(units.slice_cgroup_path(owner.name), owner.name)]
        if owner.name.endswith(".socket"):
            # Socket units are bound by PID 1 in /init.scope; the service may bind it too.
            dirs = unit_dirs()
            paths = units.socket_unit_owner_paths(
                owner.name, unit_dirs=dirs, resolve=lambda s: units.resolve_unit(s, unit_dirs=dirs)
            )
            return [(path, owner.name) for path in paths]
        return [(units.resolve_unit(owner.name, unit_dirs=unit_dirs()), owner.name)]
    except units.UnitError as exc:
        raise ConfigError([f"{owner.origin}: {exc}"]) from None


def block_applies(block: ReserveBlock) -> bool:
    """if_installed blocks apply only where one of their units has a unit file."""
    if not block.if_installed:
        return True
    from guard.defaults import installed_units

    named = [o.name for o in block.owners if o.kind == "unit"]
    return bool(installed_units(named, unit_dirs()))


def resolve(config: Config) -> dict[int, list[tuple[str, str | None]]]:
    """Resolved owners per reservation block (empty for blocks that do not apply here);
    every problem is reported at once."""
    problems: list[str] = []
    resolved: dict[int, list[tuple[str, str | None]]] = {}
    for index, block in enumerate(config.blocks):
        pairs: list[tuple[str, str | None]] = []
        if block_applies(block):
            for owner in block.owners:
                try:
                    pairs.extend(resolve_owner(owner))
                except ConfigError as exc:
                    problems.extend(exc.problems)
        resolved[index] = pairs
    if problems:
        raise ConfigError(problems)
    return resolved


def listen_limits(
    config: Config, resolved: dict[int, list[tuple[str, str | None]]]
) -> dict[int, dict[str, frozenset[tuple[str, int]]]]:
    """Per block, the owner paths trusted only for some ports: a socket unit's own cgroup and
    /init.scope (PID 1 binds its sockets) only for the ports its ListenStream=/ListenDatagram=
    lines name. The service it activates binds for itself and is trusted for the block's
    ports. A path also named otherwise in the block is not limited."""
    limits: dict[int, dict[str, frozenset[tuple[str, int]]]] = {}
    dirs = unit_dirs()
    for index, block in enumerate(config.blocks):
        pairs = resolved.get(index, [])
        sockets = [o for o in block.owners if o.kind == "unit" and o.name.endswith(".socket")]
        if not pairs or not sockets:
            continue
        limited: dict[str, set[tuple[str, int]]] = {}
        unlimited: set[str] = set()
        for owner in block.owners:
            paths = [path for path, name in pairs if name == owner.name]
            if owner not in sockets:
                unlimited.update(paths)
                continue
            listens = units.socket_listen_ports(owner.name, unit_dirs=dirs)
            service = units.socket_service(owner.name, unit_dirs=dirs)[0]
            for path in paths:
                if cgroups.unit_of_cgroup(path) == service:
                    unlimited.add(path)
                else:
                    limited.setdefault(path, set()).update(listens)
        block_limits = {p: frozenset(v) for p, v in limited.items() if p not in unlimited}
        if block_limits:
            limits[index] = block_limits
    return limits


def extra_owners(config: Config) -> tuple[str, ...]:
    if not config.settings.trust_init:
        return ()
    return (units.resolve_unit(units.INIT_SCOPE, unit_dirs=unit_dirs()),)


def build_plan(config: Config) -> Plan:
    """The plan apply loads for this configuration on this machine: owners resolved,
    /init.scope added where trust_init says, socket units limited to their ports."""
    from guard import plan

    resolved = resolve(config)
    return plan.build(config, resolved, extra_owners(config), listen_limits(config, resolved))
