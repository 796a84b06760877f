"""The core guard against the real kernel: who may bind a reserved port, and with what errno."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time

import pytest

from guard.kernel import libbpf as kernel
from tests.kernel.sandbox import BIND_LINKS, ROAD, new_sandbox
from tests.unprivileged import run_python

PORT = 7631
FREE = 7632
FAMILIES = ["v4", "v6", "dual", "mapped"]
PROTOS = ["tcp", "udp"]
ALL_CASES = [(f, t, PORT) for f in FAMILIES for t in PROTOS]
BPF_PROG_TYPE_RAW_TRACEPOINT = 17


def applied(sandbox, ports=(f"{PORT}",), owners=("owner",), **guard):
    sandbox.write_config(sandbox.owner_block(list(ports), *owners), **guard)
    out = sandbox.cli("apply").stdout
    assert "portguard:" in out
    return out


def test_stranger_gets_eaddrinuse_and_owner_and_its_subcgroups_bind(sandbox):
    applied(sandbox)
    assert set(sandbox.bind("owner", ALL_CASES).values()) == {0}
    assert set(sandbox.bind("owner/worker", ALL_CASES).values()) == {0}
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}


def test_ports_that_are_not_reserved_are_untouched(sandbox):
    applied(sandbox)
    cases = [(f, t, FREE) for f in FAMILIES for t in PROTOS]
    assert set(sandbox.bind("stranger", cases).values()) == {0}


def test_protocol_qualified_reservation_leaves_the_other_protocol_free(sandbox):
    applied(sandbox, ports=(f"{PORT}/udp",))
    result = sandbox.bind("stranger", [("v4", "tcp", PORT), ("v4", "udp", PORT)])
    assert result == {f"v4/tcp/{PORT}": 0, f"v4/udp/{PORT}": errno.EADDRINUSE}


@pytest.mark.parametrize("name", ["EPERM", "EACCES"])
def test_deny_errno_is_configurable(sandbox, name):
    applied(sandbox, deny_errno=name)
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {getattr(errno, name)}


def test_a_port_may_have_several_owners(sandbox):
    sandbox.write_config(
        sandbox.owner_block([str(PORT)], "cups")
        + "\n"
        + sandbox.owner_block([str(PORT)], "cups-browsed")
    )
    sandbox.cli("apply")
    assert set(sandbox.bind("cups", ALL_CASES).values()) == {0}
    assert set(sandbox.bind("cups-browsed", ALL_CASES).values()) == {0}
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}
    owners = {o["cgroup"] for r in sandbox.status()["reservations"] for o in r["owners"]}
    assert owners == {f"{sandbox.top}/cups", f"{sandbox.top}/cups-browsed"}


def test_bindresvport_skips_reserved_ports_and_succeeds_elsewhere(sandbox):
    # Everything bindresvport() may pick is reserved except 700: it must walk past the
    # refusals (EADDRINUSE) and end on 700.
    applied(sandbox, ports=("512-699", "701-1023"))
    result = sandbox.run("stranger", "bindresvport", [])
    assert result == {"rc": 0, "errno": 0, "port": 700}


def test_bindresvport_gives_up_when_refusals_are_eperm(sandbox):
    # Why EADDRINUSE is the default: glibc stops at the first other error.
    applied(sandbox, ports=("512-699", "701-1023"), deny_errno="EPERM")
    result = sandbox.run("stranger", "bindresvport", [])
    assert result["rc"] == -1 and result["errno"] == errno.EPERM


def test_other_network_namespaces_are_not_guarded(sandbox):
    applied(sandbox)
    container = sandbox.new_netns()
    assert set(sandbox.bind("stranger", ALL_CASES, netns=container).values()) == {0}
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}


def test_a_guard_never_judges_a_bind_from_outside_its_attach_cgroup(sandbox, cgroup_root):
    # The sandbox guard is attached below the root: a task of another cgroup subtree binds a
    # reserved port in the guarded namespace, and nothing judges it (on every road).
    applied(sandbox)
    outside = new_sandbox(cgroup_root, "outside")
    outside.create()
    try:
        result = outside.bind("stranger", ALL_CASES, netns=sandbox.netns)
    finally:
        outside.destroy()
    assert set(result.values()) == {0}
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}
    counted = {(r["port"], r["protocol"]): r["denied"] for r in sandbox.status()["reservations"]}
    assert counted == {(PORT, "tcp"): 4, (PORT, "udp"): 4}  # the sandbox's stranger only


def test_autobind_never_lands_on_a_reserved_port(sandbox):
    sandbox.sysctl("net.ipv4.ip_local_port_range", "40000 40003")
    applied(sandbox, ports=("40000-40002",))
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == "40000-40002"
    seen = sandbox.run("stranger", "autobind", [30, PORT])
    assert seen == [40003]


def test_remove_restores_the_sysctl_keeping_what_was_there(sandbox):
    sandbox.sysctl("net.ipv4.ip_local_reserved_ports", "5555,40000")
    applied(sandbox, ports=("5555", "40001-40002"))
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == "5555,40000-40002"
    sandbox.cli("remove")
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == "5555,40000"


def test_an_unchanged_reapply_puts_back_reserved_ports_taken_out_of_the_sysctl(sandbox):
    applied(sandbox, ports=(f"{PORT}", f"{FREE}"))
    sandbox.sysctl("net.ipv4.ip_local_reserved_ports", str(FREE))  # root took PORT out
    assert sandbox.bind("stranger", [("v4", "tcp", PORT)]) == {f"v4/tcp/{PORT}": errno.EADDRINUSE}
    applied(sandbox, ports=(f"{PORT}", f"{FREE}"))
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == f"{PORT}-{FREE}"
    sandbox.cli("remove")  # and it is still apply's to take away
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == ""


def test_owner_restart_gets_the_new_cgroup_id_with_no_process_running(sandbox):
    sandbox.cgroup("owner")
    applied(sandbox)
    assert sandbox.status()["reservations"][0]["owners"][0]["id"] == sandbox.cgroup_id("owner")
    old_id = sandbox.cgroup_id("owner")
    sandbox.rmdir("owner")
    absent = sandbox.status()["reservations"][0]["owners"][0]
    assert absent["id"] is None
    sandbox.cgroup("owner")
    new_id = sandbox.cgroup_id("owner")
    assert new_id != old_id
    assert set(sandbox.bind("owner", ALL_CASES).values()) == {0}
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}
    assert sandbox.status()["reservations"][0]["owners"][0]["id"] == new_id


def test_the_cgroup_trackers_are_raw_tracepoint_programs(sandbox):
    # raw_tp, not tp_btf: libbpf needs no kernel BTF for their attach points, so a minimal
    # BTF (guard/kernel/corebtf.py) spares the load parsing all of the kernel's
    applied(sandbox)
    for name in ("mkdir", "rmdir"):
        link = kernel.get_pinned(sandbox.pin_dir / f"link_{name}")
        try:
            info = kernel.link_info(link)
            prog = kernel.reopen_program(info.prog_id)
            try:
                assert kernel.prog_info(prog).type == BPF_PROG_TYPE_RAW_TRACEPOINT
            finally:
                kernel.close(prog)
        finally:
            kernel.close(link)
        assert info.type == kernel.LINK_TYPE_RAW_TRACEPOINT


def test_owner_cgroup_created_after_apply_owns_the_port_at_once(sandbox):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "later.service"))
    sandbox.cli("apply")
    assert sandbox.status()["reservations"][0]["owners"][0]["id"] is None
    assert set(sandbox.bind("later.service", ALL_CASES).values()) == {0}


def test_a_cgroup_v1_directory_at_an_owners_path_is_not_the_owner(sandbox):
    # Hybrid layouts: the cgroup_mkdir tracepoint fires for v1 hierarchies too, with ids that
    # collide with cgroup2's. A named v1 hierarchy of our own (no controller) stands for them.
    applied(sandbox)
    v1 = sandbox.work / "v1"
    v1.mkdir()
    name = f"none,name={sandbox.name}"[:64]
    subprocess.run(["mount", "-t", "cgroup", "-o", name, "cgroup", str(v1)], check=True)
    try:
        (v1 / sandbox.name / "owner").mkdir(parents=True)
        assert sandbox.status()["reservations"][0]["owners"][0]["id"] is None
        assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}
    finally:
        for directory in (v1 / sandbox.name / "owner", v1 / sandbox.name):
            if directory.exists():
                directory.rmdir()
        subprocess.run(["umount", str(v1)], check=True)


def test_status_from_a_fresh_process_shows_links_and_reservations(sandbox):
    applied(sandbox, ports=(f"{PORT}/tcp",))
    state = sandbox.status()
    assert state["loaded"] is True
    assert set(state["links"]) == {*BIND_LINKS, "mkdir", "rmdir"}
    if "bind4" in BIND_LINKS:
        assert state["links"]["bind4"]["cgroup_id"] == sandbox.top_dir.stat().st_ino
    assert state["reservations"] == [
        {
            "port": PORT,
            "protocol": "tcp",
            "denied": 0,
            "holders": [],
            "owners": [
                {"cgroup": f"{sandbox.top}/owner", "id": sandbox.cgroup_id("owner"), "unit": None}
            ],
            "contain": False,
            "contained_drops": 0,
            "origins": [f"{sandbox.config_path}:{_ports_line(sandbox)}"],
        }
    ]


def _ports_line(sandbox) -> int:
    """The line of the configuration that names the reserved ports (their origin)."""
    lines = sandbox.config_path.read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if line.startswith("ports"))


def test_check_names_the_owner(sandbox):
    applied(sandbox, ports=(f"{PORT}/tcp",))
    out = json.loads(sandbox.cli("check", f"{PORT}", "--json").stdout)
    assert out == [
        {
            "port": PORT,
            "protocol": "tcp",
            "reserved": True,
            "owners": [
                {"cgroup": f"{sandbox.top}/owner", "id": sandbox.cgroup_id("owner"), "unit": None}
            ],
            "origins": [f"{sandbox.config_path}:{_ports_line(sandbox)}"],
        },
        {"port": PORT, "protocol": "udp", "reserved": False, "owners": [], "origins": []},
    ]


def test_reapply_with_the_same_config_changes_nothing(sandbox):
    applied(sandbox)
    before = sandbox.status()
    out = sandbox.cli("apply").stdout
    assert "unchanged" in out
    assert sandbox.status() == before


def test_reapply_with_a_changed_config_updates_the_guard(sandbox):
    applied(sandbox, ports=(f"{PORT}",))
    links = sandbox.status()["links"]
    applied(sandbox, ports=(f"{FREE}",))
    assert sandbox.status()["links"] == links  # maps changed, links and programs kept
    result = sandbox.bind("stranger", [("v4", "tcp", PORT), ("v4", "tcp", FREE)])
    assert result == {f"v4/tcp/{PORT}": 0, f"v4/tcp/{FREE}": errno.EADDRINUSE}
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == str(FREE)


def test_reapply_under_load_never_lets_the_stranger_in_nor_keeps_the_owner_out(sandbox):
    # Alternate configs that both reserve PORT for the owner but differ elsewhere, and swap
    # the attach point's program set too (mode/errno differ): the answer for PORT must never
    # change while binds run in loops.
    stop = sandbox.work / "stop"
    configs = []
    for i, extra in enumerate(([], ["9000-9099"])):
        path = sandbox.work / f"c{i}.toml"
        sandbox.write_config(
            sandbox.owner_block([str(PORT), *extra], "owner"),
            deny_errno=["EADDRINUSE", "EACCES"][i],
        )
        path.write_text(sandbox.config_path.read_text())
        configs.append(path)
    sandbox.cli("apply", config=configs[0])
    stranger = sandbox.start("stranger", "loop", ["dual", "tcp", PORT, str(stop)])
    owner = sandbox.start("owner", "loop", ["v4", "udp", PORT, str(stop)])
    for child in (stranger, owner):
        assert child.stdout.readline().strip() == "ready"
    for i in range(50):
        sandbox.cli("apply", config=configs[i % 2])
    stop.touch()
    s = json.loads(stranger.communicate(timeout=60)[0].strip().splitlines()[-1])
    o = json.loads(owner.communicate(timeout=60)[0].strip().splitlines()[-1])
    # the counts in the message: a failure must say which side it was, and how often
    assert s["ok"] == 0 and s["fail"] > 0, {"stranger": s, "owner": o}
    assert set(map(int, s["errors"])) <= {errno.EADDRINUSE, errno.EACCES}, s
    assert o["fail"] == 0 and o["ok"] > 0, {"stranger": s, "owner": o}


def test_remove_leaves_no_links_pins_or_sysctl_entries(sandbox):
    applied(sandbox)
    link_ids = [link["link_id"] for link in sandbox.status()["links"].values()]
    sandbox.cli("remove")
    assert not sandbox.pin_dir.exists()
    assert sandbox.sysctl("net.ipv4.ip_local_reserved_ports") == ""
    for link_id in link_ids:
        fd = kernel.lib().bpf_link_get_fd_by_id(link_id)
        assert fd < 0, f"link {link_id} still exists"
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {0}
    assert "nothing to remove" in sandbox.cli("remove").stdout


def test_bad_config_exits_2_naming_file_and_line_and_leaves_the_guard_as_it_was(sandbox):
    applied(sandbox)
    before = sandbox.status()
    good = sandbox.config_path.read_text()
    sandbox.config_path.write_text(good + '\n[[reserve]]\nports = ["70000"]\ncgroup = "/x"\n')
    proc = sandbox.cli("apply", check=False)
    bad_line = len(good.splitlines()) + 3
    assert proc.returncode == 2
    assert f"{sandbox.config_path}:{bad_line}: port 70000 is out of range" in proc.stderr
    assert "Traceback" not in proc.stderr
    after = sandbox.status()
    assert "port 70000 is out of range" in after.pop("last_apply_failure")["message"]
    before.pop("last_apply_failure")
    # the guard is as it was; status now says the files are not what is loaded
    assert (after.pop("config_matches"), before.pop("config_matches")) == (False, True)
    assert "port 70000 is out of range" in after.pop("config_differences")[0]
    before.pop("config_differences")
    # origins come from the files, which cannot be read as a whole now: none is shown
    assert all(r.pop("origins") == [] for r in after["reservations"])
    assert all(r.pop("origins") for r in before["reservations"])
    assert after == before
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}


def test_missing_attach_cgroup_is_one_clear_sentence(sandbox):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"), cgroup=f"{sandbox.top}/nope")
    proc = sandbox.cli("apply", check=False)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"Error: the attach cgroup {sandbox.top}/nope does not exist under {sandbox.cgroup_root}"
    )


def test_pin_dir_outside_bpffs_is_one_clear_sentence(sandbox):
    sandbox.write_config(
        sandbox.owner_block([str(PORT)], "owner"), pin_dir=str(sandbox.work / "pins")
    )
    proc = sandbox.cli("apply", check=False)
    assert proc.returncode == 1
    assert "is not on a BPF file system" in proc.stderr and "Traceback" not in proc.stderr


def test_not_root_is_one_clear_sentence(sandbox, nobody_modules):
    applied(sandbox)
    sandbox.config_path.parent.chmod(0o755)  # nobody reads the files, not the pins
    sandbox.config_path.chmod(0o644)
    for command in ("apply", "status", "remove"):
        args = ["-m", "guard", "--config", str(sandbox.config_path), command]
        proc = run_python(nobody_modules, args)
        assert proc.returncode == 1, (command, proc.stderr)
        assert "must run as root" in proc.stderr and "Traceback" not in proc.stderr


def test_no_compiled_object_and_no_clang_names_the_fix(sandbox):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    proc = sandbox.cli(
        "apply",
        check=False,
        env={"PORTGUARD_CACHE_DIR": str(sandbox.work / "empty"), "PORTGUARD_CLANG": ""},
    )
    assert proc.returncode == 1
    assert "install clang" in proc.stderr and "portguard build" in proc.stderr
    assert not sandbox.pin_dir.exists() or not any(sandbox.pin_dir.iterdir())


def test_guard_survives_the_exit_of_apply(sandbox):
    applied(sandbox)
    time.sleep(0.2)  # the CLI process has exited; the kernel still refuses
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}


def test_sixty_four_owners_at_different_depths_each_bind_and_strangers_do_not(sandbox):
    """The owner test visits the levels where the port's owners sit, not the owners: the
    last of 64 owners binds, at any depth, and so do their sub-cgroups; siblings do not."""
    owners = [f"o{i}" for i in range(59)] + ["deep/a", "deep/b/c", "deep/b/d/e", "x/y/z/w", "x/q"]
    sandbox.write_config(sandbox.owner_block([str(PORT)], *owners))
    sandbox.cli("apply")
    cases = [("v4", "tcp", PORT), ("v6", "udp", PORT)]
    for owner in ("o0", "o58", "deep/a", "deep/b/c", "deep/b/d/e", "x/y/z/w", "x/q", "o58/sub"):
        assert set(sandbox.bind(owner, cases).values()) == {0}, owner
    for stranger in ("stranger", "deep", "deep/b", "deep/b/d", "x/y/z", "x/y/z2", "x/y/zw/w"):
        assert set(sandbox.bind(stranger, cases).values()) == {errno.EADDRINUSE}, stranger


def test_an_owner_recreated_is_found_by_its_new_id_and_the_old_one_is_forgotten(sandbox):
    sandbox.cgroup("svc")
    applied(sandbox, owners=("svc",))
    old = sandbox.cgroup_id("svc")
    sandbox.rmdir("svc")
    assert set(sandbox.bind("svc", [("v4", "tcp", PORT)]).values()) == {0}  # recreated
    maps_dir = next(sandbox.pin_dir.glob("maps-*"))
    from guard.kernel import layout

    fd = kernel.get_pinned(maps_dir / "owner_ids")
    try:
        ids = kernel.Map(fd, layout.IdKey, layout.U32)
        assert {k.id for k in ids.keys()} == {sandbox.cgroup_id("svc")} != {old}
    finally:
        kernel.close(fd)


# portguard as a kernel without bpf_set_retval (Linux < 5.18) runs it: the feature probe says
# so, and everything else (the security_socket_bind probe, the programs, the config, status) is
# the real thing here.
WITHOUT_SET_RETVAL = [
    sys.executable,
    "-c",
    "from guard.kernel import libbpf\n"
    "real = libbpf.probe_features\n"
    "libbpf.probe_features = lambda: real()._replace(set_retval=False)\n"
    "from guard.cli import main\n"
    "main(prog_name='portguard')\n",
]
# why this kernel refuses the security_socket_bind program (this host: locked down, no
# trampolines), None where it takes it (the VMs' stock kernels)
HOOK_REFUSAL = kernel.hook_refusal()


def test_without_set_retval_the_second_road_guards_where_the_kernel_allows_it(sandbox):
    sandbox.write_config(sandbox.owner_block([f"{PORT}"], "owner"), refuse_at="auto")
    applied = sandbox.cli("apply", program=WITHOUT_SET_RETVAL)
    assert "Traceback" not in applied.stderr
    status = sandbox.cli("status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr  # not 5: all it can have
    state = sandbox.status()
    assert set(sandbox.bind("owner", ALL_CASES).values()) == {0}
    if HOOK_REFUSAL is None:
        assert applied.stderr == ""
        assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}
        assert (state["refuse_at"], state["deny_errno"]) == ("security_socket_bind", 98)
        assert set(state["links"]) == {"socket_bind", "mkdir", "rmdir"}
    else:  # the fallback: EPERM, and a sentence that says why
        assert (
            "warning: this kernel lacks bpf_set_retval (Linux < 5.18) and refuses fmod_ret "
            f"programs on security_socket_bind ({HOOK_REFUSAL}): refused binds fail with EPERM, "
            "not EADDRINUSE"
        ) in applied.stderr
        assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EPERM}
        assert (state["refuse_at"], state["deny_errno"], state["eperm_only"]) == (
            "cgroup-eperm",
            1,
            True,
        )
        assert set(state["links"]) == {"bind4", "bind6", "mkdir", "rmdir"}
    assert state["config_matches"] is True


def test_refuse_at_security_socket_bind_guards_there_or_says_this_kernel_refuses_it(sandbox):
    sandbox.write_config(
        sandbox.owner_block([f"{PORT}"], "owner"), refuse_at="security_socket_bind"
    )
    applied = sandbox.cli("apply", check=False)
    assert "Traceback" not in applied.stderr
    if HOOK_REFUSAL is None:
        assert applied.returncode == 0, applied.stderr
        assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}
        assert sandbox.status()["refuse_at"] == "security_socket_bind"
    else:
        assert applied.returncode == 1
        assert applied.stderr == (
            'Error: refuse_at = "security_socket_bind": this kernel refuses fmod_ret programs '
            f"on security_socket_bind ({HOOK_REFUSAL}); nothing applied (set "
            'refuse_at = "auto")\n'
        )
        status = sandbox.cli("status", "--json", check=False)  # exit 4: the apply failed
        assert (status.returncode, json.loads(status.stdout)["loaded"]) == (4, False)
        assert set(sandbox.bind("stranger", ALL_CASES).values()) == {0}


def test_refuse_at_cgroup_eperm_refuses_with_eperm_and_names_the_ports_to_blacklist(sandbox):
    # the last resort, as on a kernel where neither of the other roads attaches
    sandbox.write_config(sandbox.owner_block([f"{PORT}", "700"], "owner"), refuse_at="cgroup-eperm")
    applied = sandbox.cli("apply")
    assert 'refuse_at = "cgroup-eperm": refused binds fail with EPERM, not EADDRINUSE' in (
        applied.stderr
    )
    assert "/etc/bindresvport.blacklist" in applied.stderr
    assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EPERM}
    assert set(sandbox.bind("owner", ALL_CASES).values()) == {0}
    state = sandbox.status()
    assert (state["refuse_at"], state["eperm_only"]) == ("cgroup-eperm", True)


def test_status_says_where_binds_are_refused(sandbox):
    applied(sandbox)
    assert sandbox.status()["refuse_at"] == ROAD
    said = {
        "cgroup": "the cgroup bind hooks (bpf_set_retval)",
        "security_socket_bind": "security_socket_bind (fmod_ret",
        "cgroup-eperm": "the cgroup bind hooks, EPERM only",
    }
    assert f"  binds refused at {said[ROAD]}" in sandbox.cli("status", check=False).stdout


# A kernel whose probe program attaches but which refuses the guard's own hook program (a
# verifier the probe cannot foresee): here the probe's verdict is overridden, and the real
# load of the program meets this kernel's refusal.
PROBE_PASSES_WITHOUT_SET_RETVAL = [
    *WITHOUT_SET_RETVAL[:2],
    WITHOUT_SET_RETVAL[2].replace(
        "from guard.cli", "libbpf.hook_refusal = lambda: None\nfrom guard.cli"
    ),
]


def test_a_hook_program_the_kernel_refuses_after_the_probe_falls_back_to_eperm(sandbox):
    sandbox.write_config(sandbox.owner_block([f"{PORT}"], "owner"), refuse_at="auto")
    applied = sandbox.cli("apply", program=PROBE_PASSES_WITHOUT_SET_RETVAL)
    assert "Traceback" not in applied.stderr
    state = sandbox.status()
    assert set(sandbox.bind("owner", ALL_CASES).values()) == {0}
    if HOOK_REFUSAL is None:  # nothing to fall back from: the program loads here
        assert state["refuse_at"] == "security_socket_bind"
        assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EADDRINUSE}
    else:
        assert (
            "warning: this kernel refused portguard's security_socket_bind program ("
            in applied.stderr
        )
        assert "refused binds fail with EPERM, not EADDRINUSE" in applied.stderr
        assert state["refuse_at"] == "cgroup-eperm"
        assert set(state["links"]) == {"bind4", "bind6", "mkdir", "rmdir"}
        assert set(sandbox.bind("stranger", ALL_CASES).values()) == {errno.EPERM}
