"""The full-count hardening run (issue 7), separate from the default test run.

    sudo .venv/bin/python -m tests.soak            # full counts
    sudo .venv/bin/python -m tests.soak --quick    # the default (CI) counts, same tests

Full counts: every step of apply/remove is a kill point (PORTGUARD_FAULT_STRIDE=1) in
PORTGUARD_FAULT_ROUNDS rounds, 100 kills at random moments, 10,000 owner-cgroup restarts
under stranger load, 1,000 re-applies alternating configs under bind load, 10,000+
generated configuration files. Each count can be overridden through its environment
variable. Prints the figures the tests report (trials, faults, wrong answers) and exits with
pytest's status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

FULL = {
    "PORTGUARD_FAULT_STRIDE": "1",
    "PORTGUARD_FAULT_ROUNDS": "1",
    "PORTGUARD_FAULT_TIMED": "100",
    "PORTGUARD_STRESS_RESTARTS": "10000",
    "PORTGUARD_STRESS_REAPPLIES": "1000",
    "PORTGUARD_FUZZ_EXAMPLES": "10000",
}
TESTS = [
    "tests/kernel/test_faults.py",
    "tests/kernel/test_hardening.py",
    "tests/unit/test_hostile_config.py",
    "tests/unit/test_preflight.py",
]
FIGURES = (
    "fault trials",
    "timed kills",
    "owner restarts",
    "re-applies",
    "passed",
    "failed",
    "error",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="default (CI) counts")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args()
    env = dict(os.environ)
    if not args.quick:
        for key, value in FULL.items():
            env.setdefault(key, value)
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        *TESTS,
        *args.pytest_args,
    ]
    print("counts:", {k: env.get(k, "default") for k in FULL}, flush=True)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    figures = []
    for line in proc.stdout:
        sys.stdout.write(line)
        if any(word in line for word in FIGURES):
            figures.append(line.strip())
    proc.wait()
    print("\n== soak figures ==")
    for line in figures:
        print(line)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
