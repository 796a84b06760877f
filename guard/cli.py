"""Command line: portguard apply|status|check|remove|build|monitor|demo|import-portreserve.

The one command line that does not come here is the boot's plain `portguard apply`:
guard/entry.py runs it without importing click, through the same guard/commands.py as `apply`
below. Every command imports what it needs when it runs.

Exit codes (README, portguard(8) EXIT STATUS):
  0  ok: the guard is loaded, as the files say, and no reserved port is held by a non-owner
  1  runtime failure (one sentence, no traceback)
  2  bad usage or configuration (nothing applied)
  3  `status`: a reserved port is held by a non-owner (a squatter)
  4  `status`: no guard is loaded (also when the last apply failed: it says why)
  5  `status`: a guard is loaded, but not the one the configuration files ask for (it says what
     differs: an edit without a reload, or files that cannot be applied)
When several hold, `status` exits with the first of 4, 3, 5; `status --json` carries them all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from guard import reports
from guard.commands import (
    CommandError,
    ConfigProblem,
    RuntimeProblem,
    config_files,
    load_config,
    plan_of,
    runtime,
    settings_only,
)
from guard.commands import apply as apply_guard
from guard.policy import config as config_mod


class _Problem(click.ClickException):
    """A CommandError ended as entry.py ends a plain apply's: "Error: ..." on stderr (our
    words, whatever click's version writes for its own errors), its exit code."""

    def __init__(self, error: CommandError) -> None:
        super().__init__(error.message)
        self.exit_code = error.exit_code

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CommandError as exc:
            raise _Problem(exc) from None


def _load_settings(path: str | None) -> config_mod.Settings:
    """Settings for commands that only read or tear down: a reservation error elsewhere in
    the files is reported as a warning, not a reason to be blind (unreadable files are)."""
    config_files(path)
    try:
        return load_config(path).settings
    except ConfigProblem as exc:
        from guard.observe.display import warning_line

        click.echo(warning_line(exc.message), err=True)
    return settings_only(path)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar="PORTGUARD_CONFIG",
    help=f"Main configuration file (default {config_mod.DEFAULT_CONFIG}); "
    "drop-ins are read from conf.d/*.toml beside it.",
)
@click.version_option(
    None, "--version", "-V", package_name="portguard", message="portguard %(version)s"
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Race-free port reservations: binds to a reserved port fail (EADDRINUSE) unless the
    caller runs in the owner's cgroup. Enforced in the kernel; nothing to release."""
    ctx.obj = config_path


@main.command()
@click.option(
    "--dry-run",
    "-n",
    "dry_run",
    is_flag=True,
    help="Check the configuration and show what apply would load and change; change nothing.",
)
@click.pass_obj
def apply(config_path: str | None, dry_run: bool) -> None:
    """Load or update the guard to match the configuration, then exit (the guard stays).
    With --dry-run: validate the files (exit 2 when invalid), resolve the owners, print the
    reservations and what apply would change against the loaded guard; nothing is changed."""
    if dry_run:
        _dry_run(config_path)
        return
    apply_guard(config_path)


def _dry_run(config_path: str | None) -> None:
    """`nginx -t` for portguard: the files as apply would read them, and the change."""
    from guard.observe import display, drift
    from guard.observe.state import read_state
    from guard.policy import owners, units

    with units.listing_cache():  # as apply reads them
        cfg = load_config(config_path)
        the_plan = plan_of(cfg)
        skipped = [block for block in cfg.blocks if not owners.block_applies(block)]
    for line in display.plan_lines(cfg, the_plan, skipped):
        click.echo(line)
    for line in display.unit_file_lines(cfg.unit_problems, cfg.unit_notes):
        click.echo(line)
    if os.geteuid() != 0:
        click.echo("portguard: not compared with the loaded guard: that needs root")
        return
    state = runtime(read_state, the_plan.settings)
    if not state.loaded:
        click.echo("portguard: apply would load the guard: none is loaded")
        return
    for line in display.dry_run_changes(drift.differences(the_plan, state)):
        click.echo(line)


@main.command()
@click.pass_obj
def remove(config_path: str | None) -> None:
    """Detach and unpin the guard and restore the sysctl: the machine is as before."""
    from guard.kernel.apply import remove as remove_guard
    from guard.observe import outcome
    from guard.observe.display import remove_line

    click.echo(remove_line(runtime(remove_guard, _load_settings(config_path))))
    outcome.removed()


@main.command()
@click.option(
    "--format",
    "output_format",
    type=click.Choice(reports.FORMATS),
    default="text",
    show_default=True,
    help="text for people, json for scripts, prometheus for metrics scrapers.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (--format json).")
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="One line per owner, also those whose cgroup does not exist here.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write to FILE (a new file renamed over it, so readers never see half of it), "
    "e.g. for node_exporter's textfile collector.",
)
@click.pass_obj
def status(
    config_path: str | None,
    output_format: str,
    as_json: bool,
    verbose: bool,
    output: Path | None,
) -> None:
    """Show the guard as the kernel holds it: links, every reservation, its owners, the
    denied binds, and who holds the port now. Exits 4 when no guard is loaded (saying why,
    when the last apply failed), 3 when a non-owner holds a reserved port, 5 when the loaded
    guard is not what the configuration files ask for (saying what differs).

    Run it in the guarded network namespace: holders are read there."""
    output_format = "json" if as_json else output_format
    code = reports.status(config_path, output_format, verbose, output)
    if code:
        sys.exit(code)


@main.command()
@click.argument("port")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def check(config_path: str | None, port: str, as_json: bool) -> None:
    """Say who owns PORT[/tcp|/udp] (a number or an /etc/services name)."""
    from guard.policy.ports import PortSpecError

    try:
        pairs = reports.check_target(port)
    except PortSpecError as exc:
        raise click.UsageError(str(exc)) from None
    reports.check(config_path, pairs, as_json)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "--journal",
    "to_journal",
    is_flag=True,
    help="Log to the systemd journal with PORTGUARD_* fields instead of printing.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    metavar="N",
    help="Stop after N events (received or lost).",
)
@click.option(
    "--duration", type=click.FloatRange(min=0), metavar="SECONDS", help="Stop after SECONDS."
)
@click.option(
    "--stall-until",
    type=click.Path(path_type=Path),
    hidden=True,
    help="Testing: consume nothing until this file exists (forces losses).",
)
@click.pass_obj
def monitor(
    config_path: str | None,
    as_json: bool,
    to_journal: bool,
    count: int | None,
    duration: float | None,
    stall_until: Path | None,
) -> None:
    """Print every refused bind as it happens (in audit mode: every bind that would be
    refused). Lost events are reported as "lost N events", never dropped silently.
    One monitor at a time; runs until interrupted."""
    from guard.observe import display, journal
    from guard.observe import monitor as monitor_mod

    settings = _load_settings(config_path)
    if to_journal:
        try:
            sink = display.JournalSink(journal.Journal(), settings.journal_interval)
        except journal.JournalError as exc:
            raise RuntimeProblem(str(exc)) from None
    elif as_json:
        sink = display.JsonSink(sys.stdout)
    else:
        sink = display.TextSink(sys.stdout)

    def ready() -> None:
        click.echo(display.monitor_ready_line(settings.pin_dir), err=True)

    summary = runtime(
        lambda: monitor_mod.run(
            Path(settings.pin_dir),
            sink,
            count=count,
            duration=duration,
            stall_until=stall_until,
            on_ready=ready,
        )
    )
    if summary.stopped_by == "output closed":
        _detach_stdout()
    click.echo(display.monitor_summary(summary), err=True)


def _detach_stdout() -> None:
    """Whoever read stdout is gone (`portguard monitor | head`): point it at /dev/null, so
    that flushing it at exit raises no second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@main.command()
def build() -> None:
    """Compile the BPF object into the cache, so apply needs no compiler (e.g. at boot)."""
    from guard.kernel import objects
    from guard.observe.display import built_line

    try:
        click.echo(built_line(objects.build()))
    except objects.BuildError as exc:
        raise RuntimeProblem(str(exc)) from None


@main.command()
def demo() -> None:
    """Apply the embedded default policy in a private cgroup subtree and network namespace,
    show refusals and bindresvport() moving on, then remove everything."""
    from guard import demo as demo_mod

    runtime(demo_mod.run, click.echo)


@main.command("import-portreserve")
@click.argument("directory", default="/etc/portreserve", type=click.Path(file_okay=False))
@click.option(
    "--drop-ins",
    "dropin_dir",
    metavar="UNIT_DIR",
    is_flag=False,
    flag_value="/etc/systemd/system",
    default=None,
    help="Instead of printing TOML, write UNIT_DIR/NAME.service.d/portguard.conf declaring "
    "X-PortGuard-Reserve= for each service (UNIT_DIR defaults to /etc/systemd/system).",
)
def import_portreserve(directory: str, dropin_dir: str | None) -> None:
    """Print portreserve's configuration (DIRECTORY, default /etc/portreserve) as portguard
    TOML, or with --drop-ins write it as unit drop-ins. portguard reads those files as they
    are anyway; this is for migrating."""
    from guard.policy.portreserve import PortreserveError, read_portreserve, to_toml

    try:
        entries = read_portreserve(Path(directory))
    except PortreserveError as exc:
        raise ConfigProblem(str(exc)) from None
    if dropin_dir is None:
        click.echo(to_toml(entries), nl=False)
        return
    _write_dropins(entries, Path(dropin_dir), directory)


def _write_dropins(entries, unit_dir: Path, directory: str) -> None:
    """Write every drop-in, or none: an existing different file is never overwritten."""
    from guard.observe.display import dropins_written_lines
    from guard.policy.portreserve import DROPIN_NAME, to_dropins

    wanted = {
        unit_dir / f"{unit}.d" / DROPIN_NAME: text for unit, text in to_dropins(entries).items()
    }
    clashes = []
    for path, text in wanted.items():
        try:
            if path.read_text() != text:
                clashes.append(str(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RuntimeProblem(f"cannot read {path}: {exc.strerror}") from None
    if clashes:
        raise ConfigProblem(
            "not written, these files exist and differ (move them away first): "
            + ", ".join(clashes)
        )
    for path, text in wanted.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            raise RuntimeProblem(f"cannot write {path}: {exc.strerror}") from None
    for line in dropins_written_lines([str(p) for p in wanted], directory):
        click.echo(line)
