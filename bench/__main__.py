"""Run the benchmarks and print Markdown tables: sudo python3 -m bench [--quick] [SUITE...]

Suites: bind (bind cost), scale (reservations, owners, linear scan), lifecycle (apply,
re-apply, remove, memory), startup (CLI), portreserve (socket-holding model), cost (CLI CPU
ratios, apply's phases), boot (nspawn boots with real services, guarded vs masked), cli (CLI
CPU ratios in a booted guest with real services), reload (daemon-reload -> a unit's declared
port guarded, in a booted guest with real services). Default: all.
Needs root, cgroup2, bpffs, iproute2, bpftool, gcc and clang; runs in a private cgroup
subtree, network namespace and pin directory, removed afterwards.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import boot, suites
from bench.harness import Unavailable, machine, world

SUITES = {
    "bind": suites.bind_cost,
    "scale": suites.scale,
    "lifecycle": suites.lifecycle,
    "startup": suites.startup,
    "portreserve": suites.portreserve_model,
    "cost": suites.cost,
    "boot": boot.boot,
    "cli": boot.cli,
    "reload": boot.reload,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"one or more of {', '.join(SUITES)} (default: all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds and iterations (a smoke run)"
    )
    args = parser.parse_args()
    chosen = args.suites or list(SUITES)
    unknown = [name for name in chosen if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r} (choose from {', '.join(SUITES)})")
    settings = suites.settings(args.quick)
    print(f"# portguard benchmarks\n\n{machine()}")
    started = time.monotonic()
    try:
        with world() as w:
            for name in chosen:
                print(SUITES[name](w, settings), flush=True)
    except Unavailable as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print(f"\n(all suites in {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
