"""apply and remove killed (SIGKILL) after every state-changing step: afterwards the old guard
holds or the new one, never neither and never a mix, and the next run settles everything.

The kill points come from the fault hook in guard/kernel/libbpf.py (PORTGUARD_FAULT_AFTER=N: the
process kills itself right after its N-th map write, load, pin, unpin, attach, link update or
sysctl write). Each scenario walks N = offset, offset+stride, ... until a run completes, so
every step is a kill point when the stride is 1. Counts: PORTGUARD_FAULT_STRIDE (default 4
here, from a random first step, PORTGUARD_FAULT_OFFSET, printed; the soak, tests/soak.py,
uses 1) and PORTGUARD_FAULT_ROUNDS (default 1).

Kills between steps cannot land inside libbpf's object load (maps created and pinned one by
one); test_apply_killed_at_random_moments adds SIGKILLs at random delays for that
(PORTGUARD_FAULT_TIMED trials, default 10).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from guard.kernel import layout
from guard.kernel import libbpf as kernel
from guard.kernel.pins import Maps, Pins
from guard.kernel.programs import BIND_PROGRAMS, JUDGES
from guard.observe.state import GuardState, read_state
from guard.policy.config import Settings
from tests.kernel.objects_before import tp_btf_object
from tests.kernel.sandbox import BIND_LINKS, PORTGUARD, REPO, in_netns

STRIDE = int(os.environ.get("PORTGUARD_FAULT_STRIDE", "4"))
# first kill point: random by default, so successive CI runs cover different steps
OFFSET = int(os.environ.get("PORTGUARD_FAULT_OFFSET") or random.randint(1, STRIDE))
# Each walked command has at least this many state changes (a batched map write counts as one):
# a walk that ends sooner means the fault hook no longer sees the command's steps.
MIN_STEPS = 10
ROUNDS = int(os.environ.get("PORTGUARD_FAULT_ROUNDS", "1"))
TIMED = int(os.environ.get("PORTGUARD_FAULT_TIMED", "10"))
PA, PB, PC = 7641, 7642, 7643
CGROUPS = ("a", "b", "stranger")
CASES = [
    ("v4", "tcp", PA),
    ("v6", "udp", PA),
    ("mapped", "tcp", PA),
    ("v4", "tcp", PB),
    ("dual", "tcp", PB),
    ("v6", "tcp", PC),
    ("v4", "udp", PC),
]
BIND6 = {"v6", "dual", "mapped"}  # families that go through the bind6 program
BPF_PROG_TYPE_RAW_TRACEPOINT, BPF_PROG_TYPE_TRACING = 17, 26


@dataclass(frozen=True)
class Guard:
    """A configuration as the tests see it: (port, proto) -> owners, and the errno."""

    name: str
    reserved: dict = field(default_factory=dict)
    deny: int = 0
    extra: dict = field(default_factory=dict)  # [guard] settings

    def expected(self, cgroup: str, case: tuple[str, str, int]) -> int:
        _, proto, port = case
        owners = self.reserved.get((port, proto))
        return 0 if owners is None or cgroup in owners else self.deny

    def matrix(self, family_filter=None) -> dict:
        return {
            cg: {
                f"{f}/{t}/{p}": self.expected(cg, (f, t, p))
                for f, t, p in CASES
                if family_filter is None or family_filter(f)
            }
            for cg in CGROUPS
        }

    def ports(self) -> set[int]:
        return {port for port, _ in self.reserved}


NONE = Guard("none")
A = Guard("A", {(PA, "tcp"): {"a"}, (PA, "udp"): {"a"}, (PB, "tcp"): {"b"}}, errno.EADDRINUSE)
B = Guard(
    "B",
    {(PA, "tcp"): {"b"}, (PA, "udp"): {"b"}, (PC, "tcp"): {"a"}, (PC, "udp"): {"a"}},
    errno.EACCES,
    {"deny_errno": "EACCES"},
)


# A change of road (refuse_at): the two roads this kernel offers; deny_errno EPERM makes every
# road answer alike, so both guards show one matrix and only the links differ.
if kernel.hook_refusal() is None:
    ROADS = ("cgroup" if kernel.has_set_retval() else "cgroup-eperm", "security_socket_bind")
else:
    ROADS = ("cgroup", "cgroup-eperm")
R1, R2 = (
    Guard(f"R{i}", dict(A.reserved), errno.EPERM, {"deny_errno": "EPERM", "refuse_at": road})
    for i, road in enumerate(ROADS, start=1)
)
# the other road with B's owners: port PA changes hands (a -> b) in the same apply
R2B = Guard("R2B", dict(B.reserved), errno.EPERM, {"deny_errno": "EPERM", "refuse_at": ROADS[1]})


OLDER_MAPS = "maps-0123456789ab"


def bind_links(guard: Guard) -> tuple[str, ...]:
    road = guard.extra.get("refuse_at")
    if road is None:
        return BIND_LINKS
    return ("socket_bind",) if road == "security_socket_bind" else ("bind4", "bind6")


class Rig:
    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.paths = {}
        for guard in (A, B, R1, R2, R2B):
            blocks = []
            for (port, proto), owners in sorted(guard.reserved.items()):
                blocks.append(sandbox.owner_block([f"{port}/{proto}"], *sorted(owners)))
            path = sandbox.work / f"{guard.name}.toml"
            sandbox.write_config("\n".join(blocks), **guard.extra)
            path.write_text(sandbox.config_path.read_text())
            self.paths[guard.name] = path
        self.matrix_args = [[sandbox.procs(cg), cg, CASES] for cg in CGROUPS]
        self.settings = Settings(cgroup=sandbox.top, pin_dir=str(sandbox.pin_dir))
        self.trials = 0
        self.splits = 0

    def run(self, command: str, guard: Guard, fault: int | None = None) -> int:
        env = {"PORTGUARD_FAULT_AFTER": str(fault)} if fault else None
        proc = self.sandbox.cli(
            command, check=False, config=self.paths.get(guard.name, self.paths["A"]), env=env
        )
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
        assert "Traceback" not in proc.stderr
        return proc.returncode

    def observe(self) -> tuple[dict, dict, GuardState]:
        out = self.sandbox.run("stranger", "matrix", self.matrix_args)
        sysctl = out.pop("sysctl")
        return out, sysctl, read_state(self.settings)

    @staticmethod
    def reservations(state) -> dict:
        return {
            (r.port, r.protocol): {o.cgroup.rsplit("/", 1)[1] for o in r.owners}
            for r in state.reservations
        }

    def assert_one_of(self, allowed: tuple[Guard, ...], per_family: bool = False) -> None:
        """The binds show exactly one of the allowed guards (per address family when
        per_family: a layout takeover swaps the bind4 and bind6 links one after the other),
        the sysctl keeps autobind off that guard's ports, and status agrees."""
        matrix, sysctl, state = self.observe()
        shown = [g for g in allowed if g.matrix() == matrix]
        if not shown and per_family:
            v4 = [
                g
                for g in allowed
                if g.matrix(lambda f: f not in BIND6)
                == {
                    cg: {k: v for k, v in row.items() if k.split("/")[0] not in BIND6}
                    for cg, row in matrix.items()
                }
            ]
            v6 = [
                g
                for g in allowed
                if g.matrix(lambda f: f in BIND6)
                == {
                    cg: {k: v for k, v in row.items() if k.split("/")[0] in BIND6}
                    for cg, row in matrix.items()
                }
            ]
            assert v4 and v6, f"neither or a mix within a family: {matrix}"
            self.splits += 1
            shown = v4 + v6
        assert shown, f"binds match none of {[g.name for g in allowed]}: {matrix}"
        reserved_now = set().union(*(g.ports() for g in shown))
        from guard.kernel import sysctl as sysctl_mod

        assert reserved_now <= sysctl_mod.parse(sysctl), (sysctl, [g.name for g in shown])
        if not state.interrupted:
            assert self.reservations(state) in [g.reserved for g in shown], state

    def assert_exactly(self, guard: Guard) -> None:
        matrix, sysctl, state = self.observe()
        assert matrix == guard.matrix()
        from guard.kernel import sysctl as sysctl_mod

        assert sysctl_mod.parse(sysctl) == guard.ports()
        pins = self.sandbox.pin_dir
        if guard is NONE:
            assert not pins.exists()
            return
        assert not state.interrupted
        assert self.reservations(state) == guard.reserved
        links = bind_links(guard)
        assert {link.name for link in state.links} == {*links, "mkdir", "rmdir"}
        assert sorted(p.name for p in pins.iterdir()) == sorted(
            [
                f"maps-{layout.LAYOUT}",
                *(f"link_{n}" for n in links),
                "link_mkdir",
                "link_rmdir",
                "hook_judge",
            ]
        )

    def walk(
        self, command: str, before: Guard, after: Guard, prepare=None, per_family: bool = False
    ) -> int:
        """Kill `command` (towards `after`) at every stride-th step, starting each trial from
        `before`; check, recover, check. Returns the fault count that let the run complete
        (about the number of steps it has)."""
        fault, killed = OFFSET, 0
        while True:
            if prepare:
                prepare()
            if self.run(command, after, fault) == 0:
                self.assert_exactly(after)
                assert killed, "the fault hook never fired"
                return fault
            killed += 1
            self.trials += 1
            self.assert_one_of((before, after), per_family)
            self.run(command, after)  # the next run settles it
            self.assert_exactly(after)
            self.reset(before)
            fault += STRIDE

    def older_layout(self) -> None:
        """Maps of an older layout, simulated by renaming ours: the next apply loads fresh
        maps, fills them and takes every link over to them."""
        pins = Pins(self.sandbox.pin_dir)
        if os.path.exists(pins.maps_dir):
            os.rename(pins.maps_dir, os.path.join(pins.root, OLDER_MAPS))

    def reset(self, guard: Guard) -> None:
        if guard is NONE:
            self.run("remove", A)
        else:
            self.run("apply", guard)
        self.assert_exactly(guard)


@pytest.fixture
def rig(sandbox):
    r = Rig(sandbox)
    yield r
    print(
        f"\nfault trials: {r.trials}, per-family splits: {r.splits} "
        f"(stride {STRIDE}, first step {OFFSET})"
    )


def test_first_apply_killed_anywhere_leaves_no_guard_or_the_whole_guard(rig):
    for _ in range(ROUNDS):
        rig.reset(NONE)
        assert rig.walk("apply", NONE, A) > MIN_STEPS


def test_reapply_killed_anywhere_leaves_the_old_guard_or_the_new(rig):
    for _ in range(ROUNDS):
        rig.reset(A)
        assert rig.walk("apply", A, B) > MIN_STEPS
        assert rig.walk("apply", B, A) > MIN_STEPS


def test_program_swap_killed_anywhere_leaves_the_old_guard_or_the_new(rig):
    # A stale object digest makes apply reload the programs onto the same maps: trackers are
    # staged beside the old ones, then each bind link swaps its program.
    def stale_program():
        maps = Maps.open_pinned(Pins(rig.sandbox.pin_dir).maps_dir)
        try:
            maps.meta.update(0, layout.Meta(b"guard-retval-0000000000000000"))
        finally:
            maps.close()

    for _ in range(ROUNDS):
        rig.reset(A)
        assert rig.walk("apply", A, B, prepare=stale_program) > MIN_STEPS


def test_an_upgrade_from_tp_btf_trackers_killed_anywhere_leaves_the_old_guard_or_the_new(
    rig, tmp_path
):
    # A guard of a version whose trackers were tp_btf programs: apply stages the raw_tp ones
    # beside them (link_<name>_new) and renames them over, so a cgroup is always followed.
    old_object = tp_btf_object(tmp_path)
    pins = Pins(rig.sandbox.pin_dir)
    trackers = {"mkdir": "portguard_cgroup_mkdir", "rmdir": "portguard_cgroup_rmdir"}
    others = [n for road in (*BIND_PROGRAMS.values(), *JUDGES.values()) for n in road.values()]
    others += ["portguard_ingress", "portguard_egress"]

    def older_trackers():
        maps = Maps.open_pinned(pins.maps_dir)
        try:
            sizes = {name: kernel.map_info(fd).max_entries for name, fd in maps.fds.items()}
            maps.meta.update(0, layout.Meta(b"guard-retval-0000000000000000"))
        finally:
            maps.close()
        shared = {"hook_judge": pins.judge}
        loaded = kernel.load_object(old_object, pins.maps_dir, tuple(others), sizes, shared)
        try:
            for name, program in trackers.items():
                link = kernel.attach_tracing(loaded.programs[program])
                try:
                    kernel.pin(link, os.path.join(pins.root, f"link_{name}_tp_btf"))
                finally:
                    os.close(link)
                os.replace(os.path.join(pins.root, f"link_{name}_tp_btf"), pins.link(name))
        finally:
            loaded.close()
        assert tracker_types() == {BPF_PROG_TYPE_TRACING}

    def tracker_types() -> set[int]:
        types = set()
        for name in trackers:
            link = kernel.get_pinned(pins.link(name))
            try:
                prog = kernel.reopen_program(kernel.link_info(link).prog_id)
                types.add(kernel.prog_info(prog).type)
                os.close(prog)
            finally:
                os.close(link)
        return types

    for _ in range(ROUNDS):
        rig.reset(A)
        assert rig.walk("apply", A, B, prepare=older_trackers) > MIN_STEPS
        assert tracker_types() == {BPF_PROG_TYPE_RAW_TRACEPOINT}
        # the raw_tp trackers follow a restarted owner
        old_id = rig.sandbox.cgroup_id("a")
        rig.sandbox.rmdir("a")
        rig.sandbox.cgroup("a")
        owners = {
            o.cgroup.rsplit("/", 1)[1]: o.id
            for r in read_state(rig.settings).reservations
            for o in r.owners
        }
        assert owners["a"] == rig.sandbox.cgroup_id("a") != old_id


def test_layout_takeover_killed_anywhere_never_leaves_a_family_unguarded(rig):
    # Maps of an older layout (simulated by renaming ours): apply loads fresh maps, fills them,
    # then swaps each bind link; the old maps go last, their sysctl records carried over.
    for _ in range(ROUNDS):
        rig.reset(A)
        assert rig.walk("apply", A, B, prepare=rig.older_layout, per_family=True) > MIN_STEPS
    assert not os.path.exists(os.path.join(rig.sandbox.pin_dir, OLDER_MAPS))


def test_a_change_of_road_killed_anywhere_leaves_the_old_road_or_the_new(rig):
    # The new road's links are attached before the old road's go: every kill leaves strangers
    # refused and owners binding, and the next apply settles on the new road alone.
    for _ in range(ROUNDS):
        rig.reset(R1)
        assert rig.walk("apply", R1, R2) > MIN_STEPS
        assert rig.walk("apply", R2, R1) > MIN_STEPS


def test_a_change_of_road_onto_new_maps_and_owners_killed_anywhere_leaves_one_guard(rig):
    # Another road, new maps (an older layout) and a port changing hands at once: the old
    # road first judges from the new maps too, so no kill leaves the two roads judging from
    # two guards (both refusing, one the old owner and one the new).
    for _ in range(ROUNDS):
        rig.reset(R1)
        assert rig.walk("apply", R1, R2B, prepare=rig.older_layout, per_family=True) > MIN_STEPS
        rig.reset(R2B)
        assert rig.walk("apply", R2B, R1, prepare=rig.older_layout, per_family=True) > MIN_STEPS


def test_remove_killed_anywhere_leaves_the_guard_or_nothing(rig):
    for _ in range(ROUNDS):
        rig.reset(A)
        assert rig.walk("remove", A, NONE) > MIN_STEPS


def test_apply_killed_at_random_moments_leaves_the_old_guard_or_the_new(rig):
    # Delays spread over one whole apply (measured, not asserted): kills land in imports,
    # inside the object load, between map writes, anywhere.
    sandbox = rig.sandbox
    rig.reset(NONE)
    began = time.monotonic()
    rig.run("apply", A)
    span = time.monotonic() - began
    rng = random.Random(os.environ.get("PORTGUARD_FAULT_SEED", "7"))
    landed = 0
    for trial in range(TIMED):
        before, after = [(NONE, A), (A, B), (B, A)][trial % 3]
        rig.reset(before)
        cmd = [
            *in_netns(sandbox.netns),
            *PORTGUARD,
            "--config",
            str(rig.paths[after.name]),
            "apply",
        ]
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        time.sleep(rng.uniform(0, span))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert "Traceback" not in err
        if proc.returncode == -signal.SIGKILL:
            landed += 1
            rig.trials += 1
        rig.assert_one_of((before, after), per_family=False)
        rig.run("apply", after)
        rig.assert_exactly(after)
    print(f"\ntimed kills: {TIMED}, landed before apply finished: {landed}")
