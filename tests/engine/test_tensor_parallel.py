"""Tensor parallelism on the CPU: N real processes joined by gloo, each holding its shard.

Every rank builds the same engine and gets the same requests, so each runs the same schedule;
the shards' collectives (all-reduce after o_proj / down_proj / the embedding, all-gather of the
logits) must then give the logits and greedy outputs of the unsharded model. Then the worker's
way of running them, ``EngineProcess`` with ``tp_size``: rank 0 broadcasts what it runs, the
outputs are the unsharded engine's, and a rank killed mid-stream takes the engine down as one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
from typing import Any

import numpy as np
import pytest
import torch

from pdmesh.distributed import TPGroup
from pdmesh.distributed.spawn import run_ranks
from pdmesh.engine import EngineConfig, LLMEngine, SamplingParams
from pdmesh.engine.engine_process import EngineProcess
from pdmesh.errors import EngineDeadError
from pdmesh.models import loader
from pdmesh.models.config import ModelConfig
from pdmesh.models.presets import PRESETS
from pdmesh.models.sharding import TPShard, shard_errors
from tests.engine.test_engine_process import _alive

RANK_TIMEOUT_S = 240.0
PROMPTS = [[1, 17, 300, 42, 9, 1000], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [2000, 3]]
NEW_TOKENS = 32


def _generate(source: loader.ModelSource, tp: TPGroup) -> dict[str, Any]:
    """Greedy outputs of PROMPTS and the logits of every step (this rank's view)."""
    cfg = EngineConfig(model=source.name, device="cpu", dtype="float32", num_pages=64)
    engine = LLMEngine(cfg, source, tp)
    logits: list[np.ndarray] = []  # numpy: a queue pickles it by value
    model = engine.runner.model
    compute = model.compute_logits

    def recorded(hidden: torch.Tensor) -> torch.Tensor:
        out = compute(hidden)
        logits.append(out.numpy().copy())
        return out

    model.compute_logits = recorded  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", [t % source.config.vocab_size for t in prompt], params)
    tokens: dict[str, list[int]] = {}
    for _ in range(1000):
        if not engine.has_work:
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return {
        "tokens": tokens,
        "logits": logits,
        "kv_heads": engine.kv_layout().num_kv_heads,
        "free_pages": engine.blocks.num_free_pages,
        "num_pages": engine.blocks.num_pages,
    }


def _rank(tp: TPGroup, source: loader.ModelSource) -> dict[str, Any]:
    return _generate(source, tp)


def _assert_equal_to_tp1(source: loader.ModelSource, size: int, kv_heads: int) -> None:
    want = _generate(source, TPGroup.single())
    ranks = run_ranks(size, _rank, source, timeout_s=RANK_TIMEOUT_S)
    for rank, got in enumerate(ranks):
        assert got["tokens"] == want["tokens"], f"rank {rank}"
        assert all(len(t) == NEW_TOKENS for t in got["tokens"].values())
        assert len(got["logits"]) == len(want["logits"])
        worst = max(float(np.abs(a - b).max()) for a, b in zip(got["logits"], want["logits"]))
        # 1e-4, or 4 float32 ulps of the largest logit where that is more: random weights give
        # logits near 700, where one ulp is 6e-5 and the shards' other summation order moves
        # the last bits (the real model's logits stay below 64, where the bound is 1e-4)
        scale = max(float(np.abs(w).max()) for w in want["logits"])
        bound = max(1e-4, 4 * float(np.spacing(np.float32(scale))))
        assert worst <= bound, f"rank {rank}: logits differ by {worst} (largest {scale})"
        assert got["kv_heads"] == kv_heads
        assert got["free_pages"] == got["num_pages"]  # every page back on every rank


def _random(preset: str, **changes: Any) -> loader.ModelSource:
    cfg = dataclasses.replace(ModelConfig.from_hf(PRESETS[preset]), **changes)
    return loader.ModelSource(f"random:{preset}", cfg, None)


def test_qwen3_shape_tp2_equals_tp1() -> None:
    # Qwen3-0.6B's widths (16 heads, 8 KV heads, head_dim 128, vocab 151936, q/k norms, tied
    # embeddings) with 2 of its 28 layers: every sharded path, a fraction of the CPU time
    _assert_equal_to_tp1(_random("qwen3-0.6b", num_layers=2), 2, kv_heads=4)


@pytest.mark.model
def test_default_model_tp3_equals_tp1(default_source: loader.ModelSource) -> None:
    # SmolLM2's 9 heads and 3 KV heads over 3 ranks: 3 query heads and 1 KV head each, weights
    # read per shard from its safetensors
    _assert_equal_to_tp1(default_source, 3, kv_heads=1)


def test_replicated_kv_heads_and_padded_vocab_tp4() -> None:
    # tiny: 4 heads, 2 KV heads over 4 ranks (each KV head on 2 ranks); vocab 510 does not
    # divide by 4 (the last rank's rows are padding)
    source = _random("tiny", vocab_size=510)
    shards = [TPShard.of(source.config, r, 4) for r in range(4)]
    assert [list(s.kv_heads) for s in shards] == [[0], [0], [1], [1]]
    assert [s.vocab.start for s in shards] == [0, 128, 256, 384] and shards[3].vocab.stop == 512
    _assert_equal_to_tp1(source, 4, kv_heads=1)


def test_shapes_that_do_not_divide_are_refused() -> None:
    smollm = ModelConfig.from_hf(PRESETS["smollm2-135m"])
    assert shard_errors(smollm, 3) == []
    assert shard_errors(smollm, 2) == [
        "num_heads=9 is not divisible by --tp-size=2",
        "num_kv_heads=3 is not divisible by --tp-size=2",
    ]
    assert shard_errors(smollm, 9) == ["intermediate_size=1536 is not divisible by --tp-size=9"]
    tiny = dataclasses.replace(ModelConfig.from_hf(PRESETS["tiny"]), intermediate_size=192)
    assert shard_errors(dataclasses.replace(tiny, num_heads=6, num_kv_heads=3), 6) == []
    assert shard_errors(dataclasses.replace(tiny, num_heads=12, num_kv_heads=6), 4) == [
        "num_kv_heads=6 is not divisible by --tp-size=4"
    ]
    assert shard_errors(dataclasses.replace(tiny, num_heads=16, num_kv_heads=2), 8) == []
    assert shard_errors(dataclasses.replace(tiny, num_heads=12, num_kv_heads=3), 4) == [
        "--tp-size=4 is not a multiple of num_kv_heads=3 "
        "(each KV head is replicated on tp / num_kv_heads ranks)"
    ]
    with pytest.raises(ValueError, match="num_heads=9 is not divisible by --tp-size=2"):
        TPShard.of(smollm, 0, 2)


SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
)


@pytest.mark.model
def test_engine_process_tp3_equals_tp1_and_a_killed_rank_takes_it_down() -> None:
    config = EngineConfig(device="cpu", dtype="float32", num_pages=64, max_model_len=256)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, json_schema=SCHEMA, max_new_tokens=40)
    reference = LLMEngine(config)
    for i, prompt in enumerate(PROMPTS):
        reference.add_request(f"r{i}", prompt, greedy)
    reference.add_request("json", PROMPTS[0], constrained)
    want: dict[str, list[int]] = {}
    while reference.has_work:
        for out in reference.step():
            want.setdefault(out.request_id, []).extend(out.new_token_ids)
    del reference

    deaths: list[BaseException] = []
    engine = EngineProcess(dataclasses.replace(config, tp_size=3), on_death=deaths.append)
    engine.launch(timeout=RANK_TIMEOUT_S)
    pids = [p for p in engine.rank_pids if p is not None]
    assert len(pids) == 3 and engine.info.kv_layout().num_kv_heads == 1

    async def collect(rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
        return [t async for out in engine.generate(rid, prompt, params) for t in out.new_token_ids]

    async def main() -> None:
        engine.start()
        got = await asyncio.gather(
            *(collect(f"r{i}", p, greedy) for i, p in enumerate(PROMPTS)),
            collect("json", PROMPTS[0], constrained),
        )
        assert got == [want["r0"], want["r1"], want["r2"], want["json"]]
        load = await engine.load()
        assert load.num_free_pages == load.num_total_pages

        # a non-zero rank killed mid-stream: the stream fails naming it, on_death runs
        stream = engine.generate(
            "long", PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True)
        )
        async for _ in stream:
            os.kill(pids[2], signal.SIGKILL)
            break
        with pytest.raises(EngineDeadError, match="tp rank 2 exited"):
            async with asyncio.timeout(30):
                async for _ in stream:
                    pass
        async with asyncio.timeout(10):
            while not deaths:
                await asyncio.sleep(0.02)
        with pytest.raises(EngineDeadError):
            await engine.load()

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert len(deaths) == 1
    deadline = time.monotonic() + 10  # every rank gone, none left in a collective
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
