"""The benchmark's private world and its measuring tools.

Everything happens in a sandbox like the kernel tests' (tests/kernel/sandbox.py): its own
cgroup subtree `portguard-bench-<hex>` (never the cgroup2 root), its own network namespace,
its own pin directory and object cache. All of it is removed at the end, also on failure or
SIGTERM. Kernel run-time statistics are switched on with BPF_ENABLE_STATS, a reference the
kernel drops when this process exits: no sysctl is left changed.
"""

from __future__ import annotations

import ctypes as C
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guard.kernel import cgroups
from guard.kernel import libbpf as kernel
from tests.kernel.sandbox import BIND_LINKS, PORTGUARD, REPO, Sandbox, in_netns, require_kernel

HERE = Path(__file__).resolve().parent
BPF_STATS_RUN_TIME = 0


class Unavailable(RuntimeError):
    """A prerequisite is missing; the message says which."""


# ---- numbers ----------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, readable in a terminal as it is."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [f"\n### {title}\n", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def machine() -> str:
    cpu = "unknown CPU"
    for entry in Path("/proc/cpuinfo").read_text().splitlines():
        if entry.startswith("model name"):
            cpu = entry.split(":", 1)[1].strip()
            break
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return (
        f"kernel {platform.release()}, {os.cpu_count()} × {cpu}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"load average at start {load}"
    )


# ---- the world --------------------------------------------------------------------------------


@dataclass
class World:
    """The sandbox plus what the benchmarks need beside it."""

    box: Sandbox
    cache: Path
    bindloop_c: Path
    links: list[int] = field(default_factory=list)
    stats_fd: int | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"PORTGUARD_CACHE_DIR": str(self.cache)}

    def procs(self, rel: str) -> str:
        return os.path.join(
            cgroups.directory(self.box.cgroup(rel), self.box.cgroup_root), "cgroup.procs"
        )

    def cli(self, *args: str, netns: str | None = "own", check: bool = True):
        return self.box.cli(*args, netns=netns, env=self.env, check=check)

    def apply_config(self, ports: list[str], owners: tuple[str, ...] = ("guarded/owner",)) -> None:
        self.box.write_config(
            self.box.owner_block(ports, *owners), cgroup=f"{self.box.top}/guarded"
        )
        self.cli("apply")

    def prog_id(self, link: str = BIND_LINKS[0]) -> int:
        """The program of a link (default: the IPv4 bind link, or the security_socket_bind
        link where PORTGUARD_TEST_REFUSE_AT or the kernel puts the guard on that road)."""
        return self.box.status()["links"][link]["prog_id"]


def _compile_driver(work: Path) -> Path:
    prebuilt = os.environ.get("PORTGUARD_BENCH_BINDLOOP")  # the VM boxes have no compiler
    if prebuilt:
        return Path(prebuilt)
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise Unavailable("gcc is needed to build the C bind driver (apt install gcc)")
    out = work / "bindloop"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(out), str(HERE / "bindloop.c")], check=True)
    return out


@contextmanager
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        raise Unavailable("the benchmark must run as root (it loads BPF programs)")
    try:
        root = require_kernel()
    except pytest.skip.Exception as exc:
        raise Unavailable(str(exc.msg)) from None
    box = Sandbox(root, f"portguard-bench-{secrets.token_hex(3)}")
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    w = None
    try:
        box.create()
        for rel in ("guarded", "plain", "scan"):
            box.cgroup(rel)
        w = World(box, box.work / "cache", _compile_driver(box.work))
        if os.environ.get("PORTGUARD_CACHE_DIR"):  # objects built elsewhere (the VM boxes)
            shutil.copytree(os.environ["PORTGUARD_CACHE_DIR"], w.cache, dirs_exist_ok=True)
        else:
            w.cli("build", netns=None)
        # Installed packages ship bytecode (py3compile); a checkout may not have it.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "guard")], check=True)
        yield w
    finally:
        if w is not None:
            for fd in w.links:
                kernel.close(fd)
            if w.stats_fd is not None:
                os.close(w.stats_fd)
        box.destroy()
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def bpf_stats(w: World) -> Iterator[None]:
    """Kernel run time per program (run_time_ns / run_cnt) inside the block. BPF_ENABLE_STATS
    hands out a reference the kernel drops on close or when this process dies, so no
    setting outlives the benchmark (kernel.bpf_stats_enabled is never touched)."""
    lib = kernel.lib()
    lib.bpf_enable_stats.restype = C.c_int
    lib.bpf_enable_stats.argtypes = [C.c_int]
    fd = lib.bpf_enable_stats(BPF_STATS_RUN_TIME)
    if fd < 0:
        raise Unavailable(f"BPF_ENABLE_STATS failed: {os.strerror(C.get_errno())}")
    w.stats_fd = fd
    try:
        yield
    finally:
        w.stats_fd = None
        os.close(fd)


def bpftool_json(*args: str) -> dict:
    """`bpftool -j ARGS...`, parsed."""
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def prog_stats(prog_id: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program."""
    info = bpftool_json("prog", "show", "id", str(prog_id))
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def prog_id_of_fd(fd: int) -> int:
    return kernel.prog_info(fd).id


# ---- measuring commands -----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    wall_ms: float
    cpu_ms: float  # user + system time of the process and its children


def timed(cmd: list[str], env: dict | None = None, cwd: Path = REPO) -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Run(wall * 1000, cpu * 1000)


def portguard(w: World, *args: str, netns: bool = True) -> list[str]:
    cmd = [*PORTGUARD, "--config", str(w.box.config_path), *args]
    return [*in_netns(w.box.netns), *cmd] if netns else cmd


def drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)


def processes_left_by(cmd: list[str], env: dict) -> int:
    """Run cmd as the leader of a new session; count processes of that session alive after
    it exited (a daemon or helper left behind would be one)."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **env},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc.wait()
    left = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == proc.pid:  # field 6 of stat: the session id
            left += 1
    return left


def maps_memlock(pin_dir: Path) -> dict[str, int]:
    """bytes_memlock of each map pinned under pin_dir, as bpftool reports it."""
    sizes = {}
    for maps_dir in pin_dir.glob("maps-*"):
        for pinned in sorted(maps_dir.iterdir()):
            info = bpftool_json("map", "show", "pinned", str(pinned))
            sizes[pinned.name] = int(info.get("bytes_memlock", 0))
    return sizes
