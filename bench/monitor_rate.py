#!/usr/bin/env python3
"""Benchmark (not a test): the denial rate `portguard monitor` keeps up with without losses.

In a private sandbox (cgroup subtree, network namespace, pin directory: the kernel tests'
Sandbox), a small C program refuses itself N binds at a paced target rate while
`portguard monitor --json --count N` consumes the events (its output goes to /dev/null, so
decoding and formatting are measured, not a terminal). For each rate: the rate achieved, the
events received and lost (the monitor's own count) and received/produced. The kernel's denial
counter is checked to equal N every time.

    sudo .venv/bin/python bench/monitor_rate.py [--seconds 2] [--rates 1000,5000,...]

Needs root, cgroup2, bpffs, iproute2 and a C compiler (cc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guard.kernel import cgroups  # noqa: E402
from tests.kernel.sandbox import PORTGUARD, in_netns, new_sandbox, require_kernel  # noqa: E402

PORT = 7651
DEFAULT_RATES = [1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 0]  # 0: as fast as it can

PRODUCER_C = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* producer CGROUP_PROCS PORT COUNT RATE: join the cgroup, then COUNT binds of PORT (each
 * refused by the guard), paced to RATE per second (0: unpaced). Prints refused binds and
 * the seconds it took. */
static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	FILE *procs = fopen(argv[1], "w");
	if (!procs || fprintf(procs, "%d", getpid()) < 0 || fclose(procs))
		return 2;
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
	long count = atol(argv[3]);
	double rate = atof(argv[4]), start = now();
	long refused = 0;

	inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
	for (long i = 0; i < count; i++) {
		if (rate > 0 && i % 16 == 0) {
			double ahead = start + i / rate - now();
			if (ahead > 0) {
				struct timespec ts = { (time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9) };
				nanosleep(&ts, NULL);
			}
		}
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)))
			refused++;
		close(fd);
	}
	printf("%ld %.6f\n", refused, now() - start);
	return 0;
}
"""


def build_producer(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        sys.exit("monitor_rate: needs a C compiler (cc) for the bind producer")
    source, binary = workdir / "producer.c", workdir / "producer"
    source.write_text(PRODUCER_C)
    subprocess.run([cc, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def denied(box) -> int:
    proc = box.cli("status", "--json", check=False)
    return sum(r["denied"] for r in json.loads(proc.stdout)["reservations"])


def one_rate(box, producer: Path, rate: int, count: int, sink: list[str]) -> dict:
    before = denied(box)
    cmd = [
        *in_netns(box.netns),
        *PORTGUARD,
        "--config",
        str(box.config_path),
        "monitor",
        *sink,
        "--count",
        str(count),
    ]
    with open(os.devnull, "w") as devnull:
        monitor = subprocess.Popen(cmd, cwd=REPO, stdout=devnull, stderr=subprocess.PIPE, text=True)
    try:
        ready = monitor.stderr.readline()
        if "monitoring" not in ready:
            sys.exit(f"monitor did not start: {ready}{monitor.stderr.read()}")
        procs = Path(cgroups.directory(box.cgroup("stranger"), box.cgroup_root), "cgroup.procs")
        out = subprocess.run(
            [*in_netns(box.netns), str(producer), str(procs), str(PORT), str(count), str(rate)],
            capture_output=True,
            text=True,
            check=True,
        )
        refused, seconds = out.stdout.split()
        monitor.wait(timeout=max(60, count / 1000))
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
    summary = re.search(r"(\d+) events, (\d+) lost", monitor.stderr.read())
    received, lost = (int(summary[1]), int(summary[2])) if summary else (0, count)
    return {
        "target": rate or None,
        "produced": int(refused),
        "rate": int(refused) / float(seconds),
        "received": received,
        "lost": lost,
        "ratio": received / int(refused),
        "counted": denied(box) - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="production time per rate")
    parser.add_argument(
        "--rates",
        default=",".join(map(str, DEFAULT_RATES)),
        help="comma-separated target rates per second; 0 = unpaced",
    )
    parser.add_argument("--text", action="store_true", help="measure the text output, not --json")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    os.environ.setdefault("PORTGUARD_CACHE_DIR", tempfile.mkdtemp(prefix="portguard-bench-cache-"))
    box = new_sandbox(require_kernel(), "bench")
    results = []
    try:
        box.create()
        box.write_config(box.owner_block([f"{PORT}/tcp"], "owner"))
        box.cli("apply")
        producer = build_producer(box.work)
        for rate in rates:
            count = max(2_000, int((rate or 200_000) * args.seconds))
            results.append(one_rate(box, producer, rate, count, [] if args.text else ["--json"]))
            row = results[-1]
            if not args.json:
                target = f"{row['target']:>8}" if row["target"] else "     max"
                print(
                    f"target {target}/s  produced {row['rate']:>9.0f}/s  "
                    f"received {row['received']:>7}  lost {row['lost']:>7}  "
                    f"ratio {row['ratio']:.3f}  kernel counted {row['counted']}",
                    flush=True,
                )
            time.sleep(0.2)
    finally:
        box.destroy()
    lossless = [r["rate"] for r in results if r["lost"] == 0]
    if args.json:
        print(json.dumps({"results": results, "max_lossless_rate": max(lossless, default=0)}))
    else:
        print(f"highest produced rate with no loss: {max(lossless, default=0):.0f} denials/s")


if __name__ == "__main__":
    main()
