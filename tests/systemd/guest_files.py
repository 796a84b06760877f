"""What goes into the guest for one boot: portguard.service enabled, a configuration naming
systemd units as owners, test units, and the compiled BPF objects (the guest has no clang)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.systemd.machine import GUEST_REPO, GUEST_RESULTS, REPO, GuestFiles, Symlink

OWNER_PORT = 631  # tcp+udp, owned by pg-owner.service
SOCKET_PORT = 873  # tcp, owned by pg-sock.socket (bound by PID 1, served by pg-sock.service)
PGNET = f"/usr/bin/python3 {GUEST_REPO}/tests/systemd/guest/pgnet.py"
UNIT_DIR = "/etc/systemd/system"

UNITS = {
    "pg-owner.service": f"""\
[Unit]
Description=portguard test: the owner of {OWNER_PORT} tcp+udp
# Restarted 100 times in a row by the tests: no start rate limit.
StartLimitIntervalSec=0

[Service]
Type=notify
ExecStart={PGNET} serve {OWNER_PORT}

[Install]
WantedBy=multi-user.target
""",
    "pg-try@.service": f"""\
[Unit]
Description=portguard test: a stranger trying to bind port %i

[Service]
Type=oneshot
ExecStart={PGNET} try %i {GUEST_RESULTS}/try-%i.json
""",
    "pg-hammer.service": f"""\
[Unit]
Description=portguard test: a stranger binding {OWNER_PORT} in a loop

[Service]
Type=notify
ExecStart={PGNET} hammer {OWNER_PORT} {GUEST_RESULTS}/hammer.json
""",
    "pg-sock.socket": f"""\
[Unit]
Description=portguard test: socket-activated owner of {SOCKET_PORT}/tcp

[Socket]
ListenStream={SOCKET_PORT}

[Install]
WantedBy=sockets.target
""",
    "pg-sock.service": f"""\
[Unit]
Description=portguard test: the service behind pg-sock.socket

[Service]
ExecStart={PGNET} activated
""",
}

ENABLED = {
    "sysinit.target.wants": "portguard.service",
    "multi-user.target.wants": "pg-owner.service",
    "sockets.target.wants": "pg-sock.socket",
}


def config(attach_cgroup: str) -> str:
    return f"""\
[guard]
# The guest's own root cgroup, a subtree on the host: never the real cgroup2 root.
cgroup = "{attach_cgroup}"
pin_dir = "/sys/fs/bpf/portguard"

[[reserve]]
ports = [{OWNER_PORT}]
unit = "pg-owner.service"

[[reserve]]
ports = ["{SOCKET_PORT}/tcp"]
units = ["pg-sock.socket"]
"""


def bpf_objects(cache: Path) -> dict[str, bytes]:
    """Compile on the host (portguard build) into a private cache; the guest loads the copies."""
    env = {**os.environ, "PORTGUARD_CACHE_DIR": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "guard", "build"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"portguard build failed:\n{proc.stdout}{proc.stderr}")
    return {f"/var/cache/portguard/{path.name}": path.read_bytes() for path in cache.iterdir()}


def guest_files(attach_cgroup: str, objects: dict[str, bytes]) -> GuestFiles:
    files: GuestFiles = {f"{UNIT_DIR}/{name}": text for name, text in UNITS.items()}
    # the monitor and the metrics: installed, not enabled
    for unit in (
        "portguard.service",
        "portguard-monitor.service",
        "portguard-metrics.service",
        "portguard-metrics.timer",
    ):
        files[f"{UNIT_DIR}/{unit}"] = (REPO / "systemd" / unit).read_text()
    for wants, unit in ENABLED.items():
        files[f"{UNIT_DIR}/{wants}/{unit}"] = Symlink(f"{UNIT_DIR}/{unit}")
    files["/etc/portguard/portguard.toml"] = config(attach_cgroup)
    files.update(objects)
    return files
