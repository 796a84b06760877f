"""Benchmarks that boot Debian bookworm with systemd-nspawn (real systemd, this kernel), from
the tree with real services (cups, dovecot, rsync, nfs-common, rpcbind: tests/systemd's rootfs
--services) and the built .deb installed before boot, as an administrator would.

boot: portguard.service enabled vs masked, the two in a fresh random order per round. Figures
are the guest systemd's own monotonic timestamps (sysinit.target and multi-user.target reached
after the manager started, start-up finished, portguard.service's start, run time and CPU) and
the guest's userspace CPU at boot: the usage of the guest's root cgroup (the -.slice of its
systemd: PID 1 and every unit, with the kernel's work on their behalf), read from the host as
soon as the boot has finished. A round's delays are guarded minus masked of the same round.

cli: the CLI's CPU in the booted guest, paired per round with `python3 -c pass`.

reload: in the booted guest, a unit's drop-in gains (or loses) X-PortGuard-Reserve=,
`systemctl daemon-reload`, and the time until a stranger's bind to that port is refused (or
allowed again), seen by a stranger unit that binds every millisecond.

Reuses the systemd tests' machinery (tests/systemd: the cached root file system, the .deb,
the guest's units and configuration, pgnet.py's stranger).
"""

from __future__ import annotations

import json
import random
import time

import pytest

from bench.harness import Unavailable, median, spread, table

ROUNDS = {True: 2, False: 15}  # quick, full: boots each way (each a first boot and a reboot)
# /etc wins over the package's unit in /usr/lib: the guard never runs at boot.
MASKED = "/etc/systemd/system/portguard.service"


def _show(box, unit: str | None, *props: str) -> dict[str, int]:
    args = ["show", *(f"-p{p}" for p in props)] + (["--", unit] if unit else [])
    shown = {}
    for line in box.systemctl(*args).stdout.splitlines():
        key, _, value = line.partition("=")
        shown[key] = int(value) if value.isdigit() else 0
    return shown


def _cgroup_cpu_ms(box, below: str = "") -> float:
    """CPU used so far in the guest's root cgroup (or a cgroup below it), read on the host:
    usage_usec of cpu.stat, which the kernel keeps without the cpu controller."""
    directory = box.cgroup_root / box.cgroup.lstrip("/") / below
    for line in (directory / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1000
    raise RuntimeError(f"no usage_usec in {directory}/cpu.stat")


SYSINIT = "sysinit.target reached (ms after the manager started)"
MULTI_USER = "multi-user.target reached (ms after the manager started)"
FINISHED = "start-up finished (ms)"
GUEST_CPU = "userspace CPU at boot, the whole guest (ms)"
PAIRED = (SYSINIT, MULTI_USER, FINISHED, GUEST_CPU)


def _figures(box) -> dict[str, float]:
    # First, before any question to the guest's PID 1 adds to its CPU.
    guest_cpu, pid1_cpu = _cgroup_cpu_ms(box), _cgroup_cpu_ms(box, "init.scope")
    manager = _show(box, None, "UserspaceTimestampMonotonic", "FinishTimestampMonotonic")
    start = manager["UserspaceTimestampMonotonic"]

    def reached(unit: str) -> float:
        entered = _show(box, unit, "ActiveEnterTimestampMonotonic")
        return (entered["ActiveEnterTimestampMonotonic"] - start) / 1000

    guard = _show(
        box,
        "portguard.service",
        "InactiveExitTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
        "ExecMainExitTimestampMonotonic",
        "CPUUsageNSec",
    )
    figures = {
        SYSINIT: reached("sysinit.target"),
        MULTI_USER: reached("multi-user.target"),
        FINISHED: (manager["FinishTimestampMonotonic"] - start) / 1000,
        GUEST_CPU: guest_cpu,
        "of it: PID 1 (init.scope; ms)": pid1_cpu,
    }
    if guard["ActiveEnterTimestampMonotonic"]:
        figures["portguard.service started (ms after the manager started)"] = (
            guard["InactiveExitTimestampMonotonic"] - start
        ) / 1000
        figures["portguard.service ran (ms)"] = (
            guard["ActiveEnterTimestampMonotonic"] - guard["InactiveExitTimestampMonotonic"]
        ) / 1000
        if guard["ExecMainExitTimestampMonotonic"]:  # Type=notify: apply goes on after READY=1
            figures["portguard.service: apply exited after it was active (ms)"] = (
                guard["ExecMainExitTimestampMonotonic"] - guard["ActiveEnterTimestampMonotonic"]
            ) / 1000
        if guard.get("CPUUsageNSec"):
            figures["portguard.service CPU (ms)"] = guard["CPUUsageNSec"] / 1e6
            figures["portguard.service CPU, share of the guest's (%)"] = (
                guard["CPUUsageNSec"] / 1e4 / guest_cpu
            )
    return figures


def _plan_kept(box) -> int:
    """1 when the last apply kept a compiled plan in /run/portguard (plan-*), else 0."""
    listed = box.run("sh", "-c", "ls /run/portguard/ | grep -c '^plan-'").stdout.strip()
    return int(listed or 0) and 1


def _failed_units(box) -> str:
    listed = box.systemctl("list-units", "--failed", "--plain", "--no-legend", check=False)
    return " ".join(sorted(line.split()[0] for line in listed.stdout.splitlines() if line.strip()))


COUNT_SUBPROCESSES = (
    "mkdir -p /run/pg-count && rm -f /run/pg-count/log && for tool in systemctl mount ip "
    'bpftool sysctl; do printf \'#!/bin/sh\\necho "$0 $*" >> /run/pg-count/log\\n'
    "exec /usr/bin/'$tool' \"$@\"\\n' > /run/pg-count/$tool; chmod +x /run/pg-count/$tool; "
    "done; PATH=/run/pg-count:$PATH portguard apply >/dev/null 2>&1; "
    "touch /run/pg-count/log; wc -l < /run/pg-count/log"
)


# A systemctl first on PATH that runs the real one and logs the CPU ms it took.
SYSTEMCTL_CPU = """#!/usr/bin/python3
import resource, subprocess, sys
ran = subprocess.run(["/usr/bin/systemctl", *sys.argv[1:]])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
with open("/run/pg-cpu/log", "a") as log:
    log.write(f"{(r.ru_utime + r.ru_stime) * 1000}\\n")
sys.exit(ran.returncode)
"""

# An unchanged re-apply in the booted guest: its CPU (children's rusage); then again with the
# systemctl above first on PATH, for the CPU of the systemctl it runs. One apply first, more
# than a second after the boot: a boot's apply keeps no compiled plan when an input changed
# less than a second before it (the .deb installed right before the first boot), and then the
# first re-apply would run in full.
REAPPLY_CPU = f"""
import os, resource, subprocess, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * 1000
time.sleep(1.2)
subprocess.run(["portguard", "apply"], capture_output=True, check=True)
begin = cpu()
subprocess.run(["portguard", "apply"], capture_output=True, check=True)
total = cpu() - begin
os.makedirs("/run/pg-cpu", exist_ok=True)
with open("/run/pg-cpu/systemctl", "w") as wrapper:
    wrapper.write({SYSTEMCTL_CPU!r})
os.chmod("/run/pg-cpu/systemctl", 0o755)
open("/run/pg-cpu/log", "w").close()
env = dict(os.environ, PATH="/run/pg-cpu:" + os.environ["PATH"])
subprocess.run(["portguard", "apply"], capture_output=True, check=True, env=env)
print(total, sum(float(x) for x in open("/run/pg-cpu/log").read().split()))
"""


# The CLI as the package runs it in the booted guest (/usr/bin/portguard under /usr/bin/python3),
# each command's CPU (children's rusage) paired per round with `python3 -c pass`, in a fresh
# random order per round. A fresh apply follows a remove and finds nothing in /run, as at boot:
# once without a plan kept in /var/lib/portguard (the first boot after an edit), once with the
# one the last boot's first apply kept; every other command finds the guard, and the compiled
# plan and guard record the round's first apply kept (an unchanged re-apply is the quick one).
CLI_CPU = """
import fnmatch, glob, json, os, random, resource, subprocess, sys
def cpu(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
commands = {
    "python3 -c pass": ["/usr/bin/python3", "-c", "pass"],
    "fresh apply, no plan kept": ["portguard", "apply"],
    "fresh apply, the last boot's plan": ["portguard", "apply"],
    "unchanged re-apply": ["portguard", "apply"],
    "status": ["portguard", "status"],
    "check 631": ["portguard", "check", "631"],
}
rounds = []
for _ in range(int(sys.argv[1])):
    subprocess.run(["portguard", "apply"], capture_output=True, check=True)
    order = list(commands)
    random.shuffle(order)
    spent = {}
    for label in order:
        if label.startswith("fresh apply"):  # as at boot: no guard, nothing in /run
            subprocess.run(["portguard", "remove"], capture_output=True, check=True)
            kept = [] if label.endswith("no plan kept") else ["/var/lib/portguard/plan-*"]
            if kept and not glob.glob(kept[0]):  # the plan a boot's first apply keeps
                subprocess.run(["portguard", "apply"], capture_output=True, check=True)
                subprocess.run(["portguard", "remove"], capture_output=True, check=True)
            for record in glob.glob("/run/portguard/*") + glob.glob("/var/lib/portguard/*"):
                if not any(fnmatch.fnmatch(record, k) for k in kept):
                    os.unlink(record)
        spent[label] = cpu(commands[label])
    rounds.append(spent)
print(json.dumps(rounds))
"""


def cli_cpu(box, rounds: int) -> list[dict[str, float]]:
    """Per round: CPU ms of each CLI command and of `python3 -c pass` in the booted guest."""
    out = box.run("python3", "-c", CLI_CPU, str(rounds), check=True, timeout=600).stdout
    return json.loads(out)


def _reapply_cpu(box) -> tuple[float, float]:
    """CPU ms of an unchanged re-apply in the booted guest, and of the systemctl it runs."""
    total, shown = box.run("python3", "-c", REAPPLY_CPU, check=True).stdout.split()
    return float(total), float(shown)


UNIT_FILE_SCAN = (
    "import time\n"
    "from guard.policy import declared, units\n"
    "from guard.policy.ports import Services\n"
    "begin = time.perf_counter()\n"
    "declared.read(units.search_dirs(), Services())\n"
    "print((time.perf_counter() - begin) * 1000)\n"
)


def _unit_file_scan(box) -> float | str:
    """What apply spends reading every unit file for X-PortGuard-Reserve= in the booted
    guest (its own unit directories; the boot path pays the same in portguard.service); or why
    it could not be measured (it calls guard.policy's functions, which may have changed)."""
    scanned = box.run("python3", "-c", UNIT_FILE_SCAN)
    if scanned.returncode != 0:
        last = (scanned.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the unit-file scan of apply (the probe failed: {last})"
    return float(scanned.stdout)


def _subprocesses(box) -> int:
    """Programs an `apply` starts in the booted guest (systemctl and the usual suspects,
    counted through wrappers first on PATH)."""
    return int(box.run("sh", "-c", COUNT_SUBPROCESSES, check=True).stdout.strip() or 0)


KEPT_AT_BOOT = "the boot's apply kept a compiled plan (boots)"
KEPT_BY_REAPPLY = "the re-apply kept a compiled plan (rounds)"
COUNTED = (KEPT_AT_BOOT, KEPT_BY_REAPPLY)  # 1 or 0 per boot or round: shown as a count


def _row(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(median(values))} ({spread(values, fmt)})" if values else "–"


def _cell(label: str, values: list[float]) -> str:
    if label in COUNTED and values:
        return f"{sum(values):.0f} of {len(values)}"
    return _row(values, "{:.1f}" if label.endswith("(%)") else "{:.0f}")


Boots = dict[str, list[dict[str, float]]]  # variant, per round: figure -> value
GUARDED, MASKED_RUN, BASELINE = "guarded", "masked", "baseline"
# Another package to boot beside this tree's, guarded too, in the same rounds (a "before"
# paired with the "after" round by round): bench/run boot with PORTGUARD_BENCH_BASELINE_DEB=FILE.
BASELINE_ENV = "PORTGUARD_BENCH_BASELINE_DEB"
COLUMNS = {
    GUARDED: "portguard.service enabled",
    BASELINE: "enabled, the baseline .deb",
    MASKED_RUN: "masked",
}


def _boot_table(title: str, results: Boots) -> str:
    variants = [v for v in COLUMNS if v in results]
    labels = list(results[GUARDED][0])
    labels += [label for r in results[GUARDED] for label in r if label not in labels]
    labels += [label for v in variants for r in results[v] for label in r if label not in labels]
    rows = []
    for label in labels:
        cells = [_cell(label, [r[label] for r in results[v] if label in r]) for v in variants]
        rows.append([label, *cells, "–"])
    pairs = [(GUARDED, MASKED_RUN)]
    if BASELINE in results:
        pairs += [(BASELINE, MASKED_RUN), (GUARDED, BASELINE)]
    per_round = []
    for label in PAIRED:
        name = label.split(" (")[0]
        for minuend, subtrahend in pairs:
            paired = [
                a[label] - b[label]
                for a, b in zip(results[minuend], results[subtrahend], strict=True)
            ]
            which = f"{_short(minuend)} − {_short(subtrahend)}"
            difference = _row(paired, "{:+.0f}")
            rows.append(
                [f"{name}: {which}, paired per round (ms)", *("–" for _ in variants), difference]
            )
            per_round.append(f"{name}, {which}: {', '.join(f'{d:+.0f}' for d in paired)}")
    return "\n".join(
        [
            table(
                title,
                ["figure", *(COLUMNS[v] for v in variants), "paired difference"],
                rows,
            ),
            "",
            f"Paired differences per round, ms: {'; '.join(per_round)}.",
        ]
    )


def _short(variant: str) -> str:
    return {GUARDED: "guarded", BASELINE: "baseline", MASKED_RUN: "masked"}[variant]


def boot(w, s) -> str:
    """N rounds, guarded and masked (and guarded by the baseline .deb of
    $PORTGUARD_BENCH_BASELINE_DEB, when set) in a fresh random order per round, in the guest
    with real services: each guest boots once after the .deb's installation and twice more (a
    reboot of an installed system); delays and CPU paired per round."""
    import os
    from pathlib import Path

    from tests.systemd import conftest
    from tests.systemd.machine import Symlink

    rounds = ROUNDS[s.rounds <= 3]
    baseline = os.environ.get(BASELINE_ENV)
    debs = {GUARDED: None, MASKED_RUN: None}
    if baseline:
        debs[BASELINE] = Path(baseline).resolve()
    first: Boots = {v: [] for v in debs}
    second: Boots = {v: [] for v in debs}
    again: Boots = {v: [] for v in debs}
    failed: dict[str, set[str]] = {v: set() for v in debs}
    notes = []
    try:
        for _ in range(rounds):
            order = list(debs)
            random.shuffle(order)
            for variant in order:
                guarded = variant != MASKED_RUN
                masked = {} if guarded else {MASKED: Symlink("/dev/null")}
                # the built .deb installed before boot, as an admin would
                with conftest.booted(services=True, extra=masked, deb=debs[variant]) as box:
                    figures = _figures(box)
                    if guarded:
                        figures[KEPT_AT_BOOT] = _plan_kept(box)
                    first[variant].append(figures)
                    failed[variant].add(_failed_units(box) or "none")
                    box.reboot()
                    figures = _figures(box)
                    if guarded:
                        figures[KEPT_AT_BOOT] = _plan_kept(box)
                    second[variant].append(figures)
                    failed[variant].add(_failed_units(box) or "none")
                    box.reboot()  # the boot before kept its plan for this one
                    figures = _figures(box)
                    failed[variant].add(_failed_units(box) or "none")
                    if guarded:
                        figures[KEPT_AT_BOOT] = _plan_kept(box)
                        figures["subprocesses per apply (systemd running)"] = _subprocesses(box)
                        scan = _unit_file_scan(box)
                        if isinstance(scan, float):
                            figures["of apply: unit files read for X-PortGuard-Reserve= (ms)"] = (
                                scan
                            )
                        elif scan not in notes:
                            notes.append(scan)
                        total, shown = _reapply_cpu(box)
                        figures["unchanged re-apply in the booted guest, CPU (ms)"] = total
                        figures["of it: the systemctl it runs (ms)"] = shown
                    again[variant].append(figures)
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        raise Unavailable(f"boot benchmark: {exc}") from None
    setting = (
        f"systemd-nspawn, Debian bookworm with real services, the built .deb; {rounds} rounds, "
        "guarded and masked in a random order per round (median, spread)"
    )
    if baseline:
        setting += f"; baseline: {Path(baseline).name}, guarded, in the same rounds"
    lines = [
        _boot_table(
            f"Boot, the third of the installed system (the boot before kept its plan in "
            f"/var/lib/portguard): {setting}",
            again,
        ),
        "",
        _boot_table(f"Boot, the second (a reboot after the first): {setting}", second),
        "",
        _boot_table(f"Boot, the first after the .deb's installation: {setting}", first),
        "",
        "Userspace CPU at boot: the guest's root cgroup (its -.slice: PID 1 and every unit, "
        "kernel work on their behalf included; not systemd-nspawn, not the .deb's installation "
        "before boot), read from the host once the boot had finished. portguard.service "
        '"ran": from its start to active (Type=notify: to READY=1, not to apply\'s exit).',
    ]
    for variant in debs:
        lines.append(
            f"Failed units ({_short(variant)} boots): {' | '.join(sorted(failed[variant]))}."
        )
    lines += [f"Not measured: {note}" for note in notes]
    return "\n".join(lines)


CLI_ROUNDS = {True: 5, False: 15}  # quick, full
# The rows of the table, in this order (each round runs them in a random one).
CLI_COMMANDS = (
    "python3 -c pass",
    "fresh apply, no plan kept",
    "fresh apply, the last boot's plan",
    "unchanged re-apply",
    "status",
    "check 631",
)


def cli(w, s) -> str:
    """The CLI's CPU in a booted guest with real services (cups, dovecot, rsync, rpcbind,
    rpc.statd; the tree of rootfs.SERVICE_PACKAGES) and the built .deb (PORTGUARD_DEB, else
    built from this tree), paired per round with `python3 -c pass`."""
    from tests.systemd import conftest

    rounds = CLI_ROUNDS[s.rounds <= 3]
    try:
        with conftest.booted(services=True) as box:
            version = box.run("dpkg-query", "-W", "-f=${Version}", "portguard").stdout
            active = box.run("systemctl", "is-active", "cups", "dovecot", "rpcbind").stdout
            per_round = cli_cpu(box, rounds)
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        raise Unavailable(f"cli benchmark: {exc}") from None
    floor = "python3 -c pass"
    rows = []
    for label in CLI_COMMANDS:
        spent = [r[label] for r in per_round]
        ratios = [r[label] / r[floor] for r in per_round]
        rows.append(
            [
                label,
                f"{median(spent):.0f} ({spread(spent)})",
                "1×" if label == floor else f"{median(ratios):.1f}× ({spread(ratios, '{:.1f}')})",
            ]
        )
    services = " ".join(active.split())
    return table(
        f"CLI CPU in the booted guest: portguard {version} as installed, services {services}; "
        f"{rounds} rounds, each command paired with `python3 -c pass` (median, spread)",
        ["command", "CPU ms", "ratio to python3 -c pass"],
        rows,
    )


RELOAD_ROUNDS = {True: 3, False: 15}  # quick, full: each round adds, removes, changes nothing
# The journal's messages for a reload job of a unit (systemd's catalog: unit reloading,
# unit reloaded).
RELOADING = "d34d037fff1847e6ae669a370e694725"
RELOADED = "7b05ebc668384222baa8881179cfda54"


def _reload_journal(box, since_usec: int) -> dict[str, int]:
    """When portguard.service's reload began and ended (CLOCK_MONOTONIC µs, the journal's
    receive time) after since_usec: the re-apply that portguard-reload.service asked for."""
    fields = "--output-fields=MESSAGE_ID,__MONOTONIC_TIMESTAMP"
    query = ("journalctl", "-b", "-o", "json", "--no-pager", "-u", "portguard.service", fields)
    out = box.run(*query).stdout
    seen: dict[str, int] = {}
    for line in out.splitlines():
        entry = json.loads(line)
        at = int(entry["__MONOTONIC_TIMESTAMP"])
        for label, message_id in (("began", RELOADING), ("ended", RELOADED)):
            if entry.get("MESSAGE_ID") == message_id and at > since_usec and label not in seen:
                seen[label] = at
    return seen


# An input changed less than a second before apply reads it is never trusted for the compiled
# plan (README, Commands): the drop-in is written this long before daemon-reload, so that only
# what daemon-reload itself changes (it writes the generators' output directories anew, which
# are on the unit search path) decides whether a re-apply can take its plan from the record.
SETTLE = 1.2  # seconds


def _daemon_reload(box, port: int, change: str) -> dict[str, float]:
    """One daemon-reload after pg-decl.service's drop-in gained `port` ("add"), lost it
    ("remove") or stayed as it was ("unchanged"): ms from just before `systemctl
    daemon-reload` to its return, to the re-apply's start and end in the journal, and (add,
    remove) to the moment a stranger's bind to `port` changed answer; the re-apply's CPU and
    PID 1's meanwhile."""
    from tests.systemd.guest_files import DECLARED_PORT, DECLARING_DROPIN, declaration
    from tests.systemd.probes import EADDRINUSE, wait_for

    watched = box.results / f"watch-{port}.json"
    watched.unlink(missing_ok=True)
    if change != "unchanged":  # the stranger binds once, then tells systemd it is ready
        box.systemctl("start", f"pg-watch@{port}.service")
        ports = (DECLARED_PORT, port) if change == "add" else (DECLARED_PORT,)
        box.write(DECLARING_DROPIN, declaration(*ports))
        time.sleep(SETTLE)
    pid1_before = _cgroup_cpu_ms(box, "init.scope")
    start = time.monotonic()
    box.systemctl("daemon-reload")
    returned = time.monotonic()
    since = int(start * 1e6)
    time.sleep(0.5)  # a re-apply takes about that; fewer questions to the journal meanwhile

    def reloaded() -> dict[str, int] | None:
        journal = _reload_journal(box, since)
        return journal if "ended" in journal else None

    seen = wait_for(reloaded, timeout=60, interval=0.25)
    if not seen:
        raise RuntimeError(f"daemon-reload ({change}): portguard.service was not reloaded")
    pid1 = _cgroup_cpu_ms(box, "init.scope") - pid1_before
    # The unit's cgroup goes when its process has exited and comes anew for the next one;
    # systemd then reports the last run's CPU: the re-apply's own.
    reapply = _show(box, "portguard.service", "CPUUsageNSec")["CPUUsageNSec"] / 1e6
    figures = {
        "daemon-reload returned": (returned - start) * 1000,
        "re-apply began (portguard.service reloading)": seen["began"] / 1000 - start * 1000,
        "re-apply ended (reloaded)": seen["ended"] / 1000 - start * 1000,
        "re-apply CPU (portguard.service; ms)": reapply,
        "PID 1 CPU meanwhile (init.scope: the reload, generators; ms)": pid1,
        KEPT_BY_REAPPLY: _plan_kept(box),
    }
    if change != "unchanged":
        if not wait_for(watched.exists, timeout=60, interval=0.05):
            raise RuntimeError(f"daemon-reload ({change}): the stranger wrote nothing")
        watch = json.loads(watched.read_text())
        expected = (0, EADDRINUSE) if change == "add" else (EADDRINUSE, 0)
        if (watch["before"], watch["after"]) != expected or watch["changed_at"] is None:
            raise RuntimeError(f"daemon-reload ({change}): the stranger saw {watch}")
        figures["stranger's bind refused / allowed again"] = (watch["changed_at"] - start) * 1000
    return figures


def reload(w, s) -> str:
    """daemon-reload -> the port a unit file declares guarded (and released), in a guest
    booted with real services: N rounds of add, remove and unchanged."""
    from tests.systemd import conftest
    from tests.systemd.guest_files import ADDED_PORT, DECLARING_UNITS

    rounds = RELOAD_ROUNDS[s.rounds <= 3]
    changes = ("add", "remove", "unchanged")
    per_change: dict[str, list[dict[str, float]]] = {change: [] for change in changes}
    try:
        with conftest.booted(services=True, extra=DECLARING_UNITS) as box:
            version = box.run("dpkg-query", "-W", "-f=${Version}", "portguard").stdout
            for _ in range(rounds):
                for change in changes:
                    per_change[change].append(_daemon_reload(box, ADDED_PORT, change))
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        raise Unavailable(f"reload benchmark: {exc}") from None
    labels = list(per_change["add"][0])
    labels.insert(1 + labels.index("re-apply began (portguard.service reloading)"), labels.pop())
    rows = [
        [label, *(_cell(label, [r[label] for r in per_change[c] if label in r]) for c in changes)]
        for label in labels
    ]
    return "\n".join(
        [
            table(
                f"daemon-reload in the booted guest (portguard {version}, real services): "
                f"pg-decl.service's drop-in gains or loses X-PortGuard-Reserve={ADDED_PORT}, "
                f"ms after `systemctl daemon-reload` was called; {rounds} rounds (median, spread)",
                ["figure", f"{ADDED_PORT} added", f"{ADDED_PORT} removed", "nothing changed"],
                rows,
            ),
            "",
            "From CLOCK_MONOTONIC just before `systemctl daemon-reload` (through nsenter) to: its "
            "return; the journal's receipt of portguard.service's reloading and reloaded "
            "messages (portguard-generator -> portguard-reload.path -> portguard-reload.service "
            "-> systemctl try-reload-or-restart); the first changed answer of a stranger "
            f"(pg-watch@{ADDED_PORT}.service, outside the owner's cgroup) binding "
            f"0.0.0.0:{ADDED_PORT}/tcp every millisecond. Re-apply CPU: portguard.service's "
            "CPUUsageNSec after the reload (its cgroup is made anew for every run).",
        ]
    )
