"""Running Python, and portguard, as an unprivileged user wherever the clone lives.

A clone in a 0700 directory (root's home, where a root user naturally clones) is out of
nobody's reach, and so is its venv, sys.executable included. So the unprivileged command runs
the real interpreter behind sys.executable, with copies of the guard package and of the click
this run imports (Debian's or PyPI's) in a directory everybody may read, first on PYTHONPATH,
and a working directory nobody may enter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NOBODY_ID = "65534"


def drop_root() -> list[str]:
    """The prefix that runs a command as nobody (none when not root to begin with)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop root")
    return ["setpriv", f"--reuid={NOBODY_ID}", f"--regid={NOBODY_ID}", "--clear-groups"]


def interpreter() -> str:
    """The interpreter itself, not a venv's link to it under a directory nobody may enter."""
    return os.path.realpath(sys.executable)


@contextmanager
def reachable_modules() -> Iterator[Path]:
    """A directory (0755, under /tmp) holding copies of guard (its BPF sources included) and
    click, removed afterwards."""
    import click

    import guard

    top = Path(tempfile.mkdtemp(prefix="portguard-nobody-"))
    try:
        top.chmod(0o755)
        skip = shutil.ignore_patterns("__pycache__")
        for package in (guard, click):
            source = Path(package.__file__).parent
            shutil.copytree(source, top / source.name, ignore=skip)
        from guard.kernel.sources import bpf_source_dir  # bpf/ in a checkout

        if not (top / "guard" / "bpf").exists():
            shutil.copytree(bpf_source_dir(), top / "guard" / "bpf", ignore=skip)
        for path in top.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run_python(
    modules: Path, args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python ARGS` as nobody (when root), finding guard and click in modules."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update(env or {}, PYTHONPATH=str(modules), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [*drop_root(), interpreter(), "-s", *args],
        capture_output=True,
        text=True,
        cwd=modules,
        env=environment,
    )
