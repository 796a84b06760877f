from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import debs
from tests.kernel.sandbox import missing, require_root_and_cgroup2
from tests.systemd import rootfs
from tests.systemd.guest_files import guest_files
from tests.systemd.machine import Machine, MachineError

HOST_BPFFS = Path("/sys/fs/bpf")


def _prerequisites() -> Path:
    cgroup_root = require_root_and_cgroup2(
        "systemd tests need root (debootstrap, overlay mounts, systemd-nspawn)"
    )
    for tool in ("nsenter", "mount", "unshare", "chroot"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed")
    return cgroup_root


def package() -> Path:
    """The built .deb (tests/debs.py): a build that fails is a failure, not a skip."""
    try:
        return debs.package()
    except debs.DebError as exc:
        pytest.fail(str(exc))


def programs_at(cgroup: Path) -> list[dict] | None:
    """BPF programs attached directly to a cgroup, as the host's bpftool sees them (None
    without bpftool)."""
    if shutil.which("bpftool") is None:
        return None
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True
    )
    return json.loads(out.stdout.strip() or "[]") if out.returncode == 0 else None


@contextmanager
def booted(
    *,
    installed: bool = True,
    carry: tuple[Path, ...] = (),
    cgroup_namespace: bool = False,
    bpf: bool = True,
    extra: dict | None = None,
    services: bool = False,
    deb: Path | None = None,
) -> Iterator[Machine]:
    """Debian booted with systemd-nspawn; everything removed afterwards. installed: the built
    .deb installed before boot (portguard.service enabled by its postinst); carry: packages
    copied into the guest (GUEST_DEBS) for the tests to install; bpf: False boots with
    nspawn's default system call filter and capabilities, where bpf() is refused; extra:
    more guest files (path -> text or Symlink) written before boot; services: the tree with real
    services (rootfs.SERVICE_PACKAGES: cups, dovecot, rsync, nfs-common), as benchmarks boot
    (cups serves 631 there, pg-owner.service is not enabled); deb: another package to install
    than the tree's (benchmarks compare two versions)."""
    cgroup_root = _prerequisites()
    try:
        tree = rootfs.ensure_rootfs(log=print, services=services)
    except rootfs.SetupError as exc:
        missing(str(exc))
    preinstalled = (deb or package(),) if installed else ()
    guest_pin_on_host = (HOST_BPFFS / "portguard").exists()
    at_root = programs_at(cgroup_root)
    box = Machine(
        tree,
        cgroup_root,
        {},
        cgroup_namespace=cgroup_namespace,
        preinstalled=preinstalled,
        bpf=bpf,
    )
    # Inside a cgroup namespace the guest's root cgroup is "/" to it (and the container's
    # subtree to the kernel); without one the guest sees the host's paths.
    box.files = guest_files("/" if cgroup_namespace else box.cgroup, carry, services)
    box.files.update(extra or {})
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
        # Neither the boot nor dpkg in the chroot may ever attach to the real cgroup2 root.
        assert programs_at(cgroup_root) == at_root, "programs appeared on the host's cgroup root"


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    """One boot with the package installed, shared by the tests of a module (they leave the
    guest as they found it)."""
    with booted() as box:
        yield box
