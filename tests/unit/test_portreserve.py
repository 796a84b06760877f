"""portreserve's /etc/portreserve files read as they are, and converted to portguard TOML."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from guard.policy.portreserve import (
    PortreserveEntry,
    PortreserveError,
    read_portreserve,
    to_toml,
)


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    directory = tmp_path / "portreserve"
    directory.mkdir()
    return directory


def test_real_cups_and_rsync_files_are_read(confdir):
    (confdir / "cups").write_text("ipp\n")
    (confdir / "rsync").write_text("873/tcp\n")
    assert read_portreserve(confdir) == [
        PortreserveEntry(spec="ipp", unit="cups.service", file=str(confdir / "cups"), line=1),
        PortreserveEntry(spec="873/tcp", unit="rsync.service", file=str(confdir / "rsync"), line=1),
    ]


def test_names_with_dot_or_tilde_are_skipped_like_portreserve_does(confdir):
    (confdir / "cups").write_text("ipp\n")
    (confdir / "foo.rpmsave").write_text("999\n")
    (confdir / "bar~").write_text("998\n")
    (confdir / ".hidden").write_text("997\n")
    assert [e.unit for e in read_portreserve(confdir)] == ["cups.service"]


def test_subdirectories_are_not_config_files(confdir):
    (confdir / "sub").mkdir()
    assert read_portreserve(confdir) == []


def test_comments_and_blank_lines_are_ignored_and_lines_counted(confdir):
    (confdir / "dovecot").write_text("# IMAP and POP3 over TLS\n\nimaps\n   \npop3s/tcp  \n")
    entries = read_portreserve(confdir)
    assert [(e.spec, e.line) for e in entries] == [("imaps", 3), ("pop3s/tcp", 5)]


def test_missing_directory_means_no_entries(tmp_path):
    assert read_portreserve(tmp_path / "absent") == []


def test_bad_line_is_reported_with_file_and_line(confdir):
    (confdir / "cups").write_text("ipp\nipp/sctp\n")
    with pytest.raises(PortreserveError, match=rf"^{confdir / 'cups'}:2: 'ipp/sctp'"):
        read_portreserve(confdir)


def test_out_of_range_port_is_reported(confdir):
    (confdir / "big").write_text("70000\n")
    with pytest.raises(PortreserveError, match=r"big:1: port 70000 is out of range"):
        read_portreserve(confdir)


def test_unreadable_file_is_reported(confdir, monkeypatch):
    (confdir / "cups").write_text("ipp\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    # chmod 0 does not stop root, who runs these tests in CI; fail the read itself instead.
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(PortreserveError, match=r"cups:1: cannot read: Permission denied"):
        read_portreserve(confdir)


def test_non_utf8_file_is_reported_with_its_line(confdir):
    (confdir / "cups").write_bytes(b"ipp\n\xff\n")
    with pytest.raises(PortreserveError, match=r"cups:2: not valid UTF-8"):
        read_portreserve(confdir)


def test_file_name_that_cannot_be_a_service_is_reported(confdir):
    (confdir / "my cups").write_text("ipp\n")
    with pytest.raises(PortreserveError, match=r"my cups:1: the file name does not name a service"):
        read_portreserve(confdir)


def test_errors_are_value_errors():
    assert issubclass(PortreserveError, ValueError)


def test_to_toml_gives_one_block_per_unit_that_parses_back(confdir):
    (confdir / "cups").write_text("ipp\nipp/udp\nipp\n")
    (confdir / "rsync").write_text("873/tcp\n")
    text = to_toml(read_portreserve(confdir))
    data = tomllib.loads(text)
    assert data == {
        "reserve": [
            {"ports": ["ipp", "ipp/udp"], "unit": "cups.service"},
            {"ports": ["873/tcp"], "unit": "rsync.service"},
        ]
    }
    assert f"# from {confdir / 'cups'}\n[[reserve]]" in text
    assert "IPv6" in text


def test_to_toml_of_nothing_is_valid_and_empty():
    assert tomllib.loads(to_toml([])) == {}


def test_to_toml_keeps_odd_file_names_inside_the_comment():
    entry = PortreserveEntry(spec="631", unit="cups.service", file="/x/cu\nps", line=1)
    assert tomllib.loads(to_toml([entry])) == {
        "reserve": [{"ports": ["631"], "unit": "cups.service"}]
    }
