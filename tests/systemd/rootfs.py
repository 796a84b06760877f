"""A cached Debian bookworm root file system for booting a real systemd with systemd-nspawn.

The recipe (suite, packages, the steps below) is hashed; the tree is built once with debootstrap
into <cache>/rootfs-<hash> and reused as long as the recipe is unchanged. Every boot runs on an
overlay above it (see machine.py), so the cached tree is never modified. portguard itself is not
in the tree: each boot installs the built .deb into its own overlay (machine.py), so the tree
holds only what booting and the tests need plus what the package depends on -- no clang, no
libbpf-dev, nothing of the repository.

Run `python -m tests.systemd.rootfs` to build (or find) the tree ahead of the tests
(`--services`: the boot benchmark's tree, with real services).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE_ENV = "PORTGUARD_TEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/portguard-test")
MIRROR_ENV = "PORTGUARD_TEST_MIRROR"
SUITE = "bookworm"
# systemd as PID 1, and what the tests use besides portguard (ss; rpcbind, to order against).
BOOT_PACKAGES = ("systemd-sysv", "dbus", "iproute2", "rpcbind")
# The package's Depends (debian/control, ${python3:Depends} included), so that `dpkg -i` of the
# .deb needs no network; tests check this list against the built .deb.
PACKAGE_DEPENDS = ("python3", "python3-click", "libbpf1", "netbase")
# Its Recommends, which `apt install` brings along (the guest has no network for them).
PACKAGE_RECOMMENDS = ("bpftool",)
PACKAGES = BOOT_PACKAGES + PACKAGE_DEPENDS + PACKAGE_RECOMMENDS
# Real services whose ports the default policy reserves, and real bindresvport() callers: what
# the boot benchmark (bench/boot.py) boots, as an administrator's machine would be. A tree of
# its own (another recipe): the tests' tree stays small.
SERVICE_PACKAGES = ("cups", "dovecot-imapd", "rsync", "nfs-common")
HOST_PACKAGES = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container"}
# Bumped whenever customise() changes in a way the hash of the lists above does not see.
CUSTOMISE_VERSION = 2
# A tree of another recipe is removed only when no run has used it for this long: other work
# trees sharing the cache may still boot it.
STALE_AFTER = 24 * 3600  # seconds
USED_MARK = ".used"


class SetupError(RuntimeError):
    """A prerequisite is missing and cannot be installed here."""


def recipe(services: bool = False) -> dict:
    return {
        "suite": SUITE,
        "variant": "minbase",
        "packages": sorted(PACKAGES + (SERVICE_PACKAGES if services else ())),
        "customise": CUSTOMISE_VERSION,
    }


def recipe_hash(services: bool = False) -> str:
    text = json.dumps(recipe(services), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def rootfs_path(services: bool = False) -> Path:
    return cache_dir() / f"rootfs-{recipe_hash(services)}"


def _deb822_uris(text: str) -> list[tuple[str, list[str]]]:
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if (
            fields.get("enabled", "yes").lower() == "no"
            or "deb" not in fields.get("types", "").split()
        ):
            continue
        for uri in fields.get("uris", "").split():
            entries.append((uri, fields.get("suites", "").split()))
    return entries


def _one_line_uris(text: str) -> list[tuple[str, list[str]]]:
    entries = []
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line).split()
        if len(words) >= 3 and words[0] == "deb":
            entries.append((words[1], [words[2]]))
    return entries


def host_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses (never a hard-coded host)."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    entries: list[tuple[str, list[str]]] = []
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        entries += _deb822_uris(path.read_text())
    for path in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            entries += _one_line_uris(path.read_text())
    for uri, suites in entries:
        if any(s == SUITE or s.startswith(SUITE + "-") for s in suites) and "security" not in uri:
            return uri
    for uri, _ in entries:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    raise SetupError(f"no Debian mirror in {apt_dir}'s sources; set {MIRROR_ENV}")


def ensure_host_tools() -> None:
    """debootstrap and systemd-nspawn on the host, installed with apt when missing."""
    missing = [pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SetupError(f"missing {', '.join(missing)} and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def customise(root: Path) -> None:
    """Steps after debootstrap, nothing that depends on the repository."""
    (root / "etc/hostname").write_text("portguard-test\n")
    subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True)


def build(target: Path, log=print, services: bool = False) -> None:
    mirror = host_mirror()
    packages = PACKAGES + (SERVICE_PACKAGES if services else ())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"debootstrap {SUITE} from {mirror} into {partial}")
    proc = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            SUITE,
            str(partial),
            mirror,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        shutil.rmtree(partial, ignore_errors=True)
        raise SetupError(f"debootstrap failed ({proc.returncode}):\n{tail}")
    customise(partial)
    os.replace(partial, target)


def ensure_rootfs(log=print, services: bool = False) -> Path:
    """The cached tree for the current recipe, built first when missing (one builder at a time);
    services: the tree with SERVICE_PACKAGES too."""
    target = rootfs_path(services)
    if not target.is_dir():
        ensure_host_tools()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.is_dir():
                build(target, log, services)
                _remove_stale(target)
    # Outside the tree itself: an overlay may have it as its lower layer right now.
    target.with_name(target.name + USED_MARK).touch()
    return target


def _remove_stale(keep: Path) -> None:
    """Trees of other recipes that no run has used for STALE_AFTER seconds (the tests' and the
    benchmark's trees of today's recipes are kept)."""
    current = {rootfs_path(False), rootfs_path(True)}
    for stale in keep.parent.glob("rootfs-*"):
        if stale in current or stale.name.endswith(USED_MARK) or not stale.is_dir():
            continue
        mark = stale.with_name(stale.name + USED_MARK)
        used = mark.stat().st_mtime if mark.exists() else stale.stat().st_mtime
        if time.time() - used > STALE_AFTER:
            shutil.rmtree(stale, ignore_errors=True)
            mark.unlink(missing_ok=True)


if __name__ == "__main__":
    try:
        services = sys.argv[1:] == ["--services"]
        print(ensure_rootfs(log=lambda msg: print(msg, file=sys.stderr), services=services))
    except SetupError as exc:
        sys.exit(f"rootfs: {exc}")
