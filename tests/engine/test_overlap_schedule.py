"""The overlap schedule (llm_engine.py NOTE) on CPU: the same outputs as without it.

On CPU nothing runs asynchronously, so the overlap is off by default there; these tests force
it on (``disable_overlap_schedule=False``) to run the same code path as CUDA does, and compare
every output field with a run that has it off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdmesh.engine import (
    EngineConfig,
    FinishReason,
    LLMEngine,
    RequestNotFoundError,
    RequestOutput,
    SamplingParams,
)
from pdmesh.engine.cuda_graphs import graph_batch_sizes
from pdmesh.engine.model_runner import ModelRunner
from pdmesh.layers.attention import AttentionMetadata
from tests.engine.conftest import (
    EngineFactory,
    assert_all_pages_free,
    probe_overlap,
    run_all,
    tokens_of,
)
from tests.engine.test_engine_tiny import RANDOM_WORKLOADS, Workload, run_random_workload

GREEDY = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)


@dataclass
class Script:
    """Requests added and aborted before given step() calls."""

    adds: dict[int, list[tuple[str, list[int], SamplingParams]]] = field(default_factory=dict)
    aborts: dict[int, list[str]] = field(default_factory=dict)

    def add(self, step: int, rid: str, prompt: list[int], params: SamplingParams) -> None:
        self.adds.setdefault(step, []).append((rid, prompt, params))

    def abort(self, step: int, rid: str) -> None:
        self.aborts.setdefault(step, []).append(rid)

    @property
    def last_step(self) -> int:
        return max([*self.adds, *self.aborts, 0])


def drive(engine: LLMEngine, script: Script, max_steps: int = 1000) -> dict[str, list[tuple]]:
    """Run ``script``; every request's outputs as comparable tuples, in order."""
    outs: dict[str, list[tuple]] = {}
    for step in range(max_steps):
        for rid, prompt, params in script.adds.get(step, []):
            engine.add_request(rid, prompt, params)
        for rid in script.aborts.get(step, []):
            engine.abort(rid)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(_fields(o))
        if not engine.has_work and step >= script.last_step:
            return outs
    raise AssertionError("engine did not go idle")


def _fields(o: RequestOutput) -> tuple:
    logprobs = [(lp.token_id, lp.logprob, lp.top) for lp in o.new_logprobs]
    return (
        o.new_token_ids,
        logprobs,
        o.finished,
        o.finish_reason,
        o.error,
        o.num_prompt_tokens,
        o.num_completion_tokens,
    )


def _split(outs: dict[str, list[tuple]]) -> tuple[dict[str, list[tuple]], list[float]]:
    """Everything but the logprob values, and those values in order."""
    exact: dict[str, list[tuple]] = {}
    values: list[float] = []
    for rid in sorted(outs):
        for ids, logprobs, *rest in outs[rid]:
            shape = [(t, [k for k, _ in top]) for t, _, top in logprobs]
            values += [v for _, v, top in logprobs for v in [v, *(x for _, x in top)]]
            exact.setdefault(rid, []).append((ids, shape, *rest))
    return exact, values


def assert_same(got: dict[str, list[tuple]], expected: dict[str, list[tuple]]) -> None:
    # logprob values only close: the model's float32 logits of a row change in their last bits
    # with the batch around it, and the overlap batches one extra row for a request that
    # stopped a step earlier; token ids and every other field must be equal
    (got_exact, got_values), (exp_exact, exp_values) = _split(got), _split(expected)
    assert got_exact == exp_exact
    assert got_values == pytest.approx(exp_values, rel=1e-5, abs=1e-5)


def both(
    make: EngineFactory, script: Script, **config: object
) -> tuple[dict[str, list[tuple]], LLMEngine]:
    """Outputs with the overlap off and on (asserted equal); the overlap engine."""
    off = make(disable_overlap_schedule=True, **config)
    on = make(disable_overlap_schedule=False, **config)
    assert not off.overlap and on.overlap
    expected, got = drive(off, script), drive(on, script)
    assert_same(got, expected)
    assert_all_pages_free(off)
    assert_all_pages_free(on)
    return expected, on


def probe_stop_token(make: EngineFactory, prompt: list[int]) -> tuple[int, list[int]]:
    """A token greedy decoding of ``prompt`` reaches at its third step, and that output."""
    engine = make()
    engine.add_request("probe", prompt, GREEDY)
    first = tokens_of(run_all(engine)["probe"])
    assert first[2] not in first[:2], first
    return first[2], first


def test_defaults_and_flag() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not EngineConfig().overlap_schedule(cpu) and EngineConfig().overlap_schedule(cuda)
    assert EngineConfig(disable_overlap_schedule=False).overlap_schedule(cpu)
    assert not EngineConfig(disable_overlap_schedule=True).overlap_schedule(cuda)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_mixed_batches_match_without_overlap(
    make_tiny_engine: EngineFactory, prefix_cache: bool
) -> None:
    stop, _ = probe_stop_token(make_tiny_engine, [5, 6, 7])
    s = Script()
    s.add(0, "greedy", list(range(1, 30)), GREEDY)  # chunked: prefill beside decodes
    s.add(0, "stop", [5, 6, 7], SamplingParams(temperature=0, stop_token_ids=(stop,)))
    s.add(0, "one", [9, 8, 7], SamplingParams(temperature=0, max_new_tokens=1))
    s.add(
        0,
        "logprobs",
        [3, 1, 4, 1, 5],
        SamplingParams(temperature=0, max_new_tokens=7, logprobs=True, top_logprobs=3),
    )
    s.add(
        1,
        "seeded",
        [2, 7, 1, 8],
        SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11, max_new_tokens=9),
    )
    s.add(
        1,
        "min_p",
        [2, 7, 1, 8, 2, 8],
        SamplingParams(temperature=1.3, min_p=0.05, seed=5, max_new_tokens=6, logprobs=True),
    )
    s.add(
        2,
        "min_new",
        [5, 6, 7],
        SamplingParams(temperature=0, stop_token_ids=(stop,), min_new_tokens=4, max_new_tokens=9),
    )
    s.add(3, "aborted", list(range(40, 52)), SamplingParams(temperature=0, max_new_tokens=50))
    s.abort(8, "aborted")
    s.add(4, "shared", list(range(1, 30)) + [77], GREEDY)  # "greedy"'s prompt as a prefix
    s.add(5, "late_stop", [5, 6, 7], SamplingParams(temperature=0, stop_token_ids=(stop,)))
    outs, _ = both(make_tiny_engine, s, max_num_batched_tokens=16, enable_prefix_cache=prefix_cache)
    assert outs["stop"][-1][3] is FinishReason.STOP and len(outs["stop"]) == 3
    assert outs["one"] == [outs["one"][0]] and outs["one"][0][3] is FinishReason.LENGTH
    assert outs["aborted"][-1][3] is FinishReason.ABORT
    assert 0 < sum(len(o[0]) for o in outs["aborted"]) < 50
    assert sum(len(o[0]) for o in outs["min_new"]) >= 4
    assert all(len(o[1]) == 1 for o in outs["logprobs"])


def test_penalties_match_without_overlap(make_tiny_engine: EngineFactory) -> None:
    # a row with penalties needs the previous tokens on the host: its sampling waits for the
    # step before, but the step is scheduled and launched while that one is in flight
    s = Script()
    s.add(0, "plain", [1, 2, 3], GREEDY)
    s.add(
        0,
        "penalised",
        [1, 2, 3],
        SamplingParams(
            temperature=0, repetition_penalty=1.5, frequency_penalty=0.5, max_new_tokens=10
        ),
    )
    s.add(
        3,
        "presence",
        [4, 4, 4],
        SamplingParams(temperature=0.8, presence_penalty=1.0, seed=3, max_new_tokens=8),
    )
    expected, _ = both(make_tiny_engine, s)
    on = make_tiny_engine(disable_overlap_schedule=False)
    probe = probe_overlap(on)
    assert_same(drive(on, s), expected)
    # every schedule but the first (nothing in flight yet) is made while a step is in
    # flight; the penalised rows' 9 later tokens each sampled late
    assert probe.in_flight == probe.schedules - 1, probe
    assert probe.deferred >= 9, probe


def test_preemption_under_a_small_page_pool_matches(make_tiny_engine: EngineFactory) -> None:
    stop, _ = probe_stop_token(make_tiny_engine, [5, 6, 7])
    s = Script()
    for i in range(4):
        s.add(0, f"r{i}", [i + 1] * 6, SamplingParams(temperature=0, max_new_tokens=12))
    s.add(0, "stop", [5, 6, 7], SamplingParams(temperature=0, stop_token_ids=(stop,)))
    s.add(
        1,
        "seeded",
        [3, 3, 3],
        SamplingParams(temperature=1.0, seed=9, max_new_tokens=10, logprobs=True),
    )
    s.add(2, "aborted", [8] * 5, SamplingParams(temperature=0, max_new_tokens=30))
    s.abort(9, "aborted")
    _, on = both(make_tiny_engine, s, num_pages=14, page_size=2)
    assert on.load().num_preemptions > 0


def test_a_preempted_sequence_recomputes_its_placeholder(make_tiny_engine: EngineFactory) -> None:
    # preempted while its newest token is in flight and admitted again at once: the prefill
    # row reads that token from the device like a decode row does
    prompts = {"a": [1, 2, 3, 4, 5], "b": [6, 7, 8]}
    ref = make_tiny_engine()
    for rid, prompt in prompts.items():
        ref.add_request(rid, prompt, GREEDY)
    expected = {rid: tokens_of(outs) for rid, outs in run_all(ref).items()}
    engine = make_tiny_engine(disable_overlap_schedule=False, page_size=2)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY)
    got: dict[str, list[int]] = {}
    for _ in range(2):  # the prefill resolved, the first decode in flight
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    seq = engine._seqs["a"]
    assert seq.token_ids[-1] < 0  # a placeholder
    engine.scheduler._preempt(seq)  # what schedule() does when a decode finds no page
    for rid, outs in run_all(engine).items():
        got[rid] += tokens_of(outs)
    assert seq.num_preemptions == 1
    assert got == expected
    assert_all_pages_free(engine)


def test_outputs_come_one_step_later(make_tiny_engine: EngineFactory) -> None:
    engine = make_tiny_engine(disable_overlap_schedule=False)
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_new_tokens=3))
    assert engine.step() == []  # the prefill is in flight
    assert engine.has_work and not engine.stalled
    assert engine.load().num_running == 1
    firsts = [engine.step() for _ in range(3)]
    assert [len(o) for o in firsts] == [1, 1, 1] and firsts[-1][0].finished
    assert not engine.has_work
    assert_all_pages_free(engine)


def test_a_stop_mid_flight_drops_the_extra_token(make_tiny_engine: EngineFactory) -> None:
    stop, first = probe_stop_token(make_tiny_engine, [5, 6, 7])
    engine = make_tiny_engine(disable_overlap_schedule=False, page_size=2)
    engine.add_request("s", [5, 6, 7], SamplingParams(temperature=0, stop_token_ids=(stop,)))
    outs = run_all(engine)["s"]
    assert tokens_of(outs) == first[:3]
    assert outs[-1].finished and outs[-1].num_completion_tokens == 3
    assert sum(o.finished for o in outs) == 1
    assert_all_pages_free(engine)


def test_abort_in_flight_cuts_after_that_step(make_tiny_engine: EngineFactory) -> None:
    engine = make_tiny_engine(disable_overlap_schedule=False)
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_new_tokens=50))
    engine.step()
    engine.step()  # the first decode in flight, the prefill's token returned
    assert engine.abort("a")
    outs = run_all(engine)["a"]
    assert [len(o.new_token_ids) for o in outs] == [1, 0]  # the second token, then the abort
    assert outs[-1].finish_reason is FinishReason.ABORT and outs[-1].num_completion_tokens == 2
    assert_all_pages_free(engine)


def test_abort_of_a_prefill_only_request_in_flight_frees_its_pages(
    make_tiny_engine: EngineFactory,
) -> None:
    engine = make_tiny_engine(disable_overlap_schedule=False)
    engine.add_request("p", list(range(1, 20)), GREEDY, prefill_only=True)
    engine.step()
    assert engine.abort("p")  # it resolves to a held prefill, then the abort frees it
    outs = run_all(engine)["p"]
    assert outs[0].prefill_page_ids is not None and outs[-1].finish_reason is FinishReason.ABORT
    with pytest.raises(RequestNotFoundError):
        engine.release("p")
    assert_all_pages_free(engine)


def test_prefill_only_then_decode_elsewhere_with_overlap(make_tiny_engine: EngineFactory) -> None:
    prompt = list(range(1, 23))
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    ref = make_tiny_engine()
    ref.add_request("r", prompt, params)
    expected = tokens_of(run_all(ref)["r"])
    prefill = make_tiny_engine(page_size=4, disable_overlap_schedule=False)
    decode = make_tiny_engine(page_size=4, disable_overlap_schedule=False)
    prefill.add_request("r", prompt, params, prefill_only=True)
    (first,) = run_all(prefill)["r"]
    assert first.finished and first.prefill_page_ids is not None
    dst = decode.allocate_incoming("r", prompt, params)
    decode.write_pages(dst, prefill.read_pages(first.prefill_page_ids))
    prefill.release("r")
    out0 = decode.start_decode("r", first.new_token_ids[0])
    assert out0.new_token_ids + tokens_of(run_all(decode)["r"]) == expected
    assert_all_pages_free(prefill)
    assert_all_pages_free(decode)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(reqs=RANDOM_WORKLOADS, chunk=st.integers(1, 16))
def test_random_workload_with_overlap_frees_everything(
    make_tiny_engine: EngineFactory, reqs: Workload, chunk: int
) -> None:
    engine = make_tiny_engine(
        num_pages=24,
        page_size=2,
        max_num_batched_tokens=chunk,
        max_running_requests=4,
        disable_overlap_schedule=False,
    )
    run_random_workload(engine, reqs, late_release=True)


class EagerGraphs:
    """``DecodeGraphs``' interface, run eagerly on the CPU: the graph path's host side (rows
    padded to a captured size, ids from the previous step's device tokens) without a GPU."""

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner = runner
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.replays = 0

    def size_for(self, batch: int) -> int:
        return next(s for s in self.sizes if s >= batch)

    def fits(self, num_rows: int, table_width: int) -> bool:
        return 0 < num_rows <= self.max_batch

    def replay(
        self, rows: torch.Tensor, block_table: torch.Tensor, input_ids: torch.Tensor | None
    ) -> torch.Tensor:
        self.replays += 1
        b = block_table.shape[0]
        assert rows.shape == (4, self.size_for(b))
        assert (rows[2, b:] == -1).all() and (rows[3, b:] == 0).all()  # padding: no page
        ids, pos, slots, ctx = rows[:, :b]
        ids = ids if input_ids is None else input_ids
        assert (ids >= 0).all(), "a placeholder reached the model"
        r = self.runner
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decode=b,
            decode_slots=None,
            decode_mask=None,
            prefills=[],
            page_size=r.page_size,
            page_stride=r.page_stride,
        )
        r._decode_meta(meta, block_table, ctx, int(ctx.max()))
        return r.model.compute_logits(r.model(ids, pos, r.kv_cache, meta, r.rope))


def test_the_graph_path_inputs_match_the_eager_ones(make_tiny_engine: EngineFactory) -> None:
    stop, _ = probe_stop_token(make_tiny_engine, [5, 6, 7])
    s = Script()
    for i in range(5):
        s.add(i, f"g{i}", [i + 1] * (2 + 4 * i), GREEDY)
    s.add(1, "stop", [5, 6, 7], SamplingParams(temperature=0, stop_token_ids=(stop,)))
    s.add(2, "lp", [1, 2], SamplingParams(temperature=0, max_new_tokens=5, top_logprobs=2))
    s.add(3, "aborted", [8] * 9, SamplingParams(temperature=0, max_new_tokens=40))
    s.abort(9, "aborted")
    config = {"max_num_batched_tokens": 12, "page_size": 4}
    expected = drive(make_tiny_engine(**config), s)
    engine = make_tiny_engine(disable_overlap_schedule=False, **config)
    graphs = EagerGraphs(engine.runner, 8)
    engine.runner.graphs = graphs  # type: ignore[assignment]
    assert_same(drive(engine, s), expected)
    assert graphs.replays > 5
    assert_all_pages_free(engine)


def _cuda_pair(make: EngineFactory, **config: object) -> tuple[LLMEngine, LLMEngine]:
    """Overlap off and on, on CUDA, with the same weights (random init is per device)."""
    off = make(device="cuda", disable_overlap_schedule=True, **config)
    on = make(device="cuda", disable_overlap_schedule=False, **config)
    on.runner.model.load_state_dict(off.runner.model.state_dict())
    assert on.runner.graphs is not None and on.overlap and not off.overlap
    return off, on


@pytest.mark.gpu
def test_cuda_mixed_batches_match_without_overlap(make_tiny_engine: EngineFactory) -> None:
    # graphs, the device-side placeholders, pinned copies and events; float32 for exact ids
    off, on = _cuda_pair(
        make_tiny_engine, dtype="float32", max_num_batched_tokens=16, max_running_requests=16
    )
    probe = make_tiny_engine(device="cuda", dtype="float32", max_running_requests=16)
    probe.runner.model.load_state_dict(off.runner.model.state_dict())
    probe.add_request("probe", [5, 6, 7], GREEDY)
    stop = tokens_of(run_all(probe)["probe"])[2]
    s = Script()
    for i in range(6):
        s.add(i % 3, f"g{i}", [i + 1] * (3 + 5 * i), GREEDY)
    s.add(0, "stop", [5, 6, 7], SamplingParams(temperature=0, stop_token_ids=(stop,)))
    s.add(1, "one", [9, 8, 7], SamplingParams(temperature=0, max_new_tokens=1))
    s.add(
        1,
        "seeded",
        [2, 7, 1, 8],
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_new_tokens=9, top_logprobs=2),
    )
    s.add(2, "penalised", [1, 2, 3], SamplingParams(temperature=0, repetition_penalty=1.3))
    s.add(2, "aborted", list(range(40, 52)), SamplingParams(temperature=0, max_new_tokens=50))
    s.abort(7, "aborted")
    expected, got = drive(off, s), drive(on, s)
    assert_same(got, expected)
    assert_all_pages_free(off)
    assert_all_pages_free(on)


@pytest.mark.gpu
def test_cuda_bf16_large_batch_is_token_identical(make_tiny_engine: EngineFactory) -> None:
    # lengths known in advance and pages for all: the same batches either way, so bf16 gives
    # the same ids too
    off, on = _cuda_pair(make_tiny_engine, dtype="bfloat16", max_running_requests=64, num_pages=512)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (int(n),), generator=gen).tolist() for n in range(5, 69)]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    outs = []
    for engine in (off, on):
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        outs.append({rid: tokens_of(o) for rid, o in run_all(engine).items()})
        assert_all_pages_free(engine)
    assert outs[0] == outs[1]
