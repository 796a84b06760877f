"""Seeing the guard at work against the real kernel: denial counters, monitor events and
losses, holders and squatters, audit mode."""

from __future__ import annotations

import errno
import json
import socket
import sys
from pathlib import Path

import pytest

from guard.kernel import cgroups

PORT = 7641
FREE = 7642
RING_BYTES = 256 * 1024
RECORD_BYTES = 72 + 8  # struct pg_event plus the ring buffer's record header


def applied(sandbox, ports=(f"{PORT}",), owners=("owner",), **guard):
    sandbox.write_config(sandbox.owner_block(list(ports), *owners), **guard)
    return sandbox.cli("apply")


def denied(sandbox, port=PORT, protocol="tcp") -> int:
    for res in sandbox.status()["reservations"]:
        if (res["port"], res["protocol"]) == (port, protocol):
            return res["denied"]
    raise AssertionError(f"{port}/{protocol} is not reserved")


def repeat_in_parallel(sandbox, jobs: list[tuple[str, str, str, int]], port=PORT) -> list[dict]:
    """Each job (cgroup, family, protocol, n) binds port n times, all jobs at once."""
    children = [
        sandbox.start(cgroup, "repeat", [fam, proto, port, n]) for cgroup, fam, proto, n in jobs
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def finish(monitor) -> tuple[list[dict], str]:
    proc, out = monitor
    proc.wait(timeout=300)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.read_text().splitlines()], err


# ---- counters -------------------------------------------------------------------------------


def test_denied_counter_equals_the_refused_binds_of_several_parallel_processes(sandbox):
    applied(sandbox)
    jobs = [
        ("stranger/a", "v4", "tcp", 2500),
        ("stranger/b", "dual", "tcp", 2500),
        ("stranger/c", "v6", "tcp", 2500),
        ("stranger/d", "mapped", "tcp", 2500),
        ("owner", "v4", "tcp", 2000),
    ]
    results = repeat_in_parallel(sandbox, jobs)
    strangers, owner = results[:4], results[4]
    assert sum(r["fail"] for r in strangers) == 10_000
    assert all(r["errors"] == {str(errno.EADDRINUSE): 2500} for r in strangers)
    assert owner == {**owner, "ok": 2000, "fail": 0}
    assert denied(sandbox) == 10_000
    assert denied(sandbox, protocol="udp") == 0


def test_counters_are_kept_by_a_reapply_that_keeps_the_port(sandbox):
    applied(sandbox, ports=(f"{PORT}/tcp",))
    repeat_in_parallel(sandbox, [("stranger", "v4", "tcp", 100)])
    applied(sandbox, ports=(f"{PORT}/tcp", f"{FREE}/tcp"), deny_errno="EACCES")
    assert denied(sandbox) == 100
    repeat_in_parallel(sandbox, [("stranger", "v6", "tcp", 50)])
    assert denied(sandbox) == 150
    # a port given up and reserved again starts from zero
    applied(sandbox, ports=(f"{FREE}/tcp",))
    applied(sandbox, ports=(f"{PORT}/tcp",))
    assert denied(sandbox) == 0


# ---- monitor --------------------------------------------------------------------------------


def test_monitor_receives_every_denial_with_its_fields(sandbox):
    applied(sandbox)
    monitor = sandbox.monitor("--json", "--count", "500")
    v4, v6 = repeat_in_parallel(
        sandbox, [("stranger", "v4", "tcp", 300), ("stranger/sub", "v6", "udp", 200)]
    )
    events, err = finish(monitor)
    assert "0 lost" in err
    assert len(events) == 500 and not [e for e in events if "lost" in e]
    common = {"port": PORT, "uid": 0, "owners": [f"{sandbox.top}/owner"], "verdict": "denied"}
    by_pid = {
        v4["pid"]: {
            **common,
            "protocol": "tcp",
            "family": "ipv4",
            "address": "127.0.0.1",
            "cgroup": f"{sandbox.top}/stranger",
            "cgroup_id": sandbox.cgroup_id("stranger"),
        },
        v6["pid"]: {
            **common,
            "protocol": "udp",
            "family": "ipv6",
            "address": "::1",
            "cgroup": f"{sandbox.top}/stranger/sub",
            "cgroup_id": sandbox.cgroup_id("stranger/sub"),
        },
    }
    for event in events:
        expected = by_pid[event["pid"]]
        assert {k: event[k] for k in expected} == expected
        assert event["comm"] == Path(sys.executable).name[:15]  # the sandbox's children exec it
    assert sorted(e["pid"] for e in events) == sorted([v4["pid"]] * 300 + [v6["pid"]] * 200)


def test_monitor_reports_lost_events_when_its_buffer_overflows(sandbox):
    applied(sandbox)
    total = 10_000
    assert total > RING_BYTES // RECORD_BYTES
    stall = sandbox.work / "consume"
    monitor = sandbox.monitor("--json", "--count", str(total), "--stall-until", str(stall))
    repeat_in_parallel(
        sandbox, [("stranger/a", "v4", "tcp", total // 2), ("stranger/b", "v6", "tcp", total // 2)]
    )
    stall.touch()
    events, err = finish(monitor)
    received = [e for e in events if "lost" not in e]
    lost = sum(e["lost"] for e in events if "lost" in e)
    assert lost > 0
    assert len(received) + lost == total == denied(sandbox)
    assert f"{len(received)} events, {lost} lost" in err
    assert sandbox.status()["lost_events"] == lost


def test_monitor_prints_aligned_lines_that_fit_100_columns(sandbox):
    applied(sandbox)
    monitor = sandbox.monitor("--count", "2")
    sandbox.bind("stranger", [("v4", "tcp", PORT), ("mapped", "udp", PORT)])
    proc, out = monitor
    proc.wait(timeout=60)
    lines = out.read_text().splitlines()
    assert lines[0].split() == [
        "TIME",
        "PID",
        "COMM",
        "UID",
        "CGROUP/UNIT",
        "PROT",
        "ADDR:PORT",
        "OWNER(S)",
        "VERDICT",
    ]
    assert len(lines) == 3 and all(len(line) <= 100 for line in lines)
    assert " tcp4 " in lines[1] and f"127.0.0.1:{PORT}" in lines[1] and lines[1].endswith("denied")
    assert " udp6 " in lines[2] and "/stranger" in lines[2] and "owner" in lines[2]
    assert len({line.index("VERDICT" if i == 0 else "denied") for i, line in enumerate(lines)}) == 1


def test_monitor_logs_structured_journal_entries(sandbox):
    applied(sandbox, ports=(f"{PORT}/udp",))
    journal_path = sandbox.work / "journal.socket"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(journal_path))
    try:
        monitor = sandbox.monitor(
            "--journal", "--count", "1", env={"PORTGUARD_JOURNAL_SOCKET": str(journal_path)}
        )
        sandbox.bind("stranger", [("v4", "udp", PORT)])
        finish(monitor)
        journal.settimeout(30)
        entry = journal.recv(65536)
    finally:
        journal.close()
    fields = dict(line.split("=", 1) for line in entry.decode().splitlines())
    assert fields["PORTGUARD_PORT"] == str(PORT) and fields["PORTGUARD_PROTOCOL"] == "udp"
    assert fields["PORTGUARD_VERDICT"] == "denied" and fields["PRIORITY"] == "4"
    assert fields["PORTGUARD_CGROUP"] == f"{sandbox.top}/stranger"
    assert fields["PORTGUARD_OWNER"] == f"{sandbox.top}/owner"
    assert fields["SYSLOG_IDENTIFIER"] == "portguard"
    assert fields["OBJECT_PID"] == fields["PORTGUARD_PID"]
    assert fields["MESSAGE"].startswith(f"refused bind of 127.0.0.1:{PORT}/udp by pid ")


def test_monitor_without_a_journal_says_so(sandbox):
    applied(sandbox)
    proc = sandbox.cli(
        "monitor",
        "--journal",
        "--count",
        "1",
        check=False,
        env={"PORTGUARD_JOURNAL_SOCKET": str(sandbox.work / "none")},
    )
    assert proc.returncode == 1
    assert "no systemd journal" in proc.stderr and "Traceback" not in proc.stderr


def test_a_second_monitor_is_refused(sandbox):
    applied(sandbox)
    first = sandbox.monitor("--count", "1")
    second = sandbox.cli("monitor", "--count", "1", check=False)
    assert second.returncode == 1 and "single reader" in second.stderr
    sandbox.bind("stranger", [("v4", "tcp", PORT)])
    first[0].wait(timeout=60)


def test_monitor_before_apply_is_one_clear_sentence(sandbox):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    proc = sandbox.cli("monitor", "--count", "1", check=False)
    assert proc.returncode == 1
    assert "not loaded" in proc.stderr and "Traceback" not in proc.stderr


# ---- holders and squatters ------------------------------------------------------------------


def hold(sandbox, cgroup: str, fam="v4", proto="tcp", port=PORT) -> int:
    child = sandbox.start(cgroup, "hold", [fam, proto, port])
    line = child.stdout.readline()
    assert line, child.stderr.read()
    return json.loads(line)["pid"]


def test_squatter_bound_before_apply_is_named_by_apply_and_status_exits_3(sandbox):
    squatter = hold(sandbox, "stranger")
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp"], "owner"))
    apply = sandbox.cli("apply")
    assert f"port {PORT}/tcp is held by pid {squatter}" in apply.stderr
    assert f"in cgroup {sandbox.top}/stranger" in apply.stderr
    proc = sandbox.cli("status", "--json", check=False)
    assert proc.returncode == 3
    [holder] = json.loads(proc.stdout)["reservations"][0]["holders"]
    assert holder["pid"] == squatter and holder["owner"] is False
    assert holder["cgroup"] == f"{sandbox.top}/stranger" and holder["comm"]
    text = sandbox.cli("status", check=False)
    assert text.returncode == 3 and "SQUATTER" in text.stdout and str(squatter) in text.stdout
    assert all(len(line) <= 100 for line in text.stdout.splitlines())


def test_owner_holding_its_port_is_no_squatter_until_moved_out(sandbox):
    applied(sandbox, ports=(f"{PORT}/tcp",))
    owner = hold(sandbox, "owner/worker", fam="v6")
    proc = sandbox.cli("status", "--json", check=False)
    assert proc.returncode == 0
    [holder] = json.loads(proc.stdout)["reservations"][0]["holders"]
    assert holder == {
        **holder,
        "pid": owner,
        "owner": True,
        "cgroup": f"{sandbox.top}/owner/worker",
        "family": "ipv6",
        "address": "::1",
    }
    # moved out of the owner's cgroup with the port still open: now a squatter
    procs = Path(
        cgroups.directory(sandbox.cgroup("elsewhere"), sandbox.cgroup_root), "cgroup.procs"
    )
    procs.write_text(str(owner))
    proc = sandbox.cli("status", "--json", check=False)
    assert proc.returncode == 3
    [holder] = json.loads(proc.stdout)["reservations"][0]["holders"]
    assert holder["owner"] is False and holder["cgroup"] == f"{sandbox.top}/elsewhere"
    assert holder["socket_cgroup"] == f"{sandbox.top}/owner/worker"


def test_squatter_moved_into_the_owner_cgroup_stays_a_squatter(sandbox):
    # Its socket was created outside the owner: only INET_DIAG_CGROUP_ID tells (read from the
    # raw sock_diag reply).
    squatter = hold(sandbox, "stranger")
    applied(sandbox, ports=(f"{PORT}/tcp",))
    procs = Path(cgroups.directory(sandbox.cgroup("owner"), sandbox.cgroup_root), "cgroup.procs")
    procs.write_text(str(squatter))
    proc = sandbox.cli("status", "--json", check=False)
    assert proc.returncode == 3
    [holder] = json.loads(proc.stdout)["reservations"][0]["holders"]
    assert holder["pid"] == squatter and holder["owner"] is False
    assert holder["cgroup"] == f"{sandbox.top}/owner"
    assert holder["socket_cgroup"] == f"{sandbox.top}/stranger"


def test_status_outside_the_guarded_namespace_shows_no_holders(sandbox):
    hold(sandbox, "stranger")
    applied(sandbox, ports=(f"{PORT}/tcp",))
    proc = sandbox.cli("status", "--json", check=False, netns=None)
    assert proc.returncode == 0
    state = json.loads(proc.stdout)
    assert state["holders_checked"] is False and state["reservations"][0]["holders"] == []


# ---- audit mode -----------------------------------------------------------------------------


def test_audit_mode_allows_counts_and_reports_with_verdict_audit(sandbox):
    applied(sandbox, mode="audit")
    assert sandbox.status()["mode"] == "audit"
    monitor = sandbox.monitor("--json", "--count", "40")
    [result] = repeat_in_parallel(sandbox, [("stranger", "dual", "udp", 40)])
    assert result["ok"] == 40 and result["fail"] == 0
    events, _ = finish(monitor)
    assert [e["verdict"] for e in events] == ["audit"] * 40
    assert {e["pid"] for e in events} == {result["pid"]}
    assert denied(sandbox, protocol="udp") == 40
    assert set(sandbox.bind("owner", [("v4", "udp", PORT)]).values()) == {0}
    assert denied(sandbox, protocol="udp") == 40


def test_switching_between_audit_and_enforce_by_reapply_is_atomic(sandbox):
    # While a stranger binds in a loop and the mode flips back and forth, every one of its
    # binds is counted exactly once, whichever mode it met; the owner is never refused.
    stop = sandbox.work / "stop"
    configs = []
    for mode in ("enforce", "audit"):
        sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"), mode=mode)
        path = sandbox.work / f"{mode}.toml"
        path.write_text(sandbox.config_path.read_text())
        configs.append(path)
    sandbox.cli("apply", config=configs[0])
    stranger = sandbox.start("stranger", "loop", ["v4", "tcp", PORT, str(stop)])
    owner = sandbox.start("owner", "loop", ["v6", "tcp", PORT, str(stop)])
    for child in (stranger, owner):
        assert child.stdout.readline().strip() == "ready"
    for i in range(10):
        sandbox.cli("apply", config=configs[(i + 1) % 2])
        assert sandbox.status()["mode"] == ("audit", "enforce")[i % 2]
    stop.touch()
    s = json.loads(stranger.communicate(timeout=60)[0].strip().splitlines()[-1])
    o = json.loads(owner.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert s["ok"] > 0 and s["fail"] > 0
    assert set(map(int, s["errors"])) == {errno.EADDRINUSE}
    assert s["ok"] + s["fail"] == denied(sandbox)
    assert o["fail"] == 0 and o["ok"] > 0


# ---- status when the guard is not what the configuration asks for -----------------------------


def test_status_exits_4_and_says_why_when_the_last_apply_failed(sandbox):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"), cgroup="/portguard-no-such")
    failed = sandbox.cli("apply", check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    status = sandbox.cli("status", check=False)
    assert status.returncode == 4 and "not loaded" in status.stdout
    assert "the last apply failed" in status.stderr and "no guard is loaded" in status.stderr
    reason = failed.stderr.strip().removeprefix("Error: ")
    assert reason in status.stderr
    as_json = json.loads(sandbox.cli("status", "--json", check=False).stdout)
    assert as_json["loaded"] is False and as_json["last_apply_failure"]["message"] == reason
    # a successful apply clears the record
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    sandbox.cli("apply")
    status = sandbox.cli("status", check=False)
    assert status.returncode == 0 and "last apply failed" not in status.stderr


def test_status_says_the_previous_guard_stays_when_a_broken_config_was_applied(sandbox):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    sandbox.cli("apply")
    sandbox.write_config(sandbox.owner_block([str(PORT), "99999"], "owner"))
    assert sandbox.cli("apply", check=False).returncode == 2
    assert set(sandbox.bind("stranger", [("v4", "tcp", PORT)]).values()) == {errno.EADDRINUSE}
    status = sandbox.cli("status", check=False)
    assert status.returncode == 5  # loaded, but not what the files ask for
    assert "the guard loaded before it is still in place" in status.stderr
    assert "the files cannot be applied" in status.stderr
    assert "port 99999 is out of range" in status.stderr


def test_status_has_one_exit_code_per_state_an_operator_alerts_on(sandbox):
    def status() -> tuple[int, dict, str]:
        text = sandbox.cli("status", check=False)
        data = json.loads(sandbox.cli("status", "--json", check=False).stdout)
        assert sandbox.cli("status", "--json", check=False).returncode == text.returncode
        return text.returncode, data, text.stderr

    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp"], "owner"))
    code, data, _ = status()
    assert (code, data["loaded"], data["config_matches"]) == (4, False, False)
    sandbox.cli("apply")
    code, data, err = status()
    assert (code, data["config_matches"], data["config_differences"], err) == (0, True, [], "")
    # edited, not reloaded: 5, and what differs
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp", f"{FREE}/udp"], "owner"), mode="audit")
    code, data, err = status()
    assert code == 5 and data["config_matches"] is False
    assert data["config_differences"] == [
        f"{FREE}/udp is in the files but not guarded",
        "mode: the files say audit, the guard runs enforce",
    ]
    assert f"{FREE}/udp is in the files but not guarded" in err and "reload" in err
    # a stranger holds the port the files add: a squatter once applied (3)
    hold(sandbox, "stranger", "v4", "udp", FREE)
    sandbox.cli("apply")
    code, data, _ = status()
    assert (code, data["squatters"], data["config_matches"]) == (3, 1, True)
    # a squatter comes before other files (3); the JSON says both
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp", f"{FREE}/udp"], "owner"))
    code, data, _ = status()
    assert (code, data["squatters"], data["config_matches"]) == (3, 1, False)
    sandbox.cli("remove")
    assert status()[0] == 4


def test_apply_dry_run_names_what_would_change_and_changes_nothing(sandbox):
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp"], "owner"))
    sandbox.cli("apply")
    same = sandbox.cli("apply", "--dry-run")
    assert "apply would change nothing" in same.stdout
    sandbox.write_config(sandbox.owner_block([f"{FREE}/tcp"], "owner"))
    dry = sandbox.cli("apply", "--dry-run")
    assert dry.returncode == 0
    assert f"{PORT}/tcp is guarded but no longer in the files" in dry.stdout
    assert f"{FREE}/tcp is in the files but not guarded" in dry.stdout
    # nothing changed: the old port is still refused, the new one is free
    assert sandbox.bind("stranger", [("v4", "tcp", PORT), ("v4", "tcp", FREE)]) == {
        f"v4/tcp/{PORT}": errno.EADDRINUSE,
        f"v4/tcp/{FREE}": 0,
    }
    assert sandbox.cli("status", check=False).returncode == 5


def test_with_eperm_refusals_apply_and_status_name_the_ports_missing_from_the_blacklist(
    sandbox, tmp_path
):
    blacklist = tmp_path / "bindresvport.blacklist"
    blacklist.write_text("631\n636\n655\n774\n783\n873\n921\n993\n995\n")
    env = {"PORTGUARD_BINDRESVPORT_BLACKLIST": str(blacklist)}
    sandbox.write_config(sandbox.owner_block(["631/tcp", "749/tcp", "7000"], "owner"))
    applied = sandbox.cli("apply", env=env)
    assert "bindresvport" not in applied.stderr  # EADDRINUSE: bindresvport() moves on
    sandbox.write_config(
        sandbox.owner_block(["631/tcp", "749/tcp", "7000"], "owner"), deny_errno="EPERM"
    )
    applied = sandbox.cli("apply", env=env)
    assert "add the reserved port(s) 749 to it" in applied.stderr
    status = sandbox.cli("status", env=env)
    assert "refused binds see EPERM" in status.stderr and "port(s) 749 to it" in status.stderr
    data = json.loads(sandbox.cli("status", "--json", env=env).stdout)
    assert data["bindresvport_exposed"] == [749]
    blacklist.write_text(blacklist.read_text() + "749\n")
    assert "bindresvport" not in sandbox.cli("status", env=env).stderr


def metrics_of(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample, parsed by Prometheus' own client library."""
    parser = pytest.importorskip("prometheus_client.parser")
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        assert family.name.startswith("portguard_") and family.documentation
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_status_metrics_parse_as_prometheus_text_and_tell_the_state(sandbox):
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp", f"{FREE}/udp"], "owner"))
    proc = sandbox.cli("status", "--format", "prometheus", check=False)
    assert proc.returncode == 4
    assert metrics_of(proc.stdout)[("portguard_guard_loaded", ())] == 0
    hold(sandbox, "stranger", "v4", "udp", FREE)
    sandbox.cli("apply")
    repeat_in_parallel(sandbox, [("stranger", "v6", "tcp", 7)])
    textfile = sandbox.work / "portguard.prom"
    proc = sandbox.cli("status", "--format", "prometheus", "--output", str(textfile), check=False)
    assert proc.returncode == 3 and proc.stdout == ""
    metrics = metrics_of(textfile.read_text())
    tcp = (("port", str(PORT)), ("protocol", "tcp"))
    udp = (("port", str(FREE)), ("protocol", "udp"))
    assert metrics[("portguard_guard_loaded", ())] == 1
    assert metrics[("portguard_config_matches", ())] == 1
    assert metrics[("portguard_refused_binds_total", tcp)] == 7
    assert metrics[("portguard_refused_binds_total", udp)] == 0
    assert metrics[("portguard_holders", udp)] == 1 and metrics[("portguard_holders", tcp)] == 0
    assert metrics[("portguard_squatter_present", udp)] == 1
    assert metrics[("portguard_squatter_present", tcp)] == 0
    assert metrics[("portguard_events_lost_total", ())] == 0
    info = [k for k in metrics if k[0] == "portguard_guard_info"]
    assert dict(info[0][1])["mode"] == "enforce" and dict(info[0][1])["deny_errno"] == "EADDRINUSE"
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp"], "owner"))
    proc = sandbox.cli("status", "--format", "prometheus", check=False)
    assert metrics_of(proc.stdout)[("portguard_config_matches", ())] == 0
