"""The re-apply's grace period, against the real kernel: apply empties the old slot only once
every bind program that may have read the old slot number has finished.

A bind program reads state.active and then looks up that slot's ports, sets and owners. If
apply cleared the old slot right after the flip, a program that read the old number just
before it could find its port gone (a stranger gets in) or its owner gone (the owner is kept
out). The natural window is a few hundred nanoseconds, far too short to hit on purpose, so a
test program (tests/kernel/hold.bpf.c, attached to a cgroup of the sandbox only) makes it as
long as needed: it enters a bind before the re-apply's flip and stays there, under
rcu_read_lock like every bind program, until the test lets it go. A real `portguard apply`
runs in its own process; it is started first and waits for the pin directory's lock, which
the test holds (as another apply would) until the bind is held, so the hold lasts only the
transaction. The test then reads the pinned maps and the apply process's kernel state
(/proc/PID/task/*/{stat,syscall}): the old slot must stay whole for as long as the held
program runs, and apply must come to a stop inside the kernel's grace period
(bpf(BPF_MAP_UPDATE_ELEM) on a map-in-map, asleep) after its flip. Only then is the program
released; apply must finish and the old slot be empty.

Nothing here is timed: the test waits for states, in whatever time they take. Without the grace
period (libbpf.wait_for_programs returning at once, or called after the first deletion from
the old slot) it fails on every run: apply then finishes, or deletes, while the held program
still runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guard.kernel import layout, libbpf, objects, slots
from guard.kernel.host import lock_path
from guard.kernel.pins import Maps, Pins
from tests.kernel.sandbox import PORTGUARD, REPO, in_netns, missing

pytestmark = pytest.mark.kernel

HOLD_SOURCE = Path(__file__).with_name("hold.bpf.c")
ENTERED, RELEASE, LEFT = 0, 1, 2
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
PORT, OTHER = 7661, 7662


class HeldBinds:
    """The hold program attached to one cgroup: binds of sockets made there wait inside it."""

    def __init__(self, state: libbpf.Map):
        self.state = state

    def count(self, key: int) -> int:
        return self.state.lookup(key) or 0

    def release(self) -> None:
        self.state.update(RELEASE, 1)


@contextlib.contextmanager
def held_binds(cgroup_dir: Path, build_dir: Path) -> Iterator[HeldBinds]:
    clang = objects.find_clang()
    if clang is None:
        missing("clang is needed to build the test's hold program")
    obj = build_dir / "hold.o"
    include = [f"-I/usr/include/{arch}"] if (arch := sysconfig.get_config_var("MULTIARCH")) else []
    subprocess.run(
        [clang, "-O2", "-g", "-target", objects.host_target(), *include, "-c", str(HOLD_SOURCE)]
        + ["-o", str(obj)],
        check=True,
    )
    bpf = libbpf.lib()
    handle = libbpf._open_object(obj)
    link = None
    held = None
    try:
        assert bpf.bpf_object__load(handle) == 0, libbpf.libbpf_log_tail()
        prog_fd = bpf.bpf_program__fd(libbpf._programs(handle)["hold"])
        map_fd = bpf.bpf_map__fd(bpf.bpf_object__find_map_by_name(handle, b"hold_state"))
        held = HeldBinds(libbpf.Map(map_fd, layout.U32, layout.U64))
        link = libbpf.attach_cgroup(prog_fd, cgroup_dir, libbpf.BIND_ATTACH_TYPES["bind4"])
        yield held
    finally:
        if held is not None:
            held.release()  # never leave a bind (and its CPU) waiting
        libbpf.close(link)
        bpf.bpf_object__close(handle)


def in_grace_period(pid: int) -> bool:
    """Whether a task of the process sleeps in bpf(BPF_MAP_UPDATE_ELEM) while the process
    holds a map-in-map: libbpf.wait_for_programs waiting for the kernel's RCU grace period."""
    sys_bpf = SYS_BPF.get(platform.machine())
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        asleep = False
        for tid in tasks:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            call = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            if (
                state == "D"
                and len(call) > 1
                and (sys_bpf is None or call[0] == str(sys_bpf))
                and int(call[1], 16) == BPF_MAP_UPDATE_ELEM
            ):
                asleep = True
        if not asleep:
            return False
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                    continue
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                if f"map_type:\t{BPF_MAP_TYPE_ARRAY_OF_MAPS}\n" in info:
                    return True
    except (FileNotFoundError, ProcessLookupError, IndexError):
        pass  # the process or task went away meanwhile
    return False


def waits_for_lock(pid: int, path: Path) -> bool:
    """Whether the process is blocked on a flock of the file (a "->" line of /proc/locks)."""
    # "1: -> FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"
    waiter = ["->", "FLOCK", "ADVISORY", "WRITE", str(pid), str(os.stat(path).st_ino)]
    return any(
        fields[1:6] + fields[6].rsplit(":", 1)[1:] == waiter
        for line in Path("/proc/locks").read_text().splitlines()
        if len(fields := line.split()) > 6
    )


def test_reapply_empties_the_old_slot_only_after_a_bind_running_at_the_flip_has_finished(
    sandbox, tmp_path
):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "a"))
    sandbox.cli("apply")
    new_config = sandbox.work / "new.toml"
    sandbox.write_config(sandbox.owner_block([f"{OTHER}/tcp"], "b"))
    new_config.write_text(sandbox.config_path.read_text())
    maps = Maps.open_pinned(Pins(sandbox.pin_dir).maps_dir)
    assert maps is not None
    holder_dir = sandbox.cgroup_root / sandbox.cgroup("holder").lstrip("/")
    try:
        old = maps.active
        before = slots.read_slot(maps, old)
        assert before.ports and before.sets and before.paths
        with (
            held_binds(holder_dir, tmp_path) as held,
            open(lock_path(sandbox.pin_dir), "w") as lock,
        ):
            # The hold must begin after every fork: a process moving between cgroups meanwhile
            # (any, anywhere) waits for a grace period, and forks wait for it. So apply starts
            # first and waits for the pin directory's lock, held here as by another apply; the
            # binder is placed; only then does the bind enter the hold and the lock go.
            fcntl.flock(lock, fcntl.LOCK_EX)
            apply = subprocess.Popen(
                [*in_netns(sandbox.netns), *PORTGUARD, "--config", str(new_config), "apply"],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            sandbox.children.append(apply)
            while not waits_for_lock(apply.pid, Path(lock.name)):
                assert apply.poll() is None, f"apply ended before it took the lock: {apply}"
                time.sleep(0.002)
            binder = sandbox.start("holder", "bind", [["v4", "tcp", 0]])
            while not held.count(ENTERED):
                assert binder.poll() is None, f"the bind never reached the hold program: {binder}"
                time.sleep(0.001)
            fcntl.flock(lock, fcntl.LOCK_UN)
            while True:
                finished = apply.poll() is not None
                waiting = not finished and in_grace_period(apply.pid)
                now = slots.read_slot(maps, old)
                flipped = maps.active != old
                # read last: when 0, the held program was running through every read above
                if held.count(LEFT):
                    pytest.fail(
                        "the held bind gave up (about 8 s) before apply reached its grace "
                        "period: nothing shown either way"
                    )
                assert now == before, (
                    f"apply {'finished, having' if finished else 'has'} changed the old slot "
                    f"(flipped: {flipped}) while a bind that began before the flip still runs"
                )
                assert not finished, (
                    "apply finished while a bind that began before its flip still runs: "
                    f"it never waited for the grace period\n{apply.stderr.read()}"
                )
                if waiting:
                    break
                time.sleep(0.002)
            # asleep in the grace period: after the flip, before any deletion from the old slot
            assert flipped and maps.active != old
            assert slots.read_slot(maps, old) == before
            held.release()
            _, err = apply.communicate(timeout=300)
            assert apply.returncode == 0, err
            assert held.count(LEFT) == 1
            assert binder.communicate(timeout=60)[0].strip() == '{"v4/tcp/0": 0}'
        assert slots.read_slot(maps, old) == slots.SlotContents({}, {}, {})
        assert set(slots.read_slot(maps, maps.active).ports) == {(layout.PROTOCOLS["tcp"], OTHER)}
    finally:
        maps.close()
