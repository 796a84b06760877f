"""What goes into the guest for one boot: a configuration drop-in naming systemd units as owners
and the guest's own root cgroup as the attach point, the test units and their helper pgnet.py,
and the packages the tests install on the running system. portguard itself comes from its .deb
(machine.py): /usr/bin/portguard, the packaged units, enabled by the package's postinst."""

from __future__ import annotations

from pathlib import Path

from tests.systemd.machine import GUEST_DEBS, GUEST_RESULTS, REPO, GuestFiles, Symlink

OWNER_PORT = 631  # tcp+udp, owned by pg-owner.service
SOCKET_PORT = 873  # tcp, owned by pg-sock.socket (bound by PID 1, served by pg-sock.service)
DECLARED_PORT, ADDED_PORT = 700, 701  # declared by pg-decl.service's drop-in; ADDED_PORT by edits
PGNET_GUEST = "/usr/local/lib/portguard-test/pgnet.py"
PGNET = f"/usr/bin/python3 {PGNET_GUEST}"
UNIT_DIR = "/etc/systemd/system"
# A drop-in: the package's conffile /etc/portguard/portguard.toml stays as shipped (default
# policy kept), this file adds the tests' reservations and overrides [guard] cgroup.
CONFIG = "/etc/portguard/conf.d/50-test.toml"

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
    "pg-stay@.service": f"""\
[Unit]
Description=portguard test: a stranger trying port %i, staying until stopped

[Service]
Type=notify
ExecStart={PGNET} stay %i {GUEST_RESULTS}/stay-%i.json
""",
    "pg-watch@.service": f"""\
[Unit]
Description=portguard test: a stranger binding %i until the answer changes

[Service]
Type=notify
ExecStart={PGNET} watch %i {GUEST_RESULTS}/watch-%i.json
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
    "multi-user.target.wants": "pg-owner.service",
    "sockets.target.wants": "pg-sock.socket",
}


# A unit that declares its own port (X-PortGuard-Reserve= in a drop-in), for the tests of
# declarations and the benchmark of daemon-reload: extra guest files for booted(extra=...).
DECLARING_DROPIN = f"{UNIT_DIR}/pg-decl.service.d/portguard.conf"


def declaration(*ports: int | str) -> str:
    """pg-decl.service's drop-in, declaring these ports."""
    return f"[Unit]\nX-PortGuard-Reserve={' '.join(str(p) for p in ports)}\n"


DECLARING_UNITS: GuestFiles = {
    f"{UNIT_DIR}/pg-decl.service": f"""\
[Unit]
Description=portguard test: owner of {DECLARED_PORT} by its own declaration

[Service]
Type=notify
ExecStart={PGNET} serve {DECLARED_PORT}

[Install]
WantedBy=multi-user.target
""",
    DECLARING_DROPIN: declaration(DECLARED_PORT),
    f"{UNIT_DIR}/multi-user.target.wants/pg-decl.service": Symlink(f"{UNIT_DIR}/pg-decl.service"),
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


def guest_files(
    attach_cgroup: str, debs: tuple[Path, ...] = (), services: bool = False
) -> GuestFiles:
    """Written into the overlay before boot; `debs` are copied to GUEST_DEBS for the tests.
    services: the tree with real services, where cups serves OWNER_PORT; pg-owner.service is
    there but not enabled (the two would race for the port at every boot, and the loser fail
    or serve without it)."""
    files: GuestFiles = {f"{UNIT_DIR}/{name}": text for name, text in UNITS.items()}
    for wants, unit in ENABLED.items():
        if not (services and unit == "pg-owner.service"):
            files[f"{UNIT_DIR}/{wants}/{unit}"] = Symlink(f"{UNIT_DIR}/{unit}")
    files[PGNET_GUEST] = (REPO / "tests/systemd/guest/pgnet.py").read_text()
    files[CONFIG] = config(attach_cgroup)
    for deb in debs:
        files[f"{GUEST_DEBS}/{deb.name}"] = deb.read_bytes()
    return files
