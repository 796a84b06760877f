"""portguard refuses to run inside a cgroup namespace, where its cgroup paths are not the
kernel's. Measured with a real systemd (nspawn's default, SYSTEMD_NSPAWN_USE_CGNS=1): systemd
reports /system.slice/x.service, the cgroup_mkdir tracepoint /<container>/payload/system.slice/
x.service, and BPF levels count from the real root, so before this check every owner unit was
refused its own port at boot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guard.kernel import cgroups
from tests.systemd.conftest import booted
from tests.systemd.machine import Machine


@pytest.fixture(scope="module")
def machine_in_cgroup_namespace() -> Iterator[Machine]:
    with booted(cgroup_namespace=True) as box:
        yield box


def test_namespace_check_refuses_other_namespaces_and_passes_without_namespaces(tmp_path: Path):
    fake = tmp_path / "cgroup"
    fake.touch()
    with pytest.raises(cgroups.CgroupError, match="host's cgroup namespace"):
        cgroups.require_initial_namespace(fake)
    cgroups.require_initial_namespace(tmp_path / "absent")  # kernel without cgroup namespaces


@pytest.mark.kernel
def test_portguard_service_refuses_to_apply_inside_a_cgroup_namespace(
    machine_in_cgroup_namespace: Machine,
):
    box = machine_in_cgroup_namespace
    assert box.show("portguard.service", "Result")["Result"] == "exit-code"
    journal = box.run("journalctl", "-b", "--no-pager", "-u", "portguard.service", check=True)
    assert "must run in the host's cgroup namespace" in journal.stdout
    status = box.run("portguard", "status")
    assert status.returncode == 4 and "not loaded" in status.stdout
    # status says why: the boot's apply failed, and its sentence was kept in /run
    assert "the last apply failed" in status.stderr
    assert "must run in the host's cgroup namespace" in status.stderr
