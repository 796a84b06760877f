"""Command line: portguard apply|status|check|remove|build, and the portrelease shim.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or configuration; `status` exits 3 when a
reserved port is held by a non-owner (a squatter) and 4 when no guard is loaded, so monitoring
can alert on both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from guard.policy import config as config_mod

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_SQUATTER = 3
EXIT_NOT_LOADED = 4


class ConfigProblem(click.ClickException):
    exit_code = EXIT_CONFIG


class RuntimeProblem(click.ClickException):
    exit_code = EXIT_RUNTIME


def _load_config(path: str | None) -> config_mod.Config:
    main = Path(path) if path else config_mod.DEFAULT_CONFIG
    if path and not main.exists():
        raise ConfigProblem(f"{main}: no such configuration file")
    files = config_mod.config_files(main)
    try:
        return config_mod.load(files)
    except config_mod.ConfigError as exc:
        raise ConfigProblem(f"invalid configuration, nothing applied:\n{exc}") from None


def _load_settings(path: str | None) -> config_mod.Settings:
    """Settings for commands that only read or tear down: a reservation error elsewhere in
    the files is reported as a warning, not a reason to be blind."""
    try:
        return _load_config(path).settings
    except ConfigProblem as exc:
        from guard.observe.display import warning_line

        click.echo(warning_line(exc.message), err=True)
    main = Path(path) if path else config_mod.DEFAULT_CONFIG
    try:
        return config_mod.load_settings(config_mod.config_files(main))
    except config_mod.ConfigError as exc:
        raise ConfigProblem(f"invalid [guard] settings:\n{exc}") from None


def _plan(cfg: config_mod.Config):
    from guard.kernel.layout import LIMITS
    from guard.policy import owners, plan

    try:
        return plan.build(cfg.settings, *owners.resolve_all(cfg), LIMITS)
    except config_mod.ConfigError as exc:
        raise ConfigProblem(f"invalid configuration, nothing applied:\n{exc}") from None


def _runtime(fn, *args):
    from guard.errors import GuardError

    try:
        return fn(*args)
    except GuardError as exc:
        raise RuntimeProblem(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar="PORTGUARD_CONFIG",
    help=f"Main configuration file (default {config_mod.DEFAULT_CONFIG}); "
    "drop-ins are read from conf.d/*.toml beside it.",
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Race-free port reservations: binds to a reserved port fail (EADDRINUSE) unless the
    caller runs in the owner's cgroup. Enforced in the kernel; nothing to release."""
    ctx.obj = config_path


@main.command()
@click.pass_obj
def apply(config_path: str | None) -> None:
    """Load or update the guard to match the configuration, then exit (the guard stays)."""
    from guard.observe import outcome

    try:
        pin_dir = _apply(config_path)
    except click.ClickException as exc:
        outcome.record_failure(_pin_dir_for_record(config_path), exc.format_message())
        raise
    outcome.clear(pin_dir)


def _pin_dir_for_record(config_path: str | None) -> str:
    """The pin directory the configuration names, as far as it can be read at all."""
    main = Path(config_path) if config_path else config_mod.DEFAULT_CONFIG
    try:
        return config_mod.load_settings(config_mod.config_files(main)).pin_dir
    except (config_mod.ConfigError, OSError):
        return config_mod.Settings().pin_dir


def _apply(config_path: str | None) -> str:
    """Apply; the pin directory applied to."""
    from guard.kernel.apply import apply as apply_plan
    from guard.observe import display

    cfg = _load_config(config_path)
    plan = _plan(cfg)
    result = _runtime(apply_plan, plan)
    for note in result.warnings:
        click.echo(display.warning_line(note), err=True)
    for squatter in _squatters_of_plan(plan):
        click.echo(display.warning_line(display.squatter_text(squatter)), err=True)
    click.echo(
        display.apply_line(result.changed, len(plan.ports), len(plan.paths), plan.settings.mode)
    )
    return plan.settings.pin_dir


def _squatters_of_plan(plan) -> list:
    """Holders of the planned ports that are not owners (apply runs in the guarded netns).
    /proc/net is read first: only when a reserved port is held does sock_diag run."""
    from guard.kernel.layout import PROTOCOL_NAMES
    from guard.observe.procnet import bound_ports

    bound = bound_ports()
    reservations = [
        (port, PROTOCOL_NAMES[proto], [plan.paths[i] for i in plan.sets[set_id]])
        for (proto, port), set_id in plan.ports.items()
        if (port, PROTOCOL_NAMES[proto]) in bound
    ]
    if not reservations:
        return []
    from guard.observe.holders import find  # sock_diag, processes, units: only when held

    return find(reservations)


@main.command()
@click.pass_obj
def remove(config_path: str | None) -> None:
    """Detach and unpin the guard and restore the sysctl: the machine is as before."""
    from guard.kernel.apply import remove as remove_guard
    from guard.observe.display import remove_line

    click.echo(remove_line(_runtime(remove_guard, _load_settings(config_path))))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(config_path: str | None, as_json: bool) -> None:
    """Show the guard as the kernel holds it: links, every reservation, its owners, the
    denied binds, and who holds the port now. Exits 3 when a non-owner holds a reserved port,
    4 when no guard is loaded (saying why, when the last apply failed).

    Run it in the guarded network namespace: holders are read there."""
    from guard.kernel.host import netns_cookie
    from guard.observe import display, holders, outcome
    from guard.observe.state import read_state

    settings = _load_settings(config_path)
    state = _runtime(read_state, settings)
    state = holders.with_holders(state, netns_cookie())
    failure = outcome.last_failure(settings.pin_dir)
    if as_json:
        click.echo(display.status_json(state, failure))
    else:
        for line in display.status_lines(state, settings.cgroup):
            click.echo(line)
        if failure:
            click.echo(display.failure_line(failure, state.loaded), err=True)
    if not state.loaded:
        sys.exit(EXIT_NOT_LOADED)
    found = holders.of_state(state)
    if found:
        if not as_json:
            click.echo(display.squatters_line(len(found)), err=True)
        sys.exit(EXIT_SQUATTER)


@main.command()
@click.argument("port")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def check(config_path: str | None, port: str, as_json: bool) -> None:
    """Say who owns PORT[/tcp|/udp] (a number or an /etc/services name)."""
    from guard.observe import display
    from guard.observe.state import read_state
    from guard.policy.ports import PortSpecError, parse_check_target

    try:
        pairs = parse_check_target(port)
    except PortSpecError as exc:
        raise click.UsageError(str(exc)) from None
    state = _runtime(read_state, _load_settings(config_path), pairs)
    results = display.check_results(pairs, state.reservations)
    if as_json:
        click.echo(display.check_json(results))
        return
    for line in display.check_lines(results):
        click.echo(line)


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
            sink = display.JournalSink(journal.Journal())
        except journal.JournalError as exc:
            raise RuntimeProblem(str(exc)) from None
    elif as_json:
        sink = display.JsonSink(sys.stdout)
    else:
        sink = display.TextSink(sys.stdout)

    def ready() -> None:
        click.echo(display.monitor_ready_line(settings.pin_dir), err=True)

    summary = _runtime(
        lambda: monitor_mod.run(
            Path(settings.pin_dir),
            sink,
            count=count,
            duration=duration,
            stall_until=stall_until,
            on_ready=ready,
        )
    )
    click.echo(display.monitor_summary_line(summary.received, summary.lost), err=True)


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

    _runtime(demo_mod.run, click.echo)


@main.command("import-portreserve")
@click.argument("directory", default="/etc/portreserve", type=click.Path(file_okay=False))
def import_portreserve(directory: str) -> None:
    """Print portreserve's configuration (DIRECTORY, default /etc/portreserve) as portguard
    TOML. portguard reads those files as they are anyway; this is for migrating."""
    from guard.policy.portreserve import PortreserveError, read_portreserve, to_toml

    try:
        click.echo(to_toml(read_portreserve(Path(directory))), nl=False)
    except PortreserveError as exc:
        raise ConfigProblem(str(exc)) from None


def portrelease() -> None:
    """portreserve's portrelease: with portguard there is nothing to release, ever."""
    sys.exit(0)
