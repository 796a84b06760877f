"""`portguard demo`, the README's first command: written for people, and it cleans up."""

from __future__ import annotations

import re
import subprocess

from tests.kernel.sandbox import PORTGUARD, REPO


def test_demo_prints_tables_and_sentences_not_python_reprs_and_leaves_nothing(cgroup_root):
    before = {p.name for p in cgroup_root.iterdir() if p.name.startswith("portguard-demo-")}
    proc = subprocess.run(
        [*PORTGUARD, "demo"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert not re.search(r"[{}]|\['|': '", out), out  # no dict or list reprs
    assert all(len(line) <= 100 for line in out.splitlines()), out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["UNIT", "IPv4/tcp"])
    assert lines[header + 1].split() == ["cups.service", "bound", "bound", "bound", "bound"]
    assert lines[header + 2].split() == ["rpcbind.service"] + ["EADDRINUSE"] * 4
    # bindresvport() starts at a random port, so it meets 0 or more reserved ports on its way;
    # the kernel's count is the 4 refusals of the table plus the ones it met.
    got = re.search(r"it got port (\d+): (no reserved port|it met (\d+) reserved port)", out)
    assert got, out
    assert int(got[1]) not in {631, 636, 655, 749, 783, 873, 993, 995}
    met = int(got[3] or 0)
    assert f"The kernel counted {4 + met} refused binds" in out
    assert any(line.split()[:2] == ["631", "tcp"] for line in lines)
    after = {p.name for p in cgroup_root.iterdir() if p.name.startswith("portguard-demo-")}
    assert after == before
