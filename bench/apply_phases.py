"""Where the CPU time of one `portguard apply` goes, per phase (run as its own process).

python -m bench.apply_phases --config PATH apply: runs `portguard apply` (guard/entry.py's path,
without click) in this process
with the functions of each phase wrapped in CPU-time (user+sys of this process) counters, and
prints one line `PHASES {json}` on stderr: {"phase": ms, ...}, plus "subprocesses" (children
started). The interpreter's own start is not in it (measure `python -c pass` beside it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

T0 = time.process_time()


def main() -> int:
    spent: dict[str, float] = {}
    started = [0]

    def wrap(owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            begin = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[phase] = spent.get(phase, 0.0) + (time.process_time() - begin) * 1000

        setattr(owner, name, timed)

    real_popen_init = subprocess.Popen.__init__

    def counting_init(self, *args, **kwargs):
        started[0] += 1
        real_popen_init(self, *args, **kwargs)

    subprocess.Popen.__init__ = counting_init  # type: ignore[method-assign]

    begin = time.process_time()
    import guard.commands as commands
    import guard.entry as entry

    spent["import guard.entry, guard.commands (config)"] = (time.process_time() - begin) * 1000
    from guard.kernel import apply as apply_mod
    from guard.kernel import host, libbpf, objects

    spent["import guard.kernel.apply (libbpf binding, layout)"] = (
        time.process_time() - begin
    ) * 1000 - spent["import guard.entry, guard.commands (config)"]
    wrap(commands, "load_config", "read configuration")
    from guard.policy import declared

    # inside "read configuration": every unit file scanned for X-PortGuard-Reserve=
    wrap(declared, "read", "of which: unit files (X-PortGuard-Reserve=)")
    wrap(commands, "plan_of", "resolve owners, build plan")
    wrap(host, "preflight", "preflight (mounts, cgroup)")
    wrap(host, "choose_denial", "feature probes (set_retval, netns cookie)")
    wrap(libbpf, "has_packet_netns_cookie", "feature probes (set_retval, netns cookie)")
    wrap(objects, "ensure_object", "find the object")
    wrap(libbpf, "load_object", "libbpf: open, load (verifier), pin maps")
    wrap(apply_mod._Transaction, "run", "transaction (load, attach, fill, flip)")
    wrap(commands, "squatters_of_plan", "squatter scan")
    is_apply, config_path = entry.plain_apply(sys.argv[1:] or ["apply"])
    if not is_apply:
        raise SystemExit(f"not a plain apply: {sys.argv[1:]}")
    code = entry.run_apply(config_path)
    if code:
        raise SystemExit(code)
    total = (time.process_time() - T0) * 1000
    transaction = spent.get("transaction (load, attach, fill, flip)", 0.0)
    spent["transaction (load, attach, fill, flip)"] = transaction - spent.get(
        "libbpf: open, load (verifier), pin maps", 0.0
    )
    spent["total in this process (after interpreter start)"] = total
    spent["subprocesses"] = started[0]
    print("PHASES " + json.dumps(spent), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
