"""What `status` and `check` do, without click: read the pins, the files and the holders, and
say what they show.

Operators and monitoring run these two every few seconds; the click CLI (guard/cli.py) parses
their command lines and calls these functions, which import what each step needs when it runs.
As in guard/commands.py, a failure is a CommandError (a sentence and an exit code); what the
guard is found to be is the exit code returned.
"""

from __future__ import annotations

import os
from pathlib import Path

from guard.commands import (
    ConfigProblem,
    RuntimeProblem,
    compiled_plan,
    config_files,
    echo,
    load_config,
    plan_of,
    runtime,
    settings_only,
)
from guard.policy import config as config_mod

EXIT_OK = 0
EXIT_SQUATTER = 3
EXIT_NOT_LOADED = 4
EXIT_CONFIG_DIFFERS = 5

FORMATS = ("text", "json", "prometheus")


def status(
    config_path: str | None,
    output_format: str = "text",
    verbose: bool = False,
    output: Path | None = None,
) -> int:
    """`portguard status`: the guard as the kernel holds it, in output_format, to stdout or
    written to output; the exit code: 4 when no guard is loaded, 3 when a non-owner holds a
    reserved port, 5 when the loaded guard is not what the files ask for (the first that
    holds), else 0."""
    from guard.kernel.host import netns_cookie, netns_inode
    from guard.observe import display, holders, outcome
    from guard.observe.state import read_state, with_origins
    from guard.policy import resvport

    config_files(config_path)  # unreadable: exit 2 at once
    known = compiled_plan(config_path)  # the files unchanged since they were applied
    with _reading_unit_files(known):
        cfg, problem = (None, None) if known else config_or_problem(config_path)
        settings = (
            known.plan.settings if known else cfg.settings if cfg else settings_only(config_path)
        )
        state = runtime(read_state, settings)
        state = holders.with_holders(state, netns_cookie(), netns_inode())
        failure = outcome.last_failure(settings.pin_dir)
        differences, origins = (
            _differences(cfg, problem, state, known) if state.loaded else ([], {})
        )
    state = with_origins(state, origins)
    found = holders.of_state(state)
    exposed = resvport.exposed((r.port for r in state.reservations), state.deny_errno)
    if output_format == "json":
        lines = display.status_json(
            state,
            failure,
            config_matches=state.loaded and not differences,
            config_differences=differences,
            squatters=len(found),
            bindresvport_exposed=exposed,
        ).splitlines()
    elif output_format == "prometheus":
        lines = display.prometheus_lines(
            state,
            config_matches=state.loaded and not differences,
            squatter_keys={(s.port, s.protocol) for s in found},
            bindresvport_exposed=exposed,
            apply_failed=failure is not None,
        )
    else:
        lines = display.status_lines(state, settings.cgroup, verbose)
        if failure:
            echo(display.failure_line(failure, state.loaded), err=True)
        for line in display.drift_lines(differences):
            echo(line, err=True)
        if exposed:
            warning = resvport.warning(exposed, display.errno_name(state.deny_errno))
            echo(display.warning_line(warning), err=True)
        if found:
            echo(display.squatters_line(len(found)), err=True)
    write_lines(lines, output)
    if not state.loaded:
        return EXIT_NOT_LOADED
    if found:
        return EXIT_SQUATTER
    if differences:
        return EXIT_CONFIG_DIFFERS
    return EXIT_OK


def _reading_unit_files(known):
    """As apply reads the unit files (each directory listed once), unless a compiled plan
    (known) spares reading them at all."""
    if known is not None:
        from contextlib import nullcontext

        return nullcontext()
    from guard.policy import units

    return units.listing_cache()


def write_lines(lines: list[str], output: Path | None) -> None:
    """To stdout, or to output through a new file renamed over it (readers never see half)."""
    if output is None:
        for line in lines:
            echo(line)
        return
    tmp = output.with_name(f".{output.name}.{os.getpid()}")
    try:
        tmp.write_text("".join(line + "\n" for line in lines))
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeProblem(f"cannot write {output}: {exc.strerror}") from None


def config_or_problem(config_path: str | None) -> tuple[config_mod.Config | None, str | None]:
    """The configuration, or why it cannot be loaded (status reports that, it does not stop)."""
    try:
        return load_config(config_path), None
    except ConfigProblem as exc:
        return None, exc.message


def _differences(
    cfg: config_mod.Config | None, problem: str | None, state, known=None
) -> tuple[list, dict]:
    """How the loaded guard differs from what the files ask for (empty: the same), and where
    each reservation comes from in the files ((protocol, port) -> origins); known: the files'
    compiled plan, when they are unchanged since an apply."""
    from guard.observe import drift

    if known is not None:
        plan, unit_problems = known.plan, known.unit_problems
    elif cfg is not None:
        try:
            plan = plan_of(cfg)
        except ConfigProblem as exc:
            return [f"the files cannot be applied: {exc.message}"], {}
        unit_problems = cfg.unit_problems
    else:
        return [f"the files cannot be applied: {problem}"], {}
    left_out = [f"not guarded as the unit files ask: {p}" for p in unit_problems]
    return drift.differences(plan, state) + left_out, plan.origins


def check_target(port: str) -> list[tuple[str, int]]:
    """PORT[/tcp|/udp] as (protocol, port) pairs; ports.PortSpecError when it names none (a
    usage error: the CLI says so as click does)."""
    from guard.policy.ports import parse_check_target

    return parse_check_target(port)


def check(config_path: str | None, pairs: list[tuple[str, int]], as_json: bool) -> None:
    """`portguard check PORT`: whether each (protocol, port) is reserved, and for whom."""
    from guard.observe.state import read_state, with_origins

    known = compiled_plan(config_path)  # the files unchanged since they were applied
    if known is not None:
        state = runtime(read_state, known.plan.settings, pairs)
        origins = known.plan.origins
        wanted = {pair: origins[pair] for pair in pairs if pair in origins}
        _check_lines(with_origins(state, wanted), pairs, as_json)
        return
    from guard.observe import display
    from guard.policy import owners, plan, units

    with units.listing_cache():  # as apply reads the unit files: each directory listed once
        cfg, problem = config_or_problem(config_path)
        if cfg is None:  # as cli's _load_settings, without reading the files a second time
            echo(display.warning_line(problem), err=True)
        settings = cfg.settings if cfg else settings_only(config_path)
        state = runtime(read_state, settings, pairs)
        if cfg is not None:
            applying = [block for block in cfg.blocks if owners.block_applies(block)]
            state = with_origins(state, plan.port_origins(applying, pairs))
    _check_lines(state, pairs, as_json)


def _check_lines(state, pairs: list[tuple[str, int]], as_json: bool) -> None:
    from guard.observe import display

    results = display.check_results(pairs, state.reservations)
    if as_json:
        echo(display.check_json(results))
        return
    for line in display.check_lines(results):
        echo(line)
