from __future__ import annotations

import argparse

import pytest

from pdmesh.config import add_dataclass_args, from_args
from services.router.config import RouterServiceConfig


def parse(*argv: str) -> RouterServiceConfig:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, RouterServiceConfig)
    return from_args(RouterServiceConfig, parser.parse_args(list(argv)))


def test_pd_policies_inherit_policy_as_sglang_does() -> None:
    only = parse("--policy", "cache_aware")
    assert [only.policy_for(r) for r in ("aggregated", "prefill", "decode")] == ["cache_aware"] * 3
    both = parse("--policy", "round_robin", "--prefill-policy", "cache_aware")
    assert (both.policy_for("prefill"), both.policy_for("decode")) == ("cache_aware", "round_robin")
    all3 = parse(
        "--policy", "random", "--prefill-policy", "cache_aware", "--decode-policy", "power_of_two"
    )
    assert (all3.policy_for("prefill"), all3.policy_for("decode")) == (
        "cache_aware",
        "power_of_two",
    )


def test_sglang_flag_names_reach_the_routing_configs() -> None:
    cfg = parse(
        "--cache-threshold", "0.5",
        "--balance-abs-threshold", "32",
        "--balance-rel-threshold", "1.0001",
        "--eviction-interval-secs", "60",
        "--max-tree-size", "1000",
        "--retry-max-retries", "3",
        "--retry-initial-backoff-ms", "100",
        "--retry-max-backoff-ms", "10000",
        "--retry-backoff-multiplier", "3",
        "--retry-jitter-factor", "0.2",
        "--disable-retries",
        "--cb-failure-threshold", "7",
        "--cb-success-threshold", "3",
        "--cb-timeout-duration-secs", "10",
        "--cb-window-duration-secs", "20",
        "--disable-circuit-breaker",
    )  # fmt: skip
    ca = cfg.policy_settings().cache_aware
    assert (ca.cache_threshold, ca.balance_abs_threshold, ca.balance_rel_threshold) == (
        0.5,
        32,
        1.0001,
    )
    assert (ca.eviction_interval_secs, ca.max_tree_size) == (60, 1000)
    retry = cfg.retry_config()
    assert (retry.max_retries, retry.initial_backoff_ms, retry.max_backoff_ms) == (3, 100, 10000)
    assert (retry.backoff_multiplier, retry.jitter_factor, retry.max_attempts) == (3, 0.2, 1)
    cb = cfg.breaker_config()
    assert (cb.failure_threshold, cb.success_threshold) == (7, 3)
    assert (cb.timeout_duration_secs, cb.window_duration_secs, cb.enabled) == (10, 20, False)


def test_bad_routing_flags_fail_at_startup() -> None:
    with pytest.raises(ValueError, match="--decode-policy='nope'"):
        parse("--decode-policy", "nope")
    with pytest.raises(ValueError, match="cache_threshold"):
        parse("--cache-threshold", "1.5")
    with pytest.raises(ValueError, match="jitter"):
        parse("--retry-jitter-factor", "2")
