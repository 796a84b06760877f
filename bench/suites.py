"""The four benchmarks. Each returns Markdown tables of medians measured side by side.

Bind loops are interleaved: every round runs every case once, in a fresh random order, and a
ratio is taken against the same round's no-guard run, so a neighbour's load affects both
sides of a ratio alike. The tables give medians over rounds and the spread (min–max).
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import random
import re
import resource
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    HERE,
    Run,
    World,
    bpf_stats,
    drop_caches,
    maps_memlock,
    median,
    portguard,
    processes_left_by,
    prog_id_of_fd,
    prog_stats,
    spread,
    table,
    timed,
)
from guard.kernel import layout, objects
from guard.kernel import libbpf as kernel
from tests.kernel.sandbox import BIND_LINKS, REPO, in_netns

PORT = 30000  # the reserved probe port
FREE = 29999  # never reserved
SCALES = {
    1: [f"{PORT}/tcp"],
    1000: [f"{PORT}-{PORT + 999}/tcp"],
    65535: [f"1-{FREE - 1}/tcp", f"{PORT}-65535/tcp", f"{FREE}/udp"],  # every pair but FREE/tcp
}


@dataclass(frozen=True)
class Case:
    label: str
    cgroup: str  # relative to the sandbox top
    port: int
    expect_errno: int = 0
    prog: str | None = None  # which program's kernel run time to report: "guard" or "scan"


@dataclass
class Settings:
    rounds: int
    c_iterations: int
    py_iterations: int
    lifecycle_rounds: int
    cold_rounds: int


def settings(quick: bool) -> Settings:
    if quick:
        return Settings(
            rounds=3, c_iterations=20000, py_iterations=5000, lifecycle_rounds=2, cold_rounds=1
        )
    return Settings(
        rounds=9, c_iterations=100000, py_iterations=30000, lifecycle_rounds=5, cold_rounds=3
    )


# ---- bind loops -------------------------------------------------------------------------------


def _bind_once(w: World, case: Case, driver: str, iterations: int) -> tuple[float, float]:
    """(wall ns, CPU ns) per socket()+bind()+close() of one driver run."""
    procs = w.procs(case.cgroup)
    if driver == "C":
        cmd = [str(w.bindloop_c), procs, str(case.port), str(iterations)]
    else:
        cmd = [sys.executable, str(HERE / "bindloop.py"), procs, str(case.port), str(iterations)]
    out = subprocess.run(
        [*in_netns(w.box.netns), *cmd], capture_output=True, text=True, check=True
    ).stdout
    wall, cpu, ok, last_errno = out.split()
    if case.expect_errno:
        assert int(ok) == 0 and int(last_errno) == case.expect_errno, (case, out)
    else:
        assert int(ok) == iterations, (case, out)
    return float(wall), float(cpu)


def interleaved(
    w: World, cases: list[Case], driver: str, iterations: int, rounds: int, progs: dict[str, int]
) -> dict[str, dict]:
    """Per case and round: wall and CPU ns per bind, CPU ratio to the round's first case (no
    guard). Then, in separate rounds with kernel statistics on (they add their own clock
    reads to every run, so they stay off while ratios are measured): kernel ns per run."""
    results = {c.label: {"wall": [], "cpu": [], "ratio": [], "kernel": []} for c in cases}
    for _ in range(rounds):
        order = cases[:]
        random.shuffle(order)
        this_round = {case.label: _bind_once(w, case, driver, iterations) for case in order}
        base_cpu = this_round[cases[0].label][1]
        for case in cases:
            wall, cpu = this_round[case.label]
            results[case.label]["wall"].append(wall)
            results[case.label]["cpu"].append(cpu)
            results[case.label]["ratio"].append(cpu / base_cpu)
    with bpf_stats(w):
        for _ in range(max(3, rounds // 3)):
            for case in cases:
                if case.prog:
                    before = prog_stats(progs[case.prog])
                    _bind_once(w, case, driver, iterations // 4)
                    run_ns, runs = (
                        a - b for a, b in zip(prog_stats(progs[case.prog]), before, strict=True)
                    )
                    if runs:
                        results[case.label]["kernel"].append(run_ns / runs)
    return results


def _rows(cases: list[Case], results: dict, prefix: str = "") -> list[list[str]]:
    base_cpu = median(results[cases[0].label]["cpu"])
    rows = []
    for case in cases:
        r = results[case.label]
        if r["kernel"]:
            kernel_ns = median(r["kernel"])
            kernel_cells = [f"{kernel_ns:.0f}", f"{1 + kernel_ns / base_cpu:.3f}×"]
        else:
            kernel_cells = ["–", "–"]
        rows.append(
            [
                prefix + case.label,
                f"{median(r['wall']):.0f}",
                f"{median(r['cpu']):.0f}",
                f"{median(r['ratio']):.3f}× ({spread(r['ratio'], '{:.2f}')})",
                *kernel_cells,
            ]
        )
    return rows


HEADER = [
    "case",
    "wall ns/bind",
    "CPU ns/bind",
    "CPU ratio to no guard (spread)",
    "guard's kernel ns/run",
    "no guard + kernel ns, as ratio",
]


def bind_cost(w: World, s: Settings) -> str:
    """Benchmark 1: no guard vs guard for a free port, the owner, and a refused stranger."""
    w.apply_config(SCALES[1])
    progs = {"guard": w.prog_id()}
    cases = [
        Case("no guard (port 30000)", "plain/x", PORT),
        Case("guard, port not reserved", "guarded/stranger", FREE, prog="guard"),
        Case("guard, owner binds its port", "guarded/owner", PORT, prog="guard"),
        Case(
            "guard, stranger refused (EADDRINUSE)",
            "guarded/stranger",
            PORT,
            errno.EADDRINUSE,
            "guard",
        ),
    ]
    out = []
    for driver, iterations in (("C", s.c_iterations), ("Python", s.py_iterations)):
        results = interleaved(w, cases, driver, iterations, s.rounds, progs)
        out.append(
            table(
                f"Bind cost, {driver} driver: socket()+bind()+close(), IPv4 TCP, "
                f"{iterations:,} binds × {s.rounds} rounds",
                HEADER,
                _rows(cases, results),
            )
        )
    return "\n".join(out)


# ---- scale and the linear scan ----------------------------------------------------------------


@dataclass
class ScanGuard:
    """The comparison program of linear_scan.bpf.c, attached to the sandbox's `scan` cgroup."""

    handle: int
    rules: kernel.Map
    count: kernel.Map
    prog_id: int


class Rule(C.Structure):
    _fields_ = [
        ("family", C.c_uint32),
        ("protocol", C.c_uint32),
        ("port_first", C.c_uint16),
        ("port_count", C.c_uint16),
        ("pad", C.c_uint32),
    ]


def load_scan(w: World) -> ScanGuard:
    clang = objects.find_clang()
    if clang is None:
        raise RuntimeError("clang is needed to build bench/linear_scan.bpf.c")
    obj = w.box.work / "linear_scan.o"
    import sysconfig

    include = [f"-I/usr/include/{sysconfig.get_config_var('MULTIARCH')}"]
    subprocess.run(
        [
            clang,
            "-O2",
            "-g",
            "-target",
            "bpf",
            *include,
            "-c",
            str(HERE / "linear_scan.bpf.c"),
            "-o",
            str(obj),
        ],
        check=True,
    )
    lib = kernel.lib()
    handle = lib.bpf_object__open_file(str(obj).encode(), None)
    if not handle or lib.bpf_object__load(handle) < 0:
        raise RuntimeError(f"loading {obj} failed:\n{kernel.libbpf_log_tail()}")

    def fd_of(name: bytes) -> int:
        return lib.bpf_map__fd(lib.bpf_object__find_map_by_name(handle, name))

    scan_dir = w.box.cgroup_root / w.box.top.lstrip("/") / "scan"
    prog_ids = []
    for name, attach in (
        ("scan_bind4", kernel.BPF_CGROUP_INET4_BIND),
        ("scan_bind6", kernel.BPF_CGROUP_INET6_BIND),
    ):
        prog_fd = lib.bpf_program__fd(lib.bpf_object__find_program_by_name(handle, name.encode()))
        w.links.append(kernel.attach_cgroup(prog_fd, scan_dir, attach))  # dies with this process
        prog_ids.append(prog_id_of_fd(prog_fd))
    return ScanGuard(
        handle,
        kernel.Map(fd_of(b"rules"), layout.U32, Rule),
        kernel.Map(fd_of(b"rule_count"), layout.U32, layout.U32),
        prog_ids[0],
    )


def set_rules(scan: ScanGuard, n: int) -> None:
    """n deny rules, none of which matches the probe port: every bind scans all n."""
    for i in range(n):
        scan.rules.update(i, Rule(2, 6, 1000 + i, 1, 0))
    scan.count.update(0, n)


def scale(w: World, s: Settings) -> str:
    """Benchmark 2: 1, 1,000, 65,535 reservations; 1 vs 64 owners; beside a linear rule scan."""
    scan = load_scan(w)
    rows = []
    base = Case("no guard", "plain/x", PORT)
    for n, ports in SCALES.items():
        w.apply_config(ports)
        progs = {"guard": w.prog_id()}
        cases = [
            base,
            Case("port not reserved", "guarded/stranger", FREE, prog="guard"),
            Case("owner binds its port", "guarded/owner", PORT, prog="guard"),
            Case("stranger refused", "guarded/stranger", PORT, errno.EADDRINUSE, "guard"),
        ]
        results = interleaved(w, cases, "C", s.c_iterations, s.rounds, progs)
        rows += _rows(cases, results, f"portguard, {n:,} reservation{'s' if n > 1 else ''}: ")[1:]
    owners = tuple(f"guarded/o{i:02d}" for i in range(64))
    w.apply_config(SCALES[1], owners)
    progs = {"guard": w.prog_id()}
    cases = [
        base,
        Case("owner (the 64th checked) binds", "guarded/o63", PORT, prog="guard"),
        Case("stranger refused (64 checked)", "guarded/stranger", PORT, errno.EADDRINUSE, "guard"),
    ]
    results = interleaved(w, cases, "C", s.c_iterations, s.rounds, progs)
    rows += _rows(cases, results, "portguard, 64 owners on the port: ")[1:]
    # 0 rules: a program that does next to nothing (one array lookup), the floor of what
    # bpf_stats reports for any program on this machine (its own clock reads included)
    for n in (0, 1, 128):
        set_rules(scan, n)
        progs = {"scan": scan.prog_id}
        cases = [base, Case("bind allowed after a full scan", "scan/x", PORT, prog="scan")]
        results = interleaved(w, cases, "C", s.c_iterations, s.rounds, progs)
        rows += _rows(cases, results, f"linear scan, {n} rules: ")[1:]
    kernel.lib().bpf_object__close(scan.handle)
    return table(
        f"Scale, C driver ({s.c_iterations:,} binds × {s.rounds} rounds per case; ratios "
        "against no guard in the same round)",
        HEADER,
        rows,
    )


# ---- apply / re-apply / remove, memory ----------------------------------------------------------


def _lifecycle_once(w: World, cold: bool) -> dict[str, Run]:
    runs = {}
    for step, args in (
        ("apply (onto an empty pin dir)", ["apply"]),
        ("re-apply, unchanged", ["apply"]),
        ("remove", ["remove"]),
    ):
        if cold:
            drop_caches()
        runs[step] = timed(portguard(w, *args), w.env)
    return runs


def lifecycle(w: World, s: Settings) -> str:
    """Benchmark 3: apply / re-apply / remove, warm and cold; kernel memory; processes left."""
    rows, memory_rows = [], []
    for n, ports in SCALES.items():
        w.box.write_config(w.box.owner_block(ports, "guarded/owner"), cgroup=f"{w.box.top}/guarded")
        w.cli("apply")
        memory = maps_memlock(w.box.pin_dir)
        left = processes_left_by(portguard(w, "apply"), w.env)
        memory_rows.append(
            [
                f"{n:,}",
                f"{memory['ports'] / 1024:,.0f} KiB",
                f"{sum(memory.values()) / 1024:,.0f} KiB",
                str(left),
            ]
        )
        w.cli("remove")
        for cold, rounds in ((False, s.lifecycle_rounds), (True, s.cold_rounds)):
            samples: dict[str, list[Run]] = {}
            for _ in range(rounds):
                for step, run in _lifecycle_once(w, cold).items():
                    samples.setdefault(step, []).append(run)
            for step, runs in samples.items():
                wall = [r.wall_ms for r in runs]
                cpu = [r.cpu_ms for r in runs]
                rows.append(
                    [
                        f"{n:,}",
                        step,
                        "cold" if cold else "warm",
                        f"{median(wall):.0f}",
                        spread(wall),
                        f"{median(cpu):.0f}",
                        str(len(runs)),
                    ]
                )
    out = [
        table(
            "apply / re-apply / remove (`python -m guard`, process start to exit, in the "
            "sandbox's network namespace)",
            [
                "reserved pairs",
                "step",
                "cache",
                "wall ms (median)",
                "spread",
                "CPU ms (median)",
                "runs",
            ],
            rows,
        )
    ]
    out.append(
        table(
            "Kernel memory of the maps (bpftool bytes_memlock) and processes left after apply",
            ["reserved pairs", "ports map", "all maps", "processes left running"],
            memory_rows,
        )
    )
    return "\n".join(out)


SYSTEM_PYTHON = Path("/usr/bin/python3")


def _interpreters() -> dict[str, tuple[list[str], dict[str, str]]]:
    """The interpreter running the benchmark, and (when this is a virtual environment) the
    system one with the same modules on PYTHONPATH: what a distribution package runs, without
    the venv's site hooks (.pth files, the editable-install finder)."""
    found = {"this interpreter": ([sys.executable], {})}
    if SYSTEM_PYTHON.exists() and Path(sys.prefix) != Path(sys.base_prefix):
        path = os.pathsep.join([str(HERE.parent), sysconfig.get_paths()["purelib"]])
        found[f"{SYSTEM_PYTHON}, modules on PYTHONPATH"] = (
            [str(SYSTEM_PYTHON)],
            {"PYTHONPATH": path},
        )
    return found


def startup(w: World, s: Settings) -> str:
    """The CLI's fixed cost: interpreter floor, apply, re-apply, status, check, --help, remove
    with one reservation; import time of the CLI."""
    w.box.write_config(w.box.owner_block(SCALES[1], "guarded/owner"), cgroup=f"{w.box.top}/guarded")
    rows = []
    for name, (python, env) in _interpreters().items():
        env = {**w.env, **env}
        config = ["--config", str(w.box.config_path)]

        def run(*args: str, python: list[str] = python) -> list[str]:
            return [*in_netns(w.box.netns), *python, *args]

        commands = {
            "python -c pass (interpreter floor)": run("-c", "pass"),
            "apply (onto an empty pin dir)": run("-m", "guard", *config, "apply"),
            "apply, unchanged": run("-m", "guard", *config, "apply"),
            "status": run("-m", "guard", *config, "status"),
            "check 30000": run("-m", "guard", *config, "check", str(PORT)),
            "--help": run("-m", "guard", "--help"),
            "remove": run("-m", "guard", *config, "remove"),
        }
        samples: dict[str, list[Run]] = {label: [] for label in commands}
        imports: list[float] = []
        for _ in range(s.lifecycle_rounds * 2):
            for label, cmd in commands.items():  # in this order: apply finds an empty pin dir
                samples[label].append(timed(cmd, env))
            proc = subprocess.run(
                [*python, "-X", "importtime", "-m", "guard", "--help"],
                capture_output=True,
                text=True,
                cwd=REPO,
                env={**os.environ, **env},
                check=False,
            )
            match = re.search(r"\|\s*(\d+) \| guard\.cli$", proc.stderr, re.MULTILINE)
            if match:
                imports.append(int(match.group(1)) / 1000)
        rows += [
            [
                name,
                label,
                f"{median([r.wall_ms for r in runs]):.0f}",
                spread([r.wall_ms for r in runs]),
                f"{median([r.cpu_ms for r in runs]):.0f}",
            ]
            for label, runs in samples.items()
        ]
        if imports:
            rows.append(
                [
                    name,
                    "import guard.cli (-X importtime, cumulative)",
                    f"{median(imports):.0f}",
                    spread(imports),
                    "–",
                ]
            )
    return table(
        "CLI, one reservation, warm page cache (process start to exit)",
        ["interpreter", "command", "wall ms (median)", "spread", "CPU ms (median)"],
        rows,
    )


# ---- portreserve's model ----------------------------------------------------------------------

HOLDER = r"""
import os, resource, socket, sys
first, last = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for port in range(first, last + 1):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        s.bind(("0.0.0.0", port))
        held.append(s)
print(len(os.listdir("/proc/self/fd")), flush=True)
sys.stdin.read()
"""


def _hold(w: World, first: int, last: int) -> tuple[list[subprocess.Popen], int, int]:
    """Holder processes binding tcp+udp on every port first..last, as many as RLIMIT_NOFILE
    requires (portreserve is one process; a lower fd limit here needs several).
    Returns (processes, their fds, their RSS in KiB)."""
    per_process = (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 64) // 2
    holders, fds, rss = [], 0, 0
    for start in range(first, last + 1, per_process):
        end = min(last, start + per_process - 1)
        holder = subprocess.Popen(
            [*in_netns(w.box.netns), sys.executable, "-c", HOLDER, str(start), str(end)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(holder)
        fds += int(holder.stdout.readline())
        status = Path(f"/proc/{holder.pid}/status").read_text()
        rss += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return holders, fds, rss


def _meminfo() -> dict[str, int]:
    values = {}
    for entry in Path("/proc/meminfo").read_text().splitlines():
        name, rest = entry.split(":", 1)
        values[name] = int(rest.split()[0])
    return values


def portreserve_model(w: World, s: Settings) -> str:
    """Benchmark 4: one bound socket per reserved port and protocol, held by a process."""
    rows = []
    for n in (1, 1000, 65535):
        first = 1 if n == 65535 else PORT
        before = _meminfo()
        holders, fds, rss = _hold(w, first, first + n - 1)
        during = _meminfo()
        for holder in holders:
            holder.stdin.close()
            holder.wait()
        slab = during["Slab"] - before["Slab"]
        pairs = 2 * n
        ports = [f"{first}-{first + n - 1}"]
        w.box.write_config(w.box.owner_block(ports, "guarded/owner"), cgroup=f"{w.box.top}/guarded")
        w.cli("apply")
        memory = maps_memlock(w.box.pin_dir)
        w.cli("remove")
        rows.append(
            [
                f"{n:,} ports × tcp+udp = {pairs:,}",
                f"{fds:,} in {len(holders)} process(es)",
                f"{rss / 1024:,.1f} MiB",
                f"{slab / 1024:,.1f} MiB",
                f"{memory['ports'] / 1024:,.0f} KiB",
                f"{sum(memory.values()) / 1024:,.0f} KiB",
            ]
        )
    return table(
        "portreserve's model (a process holding one bound socket per port and protocol) "
        "vs portguard's maps",
        [
            "reserved pairs",
            "holder fds",
            "holder RSS",
            "kernel slab growth (system-wide, noisy)",
            "portguard ports map",
            "portguard all maps",
        ],
        rows,
    )


# ---- issue 14's table: costs near the limit ---------------------------------------------------


def _phases(w: World, rounds: int) -> dict[str, list[float]]:
    """bench/apply_phases.py onto an empty pin dir, `rounds` times: CPU ms per phase."""
    import json

    found: dict[str, list[float]] = {}
    for _ in range(rounds):
        w.cli("remove")
        cmd = [
            *in_netns(w.box.netns),
            sys.executable,
            "-m",
            "bench.apply_phases",
            "--config",
            str(w.box.config_path),
            "apply",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **w.env}, check=True
        )
        line = next(x for x in proc.stderr.splitlines() if x.startswith("PHASES "))
        for phase, value in json.loads(line[len("PHASES ") :]).items():
            found.setdefault(phase, []).append(value)
    return found


VERIFIED_INSNS_OFFSET = 216  # offsetof(struct bpf_prog_info, verified_insns), Linux 5.16+


def _verified_insns(w: World) -> dict[str, int]:
    """Instructions the verifier processed for each bind program (bpf_prog_info)."""
    links = w.box.status()["links"]
    found = {}
    for name in BIND_LINKS:
        fd = kernel.lib().bpf_prog_get_fd_by_id(links[name]["prog_id"])
        if fd < 0:
            continue
        try:
            info = (C.c_uint8 * 232)()
            length = C.c_uint32(232)
            kernel.lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(length))
            if length.value >= VERIFIED_INSNS_OFFSET + 4:
                found[name] = int.from_bytes(
                    bytes(info[VERIFIED_INSNS_OFFSET : VERIFIED_INSNS_OFFSET + 4]), "little"
                )
        finally:
            os.close(fd)
    return found


def cost(w: World, s: Settings) -> str:
    """Issue 14's table: CLI commands as paired CPU ratios to `python3 -c pass` (per round, in a
    fresh random order), apply per phase, verifier instructions, map memory. The ratios are
    given for each interpreter of _interpreters(): the system one is what the package runs (a
    virtual environment's floor includes its site hooks, which flatters every ratio)."""
    w.box.write_config(w.box.owner_block(SCALES[1], "guarded/owner"), cgroup=f"{w.box.top}/guarded")
    config = ["--config", str(w.box.config_path)]
    rounds = s.lifecycle_rounds * 2
    rows = []
    for name, (python, extra_env) in _interpreters().items():
        env = {**w.env, **extra_env}

        def run(*args: str, python: list[str] = python) -> list[str]:
            return [*in_netns(w.box.netns), *python, *args]

        floor = run("-c", "pass")
        commands = {
            "fresh apply (empty pin dir)": run("-m", "guard", *config, "apply"),
            "unchanged re-apply": run("-m", "guard", *config, "apply"),
            "status (no squatter)": run("-m", "guard", *config, "status"),
            f"check {PORT}": run("-m", "guard", *config, "check", str(PORT)),
        }
        ratios: dict[str, list[float]] = {label: [] for label in commands}
        cpu: dict[str, list[float]] = {label: [] for label in [*commands, "python3 -c pass"]}
        for _ in range(rounds):
            order = ["floor", *commands]
            random.shuffle(order)
            w.cli("apply")  # every command but the fresh apply finds the guard in place
            round_cpu: dict[str, float] = {}
            for label in order:
                if label == "floor":
                    round_cpu["python3 -c pass"] = timed(floor, env).cpu_ms
                    continue
                if label.startswith("fresh"):
                    w.cli("remove")
                round_cpu[label] = timed(commands[label], env).cpu_ms
            for label, value in round_cpu.items():
                cpu[label].append(value)
            for label in commands:
                ratios[label].append(round_cpu[label] / round_cpu["python3 -c pass"])
        rows += [
            [
                name,
                label,
                f"{median(cpu[label]):.0f}",
                "1×" if label not in ratios else f"{median(ratios[label]):.1f}×",
                "–" if label not in ratios else spread(ratios[label], "{:.1f}"),
            ]
            for label in ["python3 -c pass", *commands]
        ]
    out = [
        table(
            f"CLI CPU time (user+sys), one reservation, paired per round with `python3 -c pass` "
            f"({rounds} rounds)",
            ["interpreter", "command", "CPU ms (median)", "ratio to python3 -c pass", "spread"],
            rows,
        )
    ]
    phases = _phases(w, max(3, s.lifecycle_rounds))
    out.append(
        table(
            "Where a fresh apply's CPU time goes (bench/apply_phases.py, after interpreter start)",
            ["phase", "CPU ms (median)", "spread"],
            [
                [phase, f"{median(v):.1f}", spread(v, "{:.1f}")]
                for phase, v in phases.items()
                if phase != "subprocesses"
            ]
            + [["subprocesses started by apply", f"{median(phases['subprocesses']):.0f}", "–"]],
        )
    )
    w.cli("apply")
    insns = _verified_insns(w)
    memory_rows = []
    for pairs in (1, 65535):
        w.box.write_config(
            w.box.owner_block(SCALES[pairs], "guarded/owner"), cgroup=f"{w.box.top}/guarded"
        )
        w.cli("remove")
        w.cli("apply")
        sizes = maps_memlock(w.box.pin_dir)
        memory_rows.append(
            [
                f"{pairs:,}",
                f"{sum(sizes.values()) / 2**20:.2f} MiB",
                ", ".join(
                    f"{k} {v // 1024} KiB"
                    for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:4]
                ),
            ]
        )
    w.box.write_config(w.box.owner_block(SCALES[1], "guarded/owner"), cgroup=f"{w.box.top}/guarded")
    w.cli("remove")
    out.append(
        table(
            "Verifier and kernel memory",
            ["figure", "value", "detail"],
            [
                [
                    "verifier: instructions processed",
                    ", ".join(f"{k} {v:,}" for k, v in insns.items()),
                    "bpftool prog show: verified_insns",
                ]
            ]
            + [
                ["kernel memory of the maps, " + r[0] + " reserved pairs", r[1], r[2]]
                for r in memory_rows
            ],
        )
    )
    return "\n".join(out)
