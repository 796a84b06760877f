"""The unchanged re-apply: `portguard apply` when nothing it reads has changed since the last
apply that succeeded, answered without the full path.

systemd runs `portguard apply` at every `systemctl reload portguard`, every daemon-reload
(portguard-reload.path) and every dpkg trigger, and nearly always nothing has changed. The full
path then imports the kernel side, opens the pinned maps through libbpf, probes the kernel's
features and reads every slot to find so. Here the same answer comes from two records and a few
system calls, importing nothing but os, sys, marshal, fcntl, ctypes and _socket:

- the compiled plan (guard/policy/compiled.py, guard/fingerprint.py): the configuration,
  the unit files and everything else the plan was made from are unchanged (stat);
- the guard record, written by the last successful apply of that plan while it still held the
  pin directory's lock, and taken away under that lock before any apply or remove changes
  anything (guard/kernel/apply.py): the same boot, the same portguard code, object and
  environment, the same plan; the pinned guard is the very one that apply left
  (guard/kernel/snapshot.py: the same links, programs, maps, active slot and settings), the
  network namespace and attach cgroup are the same, the reserved ports are still in
  net.ipv4.ip_local_reserved_ports, and the sockets on reserved ports are the ones that apply
  found (none of them a squatter's).

Then it tells systemd the guard is in force (guard/notify.py: portguard.service is
Type=notify, and its main process must say READY=1 before it exits 0), prints what the full
path would print for an unchanged guard (recorded by that apply) and exits 0. Any doubt, any
error, and the full path runs, which re-checks and repairs everything (guard/commands.py); it
also runs whenever a previous apply failed, and with the fault-injection hook of the tests.
"""

from __future__ import annotations

import marshal
import os
import sys

from guard import notify, paths
from guard.fingerprint import RACY_NS, fingerprint, sealed_body, unsealed
from guard.kernel import snapshot

FORMAT = 1
BOOT_ID = "/proc/sys/kernel/random/boot_id"
NETNS = "/proc/self/ns/net"
RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"
# Environment the full path reads that changes what it does (the object's cache, the
# bindresvport blacklist it advises on).
ENVIRONMENT = ("PORTGUARD_CACHE_DIR", "PORTGUARD_BINDRESVPORT_BLACKLIST")
FAULT_ENV = "PORTGUARD_FAULT_AFTER"  # the fault tests kill the full path at every step
# Configuration files whose compiled plan in /run this process found stale or missing: the
# full path that follows need not stat its ~700 inputs again to know (guard/commands.py).
STALE: set[str] = set()
CODE_DIRS = ("", "kernel", "policy", "observe")


def reapply(config_path: str | None) -> bool:
    """True when the guard is exactly what an apply of these files would leave and what it
    would say is said; False: run the full path (nothing was changed or said)."""
    if os.geteuid() != 0 or os.environ.get(FAULT_ENV):
        return False
    main = config_path or paths.DEFAULT_CONFIG
    try:
        try:
            with open(paths.plan_record(main), "rb") as f:
                opened = unsealed(f.read(), main)
        except FileNotFoundError:
            opened = None
        if opened is None:
            STALE.add(main)
            return False
        pin_dir, body = opened
        import fcntl

        lock = os.open(os.path.join(paths.run_dir(), paths.lock_name(pin_dir)), os.O_RDONLY)
    except (OSError, ValueError):
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = _unchanged(pin_dir, body)
        if lines is None:
            return False
        notify.ready()  # the guard asked for is in force (portguard.service, Type=notify)
        err, out = lines
        if err:
            sys.stderr.write("".join(line + "\n" for line in err))
            sys.stderr.flush()
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
        return True
    except Exception:  # any doubt: the full path, which says what is wrong
        return False
    finally:
        os.close(lock)


def _unchanged(pin_dir: str, body: bytes) -> tuple[list[str], str] | None:
    """What to print when the guard record vouches for the pinned guard; else None."""
    try:
        with open(paths.guard_record(pin_dir), "rb") as f:
            record = marshal.loads(f.read())
    except (OSError, EOFError, ValueError, TypeError):
        return None
    (fmt, facts, code_files, code_seen, plan_digest, reserved, held_then, snap, err, out) = record
    if fmt != FORMAT or facts != _facts(facts[3]) or _digest(body) != plan_digest:
        return None
    if fingerprint(code_files, [])[0] != code_seen:
        return None
    if os.path.exists(paths.failure_record(pin_dir)) or not os.path.exists(paths.applied_mark()):
        return None
    if snapshot.take(pin_dir) != snap:
        return None
    if not {port for _, port in reserved} <= _reserved_ports():
        return None
    from guard.observe.procnet import reserved_sockets

    if reserved_sockets(reserved) != held_then:
        return None
    return err, out


def remember(
    pin_dir: str,
    plan_record: bytes,
    reserved: list[tuple[int, int]],
    attach_dir: str,
    code: tuple[list[str], list[str]],
    err: list[str],
    out: str,
    since_ns: int,
    held: frozenset[tuple[int, int, int]],
) -> None:
    """Write the guard record: called by apply under the pin directory's lock, once the guard
    is complete and no squatter holds a reserved port. err and out are what an unchanged
    re-apply of this plan prints; code is code_files(); since_ns (time.time_ns()) is when
    apply began to read; held: procnet.reserved_sockets(reserved), as apply found them. No
    record when a file edited in place changed too close to that moment (as for the compiled
    plan). Best effort: without a record the full path runs."""
    reserved = sorted(reserved)
    edited, replaced = code
    edited_seen, newest = fingerprint(edited, [])
    if newest > since_ns - RACY_NS:
        return
    try:
        record = (
            FORMAT,
            _facts(attach_dir),
            edited + replaced,
            edited_seen + fingerprint(replaced, [])[0],
            _digest(sealed_body(plan_record)),
            reserved,
            held,
            snapshot.take(pin_dir),
            err,
            out,
        )
        paths.write_record(paths.guard_record(pin_dir), marshal.dumps(record))
    except (OSError, ValueError, snapshot.Unreadable):
        pass  # no record: this apply took the last one away before it changed anything


def code_files(object_path: str, blacklist: str) -> tuple[list[str], list[str]]:
    """The files whose change means another portguard: its Python code and the bindresvport
    blacklist its advice reads (files edited in place: a change within one timestamp tick
    could leave stat saying the same), then the object it loaded and its digest (always
    replaced whole, by a rename: a new inode)."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = []
    for sub in CODE_DIRS:
        directory = os.path.join(here, sub)
        files += sorted(
            os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".py")
        )
    base = object_path[: -len(".o")] if object_path.endswith(".o") else object_path
    return [*files, blacklist], [object_path, base + ".sha256"]


def _facts(attach_dir: str) -> tuple:
    """What must be the same as when the record was made: the boot, the interpreter and the
    environment, the network namespace (inode and cookie), the attach cgroup (path, inode)."""
    with open(BOOT_ID) as f:
        boot = f.read().strip()
    env = tuple(os.environ.get(name) for name in ENVIRONMENT)
    netns = (snapshot.netns_inode(), snapshot.netns_cookie())
    return (boot, sys.version, env, attach_dir, os.stat(attach_dir).st_ino, netns)


def _digest(body: bytes) -> str:
    return paths.sha256(body).hexdigest()


def _reserved_ports() -> set[int]:
    with open(RESERVED_PORTS) as f:
        return snapshot.parse_ports(f.read())
