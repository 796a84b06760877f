"""A cached Debian bookworm root file system for booting a real systemd with systemd-nspawn.

The recipe (suite, packages, the steps below) is hashed; the tree is built once with debootstrap
into <cache>/rootfs-<hash> and reused as long as the recipe is unchanged. Every boot runs on an
overlay above it (see machine.py), so the cached tree is never modified. portguard itself is not
in the tree: the repository is bind-mounted read-only at /opt/portguard at boot, run by the
/usr/bin/portguard wrapper written here.

Run `python -m tests.systemd.rootfs` to build (or find) the tree ahead of the tests.
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
from pathlib import Path

CACHE_ENV = "PORTGUARD_TEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/portguard-test")
MIRROR_ENV = "PORTGUARD_TEST_MIRROR"
SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv",
    "dbus",
    "iproute2",
    "python3",
    "python3-click",
    "python3-pyroute2",
    "libbpf1",
    "rpcbind",
)
HOST_PACKAGES = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container"}
WRAPPER = """#!/bin/sh
# portguard from the repository bind-mounted read-only at /opt/portguard (tests only).
PYTHONPATH=/opt/portguard PYTHONDONTWRITEBYTECODE=1 exec /usr/bin/python3 -m guard "$@"
"""
PORTRELEASE = """#!/bin/sh
PYTHONPATH=/opt/portguard PYTHONDONTWRITEBYTECODE=1 exec /usr/bin/python3 -c \
'import guard.cli; guard.cli.portrelease()' "$@"
"""
# Bumped whenever customise() changes in a way the hash of the lists above does not see.
CUSTOMISE_VERSION = 1


class SetupError(RuntimeError):
    """A prerequisite is missing and cannot be installed here."""


def recipe() -> dict:
    return {
        "suite": SUITE,
        "variant": "minbase",
        "packages": sorted(PACKAGES),
        "wrapper": WRAPPER,
        "portrelease": PORTRELEASE,
        "customise": CUSTOMISE_VERSION,
    }


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def rootfs_path() -> Path:
    return cache_dir() / f"rootfs-{recipe_hash()}"


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
    """Steps after debootstrap: the portguard wrappers, nothing that depends on the repo."""
    for name, text in (("portguard", WRAPPER), ("portrelease", PORTRELEASE)):
        path = root / "usr/bin" / name
        path.write_text(text)
        path.chmod(0o755)
    (root / "opt/portguard").mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("portguard-test\n")
    subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True)


def build(target: Path, log=print) -> None:
    mirror = host_mirror()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"debootstrap {SUITE} from {mirror} into {partial}")
    proc = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
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


def ensure_rootfs(log=print) -> Path:
    """The cached tree for the current recipe, built first when missing (one builder at a time)."""
    target = rootfs_path()
    if target.is_dir():
        return target
    ensure_host_tools()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            build(target, log)
            for stale in target.parent.glob("rootfs-*"):
                if stale != target:  # built from an older recipe: never used again
                    shutil.rmtree(stale, ignore_errors=True)
    return target


if __name__ == "__main__":
    try:
        print(ensure_rootfs(log=lambda msg: print(msg, file=sys.stderr)))
    except SetupError as exc:
        sys.exit(f"rootfs: {exc}")
