"""Kernel tests for guard.holders: real sockets in real cgroups, read back through sock_diag.

Children run in a private cgroup subtree (``portguard-test-holders-<random>``) and bind loopback
ports in the current network namespace: the holders query cannot be pointed at another netns.
Ports are picked by the children at random in 40000-49999 and retried when taken, so a busy
machine does not make the tests flaky.
"""

from __future__ import annotations

import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guard.kernel.cgroups import CgroupError, cgroup2_mount
from guard.observe.holders import Holder, holders

pytestmark = pytest.mark.kernel

# Binds the sockets named in argv ("tcp4", "tcp6", "udp4", "udp6", "tcp4-bound" for a TCP socket
# that is bound but never listens), prints their ports on one line, then obeys "close N" lines
# on stdin until stdin closes. The comm is set so the test can tell it from any other python.
CHILD = r"""
import ctypes, errno, random, socket, sys

ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME
sockets = []
for spec in sys.argv[2:]:
    kind, family = spec[:3], spec[3]
    af, address = (socket.AF_INET, "127.0.0.1") if family == "4" else (socket.AF_INET6, "::1")
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    for _ in range(200):
        sock = socket.socket(af, sock_type)
        try:
            sock.bind((address, random.randrange(40000, 50000)))
            break
        except OSError as error:
            sock.close()
            if error.errno != errno.EADDRINUSE:
                raise
    else:
        sys.exit("no free port")
    if kind == "tcp" and not spec.endswith("-bound"):
        sock.listen()
    sockets.append(sock)
print(" ".join(str(sock.getsockname()[1]) for sock in sockets), flush=True)
for line in sys.stdin:
    command, index = line.split()
    if command == "close":
        sockets[int(index)].close()
        print("closed", flush=True)
"""


def _missing(reason: str) -> None:
    """Skip for a missing prerequisite, but fail under CI where a skip would hide a gap."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"kernel test prerequisite missing in CI: {reason}")
    pytest.skip(reason)


@dataclass
class Child:
    """A process holding sockets; ``ports`` in the order the specs were given."""

    process: subprocess.Popen[str]
    comm: str
    ports: list[int]

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self, index: int) -> None:
        """Close one of the child's sockets and wait until it has."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"close {index}\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "closed"


@pytest.fixture(scope="session")
def cgroup2_root() -> Path:
    if os.geteuid() != 0:
        _missing("needs root")
    try:
        root = Path(cgroup2_mount())
    except CgroupError:
        _missing("no cgroup2 file system mounted")
    return root


@pytest.fixture
def test_cgroup(cgroup2_root: Path) -> Iterator[Path]:
    """A private cgroup subtree, emptied and removed afterwards whatever happened."""
    path = cgroup2_root / f"portguard-test-holders-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        _remove_cgroup_tree(path)


def _remove_cgroup_tree(path: Path) -> None:
    """Kill whatever is left in a cgroup subtree and remove it, deepest first."""
    for directory in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [path]:
        if not directory.is_dir():
            continue
        for pid in (directory / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(100):
            try:
                directory.rmdir()
                break
            except OSError:  # EBUSY until the killed processes are reaped
                time.sleep(0.01)
        else:
            directory.rmdir()


@pytest.fixture
def spawn(test_cgroup: Path) -> Iterator[Callable[..., Child]]:
    """Start children that bind sockets from inside a sub-cgroup of the test cgroup."""
    children: list[subprocess.Popen[str]] = []

    def start(*specs: str, cgroup: str = "holder.service") -> Child:
        directory = test_cgroup / cgroup
        directory.mkdir(exist_ok=True)
        procs = directory / "cgroup.procs"

        def join_cgroup() -> None:
            # In the child before exec, so every socket it creates belongs to this cgroup.
            procs.write_text(str(os.getpid()))

        comm = f"pg-hold-{secrets.token_hex(3)}"
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, comm, *specs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=join_cgroup,
        )
        children.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, f"child exited early with {process.wait()}"
        return Child(process, comm, [int(port) for port in line.split()])

    try:
        yield start
    finally:
        for process in children:
            process.kill()
            process.wait()


def _of(child: Child, found: list[Holder]) -> list[Holder]:
    return [holder for holder in found if holder.pid == child.pid]


def test_reports_tcp_and_udp_holders_on_both_families(spawn, test_cgroup, cgroup2_root):
    child = spawn("tcp4", "tcp6", "udp4", "udp6")
    tcp4, tcp6, udp4, udp6 = child.ports
    expected = {
        (tcp4, "tcp", socket.AF_INET, "127.0.0.1"),
        (tcp6, "tcp", socket.AF_INET6, "::1"),
        (udp4, "udp", socket.AF_INET, "127.0.0.1"),
        (udp6, "udp", socket.AF_INET6, "::1"),
    }

    found = holders([(port, protocol) for port, protocol, _, _ in expected])

    assert {(h.port, h.protocol, h.family, h.address) for h in found} == expected
    cgroup = "/" + str((test_cgroup / "holder.service").relative_to(cgroup2_root))
    for holder in found:
        assert holder.pid == child.pid
        assert holder.comm == child.comm
        assert holder.cgroup == cgroup
        assert holder.cgroup_id == (test_cgroup / "holder.service").stat().st_ino
        assert holder.unit == "holder.service"
        assert holder.inode > 0


def test_unfiltered_query_includes_the_children(spawn):
    child = spawn("tcp4", "udp6")

    found = _of(child, holders())

    assert {(h.port, h.protocol) for h in found} == {
        (child.ports[0], "tcp"),
        (child.ports[1], "udp"),
    }


def test_closed_socket_is_no_longer_reported(spawn):
    child = spawn("tcp4", "udp4")
    ports = [(child.ports[0], "tcp"), (child.ports[1], "udp")]
    assert len(_of(child, holders(ports))) == 2

    child.close(0)

    assert [(h.port, h.protocol) for h in _of(child, holders(ports))] == [ports[1]]


def test_port_filter_matches_port_and_protocol(spawn):
    child = spawn("tcp4", "udp4")
    tcp_port, udp_port = child.ports

    assert [(h.port, h.protocol) for h in _of(child, holders([(tcp_port, "tcp")]))] == [
        (tcp_port, "tcp")
    ]
    assert _of(child, holders([(udp_port, "tcp"), (tcp_port, "udp")])) == []
    assert _of(child, holders([])) == []


def test_bound_but_not_listening_tcp_is_reported(spawn):
    release = re.match(r"(\d+)\.(\d+)", platform.release())
    if release and (int(release[1]), int(release[2])) < (6, 3):
        pytest.skip("sock_diag dumps bound-only TCP sockets since Linux 6.3")
    child = spawn("tcp4-bound", "tcp6-bound")

    found = _of(child, holders([(child.ports[0], "tcp"), (child.ports[1], "tcp")]))

    assert {(h.port, h.family) for h in found} == {
        (child.ports[0], socket.AF_INET),
        (child.ports[1], socket.AF_INET6),
    }


def test_cgroup_is_where_the_socket_was_created_not_where_the_process_is_now(
    spawn, test_cgroup, cgroup2_root
):
    # The kernel stamps a socket with its creator's cgroup; moving the process later does not
    # change it. Whoever compares holders to owners must know this.
    child = spawn("tcp4", cgroup="first.service")
    moved_to = test_cgroup / "second.service"
    moved_to.mkdir()
    (moved_to / "cgroup.procs").write_text(str(child.pid))

    [holder] = holders([(child.ports[0], "tcp")])

    assert holder.pid == child.pid
    assert holder.cgroup == "/" + str((test_cgroup / "first.service").relative_to(cgroup2_root))
    assert holder.unit == "first.service"


def test_socket_whose_cgroup_was_removed_has_no_cgroup_path(spawn, test_cgroup):
    child = spawn("udp4", cgroup="gone.service")
    (test_cgroup / "kept").mkdir()
    (test_cgroup / "kept" / "cgroup.procs").write_text(str(child.pid))
    (test_cgroup / "gone.service").rmdir()

    [holder] = holders([(child.ports[0], "udp")])

    assert holder.pid == child.pid
    assert holder.cgroup_id != 0
    assert holder.cgroup is None
    assert holder.unit is None
