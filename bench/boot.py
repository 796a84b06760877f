"""Boot benchmark: Debian bookworm booted with systemd-nspawn (real systemd, this kernel),
portguard.service enabled vs masked, the two in a fresh random order per round.

Reuses the systemd tests' machinery (tests/systemd: the cached root file system, the built
.deb installed before boot, the guest's units and configuration). Figures are the guest
systemd's own monotonic timestamps: sysinit.target reached after the manager started,
start-up finished, portguard.service's run time and CPU time. A round's delay is guarded
minus masked of the same round.
"""

from __future__ import annotations

import json
import random

import pytest

from bench.harness import Unavailable, median, spread, table

ROUNDS = {True: 2, False: 4}  # quick, full


def _show(box, unit: str | None, *props: str) -> dict[str, int]:
    args = ["show", *(f"-p{p}" for p in props)] + ([unit] if unit else [])
    shown = {}
    for line in box.systemctl(*args).stdout.splitlines():
        key, _, value = line.partition("=")
        shown[key] = int(value) if value.isdigit() else 0
    return shown


def _figures(box) -> dict[str, float]:
    manager = _show(box, None, "UserspaceTimestampMonotonic", "FinishTimestampMonotonic")
    start = manager["UserspaceTimestampMonotonic"]
    sysinit = _show(box, "sysinit.target", "ActiveEnterTimestampMonotonic")
    guard = _show(
        box,
        "portguard.service",
        "InactiveExitTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
        "CPUUsageNSec",
    )
    figures = {
        "sysinit.target reached (ms after the manager started)": (
            sysinit["ActiveEnterTimestampMonotonic"] - start
        )
        / 1000,
        "start-up finished (ms)": (manager["FinishTimestampMonotonic"] - start) / 1000,
    }
    if guard["ActiveEnterTimestampMonotonic"]:
        figures["portguard.service ran (ms)"] = (
            guard["ActiveEnterTimestampMonotonic"] - guard["InactiveExitTimestampMonotonic"]
        ) / 1000
        if guard.get("CPUUsageNSec"):
            figures["portguard.service CPU (ms)"] = guard["CPUUsageNSec"] / 1e6
    return figures


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
# systemctl above first on PATH, for the CPU of the systemctl it runs.
REAPPLY_CPU = f"""
import os, resource, subprocess
def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * 1000
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


def _unit_file_scan(box) -> float:
    """What apply spends reading every unit file for X-PortGuard-Reserve= in the booted
    guest (its own unit directories; the boot path pays the same in portguard.service)."""
    return float(box.run("python3", "-c", UNIT_FILE_SCAN, check=True).stdout)


def _subprocesses(box) -> int:
    """Programs an `apply` starts in the booted guest (systemctl and the usual suspects,
    counted through wrappers first on PATH)."""
    return int(box.run("sh", "-c", COUNT_SUBPROCESSES, check=True).stdout.strip() or 0)


def boot(w, s) -> str:
    """N boots guarded vs masked; the delay of sysinit.target is paired per round."""
    from tests.systemd import conftest, guest_files
    from tests.systemd.machine import Symlink

    rounds = ROUNDS[s.rounds <= 3]
    real_guest_files = guest_files.guest_files

    def masked_files(*args, **kwargs):
        files = real_guest_files(*args, **kwargs)
        # /etc wins over the package's unit in /usr/lib: the guard never runs at boot
        files["/etc/systemd/system/portguard.service"] = Symlink("/dev/null")
        return files

    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    try:
        for _ in range(rounds):
            order = [True, False]
            random.shuffle(order)
            for guarded in order:
                conftest.guest_files = real_guest_files if guarded else masked_files
                with conftest.booted() as box:  # the built .deb installed, as an admin would
                    figures = _figures(box)
                    if guarded:
                        figures["subprocesses per apply (systemd running)"] = _subprocesses(box)
                        figures["of apply: unit files read for X-PortGuard-Reserve= (ms)"] = (
                            _unit_file_scan(box)
                        )
                        total, shown = _reapply_cpu(box)
                        figures["unchanged re-apply in the booted guest, CPU (ms)"] = total
                        figures["of it: the one systemctl show (ms)"] = shown
                    results[guarded].append(figures)
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        raise Unavailable(f"boot benchmark: {exc}") from None
    finally:
        conftest.guest_files = real_guest_files
    key = "sysinit.target reached (ms after the manager started)"
    delays = [g[key] - m[key] for g, m in zip(results[True], results[False], strict=True)]
    rows = []
    for label in results[True][0]:
        guarded = [r[label] for r in results[True] if label in r]
        masked = [r[label] for r in results[False] if label in r]
        rows.append(
            [
                label,
                f"{median(guarded):.0f} ({spread(guarded)})",
                f"{median(masked):.0f} ({spread(masked)})" if masked else "–",
            ]
        )
    rows.append(
        [
            "delay of sysinit.target, guarded − masked, paired per round (ms)",
            f"{median(delays):+.0f} ({spread(delays, '{:+.0f}')})",
            "–",
        ]
    )
    return table(
        f"Boot: systemd-nspawn, Debian bookworm, {rounds} boots each way (median, spread)",
        ["figure", "portguard.service enabled", "masked"],
        rows,
    )


CLI_ROUNDS = {True: 5, False: 15}  # quick, full


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
    for label in per_round[0]:
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
