"""The engine on the real default model (SmolLM2-135M-Instruct), against transformers."""

from __future__ import annotations

import pytest
import torch

from pdmesh.engine import SamplingParams
from pdmesh.models import loader
from tests.engine.conftest import (
    EngineFactory,
    assert_all_pages_free,
    generate,
    run_all,
    tokens_of,
)

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one sentence.",
    "List three prime numbers.",
]
# min_new_tokens bans EOS like transformers' min_new_tokens does, so both make 32 tokens
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=32, min_new_tokens=32)


@pytest.fixture(scope="module")
def prompts(default_source: loader.ModelSource) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_source.path)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


@pytest.fixture(scope="module")
def reference(prompts: list[list[int]], default_source: loader.ModelSource) -> list[list[int]]:
    """transformers' greedy generate on the same weights, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_source.path, dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                pad_token_id=0,
            )
            out.append(gen[0, len(p) :].tolist())
    return out


def test_greedy_matches_transformers(
    make_engine: EngineFactory, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    engine = make_engine()
    for p, ref in zip(prompts, reference):
        engine.add_request("r", p, GREEDY)
        assert tokens_of(run_all(engine)["r"]) == ref
    assert_all_pages_free(engine)


def test_batched_equals_one_by_one(
    make_engine: EngineFactory, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    engine = make_engine()
    assert generate(engine, prompts, GREEDY) == reference
    assert_all_pages_free(engine)


def test_chunked_prefill_equals_unchunked(
    make_engine: EngineFactory, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    engine = make_engine(max_num_batched_tokens=7)  # chunks that straddle pages
    assert generate(engine, prompts, GREEDY) == reference
    assert_all_pages_free(engine)


def test_prefix_cache_hit_changes_nothing_and_is_counted(
    make_engine: EngineFactory, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    engine = make_engine(page_size=4)
    engine.add_request("first", prompts[0], GREEDY)
    assert tokens_of(run_all(engine)["first"]) == reference[0]
    assert engine.load().prefix_hit_tokens == 0
    engine.add_request("again", prompts[0], GREEDY)
    outs = run_all(engine)["again"]
    assert tokens_of(outs) == reference[0]
    cached = outs[-1].num_cached_tokens
    # every full page of the prompt but the one holding its last token
    assert cached == (len(prompts[0]) - 1) // 4 * 4 > 0
    assert engine.load().prefix_hit_tokens == cached
    assert 0 < engine.load().prefix_hit_rate < 1
    # the chat template's shared system prefix is reused across different questions too
    engine.add_request("other", prompts[1], GREEDY)
    outs = run_all(engine)["other"]
    assert tokens_of(outs) == reference[1] and outs[-1].num_cached_tokens > 0
    assert_all_pages_free(engine)


def test_exported_pages_continue_in_second_engine(
    make_engine: EngineFactory, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    prefill, decode = make_engine(), make_engine()
    for i, p in enumerate(prompts[:2]):
        rid = f"pd{i}"
        prefill.add_request(rid, p, GREEDY, prefill_only=True)
        (first,) = run_all(prefill)[rid]
        assert first.prefill_page_ids is not None
        dst = decode.allocate_incoming(rid, p, GREEDY)
        decode.write_pages(dst, prefill.read_pages(first.prefill_page_ids))
        prefill.release(rid)
        out0 = decode.start_decode(rid, first.new_token_ids[0])
        assert out0.new_token_ids + tokens_of(run_all(decode)[rid]) == reference[i]
    assert_all_pages_free(prefill)
    assert_all_pages_free(decode)


def test_eos_stops_generation(make_engine: EngineFactory, prompts: list[list[int]]) -> None:
    engine = make_engine()
    engine.add_request("r", prompts[3], SamplingParams(temperature=0, max_new_tokens=200))
    outs = run_all(engine)["r"]
    assert outs[-1].finish_reason is not None and outs[-1].finish_reason.value == "stop"
    assert tokens_of(outs)[-1] in engine.eos_token_ids
