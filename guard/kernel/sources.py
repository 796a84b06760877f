"""Where the BPF sources live: bpf/ beside guard/ in a checkout, guard/bpf when installed."""

from __future__ import annotations

from pathlib import Path


def bpf_source_dir() -> Path:
    here = Path(__file__).resolve().parent.parent  # guard/
    for candidate in (here.parent / "bpf", here / "bpf"):
        if (candidate / "guard.bpf.c").is_file():
            return candidate
    raise FileNotFoundError(f"BPF sources (guard.bpf.c) not found beside {here}")


try:
    # CPython's built-in SHA-256: importing hashlib would load OpenSSL's libcrypto, a
    # measurable part of a cold-cache apply at boot for three small digests.
    from _sha256 import sha256
except ImportError:  # other Pythons (3.12 calls it _sha2)
    from hashlib import sha256  # noqa: F401 (re-exported)
