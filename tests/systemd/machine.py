"""Boot the cached rootfs with systemd-nspawn --boot and drive the systemd inside it.

One Machine is one boot: an overlay above the cached tree (which stays untouched), a cgroup of
its own below the cgroup2 root (never the root itself), its own network namespace
(--private-network) and its own bpffs. portguard comes as the built .deb: installed into the
overlay before boot (dpkg -i in a chroot, where no systemd runs and nothing is started), or
copied in and installed on the running system by a test. Commands run inside with nsenter into
all of the container's namespaces; test units write their results into a bind-mounted host
directory. Everything is removed on stop, also after a failure.

The container runs WITHOUT a cgroup namespace (SYSTEMD_NSPAWN_USE_CGNS=0): the cgroup_mkdir
tracepoint reports paths from the real cgroup2 root and BPF cgroup levels count from there, so
portguard must see the same paths as the kernel (see README, Limits).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_RESULTS = "/results"
GUEST_DEBS = "/root/debs"  # packages copied in for the tests to install on the running system
BOOT_TIMEOUT = 120  # seconds; a hang guard for set-up, not an assertion about speed
CAPABILITIES = "CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN,CAP_SYS_RESOURCE"
SYSCALLS = "bpf perf_event_open"
# Debian's way to keep maintainer scripts from starting services in a chroot (invoke-rc.d,
# deb-systemd-invoke): "action forbidden by policy".
POLICY_RC_D = "#!/bin/sh\nexit 101\n"
# Commands in the guest get the guest's usual environment, not the test runner's (a venv on
# PATH, PYTHONPATH, ...).
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


class MachineError(RuntimeError):
    pass


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Symlink:
    """A file of the guest that is a symbolic link (e.g. enabling a unit)."""

    target: str


GuestFiles = dict[str, "str | bytes | Symlink"]


class Machine:
    def __init__(
        self,
        rootfs: Path,
        cgroup_root: Path,
        files: GuestFiles,
        name: str | None = None,
        cgroup_namespace: bool = False,
        preinstalled: tuple[Path, ...] = (),
        bpf: bool = True,
    ):
        self.name = name or f"portguard-nspawn-{secrets.token_hex(3)}"
        self.rootfs = rootfs
        self.cgroup_root = cgroup_root
        self.cgroup_dir = cgroup_root / self.name
        self.files = files  # guest path -> content, written into the overlay before boot
        self.work = Path("/tmp") / self.name
        self.root = self.work / "root"
        self.results = self.work / "results"
        self.log_path = self.work / "console.log"
        self.nspawn: subprocess.Popen | None = None
        self.leader: int | None = None
        self._mounted = False
        self.cgroup_namespace = cgroup_namespace  # True only to study the limitation
        self.preinstalled = preinstalled  # .debs installed into the overlay before boot
        self.install_output = ""  # what dpkg -i (and the maintainer scripts) printed then
        self.bpf = bpf  # False: nspawn's default seccomp filter and capabilities (no bpf())

    @property
    def cgroup(self) -> str:
        """The guest's root cgroup (relative to the cgroup2 root): nspawn --keep-unit puts the
        payload below the cgroup it was started in, itself beside it in supervisor/."""
        return f"/{self.name}/payload"

    # -- boot ------------------------------------------------------------------------------
    def start(self) -> None:
        for sub in ("upper", "ovl-work", "root", "results"):
            (self.work / sub).mkdir(parents=True)
        layers = (
            f"lowerdir={self.rootfs},upperdir={self.work / 'upper'},"
            f"workdir={self.work / 'ovl-work'}"
        )
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", layers, str(self.root)], check=True
        )
        self._mounted = True
        for guest_path, content in self.files.items():
            target = self.root / guest_path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            if isinstance(content, Symlink):
                target.symlink_to(content.target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        if self.preinstalled:
            self._install_in_chroot(self.preinstalled)
        self._boot()

    def reboot(self) -> None:
        """Power the guest off and boot it again from the same overlay: what an installed
        system does at every boot but the first (its files as old as they are, /run empty)."""
        self._power_off()
        _remove_cgroup_tree(self.cgroup_dir)
        self._boot()

    def _boot(self) -> None:
        self.cgroup_dir.mkdir()
        env = {
            **os.environ,
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
            "SYSTEMD_NSPAWN_USE_CGNS": "1" if self.cgroup_namespace else "0",
        }
        allow_bpf = [f"--system-call-filter={SYSCALLS}", f"--capability={CAPABILITIES}"]
        if not self.bpf:
            allow_bpf = []
        command = [
            "systemd-nspawn",
            "--boot",
            "--quiet",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--private-network",
            *allow_bpf,
            f"--bind={self.results}:{GUEST_RESULTS}",
            # nspawn's /sys has no fs/bpf: give the guest an empty directory there, on which
            # `portguard apply` mounts a bpffs of the guest's own (never the host's).
            "--tmpfs=/sys/fs/bpf:mode=0700",
            "--console=pipe",
            "--link-journal=no",
        ]
        # Join the container's cgroup first: nspawn --keep-unit stays where it is started.
        join = f'echo $$ > "{self.cgroup_dir}/cgroup.procs" && exec "$@"'
        with open(self.log_path, "w") as log:
            self.nspawn = subprocess.Popen(
                ["sh", "-c", join, "sh", *command],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.leader = self._wait_for_leader()
        self._wait_for_boot()
        # The guest's configuration names its root cgroup, written before boot: check it
        # (read from here, the path is the host's view, with or without a cgroup namespace).
        seen = f"0::{self.cgroup}/init.scope"
        if seen not in Path(f"/proc/{self.leader}/cgroup").read_text().splitlines():
            raise MachineError(f"the guest's PID 1 is not in {seen}: nspawn changed its layout")

    def _install_in_chroot(self, debs: tuple[Path, ...]) -> None:
        """dpkg -i into the overlay as an image build would: no systemd runs there, so the
        maintainer scripts only enable units. policy-rc.d forbids starting anything, and the
        chroot gets its own cgroup and network namespaces: even a script that ignored both could
        not attach to the host's cgroups (portguard refuses to run in a cgroup namespace)."""
        staging = self.root / "tmp/preinstall"
        staging.mkdir(parents=True)
        policy = self.root / "usr/sbin/policy-rc.d"
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
        try:
            for deb in debs:
                shutil.copy(deb, staging / deb.name)
            proc = subprocess.run(
                [
                    "unshare", "--cgroup", "--net", "--mount", "--fork",
                    "chroot", str(self.root),
                    "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                    "DEBIAN_FRONTEND=noninteractive",
                    "dpkg", "-i", *(f"/tmp/preinstall/{deb.name}" for deb in debs),
                ],
                capture_output=True,
                text=True,
                check=False,
            )  # fmt: skip
        finally:
            policy.unlink()
            shutil.rmtree(staging)
        self.install_output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise MachineError(
                f"dpkg -i in the chroot failed ({proc.returncode}):\n{self.install_output}"
            )

    def _wait_for_boot(self) -> None:
        # No answer or "offline": PID 1 is not listening on its private socket yet.
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if self.nspawn.poll() is not None:
                raise MachineError(
                    f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console()}"
                )
            answer = self.run("systemctl", "is-system-running", "--wait", timeout=BOOT_TIMEOUT)
            state = answer.stdout.strip()
            if state in ("running", "degraded"):
                return
            if (state and state != "offline") or time.monotonic() > deadline:
                failed = self.systemctl("--failed", check=False).stdout
                raise MachineError(
                    f"boot ended {state or answer.stderr.strip()!r}:\n{failed}{self.console()}"
                )
            time.sleep(0.1)

    def _wait_for_leader(self) -> int:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise MachineError(
                    f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console()}"
                )
            for procs in self.cgroup_dir.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    # PID 1 of the guest, once it is systemd (before exec it is nspawn's child,
                    # not yet inside the final mount namespace).
                    if _namespaced_pid(int(pid)) == 1 and _comm(int(pid)) == "systemd":
                        return int(pid)
            time.sleep(0.05)
        raise MachineError(f"no container PID 1 appeared:\n{self.console()}")

    def console(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    # -- inside ----------------------------------------------------------------------------
    def run(self, *command: str, timeout: float = 120, check: bool = False) -> Result:
        """Run a command in all of the container's namespaces (as root, from its /)."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "-r", "-w", *command],
            env=GUEST_ENV,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise MachineError(
                f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True) -> Result:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", *(f"-p{p}" for p in properties), "--", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write(self, guest_path: str, text: str) -> None:
        """Write a file of the running guest (through the overlay, as the guest sees it)."""
        target = self.root / guest_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def result(self, name: str) -> dict:
        return json.loads((self.results / name).read_text())

    # -- tear-down -------------------------------------------------------------------------
    def stop(self) -> None:
        self._power_off()
        _remove_cgroup_tree(self.cgroup_dir)
        if self._mounted:
            subprocess.run(["umount", "--lazy", str(self.root)], check=False)
            self._mounted = False
        shutil.rmtree(self.work, ignore_errors=True)

    def _power_off(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.leader is not None:
                try:
                    os.kill(self.leader, signal.SIGRTMIN + 4)  # systemd: poweroff
                except ProcessLookupError:
                    pass
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()


def _namespaced_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        pass
    return None


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _remove_cgroup_tree(top: Path) -> None:
    """Kill what is left and remove the tree, deepest first."""
    for _ in range(100):
        if not top.exists():
            return
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for directory in [*dirs, top]:
            try:
                (directory / "cgroup.kill").write_text("1")
            except OSError:
                pass
            try:
                directory.rmdir()
            except OSError:
                pass
        time.sleep(0.05)
    raise MachineError(f"could not remove {top}")
