"""Maps sized to the policy: small for a small policy, new maps (swapped in like a new layout)
when a policy outgrows them, counts kept, never a moment without the guard."""

from __future__ import annotations

import errno

from guard.kernel import layout
from guard.kernel import libbpf as kernel

PORT = 7641


def max_entries(sandbox) -> dict[str, int]:
    maps_dir = sandbox.pin_dir / f"maps-{layout.LAYOUT}"
    sizes = {}
    for name in layout.SIZED_MAPS:
        fd = kernel.get_pinned(maps_dir / name)
        try:
            sizes[name] = kernel.map_info(fd).max_entries
        finally:
            kernel.close(fd)
    return sizes


def denied(sandbox, port: int = PORT) -> int:
    found = [
        r for r in sandbox.status()["reservations"] if (r["port"], r["protocol"]) == (port, "tcp")
    ]
    return found[0]["denied"]


def test_a_small_policy_gets_small_maps(sandbox):
    sandbox.write_config(sandbox.owner_block([str(PORT)], "owner"))
    sandbox.cli("apply")
    assert set(max_entries(sandbox).values()) == {layout.MIN_ENTRIES}


def test_a_policy_that_outgrows_its_maps_gets_new_ones_and_keeps_its_counts(sandbox):
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp"], "owner"))
    sandbox.cli("apply")
    assert sandbox.bind("stranger", [("v4", "tcp", PORT)]) == {f"v4/tcp/{PORT}": errno.EADDRINUSE}
    assert denied(sandbox) == 1
    sandbox.write_config(sandbox.owner_block([f"{PORT}-{PORT + 999}"], "owner"))
    sandbox.cli("apply")
    grown = max_entries(sandbox)
    assert grown["denied"] >= 2 * 2000 and grown["sets"] == layout.MIN_ENTRIES
    assert denied(sandbox) == 1
    cases = [("v4", "tcp", PORT), ("v6", "udp", PORT + 999)]
    assert set(sandbox.bind("stranger", cases).values()) == {errno.EADDRINUSE}
    assert set(sandbox.bind("owner", cases).values()) == {0}
    assert len(list(sandbox.pin_dir.glob("maps-*"))) == 1  # the small maps are gone
    # Shrinking keeps the maps: a re-apply that fits loads nothing.
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp"], "owner"))
    sandbox.cli("apply")
    assert max_entries(sandbox) == grown
    assert denied(sandbox) == 2  # the first refusal and the one after growing


def test_more_owner_sets_than_the_sets_array_holds_get_new_maps_and_each_owner_its_port(sandbox):
    """sets is an array indexed by set id: a policy with more sets than it was made for gets
    a larger one, and every set is read where the programs look for it."""
    sandbox.write_config(sandbox.owner_block([f"{PORT}/tcp"], "owner"))
    sandbox.cli("apply")
    small = max_entries(sandbox)["sets"]
    count = small  # with both slots, twice as many entries as the array has
    sandbox.write_config(
        "".join(sandbox.owner_block([f"{PORT + i}/tcp"], f"o{i}") for i in range(count))
    )
    sandbox.cli("apply")
    assert max_entries(sandbox)["sets"] >= 2 * count
    for i in (0, count // 2, count - 1):
        case = [("v4", "tcp", PORT + i)]
        assert sandbox.bind(f"o{i}", case) == {f"v4/tcp/{PORT + i}": 0}
        other = f"o{(i + 1) % count}"
        assert sandbox.bind(other, case) == {f"v4/tcp/{PORT + i}": errno.EADDRINUSE}
