"""contain = true: parsed per reservation and globally, and carried into the plan per port."""

from __future__ import annotations

import pytest

from guard.kernel.layout import LIMITS
from guard.policy import config, owners, plan

TCP, UDP = 6, 17


def planned(text: str) -> plan.Plan:
    cfg = config.loads(text)
    return plan.build(cfg.settings, owners.resolve(cfg), (), LIMITS)


def test_contain_is_off_by_default():
    assert planned('[[reserve]]\nports = ["631"]\ncgroup = "/cups"\n').contained == frozenset()


def test_contain_in_a_block_covers_its_ports_only():
    result = planned(
        '[[reserve]]\nports = ["631"]\ncgroup = "/cups"\ncontain = true\n'
        '[[reserve]]\nports = ["636/tcp"]\ncgroup = "/slapd"\n'
    )
    assert result.contained == {(TCP, 631), (UDP, 631)}


def test_contain_in_the_guard_section_covers_every_port():
    result = planned(
        '[guard]\ncontain = true\n[[reserve]]\nports = ["631/tcp"]\ncgroup = "/cups"\n'
        '[[reserve]]\nports = ["636/tcp"]\ncgroup = "/slapd"\n'
    )
    assert result.contained == {(TCP, 631), (TCP, 636)}


def test_a_port_is_contained_when_any_block_reserving_it_says_so():
    result = planned(
        '[[reserve]]\nports = ["631/tcp"]\ncgroup = "/cups"\n'
        '[[reserve]]\nports = ["631/tcp"]\ncgroup = "/cups-browsed"\ncontain = true\n'
    )
    assert result.contained == {(TCP, 631)}


@pytest.mark.parametrize(
    "text, line",
    [
        ('[guard]\ncontain = "yes"\n', 2),
        ('[[reserve]]\nports = ["631"]\ncgroup = "/cups"\ncontain = 1\n', 4),
    ],
)
def test_contain_must_be_a_boolean(text, line):
    with pytest.raises(config.ConfigError) as exc:
        config.loads(text)
    assert exc.value.problems == [f"<config>:{line}: contain must be true or false"]
