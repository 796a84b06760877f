"""What libbpf's open and load of the object costs with the kernel's whole BTF and with a minimal
one (guard/kernel/corebtf.py), as a boot's apply loads it: the two bind programs and the two
cgroup trackers, each sample a fresh process.

python -m bench.core_btf [--rounds N] OBJECT...: for every object, loads with the kernel's BTF
and with a minimal BTF made for it by bpftool, in a shuffled order each round (paired), and
prints the median CPU (process_time: user+sys of the loading process) per case, the spread
and the median of the per-round differences. Root; maps are pinned in a bpffs directory of its
own (/sys/fs/bpf/portguard-btf-bench-PID), removed afterwards.

python -m bench.core_btf --fresh-apply [ROUNDS]: a whole fresh apply with and without it (see
fresh_applies).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PYTHON = os.environ.get("PYTHON", "/usr/bin/python3")
ROOT = Path(__file__).resolve().parent.parent


def sample(object_path: str, btf: str, maps_dir: str) -> None:
    """One load in this process; prints its CPU ms."""
    import time

    from guard.kernel import libbpf
    from guard.kernel.programs import not_loaded

    libbpf.lib()  # libbpf.so.1 loaded before the clock starts: the load only
    begin = time.process_time()
    skip = not_loaded("retval", False)  # a boot's: the bind hooks and the trackers
    loaded = libbpf.load_object(
        Path(object_path), Path(maps_dir), skip, core_btf=Path(btf) if btf else None
    )
    spent = (time.process_time() - begin) * 1000
    used = loaded.core_btf
    loaded.close()
    for pin in Path(maps_dir).iterdir():
        pin.unlink()
    print(f"{spent:.3f} {'min' if used else 'full'}")


def fresh_applies(rounds: int) -> None:
    """A fresh `portguard apply` (empty pin dir, as at boot) in a sandbox of the tests, with the
    minimal BTF in the cache and without it (and without bpftool, so none is made), in a
    shuffled order each round: CPU of the apply process (user+sys, children included)."""
    from guard.kernel import corebtf, objects
    from tests.kernel.sandbox import in_netns, new_sandbox, require_kernel

    if not os.environ.get("PORTGUARD_CACHE_DIR"):
        os.environ["PORTGUARD_CACHE_DIR"] = tempfile.mkdtemp(prefix="portguard-btf-cache-")
    # the sandbox's records and locks in a directory of its own, not the machine's /run/portguard
    run_dir = tempfile.mkdtemp(prefix="portguard-btf-run-")
    os.environ["PORTGUARD_RUN_DIR"] = run_dir
    box = new_sandbox(require_kernel(), "btf")
    box.create()
    try:
        box.cgroup("owner")
        box.write_config(box.owner_block(["7661"], "owner"))
        obj = objects.ensure_object()
        made = corebtf.ensure(obj)
        assert made is not None, "bpftool could not make the minimal BTF"
        sidecar = Path(made).with_suffix(".sha256")
        hidden = sidecar.with_name(sidecar.name + ".hidden")
        command = [*in_netns(box.netns), PYTHON, "-m", "guard", "--config", str(box.config_path)]
        spent: dict[str, list[float]] = {"with the minimal BTF": [], "with the kernel's BTF": []}
        for _ in range(rounds):
            for case in random.sample(list(spent), 2):
                subprocess.run([*command, "remove"], cwd=ROOT, check=True, capture_output=True)
                minimal = case.startswith("with the minimal")
                source, target = (hidden, sidecar) if minimal else (sidecar, hidden)
                if source.exists():  # without its sidecar the file is not taken
                    os.replace(source, target)
                env = {**os.environ, "PORTGUARD_BPFTOOL": ""}
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(
                    [*command, "apply"], cwd=ROOT, env=env, check=True, capture_output=True
                )
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                spent[case].append(cpu * 1000)
        if hidden.exists():
            os.replace(hidden, sidecar)
        print(f"fresh apply, load average {os.getloadavg()[0]:.2f}, {rounds} rounds, {PYTHON}")
        for case, values in spent.items():
            print(f"{case:24} median {statistics.median(values):6.1f} ms")
        diffs = [a - b for a, b in zip(*spent.values(), strict=True)]
        print(f"paired differences, median {statistics.median(diffs):.1f} ms")
    finally:
        box.destroy()
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    if sys.argv[1:2] == ["--sample"]:
        sample(*sys.argv[2:5])
        return 0
    if sys.argv[1:2] == ["--fresh-apply"]:
        fresh_applies(int(sys.argv[2]) if len(sys.argv) > 2 else 30)
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.core_btf")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("objects", nargs="+")
    args = parser.parse_args()
    maps_dir = Path(f"/sys/fs/bpf/portguard-btf-bench-{os.getpid()}")
    maps_dir.mkdir(mode=0o700)
    scratch = Path(tempfile.mkdtemp(prefix="portguard-btf-bench-"))
    try:
        cases = []
        for i, obj in enumerate(args.objects):
            btf = scratch / f"{i}.btf"
            subprocess.run(
                ["bpftool", "gen", "min_core_btf", "/sys/kernel/btf/vmlinux", str(btf), obj],
                check=True,
            )
            name = Path(obj).name
            cases += [(f"{name} full BTF", obj, ""), (f"{name} min BTF", obj, str(btf))]
        spent: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _ in range(args.rounds):
            for name, obj, btf in random.sample(cases, len(cases)):
                out = subprocess.run(
                    [PYTHON, "-m", "bench.core_btf", "--sample", obj, btf, str(maps_dir)],
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()
                if (out[1] == "min") != bool(btf):
                    raise SystemExit(f"{name}: loaded with the {out[1]} BTF")
                spent[name].append(float(out[0]))
        print(f"load average {os.getloadavg()[0]:.2f}, {args.rounds} rounds, {PYTHON}")
        for name, values in spent.items():
            q = statistics.quantiles(values, n=10)
            median = statistics.median(values)
            print(f"{name:40} median {median:6.2f} ms (p10 {q[0]:.2f}, p90 {q[-1]:.2f})")
        pairs = [(cases[i][0], cases[i + 1][0]) for i in range(0, len(cases), 2)]
        if len(cases) == 4:
            pairs.append((cases[0][0], cases[3][0]))
        for first, second in pairs:
            diffs = [a - b for a, b in zip(spent[first], spent[second], strict=True)]
            print(
                f"{first} − {second}: paired differences, median {statistics.median(diffs):.2f} ms"
            )
    finally:
        shutil.rmtree(maps_dir, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
