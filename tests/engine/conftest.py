from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pdmesh.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from pdmesh.engine.model_runner import Launched
from pdmesh.engine.scheduler import ScheduledBatch
from pdmesh.models import loader


@pytest.fixture(scope="session")
def default_source() -> loader.ModelSource:
    return loader.resolve(loader.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_source() -> loader.ModelSource:
    return loader.resolve("random:tiny")


EngineFactory = Callable[..., LLMEngine]


def _factory(source: loader.ModelSource) -> EngineFactory:
    def make(**overrides: Any) -> LLMEngine:
        kw: dict[str, Any] = {
            "model": source.name,
            "device": "cpu",
            "dtype": "float32",
            "num_pages": 128,
        }
        kw.update(overrides)
        return LLMEngine(EngineConfig(**kw), source)

    return make


@pytest.fixture(scope="session")
def make_engine(default_source: loader.ModelSource) -> EngineFactory:
    return _factory(default_source)


@pytest.fixture(scope="session")
def make_tiny_engine(tiny_source: loader.ModelSource) -> EngineFactory:
    return _factory(tiny_source)


def run_all(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    """Step until idle; every request's outputs in order."""
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_work:
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not go idle")


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def generate(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    outs = run_all(engine)
    return [tokens_of(outs[f"r{i}"]) for i in range(len(prompts))]


def assert_all_pages_free(engine: LLMEngine) -> None:
    load = engine.load()
    assert load.num_free_pages == load.num_total_pages, load
    assert all(rc == 0 for rc in engine.blocks.ref_counts)
    assert load.num_running == load.num_waiting == load.num_awaiting_kv == load.num_held == 0


@dataclass
class OverlapProbe:
    """How an engine's steps overlapped: schedules made while a step was in flight, and
    samplings that waited for it (``ModelRunner.sample_deferred``)."""

    schedules: int = 0
    in_flight: int = 0
    deferred: int = 0


def probe_overlap(engine: LLMEngine) -> OverlapProbe:
    """Count on ``engine`` what ``OverlapProbe`` says (wraps two of its objects' methods)."""
    probe = OverlapProbe()
    schedule, sample_deferred = engine.scheduler.schedule, engine.runner.sample_deferred

    def counting_schedule() -> ScheduledBatch:
        probe.schedules += 1
        probe.in_flight += engine._inflight is not None
        return schedule()

    def counting_sample_deferred(launched: Launched) -> None:
        probe.deferred += 1
        sample_deferred(launched)

    engine.scheduler.schedule = counting_schedule  # type: ignore[method-assign]
    engine.runner.sample_deferred = counting_sample_deferred  # type: ignore[method-assign]
    return probe
