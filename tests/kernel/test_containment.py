"""Containment against the real kernel: a squatter that bound a reserved port before the guard
was loaded keeps the port, but with contain on it can no longer exchange a packet on it."""

from __future__ import annotations

PORT = 7641
FREE = 7642
SQUATTED = 7643
PROTOS = ("tcp", "udp")


def applied(sandbox, contain: bool | None, ports=(f"{PORT}",), owners=("owner",)):
    block = sandbox.owner_block(list(ports), *owners)
    if contain is not None:
        block += f"contain = {'true' if contain else 'false'}\n"
    sandbox.write_config(block)
    sandbox.cli("apply")


def reservation(sandbox, proto: str, port: int = PORT) -> dict:
    return next(
        r for r in sandbox.status()["reservations"] if r["port"] == port and r["protocol"] == proto
    )


def squat(sandbox, cgroup: str = "squatter", netns: str | None = "own") -> None:
    """Echo servers on PORT (TCP and UDP, IPv4 and IPv6 through one dual-stack socket each),
    bound before apply: the bind guard would refuse them afterwards."""
    for proto in PROTOS:
        sandbox.serve(cgroup, "dual", proto, PORT, netns=netns)


def answers(sandbox, port: int = PORT, netns: str | None = "own") -> dict[str, bool]:
    return {
        f"{fam}/{proto}": sandbox.talk("client", fam, proto, port, netns=netns)
        for fam in ("v4", "v6")
        for proto in PROTOS
    }


ALL_ANSWERED = {f"{fam}/{proto}": True for fam in ("v4", "v6") for proto in PROTOS}
NONE_ANSWERED = {key: False for key in ALL_ANSWERED}


def test_contained_squatter_cannot_exchange_tcp_or_udp_traffic(sandbox):
    squat(sandbox)
    assert answers(sandbox) == ALL_ANSWERED  # the squatter works before the guard
    applied(sandbox, contain=True)
    assert answers(sandbox) == NONE_ANSWERED
    for proto in PROTOS:
        res = reservation(sandbox, proto)
        assert res["contain"] is True
        assert res["contained_drops"] > 0
    assert sandbox.status()["containment"] is True


def test_without_contain_the_squatter_keeps_serving(sandbox):
    squat(sandbox)
    applied(sandbox, contain=None)
    assert answers(sandbox) == ALL_ANSWERED
    status = sandbox.status()
    assert status["containment"] is False
    assert "ingress" not in status["links"] and "egress" not in status["links"]
    assert {(r["contain"], r["contained_drops"]) for r in status["reservations"]} == {(False, 0)}


def test_contain_in_the_guard_section_covers_every_reservation(sandbox):
    squat(sandbox)
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"), contain=True)
    sandbox.cli("apply")
    assert answers(sandbox) == NONE_ANSWERED


def test_other_ports_of_a_contained_guard_are_untouched(sandbox):
    for proto in PROTOS:
        sandbox.serve("stranger", "dual", proto, FREE)
    applied(sandbox, contain=True)
    assert answers(sandbox, FREE) == ALL_ANSWERED


def test_contain_can_be_turned_on_and_off_on_a_loaded_guard(sandbox):
    squat(sandbox)
    applied(sandbox, contain=False)
    assert answers(sandbox) == ALL_ANSWERED
    applied(sandbox, contain=True)
    assert answers(sandbox) == NONE_ANSWERED
    applied(sandbox, contain=False)
    assert answers(sandbox) == ALL_ANSWERED
    status = sandbox.status()
    assert status["containment"] is False
    assert "ingress" not in status["links"] and "egress" not in status["links"]


def test_the_owner_serves_through_containment(sandbox):
    applied(sandbox, contain=True)
    for proto in PROTOS:
        sandbox.serve("owner/worker", "dual", proto, PORT)
    assert answers(sandbox) == ALL_ANSWERED
    assert {r["contained_drops"] for r in sandbox.status()["reservations"]} == {0}


def test_once_the_squatter_exits_the_owner_binds_and_serves(sandbox):
    squat(sandbox)
    applied(sandbox, contain=True)
    assert answers(sandbox) == NONE_ANSWERED
    drops = {proto: reservation(sandbox, proto)["contained_drops"] for proto in PROTOS}
    for child in sandbox.children:
        child.kill()
        child.wait()
    for proto in PROTOS:
        sandbox.serve("owner", "dual", proto, PORT)
    assert answers(sandbox) == ALL_ANSWERED
    # not one packet of the owner was dropped
    assert {proto: reservation(sandbox, proto)["contained_drops"] for proto in PROTOS} == drops


def test_owner_restart_during_traffic_keeps_the_owner_serving(sandbox):
    # A squatter on a second port of the same owner stays contained across the restarts.
    for proto in PROTOS:
        sandbox.serve("squatter", "dual", proto, SQUATTED)
    applied(sandbox, contain=True, ports=(f"{PORT}", f"{SQUATTED}"))
    for generation in range(3):
        # the owner's cgroup is made anew each time: a new cgroup id the guard must follow
        servers = [sandbox.serve("owner", "dual", proto, PORT) for proto in PROTOS]
        for _ in range(2):
            assert answers(sandbox) == ALL_ANSWERED, f"generation {generation}"
            assert answers(sandbox, SQUATTED) == NONE_ANSWERED, f"generation {generation}"
        for server in servers:
            server.kill()
            server.wait()
        sandbox.rmdir("owner")
    assert {proto: reservation(sandbox, proto)["contained_drops"] for proto in PROTOS} == {
        "tcp": 0,
        "udp": 0,
    }


def test_other_network_namespaces_are_not_contained(sandbox):
    container = sandbox.new_netns()
    squat(sandbox, netns=container)
    squat(sandbox)
    applied(sandbox, contain=True)
    assert answers(sandbox, netns=container) == ALL_ANSWERED
    assert answers(sandbox) == NONE_ANSWERED
