"""Unit tests for guard.holders: the parts that need neither root nor a kernel socket dump."""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from guard.kernel.cgroups import unescape_mount_path
from guard.observe.holders import (
    cgroup_id_attribute,
    cgroup_paths,
    diag_request,
    holders,
    parse_diag_replies,
    socket_owners,
    unit_of_cgroup,
)


@pytest.mark.parametrize(
    ("path", "unit"),
    [
        ("/system.slice/cups.service", "cups.service"),
        ("/init.scope", "init.scope"),
        ("/system.slice/cups.socket", "cups.socket"),
        ("/system.slice/var-lib-foo.mount", "var-lib-foo.mount"),
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
        ("/system.slice/docker.service/payload", "docker.service"),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo@1.service",
            "app-foo@1.service",
        ),
        ("/user.slice/user-1000.slice/session-2.scope", "session-2.scope"),
        ("/system.slice/dbus\\x2dbroker.service", "dbus\\x2dbroker.service"),
    ],
)
def test_unit_is_the_deepest_unit_in_the_path(path, unit):
    assert unit_of_cgroup(path) == unit


@pytest.mark.parametrize(
    "path",
    ["/", "", "/system.slice", "/user.slice/user-1000.slice", "/portguard-test/x", "/.scope"],
)
def test_paths_outside_any_unit_have_no_unit(path):
    assert unit_of_cgroup(path) is None


def _fake_process(proc: Path, pid: int, fds: dict[str, str], comm: str | None = "daemon") -> None:
    """Create /proc/PID with fd symlinks pointing at the given targets."""
    (proc / str(pid) / "fd").mkdir(parents=True)
    for fd, target in fds.items():
        os.symlink(target, proc / str(pid) / "fd" / fd)
    if comm is not None:
        (proc / str(pid) / "comm").write_text(comm + "\n")


def test_socket_inodes_map_to_pid_and_comm(tmp_path):
    _fake_process(tmp_path, 42, {"0": "/dev/null", "3": "socket:[1001]"}, comm="cupsd")
    _fake_process(tmp_path, 43, {"5": "socket:[1002]"}, comm="named")

    assert socket_owners({1001, 1002}, proc_root=tmp_path) == {
        1001: (42, "cupsd"),
        1002: (43, "named"),
    }


def test_shared_socket_is_attributed_to_the_lowest_pid(tmp_path):
    # Numeric, not lexical, order: the master of a forking server usually has the lowest pid.
    _fake_process(tmp_path, 100, {"3": "socket:[7]"}, comm="worker")
    _fake_process(tmp_path, 99, {"3": "socket:[7]"}, comm="master")
    _fake_process(tmp_path, 1000, {"3": "socket:[7]"}, comm="worker")

    assert socket_owners({7}, proc_root=tmp_path) == {7: (99, "master")}


def test_unheld_sockets_and_foreign_entries_are_left_out(tmp_path):
    _fake_process(tmp_path, 5, {"1": "socket:[70]", "2": "pipe:[1]", "3": "anon_inode:[x]"})
    (tmp_path / "self").symlink_to("5")
    (tmp_path / "sys").mkdir()

    assert socket_owners({7, 8}, proc_root=tmp_path) == {}


def test_vanished_or_unreadable_processes_are_skipped(tmp_path):
    (tmp_path / "10").mkdir()  # exited: its fd directory is gone
    _fake_process(tmp_path, 11, {"4": "socket:[5]"}, comm=None)  # exited after the fd scan
    _fake_process(tmp_path, 12, {"4": "socket:[6]"})

    assert socket_owners({5, 6}, proc_root=tmp_path) == {5: (11, None), 6: (12, "daemon")}


def test_no_inodes_means_no_proc_scan(tmp_path):
    assert socket_owners(set(), proc_root=tmp_path / "missing") == {}


def test_cgroup_ids_map_to_paths_by_directory_inode(tmp_path):
    (tmp_path / "system.slice" / "cups.service").mkdir(parents=True)
    (tmp_path / "user.slice").mkdir()
    (tmp_path / "cgroup.procs").write_text("")
    cups = (tmp_path / "system.slice" / "cups.service").stat().st_ino
    user = (tmp_path / "user.slice").stat().st_ino
    root = tmp_path.stat().st_ino

    assert cgroup_paths({cups, user, root, 0, 123456789}, tmp_path) == {
        cups: "/system.slice/cups.service",
        user: "/user.slice",
        root: "/",
    }


def test_likely_paths_wrong_ones_among_them_give_the_walk_s_answer(tmp_path):
    (tmp_path / "system.slice" / "cups.service").mkdir(parents=True)
    (tmp_path / "user.slice").mkdir()
    cups = (tmp_path / "system.slice" / "cups.service").stat().st_ino
    user = (tmp_path / "user.slice").stat().st_ino
    likely = ["/system.slice/cups.service", "/user.slice/gone", "/system.slice"]
    assert cgroup_paths({cups, user}, tmp_path, likely) == {
        cups: "/system.slice/cups.service",
        user: "/user.slice",  # not among the likely ones: the walk found it
    }


def test_a_likely_path_is_taken_as_given_where_no_walk_would_find_it(tmp_path):
    """The walk follows no symlink: a cgroup reached only through one is found by the likely
    path alone (the test of the likely paths' use; cgroupfs itself has no symlinks)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    inode = outside.stat().st_ino
    assert cgroup_paths({inode}, root) == {}
    assert cgroup_paths({inode}, root, ["/link"]) == {inode: "/link"}


def test_mountinfo_escapes_are_undone():
    assert unescape_mount_path(r"/sys/fs/cgroup/my\040root\134x") == "/sys/fs/cgroup/my root\\x"
    assert unescape_mount_path("/sys/fs/cgroup") == "/sys/fs/cgroup"


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="sctp"):
        holders([(80, "sctp")])


def test_empty_port_filter_asks_nothing():
    assert holders([]) == []


def test_proc_net_ports_reads_listening_tcp_and_bound_udp(tmp_path):
    from guard.observe.procnet import proc_net_ports

    header = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    (tmp_path / "tcp").write_text(
        header + "   0: 0100007F:0277 00000000:0000 0A 0\n   1: 0100007F:1F90 0100007F:0277 01 0\n"
    )
    (tmp_path / "tcp6").write_text(
        header + "   0: 00000000000000000000000000000000:0369 "
        "00000000000000000000000000000000:0000 0A 0\n"
    )
    (tmp_path / "udp").write_text(header + "   0: 00000000:0277 00000000:0000 07 0\n")
    names = ("tcp", "tcp6", "udp", "udp6")
    assert proc_net_ports(tmp_path, names) == {(631, "tcp"), (873, "tcp"), (631, "udp")}


def test_sock_diag_sees_the_listening_tcp_ports_that_proc_net_lists():
    from guard.observe.procnet import PROC_NET, bound_ports, listening_tcp_ports, proc_net_ports

    with (
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listening,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound_only,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        listening.bind(("::1", 0))
        listening.listen()
        bound_only.bind(("127.0.0.1", 0))
        udp.bind(("127.0.0.1", 0))
        port, unlistened = listening.getsockname()[1], bound_only.getsockname()[1]
        from_kernel = listening_tcp_ports()
        from_proc = {p for p, _ in proc_net_ports(PROC_NET, ("tcp", "tcp6"))}
        both = bound_ports()
        assert (udp.getsockname()[1], "udp") in both
    assert port in from_kernel and unlistened not in from_kernel
    assert from_kernel == from_proc and (port, "tcp") in both


# ---- INET_DIAG_CGROUP_ID from a raw sock_diag reply -------------------------------------------

_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_MULTI = 2


def _attribute(attr_type: int, value: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(value), attr_type)
    return header + value + b"\0" * (-len(value) % 4)


def _diag_reply(port: int, inode: int, attributes: bytes) -> bytes:
    """One sock_diag message as the kernel sends it: nlmsghdr, inet_diag_msg, attributes."""
    diag_msg = (
        struct.pack("=BBBB", socket.AF_INET, 10, 0, 0)  # family, LISTEN, timer, retrans
        + struct.pack(">HH", port, 0)
        + struct.pack(">4I", 0x7F000001, 0, 0, 0)  # 127.0.0.1
        + struct.pack(">4I", 0, 0, 0, 0)
        + struct.pack("=IQIIIII", 0, 0xFFFF, 0, 0, 0, 0, inode)  # if, cookie, ..., uid, inode
    )
    payload = diag_msg + attributes
    header = struct.pack("=IHHII", 16 + len(payload), _SOCK_DIAG_BY_FAMILY, _NLM_F_MULTI, 1, 0)
    return header + payload


def _reply_with_cgroup(port: int, inode: int, cgroup_id: int) -> bytes:
    # As Linux 6.x sends a listener: SHUTDOWN (8), MARK (15), CGROUP_ID (21), SOCKOPT (22).
    return _diag_reply(
        port,
        inode,
        _attribute(8, b"\0")
        + _attribute(15, struct.pack("=I", 0))
        + _attribute(21, struct.pack("=Q", cgroup_id))
        + _attribute(22, struct.pack("=H", 0x52)),
    )


def test_cgroup_id_is_read_from_the_raw_attribute_list():
    assert cgroup_id_attribute(_reply_with_cgroup(631, 7, 2**40 + 5)) == 2**40 + 5


def test_cgroup_id_of_each_message_in_one_receive_buffer():
    first = _reply_with_cgroup(631, 7, 4242)
    buffer = first + _reply_with_cgroup(636, 8, 9999)
    assert cgroup_id_attribute(buffer, 0) == 4242
    assert cgroup_id_attribute(buffer, len(first)) == 9999


def test_reply_without_the_attribute_has_cgroup_id_zero():
    # A kernel without CONFIG_SOCK_CGROUP_DATA sends none; the next message is not looked at.
    buffer = _diag_reply(631, 7, _attribute(8, b"\0")) + _reply_with_cgroup(636, 8, 4242)
    assert cgroup_id_attribute(buffer) == 0


def test_a_dump_is_parsed_into_sockets_until_done_with_their_cgroup_ids():
    found: list = []
    buffer = _reply_with_cgroup(631, 7, 4242) + _reply_with_cgroup(636, 8, 2**40 + 5)
    assert parse_diag_replies(buffer, "tcp", 1, found) is False  # more may follow
    done = struct.pack("=IHHIIi", 20, 3, _NLM_F_MULTI, 1, 0, 0)  # NLMSG_DONE
    assert parse_diag_replies(done, "tcp", 1, found) is True
    assert [(s.port, s.protocol, s.address, s.inode, s.cgroup_id) for s in found] == [
        (631, "tcp", "127.0.0.1", 7, 4242),
        (636, "tcp", "127.0.0.1", 8, 2**40 + 5),
    ]


def test_a_netlink_error_in_a_dump_is_an_oserror():
    error = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -errno.EPROTONOSUPPORT) + bytes(16)
    with pytest.raises(OSError) as raised:
        parse_diag_replies(error, "udp", 1, [])
    assert raised.value.errno == errno.EPROTONOSUPPORT


def test_the_dump_request_is_an_inet_diag_req_v2_for_every_socket_in_the_states():
    request = diag_request(socket.AF_INET6, socket.IPPROTO_UDP, 0x82, 5)
    length, msg_type, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, msg_type, flags, seq) == (len(request), 20, 0x301, 5)
    assert struct.unpack_from("=BBBBI", request, 16) == (
        socket.AF_INET6,
        socket.IPPROTO_UDP,
        0,
        0,
        0x82,
    )
    assert request[24:] == bytes(48) and len(request) == 16 + 56


def test_apply_s_look_sees_listening_tcp_holders_and_leaves_merely_bound_ones_to_status():
    from guard.observe.holders import holders

    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound_only,
    ):
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound_only.bind(("127.0.0.1", 0))
        ports = [(listening.getsockname()[1], "tcp"), (bound_only.getsockname()[1], "tcp")]
        apply_s = {(h.port, h.protocol) for h in holders(ports, listening=True)}
        status_s = {(h.port, h.protocol) for h in holders(ports)}
    assert apply_s == {ports[0]}
    assert status_s == set(ports) or uname_before_6_3(), status_s


def uname_before_6_3() -> bool:
    """TCP_BOUND_INACTIVE (bound-only TCP sockets in sock_diag) came with Linux 6.3."""
    release = os.uname().release.split("-")[0].split(".")
    return tuple(int(x) for x in release[:2]) < (6, 3)
