"""The console scripts: `portguard` (and `python -m guard`), `portrelease`.

systemd runs `/usr/bin/portguard apply` before sysinit.target on every boot, and operators and
monitoring run `status` and `check PORT` every few seconds, so their common command lines are
run here without click (importing click and the CLI's other commands cost ~35-40 ms of CPU, a
third of an unchanged re-apply and a fifth of a status). After at most the global
`--config PATH` or `--config=PATH` (else $PORTGUARD_CONFIG), exactly one of:
  apply
  status   with --json, --verbose/-v, --format F/--format=F, --output FILE/--output=FILE/
           -o FILE, in any order, each at most once, with values click would take
  check PORT   with --json before or after PORT, PORT a port spec that parses
Every other command line (also `--help`, `apply --dry-run`, a repeated option, a value click
refuses, shell completion) goes to the click CLI (guard/cli.py) as it is, which runs the same
functions (guard/commands.py, guard/reports.py) with the same output and exit codes.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import NamedTuple

CONFIG_ENV = "PORTGUARD_CONFIG"


class Fast(NamedTuple):
    """A command line entry.py runs itself: the command, the --config value (or None) and the
    command's options as the click command would receive them."""

    command: str
    config_path: str | None
    options: dict


def fast_command(args: list[str]) -> Fast | None:
    """The command line as a Fast one, or None: then it goes to click, as it is."""
    config_path, rest = _global_config(args)
    if not rest:
        return None
    if rest == ["apply"]:
        return Fast("apply", config_path, {})
    if rest[0] == "status":
        options = _status_options(rest[1:])
    elif rest[0] == "check":
        options = _check_options(rest[1:])
    else:
        return None
    return None if options is None else Fast(rest[0], config_path, options)


def _global_config(args: list[str]) -> tuple[str | None, list[str]]:
    """The global --config (else $PORTGUARD_CONFIG) and the arguments after it; no arguments
    when --config is given in a form this module leaves to click."""
    if args and args[0] == "--config":
        path = args[1] if len(args) > 1 else ""
        return (path, args[2:]) if path and not path.startswith("-") else (None, [])
    if args and args[0].startswith("--config="):
        path = args[0][len("--config=") :]
        return (path, args[1:]) if path else (None, [])
    return os.environ.get(CONFIG_ENV) or None, args  # click reads an empty one as unset


def _status_options(args: list[str]) -> dict | None:
    """status's options as click gives them (--json makes the format json), each at most
    once; None for anything else (a repeated option, --help, a bad --format or --output)."""
    from guard.reports import FORMATS

    seen: set[str] = set()
    output_format, as_json, verbose, output = "text", False, False, None
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in ("--format", "--output", "-o") and not eq:
            if i + 1 >= len(args):
                return None
            i += 1
            value = args[i]
        key = {"-v": "--verbose", "-o": "--output"}.get(name, name)
        if key in seen:
            return None
        seen.add(key)
        if key == "--json" and not eq:
            as_json = True
        elif key == "--verbose" and not eq:
            verbose = True
        elif key == "--format" and value in FORMATS:
            output_format = value
        elif key == "--output" and _writable_path(value):
            output = value
        else:
            return None
        i += 1
    return {
        "output_format": "json" if as_json else output_format,
        "verbose": verbose,
        "output": output,
    }


def _writable_path(value: str) -> bool:
    """What click.Path(dir_okay=False) takes: a path that does not exist, or a readable one
    that is not a directory (click says why it refuses the others)."""
    if not value or value.startswith("-"):
        return False
    try:
        st = os.stat(value)
    except OSError:
        return True
    return not stat.S_ISDIR(st.st_mode) and os.access(value, os.R_OK)


def _check_options(args: list[str]) -> dict | None:
    """check's PORT and --json (either order); None for anything else."""
    ports = [a for a in args if a != "--json"]
    if len(ports) != 1 or len(args) - len(ports) > 1 or ports[0].startswith("-"):
        return None
    return {"port": ports[0], "as_json": len(args) == 2}


def main() -> None:
    completing = any(name.endswith("_COMPLETE") for name in os.environ)  # shell completion
    fast = None if completing else fast_command(sys.argv[1:])
    if fast is not None and fast.command == "check":
        fast = _with_check_pairs(fast)
    if fast is None:
        from guard.cli import main as cli_main

        cli_main()
        return
    sys.exit(run(fast))


def _with_check_pairs(fast: Fast) -> Fast | None:
    """check's PORT as (protocol, port) pairs; None when it names none: click's usage error."""
    from guard.policy.ports import PortSpecError
    from guard.reports import check_target

    try:
        pairs = check_target(fast.options["port"])
    except PortSpecError:
        return None
    return fast._replace(options={"pairs": pairs, "as_json": fast.options["as_json"]})


def run(fast: Fast) -> int:
    """The command as the click CLI ends it: the exit code; a failure as "Error: ..." on
    stderr, an interrupt as "Aborted!"."""
    from guard import commands

    try:
        if fast.command == "apply":
            commands.apply(fast.config_path)
            return 0
        from guard import reports

        if fast.command == "check":
            reports.check(fast.config_path, **fast.options)
            return 0
        output = fast.options["output"]
        return reports.status(
            fast.config_path,
            fast.options["output_format"],
            fast.options["verbose"],
            None if output is None else Path(output),
        )
    except commands.CommandError as exc:
        commands.echo(f"Error: {exc.message}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        commands.echo("\nAborted!", err=True)
        return 1
    except BrokenPipeError:  # whoever read stdout is gone: nothing more to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1


def portrelease() -> None:
    """portreserve's portrelease: with portguard there is nothing to release, ever."""
    sys.exit(0)
