"""A private world for one kernel test: a cgroup subtree, a network namespace, a pin directory.

The guard is attached to the subtree's top cgroup (never the real cgroup2 root), `apply`
runs inside the namespace (so sysctl changes stay there), and every child process joins a
cgroup of the subtree before it creates a socket. Everything is removed afterwards, also
when the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from guard.kernel import cgroups, libbpf

REPO = Path(__file__).resolve().parents[2]
PORTGUARD = [sys.executable, "-m", "guard"]
# PORTGUARD_TEST_REFUSE_AT=security_socket_bind (the VMs): every sandbox guard refuses binds
# on that road, unless a test names one itself
FORCED = (
    {"refuse_at": os.environ["PORTGUARD_TEST_REFUSE_AT"]}
    if os.environ.get("PORTGUARD_TEST_REFUSE_AT")
    else {}
)


def default_road() -> str:
    """Where a sandbox guard refuses binds: the road FORCED names, else the first this kernel
    offers (guard/kernel/host.py)."""
    if FORCED:
        return FORCED["refuse_at"]
    if os.geteuid() != 0:
        return "cgroup"  # no kernel test runs then (require_kernel)
    try:
        if libbpf.has_set_retval():
            return "cgroup"
        return "security_socket_bind" if libbpf.hook_refusal() is None else "cgroup-eperm"
    except libbpf.BpfError:  # no libbpf: require_kernel says so
        return "cgroup"


ROAD = default_road()
# the bind links a sandbox guard has on that road
BIND_LINKS = ("socket_bind",) if ROAD == "security_socket_bind" else ("bind4", "bind6")


def missing(reason: str) -> None:
    """Skip for a missing prerequisite, but fail under CI where a skip would hide a gap."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"kernel test prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def require_root_and_cgroup2(why_root: str) -> Path:
    """Root (else `missing(why_root)`) and a cgroup2 mount, which is returned."""
    if os.geteuid() != 0:
        missing(why_root)
    try:
        return Path(cgroups.cgroup2_mount())
    except cgroups.CgroupError as exc:
        missing(str(exc))


def require_kernel() -> Path:
    """Root, cgroup2 and bpffs (mounted here when absent, as apply would): the cgroup2 mount."""
    root = require_root_and_cgroup2("kernel tests need root")
    bpffs = Path("/sys/fs/bpf")
    mounts = Path("/proc/mounts").read_text()
    if f" {bpffs} bpf " not in mounts and (
        not bpffs.is_dir() or subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)]).returncode
    ):
        missing("no BPF file system at /sys/fs/bpf and mounting one failed")
    if shutil.which("ip") is None:
        missing("iproute2 (ip) is not installed")
    return root


# Runs in a child: join a cgroup, then run one of the actions below and print JSON.
CHILD = textwrap.dedent(r"""
    import ctypes, errno, json, os, socket, sys, time
    cgroup_procs, action, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    def join(procs):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if cgroup_procs != "-":  # "-": already placed (e.g. by the "exec" action of a parent)
        join(cgroup_procs)
    FAM = {"v4": (socket.AF_INET, "127.0.0.1"), "v6": (socket.AF_INET6, "::1"),
           "dual": (socket.AF_INET6, "::"), "mapped": (socket.AF_INET6, "::ffff:127.0.0.1")}
    TYPE = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}

    def bind(fam, typ, port):
        family, addr = FAM[fam]
        s = socket.socket(family, TYPE[typ])
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == "dual":
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((addr, port))
            return 0
        except OSError as e:
            return e.errno
        finally:
            s.close()

    def tally(counts, e):
        # one bind's outcome into {"ok": n, "fail": n, "errors": {errno: n}}
        if e == 0:
            counts["ok"] += 1
        else:
            counts["fail"] += 1
            counts["errors"][e] = counts["errors"].get(e, 0) + 1

    if action == "bind":
        print(json.dumps({f"{f}/{t}/{p}": bind(f, t, p) for f, t, p in args}))
    elif action == "loop":
        # bind the same port in a loop until the stop file appears; report counts
        fam, typ, port, stop = args
        counts = {"ok": 0, "fail": 0, "errors": {}}
        print("ready", flush=True)
        while not os.path.exists(stop):
            tally(counts, bind(fam, typ, port))
        print(json.dumps(counts))
    elif action == "repeat":
        # bind the same port n times in a tight loop; report counts
        fam, typ, port, n = args
        counts = {"ok": 0, "fail": 0, "errors": {}}
        for _ in range(n):
            tally(counts, bind(fam, typ, port))
        print(json.dumps({**counts, "pid": os.getpid()}))
    elif action == "hold":
        # bind (and listen, for TCP) and keep the port until killed
        fam, typ, port = args
        family, addr = FAM[fam]
        s = socket.socket(family, TYPE[typ])
        s.bind((addr, port))
        if typ == "tcp":
            s.listen()
        print(json.dumps({"pid": os.getpid()}), flush=True)
        while True:
            time.sleep(3600)
    elif action == "bindresvport":
        libc = ctypes.CDLL(None, use_errno=True)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        rc = libc.bindresvport(s.fileno(), None)
        err = ctypes.get_errno() if rc else 0
        print(json.dumps({"rc": rc, "errno": err, "port": s.getsockname()[1] if rc == 0 else None}))
    elif action == "autobind":
        # ports picked by the kernel: bind(0), connect() of TCP and UDP without bind
        count, target = args
        seen = []
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
            seen.append(s.getsockname()[1]); s.close()
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.connect(("::1", target))
            seen.append(s.getsockname()[1]); s.close()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"x", ("127.0.0.1", target))
            seen.append(s.getsockname()[1]); s.close()
        print(json.dumps(sorted(set(seen))))
    elif action == "matrix":
        # the same binds from several cgroups in turn: {label: {case: errno}}, plus the sysctl
        out = {}
        for procs, label, cases in args:
            join(procs)
            out[label] = {f"{f}/{t}/{p}": bind(f, t, p) for f, t, p in cases}
        with open("/proc/sys/net/ipv4/ip_local_reserved_ports") as f:
            out["sysctl"] = f.read().strip()
        print(json.dumps(out))
    elif action == "exec":
        # placed in the cgroup as root; now become someone else (e.g. setpriv ... python ...)
        os.execvp(args[0], args)
    elif action == "restarts":
        # owner restarts: mkdir the owner cgroup, join it, bind, leave, rmdir; count failures
        owner_dir, parking_procs, count, cases = args
        counts = {"ok": 0, "fail": 0, "errors": {}}
        for _ in range(count):
            os.mkdir(owner_dir)
            join(os.path.join(owner_dir, "cgroup.procs"))
            for f, t, p in cases:
                tally(counts, bind(f, t, p))
            join(parking_procs)
            os.rmdir(owner_dir)
        print(json.dumps(counts))
    elif action == "serve":
        # echo server on a port until killed: TCP connections one after the other, UDP datagrams
        fam, typ, port = args
        family, addr = FAM[fam]
        s = socket.socket(family, TYPE[typ])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == "dual":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((addr, port))
        if typ == "tcp":
            s.listen(16)
        print("ready", flush=True)
        while True:
            if typ == "udp":
                data, peer = s.recvfrom(2048)
                s.sendto(data, peer)
                continue
            conn, _ = s.accept()
            with conn:
                conn.settimeout(5)
                try:
                    while data := conn.recv(2048):
                        conn.sendall(data)
                except OSError:
                    pass
    elif action == "talk":
        # one request to an echo server; an answer that does not come within `wait` seconds
        # (a dropped packet is never answered) counts as no answer
        fam, typ, port, wait = args
        family, addr = FAM[fam]
        s = socket.socket(family, TYPE[typ])
        s.settimeout(wait)
        payload = b"ping %d" % os.getpid()
        try:
            if typ == "tcp":
                s.connect((addr, port)); s.sendall(payload); answer = s.recv(2048)
            else:
                s.sendto(payload, (addr, port)); answer = s.recvfrom(2048)[0]
            print(json.dumps({"answered": answer == payload, "error": None}))
        except OSError as e:
            print(json.dumps({"answered": False, "error": type(e).__name__}))
        finally:
            s.close()
""")


def in_netns(name: str) -> list[str]:
    """Command prefix entering only the network namespace: `ip netns exec` would also
    remount /sys and hide the cgroup2 and bpffs mounts."""
    return ["nsenter", f"--net=/run/netns/{name}"]


class Sandbox:
    def __init__(self, cgroup_root: Path, name: str):
        self.name = name
        self.cgroup_root = cgroup_root
        self.top = f"/{name}"
        self.top_dir = cgroup_root / name
        self.netns = name
        self.pin_dir = Path("/sys/fs/bpf") / name
        self.work = Path(f"/tmp/{name}")
        self.config_path = self.work / "portguard.toml"
        self.children: list[subprocess.Popen] = []
        self.other_netns: list[str] = []

    # -- set-up and tear-down ------------------------------------------------------------
    def create(self) -> None:
        self.top_dir.mkdir()
        self.work.mkdir()
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)

    def destroy(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()
        self.cli("remove", check=False)
        if self.pin_dir.exists():  # a test that broke apply may leave pins: never leak them
            subprocess.run(["rm", "-rf", str(self.pin_dir)], check=False)
        self._remove_cgroups(self.top_dir)
        for ns in [self.netns, *self.other_netns]:
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.work, ignore_errors=True)

    def _remove_cgroups(self, top: Path) -> None:
        if not top.exists():
            return
        for _ in range(50):
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                self._kill(d)
                try:
                    d.rmdir()
                except OSError:
                    pass
            self._kill(top)
            try:
                top.rmdir()
                return
            except OSError:
                time.sleep(0.05)

    @staticmethod
    def _kill(directory: Path) -> None:
        try:
            for pid in (directory / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        except OSError:
            pass

    # -- cgroups -----------------------------------------------------------------------
    def cgroup(self, rel: str) -> str:
        """Path (relative to the cgroup2 root) of a cgroup in the sandbox, created if needed."""
        path = f"{self.top}/{rel}".rstrip("/")
        Path(cgroups.directory(path, self.cgroup_root)).mkdir(parents=True, exist_ok=True)
        return path

    def rmdir(self, rel: str) -> None:
        os.rmdir(cgroups.directory(f"{self.top}/{rel}", self.cgroup_root))

    def cgroup_id(self, rel: str) -> int | None:
        return cgroups.cgroup_id(f"{self.top}/{rel}", self.cgroup_root)

    def procs(self, rel: str) -> str:
        """cgroup.procs of a sandbox cgroup (created if needed)."""
        return os.path.join(cgroups.directory(self.cgroup(rel), self.cgroup_root), "cgroup.procs")

    # -- config and CLI ----------------------------------------------------------------
    def write_config(self, reserve: str, **guard: str) -> Path:
        settings = {"cgroup": self.top, "pin_dir": str(self.pin_dir), **FORCED, **guard}
        lines = ["[guard]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items()), "", reserve]
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    def owner_block(self, ports: list[str], *owners: str) -> str:
        paths = [f"{self.top}/{o}" for o in owners]
        return f"[[reserve]]\nports = {json.dumps(ports)}\ncgroups = {json.dumps(paths)}\n"

    def cli(
        self,
        *args: str,
        check: bool = True,
        netns: str | None = "own",
        config: Path | None = None,
        env: dict | None = None,
        program: list[str] = PORTGUARD,
    ) -> subprocess.CompletedProcess:
        """Run portguard (by default this checkout's; `program`: another installation)."""
        cmd = [*program, "--config", str(config or self.config_path), *args]
        if netns == "own":
            cmd = [*in_netns(self.netns), *cmd]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"portguard {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def status(self) -> dict:
        """status --json; its exits 3 (a reserved port held by a non-owner) and 5 (loaded from
        other files than --config's) are states many tests create on purpose, not failures."""
        proc = self.cli("status", "--json", check=False)
        if proc.returncode not in (0, 3, 5):
            raise AssertionError(f"portguard status failed ({proc.returncode}):\n{proc.stderr}")
        return json.loads(proc.stdout)

    def monitor(self, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        """Start `portguard monitor ARGS` in the namespace, stdout to a file (a full pipe would
        stall it); returns once it consumes events (its ready line on stderr)."""
        out = self.work / f"monitor-{len(self.children)}.out"
        cmd = [
            *in_netns(self.netns),
            *PORTGUARD,
            "--config",
            str(self.config_path),
            "monitor",
            *args,
        ]
        with open(out, "w") as stdout:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **(env or {})},
            )
        self.children.append(proc)
        ready = proc.stderr.readline()
        if "monitoring" not in ready:
            proc.wait(timeout=60)
            raise AssertionError(
                f"monitor did not start ({proc.returncode}): {ready}{proc.stderr.read()}"
            )
        return proc, out

    # -- child processes ---------------------------------------------------------------
    def _child_cmd(self, cgroup_rel: str, action: str, args, netns: str | None) -> list[str]:
        procs = os.path.join(
            cgroups.directory(self.cgroup(cgroup_rel), self.cgroup_root), "cgroup.procs"
        )
        cmd = [sys.executable, "-c", CHILD, procs, action, json.dumps(args)]
        if netns == "own":
            netns = self.netns
        return [*in_netns(netns), *cmd] if netns else cmd

    def run(self, cgroup_rel: str, action: str, args, netns: str | None = "own"):
        proc = subprocess.run(
            self._child_cmd(cgroup_rel, action, args, netns),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def bind(
        self, cgroup_rel: str, cases: list[tuple[str, str, int]], netns: str | None = "own"
    ) -> dict:
        """errno per case ("v4/tcp/631" -> 0 or errno) for binds made from cgroup_rel."""
        return self.run(cgroup_rel, "bind", cases, netns)

    def start(
        self, cgroup_rel: str, action: str, args, netns: str | None = "own"
    ) -> subprocess.Popen:
        child = subprocess.Popen(
            self._child_cmd(cgroup_rel, action, args, netns),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.children.append(child)
        return child

    def serve(
        self, cgroup_rel: str, fam: str, typ: str, port: int, netns: str | None = "own"
    ) -> subprocess.Popen:
        """An echo server on the port, running (bound, listening) when this returns."""
        child = self.start(cgroup_rel, "serve", [fam, typ, port], netns)
        line = child.stdout.readline().strip()
        if line != "ready":
            child.kill()
            raise AssertionError(
                f"echo server on {fam}/{typ}/{port} did not start: {child.stderr.read()}"
            )
        return child

    def talk(
        self,
        cgroup_rel: str,
        fam: str,
        typ: str,
        port: int,
        wait: float = 1.5,
        netns: str | None = "own",
    ) -> bool:
        """Whether one request to the echo server on the port was answered."""
        return self.run(cgroup_rel, "talk", [fam, typ, port, wait], netns)["answered"]

    def new_netns(self) -> str:
        name = f"{self.name}-x{len(self.other_netns)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        self.other_netns.append(name)
        return name

    def sysctl(self, name: str, value: str | None = None) -> str:
        path = "/proc/sys/" + name.replace(".", "/")
        if value is not None:
            subprocess.run(
                [*in_netns(self.netns), "sh", "-c", f"echo '{value}' > {path}"], check=True
            )
        return subprocess.run(
            [*in_netns(self.netns), "cat", path], capture_output=True, text=True, check=True
        ).stdout.strip()


def new_sandbox(cgroup_root: Path, label: str = "") -> Sandbox:
    name = f"portguard-test-{label + '-' if label else ''}{secrets.token_hex(3)}"
    return Sandbox(cgroup_root, name)
