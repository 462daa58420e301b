"""A request that sets no max_new_tokens (OpenAI's max_tokens omitted) generates what is left of
the context length, as OpenAI and vLLM do, unless the worker's --default-max-tokens caps it;
a migrated request's earlier output counts against that cap. Real worker processes over gRPC."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.procs import ServiceProc, start_service

pytestmark = pytest.mark.model

CONTEXT = 40  # --max-model-len: small, so the default runs to it quickly on CPU
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


def worker(tmp_path_factory: pytest.TempPathFactory, *flags: str) -> ServiceProc:
    args = ["--device", "cpu", "--num-pages", "32", "--max-model-len", str(CONTEXT), *flags]
    return start_service(
        "services.decode",
        [*args, "--grace-period", "2"],
        "worker-default-max",
        log_dir=tmp_path_factory.mktemp("worker-default-max"),
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    svc = worker(tmp_path_factory)
    yield svc
    svc.stop_and_check()


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    svc = worker(tmp_path_factory, "--default-max-tokens", "6")
    yield svc
    svc.stop_and_check()


def last(svc: ServiceProc, request_id: str, **fields: object) -> worker_pb2.GenerateResponse:
    request = worker_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=PROMPT,
        sampling_params=common_pb2.SamplingParams(temperature=0, ignore_eos=True),
        **fields,  # type: ignore[arg-type]
    )
    with grpc.insecure_channel(svc.address) as channel:
        replies = list(worker_pb2_grpc.WorkerServiceStub(channel).Generate(request, timeout=120))
    return replies[-1]


def test_unset_max_new_tokens_runs_to_the_context_length(plain: ServiceProc) -> None:
    end = last(plain, "to-the-end")
    assert end.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert end.usage.prompt_tokens == len(PROMPT)
    assert end.usage.completion_tokens == CONTEXT - len(PROMPT)


def test_default_max_tokens_caps_and_counts_resumed_output(capped: ServiceProc) -> None:
    end = last(capped, "capped")
    assert (end.finish_reason, end.usage.completion_tokens) == (
        common_pb2.FINISH_REASON_LENGTH,
        6,
    )
    # migrated: the last 2 prompt tokens were this request's output on another worker
    moved = last(capped, "capped-moved", resumed_output_tokens=2)
    assert moved.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert moved.usage.completion_tokens == 6 - 2
