"""Objects as earlier versions of portguard built them, made from this tree's source: what the
upgrade tests start from. Built with clang where there is one (the host); the Vagrant boxes
have no compiler, so vagrant/run-matrix builds them on the host and ships them in the kernel
suite's object cache ($PORTGUARD_CACHE_DIR), where they are taken as they are."""

from __future__ import annotations

import subprocess
from pathlib import Path

TP_BTF_OBJECT = "tp-btf-trackers.o"  # not guard-*.o: the object cache's pruning leaves it


def tp_btf_object(directory) -> Path:
    """This object as versions before raw_tp trackers built it: the trackers' sections tp_btf
    (shipped in the object cache, else built into directory)."""
    from guard.kernel import objects
    from guard.kernel.sources import bpf_source_dir

    shipped = Path(objects.cache_dir()) / TP_BTF_OBJECT
    if shipped.exists():
        return shipped
    directory = Path(directory)
    source = (Path(bpf_source_dir()) / "guard.bpf.c").read_text()
    assert source.count('SEC("raw_tp/cgroup_') == 2
    (directory / "guard.bpf.c").write_text(source.replace('SEC("raw_tp/', 'SEC("tp_btf/'))
    out = directory / TP_BTF_OBJECT
    clang = objects.find_clang()
    assert clang, "clang is needed here (./dev.sh installs it), or a shipped " + TP_BTF_OBJECT
    flags = objects._flags(objects.host_target())
    subprocess.run(
        [clang, *flags, "-c", str(directory / "guard.bpf.c"), "-o", str(out)], check=True
    )
    return out
