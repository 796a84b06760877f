"""Status table and monitor lines (100 columns), journal entries, owner/squatter decisions."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard.observe import display, journal
from guard.observe.holders import Holder, HolderState, classify, of_state, with_holders, within
from guard.observe.monitor import Denial
from guard.observe.state import GuardState, LinkState, OwnerState, ReservationState
from guard.policy import config

LONG = "/system.slice/" + "very-long-name-" * 10 + ".service"


def denial(**changes) -> Denial:
    values = {
        "time": 1_700_000_000.0,
        "pid": 4242,
        "uid": 0,
        "comm": "python3",
        "cgroup_id": 77,
        "cgroup": "/user.slice/stranger.scope",
        "unit": "stranger.scope",
        "family": "ipv4",
        "protocol": "tcp",
        "address": "127.0.0.1",
        "port": 631,
        "owners": ("/system.slice/cups.service",),
        "verdict": "denied",
    }
    values.update(changes)
    return Denial(**values)


def holder_state(**changes) -> HolderState:
    values = {
        "pid": 812,
        "comm": "cupsd",
        "cgroup": "/system.slice/cups.service",
        "unit": "cups.service",
        "owner": True,
        "family": "ipv4",
        "address": "0.0.0.0",
        "socket_cgroup": "/system.slice/cups.service",
    }
    values.update(changes)
    return HolderState(**values)


def state(*reservations: ReservationState, **changes) -> GuardState:
    values = {
        "loaded": True,
        "pin_dir": "/sys/fs/bpf/portguard",
        "program": "guard-retval-0123456789abcdef",
        "links": (LinkState("bind4", 1, 2, 3),),
        "mode": "enforce",
        "deny_errno": 98,
        "netns_cookie": 1,
        "reservations": reservations,
        "holders_checked": True,
    }
    values.update(changes)
    return GuardState(**values)


# ---- holders only from the guarded network namespace ----------------------------------------


def test_holders_are_not_looked_for_outside_the_namespace_the_hook_road_knows_by_inode():
    # The security_socket_bind road on a kernel without netns cookies (Linux < 5.14): the
    # guard knows its namespace by inode only, and a status from another one sees no holders.
    unchecked = state(ReservationState(631, "tcp", (), 0), holders_checked=False)
    hook = unchecked._replace(
        netns_cookie=0, netns_ino=4026531840, refuse_at="security_socket_bind"
    )
    assert with_holders(hook, 0, 4026532999) is hook
    cookie = unchecked._replace(netns_cookie=7)
    assert with_holders(cookie, 8, 4026531840) is cookie


# ---- shortening -----------------------------------------------------------------------------


@given(st.text(min_size=0, max_size=300), st.integers(min_value=1, max_value=120))
def test_shorten_never_exceeds_the_width_and_keeps_the_end(text, width):
    short = display.shorten(text, width)
    assert len(short) <= max(width, 1)
    if len(text) <= width:
        assert short == text
    else:
        assert short.startswith(display.ELLIPSIS) and text.endswith(short[1:])


# ---- status table ---------------------------------------------------------------------------


def test_status_table_fits_100_columns_with_long_paths_and_marks_squatters():
    res = ReservationState(
        631,
        "tcp",
        (OwnerState(LONG, 1234), OwnerState("/system.slice/cups-browsed.service", None)),
        12345678,
        contain=True,
        contained_drops=87654321,
        holders=(
            holder_state(cgroup=LONG),
            holder_state(
                pid=4000000,
                comm="a-fifteen-chars",
                owner=False,
                unit=None,
                cgroup="/user.slice/" + "x" * 90,
            ),
        ),
    )
    lines = display.status_lines(state(res, pin_dir="/sys/fs/bpf/" + "p" * 120), "/")
    assert all(len(line) <= display.WIDTH for line in lines)
    table = lines[lines.index(next(line for line in lines if line.lstrip().startswith("PORT"))) :]
    assert table[1].split()[:4] == ["631", "tcp", "12345678", "87654321"]
    assert table[1].endswith("(id 1234)")
    assert table[2].endswith("owner  absent: /system.slice/cups-browsed.service")
    assert table[3].split()[:4] == ["holder", "812", "cupsd", "0.0.0.0"]
    assert table[3].endswith(" owner")
    assert "4000000 a-fifteen-ch 0.0.0.0" in table[4] and "…xxxx" in table[4]
    assert table[4].endswith("SQUATTER")


def test_status_folds_owners_that_do_not_exist_here_into_one_line_unless_verbose():
    absent = [
        OwnerState(f"/system.slice/{name}", None, name)
        for name in ("dovecot.service", "cyrus-imapd.service", "dovecot.socket")
    ]
    res = ReservationState(
        993,
        "tcp",
        (OwnerState("/system.slice/dovecot.service", 42, "dovecot.service"), *absent[1:]),
        0,
        holders=(
            holder_state(family="ipv6", address="::", unit="dovecot.service"),
            holder_state(family="ipv4", address="0.0.0.0", unit="dovecot.service"),
        ),
    )
    table = display.status_lines(state(res), "/")[-4:]
    assert [line.split("  ")[-1].strip() for line in table[:2]] == [
        "dovecot.service (id 42)",
        "absent: cyrus-imapd.service, dovecot.socket",
    ]
    assert table[2].split()[:4] == ["holder", "812", "cupsd", "[::]"]
    assert table[3].split()[:4] == ["holder", "812", "cupsd", "0.0.0.0"]
    verbose = display.status_lines(state(res), "/", verbose=True)
    assert any(line.endswith("cyrus-imapd.service (absent)") for line in verbose)
    assert any(line.endswith("dovecot.socket (absent)") for line in verbose)
    many = tuple(OwnerState(f"/x/u{i}.service", None, f"u{i}.service") for i in range(40))
    lines = display.status_lines(state(ReservationState(1, "tcp", many, 0)), "/")
    assert lines[-1].endswith("more") and len(lines[-1]) <= display.WIDTH


def test_status_without_holders_says_where_to_run_it():
    lines = display.status_lines(state(holders_checked=False), "/")
    assert any("guarded network namespace" in line for line in lines)


def test_demo_says_how_many_reserved_ports_bindresvport_met_on_its_way():
    assert display.demo_resvport_lines({"bindresvport": 757}, 0) == [
        "  it got port 757: no reserved port was in its way this time."
    ]
    two = " ".join(display.demo_resvport_lines({"bindresvport": 992}, 2))
    assert "it got port 992" in two and "it met 2 reserved ports on the way" in two
    assert "it met 1 reserved port on" in " ".join(
        display.demo_resvport_lines({"bindresvport": 994}, 1)
    )
    failed = " ".join(display.demo_resvport_lines({"bindresvport": "EACCES"}, 0))
    assert "it failed with EACCES" in failed


def test_status_not_loaded_is_one_line():
    assert display.status_lines(GuardState(False, "/sys/fs/bpf/portguard"), "/") == [
        "portguard: not loaded (pin directory /sys/fs/bpf/portguard)"
    ]


# ---- monitor lines --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        denial(),
        denial(
            family="ipv6",
            address="ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            port=65535,
            pid=4194304,
            uid=4294967294,
            comm="fifteen-chars-x",
            cgroup=LONG,
            unit=None,
            owners=(LONG, "/a", "/b"),
            verdict="audit",
        ),
        denial(cgroup=None, unit=None, owners=()),
    ],
)
def test_monitor_lines_fit_100_columns_and_align_with_the_header(event):
    line = display.monitor_line(event)
    assert len(line) <= display.WIDTH and len(display.MONITOR_HEADER) <= display.WIDTH
    header = display.MONITOR_HEADER
    assert line.index(event.verdict) == header.index("VERDICT")
    assert line.split()[1] == str(event.pid) and line.split()[2] == event.comm


def test_monitor_line_names_caller_unit_address_and_owner():
    line = display.monitor_line(denial())
    assert line.split()[1:] == [
        "4242",
        "python3",
        "0",
        "stranger.scope",
        "tcp4",
        "127.0.0.1:631",
        "cups.service",
        "denied",
    ]
    ipv6 = display.monitor_line(
        denial(family="ipv6", address="::1", unit=None, cgroup_id=9, cgroup=None)
    )
    assert "[::1]:631" in ipv6 and "id:9" in ipv6 and "tcp6" in ipv6


def test_several_owners_show_the_first_and_how_many_more():
    line = display.monitor_line(denial(owners=("/system.slice/cups.service", "/init.scope")))
    assert " cups.serv…+1 " in line


def test_json_event_carries_every_field():
    data = display.denial_json(denial())
    assert data["time"] == "2023-11-14T22:13:20.000000+00:00"
    keys = ("port", "protocol", "family", "pid", "comm", "cgroup", "verdict")
    assert {k: data[k] for k in keys} == {
        "port": 631,
        "protocol": "tcp",
        "family": "ipv4",
        "pid": 4242,
        "comm": "python3",
        "cgroup": "/user.slice/stranger.scope",
        "verdict": "denied",
    }
    assert data["owners"] == ["/system.slice/cups.service"] and data["unit"] == "stranger.scope"


# ---- journal --------------------------------------------------------------------------------


def test_journal_entry_is_key_value_lines():
    entry = journal.encode([("MESSAGE", "hi"), ("PORTGUARD_PORT", 631)])
    assert entry == b"MESSAGE=hi\nPORTGUARD_PORT=631\n"


def test_journal_value_with_a_newline_is_length_prefixed():
    entry = journal.encode([("MESSAGE", "a\nb")])
    assert entry == b"MESSAGE\n" + (3).to_bytes(8, "little") + b"a\nb\n"


@pytest.mark.parametrize("name", ["_PID", "lower", "1ST", "WITH-DASH", "", "A" * 65])
def test_journal_refuses_field_names_it_would_drop(name):
    with pytest.raises(ValueError):
        journal.encode([(name, "x")])


def test_journal_fields_of_a_denial():
    fields = display.journal_fields(denial(owners=("/a.service", "/b.service")))
    names = [name for name, _ in fields]
    assert {
        "MESSAGE",
        "PRIORITY",
        "PORTGUARD_PORT",
        "PORTGUARD_PROTOCOL",
        "PORTGUARD_PID",
        "PORTGUARD_COMM",
        "PORTGUARD_UNIT",
        "PORTGUARD_CGROUP",
        "OBJECT_PID",
    } <= set(names)
    assert [v for n, v in fields if n == "PORTGUARD_OWNER"] == ["/a.service", "/b.service"]
    assert dict(fields)["PRIORITY"] == journal.PRIORITY_WARNING
    audit = dict(display.journal_fields(denial(verdict="audit")))
    assert audit["PRIORITY"] == journal.PRIORITY_NOTICE
    journal.encode(fields)  # every name is valid


def test_journal_sends_one_datagram_per_entry(tmp_path):
    path = tmp_path / "socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    try:
        target = journal.Journal(path)
        display.JournalSink(target).lost(3)
        target.close()
        entry = server.recv(65536)
    finally:
        server.close()
    assert b"PORTGUARD_LOST=3\n" in entry and entry.endswith(b"SYSLOG_IDENTIFIER=portguard\n")


def test_no_journal_is_a_clear_error(tmp_path):
    with pytest.raises(journal.JournalError, match="no systemd journal"):
        journal.Journal(tmp_path / "missing")


# ---- owners and squatters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cgroup", "owner", "inside"),
    [
        ("/a/b", "/a/b", True),
        ("/a/b/c", "/a/b", True),
        ("/a/bc", "/a/b", False),
        ("/a", "/a/b", False),
        ("/x", "/", True),
    ],
)
def test_within_means_the_cgroup_or_below(cgroup, owner, inside):
    assert within(cgroup, owner) is inside


def fake_proc(tmp_path: Path, pid: int, cgroup: str) -> Path:
    (tmp_path / str(pid)).mkdir(parents=True)
    (tmp_path / str(pid) / "cgroup").write_text(f"12:cpu:/whatever\n0::{cgroup}\n")
    return tmp_path


def holder(pid: int | None, socket_cgroup: str | None) -> Holder:
    return Holder(631, "tcp", socket.AF_INET, "0.0.0.0", pid, "cupsd", 5, socket_cgroup, None, 99)


@pytest.mark.parametrize(
    ("socket_cgroup", "process_cgroup", "owner"),
    [
        ("/system.slice/cups.service", "/system.slice/cups.service", True),
        ("/system.slice/cups.service/sub", "/system.slice/cups.service", True),
        ("/user.slice/u.scope", "/user.slice/u.scope", False),  # bound before the guard
        ("/system.slice/cups.service", "/user.slice/u.scope", False),  # moved out since
        ("/user.slice/u.scope", "/system.slice/cups.service", False),  # moved in, socket is not
        (None, "/system.slice/cups.service", True),  # creation cgroup removed since
    ],
)
def test_a_holder_is_an_owner_only_when_socket_and_process_are_in_an_owner_cgroup(
    tmp_path, socket_cgroup, process_cgroup, owner
):
    proc = fake_proc(tmp_path, 812, process_cgroup)
    state = classify(holder(812, socket_cgroup), ["/system.slice/cups.service"], proc)
    assert state.owner is owner
    assert state.cgroup == process_cgroup and state.socket_cgroup == socket_cgroup
    assert state.family == "ipv4"


def test_a_socket_of_no_known_process_or_cgroup_is_a_squatter(tmp_path):
    assert classify(holder(None, None), ["/"], tmp_path).owner is False
    cups = "/system.slice/cups.service"
    gone = classify(holder(999, cups), [cups], tmp_path)
    assert gone.owner is True and gone.cgroup == "/system.slice/cups.service"
    assert gone.unit == "cups.service"


def test_squatters_of_a_state_are_the_non_owner_holders():
    res = ReservationState(
        631, "tcp", (), 0, holders=(holder_state(), holder_state(pid=9, owner=False))
    )
    [squatter] = of_state(state(res))
    assert squatter.holder.pid == 9
    assert display.squatter_text(squatter).startswith(
        "port 631/tcp is held by pid 9 (cupsd) in cgroup "
    )


# ---- event records --------------------------------------------------------------------------


def test_event_struct_reads_what_the_layout_header_describes():
    from guard.kernel import layout
    from guard.observe.monitor import EVENT, CgroupNames, Decoder

    ev = layout.Event(
        ts_ns=5,
        cgroup_id=77,
        pid=4242,
        uid=1000,
        port=631,
        proto=17,
        family=socket.AF_INET6,
        verdict=layout.VERDICT_AUDIT,
        set=3,
        comm=b"cupsd",
    )
    ev.addr[:] = list(socket.inet_pton(socket.AF_INET6, "fe80::1"))
    raw = bytes(ev)
    assert EVENT.size <= len(raw) == layout.C.sizeof(layout.Event)

    class Owners:
        def owners(self, proto, port):
            return ("/o",) if (proto, port) == (17, 631) else ()

    names = CgroupNames(Path("/nonexistent"))
    names._names[77] = ("/a/b.service", "b.service")
    got = Decoder(names, Owners()).decode(raw)
    assert (got.pid, got.uid, got.port, got.protocol, got.family, got.verdict, got.comm) == (
        4242,
        1000,
        631,
        "udp",
        "ipv6",
        "audit",
        "cupsd",
    )
    assert (got.address, got.cgroup, got.unit, got.owners) == (
        "fe80::1",
        "/a/b.service",
        "b.service",
        ("/o",),
    )


def test_a_failed_apply_is_kept_per_pin_dir_until_an_apply_succeeds(tmp_path, monkeypatch):
    from guard.observe import outcome

    monkeypatch.setenv("PORTGUARD_RUN_DIR", str(tmp_path))
    outcome.record_failure("/sys/fs/bpf/portguard", "no cgroup2 here")
    assert outcome.last_failure("/sys/fs/bpf/other") is None
    failure = outcome.last_failure("/sys/fs/bpf/portguard")
    assert failure.message == "no cgroup2 here" and failure.when
    line = display.failure_line(failure, loaded=False)
    assert line.endswith("no guard is loaded: no cgroup2 here")
    outcome.clear("/sys/fs/bpf/portguard")
    assert outcome.last_failure("/sys/fs/bpf/portguard") is None


def test_a_pin_dir_no_file_can_be_named_after_is_never_recorded(tmp_path, monkeypatch):
    from guard.observe import outcome

    monkeypatch.setenv("PORTGUARD_RUN_DIR", str(tmp_path))
    outcome.record_failure("/sys/fs/bpf/a\0b", "x")
    outcome.clear("/sys/fs/bpf/a\0b")
    assert outcome.last_failure("/sys/fs/bpf/a\0b") is None


# ---- the journal's rate limit -------------------------------------------------------------------


class FakeJournal:
    def __init__(self):
        self.entries: list[dict] = []

    def send(self, fields):
        self.entries.append(dict(fields))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def limited(interval=30.0):
    target, clock = FakeJournal(), FakeClock()
    return display.JournalSink(target, interval, clock), target, clock


def test_a_flood_of_refusals_is_one_entry_per_interval_and_the_counts_add_up():
    sink, target, clock = limited()
    for _ in range(120):  # 1,000 refusals a second for 120 s
        for _ in range(1000):
            sink.denial(denial())
        clock.now += 1
        sink.flush()
    sink.finish()
    assert len(target.entries) == 1 + 4  # the first at once, then one per 30 s
    assert "PORTGUARD_SUPPRESSED" not in target.entries[0]
    assert sum(int(e.get("PORTGUARD_SUPPRESSED", 1)) for e in target.entries) == 120_000
    summary = target.entries[1]
    assert summary["MESSAGE"].startswith("refused 29999 more binds of 127.0.0.1:631/tcp in ")
    assert summary["PORTGUARD_PORT"] == 631 and summary["PORTGUARD_INTERVAL"] == "30"


def test_the_first_refusal_of_each_caller_port_and_protocol_is_logged_at_once():
    sink, target, _ = limited()
    sink.denial(denial())
    sink.denial(denial(cgroup_id=78))
    sink.denial(denial(port=636))
    sink.denial(denial(protocol="udp"))
    sink.denial(denial(pid=1))  # same caller cgroup, port and protocol: suppressed
    assert len(target.entries) == 4
    sink.finish()
    assert (
        target.entries[4]["PORTGUARD_SUPPRESSED"] == 1 and target.entries[4]["PORTGUARD_PID"] == 1
    )


def test_after_a_quiet_interval_the_next_refusal_is_logged_at_once():
    sink, target, clock = limited()
    sink.denial(denial())
    clock.now += 31
    sink.flush()  # nothing was suppressed: nothing to say
    assert len(target.entries) == 1
    sink.denial(denial())
    assert len(target.entries) == 2 and "PORTGUARD_SUPPRESSED" not in target.entries[1]


def test_interval_0_logs_every_refusal():
    sink, target, _ = limited(0)
    for _ in range(50):
        sink.denial(denial())
    sink.finish()
    assert len(target.entries) == 50


def test_journal_interval_is_a_setting_of_seconds():
    assert config.loads("[guard]\njournal_interval = 5\n").settings.journal_interval == 5.0
    assert config.Settings().journal_interval == 30.0
    for bad in ('"30"', "-1", "true", "100000"):
        with pytest.raises(config.ConfigError, match="journal_interval must be a number"):
            config.loads(f"[guard]\njournal_interval = {bad}\n")
