"""The console scripts: `portguard` (and `python -m guard`), `portrelease`.

systemd runs `portguard apply` before sysinit.target on every boot, and again at every reload
and dpkg trigger, so exactly that command line is run here without importing click (click and
the CLI's other commands cost ~35 ms of CPU, a third of an unchanged re-apply):
  apply
  --config PATH apply     (or --config=PATH; without it $PORTGUARD_CONFIG, as click reads it)
Nothing else is parsed here. An apply that would change nothing is answered by guard/quick.py
when its records vouch for the pinned guard (the usual reload, daemon-reload and dpkg trigger);
otherwise, and on any doubt, the full path runs. Every other command line (`apply --dry-run`,
`status`, `check`, `--help`, shell completion, a malformed `--config`) goes to the click CLI
(guard/cli.py) as it is: one grammar. Both run the same guard/commands.py, which ends the same way.
"""

from __future__ import annotations

import gc
import os
import sys

CONFIG_ENV = "PORTGUARD_CONFIG"
CONFIG_OPTION = "--config"


def plain_apply(args: list[str]) -> tuple[bool, str | None]:
    """(True, the configuration path or None) when args are the boot's `apply`; else
    (False, None): click parses them."""
    if args == ["apply"]:
        return True, os.environ.get(CONFIG_ENV) or None  # click reads an empty one as unset
    if len(args) == 3 and args[0] == CONFIG_OPTION and args[2] == "apply":
        path = args[1]
    elif len(args) == 2 and args[0].startswith(CONFIG_OPTION + "=") and args[1] == "apply":
        path = args[0][len(CONFIG_OPTION) + 1 :]
    else:
        return False, None
    return (True, path) if path and not path.startswith("-") else (False, None)


def main() -> None:
    completing = any(name.endswith("_COMPLETE") for name in os.environ)  # shell completion
    is_apply, config_path = (False, None) if completing else plain_apply(sys.argv[1:])
    if not is_apply:
        from guard.cli import main as cli_main

        cli_main()
        return
    # An apply lives a few dozen milliseconds and makes few reference cycles: the cyclic
    # garbage collector, which would walk every object its ~70 modules create, stays off
    # (~1 ms of a boot's apply). monitor and the other commands keep it.
    gc.disable()
    from guard import quick

    if quick.reapply(config_path):
        sys.exit(0)
    sys.exit(run_apply(config_path))


def console() -> None:
    """The console script `portguard` (and the Debian package's launcher): main(), then the
    process ends once its output is flushed, without the interpreter's teardown -- freeing
    every module, object and type one by one, ~3 ms of CPU after a boot's apply (~70 modules),
    a tenth of it. Everything apply and the CLI write is closed by then (with blocks), and
    the pinned guard outlives the process anyway. An exception still ends the usual way,
    traceback and all. `python -m guard` ends so too (the tests' CLI, tests/unit/test_entry.py
    holds its ends to click's); tests that look into the process run main(), which raises
    SystemExit."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"), as Python itself ends it
        sys.stderr.write(f"{code}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):  # None: started without that descriptor
        try:
            if stream is not None:
                stream.flush()
        except OSError:  # whoever read it is gone: Python's own exit status for that
            code = code or (120 if stream is sys.stdout else 0)
    os._exit(code)


def run_apply(config_path: str | None) -> int:
    """`portguard apply` as the click CLI ends it too: the exit code; a failure as
    "Error: ..." on stderr, an interrupt as "Aborted!"."""
    from guard import commands

    try:
        commands.apply(config_path)
        return 0
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
