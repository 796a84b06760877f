from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.kernel.sandbox import missing, require_root_and_cgroup2
from tests.systemd import rootfs
from tests.systemd.guest_files import bpf_objects, guest_files
from tests.systemd.machine import Machine, MachineError

HOST_BPFFS = Path("/sys/fs/bpf")


def _prerequisites() -> Path:
    cgroup_root = require_root_and_cgroup2(
        "systemd tests need root (debootstrap, overlay mounts, systemd-nspawn)"
    )
    for tool in ("nsenter", "mount"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed")
    return cgroup_root


@contextmanager
def booted(objects_dir: Path, *, cgroup_namespace: bool = False) -> Iterator[Machine]:
    """Debian with portguard.service enabled, booted; everything removed afterwards."""
    cgroup_root = _prerequisites()
    try:
        tree = rootfs.ensure_rootfs(log=print)
    except rootfs.SetupError as exc:
        missing(str(exc))
    objects = bpf_objects(objects_dir)
    guest_pin_on_host = (HOST_BPFFS / "portguard").exists()
    box = Machine(tree, cgroup_root, {}, cgroup_namespace=cgroup_namespace)
    # Inside a cgroup namespace the guest's root cgroup is "/" to it (and the container's
    # subtree to the kernel); without one the guest sees the host's paths.
    box.files = guest_files("/" if cgroup_namespace else box.cgroup, objects)
    try:
        try:
            box.start()
        except MachineError as exc:
            pytest.fail(str(exc))
        yield box
    finally:
        box.stop()
        assert not (cgroup_root / box.name).exists(), "the container's cgroup was left behind"
        # The guest pins into a bpffs of its own: its pin directory must never show up here.
        assert (HOST_BPFFS / "portguard").exists() == guest_pin_on_host, (
            "the guest's pins appeared on the host's bpffs"
        )


@pytest.fixture(scope="module")
def machine(tmp_path_factory) -> Iterator[Machine]:
    """One boot shared by the tests of a module (they leave the guest as they found it)."""
    with booted(tmp_path_factory.mktemp("objects")) as box:
        yield box
