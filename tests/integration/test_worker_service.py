"""The worker (``python -m services.decode``) as a real process, called over real gRPC, with the
real default model. Outputs are checked against the in-process ``LLMEngine``."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdmesh.engine import EngineConfig, LLMEngine, SamplingParams
from pdmesh.rpc.errors import error_detail
from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.procs import REPO_ROOT, WORKER_ARGS, ServiceProc, start_service, worker_args

pytestmark = pytest.mark.model

SERVICE = "pdmesh.v1.WorkerService"
# "The capital of France is" in SmolLM2's vocabulary: a short prompt keeps CPU prefill cheap
PROMPT = [504, 3575, 282, 4649, 314]
MAX_MODEL_LEN = 2048
ReplyList = list[worker_pb2.GenerateResponse]


@pytest.fixture(scope="module")
def channel(worker_proc: ServiceProc) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(worker_proc.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> worker_pb2_grpc.WorkerServiceStub:
    return worker_pb2_grpc.WorkerServiceStub(channel)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    """The same engine in-process, configured like the worker."""
    return LLMEngine(
        EngineConfig(device="cpu", dtype="float32", num_pages=256, max_model_len=MAX_MODEL_LEN)
    )


_ids = iter(range(10**9))


def request(token_ids: list[int] = PROMPT, **params: Any) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        request_id=f"test-{next(_ids)}",
        token_ids=token_ids,
        sampling_params=common_pb2.SamplingParams(**params),
    )


def generate(stub: worker_pb2_grpc.WorkerServiceStub, **kw: Any) -> ReplyList:
    return list(stub.Generate(request(**kw), timeout=120))


def tokens(replies: ReplyList) -> list[int]:
    return [t for r in replies for t in r.token_ids]


def run_in_process(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[Any]:
    engine.add_request(f"local-{next(_ids)}", prompt, params)
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    return outputs


def wait_until_idle(stub: worker_pb2_grpc.WorkerServiceStub, within: float = 1.0) -> Any:
    """Poll GetLoad until nothing runs or waits and every page is free; fail after ``within``."""
    deadline = time.monotonic() + within
    while True:
        load = stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
        idle = load.num_running == load.num_waiting == 0
        if idle and load.num_free_pages == load.num_total_pages:
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"worker not idle {within}s after the request ended: {load}")
        time.sleep(0.02)


def invalid_argument(call: Callable[[], Any]) -> common_pb2.ErrorDetail:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    detail = error_detail(e.value)
    assert detail is not None and detail.reason, e.value.details()
    return detail


# ------------------------------------------------------------------------ generation


def test_greedy_matches_the_in_process_engine(
    stub: worker_pb2_grpc.WorkerServiceStub, engine: LLMEngine
) -> None:
    replies = generate(stub, temperature=0, max_new_tokens=12, logprobs=True)
    expected = run_in_process(
        engine, PROMPT, SamplingParams(temperature=0, max_new_tokens=12, logprobs=True)
    )
    assert tokens(replies) == [t for o in expected for t in o.new_token_ids]
    remote = [lp.logprob for r in replies for lp in r.logprobs]
    local = [lp.logprob for o in expected for lp in o.new_logprobs]
    assert remote == pytest.approx(local, abs=1e-4)


def test_usage_and_finish_reason_come_on_the_last_message(
    stub: worker_pb2_grpc.WorkerServiceStub,
) -> None:
    replies = generate(stub, temperature=0, max_new_tokens=6, ignore_eos=True)
    *streaming, last = replies
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in streaming)
    assert all(not r.HasField("usage") for r in streaming)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(PROMPT)
    assert last.usage.completion_tokens == len(tokens(replies)) == 6


def test_logprobs(stub: worker_pb2_grpc.WorkerServiceStub) -> None:
    replies = generate(stub, temperature=0, max_new_tokens=4, logprobs=True, top_logprobs=3)
    logprobs = [lp for r in replies for lp in r.logprobs]
    assert [lp.token_id for lp in logprobs] == tokens(replies)
    for lp in logprobs:
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.top[0].token_id == lp.token_id  # greedy picks the most likely
    plain = generate(stub, temperature=0, max_new_tokens=2)
    assert all(not r.logprobs for r in plain)  # unset: none


def test_unset_fields_take_the_engine_defaults(stub: worker_pb2_grpc.WorkerServiceStub) -> None:
    # unset max_new_tokens is the worker's --default-max-tokens (128 in WORKER_ARGS), not
    # proto3's 0 (test_default_max_tokens.py: the real default, the context's rest)
    long = generate(stub, temperature=0, ignore_eos=True)
    assert long[-1].usage.completion_tokens == 128
    # unset temperature is 1.0 (sampling), not proto3's 0 (greedy)
    unset = tokens(generate(stub, seed=7, max_new_tokens=8, ignore_eos=True))
    one = tokens(generate(stub, seed=7, temperature=1.0, max_new_tokens=8, ignore_eos=True))
    greedy = tokens(generate(stub, temperature=0, max_new_tokens=8, ignore_eos=True))
    assert unset == one
    assert unset != greedy


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_invalid_argument_and_the_worker_keeps_serving(
    stub: worker_pb2_grpc.WorkerServiceStub, worker_proc: ServiceProc
) -> None:
    cases: dict[str, Callable[[], Any]] = {
        "token_ids": lambda: generate(stub, token_ids=[]),
        "sampling_params.max_new_tokens": lambda: generate(stub, max_new_tokens=-1),
        "sampling_params.top_p": lambda: generate(stub, top_p=1.5),
        "sampling_params.temperature": lambda: generate(stub, temperature=-0.5),
        "sampling_params.top_logprobs": lambda: generate(stub, logprobs=True, top_logprobs=21),
        "sampling_params.stop_token_ids": lambda: generate(stub, stop_token_ids=[10**6]),
    }
    for field, call in cases.items():
        assert invalid_argument(call).field == field
    for bad_ids in ([5, 10**6], [5, -1]):  # unknown ids, either side of the vocabulary
        assert invalid_argument(lambda ids=bad_ids: generate(stub, token_ids=ids)).field == (
            "token_ids"
        )
    too_long = invalid_argument(lambda: generate(stub, token_ids=[5] * MAX_MODEL_LEN))
    assert too_long.field == "token_ids" and str(MAX_MODEL_LEN) in too_long.reason
    no_id = worker_pb2.GenerateRequest(token_ids=PROMPT)
    assert invalid_argument(lambda: list(stub.Generate(no_id, timeout=10))).field == "request_id"

    assert worker_proc.proc.poll() is None
    assert worker_proc.health(SERVICE) == health_pb2.HealthCheckResponse.SERVING
    assert len(tokens(generate(stub, temperature=0, max_new_tokens=2, ignore_eos=True))) == 2
    wait_until_idle(stub)


def test_a_request_id_in_use_is_refused_without_harming_the_live_request(
    stub: worker_pb2_grpc.WorkerServiceStub,
) -> None:
    live = request(temperature=0, max_new_tokens=30, ignore_eos=True)
    stream = stub.Generate(live, timeout=120)
    next(stream)
    duplicate = worker_pb2.GenerateRequest(request_id=live.request_id, token_ids=PROMPT)
    assert invalid_argument(lambda: list(stub.Generate(duplicate, timeout=10))).field == (
        "request_id"
    )
    rest = list(stream)  # the original runs to its end
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == 30


# ------------------------------------------------------------------------ cancel, abort


def test_cancel_mid_stream_frees_the_pages_within_a_second(
    stub: worker_pb2_grpc.WorkerServiceStub,
) -> None:
    stream = stub.Generate(request(max_new_tokens=500, ignore_eos=True), timeout=120)
    next(stream), next(stream)
    busy = stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
    assert busy.num_running == 1 and busy.num_free_pages < busy.num_total_pages
    stream.cancel()
    wait_until_idle(stub, within=1.0)


def test_abort_ends_the_stream(stub: worker_pb2_grpc.WorkerServiceStub) -> None:
    live = request(max_new_tokens=500, ignore_eos=True)
    stream = stub.Generate(live, timeout=120)
    next(stream)
    abort = worker_pb2.AbortRequest(request_id=live.request_id)
    assert stub.Abort(abort, timeout=5).found
    last = list(stream)[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_ABORT
    assert last.usage.completion_tokens < 500
    assert not stub.Abort(abort, timeout=5).found  # finished: nothing to abort
    wait_until_idle(stub)


# ------------------------------------------------------------------------ service plumbing


def test_model_info(stub: worker_pb2_grpc.WorkerServiceStub) -> None:
    info = stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=5)
    assert info.model_name == "smollm2-135m-instruct"
    assert info.vocab_size == 49152
    assert info.max_model_len == MAX_MODEL_LEN
    assert 2 in info.eos_token_ids  # <|im_end|>
    assert (info.page_size, info.device, info.dtype) == (16, "cpu", "float32")
    assert info.num_layers == 30 and info.num_kv_heads == 3 and info.head_dim == 64


def test_health_and_reflection(worker_proc: ServiceProc, channel: grpc.Channel) -> None:
    for name in ("", SERVICE):
        assert worker_proc.health(name) == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = reflect.ServerReflectionInfo(iter([listing]), timeout=5)
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_sigterm_lets_a_stream_in_flight_finish(tmp_path: Any) -> None:
    svc = start_service("services.decode", worker_args(), "worker-sigterm", log_dir=tmp_path)
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            stream = stub.Generate(request(max_new_tokens=40, ignore_eos=True), timeout=120)
            first = next(stream)
            svc.proc.send_signal(signal.SIGTERM)
            _wait_for_not_serving(svc)
            rest = list(stream)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(first.token_ids) + len(tokens(rest)) == 40
        assert svc.proc.wait(timeout=30) == 0, svc.log
    finally:
        svc.stop()
    assert "SIGTERM received" in svc.log


def _wait_for_not_serving(svc: ServiceProc) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if svc.health(SERVICE) != health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:  # already refusing new calls: draining too
            return
        time.sleep(0.05)
    raise AssertionError("still SERVING 10 s after SIGTERM")


def test_prefill_mode_points_to_the_prefill_service() -> None:
    argv = [sys.executable, "-m", "services.decode", "--mode", "prefill", *WORKER_ARGS]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "python -m services.prefill" in done.stderr
