"""Planning: reservations + owners -> map contents. Pure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from guard.kernel import layout
from guard.policy import config, owners, plan
from guard.policy.config import ConfigError

TCP, UDP = layout.PROTOCOLS["tcp"], layout.PROTOCOLS["udp"]


def cfg(text: str) -> config.Config:
    return config.loads('[guard]\nportreserve_dir = ""\n' + text)


def build(text: str, extra=()) -> plan.Plan:
    c = cfg(text)
    trusted = tuple(owners.Owner(path, None, config.Origin("<trusted>", 1)) for path in extra)
    return plan.build(c.settings, owners.resolve(c), trusted, layout.LIMITS)


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


# Builds a plan in a fresh interpreter and prints it with every order it has (dict equality
# would ignore the order of ports and sets; the maps are filled in that order).
PLAN_IN_A_FRESH_INTERPRETER = """
import json, sys
from guard.kernel.layout import LIMITS
from guard.policy import config, owners, plan
cfg = config.loads(sys.stdin.read())
p = plan.build(cfg.settings, owners.resolve(cfg), (), LIMITS)
print(json.dumps([list(p.ports.items()), list(p.sets.items()), p.paths,
                  list(p.owner_names.items()), sorted(p.contained)]))
"""


def test_plan_is_the_same_whatever_the_hash_seed():
    owners_text = ", ".join(f'"/o{i}"' for i in range(12))
    text = (
        '[guard]\nportreserve_dir = ""\n'
        f'[[reserve]]\nports = ["1", "20-25"]\ncgroups = [{owners_text}]\ncontain = true\n'
        '[[reserve]]\nports = ["3", "22/udp"]\ncgroups = ["/z", "/o3", "/a"]\n'
        '[[reserve]]\nports = ["4"]\ncgroups = ["/m", "/b"]\n'
    )
    plans = {
        subprocess.run(
            [sys.executable, "-c", PLAN_IN_A_FRESH_INTERPRETER],
            input=text,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in (1, 2, 3, 4)
    }
    assert len(plans) == 1


def test_too_many_owner_cgroups_names_the_owner_that_went_over():
    limits = plan.Limits(owners_per_port=64, owner_paths=2, owner_sets=4096)
    c = cfg(
        '[[reserve]]\nports = ["1"]\ncgroup = "/a"\n'
        '[[reserve]]\nports = ["2"]\ncgroup = "/b"\n'
        '[[reserve]]\nports = ["3"]\ncgroup = "/c"\n'
    )
    with pytest.raises(ConfigError) as exc:
        plan.build(c.settings, owners.resolve(c), (), limits)
    assert str(exc.value) == "<config>:11: 3 owner cgroups; at most 2"


def test_too_many_owner_combinations_names_the_port_that_went_over():
    limits = plan.Limits(owners_per_port=64, owner_paths=4096, owner_sets=1)
    c = cfg(
        '[[reserve]]\nports = ["1"]\ncgroup = "/a"\n[[reserve]]\nports = ["2"]\ncgroup = "/b"\n'
    )
    with pytest.raises(ConfigError) as exc:
        plan.build(c.settings, owners.resolve(c), (), limits)
    assert str(exc.value) == "<config>:7: 2 distinct owner combinations; at most 1"


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
    assert plan.build(c.settings, owners.resolve(c), (), layout.LIMITS).ports == {}


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


def test_origins_of_some_ports_are_those_of_the_whole_map_without_walking_ranges():
    cfg = config.loads(
        '[[reserve]]\nports = ["1000-60000"]\ncgroup = "/a"\n\n'
        '[[reserve]]\nports = ["631/udp", "2000"]\ncgroup = "/b"\n',
        "p.toml",
    )
    every = plan.port_origins(cfg.blocks)
    asked = [("udp", 631), ("tcp", 2000), ("tcp", 631), ("udp", 65000)]
    some = plan.port_origins(cfg.blocks, asked)
    assert some == {pair: every[pair] for pair in asked if pair in every}
    assert [str(o) for o in some[("tcp", 2000)]] == ["p.toml:2", "p.toml:6"]
