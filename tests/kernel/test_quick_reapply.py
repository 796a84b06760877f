"""The unchanged re-apply (guard/quick.py) answers only for the very guard the last full apply
left, says exactly what the full path says, and every doubt takes the full path, which
repairs: a link taken away, a port out of the sysctl, an apply of other files killed half way,
another network namespace, a failed apply, a new socket on a reserved port, another
environment."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.sandbox import BIND_LINKS, REPO, in_netns

pytestmark = pytest.mark.kernel

PORT = 7681
OLD = time.time() - 3600
FULL = {"PORTGUARD_FAULT_AFTER": str(10**9)}  # the fault hook set: the full path, never killed


def age(*paths: Path) -> None:
    """Files an hour old, changed more than a second ago: apply keeps their compiled plan (a
    fresh file is "racily clean", and a change's ctime is always now)."""
    for path in paths:
        os.utime(path, (OLD, OLD))
    time.sleep(1.1)


def write(sandbox, ports: list[str], **guard: str) -> Path:
    path = sandbox.write_config(sandbox.owner_block(ports, "owner"), **guard)
    age(path, path.parent)
    return path


def apply(sandbox, env: dict | None = None, netns: str | None = None) -> tuple[str, bool]:
    """`portguard apply` through the console entry: (stdout + stderr + exit code, whether the
    full path ran, i.e. guard.commands was imported); the exit line says whether the files
    were parsed (tomllib imported)."""
    code = (
        "import sys\n"
        "from guard import entry\n"
        f"sys.argv = ['portguard', '--config', {str(sandbox.config_path)!r}, 'apply']\n"
        "try:\n"
        "    entry.main()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'tomllib' in sys.modules, file=sys.stderr)\n"
        "print('full' if 'guard.commands' in sys.modules else 'quick', file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [*in_netns(netns or sandbox.netns), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    said, _, path = (proc.stdout + proc.stderr).rstrip("\n").rpartition("\n")
    return said, path == "full"


def applied_twice(sandbox, ports: list[str], **guard: str) -> None:
    """Apply old files twice: the first keeps the records, the second is answered quickly."""
    sandbox.cgroup("owner")
    write(sandbox, ports, **guard)
    _, full = apply(sandbox)
    assert full
    said, full = apply(sandbox)
    assert not full and "portguard: unchanged" in said, said


def refused(sandbox, port: int) -> dict:
    return sandbox.bind("stranger", [("v4", "tcp", port), ("v6", "tcp", port)])


def test_the_quick_answer_is_the_full_paths_answer(sandbox, tmp_path):
    """Warnings included: EPERM refusals with a bindresvport blacklist that lacks the port."""
    blacklist = tmp_path / "bindresvport.blacklist"
    blacklist.write_text("# none\n")
    age(blacklist)
    env = {"PORTGUARD_BINDRESVPORT_BLACKLIST": str(blacklist)}
    sandbox.cgroup("owner")
    write(sandbox, ["700/tcp", f"{PORT}/udp"], deny_errno="EPERM")
    first, full = apply(sandbox, env)
    assert full and "portguard: applied" in first, first
    quick, full = apply(sandbox, env)
    assert not full, quick
    slow, full = apply(sandbox, {**env, **FULL})
    assert full
    assert quick == slow
    assert "add the reserved port(s) 700" in quick and quick.endswith("exit 0 False"), quick
    errors = refused(sandbox, 700)
    assert set(errors.values()) == {errno.EPERM}, errors
    assert sandbox.bind("owner", [("v4", "tcp", 700)]) == {"v4/tcp/700": 0}


def apply_without_site(
    sandbox, heavy: tuple[str, ...], env: dict | None = None
) -> subprocess.CompletedProcess:
    """`portguard apply` under the system interpreter without site, as the Debian package's
    launcher starts it; it prints its exit code and which of the heavy modules (a name, or a
    top-level package with all below it) it imported."""
    code = (
        "import sys\n"
        f"sys.path.append({str(REPO)!r})\n"
        "from guard import entry\n"
        f"sys.argv = ['portguard', '--config', {str(sandbox.config_path)!r}, 'apply']\n"
        "try:\n"
        "    entry.main()\n"
        "except SystemExit as exc:\n"
        f"    heavy = {heavy!r}\n"
        "    print(exc.code, sorted(m for m in sys.modules\n"
        "                           if m in heavy or m.split('.')[0] in heavy))\n"
    )
    return subprocess.run(
        [*in_netns(sandbox.netns), "/usr/bin/python3", "-S", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_the_quick_answer_imports_only_what_it_needs(sandbox):
    """Under the system interpreter without site, as the Debian package's launcher starts it:
    none of the modules the full path pays for (pathlib with re and urllib.parse, typing,
    socket.py's enums, the TOML parser, the libbpf binding)."""
    applied_twice(sandbox, [f"{PORT}/tcp"])
    heavy = ("pathlib", "re", "typing", "socket", "tomllib", "enum")
    heavy += ("guard.commands", "guard.kernel.libbpf", "guard.kernel.layout")
    proc = apply_without_site(sandbox, heavy)
    assert proc.stdout.endswith("0 []\n"), proc.stdout + proc.stderr
    assert "portguard: unchanged" in proc.stdout


def test_a_link_taken_away_is_put_back_by_the_full_path(sandbox):
    applied_twice(sandbox, [f"{PORT}/tcp"])
    for name in BIND_LINKS:
        (sandbox.pin_dir / f"link_{name}").unlink()  # the only reference: detached
    assert set(refused(sandbox, PORT).values()) == {0}  # nothing guards now
    said, full = apply(sandbox)
    assert full and said.endswith(("exit 0 False", "exit 0 True")), said
    assert set(refused(sandbox, PORT).values()) == {errno.EADDRINUSE}
    _, full = apply(sandbox)
    assert not full  # and the record is back


def test_a_port_taken_out_of_the_sysctl_is_put_back(sandbox):
    name = "net.ipv4.ip_local_reserved_ports"
    applied_twice(sandbox, [f"{PORT}/tcp"])
    assert sandbox.sysctl(name) == str(PORT)
    sandbox.sysctl(name, "")
    said, full = apply(sandbox)
    assert full and said.endswith(("exit 0 False", "exit 0 True")), said
    assert sandbox.sysctl(name) == str(PORT)


def test_an_apply_of_other_files_killed_half_way_is_never_vouched_for(sandbox, tmp_path):
    """Whatever step of another configuration's apply on the same pin directory is killed,
    the next apply of the first files takes the full path and ends with their guard."""
    applied_twice(sandbox, [f"{PORT}/tcp"])
    other = tmp_path / "other.toml"
    other.write_text(sandbox.config_path.read_text().replace(f'"{PORT}/tcp"', f'"{PORT + 1}/udp"'))
    for step in range(1, 40):
        killed = sandbox.cli(
            "apply", config=other, check=False, env={"PORTGUARD_FAULT_AFTER": str(step)}
        )
        said, full = apply(sandbox)
        assert full and said.endswith(("exit 0 False", "exit 0 True")), (step, said)
        reserved = {(r["port"], r["protocol"]) for r in sandbox.status()["reservations"]}
        assert reserved == {(PORT, "tcp")}, (step, reserved)
        if killed.returncode == 0:  # the other apply ran to its end: every step was tried
            break
    else:
        pytest.fail("the other apply never ran to its end")


def test_another_network_namespace_takes_the_full_path(sandbox):
    applied_twice(sandbox, [f"{PORT}/tcp"])
    elsewhere = sandbox.new_netns()
    # the same reserved ports there (the sysctl is per namespace): only the namespace differs
    reserved = "/proc/sys/net/ipv4/ip_local_reserved_ports"
    subprocess.run([*in_netns(elsewhere), "sh", "-c", f"echo {PORT} > {reserved}"], check=True)
    said, full = apply(sandbox, netns=elsewhere)
    assert full and said.endswith(("exit 0 False", "exit 0 True")), said


def test_after_a_failed_apply_the_full_path_runs(sandbox):
    applied_twice(sandbox, [f"{PORT}/tcp"])
    broken = sandbox.config_path.read_text() + "\n[[reserve]]\nports = [70000]\n"
    sandbox.config_path.write_text(broken)
    said, full = apply(sandbox)
    assert full and said.endswith("exit 2 True"), said
    write(sandbox, [f"{PORT}/tcp"])  # as before, but the failure is on record until an apply
    said, full = apply(sandbox)
    assert full and said.endswith(("exit 0 False", "exit 0 True")), said
    assert sandbox.status()["last_apply_failure"] is None


def test_a_new_socket_on_a_reserved_port_takes_the_full_path_once(sandbox):
    applied_twice(sandbox, [f"{PORT}/tcp"])
    sandbox.serve("owner", "v4", "tcp", PORT)
    said, full = apply(sandbox)
    assert full and "warning" not in said, said  # the owner's: no squatter
    _, full = apply(sandbox)
    assert not full  # the owner's socket is on record now


def test_another_environment_or_blacklist_takes_the_full_path(sandbox, tmp_path):
    applied_twice(sandbox, ["700/tcp"], deny_errno="EPERM")
    blacklist = tmp_path / "bindresvport.blacklist"
    blacklist.write_text("700\n")
    env = {"PORTGUARD_BINDRESVPORT_BLACKLIST": str(blacklist)}
    said, full = apply(sandbox, env)
    assert full and "add the reserved" not in said, said
    age(blacklist)
    said, full = apply(sandbox, env)
    assert full and "add the reserved" not in said, said  # the last apply's record: racy
    _, full = apply(sandbox, env)
    assert not full
    blacklist.write_text("# none\n")  # edited: the advice comes back
    said, full = apply(sandbox, env)
    assert full and "add the reserved port(s) 700" in said, said


def test_remove_takes_the_record_away(sandbox):
    applied_twice(sandbox, [f"{PORT}/tcp"])
    record = Path(os.environ["PORTGUARD_RUN_DIR"]) / (
        "guard" + str(sandbox.pin_dir).replace("/", "-")
    )
    assert record.exists()
    sandbox.cli("remove")
    assert not record.exists()
    said, full = apply(sandbox)
    assert full and "portguard: applied" in said, said
    assert set(refused(sandbox, PORT).values()) == {errno.EADDRINUSE}


def test_the_boots_apply_with_the_last_boots_plan_imports_neither_pathlib_nor_typing(
    sandbox, tmp_path
):
    """A boot that takes the plan the last boot kept, under the system interpreter without site
    as the Debian package's launcher starts it: the guard applied, and none of pathlib (with
    re, fnmatch, urllib.parse), typing or enum imported on the way."""
    state = tmp_path / "state"
    state.mkdir()
    sandbox.cgroup("owner")
    write(sandbox, [f"{PORT}/tcp"])
    env = {"PORTGUARD_RUN_DIR": str(tmp_path / "run1"), "PORTGUARD_STATE_DIR": str(state)}
    said, _ = apply(sandbox, env)
    assert said.endswith("exit 0 True"), said  # the files parsed, the plan kept for the next
    sandbox.cli("remove", env=env)
    heavy = ("pathlib", "typing", "re", "enum", "fnmatch", "urllib", "ipaddress", "tomllib")
    env = {"PORTGUARD_RUN_DIR": str(tmp_path / "run2"), "PORTGUARD_STATE_DIR": str(state)}
    proc = apply_without_site(sandbox, (*heavy, "guard.policy.units"), env)
    assert proc.stdout.endswith("0 []\n"), proc.stdout + proc.stderr
    assert "portguard: applied" in proc.stdout
    assert set(refused(sandbox, PORT).values()) == {errno.EADDRINUSE}


def test_the_next_boots_apply_takes_the_plan_the_last_boot_kept(sandbox, tmp_path):
    """The boot's first apply keeps its plan in the state directory; the next boot's (an empty
    /run, no guard) takes it without parsing the files while they are unchanged, and reads
    them when they changed."""
    state = tmp_path / "state"
    state.mkdir()
    boots = iter(range(1, 10))

    def boot() -> dict:
        """A new boot: an empty /run (the guard of the last one was removed)."""
        run = tmp_path / f"run{next(boots)}"
        run.mkdir()
        return {"PORTGUARD_RUN_DIR": str(run), "PORTGUARD_STATE_DIR": str(state)}

    sandbox.cgroup("owner")
    write(sandbox, [f"{PORT}/tcp"])
    env = boot()
    said, _ = apply(sandbox, env)
    assert said.endswith("exit 0 True"), said  # the files parsed, the plan kept for the next
    assert [p.name for p in state.iterdir()] == [
        "plan" + str(sandbox.config_path).replace("/", "-")
    ]
    sandbox.cli("remove", env=env)

    env = boot()
    said, _ = apply(sandbox, env)
    assert "portguard: applied" in said and said.endswith("exit 0 False"), said
    assert set(refused(sandbox, PORT).values()) == {errno.EADDRINUSE}
    _, full = apply(sandbox, env)
    assert not full  # and /run has its records again: the quick re-apply
    sandbox.cli("remove", env=env)

    write(sandbox, [f"{PORT + 1}/tcp"])  # edited between two boots
    env = boot()
    said, _ = apply(sandbox, env)
    assert "portguard: applied" in said and said.endswith("exit 0 True"), said
    assert set(refused(sandbox, PORT + 1).values()) == {errno.EADDRINUSE}
    assert set(refused(sandbox, PORT).values()) == {0}
