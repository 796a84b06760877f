"""Benchmark (not a test): what containment costs per packet on loopback.

    sudo python bench/containment.py [--seconds 5] [--rounds 3] [--json]

iperf3 runs inside a private network namespace between two cgroups of a private subtree
(the guard is attached there, never at the real cgroup2 root), in four set-ups, interleaved
round by round so drift of the machine hits all alike:

  none        no guard at all
  off         the guard with contain off (bind hooks only: no packet program is attached)
  owner       contain on, traffic on the owner's reserved port: every packet takes the full
              check (socket, port hit, netns, owner ancestry) and passes
  other       contain on, traffic on a port that is not reserved: the miss path that all
              other traffic of the host pays once containment is on

Three loads: TCP bulk (iperf3 default; large GSO segments, so few packets per byte), UDP
with 64-byte datagrams (iperf3, packet rate bound), and `udp64-cpu`: one process sends a
64-byte datagram to its own socket on the port and reads it back, in a loop, and reports the
CPU time per datagram, with bpf_stats off (the least of several runs: CPU time and the
minimum resist the noise of a busy machine, where wall-clock throughput does not).
Reported: the median over rounds and its ratio to `none` (for udp64-cpu: none's cost
divided by this one's, so that below 1 is slower everywhere), and the programs' own cost
per run as the kernel measures it (kernel.bpf_stats_enabled, switched on for the run and
restored afterwards). Everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import bpftool_json
from guard.kernel import cgroups
from tests.kernel.sandbox import Sandbox, in_netns, new_sandbox

PORT = 7651  # reserved for the owner, contain on in `owner` and `other`
FREE = 7652  # never reserved
SETUPS = ("none", "off", "owner", "other")
LOADS = {
    "tcp": [],
    "udp64": ["-u", "-b", "0", "-l", "64"],
    "udp64-cpu": [],
}
PINGPONG_C = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

static double cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    int port = atoi(argv[1]), count = atoi(argv[2]), runs = atoi(argv[3]);
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    int rx = socket(AF_INET, SOCK_DGRAM, 0), tx = socket(AF_INET, SOCK_DGRAM, 0);
    if (bind(rx, (struct sockaddr *)&addr, sizeof(addr))) { perror("bind"); return 1; }
    char buf[64] = { 0 };
    double best = 1e18;
    for (int r = 0; r < runs; r++) {
        double start = cpu_ns();
        for (int i = 0; i < count; i++) {
            if (sendto(tx, buf, sizeof(buf), 0, (struct sockaddr *)&addr, sizeof(addr))
                    != sizeof(buf)
                || recv(rx, buf, sizeof(buf), 0) != sizeof(buf)) { perror("pingpong"); return 1; }
        }
        double per = (cpu_ns() - start) / count;
        if (per < best) best = per;
    }
    printf("%.1f\n", best);
    return 0;
}
"""
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def in_cgroup(box: Sandbox, rel: str, argv: list[str]) -> list[str]:
    """argv run in the sandbox netns from a shell that first joins the cgroup."""
    procs = os.path.join(cgroups.directory(box.cgroup(rel), box.cgroup_root), "cgroup.procs")
    return [*in_netns(box.netns), "sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]


def configure(box: Sandbox, setup: str) -> None:
    if setup == "none":
        box.cli("remove")
        return
    block = box.owner_block([str(PORT)], "owner")
    if setup != "off":
        block += "contain = true\n"
    box.write_config(block)
    box.cli("apply")


def build_pingpong(work: Path) -> Path:
    source, binary = work / "pingpong.c", work / "pingpong"
    source.write_text(PINGPONG_C)
    cc = shutil.which("cc") or shutil.which("clang") or shutil.which("clang-14")
    if cc is None:
        sys.exit("bench/containment.py needs a C compiler (cc or clang) for the udp64-cpu load")
    subprocess.run([cc, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def pingpong(box: Sandbox, binary: Path, port: int, seconds: float) -> float:
    """CPU nanoseconds per 64-byte datagram sent to and read from a socket on the port."""
    count = int(20000 * seconds)
    out = subprocess.run(
        in_cgroup(box, "owner", [str(binary), str(port), str(count), "5"]),
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds * 60 + 30,
    )
    return float(out.stdout)


def measure(box: Sandbox, binary: Path, port: int, load: str, seconds: float) -> float:
    if load == "udp64-cpu":
        return pingpong(box, binary, port, seconds)
    return iperf(box, port, load, seconds)


def iperf(box: Sandbox, port: int, load: str, seconds: float) -> float:
    """Bits per second (tcp) or datagrams received per second (udp64)."""
    server = subprocess.Popen(
        in_cgroup(box, "owner", ["iperf3", "-s", "-1", "-p", str(port)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):  # until the server listens
            probe = subprocess.run(
                [*in_netns(box.netns), "ss", "-Htln", f"sport = :{port}"],
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.stdout.strip():
                break
            time.sleep(0.05)
        client = subprocess.run(
            in_cgroup(
                box,
                "client",
                [
                    "iperf3",
                    "-c",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-t",
                    str(seconds),
                    "-J",
                    *LOADS[load],
                ],
            ),
            capture_output=True,
            text=True,
            check=False,
            timeout=seconds + 30,
        )
        result = json.loads(client.stdout)
        if "error" in result:
            raise RuntimeError(f"iperf3: {result['error']}")
    finally:
        server.wait(timeout=30)
    end = result["end"]
    if load == "tcp":
        return end["sum_received"]["bits_per_second"]
    total = end["sum"]
    return (total["packets"] - total["lost_packets"]) / total["seconds"]


def program_stats(box: Sandbox) -> dict[str, tuple[int, int]]:
    """(runs, total ns) of the attached packet programs, by link name."""
    stats = {}
    for name in ("ingress", "egress"):
        link = box.pin_dir / f"link_{name}"
        if not link.exists():
            continue
        info = bpftool_json("link", "show", "pinned", str(link))
        prog = bpftool_json("prog", "show", "id", str(info["prog_id"]))
        stats[name] = (prog.get("run_cnt", 0), prog.get("run_time_ns", 0))
    return stats


def run(seconds: float, rounds: int) -> dict:
    box = new_sandbox(Path(cgroups.cgroup2_mount()), "bench")
    old_stats = BPF_STATS.read_text().strip()
    samples: dict[tuple[str, str], list[float]] = {(s, load): [] for s in SETUPS for load in LOADS}
    per_run_ns: dict[str, list[float]] = {s: [] for s in ("owner", "other")}
    try:
        box.create()
        binary = build_pingpong(box.work)
        for _ in range(rounds):
            for setup in SETUPS:
                configure(box, setup)
                port = FREE if setup == "other" else PORT
                before = program_stats(box)
                for load in LOADS:
                    # bpf_stats costs two clock reads per run: off while CPU time is measured
                    BPF_STATS.write_text("0" if load == "udp64-cpu" else "1")
                    samples[(setup, load)].append(measure(box, binary, port, load, seconds))
                after = program_stats(box)
                runs = sum(after[n][0] - before[n][0] for n in after)
                spent = sum(after[n][1] - before[n][1] for n in after)
                if setup in per_run_ns and runs:
                    per_run_ns[setup].append(spent / runs)
    finally:
        BPF_STATS.write_text(old_stats)
        box.destroy()
    results = {}
    for load in LOADS:
        base = statistics.median(samples[("none", load)])
        results[load] = {}
        for setup in SETUPS:
            median = statistics.median(samples[(setup, load)])
            ratio = base / median if load == "udp64-cpu" else median / base  # cost vs. rate
            results[load][setup] = {
                "median": median,
                "ratio": ratio,
                "samples": samples[(setup, load)],
            }
    return {
        "seconds": seconds,
        "rounds": rounds,
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "loads": results,
        "program_ns_per_packet": {
            s: statistics.median(v) if v else None for s, v in per_run_ns.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one iperf3 run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all set-ups")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/containment.py must run as root (it loads BPF programs)")
    for tool in ("iperf3", "bpftool", "ss", "nsenter"):
        if shutil.which(tool) is None:
            sys.exit(
                f"bench/containment.py needs {tool} "
                "(apt install iperf3 bpftool iproute2 util-linux)"
            )
    report = run(args.seconds, args.rounds)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"kernel {report['kernel']}, {report['cpus']} CPUs, "
        f"{args.rounds} rounds of {args.seconds:g} s; median, ratio to no guard"
    )
    for load, by_setup in report["loads"].items():
        unit, scale = {"tcp": ("Gbit/s", 1e9), "udp64": ("kpps", 1e3), "udp64-cpu": ("ns/pkt", 1)}[
            load
        ]
        cells = "  ".join(
            f"{s} {v['median'] / scale:8.2f} {unit} ({v['ratio']:.3f})" for s, v in by_setup.items()
        )
        print(f"{load:6} {cells}")
    for setup, ns in report["program_ns_per_packet"].items():
        if ns is not None:
            print(f"packet program, {setup:5} traffic: {ns:6.1f} ns per run (kernel bpf_stats)")


if __name__ == "__main__":
    main()
