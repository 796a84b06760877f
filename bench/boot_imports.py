"""What a boot's apply with the last boot's plan imports, and what it costs, for two trees of
portguard paired per round (issue 22: pathlib and typing off the boot path).

python -m bench.boot_imports [--rounds N] [--held] BEFORE AFTER: BEFORE and AFTER are directories
holding a guard/ package (e.g. `git archive REV | tar -x -C DIR`). Prints, medians with p10-p90
and the median of the per-round differences:
- the import time of the modules a kept-plan boot imports (`/usr/bin/python3 -S -X importtime`,
  the sum of the top-level cumulative times), pathlib's and typing's share, and the CPU of the
  same process without -X importtime;
- as root, a boot's apply in a sandbox of the tests (empty /run, the plan the tree's first
  apply kept in a state directory of its own, no guard pinned), under `/usr/bin/python3 -S`
  as debian/launcher starts it: the CPU of the process (nsenter included, the same for both).
"""

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = "/usr/bin/python3"
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # .pyc, as installed
# the modules a boot's apply with the last boot's plan imports (tests/unit/test_entry.py)
BOOT = """
import sys
sys.path.insert(0, sys.argv[1])
from guard import entry, quick, commands, notify, errors, fingerprint, paths
from guard.kernel import apply, corebtf, host, layout, snapshot
from guard.observe import outcome, display, procnet
from guard.policy import compiled, plan, resvport
"""

TREES: dict[str, str] = {}


def cpu_of(cmd, **kw):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1000


def importtime(tree):
    proc = subprocess.run(
        [PY, "-S", "-X", "importtime", "-c", BOOT, tree], capture_output=True, text=True, env=ENV
    )
    total, named = 0, {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if not name[1:].startswith(" "):
            total += int(cumulative)
        named[name.strip()] = int(cumulative)
    return total / 1000, named.get("pathlib", 0) / 1000, named.get("typing", 0) / 1000


def show(title, values):
    print(title)
    names = list(values)
    for name in names:
        v = values[name]
        q = statistics.quantiles(v, n=10)
        print(
            f"  {name:8} median {statistics.median(v):7.2f} ms  (p10 {q[0]:.2f}, p90 {q[-1]:.2f})"
        )
    a, b = values[names[0]], values[names[1]]
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    ratios = [y / x for x, y in zip(a, b, strict=True)] if all(a) else [0.0]
    print(
        f"  paired after - before: median {statistics.median(diffs):+.2f} ms; "
        f"ratio {statistics.median(ratios):.3f}"
    )


def part_a(rounds):
    for tree in TREES.values():  # .pyc written, as the package's are compiled
        for _ in range(2):
            subprocess.run([PY, "-S", "-c", BOOT, tree], env=ENV, capture_output=True)
    total = {k: [] for k in TREES}
    pathlib = {k: [] for k in TREES}
    typing_ = {k: [] for k in TREES}
    cpu = {k: [] for k in TREES}
    floor = []
    for _ in range(rounds):
        for name in random.sample(list(TREES), 2):
            t, p, ty = importtime(TREES[name])
            total[name].append(t)
            pathlib[name].append(p)
            typing_[name].append(ty)
            _, c = cpu_of([PY, "-S", "-c", BOOT, TREES[name]], env=ENV)
            cpu[name].append(c)
        floor.append(cpu_of([PY, "-S", "-c", "pass"], env=ENV)[1])
    show(
        "A. import time of a kept-plan boot's modules (-X importtime: top-level cumulative)",
        total,
    )
    show("   of it pathlib (cumulative)", pathlib)
    show("   of it typing (cumulative)", typing_)
    show("   CPU of the same process without -X importtime", cpu)
    print(f"   python3 -S -c pass: median {statistics.median(floor):.2f} ms")


def part_b(rounds):
    from tests.kernel.sandbox import in_netns, new_sandbox, require_kernel

    box = new_sandbox(require_kernel(), "bench")
    box.create()
    work = tempfile.mkdtemp(prefix="portguard-bench-")
    try:
        box.cgroup("owner")
        path = box.write_config(box.owner_block(["7671"], "owner"))
        old = time.time() - 3600
        for p in (path, path.parent):
            os.utime(p, (old, old))
        time.sleep(1.2)
        states = {}
        n = iter(range(10**6))

        def run_dir():
            d = os.path.join(work, f"run{next(n)}")
            os.mkdir(d)
            return d

        def remove(env):
            subprocess.run(
                [sys.executable, "-m", "guard", "--config", str(path), "remove"],
                cwd=ROOT,
                env=env,
                check=True,
                capture_output=True,
            )

        def apply(name, env):
            code = (
                "import sys\n"
                f"sys.path.insert(0, {TREES[name]!r})\n"
                "from guard import entry\n"
                f"sys.argv = ['portguard', '--config', {str(path)!r}, 'apply']\n"
                "try:\n"
                "    entry.main()\n"
                "except SystemExit as exc:\n"
                "    parsed = 'tomllib' in sys.modules\n"
                "    print('exit', exc.code, 'parsed' if parsed else 'kept', file=sys.stderr)\n"
            )
            proc, c = cpu_of([*in_netns(box.netns), PY, "-S", "-c", code], env=env)
            return proc, c

        for name in TREES:  # the first boot of each tree keeps its plan in its state dir
            states[name] = os.path.join(work, f"state-{name}")
            os.mkdir(states[name])
            env = {**ENV, "PORTGUARD_RUN_DIR": run_dir(), "PORTGUARD_STATE_DIR": states[name]}
            proc, _ = apply(name, env)
            assert "exit 0 parsed" in proc.stderr, proc.stdout + proc.stderr
            remove(env)
        spent = {k: [] for k in TREES}
        for _ in range(rounds):
            for name in random.sample(list(TREES), 2):
                env = {**ENV, "PORTGUARD_RUN_DIR": run_dir(), "PORTGUARD_STATE_DIR": states[name]}
                proc, c = apply(name, env)
                assert "portguard: applied" in proc.stdout and "exit 0 kept" in proc.stderr, (
                    proc.stdout + proc.stderr
                )
                spent[name].append(c)
                remove(env)
        show(
            "B. a boot's apply with the last boot's plan (sandbox, python3 -S, CPU incl. nsenter)",
            spent,
        )
    finally:
        box.destroy()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.boot_imports")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--held",
        action="store_true",
        help="part A with the squatter scan's modules too (an apply that finds a reserved port "
        "held imports guard.observe.holders); part B is skipped",
    )
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args()
    global TREES, BOOT
    TREES = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    if args.held:
        BOOT += "from guard.observe import holders\n"
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    part_a(args.rounds)
    if os.geteuid() == 0 and not args.held:
        part_b(args.rounds)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
