"""bindresvport()'s exposure when refusals are not EADDRINUSE (guard/resvport.py)."""

from __future__ import annotations

import errno

from guard.policy import resvport

DEBIAN = "# comment\n631\n636\n655\n774\n783\n873\n921\n993\n995\n"


def test_the_blacklist_is_read_like_libtirpc_reads_it(tmp_path):
    path = tmp_path / "bindresvport.blacklist"
    path.write_text(DEBIAN + "  749  # kadmin\nnot-a-port\n70000\n")
    assert resvport.read_blacklist(path) == {631, 636, 655, 774, 783, 873, 921, 993, 995, 749}
    assert resvport.read_blacklist(tmp_path / "none") == set()


def test_exposed_ports_are_the_reserved_ones_in_512_1023_the_blacklist_lacks():
    listed = {631, 636, 655, 774, 783, 873, 921, 993, 995}
    reserved = [631, 749, 873, 1023, 511, 1024, 8080, 993, 512]
    assert resvport.exposed(reserved, errno.EPERM, listed) == [512, 749, 1023]
    assert resvport.exposed(reserved, errno.EACCES, listed) == [512, 749, 1023]


def test_nothing_is_exposed_while_refusals_are_eaddrinuse():
    assert resvport.exposed([749], errno.EADDRINUSE, set()) == []
    assert resvport.exposed([749], None, set()) == []


def test_the_warning_names_the_ports_and_what_to_do(tmp_path):
    text = resvport.warning([749, 1023], "EPERM", tmp_path / "bl")
    assert "refused binds see EPERM" in text and "bindresvport() gives up" in text
    assert "add the reserved port(s) 749, 1023 to it, one per line" in text
    assert str(tmp_path / "bl") in text
