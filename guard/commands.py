"""What the commands do, without click: read the configuration, plan, apply.

`portguard apply` runs early at every boot (systemd/portguard.service), so its path is kept off
click: guard/entry.py runs a plain `portguard apply` from here directly, and the click CLI
(guard/cli.py) runs the very same functions for every other command line. A failure is a
CommandError (a sentence and an exit code); entry.py prints it as "Error: ..." on stderr, the
way cli.py's click group ends it too.

For the same reason the modules apply imports keep their plain data in NamedTuples or small
classes with __slots__, not dataclasses: the dataclasses module (inspect, ast, dis) and the
exec of each class's generated methods cost ~30 ms at every boot; status and check
(guard/reports.py) keep off dataclasses the same way, the monitor keeps its dataclasses. A
boot's apply with the last boot's plan imports neither pathlib (str paths and os.path; the
configuration is parsed with pathlib only when the plan is made anew) nor typing (their
NamedTuples come from guard/tuples.py): with re, enum, fnmatch and urllib.parse they cost
~9 ms of its imports. tests/unit/test_entry.py and tests/kernel/test_quick_reapply.py hold
the line.
"""

from __future__ import annotations

import errno
import os
import sys

from guard import paths
from guard.policy import config as config_mod

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

EXIT_RUNTIME = 1
EXIT_CONFIG = 2


class CommandError(Exception):
    """A failure stated as one sentence for the user, and the exit code it ends with."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigProblem(CommandError):
    exit_code = EXIT_CONFIG


class RuntimeProblem(CommandError):
    exit_code = EXIT_RUNTIME


def echo(line: str, err: bool = False) -> None:
    """One line to stdout (or stderr), flushed, as click.echo writes it: the two streams stay
    in order when they share a pipe (the journal)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def config_files(path: str | None) -> list[Path]:
    """The files to read; one that cannot be read is exit 2 with its name, never skipped."""
    main = main_config(path)
    try:
        if path:
            os.lstat(main)
        return config_mod.config_files(main)
    except FileNotFoundError:
        raise ConfigProblem(f"{main}: no such configuration file") from None
    except config_mod.ConfigError as exc:
        raise ConfigProblem(f"cannot read the configuration: {exc}") from None
    except OSError as exc:
        raise ConfigProblem(f"cannot read the configuration: {main}: {exc.strerror}") from None


def load_config(path: str | None) -> config_mod.Config:
    return _read(path, config_mod.load, "invalid configuration, nothing applied")


def settings_only(path: str | None) -> config_mod.Settings:
    return _read(path, config_mod.load_settings, "invalid [guard] settings")


def _read(path: str | None, read, problem: str):
    """read(the configuration files); its ConfigError is a ConfigProblem saying `problem`."""
    files = config_files(path)
    try:
        return read(files)
    except config_mod.ConfigError as exc:
        raise ConfigProblem(f"{problem}:\n{exc}") from None


def plan_of(cfg: config_mod.Config):
    from guard.kernel.layout import LIMITS
    from guard.policy import owners, plan

    try:
        return plan.build(cfg.settings, *owners.resolve_all(cfg), LIMITS)
    except config_mod.ConfigError as exc:
        raise ConfigProblem(f"invalid configuration, nothing applied:\n{exc}") from None


def runtime(fn, *args):
    """fn(*args), its GuardError a RuntimeProblem (exit 1)."""
    from guard.errors import GuardError

    try:
        return fn(*args)
    except GuardError as exc:
        raise RuntimeProblem(str(exc)) from None


def apply(config_path: str | None) -> None:
    """`portguard apply`: load or update the guard, and record the outcome for `status` (a
    failure's sentence, or none)."""
    from guard.observe import outcome

    try:
        _apply(config_path)
    except CommandError as exc:
        outcome.record_failure(_pin_dir_for_record(config_path), exc.message)
        raise


def _pin_dir_for_record(config_path: str | None) -> str:
    """The pin directory the configuration names, as far as it can be read at all."""
    main = main_config(config_path)
    try:
        return config_mod.load_settings(config_mod.config_files(main)).pin_dir
    except (config_mod.ConfigError, OSError):
        return config_mod.Settings().pin_dir


def main_config(config_path: str | None) -> str:
    """The main configuration file, spelled as pathlib would spell it."""
    return paths.normal(config_path) if config_path else config_mod.DEFAULT_CONFIG


def compiled_plan(config_path: str | None):
    """compiled.Compiled: what the last apply of these files resolved, when none of its inputs
    changed since (guard/policy/compiled.py); else None."""
    return _compiled_record(config_path)[0]


def _compiled_record(config_path: str | None, boot: bool = False):
    """(compiled.Compiled or None, the record's bytes or None, whether it is the one the last
    boot's first apply kept in /var/lib/portguard: with boot, taken when /run has none that
    holds)."""
    from guard import quick
    from guard.observe import outcome
    from guard.policy import compiled

    main = main_config(config_path)
    for from_boot in (False, True) if boot else (False,):
        if not from_boot and str(main) in quick.STALE:  # the quick path looked already
            continue
        record = outcome.plan_record(main, boot=from_boot)
        known = None if record is None else compiled.loads(record, main)
        if known is not None:
            return known, record, from_boot
    return None, None, False


def _apply(config_path: str | None) -> None:
    import time

    from guard import notify
    from guard.errors import GuardError
    from guard.kernel.apply import apply as apply_plan
    from guard.kernel.host import DENY_EPERM
    from guard.observe import display, outcome
    from guard.policy import compiled, resvport

    main = main_config(config_path)
    reading = time.time_ns()
    boot = outcome.first_of_boot()  # the boot's apply may take the plan the last boot's made
    known, record, kept = _compiled_record(config_path, boot)  # files unchanged since applied
    if known is None:
        from guard.policy import units  # here: a boot with the last boot's plan reads no unit

        with units.listing_cache():  # the unit files as they are now: each listed once
            cfg = load_config(config_path)
            plan = plan_of(cfg)
        unit_problems, unit_notes = cfg.unit_problems, cfg.unit_notes
    else:
        plan, unit_problems, unit_notes = known.plan, known.unit_problems, known.unit_notes
    said = display.unit_file_lines(unit_problems, unit_notes)
    for line in said:
        echo(line, err=True)

    def settle(result) -> None:
        """Once the guard is what the plan says, under the pin directory's lock: tell systemd
        (the boot goes on from here), then keep the records that let the next unchanged apply
        say so quickly (guard/quick.py), look for squatters and say what is worth saying. A
        failure from here on still ends apply with its sentence and exit code; the guard it
        applied stays in force, and the sentence says so."""
        outcome.clear(plan.settings.pin_dir)  # no failure to report: the guard is in force
        notify.ready()
        try:
            keep_and_say(result)
        except GuardError as exc:
            raise GuardError(f"the guard is in force, but {exc}") from None

    def keep_and_say(result) -> None:
        nonlocal record
        if known is None:
            record = compiled.dumps(cfg, plan, main, reading)
        if known is None or boot:  # in /run for status, check and the quick re-apply; and the
            outcome.save_plan(main, record, boot and not kept)  # boot's first, for the next
        warnings = [display.warning_line(note) for note in result.warnings]
        seen = errno.EPERM if result.denial == DENY_EPERM else plan.settings.deny_errno_number
        exposed = resvport.exposed((port for _, port in plan.ports), seen)
        if exposed:
            warnings.append(display.warning_line(resvport.warning(exposed, errno.errorcode[seen])))
        squatters, held = squatters_of_plan(plan)
        warnings += [display.warning_line(display.squatter_text(s)) for s in squatters]
        for line in warnings:
            echo(line, err=True)
        counts = (len(plan.ports), len(plan.paths), plan.settings.mode)
        echo(display.apply_line(result.changed, *counts))
        if record is not None and not squatters and held is not None:
            from guard import quick

            quick.remember(
                plan.settings.pin_dir,
                record,
                list(plan.ports),
                result.attach_dir,
                quick.code_files(result.object_path, str(resvport.BLACKLIST)),
                said + warnings,
                display.apply_line(False, *counts),
                reading,
                held,
            )

    result = runtime(apply_plan, plan, settle)
    # After READY=1 and outside the lock: the next load (the next boot's) parses a minimal BTF
    # instead of the kernel's whole BTF (made once per object and kernel).
    if result.object_path:
        from guard.kernel import corebtf

        corebtf.ensure(result.object_path)


def squatters_of_plan(plan) -> tuple[list, frozenset | None]:
    """Holders of the planned ports that are not owners (apply runs in the guarded netns), and
    the listening TCP and bound UDP sockets on them (protocol, port, inode) as the guard record
    keeps them (guard/quick.py; None without sock_diag). Only when a reserved port is held
    does the full sock_diag query run."""
    from guard.kernel.layout import PROTOCOL_NAMES
    from guard.observe.procnet import bound_ports, reserved_sockets

    try:
        held = reserved_sockets(list(plan.ports))
        bound = {(port, PROTOCOL_NAMES[proto]) for proto, port, _ in held}
    except OSError:  # no sock_diag for TCP: /proc/net, and no guard record
        held, bound = None, bound_ports()
    reservations = [
        (port, PROTOCOL_NAMES[proto], [plan.paths[i] for i in plan.sets[set_id]])
        for (proto, port), set_id in plan.ports.items()
        if (port, PROTOCOL_NAMES[proto]) in bound
    ]
    if not reservations:
        return [], held
    from guard.observe.holders import find  # sock_diag, processes, units: only when held

    return find(reservations), held
