"""Owners as written (cgroup paths, systemd units, slices) -> cgroup paths."""

from __future__ import annotations

from guard.config import Config, ConfigError, OwnerRef

INIT_SCOPE = "/init.scope"


def resolve_owner(owner: OwnerRef) -> list[tuple[str, str | None]]:
    """(cgroup path, unit name or None) pairs for one owner."""
    if owner.kind == "cgroup":
        return [(owner.name, None)]
    raise ConfigError([f"{owner.origin}: {owner.kind} owners are not supported yet"])


def resolve(config: Config) -> dict[int, list[tuple[str, str | None]]]:
    """Resolved owners per reservation block; every problem is reported at once."""
    problems: list[str] = []
    resolved: dict[int, list[tuple[str, str | None]]] = {}
    for index, block in enumerate(config.blocks):
        pairs: list[tuple[str, str | None]] = []
        for owner in block.owners:
            try:
                pairs.extend(resolve_owner(owner))
            except ConfigError as exc:
                problems.extend(exc.problems)
        resolved[index] = pairs
    if problems:
        raise ConfigError(problems)
    return resolved


def extra_owners(config: Config) -> tuple[str, ...]:
    return (INIT_SCOPE,) if config.settings.trust_init else ()
