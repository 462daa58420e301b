"""The model-free stepping worker's engine (``benchmarks.mesh.stepping_engine``): one token per
active request per step on a fixed grid, finish and usage as the real engine reports them,
aborts that free the request, and enough of ``LLMEngine``'s interface for ``AsyncEngine`` and
the worker's servicers. A ``random:tiny`` model: no files, no network; a fake clock where the
grid is checked."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from benchmarks.mesh.stepping_engine import SteppingEngine, SteppingEngineConfig
from benchmarks.mesh.words import word_token_ids
from pdmesh.engine import (
    AsyncEngine,
    FinishReason,
    InvalidRequestError,
    LLMEngine,
    ResourceExhaustedError,
    SamplingParams,
)
from pdmesh.errors import FailedPreconditionError
from services.worker import convert

PROMPT = [10, 11, 12, 13]


class FakeTime:
    """A clock that only ``sleep`` moves, recording every sleep."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def engine(time: FakeTime | None = None, **kwargs: object) -> SteppingEngine:
    cfg = SteppingEngineConfig(model="random:tiny", **kwargs)  # type: ignore[arg-type]
    if time is None:
        return SteppingEngine(cfg, sleep=lambda _: None)
    return SteppingEngine(cfg, clock=time.clock, sleep=time.sleep)


def params(**kwargs: object) -> SamplingParams:
    return SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_every_active_request_gets_one_token_per_step() -> None:
    e = engine()
    for i in range(3):
        e.add_request(f"r{i}", PROMPT, params(max_new_tokens=5))
    assert e.has_work and not e.stalled
    for _ in range(2):
        outs = e.step()
        assert sorted(o.request_id for o in outs) == ["r0", "r1", "r2"]
        assert all(len(o.new_token_ids) == 1 and not o.finished for o in outs)
    assert e.steps == 2 and e.num_active == 3
    assert e.load().num_running == 3


def test_steps_wait_for_the_next_boundary_of_a_fixed_grid() -> None:
    time = FakeTime()
    e = engine(time, step_ms=10.0)
    e.add_request("a", PROMPT, params(max_new_tokens=10))
    time.now = 0.003
    e.step()  # waits until 0.010
    assert time.sleeps[-1] == pytest.approx(0.007)
    time.now = 0.0251  # a late step skips the 0.020 boundary: the lost time stays lost
    e.step()
    assert time.now == pytest.approx(0.030)
    e.step()  # right on a boundary: the next one
    assert time.now == pytest.approx(0.040)


def test_a_step_with_nothing_active_returns_at_once() -> None:
    time = FakeTime()
    e = engine(time)
    assert e.step() == [] and time.sleeps == [] and not e.has_work


def test_max_new_tokens_finishes_with_length_and_usage() -> None:
    e = engine()
    e.add_request("a", PROMPT, params(max_new_tokens=3))
    outs = [o for _ in range(3) for o in e.step()]
    assert [o.finished for o in outs] == [False, False, True]
    last = outs[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert (last.num_prompt_tokens, last.num_completion_tokens) == (len(PROMPT), 3)
    assert not e.has_work and e.step() == []
    pb = convert.output_to_pb(last)
    assert (pb.usage.prompt_tokens, pb.usage.completion_tokens) == (len(PROMPT), 3)


def test_zero_new_tokens_finishes_at_the_next_step_without_tokens() -> None:
    e = engine()
    e.add_request("a", PROMPT, params(max_new_tokens=0))
    (out,) = e.step()
    assert out.finished and out.finish_reason is FinishReason.LENGTH and out.new_token_ids == []


def test_the_context_length_ends_a_request_too() -> None:
    e = engine(max_model_len=6)
    e.add_request("a", PROMPT, params(max_new_tokens=100))
    outs = [o for _ in range(2) for o in e.step()]
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH


def test_abort_frees_the_request_and_reports_it() -> None:
    e = engine()
    e.add_request("a", PROMPT, params(max_new_tokens=10))
    e.add_request("b", PROMPT, params(max_new_tokens=10))
    e.step()
    assert e.abort("a") and not e.abort("a") and not e.abort("unknown")
    outs = e.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert len(aborted) == 1 and aborted[0].finish_reason is FinishReason.ABORT
    assert aborted[0].new_token_ids == [] and aborted[0].num_completion_tokens == 1
    assert e.num_active == 1 and e.load().num_running == 1
    e.add_request("a", PROMPT, params(max_new_tokens=1))  # the id is free again


def test_tokens_are_deterministic_words_never_eos() -> None:
    a, b = engine(), engine()
    for e in (a, b):
        e.add_request("x", PROMPT, params(max_new_tokens=20, ignore_eos=False))
        e.add_request("y", [7, 8], params(max_new_tokens=20))
    streams: list[dict[str, list[int]]] = [{"x": [], "y": []}, {"x": [], "y": []}]
    for _ in range(20):
        for e, s in zip((a, b), streams):
            for o in e.step():
                s[o.request_id].extend(o.new_token_ids)
    assert streams[0] == streams[1]  # the same prompt gets the same answer
    assert streams[0]["x"] != streams[0]["y"]
    assert len(set(streams[0]["x"])) > 10  # words, not one id repeated
    assert all(t in a.words and t not in a.eos_token_ids for t in streams[0]["x"])


def test_stop_token_ids_end_a_request_after_min_new_tokens() -> None:
    probe = engine()
    probe.add_request("p", PROMPT, params(max_new_tokens=3))
    first = [o.new_token_ids[0] for _ in range(3) for o in probe.step()]
    e = engine()
    e.add_request("a", PROMPT, params(max_new_tokens=10, stop_token_ids=(first[1],)))
    outs = [o for _ in range(3) for o in e.step()]
    assert outs[1].finished and outs[1].finish_reason is FinishReason.STOP


def test_logprobs_when_asked() -> None:
    e = engine()
    e.add_request("a", PROMPT, params(max_new_tokens=2, logprobs=True, top_logprobs=3))
    e.add_request("b", PROMPT, params(max_new_tokens=2))
    outs = {o.request_id: o for o in e.step()}
    (lp,) = outs["a"].new_logprobs
    assert lp.token_id == outs["a"].new_token_ids[0]
    assert len(lp.top) == 3 and lp.top[0] == (lp.token_id, lp.logprob)
    assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)
    assert outs["b"].new_logprobs == []


@pytest.mark.parametrize(
    ("request_id", "prompt", "sp", "field"),
    [
        ("", PROMPT, {}, "request_id"),
        ("a", [], {}, "prompt"),
        ("a", [0, 10_000], {}, "prompt_token_ids"),
        ("a", list(range(1024)), {}, "prompt"),
        ("a", PROMPT, {"top_p": 2.0}, "sampling_params.top_p"),
    ],
)
def test_invalid_requests_are_refused_as_the_engine_refuses_them(
    request_id: str, prompt: list[int], sp: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine().add_request(request_id, prompt, params(**sp))
    assert info.value.field == field


def test_duplicate_ids_and_a_full_engine_are_refused() -> None:
    e = engine(max_running_requests=1)
    e.add_request("a", PROMPT, params())
    with pytest.raises(InvalidRequestError):
        e.add_request("a", PROMPT, params())
    with pytest.raises(ResourceExhaustedError):
        e.add_request("b", PROMPT, params())


def test_pd_hooks_refuse() -> None:
    e = engine()
    with pytest.raises(FailedPreconditionError):
        e.add_request("a", PROMPT, params(), prefill_only=True)
    with pytest.raises(FailedPreconditionError):
        e.allocate_incoming("a", PROMPT, params())


def test_it_has_every_public_member_of_llm_engine() -> None:
    """A tripwire: a method the worker's code may call on its engine that the stepping engine
    lacks would fail only at run time, inside the worker process."""
    e = engine()
    methods = {n for n in dir(LLMEngine) if not n.startswith("_")}
    attributes = {"config", "source", "vocab_size", "eos_token_ids", "max_model_len"}
    assert not [n for n in methods | attributes if not hasattr(e, n)]
    assert e.config.max_running_requests == e.stepping.max_running_requests  # SGLang servicer


def test_model_info_from_the_real_converter() -> None:
    e = engine(page_size=32)
    info = convert.model_info_to_pb(e)  # type: ignore[arg-type]
    assert info.model_name == "random:tiny" and info.vocab_size == 512
    assert info.page_size == 32 and info.num_layers == 2 and list(info.eos_token_ids) == [2]


def test_under_the_real_async_engine() -> None:
    """Streams through ``AsyncEngine`` (the worker's engine thread), at 1 ms steps: every token,
    the finish, and an early close that aborts the request."""

    async def scenario() -> tuple[list[int], int, int]:
        stepping = SteppingEngine(SteppingEngineConfig(model="random:tiny", step_ms=1.0))
        ae = AsyncEngine(stepping)  # type: ignore[arg-type]
        ae.start()
        try:
            got = []
            async for out in ae.generate("a", PROMPT, params(max_new_tokens=8)):
                got.append(out)
            stream = ae.generate("b", PROMPT, params(max_new_tokens=1000))
            async for _ in stream:
                break
            await stream.aclose()  # type: ignore[attr-defined]
            for _ in range(100):  # the abort is queued to the engine thread
                if (await ae.load()).num_running == 0:
                    break
                await asyncio.sleep(0.01)
            running = (await ae.load()).num_running
        finally:
            ae.shutdown()
        tokens = [t for o in got for t in o.new_token_ids]
        return tokens, got[-1].num_completion_tokens, running

    tokens, completion, running = asyncio.run(scenario())
    assert len(tokens) == 8 and completion == 8
    assert running == 0


def test_word_ids_come_from_the_tokenizer_when_there_is_one(tmp_path: Path) -> None:
    vocab = {"<s>": 0, "</s>": 1, "house": 2, "river": 3, "a": 4, "x1": 5, "Ġtree": 6}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<s>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
    # byte-level decoding turns "Ġtree" into " tree": the only whole word after a space
    assert word_token_ids(tmp_path, len(vocab), frozenset({1})) == [6]
    # without tokenizer files: the upper vocabulary, EOS left out
    fallback = word_token_ids(None, 16, frozenset({10}))
    assert fallback == [4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15]
