"""READY=1 for systemd (portguard.service is Type=notify): `portguard apply` says it only once
the guard is in force, and before it keeps its records; the unchanged re-apply says it too; a
failure before the guard is in force says nothing, one after it still ends apply with exit 1.

The notify socket here is a path (an abstract name belongs to one network namespace, and apply
runs in the sandbox's). Its queue is filled first, so that apply's READY=1 waits in sendto()
until the test reads: what holds while it waits is what holds when systemd hears it.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

import pytest

from guard import paths
from tests.kernel.sandbox import PORTGUARD, REPO, in_netns
from tests.kernel.test_quick_reapply import FULL, apply, write

pytestmark = pytest.mark.kernel

PORT = 7691
CASES = [("v4", "tcp", PORT), ("v6", "tcp", PORT)]


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    yield sock
    sock.close()


def clog(receiver: socket.socket) -> int:
    """Fill the receiver's queue (net.unix.max_dgram_qlen datagrams): the next sender waits."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    sent = 0
    try:
        while True:
            sender.sendto(b"clog", receiver.getsockname())
            sent += 1
    except BlockingIOError:
        return sent
    finally:
        sender.close()


def heard(receiver: socket.socket) -> list[bytes]:
    """What is waiting on the socket (apply has exited)."""
    messages = []
    receiver.setblocking(False)
    try:
        while True:
            messages.append(receiver.recv(64))
    except BlockingIOError:
        return messages


def start_apply(sandbox, receiver: socket.socket, code: str | None = None) -> subprocess.Popen:
    command = [*PORTGUARD, "--config", str(sandbox.config_path), "apply"]
    if code is not None:
        command = [sys.executable, "-c", code]
    return subprocess.Popen(
        [*in_netns(sandbox.netns), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "NOTIFY_SOCKET": receiver.getsockname(), **FULL},
    )


def refused(sandbox) -> bool:
    return set(sandbox.bind("stranger", CASES).values()) == {errno.EADDRINUSE}


def records(sandbox) -> list[str]:
    kept = [paths.plan_record(str(sandbox.config_path)), paths.guard_record(str(sandbox.pin_dir))]
    return [path for path in kept if os.path.exists(path)]


def test_ready_comes_once_the_stranger_is_refused_and_before_the_records(sandbox, receiver):
    sandbox.cgroup("owner")
    write(sandbox, [str(PORT)])
    clogged = clog(receiver)
    applying = start_apply(sandbox, receiver)
    try:
        deadline = time.monotonic() + 60
        while not refused(sandbox):  # the guard comes into force while READY=1 cannot go
            assert applying.poll() is None, applying.communicate()
            assert time.monotonic() < deadline, "the guard never came into force"
            time.sleep(0.05)
        time.sleep(0.3)
        assert applying.poll() is None, "apply went on without saying READY=1"
        assert records(sandbox) == [], "records were kept before READY=1"
        assert [receiver.recv(64) for _ in range(clogged)] == [b"clog"] * clogged
        assert receiver.recv(64) == b"READY=1"  # apply's, now that there is room
        out, err = applying.communicate(timeout=60)
    finally:
        applying.kill()
        applying.wait()
    assert applying.returncode == 0, err
    assert heard(receiver) == []  # once
    assert out.startswith("portguard: "), out
    assert len(records(sandbox)) == 2  # the compiled plan and the guard record, after READY=1
    assert refused(sandbox)
    assert sandbox.bind("owner", CASES) == {f"{f}/{t}/{p}": 0 for f, t, p in CASES}


def test_the_unchanged_re_apply_says_ready_too(sandbox, receiver):
    sandbox.cgroup("owner")
    write(sandbox, [str(PORT)])
    _, full = apply(sandbox)
    assert full
    said, full = apply(sandbox, env={"NOTIFY_SOCKET": receiver.getsockname()})
    assert not full and "portguard: unchanged" in said, said
    assert heard(receiver) == [b"READY=1"]


def test_a_failure_before_the_guard_is_in_force_says_nothing(sandbox, receiver):
    sandbox.config_path.write_text("[[reserve]]\nports = [\n")  # broken: nothing is applied
    applying = start_apply(sandbox, receiver)
    out, err = applying.communicate(timeout=60)
    assert applying.returncode == 2, err
    assert heard(receiver) == []
    assert not refused(sandbox)


def test_a_failure_after_the_guard_is_in_force_still_fails_apply(sandbox, receiver):
    """READY=1 was said and the guard stays; exit 1 and the sentence still say what failed."""
    sandbox.cgroup("owner")
    write(sandbox, [str(PORT)])
    code = (
        "import sys\n"
        "from guard import commands, entry\n"
        "from guard.errors import GuardError\n"
        "def scan(plan):\n"
        "    raise GuardError('the squatter scan broke')\n"
        "commands.squatters_of_plan = scan\n"
        f"sys.exit(entry.run_apply({str(sandbox.config_path)!r}))\n"
    )
    applying = start_apply(sandbox, receiver, code)
    out, err = applying.communicate(timeout=60)
    assert applying.returncode == 1, err
    assert "Error: the guard is in force, but the squatter scan broke" in err
    assert heard(receiver) == [b"READY=1"]
    assert refused(sandbox)
    status = sandbox.cli("status", check=False)
    assert "the squatter scan broke" in status.stdout + status.stderr
