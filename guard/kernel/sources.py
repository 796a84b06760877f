"""Where the BPF sources live: bpf/ beside guard/ in a checkout, guard/bpf when installed."""

from __future__ import annotations

import os

from guard.paths import sha256  # noqa: F401 (re-exported: CPython's own, not OpenSSL's)


def bpf_source_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # guard/
    for candidate in (os.path.join(os.path.dirname(here), "bpf"), os.path.join(here, "bpf")):
        if os.path.isfile(os.path.join(candidate, "guard.bpf.c")):
            return candidate
    raise FileNotFoundError(f"BPF sources (guard.bpf.c) not found beside {here}")
