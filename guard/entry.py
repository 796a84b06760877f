"""The console scripts: `portguard` (and `python -m guard`), `portrelease`.

systemd runs `/usr/bin/portguard apply` before sysinit.target on every boot, so that command
line is run here without click (importing click and the CLI's other commands cost ~35 ms of
CPU, a third of an unchanged re-apply): exactly `apply`, after at most the global
`--config PATH` or `--config=PATH` (else $PORTGUARD_CONFIG). Every other command line, also
`apply --help` or `apply --dry-run`, goes to the click CLI (guard/cli.py), which runs the same
apply (guard/commands.py) with the same output and exit codes.
"""

from __future__ import annotations

import os
import sys

CONFIG_ENV = "PORTGUARD_CONFIG"


def plain_apply(args: list[str]) -> tuple[bool, str | None]:
    """(True, the --config value or None) when args are a plain `apply`; (False, None) else."""
    if args == ["apply"]:
        return True, os.environ.get(CONFIG_ENV) or None  # click reads an empty one as unset
    if len(args) == 3 and args[0] == "--config" and args[2] == "apply":
        path = args[1]
        return (True, path) if path and not path.startswith("-") else (False, None)
    if len(args) == 2 and args[0].startswith("--config=") and args[1] == "apply":
        path = args[0][len("--config=") :]
        return (True, path) if path else (False, None)
    return False, None


def main() -> None:
    plain, config_path = plain_apply(sys.argv[1:])
    if not plain or any(name.endswith("_COMPLETE") for name in os.environ):  # shell completion
        from guard.cli import main as cli_main

        cli_main()
        return
    sys.exit(run_apply(config_path))


def run_apply(config_path: str | None) -> int:
    """`portguard apply` as the click CLI ends it: the exit code; a failure as
    "Error: ..." on stderr, an interrupt as "Aborted!"."""
    from guard import commands

    try:
        commands.apply(config_path)
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
    return 0


def portrelease() -> None:
    """portreserve's portrelease: with portguard there is nothing to release, ever."""
    sys.exit(0)
