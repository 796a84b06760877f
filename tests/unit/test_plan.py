"""Planning: reservations + owners -> map contents. Pure."""

from __future__ import annotations

import pytest

from guard.kernel import layout
from guard.policy import config, plan
from guard.policy.config import ConfigError

TCP, UDP = layout.PROTOCOLS["tcp"], layout.PROTOCOLS["udp"]


def cfg(text: str) -> config.Config:
    return config.loads('[guard]\nportreserve_dir = ""\n' + text)


def build(text: str, extra=()) -> plan.Plan:
    c = cfg(text)
    owners = {i: [(o.name, None) for o in b.owners] for i, b in enumerate(c.blocks)}
    return plan.build(c, owners, extra, layout.LIMITS)


def test_one_owner_set_serves_a_whole_range():
    p = build('[[reserve]]\nports = ["8000-8999"]\ncgroup = "/a"\n')
    assert len(p.ports) == 2000
    assert set(p.ports.values()) == {0}
    assert p.sets == {0: (0,)} and p.paths == ("/a",)


def test_a_port_reserved_twice_belongs_to_both_owners():
    p = build(
        '[[reserve]]\nports = ["631"]\ncgroup = "/cups"\n'
        '[[reserve]]\nports = ["631/udp"]\ncgroup = "/browsed"\n'
    )
    assert p.owners_of(TCP, 631) == ("/cups",)
    assert set(p.owners_of(UDP, 631)) == {"/cups", "/browsed"}


def test_extra_owners_join_every_port():
    p = build('[[reserve]]\nports = ["1"]\ncgroup = "/a"\n', extra=("/init.scope",))
    assert set(p.owners_of(TCP, 1)) == {"/a", "/init.scope"}


def test_plan_is_deterministic():
    text = (
        '[[reserve]]\nports = ["1", "2"]\ncgroups = ["/b", "/a"]\n'
        '[[reserve]]\nports = ["3"]\ncgroup = "/c"\n'
    )
    assert build(text) == build(text)


def test_more_than_64_owners_on_a_port_is_a_config_error():
    owners = ", ".join(f'"/o{i}"' for i in range(65))
    with pytest.raises(ConfigError) as exc:
        build(f'[[reserve]]\nports = ["1"]\ncgroups = [{owners}]\n')
    assert "at most 64 per port" in str(exc.value)
    assert str(exc.value).startswith("<config>:")


def test_unreserved_port_has_no_owners():
    p = build('[[reserve]]\nports = ["1"]\ncgroup = "/a"\n')
    assert p.owners_of(TCP, 2) == ()


def test_blocks_without_resolved_owners_reserve_nothing():
    c = cfg('[[reserve]]\nports = ["1"]\nunit = "nothere.service"\nif_installed = true\n')
    assert plan.build(c, {0: []}, (), layout.LIMITS).ports == {}


def test_owners_of_one_port_at_more_depths_than_the_kernel_visits_are_refused():
    depths = [f'"/{"/".join(["d"] * n)}"' for n in range(1, layout.SET_LEVELS + 2)]
    with pytest.raises(ConfigError, match="different depths"):
        build(f'[[reserve]]\nports = ["631"]\ncgroups = [{", ".join(depths)}]\n')
    build(f'[[reserve]]\nports = ["631"]\ncgroups = [{", ".join(depths[:-1])}]\n')


def test_a_set_lists_its_owners_depths_once_ascending_and_its_members_as_bits():
    from guard.kernel import slots

    value = slots.set_value((0, 2, 65), ("/a/b", "/x", "/a", *[f"/p{i}" for i in range(63)]))
    assert list(value.level[: value.nlevels]) == [1, 2]
    assert (value.members[0], value.members[1]) == (0b101, 0b10)
