"""Engine mechanics on a tiny random model: fast, no download."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdmesh.engine import (
    FinishReason,
    InvalidRequestError,
    LLMEngine,
    RequestNotFoundError,
    ResourceExhaustedError,
    SamplingParams,
)
from tests.engine.conftest import EngineFactory, assert_all_pages_free, run_all, tokens_of

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], GREEDY, "prompt"),
        ([1] * 2000, GREEDY, "prompt"),
        ([1, 2, 10_000], GREEDY, "prompt_token_ids"),
        ([1, -1], GREEDY, "prompt_token_ids"),
        ([1, 2], SamplingParams(max_new_tokens=-1), "sampling_params.max_new_tokens"),
        ([1, 2], SamplingParams(top_p=0.0), "sampling_params.top_p"),
        ([1, 2], SamplingParams(top_p=1.5), "sampling_params.top_p"),
        ([1, 2], SamplingParams(temperature=-0.1), "sampling_params.temperature"),
        ([1, 2], SamplingParams(temperature=float("nan")), "sampling_params.temperature"),
        ([1, 2], SamplingParams(top_k=-5), "sampling_params.top_k"),
        ([1, 2], SamplingParams(min_p=2.0), "sampling_params.min_p"),
        ([1, 2], SamplingParams(stop_token_ids=(99999,)), "sampling_params.stop_token_ids"),
        ([1, 2], SamplingParams(top_logprobs=50), "sampling_params.top_logprobs"),
    ],
)
def test_bad_input_raises_typed_error_naming_the_field(
    make_tiny_engine: EngineFactory, prompt: list[int], params: SamplingParams, field: str
) -> None:
    engine = make_tiny_engine(max_model_len=1024)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("x", prompt, params)
    assert err.value.field == field
    assert field in str(err.value)
    assert_all_pages_free(engine)
    engine.add_request("ok", [1, 2, 3], GREEDY)  # still serving
    assert len(tokens_of(run_all(engine)["ok"])) == 8


def test_duplicate_request_id_is_rejected(make_tiny_engine: EngineFactory) -> None:
    engine = make_tiny_engine()
    engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.add_request("a", [1, 2], GREEDY)


def test_prompt_larger_than_the_pool_is_resource_exhausted(make_tiny_engine: EngineFactory) -> None:
    engine = make_tiny_engine(num_pages=2, page_size=4)
    with pytest.raises(ResourceExhaustedError, match="KV pages"):
        engine.add_request("a", list(range(1, 10)), GREEDY)


def test_max_new_tokens_zero_finishes_without_tokens(make_tiny_engine: EngineFactory) -> None:
    engine = make_tiny_engine()
    engine.add_request("a", [1, 2], SamplingParams(max_new_tokens=0))
    (out,) = run_all(engine)["a"]
    assert out.finished and out.finish_reason is FinishReason.LENGTH and out.new_token_ids == []


def test_stop_token_and_min_new_tokens(make_tiny_engine: EngineFactory) -> None:
    engine = make_tiny_engine()
    engine.add_request("probe", [5, 6, 7], GREEDY)
    first = tokens_of(run_all(engine)["probe"])
    stop = first[2]
    assert stop not in first[:2], first
    engine.add_request("stop", [5, 6, 7], SamplingParams(temperature=0, stop_token_ids=(stop,)))
    outs = run_all(engine)["stop"]
    assert tokens_of(outs) == first[:3] and outs[-1].finish_reason is FinishReason.STOP
    # min_new_tokens bans the stop token until enough tokens were generated
    engine.add_request(
        "min",
        [5, 6, 7],
        SamplingParams(temperature=0, stop_token_ids=(stop,), min_new_tokens=4, max_new_tokens=20),
    )
    got = tokens_of(run_all(engine)["min"])
    assert got[:2] == first[:2] and got[2] != stop
    assert stop not in got[:4] and len(got) >= 4


def test_context_length_ends_with_length(make_tiny_engine: EngineFactory) -> None:
    engine = make_tiny_engine(max_model_len=12)
    engine.add_request("a", list(range(1, 9)), SamplingParams(temperature=0, max_new_tokens=100))
    outs = run_all(engine)["a"]
    assert len(tokens_of(outs)) == 4 and outs[-1].finish_reason is FinishReason.LENGTH


def test_same_seed_same_output_regardless_of_batch(make_tiny_engine: EngineFactory) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_new_tokens=12)
    engine = make_tiny_engine()
    engine.add_request("alone", [3, 4, 5], params)
    alone = tokens_of(run_all(engine)["alone"])
    engine.add_request("n1", [9, 9, 9, 9], SamplingParams(temperature=1.0, max_new_tokens=12))
    engine.add_request("again", [3, 4, 5], params)
    engine.add_request(
        "other", [3, 4, 5], SamplingParams(temperature=1.0, seed=99, max_new_tokens=12)
    )
    outs = run_all(engine)
    assert tokens_of(outs["again"]) == alone
    assert tokens_of(outs["other"]) != alone


def test_logprobs_and_top_logprobs(make_tiny_engine: EngineFactory) -> None:
    engine = make_tiny_engine()
    engine.add_request(
        "a",
        [1, 2, 3],
        SamplingParams(temperature=0, max_new_tokens=4, logprobs=True, top_logprobs=3),
    )
    outs = run_all(engine)["a"]
    lps = [lp for o in outs for lp in o.new_logprobs]
    assert len(lps) == 4
    for lp, tok in zip(lps, tokens_of(outs)):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_abort_frees_pages_and_emits_abort(make_tiny_engine: EngineFactory) -> None:
    engine = make_tiny_engine(max_num_batched_tokens=4)
    engine.add_request("a", list(range(1, 20)), GREEDY)
    engine.add_request("b", [1, 2], GREEDY)
    engine.step()  # a mid-prefill
    assert engine.abort("a")
    assert not engine.abort("nope")
    outs = run_all(engine)
    assert outs["a"][-1].finish_reason is FinishReason.ABORT
    assert len(tokens_of(outs["b"])) == 8
    assert_all_pages_free(engine)


def test_preemption_under_page_pressure_keeps_outputs(make_tiny_engine: EngineFactory) -> None:
    prompts = [[i + 1] * 6 for i in range(4)]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    roomy = make_tiny_engine(num_pages=64, page_size=2)
    tight = make_tiny_engine(num_pages=14, page_size=2)
    expected = {}
    for i, p in enumerate(prompts):
        roomy.add_request(f"r{i}", p, params)
        tight.add_request(f"r{i}", p, params)
    expected = {k: tokens_of(v) for k, v in run_all(roomy).items()}
    got = {k: tokens_of(v) for k, v in run_all(tight).items()}
    assert tight.load().num_preemptions > 0
    assert got == expected
    assert_all_pages_free(tight)


def test_prefill_only_then_import_into_second_engine(make_tiny_engine: EngineFactory) -> None:
    prompt = list(range(1, 23))
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    ref = make_tiny_engine()
    ref.add_request("r", prompt, params)
    expected = tokens_of(run_all(ref)["r"])

    prefill, decode = make_tiny_engine(page_size=4), make_tiny_engine(page_size=4)
    assert not prefill.kv_layout().compatibility_errors(decode.kv_layout())
    prefill.add_request("r", prompt, params, prefill_only=True)
    (first,) = run_all(prefill)["r"]
    assert first.finished and first.prefill_page_ids is not None
    dst = decode.allocate_incoming("r", prompt, params)
    assert len(dst) == len(first.prefill_page_ids) == 6
    decode.write_pages(dst, prefill.read_pages(first.prefill_page_ids))
    prefill.release("r")
    assert_all_pages_free(prefill)
    out0 = decode.start_decode("r", first.new_token_ids[0])
    rest = run_all(decode)["r"]
    assert out0.new_token_ids + tokens_of(rest) == expected
    assert_all_pages_free(decode)
    with pytest.raises(RequestNotFoundError):
        prefill.release("r")


def test_layout_mismatch_is_named(make_tiny_engine: EngineFactory) -> None:
    a, b = make_tiny_engine(page_size=4), make_tiny_engine(page_size=8)
    assert a.kv_layout().compatibility_errors(b.kv_layout()) == ["page_size: 4 != 8"]


def test_page_addresses_cover_the_cache(make_tiny_engine: EngineFactory) -> None:
    e = make_tiny_engine(num_pages=10, page_size=4)
    layout = e.kv_layout()
    kv = e.runner.kv_cache
    assert layout.page_addr(0) == kv.data_ptr()
    assert layout.page_addr(9) == kv[9].data_ptr()
    assert layout.page_bytes == kv[0].nbytes
    assert layout.page_addr(9) + layout.page_bytes == kv.data_ptr() + kv.nbytes


def test_awaiting_kv_abort_frees_pages(make_tiny_engine: EngineFactory) -> None:
    e = make_tiny_engine()
    e.allocate_incoming("r", [1, 2, 3, 4, 5], GREEDY)
    assert e.load().num_awaiting_kv == 1
    assert e.abort("r")
    run_all(e)
    assert_all_pages_free(e)


# random workloads: (prompt with likely shared prefixes, max_new_tokens, abort after this many
# steps, prefill only); shared with tests/engine/test_overlap_schedule.py
RANDOM_WORKLOADS = st.lists(
    st.tuples(
        st.lists(st.integers(1, 8), min_size=1, max_size=24),
        st.integers(0, 10),
        st.one_of(st.none(), st.integers(0, 12)),
        st.booleans(),
    ),
    min_size=1,
    max_size=10,
)
Workload = list[tuple[list[int], int, int | None, bool]]


def run_random_workload(engine: LLMEngine, reqs: Workload, late_release: bool = False) -> None:
    """Run ``reqs`` with their aborts; every request finishes and every page is free after.
    ``late_release``: a held prefill output may come after its abort freed it (overlap)."""
    aborts: dict[int, list[str]] = {}
    for i, (prompt, n, abort_at, prefill_only) in enumerate(reqs):
        engine.add_request(
            f"r{i}",
            prompt,
            SamplingParams(temperature=0.8, seed=i, max_new_tokens=n),
            prefill_only=prefill_only,
        )
        if abort_at is not None:
            aborts.setdefault(abort_at, []).append(f"r{i}")
    finished = set()
    for step in range(500):
        for rid in aborts.get(step, []):
            engine.abort(rid)
        for o in engine.step():
            if o.finished:
                finished.add(o.request_id)
            if o.prefill_page_ids is not None:  # as the PD prefill does once the KV is sent
                if late_release:
                    with contextlib.suppress(RequestNotFoundError):
                        engine.release(o.request_id)
                else:
                    engine.release(o.request_id)
        if not engine.has_work and step > max(aborts, default=0):
            break
    assert finished == {f"r{i}" for i in range(len(reqs))}
    assert_all_pages_free(engine)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(reqs=RANDOM_WORKLOADS, chunk=st.integers(1, 16))
def test_random_workload_with_aborts_frees_everything(
    make_tiny_engine: EngineFactory, reqs: Workload, chunk: int
) -> None:
    engine = make_tiny_engine(
        num_pages=24, page_size=2, max_num_batched_tokens=chunk, max_running_requests=4
    )
    run_random_workload(engine, reqs)
