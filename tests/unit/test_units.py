"""Unit and slice names -> cgroup paths, derived from fake unit directories (no systemd needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from guard.policy import units
from guard.policy.units import (
    UnitError,
    load_unit,
    resolve_unit,
    slice_cgroup_path,
    socket_unit_owner_paths,
    unit_cgroup_path,
)


@pytest.fixture
def dirs(tmp_path: Path) -> list[Path]:
    """/etc, /run and /usr/lib unit directories, highest priority first, like systemd's."""
    result = [tmp_path / "etc", tmp_path / "run", tmp_path / "usr"]
    for directory in result:
        directory.mkdir()
    return result


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_plain_service_lives_in_system_slice(dirs):
    write(dirs[2] / "cups.service", "[Service]\nExecStart=/usr/sbin/cupsd -l\n")
    assert unit_cgroup_path("cups.service", unit_dirs=dirs) == "/system.slice/cups.service"


def test_uninstalled_service_gets_the_path_its_name_implies(dirs):
    assert unit_cgroup_path("nothere.service", unit_dirs=dirs) == "/system.slice/nothere.service"


def test_slice_setting_in_unit_file_moves_the_service(dirs):
    write(dirs[2] / "db.service", "[Service]\nSlice=data-sql.slice\n")
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/data.slice/data-sql.slice/db.service"


def test_slice_in_another_section_is_not_the_service_slice(dirs):
    write(dirs[2] / "db.service", "[Unit]\nSlice=wrong.slice\n[Service]\nExecStart=/bin/true\n")
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/system.slice/db.service"


def test_last_slice_assignment_in_a_file_wins(dirs):
    write(dirs[2] / "db.service", "[Service]\nSlice=a.slice\nSlice=b.slice\n")
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/b.slice/db.service"


def test_dropin_overrides_slice_from_unit_file(dirs):
    write(dirs[2] / "db.service", "[Service]\nSlice=a.slice\n")
    write(dirs[0] / "db.service.d" / "override.conf", "[Service]\nSlice=b.slice\n")
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/b.slice/db.service"


def test_lexically_later_dropin_wins_whatever_its_directory(dirs):
    write(dirs[0] / "db.service.d" / "10-etc.conf", "[Service]\nSlice=etc.slice\n")
    write(dirs[2] / "db.service.d" / "50-usr.conf", "[Service]\nSlice=usr.slice\n")
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/usr.slice/db.service"


def test_dropin_in_higher_priority_dir_hides_same_name_below(dirs):
    write(dirs[2] / "db.service.d" / "slice.conf", "[Service]\nSlice=usr.slice\n")
    write(dirs[0] / "db.service.d" / "slice.conf", "[Service]\nSlice=etc.slice\n")
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/etc.slice/db.service"


def test_dropin_masked_with_dev_null_removes_its_setting(dirs):
    write(dirs[2] / "db.service.d" / "slice.conf", "[Service]\nSlice=usr.slice\n")
    (dirs[0] / "db.service.d").mkdir()
    os.symlink(os.devnull, dirs[0] / "db.service.d" / "slice.conf")
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/system.slice/db.service"


def test_type_wide_dropin_applies_but_specific_one_overrides(dirs):
    write(dirs[2] / "service.d" / "90-all.conf", "[Service]\nSlice=all.slice\n")
    assert unit_cgroup_path("x.service", unit_dirs=dirs) == "/all.slice/x.service"
    write(dirs[0] / "x.service.d" / "90-all.conf", "[Service]\nSlice=mine.slice\n")
    assert unit_cgroup_path("x.service", unit_dirs=dirs) == "/mine.slice/x.service"


def test_dash_prefix_dropin_applies_to_the_whole_family(dirs):
    write(dirs[2] / "foo-.service.d" / "slice.conf", "[Service]\nSlice=foo.slice\n")
    assert unit_cgroup_path("foo-bar.service", unit_dirs=dirs) == "/foo.slice/foo-bar.service"


def test_unit_file_in_etc_replaces_the_one_in_usr(dirs):
    write(dirs[2] / "db.service", "[Service]\nSlice=usr.slice\n")
    write(dirs[0] / "db.service", "[Service]\nExecStart=/bin/true\n")
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/system.slice/db.service"


def test_continuation_lines_and_comments_are_read_like_systemd(dirs):
    write(
        dirs[2] / "db.service",
        "# Slice=commented.slice\n[Service]\n; Slice=also-commented.slice\n"
        "ExecStart=/bin/echo \\\n  Slice=not-a-key.slice\nSlice = spaced.slice\n",
    )
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/spaced.slice/db.service"


def test_invalid_slice_value_is_ignored_like_systemd_does(dirs):
    write(dirs[2] / "db.service", "[Service]\nSlice=good.slice\nSlice=bad\n")
    assert unit_cgroup_path("db.service", unit_dirs=dirs) == "/good.slice/db.service"


def test_template_instance_lives_in_per_template_slice(dirs):
    write(dirs[2] / "getty@.service", "[Service]\nExecStart=/sbin/agetty %I\n")
    assert (
        unit_cgroup_path("getty@tty1.service", unit_dirs=dirs)
        == "/system.slice/system-getty.slice/getty@tty1.service"
    )


def test_template_prefix_with_dash_is_escaped_in_its_slice(dirs):
    assert (
        unit_cgroup_path("foo-bar@x.service", unit_dirs=dirs)
        == "/system.slice/system-foo\\x2dbar.slice/foo-bar@x.service"
    )


def test_template_slice_setting_applies_to_instances_with_specifiers(dirs):
    write(dirs[2] / "user@.service", "[Service]\nSlice=user-%i.slice\n")
    assert (
        unit_cgroup_path("user@1000.service", unit_dirs=dirs)
        == "/user.slice/user-1000.slice/user@1000.service"
    )


def test_template_dropin_applies_to_instances(dirs):
    write(dirs[2] / "worker@.service", "[Service]\nExecStart=/bin/true\n")
    write(dirs[0] / "worker@.service.d" / "slice.conf", "[Service]\nSlice=jobs.slice\n")
    assert unit_cgroup_path("worker@a.service", unit_dirs=dirs) == "/jobs.slice/worker@a.service"


def test_instance_dropin_overrides_template_dropin(dirs):
    write(dirs[0] / "worker@.service.d" / "slice.conf", "[Service]\nSlice=jobs.slice\n")
    write(dirs[0] / "worker@b.service.d" / "slice.conf", "[Service]\nSlice=special.slice\n")
    assert unit_cgroup_path("worker@a.service", unit_dirs=dirs) == "/jobs.slice/worker@a.service"
    assert unit_cgroup_path("worker@b.service", unit_dirs=dirs) == "/special.slice/worker@b.service"


def test_host_dependent_specifier_is_refused_with_a_reason(dirs):
    write(dirs[2] / "db.service", "[Service]\nSlice=host-%H.slice\n")
    with pytest.raises(UnitError, match="%H"):
        unit_cgroup_path("db.service", unit_dirs=dirs)


@pytest.mark.parametrize(
    ("slice_name", "path"),
    [
        ("-.slice", "/"),
        ("user.slice", "/user.slice"),
        ("a-b-c.slice", "/a.slice/a-b.slice/a-b-c.slice"),
        ("user-1000.slice", "/user.slice/user-1000.slice"),
        ("system-foo\\x2dbar.slice", "/system.slice/system-foo\\x2dbar.slice"),
    ],
)
def test_slice_path_follows_dashes(slice_name, path):
    assert slice_cgroup_path(slice_name) == path


@pytest.mark.parametrize("bad", ["a--b.slice", "a-.slice", "-a.slice", "foo.service", "x@y.slice"])
def test_malformed_slice_names_are_rejected(bad):
    with pytest.raises(UnitError):
        slice_cgroup_path(bad)


def test_slice_unit_resolves_through_unit_cgroup_path(dirs):
    path = unit_cgroup_path("machine-qemu.slice", unit_dirs=dirs)
    assert path == "/machine.slice/machine-qemu.slice"


def test_init_scope_is_at_the_root(dirs):
    assert unit_cgroup_path("init.scope", unit_dirs=dirs) == "/init.scope"


def test_names_that_collide_with_cgroupfs_files_get_systemds_underscore(dirs):
    assert unit_cgroup_path("io.service", unit_dirs=dirs) == "/system.slice/_io.service"
    assert unit_cgroup_path("cgroup.service", unit_dirs=dirs) == "/system.slice/_cgroup.service"


def test_alias_symlink_resolves_to_the_real_unit(dirs):
    write(dirs[2] / "ssh.service", "[Service]\nExecStart=/usr/sbin/sshd -D\n")
    os.symlink("ssh.service", dirs[2] / "sshd.service")
    info = load_unit("sshd.service", unit_dirs=dirs)
    assert info.name == "ssh.service"
    assert unit_cgroup_path("sshd.service", unit_dirs=dirs) == "/system.slice/ssh.service"


def test_alias_takes_dropins_of_the_alias_name_too(dirs):
    write(dirs[2] / "ssh.service", "[Service]\nExecStart=/usr/sbin/sshd -D\n")
    os.symlink(dirs[2] / "ssh.service", dirs[0] / "sshd.service")
    write(dirs[0] / "sshd.service.d" / "slice.conf", "[Service]\nSlice=remote.slice\n")
    assert unit_cgroup_path("sshd.service", unit_dirs=dirs) == "/remote.slice/ssh.service"


def test_alias_of_template_keeps_the_instance(dirs):
    write(dirs[2] / "real@.service", "[Service]\nExecStart=/bin/true\n")
    os.symlink("real@.service", dirs[2] / "nick@.service")
    assert (
        unit_cgroup_path("nick@x.service", unit_dirs=dirs)
        == "/system.slice/system-real.slice/real@x.service"
    )


def test_linked_unit_outside_search_path_is_read_through_the_link(dirs, tmp_path):
    target = write(tmp_path / "opt" / "app.service", "[Service]\nSlice=apps.slice\n")
    os.symlink(target, dirs[0] / "app.service")
    assert unit_cgroup_path("app.service", unit_dirs=dirs) == "/apps.slice/app.service"


def test_masked_unit_keeps_the_default_path_and_ignores_its_files(dirs):
    write(dirs[2] / "db.service", "[Service]\nSlice=data.slice\n")
    write(dirs[2] / "db.service.d" / "x.conf", "[Service]\nSlice=data.slice\n")
    os.symlink(os.devnull, dirs[0] / "db.service")
    info = load_unit("db.service", unit_dirs=dirs)
    assert info.masked
    assert info.cgroup_path == "/system.slice/db.service"


def test_empty_unit_file_counts_as_masked(dirs):
    write(dirs[0] / "db.service", "")
    assert load_unit("db.service", unit_dirs=dirs).masked


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "empty"),
        ("cups", "type suffix"),
        (".service", "type suffix"),
        ("cups.servic", "unknown unit type"),
        ("cu ps.service", "characters"),
        ("cups/x.service", "user@UID.service/NAME"),
        ("@foo.service", "nothing before '@'"),
        ("getty@.service", "template"),
        ("multi-user.target", "no cgroup"),
        ("a" * 250 + ".service", "longer than 255"),
    ],
)
def test_invalid_unit_names_are_rejected_with_a_reason(bad, reason, dirs):
    with pytest.raises(UnitError, match=reason):
        unit_cgroup_path(bad, unit_dirs=dirs)


def test_unit_error_is_a_value_error():
    assert issubclass(UnitError, ValueError)


def test_escaped_names_are_kept_as_the_directory_name(dirs):
    assert (
        unit_cgroup_path("systemd-fsck@dev-disk-by\\x2duuid-1.service", unit_dirs=dirs)
        == "/system.slice/system-systemd\\x2dfsck.slice/systemd-fsck@dev-disk-by\\x2duuid-1.service"
    )


def test_user_unit_lives_below_the_user_manager_in_app_slice(dirs):
    write(dirs[2] / "user@.service", "[Service]\nSlice=user-%i.slice\n")
    manager = "/user.slice/user-1000.slice/user@1000.service"
    assert unit_cgroup_path("user@1000.service/foo.service", unit_dirs=dirs) == (
        manager + "/app.slice/foo.service"
    )
    assert unit_cgroup_path("user@1000.service/app.slice/foo.service", unit_dirs=dirs) == (
        manager + "/app.slice/foo.service"
    )
    assert unit_cgroup_path("user@1000.service/bar@x.service", unit_dirs=dirs) == (
        manager + "/app.slice/app-bar.slice/bar@x.service"
    )
    assert unit_cgroup_path("user@1000.service/session.slice", unit_dirs=dirs) == (
        manager + "/session.slice"
    )


def test_user_unit_with_a_wrong_middle_path_is_refused(dirs):
    with pytest.raises(UnitError, match="lives at"):
        unit_cgroup_path("user@1000.service/session.slice/foo.service", unit_dirs=dirs)


def test_slash_names_other_than_user_units_are_refused(dirs):
    with pytest.raises(UnitError, match="user@UID.service"):
        unit_cgroup_path("system.slice/foo.service", unit_dirs=dirs)


def test_socket_owner_is_init_scope_the_socket_unit_and_matching_service(dirs):
    write(dirs[2] / "cups.socket", "[Socket]\nListenStream=631\n")
    assert socket_unit_owner_paths("cups.socket", unit_dirs=dirs) == [
        "/init.scope",
        "/system.slice/cups.socket",
        "/system.slice/cups.service",
    ]


def test_socket_owner_follows_service_setting_and_its_slice(dirs):
    write(dirs[2] / "print.socket", "[Socket]\nListenStream=631\nService=cupsd.service\n")
    write(dirs[2] / "cupsd.service", "[Service]\nSlice=printing.slice\n")
    assert socket_unit_owner_paths("print.socket", unit_dirs=dirs) == [
        "/init.scope",
        "/system.slice/print.socket",
        "/printing.slice/cupsd.service",
    ]


def test_accept_socket_trusts_no_service_because_instances_never_bind(dirs):
    write(dirs[2] / "rsyncd.socket", "[Socket]\nListenStream=873\nAccept=yes\n")
    assert socket_unit_owner_paths("rsyncd.socket", unit_dirs=dirs) == [
        "/init.scope",
        "/system.slice/rsyncd.socket",
    ]


def test_socket_service_can_be_resolved_by_a_given_function(dirs):
    write(dirs[2] / "cups.socket", "[Socket]\nListenStream=631\n")
    paths = socket_unit_owner_paths("cups.socket", unit_dirs=dirs, resolve=lambda u: "/x/" + u)
    assert paths == ["/x/init.scope", "/x/cups.socket", "/x/cups.service"]


def test_socket_owner_paths_refuse_non_socket_units(dirs):
    with pytest.raises(UnitError, match="not a socket"):
        socket_unit_owner_paths("cups.service", unit_dirs=dirs)


def test_resolve_unit_uses_files_when_systemd_is_not_running(dirs, monkeypatch):
    monkeypatch.setattr(units, "systemd_running", lambda: False)
    write(dirs[2] / "db.service", "[Service]\nSlice=data.slice\n")
    assert resolve_unit("db.service", unit_dirs=dirs) == "/data.slice/db.service"
    assert units.ask_systemd("db.service") is None


def _fake_systemctl(monkeypatch, shown: dict[str, str] | None):
    monkeypatch.setattr(units, "systemd_running", lambda: True)
    calls = []

    def show(unit, properties):
        calls.append(unit)
        return shown

    monkeypatch.setattr(units, "_systemctl_show", show)
    return calls


def test_ask_systemd_returns_control_group_of_a_running_unit(monkeypatch):
    _fake_systemctl(
        monkeypatch,
        {
            "Id": "cups.service",
            "ControlGroup": "/system.slice/cups.service",
            "Slice": "system.slice",
            "LoadState": "loaded",
        },
    )
    assert units.ask_systemd("cups.service") == "/system.slice/cups.service"


def test_ask_systemd_builds_path_from_slice_and_id_when_not_started(monkeypatch):
    _fake_systemctl(
        monkeypatch,
        {
            "Id": "ssh.service",
            "ControlGroup": "",
            "Slice": "remote-admin.slice",
            "LoadState": "loaded",
        },
    )
    assert units.ask_systemd("sshd.service") == "/remote.slice/remote-admin.slice/ssh.service"


def test_ask_systemd_gives_up_on_units_it_cannot_find(monkeypatch):
    _fake_systemctl(
        monkeypatch, {"Id": "x.service", "ControlGroup": "", "Slice": "", "LoadState": "not-found"}
    )
    assert units.ask_systemd("x.service") is None
    assert resolve_unit("x.service") == "/system.slice/x.service"


def test_resolve_unit_prefers_systemd_when_it_runs(monkeypatch):
    _fake_systemctl(
        monkeypatch,
        {
            "Id": "db.service",
            "ControlGroup": "/custom/db.service",
            "Slice": "x.slice",
            "LoadState": "loaded",
        },
    )
    assert resolve_unit("db.service") == "/custom/db.service"


def test_resolve_unit_does_not_ask_systemd_when_given_unit_dirs(dirs, monkeypatch):
    calls = _fake_systemctl(monkeypatch, {"ControlGroup": "/elsewhere"})
    assert resolve_unit("db.service", unit_dirs=dirs) == "/system.slice/db.service"
    assert calls == []


def test_ask_systemd_survives_a_missing_or_hung_systemctl(monkeypatch):
    monkeypatch.setattr(units, "systemd_running", lambda: True)

    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], units.SYSTEMCTL_TIMEOUT)

    monkeypatch.setattr(subprocess, "run", hang)
    assert units.ask_systemd("db.service") is None


def _fake_nested_systemctl(monkeypatch, root: str, shown: dict[str, dict[str, str]]):
    """A systemd managing the subtree ``root`` (a container without a cgroup namespace)."""
    monkeypatch.setattr(units, "systemd_running", lambda: True)
    answers = {"-.slice": {"ControlGroup": root}, **shown}
    monkeypatch.setattr(units, "_systemctl_show", lambda unit, properties: answers.get(unit))


def test_nested_systemd_prefixes_not_started_units_with_its_root(monkeypatch):
    _fake_nested_systemctl(
        monkeypatch,
        "/machine/payload",
        {
            "db.service": {
                "Id": "db.service",
                "ControlGroup": "",
                "Slice": "system.slice",
                "LoadState": "loaded",
            }
        },
    )
    assert resolve_unit("db.service") == "/machine/payload/system.slice/db.service"


def test_nested_systemd_prefixes_units_it_cannot_find(monkeypatch):
    _fake_nested_systemctl(
        monkeypatch,
        "/machine/payload",
        {
            "x.service": {
                "Id": "x.service",
                "ControlGroup": "",
                "Slice": "",
                "LoadState": "not-found",
            }
        },
    )
    assert resolve_unit("x.service") == "/machine/payload/system.slice/x.service"


def test_nested_systemd_socket_owner_is_its_own_init_scope(dirs, monkeypatch):
    write(dirs[0] / "cups.socket", "[Socket]\nListenStream=631\n")
    _fake_nested_systemctl(
        monkeypatch,
        "/machine/payload",
        {
            "init.scope": {
                "Id": "init.scope",
                "ControlGroup": "/machine/payload/init.scope",
                "Slice": "-.slice",
                "LoadState": "loaded",
            },
            "cups.service": {
                "Id": "cups.service",
                "ControlGroup": "",
                "Slice": "system.slice",
                "LoadState": "loaded",
            },
            "cups.socket": {
                "Id": "cups.socket",
                "ControlGroup": "",
                "Slice": "system.slice",
                "LoadState": "loaded",
            },
        },
    )
    assert socket_unit_owner_paths("cups.socket", unit_dirs=dirs, resolve=resolve_unit) == [
        "/machine/payload/init.scope",
        "/machine/payload/system.slice/cups.socket",
        "/machine/payload/system.slice/cups.service",
    ]


def test_systemd_at_the_cgroup_root_adds_no_prefix(monkeypatch):
    _fake_nested_systemctl(
        monkeypatch,
        "/",
        {
            "db.service": {
                "Id": "db.service",
                "ControlGroup": "",
                "Slice": "system.slice",
                "LoadState": "loaded",
            }
        },
    )
    assert resolve_unit("db.service") == "/system.slice/db.service"


def _fake_systemctl_process(monkeypatch, answers: dict[str, dict[str, str]]):
    """A systemctl that answers `show` for any number of units, one block each; records calls."""
    monkeypatch.setattr(units, "systemd_running", lambda: True)
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        names = command[command.index("--") + 1 :]
        unknown = {"LoadState": "not-found"}
        blocks = [
            "\n".join(f"{k}={v}" for k, v in answers.get(n, {"Id": n, **unknown}).items())
            for n in names
        ]
        return subprocess.CompletedProcess(command, 0, "\n\n".join(blocks) + "\n", "")

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def _loaded(unit: str, slice_name: str = "system.slice", group: str = "") -> dict[str, str]:
    return {"Id": unit, "ControlGroup": group, "Slice": slice_name, "LoadState": "loaded"}


def test_a_batch_asks_systemd_once_for_every_unit(monkeypatch):
    calls = _fake_systemctl_process(
        monkeypatch,
        {
            "-.slice": {"Id": "-.slice", "ControlGroup": "/", "Slice": "", "LoadState": "loaded"},
            "cups.service": _loaded("cups.service", group="/system.slice/cups.service"),
            "db.service": _loaded("db.service", "data.slice"),
        },
    )
    with units.systemd_batch(["cups.service", "db.service", "cups.service"]):
        assert resolve_unit("cups.service") == "/system.slice/cups.service"
        assert resolve_unit("db.service") == "/data.slice/db.service"
        assert resolve_unit("db.service") == "/data.slice/db.service"
    assert len(calls) == 1
    assert calls[0][calls[0].index("--") + 1 :] == ["-.slice", "cups.service", "db.service"]


def test_a_unit_missing_from_the_batch_is_asked_once(monkeypatch):
    calls = _fake_systemctl_process(monkeypatch, {"x.service": _loaded("x.service")})
    with units.systemd_batch([]):
        assert resolve_unit("x.service") == "/system.slice/x.service"
        assert resolve_unit("x.service") == "/system.slice/x.service"
    assert len(calls) == 2  # the batch (-.slice), then x.service once


def test_a_hung_systemctl_is_waited_for_once_per_batch(monkeypatch):
    monkeypatch.setattr(units, "systemd_running", lambda: True)
    calls = []

    def hang(command, **kwargs):
        calls.append(command)
        raise subprocess.TimeoutExpired(command, units.SYSTEMCTL_TIMEOUT)

    monkeypatch.setattr(subprocess, "run", hang)
    with units.systemd_batch(["a.service", "b.service"]):
        assert resolve_unit("a.service") == "/system.slice/a.service"
        assert resolve_unit("b.service") == "/system.slice/b.service"
    assert len(calls) == 1


def test_a_batch_answer_that_does_not_split_per_unit_falls_back_to_one_question_each(monkeypatch):
    monkeypatch.setattr(units, "systemd_running", lambda: True)
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(
            command, 0, "Id=db.service\nSlice=data.slice\nLoadState=loaded\nControlGroup=\n", ""
        )

    monkeypatch.setattr(subprocess, "run", run)
    with units.systemd_batch(["db.service", "other.service"]):
        assert resolve_unit("db.service") == "/data.slice/db.service"
    assert len(calls) == 3  # the batch, db.service, -.slice (for a not-started unit's root)


def test_resolving_a_config_asks_systemd_once(tmp_path, monkeypatch):
    from guard.policy import config, owners

    monkeypatch.delenv(owners.UNIT_DIRS_ENV, raising=False)
    calls = _fake_systemctl_process(
        monkeypatch,
        {
            "-.slice": {"Id": "-.slice", "ControlGroup": "/", "Slice": "", "LoadState": "loaded"},
            "init.scope": _loaded("init.scope", "-.slice", "/init.scope"),
            "cups.service": _loaded("cups.service"),
            "dovecot.service": _loaded("dovecot.service"),
        },
    )
    path = tmp_path / "portguard.toml"
    path.write_text(
        '[guard]\ntrust_init = true\nportreserve_dir = ""\n'
        '[[reserve]]\nports = [631]\nunits = ["cups.service", "dovecot.service"]\n'
        '[[reserve]]\nports = [993]\nunit = "dovecot.service"\n'
    )
    blocks, extra = owners.resolve_all(config.load([path]))
    assert len(calls) == 1
    assert [o.path for o in extra] == ["/init.scope"]
    assert sorted(o.path for block in blocks for o in block.owners) == [
        "/system.slice/cups.service",
        "/system.slice/dovecot.service",
        "/system.slice/dovecot.service",
    ]


@pytest.mark.parametrize(
    ("lines", "ports"),
    [
        ("ListenStream=/run/cups/cups.sock\n", set()),  # Debian's cups.socket
        ("ListenStream=631\n", {("tcp", 631)}),
        ("ListenStream=0.0.0.0:873\nListenStream=[::]:873\n", {("tcp", 873)}),
        ("ListenStream=143\nListenStream=993\n", {("tcp", 143), ("tcp", 993)}),
        ("ListenDatagram=127.0.0.1:631%lo\n", {("udp", 631)}),
        ("ListenStream=@abstract\nListenStream=vsock:2:873\n", set()),
        ("ListenStream=631\nListenStream=\nListenStream=632\n", {("tcp", 632)}),  # reset
    ],
)
def test_socket_listen_ports_are_what_listen_lines_name(dirs, lines, ports):
    write(dirs[2] / "x.socket", "[Socket]\n" + lines)
    assert units.socket_listen_ports("x.socket", unit_dirs=dirs) == ports


def test_socket_listen_ports_follow_dropins_and_a_missing_unit_listens_on_nothing(dirs):
    write(dirs[2] / "x.socket", "[Socket]\nListenStream=/run/x.sock\n")
    write(dirs[0] / "x.socket.d" / "port.conf", "[Socket]\nListenStream=873\n")
    assert units.socket_listen_ports("x.socket", unit_dirs=dirs) == {("tcp", 873)}
    assert units.socket_listen_ports("none.socket", unit_dirs=dirs) == frozenset()


def test_a_listing_cache_answers_as_the_files_do_and_lists_each_directory_once(dirs, monkeypatch):
    write(dirs[2] / "ssh.service", "[Service]\nExecStart=/usr/sbin/sshd -D\n")
    os.symlink(dirs[2] / "ssh.service", dirs[0] / "sshd.service")
    write(dirs[0] / "sshd.service.d" / "slice.conf", "[Service]\nSlice=remote.slice\n")
    write(dirs[2] / "foo-.service.d" / "slice.conf", "[Service]\nSlice=foo.slice\n")
    write(dirs[1] / "service.d" / "all.conf", "[Service]\nNice=1\n")
    write(dirs[2] / "vpn@.service", "[Service]\nExecStart=/bin/true\n")
    write(dirs[0] / "vpn@office.service.d" / "s.conf", "[Service]\nSlice=office.slice\n")
    write(dirs[0] / "masked.service", "")
    names = [
        "sshd.service",
        "foo-bar.service",
        "vpn@office.service",
        "vpn@home.service",
        "masked.service",
        "absent.service",
    ]

    def answers():
        return [
            (
                unit_cgroup_path(name, unit_dirs=dirs),
                load_unit(name, unit_dirs=dirs),
                units.dropin_files([name], dirs),
            )
            for name in names
        ]

    plain = answers()
    listed: list[Path] = []
    real_listdir = os.listdir

    def counting_listdir(path):
        listed.append(Path(path))
        return real_listdir(path)

    monkeypatch.setattr(units.os, "listdir", counting_listdir)
    with units.listing_cache():
        assert answers() == plain
    # each unit directory listed once (the others listed are the drop-in directories read)
    assert sorted(p for p in listed if p in dirs) == sorted(dirs)
    # outside the block nothing is remembered: a file written now is seen at once
    write(dirs[0] / "absent.service", "[Service]\nSlice=new.slice\n")
    assert unit_cgroup_path("absent.service", unit_dirs=dirs) == "/new.slice/absent.service"
