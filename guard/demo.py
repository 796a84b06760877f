"""`portguard demo`: the embedded default policy applied for real, in a sandbox.

The guard is attached to a private cgroup subtree (/portguard-demo-PID) inside a private
network namespace, with the default policy's owners placed below that subtree, so the demo
shows real kernel refusals without touching the machine's services. Everything it creates
is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

from guard.errors import GuardError
from guard.kernel import cgroups
from guard.kernel.apply import apply, remove
from guard.kernel.host import netns_cookie, netns_inode, require_root
from guard.kernel.layout import LIMITS
from guard.observe import display, holders
from guard.observe.state import read_state, with_origins
from guard.policy import config, owners, plan

CLONE_NEWNET = 0x40000000

CHILD = r"""
import ctypes, json, os, socket, sys
open(sys.argv[1], "w").write(str(os.getpid()))
action, port = sys.argv[2], int(sys.argv[3])
if action == "bind":
    out = {}
    for name, fam, addr in (("IPv4", socket.AF_INET, "127.0.0.1"), ("IPv6", socket.AF_INET6, "::")):
        for proto, typ in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
            s = socket.socket(fam, typ)
            try:
                s.bind((addr, port)); out[f"{name}/{proto}"] = "ok"
            except OSError as e:
                out[f"{name}/{proto}"] = __import__("errno").errorcode[e.errno]
            s.close()
    print(json.dumps(out))
else:
    s = socket.socket()
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.bindresvport(s.fileno(), None)
    print(json.dumps({"bindresvport": s.getsockname()[1] if rc == 0 else
                      __import__("errno").errorcode[ctypes.get_errno()]}))
"""


def _unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise GuardError(f"cannot create a network namespace: {os.strerror(ctypes.get_errno())}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)


def _child(cgroup_dir: Path, action: str, port: int) -> dict:
    cgroup_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(cgroup_dir / "cgroup.procs"), action, str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip()}


def _denied(settings: config.Settings) -> int:
    return sum(r.denied for r in read_state(settings).reservations)


def _remove_tree(top: Path) -> None:
    if not top.exists():
        return
    for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        directory.rmdir()
    top.rmdir()


def run(echo=print) -> int:
    """Apply the default policy in a sandbox, show it working, take it all away."""
    require_root("portguard demo")
    root = Path(cgroups.cgroup2_mount())

    name = f"portguard-demo-{os.getpid()}"
    top = f"/{name}"
    top_dir = root / name
    settings = config.Settings(cgroup=top, pin_dir=f"/sys/fs/bpf/{name}", portreserve_dir="")
    defaults = config.load([], None, unit_dirs=[])  # the default policy only, no unit file
    # Every default block, installed or not, with its owners moved below the demo subtree.
    blocks = tuple(b._replace(if_installed=False) for b in defaults.blocks)
    cfg = config.Config(settings, blocks, defaults.files)
    resolved = [
        block._replace(owners=tuple(o._replace(path=top + o.path) for o in block.owners))
        for block in owners.resolve(cfg)
    ]
    the_plan = plan.build(settings, resolved, (), LIMITS)
    _unshare_net()
    top_dir.mkdir()
    try:
        result = apply(the_plan)
        for note in result.warnings:
            echo(f"portguard demo: warning: {note}")
        for line in display.wrap(
            "portguard demo: the default policy, applied for real",
            [f"to the cgroup subtree {top} in a private network namespace", "where"],
            indent="  ",
        ):
            echo(line)
        echo("  this machine's own services are not touched.")
        # the two units the demo runs exist before status reads the owners (not "absent")
        cups = Path(cgroups.directory(top + "/system.slice/cups.service", root))
        stranger = Path(cgroups.directory(top + "/system.slice/rpcbind.service", root))
        for directory in (cups, stranger):
            directory.mkdir(parents=True, exist_ok=True)
        echo("\nThe guard, as `portguard status` shows it:")
        state = with_origins(read_state(settings), the_plan.origins)
        # the demo is in the guarded netns
        state = holders.with_holders(state, netns_cookie(), netns_inode())
        for line in display.status_lines(state, top):
            echo(line)
        echo("\nWho may bind 631 (IPP, reserved for CUPS)?")
        outcomes = {
            "cups.service": _child(cups, "bind", 631),
            "rpcbind.service": _child(stranger, "bind", 631),
        }
        for line in display.demo_bind_table(outcomes):
            echo(line)
        before = _denied(settings)
        echo("\nbindresvport() in rpcbind.service, the way RPC daemons pick a port in 512-1023:")
        resvport = _child(stranger, "bindresvport", 0)
        denied = _denied(settings)
        for line in display.demo_resvport_lines(resvport, denied - before):
            echo(line)
        echo(
            f"\nThe kernel counted {denied} refused binds (`portguard status` shows them per port)."
        )
    finally:
        try:
            remove(settings)
        finally:
            _remove_tree(top_dir)
    echo("\nportguard demo: removed the guard and the sandbox; the machine is as before.")
    return 0
