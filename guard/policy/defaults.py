"""The embedded default policy, and the "is this owner installed here?" test it relies on.

The default reserves well-known ports for daemons most machines do not have. Reserving 993 for
dovecot on a machine without dovecot would only take the port away from whatever the admin does
run there, so its blocks carry ``if_installed = true``: a block applies only when at least one of
its units has a unit file on this machine (see :func:`installed_units`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from guard.policy.units import load_unit

DEFAULT_POLICY = "default_policy.toml"
DEFAULT_POLICY_NAME = "<default policy>"  # how config errors name it; the file is package data


def default_policy_text() -> str:
    """The default policy's TOML text, as shipped inside the package (beside this module: the
    wheel and the Debian package install it as a file; importlib.resources would cost ~10 ms
    of CPU at every boot for importing tempfile, shutil and the rest)."""
    return Path(__file__).with_name(DEFAULT_POLICY).read_text(encoding="utf-8")


def installed_units(units: Iterable[str], unit_dirs: Sequence[Path] | None = None) -> list[str]:
    """Those of ``units`` that have a unit file, in the given order.

    An instance counts as installed when its template is (``tinc@vpn.service`` via
    ``tinc@.service``) and an alias when its target is. A masked unit does not count: it can
    never start, so guarding its ports would only take them from everyone for nobody. Decided from
    files rather than by asking systemd, because the early-boot apply runs before systemd has
    loaded most units and the answer must not depend on timing. Invalid names raise UnitError.
    """
    return [
        unit
        for unit in units
        if (info := load_unit(unit, unit_dirs=unit_dirs)).fragment is not None and not info.masked
    ]
