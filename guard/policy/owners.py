"""Owners as written (cgroup paths, systemd units, slices) -> cgroup paths: the typed blocks
the plan is built from, each owner with the file:line that named it.

Units resolve the way systemd lays them out (guard.units): asking systemd when it runs,
reading unit files otherwise (early boot, chroots, tests). A unit that is not started yet
still has a path; the kernel's cgroup tracker makes it the owner the moment it appears.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from guard.policy import units
from guard.policy.config import Config, ConfigError, Origin, OwnerRef, ReserveBlock
from guard.policy.ports import PortRange

UNIT_DIRS_ENV = units.UNIT_DIRS_ENV


def unit_dirs() -> list[Path] | None:
    """The unit directories to derive from (PORTGUARD_UNIT_DIRS), None: systemd's, asking
    systemd when it runs."""
    return units.search_dirs() if os.environ.get(UNIT_DIRS_ENV) else None


class Owner(NamedTuple):
    """One owner cgroup, and where the configuration named it."""

    path: str  # relative to the cgroup2 root
    name: str | None  # the unit or slice it was named as; None for a cgroup path
    origin: Origin
    # trusted only for these (protocol name, port) pairs; None: for the block's every port
    only: frozenset[tuple[str, int]] | None = None


class Block(NamedTuple):
    """A reservation block with its owners resolved to cgroup paths."""

    ports: tuple[tuple[PortRange, Origin], ...]
    owners: tuple[Owner, ...]  # empty: the block does not apply here (if_installed)
    contain: bool
    origin: Origin


def resolve_owner(owner: OwnerRef) -> list[Owner]:
    """The cgroups one owner as written stands for."""
    try:
        if owner.kind == "cgroup":
            return [Owner(owner.name, None, owner.origin)]
        if owner.kind == "slice":
            return [Owner(units.slice_cgroup_path(owner.name), owner.name, owner.origin)]
        if owner.name.endswith(".socket"):
            return _socket_owners(owner)
        path = units.resolve_unit(owner.name, unit_dirs=unit_dirs())
        return [Owner(path, owner.name, owner.origin)]
    except units.UnitError as exc:
        raise ConfigError([f"{owner.origin}: {exc}"]) from None


def _socket_owners(owner: OwnerRef) -> list[Owner]:
    """systemd binds a socket unit's ports itself, from the socket unit's cgroup or PID 1's
    /init.scope: those two are trusted only for the ports the unit's ListenStream= (tcp) and
    ListenDatagram= (udp) lines name (none where it is not installed or listens on a Unix
    socket, as Debian's cups.socket). The service it activates may bind the block's ports
    itself (cupsd does) and is trusted for all of them."""
    dirs = unit_dirs()
    paths = units.socket_unit_owner_paths(
        owner.name, unit_dirs=dirs, resolve=lambda s: units.resolve_unit(s, unit_dirs=dirs)
    )
    listens = units.socket_listen_ports(owner.name, unit_dirs=dirs)
    # socket_unit_owner_paths: /init.scope, the socket unit, then (unless Accept=yes) the service
    return [
        Owner(path, owner.name, owner.origin, None if i == 2 else listens)
        for i, path in enumerate(paths)
    ]


def block_applies(block: ReserveBlock) -> bool:
    """if_installed blocks apply only where one of their units has a unit file."""
    if not block.if_installed:
        return True
    from guard.policy.defaults import installed_units

    named = [o.name for o in block.owners if o.kind == "unit"]
    return bool(installed_units(named, unit_dirs()))


def resolve(config: Config) -> list[Block]:
    """The reservation blocks with their owners resolved (none for blocks that do not apply
    here); every problem is reported at once."""
    problems: list[str] = []
    blocks: list[Block] = []
    for block in config.blocks:
        owners: list[Owner] = []
        if block_applies(block):
            for owner in block.owners:
                try:
                    owners.extend(resolve_owner(owner))
                except ConfigError as exc:
                    problems.extend(exc.problems)
        contain = block.contain or config.settings.contain
        blocks.append(Block(block.ports, tuple(owners), contain, block.origin))
    if problems:
        raise ConfigError(problems)
    return blocks


def extra_owners(config: Config) -> tuple[Owner, ...]:
    """Owners of every reserved port: PID 1's /init.scope with trust_init."""
    if not config.settings.trust_init:
        return ()
    path = units.resolve_unit(units.INIT_SCOPE, unit_dirs=unit_dirs())
    return (Owner(path, units.INIT_SCOPE, config.origins["trust_init"]),)


def systemd_names(config: Config) -> list[str]:
    """Every unit resolve and extra_owners will ask systemd about, so that one question
    answers them all. A name missed here is still asked, on its own."""
    names: list[str] = [units.INIT_SCOPE] if config.settings.trust_init else []
    for block in config.blocks:
        if not block_applies(block):
            continue
        for owner in block.owners:
            if owner.kind != "unit":
                continue
            try:
                if owner.name.endswith(".socket"):
                    service, _ = units.socket_service(owner.name, unit_dirs=unit_dirs())
                    names += [units.INIT_SCOPE, owner.name, service]
                else:
                    names.append(owner.name.split("/", 1)[0])  # a user unit: its manager
            except units.UnitError:
                continue  # resolve reports it
    return list(dict.fromkeys(names))


def resolve_all(config: Config) -> tuple[list[Block], tuple[Owner, ...]]:
    """resolve and extra_owners, with systemd (when it runs) asked once for every unit."""
    if unit_dirs() is not None:
        return resolve(config), extra_owners(config)
    with units.systemd_batch(systemd_names(config)):
        return resolve(config), extra_owners(config)
