from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.sandbox import Sandbox, new_sandbox, require_kernel


@pytest.fixture(scope="session", autouse=True)
def _object_cache(tmp_path_factory) -> Iterator[None]:
    """Build the BPF object once per run into a private cache (never /var/cache)."""
    cache = os.environ.get("PORTGUARD_CACHE_DIR") or str(tmp_path_factory.mktemp("objects"))
    os.environ["PORTGUARD_CACHE_DIR"] = cache
    yield


@pytest.fixture
def cgroup_root() -> Path:
    return require_kernel()


@pytest.fixture
def sandbox(cgroup_root: Path, request) -> Iterator[Sandbox]:
    box = new_sandbox(cgroup_root)
    try:
        box.create()
        yield box
    finally:
        box.destroy()
