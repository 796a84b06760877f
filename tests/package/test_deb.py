"""The Debian package as built from this tree: what it installs, what it depends on, lintian.

No root and no kernel needed (the build runs `./dev.sh deb`, which installs Build-Depends when
they are missing, so as root in CI). The package's life on a running system (install, upgrade,
remove, trigger) is tested with real systemd in tests/systemd.
"""

from __future__ import annotations

import subprocess

import pytest

from guard.kernel import objects
from tests import debs


@pytest.fixture(scope="module")
def deb():
    return debs.package()


def _field(deb, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def _files(deb) -> set[str]:
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[-1].removeprefix(".") for line in listing.splitlines()}


def test_depends_only_on_what_debian_ships(deb):
    depends = {d.strip().split()[0] for d in _field(deb, "Depends").split(",")}
    assert depends == {"python3:any", "python3-click", "libbpf1", "netbase"}
    assert "python3:any (>= 3.11~)" in _field(deb, "Depends")
    assert _field(deb, "Architecture") == "all"


def test_recommends_bpftool_for_the_minimal_btf_and_nothing_else(deb):
    # without it the guard loads with the kernel's whole BTF (guard/kernel/corebtf.py)
    assert _field(deb, "Recommends") == "bpftool"


def test_installs_commands_units_config_docs_and_the_compiled_object(deb):
    files = _files(deb)
    for path in (
        "/usr/bin/portguard",
        "/usr/bin/portrelease",
        "/lib/systemd/system/portguard.service",
        "/lib/systemd/system/portguard-monitor.service",
        "/lib/systemd/system/portguard-metrics.service",
        "/lib/systemd/system/portguard-metrics.timer",
        "/lib/systemd/system/portguard-reload.path",
        "/lib/systemd/system/portguard-reload.service",
        "/lib/systemd/system-generators/portguard-generator",
        "/etc/portguard/portguard.toml",
        "/etc/portguard/conf.d/",
        "/usr/share/man/man8/portguard.8.gz",
        "/usr/share/man/man5/portguard.toml.5.gz",
        "/usr/share/man/man8/portrelease.8.gz",
        "/usr/share/bash-completion/completions/portguard",
    ):
        assert path in files, path
    assert not any(p.startswith("/etc/systemd/") for p in files)  # masking must keep working
    shipped = "/usr/lib/python3/dist-packages/guard/bpf/"
    for target in objects.TARGETS.values():
        name = objects.object_name(target)
        assert shipped + name in files and shipped + name.replace(".o", ".sha256") in files


def test_the_configuration_is_a_conffile(deb):
    out = subprocess.run(
        ["dpkg-deb", "--info", str(deb), "conffiles"], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["/etc/portguard/portguard.toml"]


def test_lintian_reports_no_errors_and_no_warnings(deb):
    proc = subprocess.run(
        ["lintian", "--pedantic", "-I", str(deb)], capture_output=True, text=True, check=False
    )
    tags = [line for line in proc.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert tags == [], proc.stdout
