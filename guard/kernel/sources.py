"""Where the BPF sources live: bpf/ beside guard/ in a checkout, guard/bpf when installed."""

from __future__ import annotations

from pathlib import Path

from guard.paths import sha256  # noqa: F401 (re-exported: CPython's own, not OpenSSL's)


def bpf_source_dir() -> Path:
    here = Path(__file__).resolve().parent.parent  # guard/
    for candidate in (here.parent / "bpf", here / "bpf"):
        if (candidate / "guard.bpf.c").is_file():
            return candidate
    raise FileNotFoundError(f"BPF sources (guard.bpf.c) not found beside {here}")
