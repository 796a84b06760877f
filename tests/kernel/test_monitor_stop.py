"""The monitor stops on SIGINT/SIGTERM whatever the event rate, and accounts on the way out for
every bind refused since it started: shown + lost + left in the buffer = refused."""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import time

import pytest

from tests.kernel.sandbox import PORTGUARD, REPO, in_netns

PORT = 7651
STOPS = 10  # per signal; the issue saw SIGTERM ignored in 4 of 40 runs
SUMMARY = re.compile(
    r"portguard: (\d+) events, (\d+) lost(?: \(\d+ from before the start\))?"
    r"(?:, (\d+) not shown \(still in the event buffer at exit\))?"
    r"; (\d+) binds refused since the start"
)


def applied(sandbox):
    sandbox.write_config(sandbox.owner_block([f"{PORT}"], "owner"))
    sandbox.cli("apply")


def summary_of(stderr: str) -> tuple[int, int, int, int]:
    match = SUMMARY.search(stderr)
    assert match, stderr
    shown, lost, left, refused = match.groups()
    return int(shown), int(lost), int(left or 0), int(refused)


def wait_for_output(path, proc, timeout=60.0) -> None:
    """Until the monitor has written something (bounded loop)."""
    deadline = time.monotonic() + timeout
    while path.stat().st_size == 0:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no event reached the monitor"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_monitor_stops_on_a_signal_under_a_flood_with_exit_0_and_no_traceback(sandbox, signum):
    applied(sandbox)
    stop_file = sandbox.work / "stop-stranger"
    stranger = sandbox.start("stranger", "loop", ["v4", "tcp", PORT, str(stop_file)])
    assert stranger.stdout.readline().strip() == "ready"
    waits = []
    try:
        for _ in range(STOPS):
            proc, out = sandbox.monitor("--json")
            wait_for_output(out, proc)
            sent = time.monotonic()
            proc.send_signal(signum)
            # generous: shows "stopped on the signal", not the 90 s of a SIGKILL timeout
            proc.wait(timeout=30)
            waits.append(time.monotonic() - sent)
            err = proc.stderr.read()
            assert proc.returncode == 0, err
            assert "Traceback" not in err and "Exception ignored" not in err, err
            assert f"stopped by {signum.name}" in err
            shown, lost, left, refused = summary_of(err)
            events = out.read_text().splitlines()
            assert shown == sum(1 for e in events if "lost" not in json.loads(e))
            assert shown > 0
    finally:
        stop_file.touch()
        stranger.wait(timeout=60)
    print(f"{signum.name} stop latencies under a flood: " + ", ".join(f"{w:.3f}" for w in waits))


def test_records_left_in_the_buffer_at_exit_are_counted_not_forgotten(sandbox):
    applied(sandbox)
    stall = sandbox.work / "never"
    proc, out = sandbox.monitor("--json", "--stall-until", str(stall))
    result = sandbox.run("stranger", "repeat", ["v4", "tcp", PORT, 500])
    assert result["fail"] == 500
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    shown, lost, left, refused = summary_of(err)
    assert refused == 500
    assert (shown, lost, left) == (0, 0, 500)
    assert out.read_text() == ""


def test_monitor_whose_reader_went_away_exits_0_and_counts_the_rest(sandbox):
    applied(sandbox)
    cmd = [*in_netns(sandbox.netns), *PORTGUARD, "--config", str(sandbox.config_path), "monitor"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sandbox.children.append(proc)
    assert "monitoring" in proc.stderr.readline()
    assert proc.stdout.readline().startswith("TIME")
    proc.stdout.close()  # `portguard monitor | head -1`
    result = sandbox.run("stranger", "repeat", ["v4", "tcp", PORT, 300])
    assert result["fail"] == 300
    proc.wait(timeout=60)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "stopped by output closed" in err
    shown, lost, left, refused = summary_of(err)
    # it stopped at its first write that failed: what it counted adds up, the rest is the
    # kernel's counter's (status)
    assert 1 <= refused <= 300 and shown + lost + left == refused


def journal_entries(sock: socket.socket) -> list[dict]:
    entries = []
    sock.setblocking(False)
    while True:
        try:
            raw = sock.recv(65536)
        except BlockingIOError:
            return entries
        entries.append(dict(line.split("=", 1) for line in raw.decode().splitlines()))


def test_journal_gets_one_entry_per_caller_port_and_interval_with_exact_counts(sandbox):
    sandbox.write_config(sandbox.owner_block([f"{PORT}"], "owner"), journal_interval=3600)
    sandbox.cli("apply")
    journal_path = sandbox.work / "journal.socket"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(journal_path))
    try:
        proc, _ = sandbox.monitor("--journal", env={"PORTGUARD_JOURNAL_SOCKET": str(journal_path)})
        sandbox.run("stranger/a", "repeat", ["v4", "tcp", PORT, 2000])
        sandbox.run("stranger/b", "repeat", ["v6", "udp", PORT, 300])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        err = proc.stderr.read()
        assert proc.returncode == 0, err
        shown, lost, left, refused = summary_of(err)
        assert refused == 2300 and lost == left == 0
        entries = journal_entries(journal)
    finally:
        journal.close()
    by_caller = {}
    for entry in entries:
        by_caller.setdefault(entry["PORTGUARD_CGROUP"], []).append(entry)
    a, b = by_caller[f"{sandbox.top}/stranger/a"], by_caller[f"{sandbox.top}/stranger/b"]
    assert len(entries) == 4  # per caller: the first refusal, and one for the rest at exit
    assert "PORTGUARD_SUPPRESSED" not in a[0] and int(a[1]["PORTGUARD_SUPPRESSED"]) == 1999
    assert "PORTGUARD_SUPPRESSED" not in b[0] and int(b[1]["PORTGUARD_SUPPRESSED"]) == 299
    assert a[1]["MESSAGE"].startswith(f"refused 1999 more binds of 127.0.0.1:{PORT}/tcp in ")


def test_monitor_in_a_pid_namespace_shows_the_callers_pid_as_that_namespace_numbers_it(sandbox):
    applied(sandbox)
    out, pidfile = sandbox.work / "events.json", sandbox.work / "stranger.pid"
    stop = sandbox.work / "stop-loop"
    stranger = " ".join(
        shlex.quote(a)
        for a in sandbox._child_cmd("stranger", "loop", ["v4", "tcp", PORT, str(stop)], None)
    )
    monitor = " ".join(
        shlex.quote(a)
        for a in [
            *PORTGUARD,
            "--config",
            str(sandbox.config_path),
            "monitor",
            "--json",
            "--count",
            "20",
        ]
    )
    script = (
        f"{stranger} >/dev/null & echo $! > {pidfile}; "
        f"{monitor} > {out}; status=$?; touch {stop}; wait; exit $status"
    )
    proc = subprocess.run(
        [
            *in_netns(sandbox.netns),
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "sh",
            "-c",
            script,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    local = int(pidfile.read_text())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    events = [e for e in lines if "lost" not in e]  # the buffer may overflow before the start
    assert events
    assert {e["pid"] for e in events} == {local}  # the namespace's own number (small)
    assert all(e["host_pid"] != local for e in events)
