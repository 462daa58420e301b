"""The router (``python -m services.router``) in front of a real tokenizer and real workers, all
separate processes on loopback ports, with the real default model. Expected outputs come from
calling the worker and the tokenizer directly."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdmesh.rpc.errors import error_detail
from pdmesh.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.integration.procs import ServiceProc, free_port, start_service, worker_args

pytestmark = pytest.mark.model

SERVICE = "pdmesh.v1.RouterService"
TEXT = "The capital of France is"
CHAT = common_pb2.ChatRequest(
    messages=[common_pb2.ChatMessage(role="user", content="Name three colors.")]
)
Replies = list[router_pb2.RouterGenerateResponse]


@pytest.fixture(scope="module")
def router(router_proc: ServiceProc) -> Iterator[router_pb2_grpc.RouterServiceStub]:
    with grpc.insecure_channel(router_proc.address) as channel:
        yield router_pb2_grpc.RouterServiceStub(channel)


@pytest.fixture(scope="module")
def worker(worker_proc: ServiceProc) -> Iterator[worker_pb2_grpc.WorkerServiceStub]:
    with grpc.insecure_channel(worker_proc.address) as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_proc: ServiceProc) -> Iterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    with grpc.insecure_channel(tokenizer_proc.address) as channel:
        yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)


def params(**kw: Any) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**kw)


def generate(
    router: router_pb2_grpc.RouterServiceStub, sampling: common_pb2.SamplingParams, **input: Any
) -> Replies:
    request = router_pb2.RouterGenerateRequest(sampling_params=sampling, **input)
    return list(router.Generate(request, timeout=120))


def generate_at(address: str, sampling: common_pb2.SamplingParams, **input: Any) -> Replies:
    """``generate`` through the router at ``address`` (a router of the test's own)."""
    with grpc.insecure_channel(address) as channel:
        return generate(router_pb2_grpc.RouterServiceStub(channel), sampling, **input)


def text_of(replies: Replies) -> str:
    return "".join(r.text for r in replies)


def tokens_of(replies: Any) -> list[int]:
    return [t for r in replies for t in r.token_ids]


def worker_tokens(
    worker: worker_pb2_grpc.WorkerServiceStub,
    prompt: list[int],
    sampling: common_pb2.SamplingParams,
) -> list[int]:
    request = worker_pb2.GenerateRequest(
        request_id=f"direct-{time.monotonic_ns()}", token_ids=prompt, sampling_params=sampling
    )
    return tokens_of(worker.Generate(request, timeout=120))


def detokenize(tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub, ids: list[int]) -> str:
    return tokenizer.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=ids), timeout=10).text


def wait_until_idle(worker: worker_pb2_grpc.WorkerServiceStub, within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while True:
        load = worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
        if load.num_running == load.num_waiting == 0 and (
            load.num_free_pages == load.num_total_pages
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"worker not idle {within}s after the request ended: {load}")
        time.sleep(0.02)


def failure(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


# ------------------------------------------------------------------------ generation


def test_text_token_ids_and_chat_give_the_workers_greedy_text(
    router: router_pb2_grpc.RouterServiceStub,
    worker: worker_pb2_grpc.WorkerServiceStub,
    tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub,
    worker_proc: ServiceProc,
) -> None:
    sampling = params(temperature=0, max_new_tokens=10)
    text_ids = list(tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text=TEXT)).token_ids)
    chat_ids = list(
        tokenizer.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(chat=CHAT)).token_ids
    )
    inputs: list[tuple[dict[str, Any], list[int]]] = [
        ({"text": TEXT}, text_ids),
        ({"token_ids": router_pb2.TokenIds(ids=text_ids)}, text_ids),
        ({"chat": CHAT}, chat_ids),
    ]
    for input, prompt in inputs:
        replies = generate(router, sampling, **input)
        expected = worker_tokens(worker, prompt, sampling)
        assert tokens_of(replies) == expected, input
        assert text_of(replies) == detokenize(tokenizer, expected), input
        last = replies[-1]
        assert last.finish_reason in (
            common_pb2.FINISH_REASON_LENGTH,
            common_pb2.FINISH_REASON_STOP,
        )
        assert last.usage.prompt_tokens == len(prompt)
        assert last.usage.completion_tokens == len(expected)
        assert {r.worker_id for r in replies} == {worker_proc.address}


def test_logprobs_pass_through(router: router_pb2_grpc.RouterServiceStub) -> None:
    replies = generate(
        router, params(temperature=0, max_new_tokens=4, logprobs=True, top_logprobs=2), text=TEXT
    )
    logprobs = [lp for r in replies for lp in r.logprobs]
    assert [lp.token_id for lp in logprobs] == tokens_of(replies)
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in logprobs)


def test_a_stop_string_ends_the_text_and_the_worker_request(
    router: router_pb2_grpc.RouterServiceStub, worker: worker_pb2_grpc.WorkerServiceStub
) -> None:
    max_tokens = 24
    full = text_of(generate(router, params(temperature=0, max_new_tokens=max_tokens), text=TEXT))
    words = [w for w in full.split() if len(w) >= 3]
    stop = words[len(words) // 2]  # a word from the middle of the greedy answer
    replies = generate(
        router, params(temperature=0, max_new_tokens=max_tokens, stop=[stop]), text=TEXT
    )
    assert text_of(replies) == full[: full.index(stop)]
    last = replies[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert last.matched_stop == stop
    assert len(tokens_of(replies)) == last.usage.completion_tokens < max_tokens
    wait_until_idle(worker)  # the worker's request was aborted, its pages freed


def test_cancel_through_the_router_frees_the_workers_pages(
    router: router_pb2_grpc.RouterServiceStub, worker: worker_pb2_grpc.WorkerServiceStub
) -> None:
    request = router_pb2.RouterGenerateRequest(
        text=TEXT, sampling_params=params(max_new_tokens=500, ignore_eos=True)
    )
    stream = router.Generate(request, timeout=120)
    next(stream), next(stream)
    busy = worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
    assert busy.num_running == 1
    stream.cancel()
    wait_until_idle(worker, within=1.0)


# ------------------------------------------------------------------------ the worker set


def test_round_robin_over_an_added_worker(
    router: router_pb2_grpc.RouterServiceStub,
    worker_proc: ServiceProc,
    tmp_path: Path,
) -> None:
    with start_service("services.decode", worker_args(), "worker-2", log_dir=tmp_path) as second:
        added = router.AddWorker(
            router_pb2.AddWorkerRequest(address=second.address, id="w2"), timeout=10
        ).worker
        try:
            assert (added.id, added.address, added.healthy) == ("w2", second.address, True)
            assert added.role == router_pb2.WORKER_ROLE_AGGREGATED
            assert added.model_name == "smollm2-135m-instruct"
            listed = router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5).workers
            assert {w.id for w in listed} == {worker_proc.address, "w2"}

            sampling = params(temperature=0, max_new_tokens=1)
            used = [generate(router, sampling, text=TEXT)[-1].worker_id for _ in range(4)]
            assert sorted(used) == sorted([worker_proc.address, "w2"] * 2)
            assert all(a != b for a, b in zip(used, used[1:])), used  # they alternate

            duplicate = failure(
                lambda: router.AddWorker(
                    router_pb2.AddWorkerRequest(address=second.address), timeout=10
                )
            )
            assert duplicate.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            removed = router.RemoveWorker(router_pb2.RemoveWorkerRequest(id="w2"), timeout=5)
        assert removed.found
        listed = router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5).workers
        assert [w.id for w in listed] == [worker_proc.address]
        used = [generate(router, sampling, text=TEXT)[-1].worker_id for _ in range(2)]
        assert used == [worker_proc.address] * 2
        gone = router.RemoveWorker(router_pb2.RemoveWorkerRequest(address=second.address))
        assert not gone.found


def test_an_unreachable_worker_is_unavailable_naming_it(
    tokenizer_proc: ServiceProc, worker_proc: ServiceProc, tmp_path: Path
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    sampling = params(temperature=0, max_new_tokens=2)
    only_dead = ["--workers", dead, "--tokenizer", tokenizer_proc.address]
    with start_service("services.router", only_dead, "router-dead", log_dir=tmp_path) as svc:
        error = failure(lambda: generate_at(svc.address, sampling, text=TEXT))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert dead in (error.details() or "")

    # with a live worker beside it, a request that found the dead one first goes to the other
    both = ["--workers", f"{dead},{worker_proc.address}", "--tokenizer", tokenizer_proc.address]
    with start_service("services.router", both, "router-mixed", log_dir=tmp_path) as svc:
        used = [generate_at(svc.address, sampling, text=TEXT)[-1].worker_id for _ in range(3)]
    assert used == [worker_proc.address] * 3


# ------------------------------------------------------------------------ errors, plumbing


def test_invalid_arguments_pass_through_and_the_router_keeps_serving(
    router: router_pb2_grpc.RouterServiceStub, router_proc: ServiceProc
) -> None:
    ok = params(max_new_tokens=2)
    cases: dict[str, Callable[[], Any]] = {
        # the worker's checks, passed through with their ErrorDetail
        "sampling_params.top_p": lambda: generate(router, params(top_p=2), text=TEXT),
        "sampling_params.max_new_tokens": lambda: generate(
            router, params(max_new_tokens=-1), text=TEXT
        ),
        "token_ids": lambda: generate(router, ok, token_ids=router_pb2.TokenIds(ids=[5, 10**6])),
        # the tokenizer's
        "messages[0].role": lambda: generate(
            router, ok, chat=common_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="x")])
        ),
        # the router's own
        "input": lambda: generate(router, ok),
        "text": lambda: generate(router, ok, text=""),
        "sampling_params.stop[1]": lambda: generate(router, params(stop=["a", ""]), text=TEXT),
    }
    for field, call in cases.items():
        error = failure(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.details())
        detail = error_detail(error)
        assert detail is not None and detail.field == field, (field, error.details())
        assert field in (error.details() or "")

    assert router_proc.proc.poll() is None
    assert (
        len(tokens_of(generate(router, params(max_new_tokens=2, ignore_eos=True), text=TEXT))) == 2
    )


def test_health_and_reflection(router_proc: ServiceProc) -> None:
    for name in ("", SERVICE):
        assert router_proc.health(name) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(router_proc.address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = reflect.ServerReflectionInfo(iter([listing]), timeout=5)
    assert {SERVICE, "grpc.health.v1.Health"} <= {
        s.name for s in reply.list_services_response.service
    }
