"""The Debian package's life on a running system with a real systemd: install, upgrade under
load, a broken configuration at upgrade time, packages installed later, remove, purge and
reinstall. One boot without portguard; the tests install the built .deb with dpkg and apt
exactly as an administrator would, each from the state it needs.

The tests' drop-in (guest_files.CONFIG, written before boot and owned by no package) keeps the
guard on the container's own cgroup subtree whatever gets installed or purged.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import debs
from tests.systemd import rootfs
from tests.systemd.conftest import booted, package
from tests.systemd.guest_files import CONFIG, OWNER_PORT, PGNET
from tests.systemd.machine import GUEST_DEBS, GUEST_RESULTS, Machine
from tests.systemd.probes import ALL_WAYS, EADDRINUSE, TCP_WAYS, status, stranger_tries, wait_for

pytestmark = pytest.mark.kernel

PIN_DIR = "/sys/fs/bpf/portguard"
SYSCTL = "/proc/sys/net/ipv4/ip_local_reserved_ports"
SPAMD_PORT = 783  # tcp, guard/default_policy.toml: units spamd.service, spamassassin.service
SPAMD_PACKAGE = "pg-test-spamd"
NOT_APPLIED = "portguard: the last apply failed"  # the postinst repeats `portguard status`


def unit_package(directory: Path, name: str, unit: str, text: str) -> Path:
    """A minimal .deb that ships one unit file, as a daemon's package would (no scripts)."""
    tree = directory / name
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: portguard tests <portguard@example.org>\n"
        f"Description: portguard test package shipping {unit}\n"
    )
    (tree / "lib/systemd/system").mkdir(parents=True)
    (tree / "lib/systemd/system" / unit).write_text(text)
    deb = directory / f"{name}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


SPAMD_UNIT = f"""\
[Unit]
Description=portguard test: stands in for spamd, the owner of {SPAMD_PORT}/tcp

[Service]
Type=notify
ExecStart={PGNET} serve {SPAMD_PORT}
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> Iterator[Machine]:
    spamd = unit_package(
        tmp_path_factory.mktemp("debs"), SPAMD_PACKAGE, "spamd.service", SPAMD_UNIT
    )
    carry = (package(), debs.upgrade_package(), debs.new_program_package(), spamd)
    with booted(installed=False, carry=carry) as box:
        box.sysctl_before_install = sysctl(box)
        # Its sockets would refuse strangers too: the tests start it when they need an owner.
        box.systemctl("stop", "pg-owner.service")
        yield box


def in_guest(deb: Path) -> str:
    return f"{GUEST_DEBS}/{deb.name}"


def sysctl(machine: Machine) -> str:
    return machine.run("cat", SYSCTL, check=True).stdout.strip()


def installed_version(machine: Machine) -> str | None:
    shown = machine.run("dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", "portguard")
    state, _, version = shown.stdout.partition(" ")
    return version if state == "installed" else None


def admin(machine: Machine, *command: str):
    """A package tool (dpkg, apt-get) run as an administrator would, without questions."""
    # The drop-in is what keeps the guard off the host's cgroup root: never install without it.
    assert machine.run("test", "-f", CONFIG).returncode == 0, f"{CONFIG} is missing"
    return machine.run("env", "DEBIAN_FRONTEND=noninteractive", *command, timeout=300)


def dpkg(machine: Machine, *args: str):
    return admin(machine, "dpkg", *args)


def install(machine: Machine, deb: Path) -> None:
    """Bring the guest to exactly this package version (install, upgrade or downgrade)."""
    if installed_version(machine) != debs.version_of(deb):
        done = dpkg(machine, "-i", in_guest(deb))
        assert done.returncode == 0, done.stdout + done.stderr


def purge(machine: Machine) -> None:
    if machine.run("dpkg-query", "-W", "portguard").returncode == 0:
        done = dpkg(machine, "--purge", "portguard")
        assert done.returncode == 0, done.stdout + done.stderr


def pins(machine: Machine) -> list[str]:
    found = machine.run("find", PIN_DIR, "-mindepth", "1")
    return found.stdout.split()


def host_link_ids() -> set[int] | None:
    """Every bpf_link in the kernel, seen from the host (None without bpftool there)."""
    if shutil.which("bpftool") is None:
        return None
    proc = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return {link["id"] for link in json.loads(proc.stdout.strip() or "[]")}


def guard_as_loaded(machine: Machine) -> dict:
    """What must not change when an upgrade cannot apply: links, program, reservations."""
    state = status(machine)
    return {
        "links": state["links"],
        "program": state["program"],
        "reservations": sorted(
            (r["port"], r["protocol"], sorted(o["cgroup"] for o in r["owners"]))
            for r in state["reservations"]
        ),
    }


def guarded_ports(machine: Machine) -> set[tuple[int, str]]:
    shown = machine.run("portguard", "status", "--json")
    if shown.returncode != 0:
        return set()
    return {(r["port"], r["protocol"]) for r in json.loads(shown.stdout)["reservations"]}


def test_rootfs_carries_exactly_the_packages_dependencies_and_recommends():
    for field, packages in (
        ("Depends", rootfs.PACKAGE_DEPENDS),
        ("Recommends", rootfs.PACKAGE_RECOMMENDS),
    ):
        listed = subprocess.run(
            ["dpkg-deb", "--field", str(package()), field],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = {re.split(r"[\s:(]", d.strip())[0] for d in listed.split(",")}
        assert names == set(packages), field
    assert not {"clang", "libbpf-dev"} & set(rootfs.PACKAGES)


def test_apt_install_on_the_running_system_guards_at_once_and_enables_the_unit(guest: Machine):
    purge(guest)
    assert not pins(guest)
    started = time.monotonic()
    done = admin(guest, "apt-get", "install", "-y", in_guest(package()))
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    run = guest.show(
        "portguard.service", "ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic"
    )
    applying = (
        int(run["ExecMainExitTimestampMonotonic"]) - int(run["ExecMainStartTimestampMonotonic"])
    ) / 1e6
    print(
        f"apt-get install of the .deb on the running system: {took:.2f} s to guarded "
        f"(portguard apply in portguard.service: {applying:.2f} s)"
    )
    # No waiting: the postinst applied before apt returned (and nobody holds the port).
    assert stranger_tries(guest, OWNER_PORT) == dict.fromkeys(ALL_WAYS, EADDRINUSE)
    guest.systemctl("start", "pg-owner.service")  # the owner binds
    guest.systemctl("stop", "pg-owner.service")
    assert (OWNER_PORT, "tcp") in guarded_ports(guest)
    shown = guest.run("portguard", "status", check=True).stdout
    assert re.search(rf"^ *{OWNER_PORT} tcp ", shown, re.MULTILINE), shown
    assert guest.systemctl("is-enabled", "portguard.service").stdout.strip() == "enabled"
    monitor = guest.systemctl("is-enabled", "portguard-monitor.service", check=False)
    assert monitor.stdout.strip() == "disabled"
    metrics = guest.systemctl("is-enabled", "portguard-metrics.timer", check=False)
    assert metrics.stdout.strip() == "disabled"
    assert guest.show("portguard.service", "ActiveState")["ActiveState"] == "active"
    assert sysctl(guest) != guest.sysctl_before_install  # autobind kept off the reserved ports


def test_broken_dropin_at_upgrade_completes_the_upgrade_and_keeps_the_running_guard(
    guest: Machine,
):
    install(guest, package())
    before = guard_as_loaded(guest)
    broken = "/etc/portguard/conf.d/x.toml"
    guest.write(broken, "[[reserve]]\nports = [\n")
    try:
        done = dpkg(guest, "-i", in_guest(debs.upgrade_package()))
        assert done.returncode == 0, done.stdout + done.stderr
        # ... and why: apply's own error, naming the file.
        assert NOT_APPLIED in done.stderr, done.stdout + done.stderr
        assert "the guard loaded before it is still in place" in done.stderr
        assert f"invalid configuration, nothing applied:\n{broken}:" in done.stderr
        assert installed_version(guest) == debs.version_of(debs.upgrade_package())
        assert guard_as_loaded(guest) == before
        assert guest.run("portguard", "status").returncode == 5  # loaded, not the files' guard
        assert stranger_tries(guest, OWNER_PORT) == dict.fromkeys(ALL_WAYS, EADDRINUSE)
    finally:
        guest.run("rm", "-f", broken, check=True)
    guest.systemctl("restart", "portguard.service")  # the administrator fixed it
    assert guest.show("portguard.service", "Result")["Result"] == "success"


def test_upgrade_to_a_new_program_while_a_stranger_hammers_and_the_owner_restarts(
    guest: Machine,
):
    install(guest, debs.upgrade_package())
    before = status(guest)
    guest.systemctl("start", "portguard-monitor.service")  # as an administrator may have
    monitor_before = guest.show("portguard-monitor.service", "MainPID")["MainPID"]
    guest.run("rm", "-f", "/run/pg-stop", f"{GUEST_RESULTS}/restarts.json", check=True)
    guest.systemctl("start", "pg-owner.service", "pg-hammer.service")
    loop = f"""
        n=0; failed=0
        while [ ! -e /run/pg-stop ]; do
            systemctl restart pg-owner.service || failed=$((failed + 1))
            n=$((n + 1)); echo $n > /run/pg-restarts
        done
        echo "{{\\"restarts\\": $n, \\"failed\\": $failed}}" > {GUEST_RESULTS}/restarts.json
    """
    guest.run("systemd-run", "--unit=pg-restarts", "sh", "-c", loop, check=True)

    def restarts() -> int:
        return int(guest.run("cat", "/run/pg-restarts").stdout.strip() or 0)

    try:
        assert wait_for(lambda: restarts() >= 3), "the owner's restart loop did not run"
        done = dpkg(guest, "-i", in_guest(debs.new_program_package()))
        upgraded_at = restarts()
        assert wait_for(lambda: restarts() >= upgraded_at + 3), "no restarts after the upgrade"
    finally:
        guest.run("touch", "/run/pg-stop")
        wait_for(lambda: (guest.results / "restarts.json").exists())
        guest.systemctl("stop", "pg-hammer.service", check=False)
        guest.systemctl("stop", "pg-owner.service", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert NOT_APPLIED not in done.stderr, done.stderr
    looped = guest.result("restarts.json")
    hammer = guest.result("hammer.json")
    print(
        f"upgrade under load: {looped['restarts']} owner restarts, {looped['failed']} failed; "
        f"stranger {hammer['attempts']} binds, {hammer['bound']} won"
    )
    assert looped["failed"] == 0
    assert hammer["attempts"] > 0 and hammer["bound"] == 0
    assert set(hammer["errors"]) == {str(EADDRINUSE)}
    after = status(guest)
    assert after["program"] != before["program"]
    assert after["links"].keys() == before["links"].keys()
    for name, link in after["links"].items():
        assert link["prog_id"] != before["links"][name]["prog_id"], name
    for name in ("bind4", "bind6"):
        # The same bind links, never detached: the new program was swapped into them
        # (the cgroup trackers are new links, attached beside the old ones first).
        assert after["links"][name]["link_id"] == before["links"][name]["link_id"]
    assert guest.show("pg-owner.service", "Result")["Result"] == "success"
    # A running monitor keeps running, restarted on the new code.
    monitor = guest.show("portguard-monitor.service", "ActiveState", "MainPID")
    guest.systemctl("stop", "portguard-monitor.service")
    assert monitor["ActiveState"] == "active"
    assert monitor["MainPID"] != monitor_before


def test_a_package_installed_later_that_ships_a_default_policy_unit_is_guarded_at_once(
    guest: Machine,
):
    install(guest, package())
    assert (SPAMD_PORT, "tcp") not in guarded_ports(guest)
    spamd = in_guest(Path(SPAMD_PACKAGE + "_1.0_all.deb"))
    done = dpkg(guest, "-i", spamd)
    returned = time.monotonic()
    asked = []  # when each status call started: the delay is that of the first that saw it

    def reserved() -> bool:
        asked.append(time.monotonic())
        return (SPAMD_PORT, "tcp") in guarded_ports(guest)

    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Processing triggers for portguard" in done.stdout, done.stdout
        seen = wait_for(reserved, interval=0.1)
        assert seen, f"{SPAMD_PORT}/tcp not reserved after spamd.service was installed"
        print(
            f"dpkg trigger: {SPAMD_PORT}/tcp reserved {asked[-1] - returned:.2f} s after "
            f"dpkg -i returned (status call {len(asked)})"
        )
        owners = [r["owners"] for r in status(guest)["reservations"] if r["port"] == SPAMD_PORT][0]
        assert "spamd.service" in {o["unit"] for o in owners}
        tried = stranger_tries(guest, SPAMD_PORT)
        assert {way: tried[way] for way in TCP_WAYS} == dict.fromkeys(TCP_WAYS, EADDRINUSE)
        guest.systemctl("start", "spamd.service")  # the owner binds its port
        guest.systemctl("stop", "spamd.service")
    finally:
        removed = dpkg(guest, "--purge", SPAMD_PACKAGE)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    # Its unit file gone, the trigger re-applies without the port.
    assert wait_for(lambda: (SPAMD_PORT, "tcp") not in guarded_ports(guest), interval=0.1)


def loaded_links(machine: Machine) -> set[int]:
    return {link["link_id"] for link in status(machine)["links"].values()}


def assert_guard_gone(machine: Machine, links: set[int]) -> None:
    """No pins, none of the guard's links left in the kernel, the sysctl as before install,
    and a stranger binds the reserved port again."""
    assert not pins(machine)
    on_host = host_link_ids()
    if on_host is not None:
        assert not links & on_host, "the guest's portguard links are still in the kernel"
    assert sysctl(machine) == machine.sysctl_before_install
    assert machine.run("test", "-e", "/usr/bin/portguard").returncode != 0
    assert stranger_tries(machine, OWNER_PORT) == dict.fromkeys(ALL_WAYS, 0)


def test_remove_and_purge_take_the_guard_away_and_reinstall_works(guest: Machine):
    install(guest, package())
    links = loaded_links(guest)
    assert links and pins(guest)

    guest.systemctl("start", "portguard-monitor.service")  # as an administrator may have
    removed = admin(guest, "apt-get", "remove", "-y", "portguard")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert_guard_gone(guest, links)
    # Nothing of the package keeps running without its files.
    for unit in ("portguard.service", "portguard-monitor.service"):
        assert guest.show(unit, "ActiveState")["ActiveState"] == "inactive", unit
    # Removed, not purged: the conffile stays, and installing again guards again.
    assert guest.run("test", "-f", "/etc/portguard/portguard.toml").returncode == 0
    started = time.monotonic()
    install(guest, package())
    print(f"dpkg -i after remove: {time.monotonic() - started:.2f} s to guarded")
    assert stranger_tries(guest, OWNER_PORT) == dict.fromkeys(ALL_WAYS, EADDRINUSE)
    links = loaded_links(guest)

    purged = dpkg(guest, "--purge", "portguard")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert_guard_gone(guest, links)
    for gone in ("/etc/portguard/portguard.toml", "/var/cache/portguard", "/run/portguard"):
        assert guest.run("test", "-e", gone).returncode != 0, gone
