"""Installing where the guard cannot load must not fail the installation: a container booted
with systemd-nspawn's default system call filter and capabilities, where bpf() is refused
(as on a host whose kernel or policy forbids BPF). dpkg completes, portguard.service fails with
a one-sentence reason in the journal, and `portguard status` says why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.systemd.conftest import booted, package
from tests.systemd.machine import GUEST_DEBS, Machine

pytestmark = pytest.mark.kernel

# What apply says where bpf() is refused (its feature probe finds no BPF links).
REASON = "this kernel cannot run portguard, nothing was loaded"


@pytest.fixture(scope="module")
def guest_without_bpf() -> Iterator[Machine]:
    with booted(installed=False, carry=(package(),), bpf=False) as box:
        yield box


def test_install_completes_where_the_guard_cannot_load_and_the_reason_is_told(
    guest_without_bpf: Machine,
):
    box = guest_without_bpf
    done = box.run(
        "env", "DEBIAN_FRONTEND=noninteractive", "dpkg", "-i", f"{GUEST_DEBS}/{package().name}",
        timeout=300,
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert box.run("dpkg-query", "-W", "-f=${db:Status-Status}", "portguard").stdout == "installed"
    # The postinst says it was not applied, and why: apply's own sentence.
    assert "portguard: the last apply failed" in done.stderr, said
    assert "no guard is loaded" in done.stderr, said
    assert REASON in done.stderr, said
    assert box.show("portguard.service", "ActiveState", "Result") == {
        "ActiveState": "failed",
        "Result": "exit-code",
    }
    assert box.systemctl("is-enabled", "portguard.service").stdout.strip() == "enabled"
    journal = box.run("journalctl", "-q", "-o", "cat", "-u", "portguard.service").stdout
    reasons = [line for line in journal.splitlines() if line.startswith("Error: ")]
    assert len(reasons) == 1 and REASON in reasons[0], journal
    assert reasons[0].count(". ") == 0, "one sentence"
    assert "Traceback" not in journal
    # Run by the guest's systemd: nsenter would not inherit the container's seccomp filter.
    shown = box.run(
        "systemd-run", "--quiet", "--wait", "--pipe", "--collect", "portguard", "status"
    )
    assert shown.returncode == 4, shown.stdout  # not loaded
    assert REASON in shown.stdout + shown.stderr
    assert "Traceback" not in shown.stdout + shown.stderr
