"""Missing kernel features and missing mounts: one clear sentence or an explicit warning.

The probes are faked (kernel.Features); real old kernels are the VM matrix's job.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from guard import cli
from guard.errors import GuardError
from guard.kernel import host
from guard.kernel import libbpf as kernel
from guard.policy.config import Settings

ALL = kernel.Features()


@pytest.mark.parametrize(
    "feature, says",
    [
        ("btf", "kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)"),
        ("bpf_link", "BPF links for cgroup programs (Linux >= 5.7)"),
        ("ancestor_cgroup", "bpf_get_current_ancestor_cgroup_id"),
        ("netns_cookie", "would also refuse binds inside every container's own network namespace"),
    ],
)
def test_a_missing_essential_feature_refuses_naming_it_and_what_it_costs(feature, says):
    features = ALL._replace(**{feature: False})
    with pytest.raises(GuardError) as exc:
        host.choose_denial(Settings(), features)
    assert str(exc.value).startswith(
        "this kernel cannot run portguard, nothing was loaded; it lacks "
    )
    assert says in str(exc.value)


def test_every_missing_feature_is_named_at_once():
    with pytest.raises(GuardError) as exc:
        host.choose_denial(Settings(), kernel.Features(False, False, False, False, False))
    assert str(exc.value).count("; and ") == 3


REFUSED = "loading an fmod_ret program failed: Operation not permitted"


def takes_hook() -> None:
    return None


def refuses_hook() -> str:
    return REFUSED


def test_without_set_retval_the_guard_refuses_at_security_socket_bind_where_it_attaches():
    no_retval = ALL._replace(set_retval=False)
    assert host.choose_denial(Settings(), no_retval, takes_hook) == ("socket_bind", [])


def test_with_set_retval_the_hook_is_not_even_probed():
    def never() -> None:
        raise AssertionError("probed")

    assert host.choose_denial(Settings(), ALL, never) == ("retval", [])


def test_without_either_road_the_guard_degrades_to_eperm_and_says_what_is_lost():
    variant, notes = host.choose_denial(Settings(), ALL._replace(set_retval=False), refuses_hook)
    assert variant == "eperm"
    assert notes == [
        (
            "this kernel lacks bpf_set_retval (Linux < 5.18) and refuses fmod_ret programs on "
            f"security_socket_bind ({REFUSED}): refused binds fail with EPERM, not EADDRINUSE"
        )
    ]


def test_without_either_road_and_eperm_configured_nothing_is_lost():
    settings = Settings(deny_errno="EPERM")
    assert host.choose_denial(settings, ALL._replace(set_retval=False), refuses_hook) == (
        "eperm",
        [],
    )


@pytest.mark.parametrize(
    "refuse_at, denial",
    [("cgroup", "retval"), ("security_socket_bind", "socket_bind"), ("cgroup-eperm", "eperm")],
)
def test_refuse_at_forces_a_road_the_kernel_offers(refuse_at, denial):
    variant, notes = host.choose_denial(Settings(refuse_at=refuse_at), ALL, takes_hook)
    assert variant == denial
    if denial == "eperm":
        assert notes == [
            'refuse_at = "cgroup-eperm": refused binds fail with EPERM, not EADDRINUSE'
        ]
    else:
        assert notes == []


def test_refuse_at_a_road_the_kernel_refuses_is_an_error_naming_why():
    with pytest.raises(GuardError) as exc:
        host.choose_denial(Settings(refuse_at="security_socket_bind"), ALL, refuses_hook)
    assert str(exc.value) == (
        'refuse_at = "security_socket_bind": this kernel refuses fmod_ret programs on '
        f'security_socket_bind ({REFUSED}); nothing applied (set refuse_at = "auto")'
    )
    with pytest.raises(GuardError) as exc:
        host.choose_denial(
            Settings(refuse_at="cgroup"), ALL._replace(set_retval=False), refuses_hook
        )
    assert str(exc.value).startswith(
        'refuse_at = "cgroup": this kernel refuses bpf_set_retval in cgroup bind programs'
    )


def test_the_warning_reaches_the_user_and_the_refusal_exits_1_without_traceback(
    tmp_path, monkeypatch
):
    config = tmp_path / "portguard.toml"
    config.write_text('[[reserve]]\nports = ["7000"]\ncgroup = "/x"\n')
    monkeypatch.setattr(kernel, "probe_features", lambda: kernel.Features(bpf_link=False))
    monkeypatch.setattr(host, "preflight", lambda *a, **k: (tmp_path, tmp_path))
    result = CliRunner().invoke(cli.main, ["--config", str(config), "apply"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Error: this kernel cannot run portguard" in result.output


# ---- mounts ----------------------------------------------------------------------------------


def _mounts(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mounts"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


@pytest.fixture
def as_root(monkeypatch):
    monkeypatch.setattr(host.os, "geteuid", lambda: 0)


def test_no_cgroup2_is_one_clear_sentence(tmp_path, as_root):
    mounts = _mounts(
        tmp_path, "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0", "bpf /sys/fs/bpf bpf rw 0 0"
    )
    with pytest.raises(
        GuardError,
        match=r"^no cgroup2 file system is mounted \(portguard needs the unified hierarchy\)$",
    ):
        host.preflight(Settings(), mount_bpffs=False, mounts=mounts)


def test_unreadable_mount_table_is_one_clear_sentence(tmp_path, as_root):
    with pytest.raises(GuardError, match=r"^cannot read .*/nope: No such file or directory$"):
        host.preflight(Settings(), mount_bpffs=False, mounts=tmp_path / "nope")


def test_missing_attach_cgroup_is_one_clear_sentence(tmp_path, as_root):
    mounts = _mounts(tmp_path, f"cgroup2 {tmp_path} cgroup2 rw 0 0")
    with pytest.raises(GuardError, match=r"^the attach cgroup /gone does not exist under "):
        host.preflight(Settings(cgroup="/gone"), mount_bpffs=False, mounts=mounts)


def test_pin_dir_off_bpffs_is_one_clear_sentence_naming_the_fix(tmp_path, as_root):
    (tmp_path / "top").mkdir()
    mounts = _mounts(tmp_path, f"cgroup2 {tmp_path} cgroup2 rw 0 0")
    with pytest.raises(GuardError, match=r"is not on a BPF file system \(mount -t bpf bpf"):
        host.preflight(
            Settings(cgroup="/top", pin_dir="/sys/fs/bpf/portguard"),
            mount_bpffs=False,
            mounts=mounts,
        )


def test_with_everything_mounted_preflight_names_the_places(tmp_path, as_root):
    (tmp_path / "top").mkdir()
    mounts = _mounts(tmp_path, f"cgroup2 {tmp_path} cgroup2 rw 0 0", "bpf /sys/fs/bpf bpf rw 0 0")
    assert host.preflight(Settings(cgroup="/top"), mount_bpffs=False, mounts=mounts) == (
        str(tmp_path),
        str(tmp_path / "top"),
    )
