"""pyroute2 as the oracle of portguard's sock_diag reader.

guard/observe/holders.py (and procnet.py's listening-port look at boot) speak sock_diag by hand,
with struct and socket: pyroute2 was taken out of the runtime for its import time. Here pyroute2's
``DiagSocket`` reads the same kernel tables, and the hand-made reader must give the same answer:
address, port, family, protocol, socket inode and INET_DIAG_CGROUP_ID of every socket that holds
a port (TCP listening or bound, UDP bound), and none of the others.

pyroute2 is a test dependency only (Debian's python3-pyroute2, or pyroute2 from PyPI); without
it these tests skip, and fail under CI. Every socket lives in a network namespace of the test's
own, so the kernel's tables hold exactly the sockets the test made and nothing else on the
machine can change them between two reads. The oracle asks for every TCP state (the reader only
for the holding ones), so which sockets count as holders is checked too.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import subprocess
import sys
from collections import Counter

import pytest

from tests.kernel.sandbox import REPO, in_netns, missing

pytestmark = pytest.mark.kernel

TCP, UDP = "tcp", "udp"
AF_INET, AF_INET6 = 2, 10
LISTEN, CLOSE, ESTABLISHED = 10, 7, 1  # include/net/tcp_states.h

# The child: joins a cgroup, makes the sockets it is asked for, prints what it made, waits.
# A spec is [kind, address, first port (0: the kernel picks), count]. Kinds: "tcp-listen",
# "tcp-bound" (bound, never listening), "udp", "udp-connected" (bound, then connected to
# itself), "tcp-connected" (a listener, a client connected to it and the accepted socket).
# Each socket is printed as [kind, family, address, port, inode], the inode from fstat.
HOLD = r"""
import json, os, resource, socket, sys
procs, specs = sys.argv[1], json.loads(sys.argv[2])
with open(procs, "w") as f:
    f.write(str(os.getpid()))
wanted = sum(count * (3 if kind == "tcp-connected" else 1) for kind, _, _, count in specs) + 64
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < wanted:
    hard = hard if hard == resource.RLIM_INFINITY else max(hard, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
kept, made = [], []

def new(kind, address, port):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock_type = socket.SOCK_DGRAM if kind.startswith("udp") else socket.SOCK_STREAM
    sock = socket.socket(family, sock_type)
    if address == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((address, port))
    return sock

def record(kind, sock):
    kept.append(sock)
    address, port = sock.getsockname()[:2]
    made.append([kind, sock.family, address, port, os.fstat(sock.fileno()).st_ino])

for kind, address, first, count in specs:
    for i in range(count):
        port = first + i if first else 0
        sock = new(kind, address, port)
        if kind == "tcp-listen":
            sock.listen()
        elif kind == "udp-connected":
            sock.connect(sock.getsockname())
        elif kind == "tcp-connected":
            sock.listen()
            client = socket.socket(sock.family, socket.SOCK_STREAM)
            client.connect(sock.getsockname())
            record("tcp-client", client)
            record("tcp-accepted", sock.accept()[0])
            kind = "tcp-listen"
        record(kind, sock)
print(json.dumps(made), flush=True)
sys.stdin.read()
"""

# The comparison, run in the namespace it reads: pyroute2's answer (every TCP state, with
# TCP_BOUND_INACTIVE (13) so that bound-only TCP sockets are dumped too), then holders.py's
# reader, holders() and procnet's listening ports. pyroute2 0.7 (Debian 12's) does not know
# INET_DIAG_CGROUP_ID (type 21, a u64; include/uapi/linux/inet_diag.h): there it is declared in
# a subclass of pyroute2's message class, as newer pyroute2 declares it, and pyroute2 still
# walks the attribute list. A socket without the attribute has cgroup id 0, as in the reader.
ORACLE = r"""
import importlib.metadata, json, socket
from pyroute2 import DiagSocket
from pyroute2.netlink.diag import inet_diag_msg

names = [item[0] for item in inet_diag_msg.nla_map]
if "INET_DIAG_CGROUP_ID" in names:
    message = None
else:
    assert names[-1] == "INET_DIAG_MD5SIG" and len(names) == 19, names

    class message(inet_diag_msg):
        nla_map = (
            *inet_diag_msg.nla_map,
            ("INET_DIAG_ULP_INFO", "hex"),
            ("INET_DIAG_SK_BPF_STORAGES", "hex"),
            ("INET_DIAG_CGROUP_ID", "uint64"),
        )

every_state = (1 << 12) - 1 | 1 << 13
oracle = []
with DiagSocket() as diag:
    diag.bind()
    if message is not None:
        diag.marshal.msg_map = {
            **diag.marshal.msg_map, socket.AF_INET: message, socket.AF_INET6: message
        }
    for protocol, ipproto in (("tcp", socket.IPPROTO_TCP), ("udp", socket.IPPROTO_UDP)):
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in diag.get_sock_stats(family=family, protocol=ipproto, states=every_state):
                oracle.append([
                    protocol, m["idiag_family"], m["idiag_src"], m["idiag_sport"],
                    m["idiag_inode"], m.get_attr("INET_DIAG_CGROUP_ID") or 0, m["idiag_state"],
                ])

from guard.observe import holders, procnet

print(json.dumps({
    "pyroute2": importlib.metadata.version("pyroute2"),
    "oracle": oracle,
    "reader": [
        [s.protocol, s.family, s.address, s.port, s.inode, s.cgroup_id]
        for s in holders._dump_sockets(["tcp", "udp"])
    ],
    "holders": [h._asdict() for h in holders.holders()],
    "listening": sorted(procnet.listening_tcp_ports()),
}))
"""


@pytest.fixture(autouse=True)
def _pyroute2() -> None:
    if importlib.util.find_spec("pyroute2") is None:
        missing(
            "pyroute2 is not installed (the sock_diag oracle): apt-get install python3-pyroute2"
        )


class Held:
    """A child holding sockets, as it made them: (kind, family, address, port, inode)."""

    def __init__(self, process: subprocess.Popen, sockets: list[list]):
        self.process = process
        self.sockets = [tuple(s) for s in sockets]

    @property
    def pid(self) -> int:
        return self.process.pid

    def of(self, *kinds: str) -> list[tuple]:
        return [s for s in self.sockets if s[0] in kinds]


def hold(sandbox, cgroup: str, specs: list, netns: str | None = "own") -> Held:
    """A child in the sandbox's cgroup `cgroup` (and network namespace `netns`) holding the
    sockets of `specs` (see HOLD) until the sandbox is destroyed."""
    netns = sandbox.netns if netns == "own" else netns
    cmd = [sys.executable, "-c", HOLD, sandbox.procs(cgroup), json.dumps(specs)]
    child = subprocess.Popen(
        [*in_netns(netns), *cmd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sandbox.children.append(child)
    line = child.stdout.readline()
    if not line:
        child.kill()
        raise AssertionError(f"the socket holder failed: {child.stderr.read()}")
    return Held(child, json.loads(line))


def read(netns: str) -> dict:
    """Both readers' answers in the network namespace, from one process (see ORACLE)."""
    proc = subprocess.run(
        [*in_netns(netns), sys.executable, "-c", ORACLE],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def holding(answer: dict) -> list[tuple]:
    """The oracle's sockets that hold their port, as the reader reports them: TCP listening or
    bound without listening (the kernel reports those as CLOSE), UDP in any state."""
    return [tuple(s[:6]) for s in answer["oracle"] if s[0] == UDP or s[6] in (LISTEN, CLOSE)]


def assert_same(what: str, got: list, want: list, version: str) -> None:
    """Equal as multisets; on a difference, name the first few either way (10,000 sockets
    make a useless diff)."""
    extra = sorted((Counter(got) - Counter(want)).elements())
    missed = sorted((Counter(want) - Counter(got)).elements())
    assert not extra and not missed, (
        f"{what} differs from pyroute2 {version}'s: {len(extra)} more, e.g. {extra[:5]}; "
        f"{len(missed)} fewer, e.g. {missed[:5]}"
    )


def compare(answer: dict) -> list[tuple]:
    """The reader, holders() and the listening ports each agree with the oracle; returns the
    oracle's holding sockets (protocol, family, address, port, inode, cgroup id)."""
    version = answer["pyroute2"]
    oracle = holding(answer)
    reader = [tuple(s) for s in answer["reader"]]
    assert_same("holders.py's sock_diag reader", reader, oracle, version)
    fields = ("protocol", "family", "address", "port", "inode", "cgroup_id")
    high = [tuple(h[field] for field in fields) for h in answer["holders"]]
    assert_same("holders()", high, oracle, version)
    listening = {s[3] for s in answer["oracle"] if s[0] == TCP and s[6] == LISTEN}
    assert set(answer["listening"]) == listening, f"procnet vs pyroute2 {version}"
    return oracle


def made(held: Held, cgroup_id: int, *kinds: str) -> list[tuple]:
    """What the child made, in the readers' terms, with the cgroup it made them in."""
    protocol = {"tcp-listen": TCP, "tcp-bound": TCP, "udp": UDP, "udp-connected": UDP}
    return [(protocol[k], f, a, p, i, cgroup_id) for k, f, a, p, i in held.of(*kinds)]


HOLDS = ("tcp-listen", "tcp-bound", "udp", "udp-connected")
# IPv4, IPv4 wildcard, IPv6, IPv6 wildcard (dual-stack: V6ONLY off), v4-mapped IPv6
ADDRESSES = ("127.0.0.1", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1")


def _bound_inactive_dumped() -> bool:
    release = re.match(r"(\d+)\.(\d+)", platform.release())
    return not release or (int(release[1]), int(release[2])) >= (6, 3)


@pytest.mark.parametrize(
    "kind",
    ["tcp-listen", "tcp-bound", "udp", "udp-connected", "tcp-connected"],
    ids=["tcp-listening", "tcp-bound-not-listening", "udp", "udp-connected", "tcp-connected"],
)
def test_the_reader_sees_what_pyroute2_sees_on_every_family(sandbox, kind):
    if kind == "tcp-bound" and not _bound_inactive_dumped():
        pytest.skip("sock_diag dumps bound-only TCP sockets since Linux 6.3")
    held = hold(sandbox, "holder.service", [[kind, address, 0, 2] for address in ADDRESSES])
    cgroup_id = sandbox.cgroup_id("holder.service")

    answer = read(sandbox.netns)
    oracle = compare(answer)

    # pyroute2 sees exactly the sockets the child holds: the comparison is not of two blanks
    assert sorted(oracle) == sorted(made(held, cgroup_id, *HOLDS))
    if kind != "udp-connected":  # connect() gives a wildcard-bound UDP socket an address
        assert {(s[1], s[2]) for s in oracle} == {
            (AF_INET6 if ":" in a else AF_INET, a) for a in ADDRESSES
        }
    # connected TCP sockets sit on a port but do not hold it: both leave them out
    others = {s[4] for s in held.of("tcp-client", "tcp-accepted")}
    assert others == {s[4] for s in answer["oracle"] if s[6] == ESTABLISHED and s[0] == TCP}
    assert others.isdisjoint(s[4] for s in oracle)
    # holders() maps them to the child, and pyroute2's cgroup id to the child's cgroup
    for h in answer["holders"]:
        assert (h["pid"], h["cgroup"], h["unit"]) == (
            held.pid,
            f"{sandbox.top}/holder.service",
            "holder.service",
        )


def test_each_network_namespace_is_read_on_its_own(sandbox):
    other = sandbox.new_netns()
    specs = [["tcp-listen", "127.0.0.1", 7641, 1], ["udp", "::1", 7641, 1]]
    here = hold(sandbox, "here.service", specs)
    there = hold(
        sandbox, "there.service", [*specs, ["udp-connected", "::ffff:127.0.0.1", 7642, 1]], other
    )

    for netns, held, cgroup in ((sandbox.netns, here, "here"), (other, there, "there")):
        oracle = compare(read(netns))
        cgroup_id = sandbox.cgroup_id(f"{cgroup}.service")
        assert sorted(oracle) == sorted(made(held, cgroup_id, *HOLDS)), netns
    assert {s[4] for s in here.sockets}.isdisjoint(s[4] for s in there.sockets)


def test_a_holder_whose_cgroup_was_removed(sandbox):
    held = hold(sandbox, "gone.service", [["tcp-listen", "::1", 0, 1], ["udp", "0.0.0.0", 0, 1]])
    gone = sandbox.cgroup_id("gone.service")
    with open(sandbox.procs("kept"), "w") as procs:
        procs.write(str(held.pid))
    sandbox.rmdir("gone.service")

    answer = read(sandbox.netns)
    oracle = compare(answer)

    assert sorted(oracle) == sorted(made(held, gone, *HOLDS))
    assert [(h["pid"], h["cgroup"], h["unit"]) for h in answer["holders"]] == [
        (held.pid, None, None)
    ] * 2


def test_ten_thousand_sockets_at_once(sandbox):
    specs = [
        ["tcp-listen", "127.0.0.1", 10000, 2500],
        ["tcp-bound", "::1", 10000, 2500],
        ["udp", "::ffff:127.0.0.1", 10000, 2500],
        ["udp", "::1", 10000, 2500],
    ]
    if not _bound_inactive_dumped():
        specs[1][0] = "tcp-listen"
    held = hold(sandbox, "many.service", specs)
    cgroup_id = sandbox.cgroup_id("many.service")

    answer = read(sandbox.netns)
    oracle = compare(answer)

    assert len(oracle) == 10_000
    assert sorted(oracle) == sorted(made(held, cgroup_id, *HOLDS))
    assert {h["pid"] for h in answer["holders"]} == {held.pid}
