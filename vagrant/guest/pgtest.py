#!/usr/bin/python3
"""Guest side of portguard's VM scenarios. Standard library only; runs on Python 3.9 (bullseye).

Service roles (run from the pg-*.service units):
  owner PORT        bind PORT tcp+udp, tell systemd READY, hold them
  squat PORT        the same, as an unwelcome service
  resv-hog          call glibc bindresvport() until the privileged range is exhausted, hold all
  stranger PORT S   for S seconds, keep trying to bind PORT tcp+udp (hold 0.2 s on success)

Scenarios (run as root over ssh; each prints one JSON object on its last line):
  series N MODE     start a series of N reboots; MODE guarded|unguarded (see boot-check)
  results           the per-boot records of the current series
  storm N S         restart pg-owner N times while a stranger hammers 631 for at most S seconds
  features          apply/status output against what this kernel can do; the monitor's journal
                    entries (portguard-monitor.service) for the refusals
  analyze           systemd-analyze: portguard.service before rpcbind, and its duration
  declare           X-PortGuard-Reserve= in a drop-in of pg-owner.service: daemon-reload guards
                    its port (delay measured), a stranger is refused, systemd-analyze verify is
                    quiet, removing the drop-in + daemon-reload frees the port
  package DIR N     on a system without portguard: install DIR/install/*.deb with apt (guarded
                    at once?), upgrade to DIR/upgrade/*.deb while a stranger hammers 631 and the
                    owner restarts in a loop (at least N times), purge (nothing of the guard left)
"""

import ctypes
import errno
import glob
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

STATE = "/var/lib/pg-tests"
RUN = "/run/pg-tests"
PORT = 631
OWNER_UNIT = "pg-owner.service"
MONITOR_UNIT = "portguard-monitor.service"
PORTGUARD = "/usr/bin/portguard"
PIN_DIR = "/sys/fs/bpf/portguard"
RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"


def errname(code):
    return errno.errorcode.get(code, str(code))


def sd_notify(message):
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def sh(*cmd, check=False):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def bind_both(port):
    """Bind PORT on tcp (listening) and udp; returns (sockets, {proto: errno name or 'ok'})."""
    socks, result = [], {}
    for proto, kind in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.bind(("0.0.0.0", port))
            if kind == socket.SOCK_STREAM:
                sock.listen(8)
            socks.append(sock)
            result[proto] = "ok"
        except OSError as exc:
            sock.close()
            result[proto] = errname(exc.errno)
    return socks, result


# ---- service roles --------------------------------------------------------------------------

def role_bind_and_hold(name, port):
    socks, result = bind_both(port)
    write_json(f"{RUN}/{name}.json", {"pid": os.getpid(), "port": port, "bind": result})
    if len(socks) != 2:
        print(f"{name}: bind {port}: {result}", file=sys.stderr)
        return 1
    sd_notify("READY=1")
    signal.pause()
    return 0


def role_resv_hog():
    libc = ctypes.CDLL(None, use_errno=True)
    held, report = [], {}
    for proto, kind in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
        ports, errors = [], {}
        for _ in range(1200):
            sock = socket.socket(socket.AF_INET, kind)
            if libc.bindresvport(sock.fileno(), None) == 0:
                ports.append(sock.getsockname()[1])
                held.append(sock)
                continue
            code = ctypes.get_errno()
            sock.close()
            errors[errname(code)] = errors.get(errname(code), 0) + 1
            if code == errno.EADDRINUSE:  # glibc tried the whole range: exhausted
                break
        report[proto] = {"count": len(ports), "got_631": PORT in ports, "errors": errors,
                         "lowest": min(ports, default=None), "highest": max(ports, default=None)}
    write_json(f"{RUN}/resv.json", {"pid": os.getpid(), "bindresvport": report})
    sd_notify("READY=1")
    signal.pause()
    return 0


def role_stranger(port, seconds):
    stats = {"attempts": 0, "successes": 0, "errors": {}}
    stop = time.monotonic() + seconds
    signal.signal(signal.SIGTERM, lambda *_: setattr(role_stranger, "stop", True))
    role_stranger.stop = False
    while time.monotonic() < stop and not role_stranger.stop:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            sock = socket.socket(socket.AF_INET, kind)
            stats["attempts"] += 1
            try:
                sock.bind(("0.0.0.0", port))
                stats["successes"] += 1
                time.sleep(0.2)  # hold it a moment, as a real service would
            except OSError as exc:
                stats["errors"][errname(exc.errno)] = stats["errors"].get(errname(exc.errno), 0) + 1
            finally:
                sock.close()
        time.sleep(0.001)
    write_json(f"{RUN}/stranger.json", stats)
    return 0


# ---- facts ----------------------------------------------------------------------------------

def unit_state(unit):
    props = sh("systemctl", "show", unit, "-p", "ActiveState,Result,MainPID,SubState").stdout
    return dict(line.split("=", 1) for line in props.splitlines() if "=" in line)


def port_holders(port):
    """[(proto, process name, pid)] of sockets bound to PORT, from ss."""
    out = sh("ss", "-H", "-tulnp", f"sport = :{port}").stdout
    holders = []
    for line in out.splitlines():
        proto = line.split()[0]
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            holders.append((proto, name, int(pid)))
    return holders


def ports_of(unit):
    pid = unit_state(unit).get("MainPID", "0")
    if pid == "0":
        return []
    out = sh("ss", "-H", "-tuanp").stdout
    return sorted({int(m.group(1)) for line in out.splitlines() if f"pid={pid}," in line
                   for m in [re.search(r":(\d+)\s", line.split()[4] + " ")] if m})


def kernel_has_set_retval():
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (5, 18)


def expected_road():
    """Where the guard refuses binds: below 5.18 at security_socket_bind (these x86-64 Debian
    kernels have BTF and BPF trampolines); the errno is the configured one on both roads."""
    return "cgroup" if kernel_has_set_retval() else "security_socket_bind"


KERNEL_ERRNO = "EADDRINUSE"


# ---- scenarios ------------------------------------------------------------------------------

def set_mode(mode):
    """guarded: portguard.service enabled; unguarded: disabled. The squatter runs in both."""
    action = "enable" if mode == "guarded" else "disable"
    sh("systemctl", action, "portguard.service", check=True)
    sh("systemctl", "add-wants", "pg-owner.service", "pg-squat.service", check=True)


SQUAT_WANTS = "/etc/systemd/system/pg-owner.service.wants/pg-squat.service"


def without_squatter():
    """Only the boot series start the squatter with the owner; the other scenarios must see
    nothing but the owner and the stranger competing for the port."""
    if os.path.lexists(SQUAT_WANTS):
        os.unlink(SQUAT_WANTS)
        sh("systemctl", "daemon-reload", check=True)
    sh("systemctl", "stop", "pg-squat.service")


def scenario_series(count, mode):
    os.makedirs(STATE, exist_ok=True)
    set_mode(mode)
    write_json(f"{STATE}/series.json", {"mode": mode, "remaining": count})
    with open(f"{STATE}/boots.jsonl", "w"):
        pass
    sh("systemd-run", "--on-active=1", "--timer-property=AccuracySec=10ms",
       "systemctl", "reboot", check=True)
    print(json.dumps({"series": mode, "boots": count}))
    return 0


def boot_check():
    series = read_json(f"{STATE}/series.json")
    if not series or series["remaining"] <= 0:
        return 0
    mode = series["mode"]
    owner = unit_state(OWNER_UNIT)
    owner_bind = (read_json(f"{RUN}/owner.json") or {}).get("bind", {})
    squat_bind = (read_json(f"{RUN}/squat.json") or {}).get("bind", {})
    resv = (read_json(f"{RUN}/resv.json") or {}).get("bindresvport", {})
    holders = port_holders(PORT)
    rpc = {u: {"active": unit_state(u).get("ActiveState"), "ports": ports_of(u)}
           for u in ("rpcbind.service", "rpc-statd.service")}
    record = {
        "boot": sh("cat", "/proc/sys/kernel/random/boot_id").stdout.strip(),
        "kernel": platform.release(), "mode": mode,
        "portguard": unit_state("portguard.service").get("ActiveState"),
        "owner": owner.get("ActiveState"), "owner_bind": owner_bind,
        "squatter_bind": squat_bind, "bindresvport": resv, "rpc": rpc,
        "holders_631": sorted({f"{p}:{n}" for p, n, _ in holders}),
        "uptime_s": float(open("/proc/uptime").read().split()[0]),
    }
    owner_ok = owner.get("ActiveState") == "active" and owner_bind == {"tcp": "ok", "udp": "ok"}
    rpc_ok = all(v["active"] == "active" and PORT not in v["ports"] for v in rpc.values())
    if mode == "guarded":
        record["ok"] = (owner_ok and rpc_ok and record["portguard"] == "active"
                        and {pid for _, _, pid in holders} == {int(owner.get("MainPID", 0))}
                        and all(r.get("count", 0) > 0 and not r.get("got_631") for r in resv.values())
                        and "ok" not in squat_bind.values())
    else:  # the contrast: without the guard the owner must lose its port
        record["ok"] = not owner_ok
    with open(f"{STATE}/boots.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    series["remaining"] -= 1
    write_json(f"{STATE}/series.json", series)
    if series["remaining"] > 0:
        sh("systemd-run", "--on-active=1", "--timer-property=AccuracySec=10ms", "systemctl", "reboot")
    return 0


def scenario_results():
    series = read_json(f"{STATE}/series.json") or {}
    try:
        boots = [json.loads(line) for line in open(f"{STATE}/boots.jsonl")]
    except OSError:
        boots = []
    print(json.dumps({"remaining": series.get("remaining"), "mode": series.get("mode"),
                      "boots": boots}))
    return 0


def start_stranger(seconds):
    """pg-stranger.service: a unit of its own (not the owner's cgroup) hammering 631."""
    sh("systemctl", "stop", "pg-stranger.service")
    if os.path.exists(f"{RUN}/stranger.json"):
        os.unlink(f"{RUN}/stranger.json")
    sh("systemd-run", "--unit=pg-stranger", "--collect", "/usr/bin/python3", os.path.abspath(__file__),
       "stranger", str(PORT), str(seconds), check=True)
    time.sleep(1)


def stop_stranger():
    """Stop the stranger; its tally {attempts, successes, errors}, {} if it never wrote one."""
    sh("systemctl", "stop", "pg-stranger.service")
    for _ in range(50):
        stranger = read_json(f"{RUN}/stranger.json")
        if stranger:
            return stranger
        time.sleep(0.2)
    return {}


def restart_owner(failures, index):
    proc = sh("systemctl", "restart", OWNER_UNIT)
    if proc.returncode != 0:
        failures.append({"restart": index, "stderr": proc.stderr.strip()[-200:],
                         "bind": (read_json(f"{RUN}/owner.json") or {}).get("bind")})
        sh("systemctl", "reset-failed", OWNER_UNIT)


def scenario_storm(restarts, seconds):
    without_squatter()
    sh("systemctl", "reset-failed")
    sh("systemctl", "start", OWNER_UNIT, check=False)
    start_stranger(seconds)
    failures, started = [], time.monotonic()
    for i in range(restarts):
        restart_owner(failures, i)
    elapsed = time.monotonic() - started
    stranger = stop_stranger()
    print(json.dumps({"restarts": restarts, "owner_failures": len(failures),
                      "first_failures": failures[:3], "seconds": round(elapsed, 1),
                      "stranger": stranger, "kernel": platform.release()}))
    return 0


def scenario_features():
    without_squatter()
    apply = sh(PORTGUARD, "apply")
    monitor_ready = start_monitor()
    # ssh sessions: a session-N.scope with logind, else ssh.service (the boxes have no logind)
    own_cgroup = own_cgroup_path()
    # With the owner stopped the port is free: only the guard can refuse this session (no owner).
    sh("systemctl", "stop", OWNER_UNIT)
    socks, denied = bind_both(PORT)
    for sock in socks:
        sock.close()
    sh("systemctl", "start", OWNER_UNIT)
    journal = journal_refusals(os.getpid(), {"tcp", "udp"}) if monitor_ready else []
    sh("systemctl", "stop", MONITOR_UNIT)
    status_proc = sh(PORTGUARD, "status", "--json")
    try:
        status = json.loads(status_proc.stdout)
    except ValueError:
        status = None
    expected_errno = KERNEL_ERRNO
    owner_cgroup = "/sys/fs/cgroup/system.slice/" + OWNER_UNIT
    owner_id = os.stat(owner_cgroup).st_ino if os.path.isdir(owner_cgroup) else None
    reservations = {}
    for res in (status or {}).get("reservations", []):
        reservations[f"{res.get('port')}/{res.get('protocol')}"] = [o.get("id") for o in res.get("owners", [])]
    warned = any("warning" in line and "set_retval" in line for line in apply.stderr.splitlines())
    status_errno = (status or {}).get("deny_errno")
    if isinstance(status_errno, int):
        status_errno = errname(status_errno)
    checks = {
        "apply_ok": apply.returncode == 0,
        "no_eperm_warning": not warned,
        "status_loaded": bool(status and status.get("loaded")),
        "status_road_matches_kernel": (status or {}).get("refuse_at") == expected_road(),
        "status_errno_matches_kernel": status_errno == expected_errno,
        "stranger_sees_expected_errno": denied == {"tcp": expected_errno, "udp": expected_errno},
        "status_has_631_tcp_udp": {"631/tcp", "631/udp"} <= set(reservations),
        "status_owner_id_is_live_cgroup": owner_id is not None and all(
            owner_id in ids for key, ids in reservations.items() if key.startswith("631/")),
        "monitor_started": monitor_ready,
        "journal_has_both_refusals":
            {e.get("PORTGUARD_PROTOCOL") for e in journal} >= {"tcp", "udp"},
        "journal_fields_right": bool(journal) and all(
            e.get("PORTGUARD_PORT") == str(PORT) and e.get("PORTGUARD_VERDICT") == "denied"
            and e.get("PORTGUARD_CGROUP") == own_cgroup
            and e.get("PORTGUARD_UNIT") == own_cgroup.rsplit("/", 1)[-1]
            and e.get("_SYSTEMD_UNIT") == MONITOR_UNIT
            and str(e.get("PORTGUARD_OWNER")).endswith("/" + OWNER_UNIT)
            for e in journal),
    }
    print(json.dumps({"kernel": platform.release(), "set_retval": kernel_has_set_retval(),
                      "apply_rc": apply.returncode, "apply_stdout": apply.stdout.strip(),
                      "apply_stderr": apply.stderr.strip()[-600:], "status_rc": status_proc.returncode,
                      "status_stderr": status_proc.stderr.strip()[-300:],
                      "status_errno": status_errno, "stranger_bind": denied,
                      "refuse_at": (status or {}).get("refuse_at"),
                      "owner_cgroup_id": owner_id, "reservations": reservations,
                      "journal": [{k: v for k, v in e.items()
                                   if k.startswith(("PORTGUARD_", "MESSAGE", "_SYSTEMD_UNIT"))}
                                  for e in journal],
                      "checks": checks, "ok": all(checks.values())}))
    return 0


DECLARED_PORT = 7001
DECLARED_DROPIN = f"/etc/systemd/system/{OWNER_UNIT}.d/pg-declare.conf"


def declared_reserved():
    """Whether `portguard check` says DECLARED_PORT/tcp is reserved, and its origins."""
    shown = sh(PORTGUARD, "check", f"{DECLARED_PORT}/tcp", "--json")
    try:
        item = json.loads(shown.stdout)[0]
    except (ValueError, IndexError):
        return False, []
    return item.get("reserved", False), item.get("origins", [])


def wait_declared(reserved, timeout=120):
    """Seconds until the reservation is (or is no longer) there; None after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if declared_reserved()[0] == reserved:
            return round(time.monotonic() - start, 2)
        time.sleep(0.1)
    return None


def stranger_errno(port):
    socks, result = bind_both(port)
    for sock in socks:
        sock.close()
    return result


def scenario_declare():
    without_squatter()
    os.makedirs(os.path.dirname(DECLARED_DROPIN), exist_ok=True)
    with open(DECLARED_DROPIN, "w") as handle:
        handle.write(f"[Unit]\nX-PortGuard-Reserve={DECLARED_PORT}\n")
    try:
        sh("systemctl", "daemon-reload", check=True)
        added = wait_declared(True)
        _, origins = declared_reserved()
        refused = stranger_errno(DECLARED_PORT)
        verify = sh("systemd-analyze", "verify", f"/etc/systemd/system/{OWNER_UNIT}")
    finally:
        os.unlink(DECLARED_DROPIN)
    sh("systemctl", "daemon-reload", check=True)
    removed = wait_declared(False)
    expected_errno = KERNEL_ERRNO
    checks = {
        "reserved_after_daemon_reload": added is not None,
        "origin_is_the_dropin": origins == [f"{DECLARED_DROPIN}:2"],
        "stranger_refused": refused == {"tcp": expected_errno, "udp": expected_errno},
        "verify_quiet": "X-PortGuard" not in verify.stdout + verify.stderr,
        "freed_after_removal": removed is not None,
    }
    print(json.dumps({"delay_s": added, "removed_s": removed, "origins": origins,
                      "stranger_bind": refused, "verify": (verify.stdout + verify.stderr)[-300:],
                      "checks": checks, "ok": all(checks.values())}))
    return 0


def start_monitor(timeout=180):
    """Start portguard-monitor.service (monitor --journal); True once it says it is monitoring."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 1))
    sh("systemctl", "start", MONITOR_UNIT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = sh("journalctl", "-q", "-u", MONITOR_UNIT, "--since", since, "-o", "cat").stdout
        if "monitoring refused binds" in out:
            return True
        time.sleep(1)
    return False


def own_cgroup_path():
    with open("/proc/self/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


def journal_refusals(pid, protocols, timeout=60):
    """The monitor's journal entries (all fields) for refusals of this pid, once every protocol
    in `protocols` has one, or what there is after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    entries = []
    while time.monotonic() < deadline:
        # this boot only: the journal may be persistent, and a pid may repeat across boots
        out = sh("journalctl", "-q", "-b", "-o", "json", f"PORTGUARD_PID={pid}").stdout
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if {e.get("PORTGUARD_PROTOCOL") for e in entries} >= protocols:
            break
        time.sleep(1)
    return entries


def monotonic_us(unit, prop):
    value = sh("systemctl", "show", unit, "-p", prop, "--value").stdout.strip()
    return int(value) if value.isdigit() else None


def scenario_analyze():
    sh("systemctl", "is-system-running", "--wait")
    pg_start = monotonic_us("portguard.service", "InactiveExitTimestampMonotonic")
    pg_done = monotonic_us("portguard.service", "ActiveEnterTimestampMonotonic")
    rpc_start = monotonic_us("rpcbind.service", "InactiveExitTimestampMonotonic")
    blame = [line.strip() for line in sh("systemd-analyze", "blame").stdout.splitlines()
             if "portguard" in line or "rpcbind" in line]
    chain = sh("systemd-analyze", "critical-chain", "rpcbind.service").stdout.strip().splitlines()
    total = sh("systemd-analyze", "time").stdout.strip().splitlines()
    before = bool(pg_done and rpc_start and pg_done <= rpc_start)
    duration_ms = round((pg_done - pg_start) / 1000) if pg_done and pg_start else None
    # the boot's run: CPU beside wall time (wall far above CPU: it waited, e.g. for the disk)
    cpu_ns = monotonic_us("portguard.service", "CPUUsageNSec")
    # the same (fresh) apply now, with the system up and its files in the page cache; the
    # guard is away between remove and apply, which no other scenario runs meanwhile
    sh("portguard", "remove", check=True)
    before_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.monotonic()
    sh("portguard", "apply", check=True)
    warm_wall_ms = round((time.monotonic() - begin) * 1000)
    after_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    warm_cpu_ms = round((after_cpu.ru_utime + after_cpu.ru_stime
                         - before_cpu.ru_utime - before_cpu.ru_stime) * 1000)
    print(json.dumps({"kernel": platform.release(), "portguard_before_rpcbind": before,
                      "portguard_ms": duration_ms,
                      "portguard_cpu_ms": round(cpu_ns / 1e6) if cpu_ns else None,
                      "warm_apply_ms": warm_wall_ms, "warm_apply_cpu_ms": warm_cpu_ms,
                      "portguard_done_us": pg_done,
                      "rpcbind_start_us": rpc_start, "blame": blame, "critical_chain": chain[-6:],
                      "boot_time": total[0] if total else "", "ok": before}))
    return 0

# ---- the package scenario -------------------------------------------------------------------

def package_state():
    """dpkg's view of portguard: 'installed VERSION', 'config-files', or 'not installed'."""
    out = sh("dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", "portguard").stdout.split()
    if out[:1] == ["ii"]:
        return "installed " + out[1]
    return "config-files" if out[:1] == ["rc"] else "not installed"


def guard_programs():
    """{prog id: name} of the loaded BPF programs named portguard_* (names cut at 15 bytes)."""
    try:
        progs = json.loads(sh("bpftool", "-j", "prog", "show").stdout or "[]")
    except ValueError:
        return {}
    return {p["id"]: p.get("name", "") for p in progs if p.get("name", "").startswith("portguard")}


def links_of(prog_ids):
    """Ids of the BPF links (attachments) that run one of these programs."""
    try:
        links = json.loads(sh("bpftool", "-j", "link", "show").stdout or "[]")
    except ValueError:
        return []
    return sorted(link["id"] for link in links if link.get("prog_id") in prog_ids)


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def guard_status():
    """`portguard status --json`: (exit code, loaded)."""
    proc = sh(PORTGUARD, "status", "--json")
    try:
        return proc.returncode, bool(json.loads(proc.stdout).get("loaded"))
    except ValueError:
        return proc.returncode, False


def apt(*args):
    """apt-get as an administrator runs it; (exit code, seconds, last lines of its output)."""
    started = time.monotonic()
    proc = subprocess.run(["apt-get", "-y", "-q", "--no-install-recommends", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return proc.returncode, round(time.monotonic() - started, 2), proc.stdout.strip()[-600:]


class BindProbe(threading.Thread):
    """Tries to bind PORT (tcp) every millisecond from this session (not the owner's cgroup) and
    notes when it is first refused, and whether a bind got through after that."""

    def __init__(self, port, t0):
        super().__init__(daemon=True)
        self.port, self.t0 = port, t0
        self.first_refused, self.refusal, self.won_after_refusal, self.attempts = None, None, 0, 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.attempts += 1
            try:
                sock.bind(("0.0.0.0", self.port))
                if self.first_refused is not None:
                    self.won_after_refusal += 1
            except OSError as exc:
                if self.first_refused is None:
                    self.first_refused = time.monotonic() - self.t0
                    self.refusal = errname(exc.errno)
            finally:
                sock.close()
            time.sleep(0.001)


def install_phase(deb):
    """apt-get install ./portguard.deb with 631 free: how soon is a stranger refused?"""
    t0 = time.monotonic()
    probe = BindProbe(PORT, t0)
    probe.start()
    rc, seconds, output = apt("install", deb)
    time.sleep(0.5)  # still refused after the installation?
    probe.halt.set()
    probe.join()
    socks, after = bind_both(PORT)
    for sock in socks:
        sock.close()
    status_rc, loaded = guard_status()
    pg_start = monotonic_us("portguard.service", "InactiveExitTimestampMonotonic")
    pg_done = monotonic_us("portguard.service", "ActiveEnterTimestampMonotonic")
    expected = KERNEL_ERRNO
    figures = {
        "apt_rc": rc, "apt_s": seconds, "apt_output": output if rc else output[-200:],
        "first_refusal_s": probe.first_refused and round(probe.first_refused, 2),
        "refusal": probe.refusal, "probe_attempts": probe.attempts,
        "won_after_refusal": probe.won_after_refusal, "bind_after": after,
        "apply_s": round((pg_done - pg_start) / 1e6, 2) if pg_done and pg_start else None,
        "version": package_state(), "status_rc": status_rc, "status_loaded": loaded,
        "unit": unit_state("portguard.service").get("ActiveState"),
        "enabled": sh("systemctl", "is-enabled", "portguard.service").stdout.strip(),
    }
    checks = {
        "install_ok": rc == 0 and figures["version"].startswith("installed"),
        "guarded_when_apt_returned": probe.first_refused is not None
        and probe.first_refused <= seconds and probe.won_after_refusal == 0,
        "stranger_refused_after": after == {"tcp": expected, "udp": expected},
        "status_ok": status_rc == 0 and loaded,
        "unit_active_enabled": figures["unit"] == "active" and figures["enabled"] == "enabled",
    }
    return figures, checks


def upgrade_phase(deb, min_restarts):
    """apt-get install ./portguard-higher.deb while pg-stranger hammers 631 and the owner is
    restarted in a loop (before, during and after the upgrade)."""
    sh("systemctl", "reset-failed")
    sh("systemctl", "start", OWNER_UNIT, check=False)
    progs_before = guard_programs()
    start_stranger(900)
    failures, count, halt = [], [0], threading.Event()

    def restart_loop():
        while not halt.is_set() or count[0] < min_restarts:
            restart_owner(failures, count[0])
            count[0] += 1

    looper = threading.Thread(target=restart_loop, daemon=True)
    looper.start()
    time.sleep(2)
    during_from = count[0]
    rc, seconds, output = apt("install", deb)
    during = count[0] - during_from
    time.sleep(2)
    halt.set()
    looper.join(timeout=600)
    stranger = stop_stranger()
    status_rc, loaded = guard_status()
    progs_after = guard_programs()
    figures = {
        "apt_rc": rc, "apt_s": seconds, "apt_output": output if rc else output[-200:],
        "version": package_state(), "restarts": count[0], "restarts_during_upgrade": during,
        "owner_failures": len(failures), "first_failures": failures[:3], "stranger": stranger,
        "status_rc": status_rc, "status_loaded": loaded,
        "programs_replaced": sorted(progs_after) != sorted(progs_before),
        "unit": unit_state("portguard.service").get("ActiveState"),
    }
    checks = {
        "upgrade_ok": rc == 0 and figures["version"].endswith(deb_version(deb)),
        "owner_never_failed": not failures and count[0] >= min_restarts and during > 0,
        "stranger_never_won": stranger.get("successes") == 0 and stranger.get("attempts", 0) > 0,
        "status_ok_after": status_rc == 0 and loaded and figures["unit"] == "active",
    }
    return figures, checks


def purge_phase(sysctl_before, prog_ids):
    """apt-get purge portguard: no program, link, pin, file or sysctl entry of it is left."""
    sh("systemctl", "stop", OWNER_UNIT)
    rc, seconds, output = apt("purge", "portguard")
    progs = guard_programs()
    socks, bind = bind_both(PORT)
    for sock in socks:
        sock.close()
    leftovers = [p for p in ("/usr/bin/portguard", "/usr/bin/portrelease",
                             "/etc/portguard/portguard.toml", "/lib/systemd/system/portguard.service",
                             "/var/cache/portguard", "/run/portguard", PIN_DIR)
                 if os.path.lexists(p)]
    figures = {
        "apt_rc": rc, "apt_s": seconds, "apt_output": output if rc else output[-200:],
        "package": package_state(), "programs": progs,
        "links": links_of(set(prog_ids) | set(progs)),
        "pins": os.path.exists(PIN_DIR), "leftovers": leftovers,
        "sysctl": read_text(RESERVED_PORTS), "sysctl_before": sysctl_before, "bind_631": bind,
        "unit_load": sh("systemctl", "show", "portguard.service", "-p", "LoadState",
                        "--value").stdout.strip(),
    }
    checks = {
        "purge_ok": rc == 0 and figures["package"] == "not installed",
        "no_programs_no_links": not progs and not figures["links"],
        "no_pins_no_files": not figures["pins"] and not leftovers,
        "sysctl_as_before": figures["sysctl"] == sysctl_before,
        "port_free_again": bind == {"tcp": "ok", "udp": "ok"},
    }
    return figures, checks


def deb_version(deb):
    return sh("dpkg-deb", "--field", deb, "Version").stdout.strip()


def old_route_size():
    """What the boxes no longer carry: the installed size (KiB) apt reports for clang, libbpf-dev
    and a venv with pip, which the former provisioning needed on top of the package's Depends."""
    out = sh("apt-get", "install", "-s", "--no-install-recommends",
             "clang", "libbpf-dev", "python3-venv", "python3-pip").stdout
    names = [line.split()[1] for line in out.splitlines() if line.startswith("Inst ")]
    # one apt-cache call: each one loads apt's cache, ~10 s under software emulation
    fields = sh("apt-cache", "show", "--no-all-versions", *names).stdout if names else ""
    total = sum(int(kib) for kib in re.findall(r"^Installed-Size: (\d+)", fields, re.M))
    return {"packages": len(names), "installed_kib": total}


def scenario_package(debs_dir, min_restarts):
    install_deb = sorted(glob.glob(f"{debs_dir}/install/portguard_*_all.deb"))[-1]
    upgrade_deb = sorted(glob.glob(f"{debs_dir}/upgrade/portguard_*_all.deb"))[-1]
    without_squatter()
    sh("systemctl", "stop", OWNER_UNIT, "pg-stranger.service")
    sysctl_before = read_text(RESERVED_PORTS)
    fresh = {"package": package_state(), "programs": guard_programs(),
             "pins": os.path.exists(PIN_DIR), "holders_631": port_holders(PORT)}
    result = {"kernel": platform.release(), "before": fresh, "sysctl_before": sysctl_before,
              "installed_size_kib": None, "old_route": old_route_size()}
    checks = {"starts_without_portguard": fresh["package"] == "not installed"
              and not fresh["programs"] and not fresh["pins"] and not fresh["holders_631"]}
    phases = (("install", lambda: install_phase(install_deb)),
              ("upgrade", lambda: upgrade_phase(upgrade_deb, min_restarts)))
    progs, links = {}, []
    if checks["starts_without_portguard"]:
        for name, phase in phases:
            figures, phase_checks = phase()
            result[name] = figures
            checks.update(phase_checks)
            if name == "install":
                result["sysctl_installed"] = read_text(RESERVED_PORTS)
                result["installed_size_kib"] = int(sh("dpkg-query", "-W", "-f=${Installed-Size}",
                                                      "portguard").stdout or 0)
            progs.update(guard_programs())
            links = sorted(set(links) | set(links_of(set(progs))))
        result["guard_programs"], result["guard_links"] = progs, links
        result["purge"], purge_checks = purge_phase(sysctl_before, progs)
        checks.update(purge_checks)
    result["checks"] = checks
    result["ok"] = all(checks.values())
    print(json.dumps(result))
    return 0


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd in ("owner", "squat"):
        return role_bind_and_hold(cmd, int(args[0]))
    if cmd == "resv-hog":
        return role_resv_hog()
    if cmd == "stranger":
        return role_stranger(int(args[0]), float(args[1]))
    if cmd == "boot-check":
        return boot_check()
    if cmd == "series":
        return scenario_series(int(args[0]), args[1])
    if cmd == "results":
        return scenario_results()
    if cmd == "storm":
        return scenario_storm(int(args[0]), float(args[1]))
    if cmd == "features":
        return scenario_features()
    if cmd == "analyze":
        return scenario_analyze()
    if cmd == "declare":
        return scenario_declare()
    if cmd == "package":
        return scenario_package(args[0], int(args[1]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
