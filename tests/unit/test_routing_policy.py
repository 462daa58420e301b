from __future__ import annotations

import random
from collections import Counter

import pytest

from pdmesh.routing import (
    POLICIES,
    CacheAware,
    CacheAwareConfig,
    KvCost,
    KvCostConfig,
    PowerOfTwo,
    RandomPolicy,
    RequestView,
    RoundRobin,
    WorkerLoad,
    make_policy,
)
from pdmesh.routing.cache_aware import is_imbalanced
from pdmesh.routing.kv_cost import softmax_pick
from pdmesh.routing.tree_policy import NEAR_LOAD


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


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_refuses_an_empty_list(name: str) -> None:
    with pytest.raises(ValueError, match="no candidates"):
        make_policy(name, rng=random.Random(0)).select([])


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_picks_a_candidate_and_is_reproducible(name: str) -> None:
    def run(seed: int) -> list[str]:
        policy = make_policy(name, rng=random.Random(seed), clock=lambda: 0.0)
        rng = random.Random(99)
        out = []
        for i in range(50):
            req = RequestView([rng.randrange(4)] * 8 + [i], f"r{i}")
            loads = {w: WorkerLoad(in_flight=rng.randrange(3)) for w in "abc"}
            out.append(policy.select(["a", "b", "c"], req, loads))
        return out

    picks = run(1)
    assert set(picks) <= {"a", "b", "c"}
    assert picks == run(1)


def test_make_policy_names_the_choices() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("random"), RandomPolicy)
    assert isinstance(make_policy("power_of_two"), PowerOfTwo)
    assert isinstance(make_policy("cache_aware"), CacheAware)
    assert isinstance(make_policy("kv_cost"), KvCost)
    with pytest.raises(ValueError, match="round_robin, power_of_two, cache_aware, kv_cost"):
        make_policy("least_load")


def test_random_spreads_uniformly_with_a_fixed_seed() -> None:
    policy = RandomPolicy(random.Random(7))
    counts = Counter(policy.select(["a", "b", "c"]) for _ in range(3000))
    assert all(900 < n < 1100 for n in counts.values())


def test_power_of_two_takes_the_less_loaded_of_two_distinct() -> None:
    policy = PowerOfTwo(random.Random(3))
    loads = {"a": WorkerLoad(in_flight=5), "b": WorkerLoad(in_flight=1)}
    # with two candidates both are always probed: the lighter one always wins
    assert {policy.select(["a", "b"], loads=loads) for _ in range(20)} == {"b"}
    assert policy.select(["a"], loads=loads) == "a"


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    policy = PowerOfTwo(random.Random(5))
    loads = {"a": WorkerLoad(0), "b": WorkerLoad(1), "c": WorkerLoad(9)}
    picks = Counter(policy.select(["a", "b", "c"], loads=loads) for _ in range(300))
    assert picks["c"] == 0
    assert picks["a"] > picks["b"] > 0  # a wins 2 of 3 pairs, b only the pair (b, c)


def test_power_of_two_breaks_in_flight_ties_by_page_usage() -> None:
    policy = PowerOfTwo(random.Random(0))
    loads = {"a": WorkerLoad(2, page_usage=0.9), "b": WorkerLoad(2, page_usage=0.1)}
    assert {policy.select(["a", "b"], loads=loads) for _ in range(10)} == {"b"}


def test_imbalance_needs_both_thresholds() -> None:
    assert is_imbalanced([0, 65], 64, 1.5)
    assert not is_imbalanced([0, 64], 64, 1.5)  # abs not exceeded
    assert not is_imbalanced([200, 280], 64, 1.5)  # abs 80 > 64, but 280 <= 200 * 1.5
    assert is_imbalanced([100, 170], 64, 1.5)  # 70 > 64 and 170 > 150


def test_cache_aware_defaults_follow_sglang() -> None:
    cfg = CacheAwareConfig()
    assert (cfg.cache_threshold, cfg.balance_abs_threshold, cfg.balance_rel_threshold) == (
        0.3,
        64,
        1.5,
    )
    assert (cfg.eviction_interval_secs, cfg.max_tree_size) == (120.0, 67_108_864)


def _prompt(prefix: int, n: int = 100, tail: int = 0) -> RequestView:
    return RequestView([prefix] * n + [1000 + tail])


def test_cache_aware_sends_a_shared_prefix_back_to_its_worker() -> None:
    policy = CacheAware(rng=random.Random(0), clock=lambda: 0.0)
    workers = ["a", "b", "c"]
    first = policy.select(workers, _prompt(1, tail=0))
    for i in range(1, 10):  # same 100-token prefix, different last token
        assert policy.select(workers, _prompt(1, tail=i)) == first
    assert policy.last_match_rate > 0.9


def test_cache_aware_miss_goes_to_the_least_loaded_not_the_smallest_tree() -> None:
    policy = CacheAware(rng=random.Random(0), clock=lambda: 0.0)
    policy.tree.insert(list(range(500)), "busy_but_big")
    # "small" has the smallest (empty) tree but clearly more load (beyond NEAR_LOAD): a miss
    # must not go there
    loads = {"small": WorkerLoad(1 + NEAR_LOAD + 1), "busy_but_big": WorkerLoad(1)}
    assert policy.select(["small", "busy_but_big"], RequestView([7] * 50), loads) == "busy_but_big"


def test_cache_aware_new_prefix_goes_to_the_smaller_tree_when_loads_are_near() -> None:
    policy = CacheAware(rng=random.Random(0), clock=lambda: 0.0)
    for tenant in range(3):  # three tenants' prefixes already on "a", one on "b"
        policy.tree.insert([tenant] * 64, "a")
    policy.tree.insert([9] * 64, "b")
    # "a" is one request less busy, but holds three tenants: the new one goes to "b"
    loads = {"a": WorkerLoad(2), "b": WorkerLoad(3)}
    assert policy.select(["a", "b"], RequestView([42] * 64), loads) == "b"


def test_cache_aware_spreads_distinct_prompts_by_load() -> None:
    policy = CacheAware(rng=random.Random(1), clock=lambda: 0.0)
    loads = {w: WorkerLoad(0) for w in "abc"}
    for i in range(30):
        w = policy.select(list("abc"), _prompt(i), loads)
        loads[w] = WorkerLoad(loads[w].in_flight + 1)
    assert {load.in_flight for load in loads.values()} == {10}


def test_cache_aware_imbalance_overrides_the_cache() -> None:
    cfg = CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=1.5)
    policy = CacheAware(cfg, rng=random.Random(0), clock=lambda: 0.0)
    policy.tree.insert(_prompt(1).token_ids, "a")
    hot = {"a": WorkerLoad(10), "b": WorkerLoad(2)}
    assert policy.select(["a", "b"], _prompt(1, tail=5), hot) == "b"
    # ... and the prompt is now recorded under b as well
    assert policy.tree.match_per_tenant(_prompt(1).token_ids)["b"] == 100
    mild = {"a": WorkerLoad(5), "b": WorkerLoad(2)}  # abs 3 <= 4: balanced, cache wins
    assert policy.select(["a", "b"], _prompt(1, tail=6), mild) in {"a", "b"}
    policy2 = CacheAware(cfg, rng=random.Random(0), clock=lambda: 0.0)
    policy2.tree.insert(_prompt(1).token_ids, "a")
    assert policy2.select(["a", "b"], _prompt(1, tail=6), mild) == "a"


def test_cache_aware_below_threshold_is_a_miss() -> None:
    policy = CacheAware(CacheAwareConfig(cache_threshold=0.5), random.Random(0), lambda: 0.0)
    policy.tree.insert([1] * 40, "a")
    loads = {"a": WorkerLoad(2), "b": WorkerLoad(0)}
    # 40 of 100 tokens cached on a: 0.4 < 0.5, so the least-loaded b
    assert policy.select(["a", "b"], RequestView([1] * 40 + [2] * 60), loads) == "b"
    assert policy.last_match_rate == 0.0


def test_cache_aware_ignores_matches_on_excluded_workers() -> None:
    policy = CacheAware(rng=random.Random(0), clock=lambda: 0.0)
    policy.tree.insert(_prompt(1).token_ids, "down")
    loads = {"b": WorkerLoad(1), "c": WorkerLoad(0)}
    assert policy.select(["b", "c"], _prompt(1), loads) == "c"


def test_cache_aware_evicts_on_its_interval_and_forgets_removed_workers() -> None:
    now = [0.0]
    cfg = CacheAwareConfig(eviction_interval_secs=10, max_tree_size=150)
    policy = CacheAware(cfg, random.Random(0), lambda: now[0])
    for i in range(5):
        policy.tree.insert([i] * 100, "a")
    assert policy.tree.tenant_size("a") == 500
    now[0] = 9.0
    policy.select(["a"], RequestView([9] * 10))
    assert policy.tree.tenant_size("a") == 510  # not yet
    now[0] = 10.0
    policy.select(["a"], RequestView([9] * 10))  # evicts, then inserts the request
    assert policy.tree.tenant_size("a") <= 150 + 10
    policy.remove_worker("a")
    assert policy.tree.tenant_size("a") == 0 and "a" not in policy.tree.tenants()


def test_kv_cost_matches_dynamos_worked_example() -> None:
    # Dynamo: 1.0*8+10=18, 1.0*5+5=10 (chosen), 1.0*2+9=11 — with 10-block prompts
    policy = KvCost(KvCostConfig(block_size=4), random.Random(0), lambda: 0.0)
    prompt = list(range(40))  # 10 blocks
    policy.tree.insert(prompt[:8], "w1")  # 2 blocks cached -> 8 to prefill
    policy.tree.insert(prompt[:20], "w2")  # 5 cached -> 5
    policy.tree.insert(prompt[:32], "w3")  # 8 cached -> 2
    loads = {
        "w1": WorkerLoad(1, active_tokens=40),
        "w2": WorkerLoad(1, active_tokens=20),
        "w3": WorkerLoad(1, active_tokens=36),
    }
    assert policy.costs(["w1", "w2", "w3"], prompt, loads) == [18, 10, 11]
    assert policy.select(["w1", "w2", "w3"], RequestView(prompt), loads) == "w2"
    assert policy.last_matched_tokens == 20


def test_kv_cost_weight_zero_is_pure_load_balancing() -> None:
    policy = KvCost(KvCostConfig(block_size=4, overlap_score_weight=0), random.Random(0))
    policy.tree.insert(list(range(40)), "cached")
    loads = {"cached": WorkerLoad(3), "idle": WorkerLoad(0)}
    assert policy.select(["cached", "idle"], RequestView(list(range(40))), loads) == "idle"


def test_kv_cost_ties_go_to_the_lower_load() -> None:
    policy = KvCost(KvCostConfig(block_size=4), random.Random(0))
    # equal costs: a has 4 active tokens (1 block), b 1 in-flight request counted as 1 block
    loads = {"a": WorkerLoad(2, active_tokens=4), "b": WorkerLoad(1)}
    assert policy.costs(["a", "b"], [1] * 8, loads) == [3, 3]
    assert policy.select(["a", "b"], RequestView([1] * 8), loads) == "b"


def test_kv_cost_temperature_samples_by_softmax() -> None:
    rng = random.Random(11)
    picks = Counter(softmax_pick([0.0, 10.0], 1.0, rng) for _ in range(4000))
    # p1/p0 = exp(-1) ~ 0.368
    assert 0.30 < picks[1] / picks[0] < 0.44
    assert softmax_pick([5.0, 5.0, 5.0], 0.5, random.Random(0)) in (0, 1, 2)
    equal = Counter(softmax_pick([1.0, 1.0], 1.0, rng) for _ in range(2000))
    assert 900 < equal[0] < 1100
    policy = KvCost(KvCostConfig(temperature=0.5), random.Random(2))
    assert policy.select(["a", "b"], RequestView([1, 2, 3])) in {"a", "b"}
