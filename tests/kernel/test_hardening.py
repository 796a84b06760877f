"""Leftovers, missing mounts, long cgroup paths, privileges and stress against the real kernel.

Stress counts: PORTGUARD_STRESS_RESTARTS (default 500 owner-cgroup restarts) and
PORTGUARD_STRESS_REAPPLIES (default 50); tests/soak.py runs 10,000 and 1,000.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from guard.kernel import layout, objects
from guard.kernel import libbpf as kernel
from guard.kernel.pins import Maps, Pins
from tests.kernel.sandbox import BIND_LINKS, CHILD, REPO, in_netns, missing
from tests.unprivileged import drop_root, interpreter

PORT = 7651
FREE = 7652
CASES = [(f, t, PORT) for f in ("v4", "v6", "dual", "mapped") for t in ("tcp", "udp")]
RESTARTS = int(os.environ.get("PORTGUARD_STRESS_RESTARTS", "500"))
REAPPLIES = int(os.environ.get("PORTGUARD_STRESS_REAPPLIES", "50"))


def applied(sandbox, ports=(str(PORT),), owners=("owner",), **guard):
    sandbox.write_config(sandbox.owner_block(list(ports), *owners), **guard)
    sandbox.cli("apply")


def guarded(sandbox) -> bool:
    """The whole guard as applied(): owner binds, stranger refused, every family."""
    return set(sandbox.bind("owner", CASES).values()) == {0} and set(
        sandbox.bind("stranger", CASES).values()
    ) == {errno.EADDRINUSE}


def pin_names(sandbox) -> list[str]:
    return sorted(p.name for p in sandbox.pin_dir.iterdir())


CLEAN_PINS = sorted(
    [
        f"maps-{layout.LAYOUT}",
        *(f"link_{n}" for n in BIND_LINKS),
        "link_mkdir",
        "link_rmdir",
        "hook_judge",
    ]
)


def pin_a_map_instead(sandbox, path, name: str) -> None:
    """Unpin path and pin the guard's map `name` there: a foreign object under our name."""
    maps = Maps.open_pinned(Pins(sandbox.pin_dir).maps_dir)
    try:
        os.unlink(path)
        kernel.pin(maps.fds[name], path)
    finally:
        maps.close()


# ---- leftovers in the pin directory -----------------------------------------------------------


def test_a_foreign_pin_under_a_link_name_is_one_clear_sentence_and_the_guard_stays(sandbox):
    applied(sandbox)
    name = BIND_LINKS[-1]  # bind6, or socket_bind on that road
    link = sandbox.pin_dir / f"link_{name}"
    pin_a_map_instead(sandbox, link, "state")  # the link detaches; something else takes its name
    proc = sandbox.cli("apply", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"Error: {link} is not a portguard {name} link")
    assert "remove it or choose another pin_dir" in proc.stderr
    os.unlink(link)
    sandbox.cli("apply")
    assert guarded(sandbox) and pin_names(sandbox) == CLEAN_PINS


def test_a_foreign_pin_as_the_hook_judge_is_one_clear_sentence(sandbox):
    applied(sandbox)
    judge = Pins(sandbox.pin_dir).judge
    on_the_hook = "link_socket_bind" in pin_names(sandbox)
    pin_a_map_instead(sandbox, judge, "state")  # a map, but not a program array
    proc = sandbox.cli("apply", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"Error: {judge} is not portguard's hook judge")
    assert "remove it or choose another pin_dir" in proc.stderr
    # Like a link's pin, hook_judge's is part of the security_socket_bind road's guard: with
    # it gone the kernel empties the array and that road passes every bind until an apply.
    assert guarded(sandbox) != on_the_hook
    os.unlink(judge)
    sandbox.cli("apply")
    assert guarded(sandbox) and pin_names(sandbox) == CLEAN_PINS


def test_half_created_maps_and_stale_staged_links_are_taken_over_while_the_links_enforce(sandbox):
    applied(sandbox)
    pins = Pins(sandbox.pin_dir)
    os.unlink(os.path.join(pins.maps_dir, "ports"))  # a half-created or damaged set of maps
    fd = kernel.get_pinned(pins.link("mkdir"))
    kernel.pin(fd, pins.staged_link("mkdir"))  # a killed run's staged tracker
    os.close(fd)
    assert guarded(sandbox)  # the programs keep their maps whatever happens to the pins
    status = sandbox.status()
    assert status["interrupted"] is True
    sandbox.cli("apply")
    assert guarded(sandbox) and pin_names(sandbox) == CLEAN_PINS
    assert sandbox.status()["interrupted"] is False


def test_a_pinned_map_libbpf_cannot_reuse_is_a_typed_error_and_apply_makes_the_maps_afresh(
    sandbox,
):
    applied(sandbox)
    pins = Pins(sandbox.pin_dir)
    scratch = os.path.join(pins.maps_dir, "scratch")  # same layout, but not the object's definition
    os.unlink(scratch)
    fd = kernel.lib().bpf_map_create(layout.ARRAY, b"scratch", 4, 8, 1, None)
    assert fd >= 0
    kernel.pin(fd, scratch)
    os.close(fd)
    maps = Maps.open_pinned(pins.maps_dir)
    try:
        sizes = {name: kernel.map_info(maps.fds[name]).max_entries for name in layout.SIZED_MAPS}
    finally:
        maps.close()
    with pytest.raises(kernel.IncompatiblePinnedMap) as exc:
        kernel.load_object(objects.ensure_object(), pins.maps_dir, sizes=sizes).close()
    assert exc.value.name == "scratch" and "type 2 instead of 6" in str(exc.value)
    maps = Maps.open_pinned(pins.maps_dir)
    try:
        maps.meta.update(0, layout.Meta(b"guard-0000000000000000"))  # as if the program changed
    finally:
        maps.close()
    sandbox.cli("apply")
    assert guarded(sandbox) and pin_names(sandbox) == CLEAN_PINS


def test_maps_of_an_older_layout_are_taken_over_and_removed_keeping_the_sysctl_records(sandbox):
    applied(sandbox, ports=(str(PORT), str(FREE)))
    pins = Pins(sandbox.pin_dir)
    os.rename(
        pins.maps_dir, os.path.join(pins.root, "maps-0123456789ab")
    )  # as an older version left it
    applied(sandbox)
    assert guarded(sandbox) and pin_names(sandbox) == CLEAN_PINS
    # FREE was added by the old version: the new one knew to take it away again
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == str(PORT)
    sandbox.cli("remove")
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == ""


def _older_layout_with_hash_records(sandbox, ports: list[int]) -> None:
    """maps-0123456789ab as layouts before the sysctl bitmap left it: sysctl_added a hash
    (u16 port -> u8 1), and those ports in the sysctl."""
    legacy = layout.SYSCTL_ADDED_HASH
    fd = kernel.lib().bpf_map_create(legacy.type, b"sysctl_added", 2, 1, 1024, None)
    assert fd >= 0
    try:
        records = kernel.Map(fd, legacy.key, legacy.value)
        records.update_many(ports, [1] * len(ports))
        older = Path(Pins(sandbox.pin_dir).root) / "maps-0123456789ab"
        older.mkdir(mode=0o700)
        kernel.pin(fd, older / "sysctl_added")
    finally:
        os.close(fd)
    now = sandbox.sysctl("net.ipv4.ip_local_reserved_ports")
    sandbox.sysctl("net.ipv4.ip_local_reserved_ports", ",".join([now, *map(str, ports)]).strip(","))


def test_an_older_layouts_hash_of_sysctl_records_is_carried_over_and_dropped(sandbox):
    applied(sandbox)
    _older_layout_with_hash_records(sandbox, [FREE])
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == f"{PORT}-{FREE}"
    applied(sandbox, ports=(str(PORT), str(FREE)))
    assert guarded(sandbox) and pin_names(sandbox) == CLEAN_PINS
    applied(sandbox)  # FREE leaves the policy: the record carried over takes it away
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == str(PORT)


def test_remove_takes_away_what_an_older_layouts_hash_recorded(sandbox):
    applied(sandbox)
    _older_layout_with_hash_records(sandbox, [FREE])
    sandbox.cli("remove")
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == ""
    assert not sandbox.pin_dir.exists()


def test_a_pin_dir_that_is_not_a_directory_is_one_clear_sentence(sandbox):
    applied(sandbox)
    # a pinned object where the directory should be
    occupied = sandbox.pin_dir / f"link_{BIND_LINKS[0]}"
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"), pin_dir=str(occupied))
    proc = sandbox.cli("apply", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot use the pin directory {occupied}" in proc.stderr
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    assert guarded(sandbox)


def test_without_bpffs_and_tracefs_mounted_apply_mounts_bpffs_and_works(sandbox):
    # In a private mount namespace: the host's /sys/fs/bpf stays mounted.
    if subprocess.run(["which", "unshare"], capture_output=True, check=False).returncode:
        missing("unshare (util-linux) is not installed")
    applied(sandbox)  # to have a config; then leave the host's instance
    sandbox.cli("remove")
    net = " ".join(in_netns(sandbox.netns))
    py = shlex.quote(sys.executable)
    cfg = shlex.quote(str(sandbox.config_path))
    bind = " ".join(
        shlex.quote(a)
        for a in [sys.executable, "-c", CHILD, sandbox.procs("stranger"), "bind", json.dumps(CASES)]
    )
    script = textwrap.dedent(f"""
        set -e
        for m in /sys/kernel/tracing /sys/kernel/debug/tracing /sys/fs/bpf; do
            while grep -q " $m " /proc/mounts; do umount -l $m; done
        done
        ! grep -E " (bpf|tracefs) " /proc/mounts
        cd {shlex.quote(str(REPO))}
        {net} {py} -m guard --config {cfg} apply
        grep -q " /sys/fs/bpf bpf " /proc/mounts
        {net} {bind}
        {net} {py} -m guard --config {cfg} remove
    """)
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-2])
    assert set(result.values()) == {errno.EADDRINUSE}
    assert " /sys/fs/bpf bpf " in Path("/proc/mounts").read_text()  # the host's mount untouched


# ---- long cgroup paths -------------------------------------------------------------------------


def test_a_300_byte_cgroup_path_never_matches_an_owner_by_truncation(sandbox):
    # owner: exactly 254 bytes (the longest the key holds); twin: the same 254 bytes followed by
    # 46 more in its last name, 300 bytes. A key truncated to 254 bytes would make twin the owner.
    prefix = f"{sandbox.top}/" + "p" * 100 + "/"
    owner_rel = "p" * 100 + "/" + "o" * (254 - len(prefix))
    owner = f"{sandbox.top}/{owner_rel}"
    assert len(owner.encode()) == 254
    twin_rel = owner_rel + "x" * 46
    assert len(f"{sandbox.top}/{twin_rel}".encode()) == 300
    sandbox.write_config(sandbox.owner_block([str(PORT)], owner_rel))
    sandbox.cli("apply")
    sandbox.cgroup(twin_rel)  # the mkdir tracker sees a 300-byte path: skipped, never truncated
    owners = sandbox.status()["reservations"][0]["owners"]
    assert [(o["cgroup"], o["id"]) for o in owners] == [(owner, None)]
    assert set(sandbox.bind(twin_rel, CASES).values()) == {errno.EADDRINUSE}
    sandbox.cgroup(owner_rel)
    assert set(sandbox.bind(owner_rel, CASES).values()) == {0}
    assert set(sandbox.bind(twin_rel, CASES).values()) == {errno.EADDRINUSE}
    sandbox.write_config(sandbox.owner_block([str(PORT)], twin_rel))
    proc = sandbox.cli("apply", check=False)
    assert proc.returncode == 2 and "is 300 bytes; at most 254" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- privileges ----------------------------------------------------------------------------------


def test_pins_are_root_only_nobody_can_neither_open_nor_unpin_them(sandbox):
    applied(sandbox)
    assert sandbox.pin_dir.stat().st_mode & 0o777 == 0o700
    names = [str(p) for p in sandbox.pin_dir.rglob("*") if not p.is_dir()]
    probe = textwrap.dedent("""
        import ctypes, json, os, sys
        bpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
        out = {}
        for path in sys.argv[1:]:
            fd = bpf.bpf_obj_get(path.encode())
            err = ctypes.get_errno() if fd < 0 else 0
            try:
                os.unlink(path)
                gone = True
            except OSError:
                gone = False
            out[path] = [fd >= 0, err, gone]
        try:
            os.listdir(sys.argv[1].rsplit("/", 1)[0])
            out["listed"] = True
        except OSError:
            out["listed"] = False
        print(json.dumps(out))
    """)
    proc = subprocess.run(  # the interpreter itself: a venv in root's home is out of reach
        [*drop_root(), interpreter(), "-c", probe, *names],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out.pop("listed") is False
    for path, (opened, err, gone) in out.items():
        assert not opened and not gone, path
        assert err in (errno.EACCES, errno.EPERM), (path, err)
    assert guarded(sandbox) and pin_names(sandbox) == CLEAN_PINS


def test_a_stranger_with_cap_net_bind_service_is_refused_too(sandbox):
    low = 631  # a privileged port, in the sandbox's own network namespace
    applied(sandbox, ports=(str(low),))
    cases = [("v4", "tcp", low), ("v6", "udp", low), ("v4", "tcp", low + 1)]
    inner = [interpreter(), "-c", CHILD, "-", "bind", json.dumps(cases)]
    for caps, expected in (
        (
            ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"],
            {
                f"v4/tcp/{low}": errno.EADDRINUSE,
                f"v6/udp/{low}": errno.EADDRINUSE,
                f"v4/tcp/{low + 1}": 0,
            },
        ),
        (
            [],
            {
                f"v4/tcp/{low}": errno.EADDRINUSE,
                f"v6/udp/{low}": errno.EADDRINUSE,
                f"v4/tcp/{low + 1}": errno.EACCES,
            },
        ),
    ):
        result = sandbox.run("stranger", "exec", [*drop_root(), *caps, *inner])
        assert result == expected, caps
    # root in a stranger cgroup: refused as well
    assert set(sandbox.bind("stranger", [("v4", "tcp", low), ("dual", "udp", low)]).values()) == {
        errno.EADDRINUSE
    }


# ---- stress ------------------------------------------------------------------------------------


def _finish(children, stop):
    stop.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_owner_restarts_while_strangers_hammer_the_port(sandbox):
    applied(sandbox)
    stop = sandbox.work / "stop"
    strangers = [
        sandbox.start("stranger", "loop", [fam, typ, PORT, str(stop)])
        for fam, typ in (("v4", "tcp"), ("dual", "tcp"), ("v6", "udp"), ("mapped", "udp"))
    ]
    for child in strangers:
        assert child.stdout.readline().strip() == "ready"
    owner_dir = str(sandbox.cgroup_root / sandbox.top.lstrip("/") / "owner")
    owner_cases = [("v4", "tcp", PORT), ("dual", "udp", PORT)]
    driver = sandbox.start(
        "parking", "restarts", [owner_dir, sandbox.procs("parking"), RESTARTS, owner_cases]
    )
    out, err = driver.communicate()  # no timeout: the soak's 10,000 restarts take a while
    assert driver.returncode == 0, err
    restarts = json.loads(out.strip().splitlines()[-1])
    hammer = _finish(strangers, stop)
    stranger_ok = sum(r["ok"] for r in hammer)
    print(
        f"\nowner restarts: {RESTARTS}, owner binds ok {restarts['ok']} failed {restarts['fail']}; "
        f"stranger binds refused {sum(r['fail'] for r in hammer)} succeeded {stranger_ok}"
    )
    assert restarts == {"ok": RESTARTS * len(owner_cases), "fail": 0, "errors": {}}
    assert stranger_ok == 0 and all(r["fail"] > 0 for r in hammer)
    assert all(set(r["errors"]) == {str(errno.EADDRINUSE)} for r in hammer)


def test_reapplies_alternating_configs_while_binds_run_give_no_wrong_answer(sandbox):
    stop = sandbox.work / "stop"
    configs = []
    for i, extra in enumerate(([], ["9000-9049/tcp", f"{FREE}/udp"])):
        sandbox.write_config(
            sandbox.owner_block([str(PORT), *extra], "owner")
            + "\n"
            + sandbox.owner_block([f"{FREE}/tcp"], ["owner", "other"][i]),
            deny_errno=["EADDRINUSE", "EACCES"][i],
            mode="enforce",
        )
        path = sandbox.work / f"c{i}.toml"
        path.write_text(sandbox.config_path.read_text())
        configs.append(str(path))
    sandbox.cli("apply", config=sandbox.work / "c0.toml")
    # PORT: owner's in both configs; FREE/tcp: owner's in c0, other's in c1 -> the stranger is
    # refused throughout, whatever the moment.
    loops = [
        ("stranger", "dual", "tcp", PORT),
        ("stranger", "v4", "udp", PORT),
        ("stranger", "v6", "tcp", FREE),
        ("owner", "v4", "tcp", PORT),
        ("owner", "mapped", "udp", PORT),
    ]
    children = [
        sandbox.start(cg, "loop", [fam, typ, port, str(stop)]) for cg, fam, typ, port in loops
    ]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    driver = textwrap.dedent(f"""
        import sys
        from guard.kernel.apply import apply
        from guard.kernel.layout import LIMITS
        from guard.policy import config, owners, plan
        plans = []
        for path in {configs!r}:
            cfg = config.load([path])
            plans.append(plan.build(
                cfg.settings, owners.resolve(cfg), owners.extra_owners(cfg), LIMITS
            ))
        changed = sum(apply(plans[(i + 1) % 2]).changed for i in range({REAPPLIES}))
        print(changed)
    """)
    proc = subprocess.run(
        [*in_netns(sandbox.netns), sys.executable, "-c", driver],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = _finish(children, stop)
    wrong = sum(
        r["ok"] for r, (cg, *_) in zip(results, loops, strict=True) if cg == "stranger"
    ) + sum(r["fail"] for r, (cg, *_) in zip(results, loops, strict=True) if cg == "owner")
    total = sum(r["ok"] + r["fail"] for r in results)
    print(
        f"\nre-applies: {REAPPLIES} ({proc.stdout.strip()} changed the guard), binds: {total}, "
        f"wrong answers: {wrong}"
    )
    assert int(proc.stdout) == REAPPLIES
    assert wrong == 0
    for r, (cg, *_) in zip(results, loops, strict=True):
        assert (r["ok"] if cg == "owner" else r["fail"]) > 0
        if cg == "stranger":
            assert set(map(int, r["errors"])) <= {errno.EADDRINUSE, errno.EACCES}
