"""What `pip install portguard-*.whl` gives: the wheel carries the compiled BPF object, so a
host without clang and without a filled cache applies the guard with it.

The wheel is built from this tree (its build needs clang, like the package build); it is
installed into a fresh virtualenv outside the checkout, whose `portguard` then runs with no
compiler (PORTGUARD_CLANG="") and an empty cache.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from guard.kernel import corebtf, objects
from tests.kernel.sandbox import REPO, missing

pytestmark = pytest.mark.kernel

PORT = 7655
CASES = [("v4", "tcp", PORT), ("v6", "udp", PORT)]


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """The `portguard` script of a virtualenv that has only the wheel (and its dependencies)."""
    if objects.find_clang() is None:
        missing("clang is needed to build the wheel")
    work = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(work), str(REPO)], check=True)
    (wheel,) = work.glob("portguard-*.whl")
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(work / "venv")], check=True)
    venv_pip = [str(work / "venv/bin/python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*venv_pip, "install", str(wheel)], check=True)
    return work / "venv/bin/portguard"


def test_the_wheel_carries_both_byte_orders_of_the_object(wheel_install):
    (wheel,) = wheel_install.parents[2].glob("portguard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for target in objects.TARGETS.values():
        name = f"guard/bpf/{objects.object_name(target)}"
        assert name in names and name.replace(".o", ".sha256") in names


def test_an_installed_wheel_applies_the_guard_with_no_compiler_and_no_cache(sandbox, wheel_install):
    cache = sandbox.work / "empty-cache"
    env = {"PORTGUARD_CLANG": "", "PORTGUARD_CACHE_DIR": str(cache), "PATH": "/usr/sbin:/usr/bin"}
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    sandbox.cli("apply", env=env, program=[str(wheel_install)])
    assert set(sandbox.bind("stranger", CASES).values()) == {errno.EADDRINUSE}
    assert set(sandbox.bind("owner", CASES).values()) == {0}
    state = json.loads(
        sandbox.cli("status", "--json", env=env, program=[str(wheel_install)]).stdout
    )
    assert state["program"] == Path(objects.object_name()).stem
    # nothing compiled: the cache holds at most the minimal BTF apply keeps (with bpftool)
    cached = {p.name for p in cache.iterdir()} if cache.exists() else set()
    assert all(name.startswith(corebtf.PREFIX) for name in cached), cached
