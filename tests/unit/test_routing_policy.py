from __future__ import annotations

import pytest

from pdmesh.routing import RoundRobin, make_policy


def test_round_robin_takes_turns() -> None:
    policy = RoundRobin()
    assert [policy.select(["a", "b", "c"]) for _ in range(7)] == list("abcabca")


def test_round_robin_keeps_rotating_when_the_candidates_change() -> None:
    policy = RoundRobin()
    assert [policy.select(["a", "b"]) for _ in range(3)] == ["a", "b", "a"]
    # a candidate dropped out (unhealthy, or excluded after a failed attempt): no repeats
    assert [policy.select(["b"]) for _ in range(2)] == ["b", "b"]
    picks = [policy.select(["a", "b", "c"]) for _ in range(6)]
    assert sorted(picks) == sorted("abcabc")


def test_round_robin_refuses_an_empty_list() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        RoundRobin().select([])


def test_make_policy_names_the_choices() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")
