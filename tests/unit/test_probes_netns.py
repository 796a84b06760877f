"""Kernels before 5.14 cannot report the network namespace cookie: guard every namespace."""

from __future__ import annotations

import _socket
import errno

import pytest

from guard.kernel import host, snapshot


class NoCookieSocket(_socket.socket):
    def getsockopt(self, level, option, *args):
        if option == snapshot.SO_NETNS_COOKIE:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        return super().getsockopt(level, option, *args)


def test_missing_so_netns_cookie_means_cookie_zero(monkeypatch):
    monkeypatch.setattr(_socket, "socket", NoCookieSocket)
    assert host.netns_cookie() == 0


def test_other_getsockopt_errors_are_not_hidden(monkeypatch):
    class Broken(_socket.socket):
        def getsockopt(self, level, option, *args):
            raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(_socket, "socket", Broken)
    with pytest.raises(OSError):
        host.netns_cookie()


def test_this_kernel_reports_a_cookie():
    assert host.netns_cookie() > 0
