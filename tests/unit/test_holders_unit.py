"""Unit tests for guard.holders: the parts that need neither root nor a kernel socket dump."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guard.kernel.cgroups import unescape_mount_path
from guard.observe.holders import (
    cgroup_paths,
    holders,
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


def test_mountinfo_escapes_are_undone():
    assert unescape_mount_path(r"/sys/fs/cgroup/my\040root\134x") == "/sys/fs/cgroup/my root\\x"
    assert unescape_mount_path("/sys/fs/cgroup") == "/sys/fs/cgroup"


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="sctp"):
        holders([(80, "sctp")])


def test_empty_port_filter_asks_nothing():
    assert holders([]) == []


def test_bound_ports_reads_listening_tcp_and_bound_udp(tmp_path):
    from guard.observe.procnet import bound_ports

    header = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    (tmp_path / "tcp").write_text(
        header + "   0: 0100007F:0277 00000000:0000 0A 0\n   1: 0100007F:1F90 0100007F:0277 01 0\n"
    )
    (tmp_path / "tcp6").write_text(
        header + "   0: 00000000000000000000000000000000:0369 "
        "00000000000000000000000000000000:0000 0A 0\n"
    )
    (tmp_path / "udp").write_text(header + "   0: 00000000:0277 00000000:0000 07 0\n")
    assert bound_ports(tmp_path) == {(631, "tcp"), (873, "tcp"), (631, "udp")}
