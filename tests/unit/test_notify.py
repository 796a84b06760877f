"""READY=1 reaches $NOTIFY_SOCKET as sd_notify(3) sends it (a path, or an abstract name
written with '@'), once; without the variable nothing is sent; an unreachable socket is said."""

from __future__ import annotations

import os
import socket

import pytest

from guard import notify


@pytest.fixture
def receiver():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    yield sock
    sock.close()


def test_ready_reaches_a_socket_named_by_its_path(receiver, tmp_path, monkeypatch):
    path = tmp_path / "notify"
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notify.ready()
    assert receiver.recv(64) == b"READY=1"


def test_ready_reaches_an_abstract_socket_written_with_an_at_sign(receiver, monkeypatch):
    name = f"portguard-notify-test-{os.getpid()}"
    receiver.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    notify.ready()
    assert receiver.recv(64) == b"READY=1"


def test_ready_is_sent_once_and_not_passed_on_to_children(receiver, tmp_path, monkeypatch):
    path = tmp_path / "notify"
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notify.ready()
    notify.ready()
    assert "NOTIFY_SOCKET" not in os.environ
    assert receiver.recv(64) == b"READY=1"
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.recv(64)


def test_without_notify_socket_nothing_is_sent_or_said(monkeypatch, capsys):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify.ready()
    assert capsys.readouterr() == ("", "")


def test_an_unreachable_socket_is_said_on_stderr_and_apply_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    notify.ready()
    err = capsys.readouterr().err
    assert err.startswith("portguard: cannot tell systemd the guard is in force: ")
