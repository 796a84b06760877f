"""Parsing and validating configuration: every problem named by file:line, nothing partial."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.policy import config
from guard.policy.config import ConfigError
from guard.policy.ports import PortRange


def load_text(tmp_path: Path, text: str, name: str = "portguard.toml") -> config.Config:
    path = tmp_path / name
    path.write_text(text)
    services = tmp_path / "services"
    services.write_text("ipp 631/tcp\ndomain 53/tcp\ndomain 53/udp\n")
    return config.load([path], services_file=services)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    return exc.value.problems


GOOD = """\
[guard]
cgroup = "/"
pin_dir = "/sys/fs/bpf/portguard"
deny_errno = "EADDRINUSE"
portreserve_dir = ""

[[reserve]]
ports = ["ipp", "8000-8010/tcp", "53/udp"]
cgroup = "/system.slice/cups.service"
"""


def test_the_issue_example_parses(tmp_path):
    cfg = load_text(tmp_path, GOOD)
    (block,) = cfg.blocks
    assert [r for r, _ in block.ports] == [
        PortRange(631, 631, ("tcp", "udp")),  # a service name known for tcp names both
        PortRange(8000, 8010, ("tcp",)),
        PortRange(53, 53, ("udp",)),
    ]
    assert [(o.kind, o.name) for o in block.owners] == [("cgroup", "/system.slice/cups.service")]
    assert cfg.settings.deny_errno_number == 98


@pytest.mark.parametrize(
    "line, message",
    [
        ('ports = ["0"]', "port 0 is out of range"),
        ('ports = ["65536"]', "port 65536 is out of range"),
        ('ports = ["10-5"]', "bad range '10-5'"),
        ('ports = ["5-"]', "bad range"),
        ('ports = ["nosuchservice"]', "unknown service name 'nosuchservice'"),
        ('ports = ["631/sctp"]', "unknown protocol 'sctp'"),
        ("ports = []", "ports must be a non-empty list"),
        ('ports = "631"', "ports must be a non-empty list"),
        ("bogus = 1", "unknown key 'bogus' in [[reserve]]"),
    ],
)
def test_bad_reservation_names_file_and_line(tmp_path, line, message):
    text = f'[guard]\nportreserve_dir = ""\n\n[[reserve]]\ncgroup = "/a"\n{line}\n'
    found = problems(tmp_path, text)
    assert any(
        p.startswith(f"{tmp_path / 'portguard.toml'}:6: ") and message in p for p in found
    ), found


@pytest.mark.parametrize(
    "owner, message",
    [
        ('cgroup = "system.slice/cups.service"', "must be absolute"),
        ('cgroup = "/a/../b"', "may not contain '.', '..'"),
        ("cgroups = []", "cgroups must be a non-empty list"),
        ("cgroup = 5", "must be a string"),
        (f'cgroup = "/{"x" * 300}"', "at most 254 fit the kernel's key"),
    ],
)
def test_bad_owner_is_refused(tmp_path, owner, message):
    found = problems(
        tmp_path, f'[guard]\nportreserve_dir = ""\n[[reserve]]\nports = ["1"]\n{owner}\n'
    )
    assert any(":5: " in p and message in p for p in found), found


def test_reservation_without_owner_is_refused(tmp_path):
    found = problems(tmp_path, '[guard]\nportreserve_dir = ""\n[[reserve]]\nports = ["1"]\n')
    assert found == [
        f"{tmp_path / 'portguard.toml'}:3: [[reserve]] needs an owner: cgroup, cgroups, "
        "unit, units or slice"
    ]


@pytest.mark.parametrize(
    "setting, message",
    [
        ('deny_errno = "ENOENT"', "deny_errno 'ENOENT' is not one of"),
        ('mode = "loud"', "mode 'loud' is not one of"),
        ('pin_dir = "relative"', "must be an absolute path"),
        ('trust_init = "yes"', "trust_init must be true or false"),
        ('colour = "blue"', "unknown key 'colour' in [guard]"),
    ],
)
def test_bad_guard_setting_names_its_line(tmp_path, setting, message):
    found = problems(tmp_path, f'[guard]\nportreserve_dir = ""\n{setting}\n')
    assert any(":3: " in p and message in p for p in found), found


def test_every_guard_setting_has_a_check_and_every_check_a_setting():
    assert list(config.GUARD_KEYS) == list(config.Settings._fields)


def test_toml_syntax_error_names_the_line(tmp_path):
    found = problems(tmp_path, '[guard]\nportreserve_dir = ""\n[[reserve]]\nports = ["1"\n')
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'portguard.toml'}:")
    assert "TOML syntax error" in found[0]


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "portguard.toml"
    path.write_bytes(b'[guard]\nportreserve_dir = ""\n# caf\xe9\n')
    with pytest.raises(ConfigError) as exc:
        config.load([path])
    assert exc.value.problems == [f"{path}:3: not valid UTF-8"]


def test_unknown_table_is_refused(tmp_path):
    found = problems(tmp_path, '[guard]\nportreserve_dir = ""\n[reserved]\nports = ["1"]\n')
    assert any("unknown table or key 'reserved'" in p for p in found)


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems(
        tmp_path,
        '[guard]\nportreserve_dir = ""\nmode = "x"\n[[reserve]]\n'
        'ports = ["0", "70000"]\ncgroup = "rel"\n',
    )
    assert len(found) == 4


def test_dropins_accumulate_in_lexical_order_and_later_guard_keys_win(tmp_path):
    main = tmp_path / "portguard.toml"
    main.write_text(
        '[guard]\nportreserve_dir = ""\nmode = "audit"\n[[reserve]]\nports = ["1"]\ncgroup = "/a"\n'
    )
    dropins = tmp_path / "conf.d"
    dropins.mkdir()
    (dropins / "20-b.toml").write_text('[[reserve]]\nports = ["3"]\ncgroup = "/c"\n')
    (dropins / "10-a.toml").write_text(
        '[guard]\nmode = "enforce"\n[[reserve]]\nports = ["2"]\ncgroup = "/b"\n'
    )
    (dropins / "ignored.conf").write_text("not toml at all")
    files = config.config_files(main)
    assert [f.name for f in files] == ["portguard.toml", "10-a.toml", "20-b.toml"]
    cfg = config.load(files)
    assert [b.owners[0].name for b in cfg.blocks] == ["/a", "/b", "/c"]
    assert cfg.settings.mode == "enforce"


def test_no_files_means_the_default_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PORTRESERVE_DIR", "")
    cfg = config.load([])
    assert cfg.files == ("<default policy>",)
    ports = {r.first for b in cfg.blocks for r, _ in b.ports}
    assert {631, 636, 749, 783, 873} <= ports


def test_own_files_replace_the_default_unless_asked(tmp_path):
    text = '[guard]\nportreserve_dir = ""\n[[reserve]]\nports = ["1"]\ncgroup = "/a"\n'
    assert len(load_text(tmp_path, text).blocks) == 1
    with_defaults = load_text(tmp_path, text.replace("[guard]\n", "[guard]\nuse_defaults = true\n"))
    assert len(with_defaults.blocks) > 1


def test_portreserve_files_are_read_as_they_are(tmp_path):
    pr = tmp_path / "portreserve"
    pr.mkdir()
    (pr / "cups").write_text("ipp\n")
    (pr / "rsync").write_text("873/tcp\n")
    (pr / "old.rpmsave").write_text("999\n")
    cfg = load_text(tmp_path, f'[guard]\nportreserve_dir = "{pr}"\n')
    got = [(b.owners[0].name, b.ports[0][0], b.origin.line) for b in cfg.blocks]
    assert got == [
        ("cups.service", PortRange(631, 631, ("tcp", "udp")), 1),
        ("rsync.service", PortRange(873, 873, ("tcp",)), 1),
    ]


def test_portreserve_bad_line_is_a_config_error(tmp_path):
    pr = tmp_path / "portreserve"
    pr.mkdir()
    (pr / "cups").write_text("ipp\nnosuchservice\n")
    found = problems(tmp_path, f'[guard]\nportreserve_dir = "{pr}"\n')
    assert any(p.startswith(f"{pr / 'cups'}:2: ") for p in found), found


def test_settings_can_be_read_from_a_file_with_bad_reservations(tmp_path):
    path = tmp_path / "portguard.toml"
    path.write_text(
        '[guard]\npin_dir = "/sys/fs/bpf/x"\n[[reserve]]\nports = ["0"]\ncgroup = "/a"\n'
    )
    assert config.load_settings([path]).pin_dir == "/sys/fs/bpf/x"


def test_a_service_name_without_etc_services_names_the_package(tmp_path):
    # A minimal Debian system with cups or rsync has no /etc/services (no netbase).
    text = '[[reserve]]\ncgroup = "/a"\nports = ["ipp"]\n'
    with pytest.raises(ConfigError) as exc:
        config.loads(text, "x.toml", services_file=tmp_path / "no-services")
    assert exc.value.problems == [
        "x.toml:3: service name 'ipp' cannot be looked up: there is no "
        f"{tmp_path / 'no-services'} (Debian's netbase package provides it); install it or give "
        "the port number"
    ]
