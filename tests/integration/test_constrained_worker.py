"""Constrained decoding over real gRPC: a worker refuses a bad grammar with INVALID_ARGUMENT
naming the field (Generate and Stream, nothing held after), and a constrained greedy request
gives the same tokens aggregated and disaggregated (a prefill and a decode process with real
Mooncake: the prefill samples the first token under the grammar, the decode's matcher starts
from it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import jsonschema
import pytest

from pdmesh.models import loader
from pdmesh.rpc.errors import error_detail
from pdmesh.tokenizer.tokenizer import Tokenizer
from pdmesh.v1 import common_pb2, worker_pb2
from tests.integration.procs import ServiceProc
from tests.integration.test_pd import (
    Worker,
    decode_args,
    ok,
    prefill_args,
    send_pair,
    start_all,
    tokens_of,
    wait_idle,
)

pytestmark = pytest.mark.model

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["big", "old", "coastal"]}, "maxItems": 3},
    },
    "required": ["city", "population", "tags"],
    "additionalProperties": False,
}
QUESTIONS = ["Describe Paris as JSON.", "Tell me about a city you like, as JSON."]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    path = loader.resolve(loader.DEFAULT_MODEL).path
    assert path is not None
    return Tokenizer.from_dir(path)


def chat(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )


@pytest.fixture(scope="module")
def aggregated(worker_proc: ServiceProc) -> Iterator[Worker]:
    worker = Worker.of(worker_proc)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Worker]]:
    log_dir = tmp_path_factory.mktemp("constrained-pd")
    procs = start_all(
        [
            ("services.prefill", prefill_args("mooncake"), "prefill-constrained"),
            ("services.decode", decode_args("mooncake"), "decode-constrained"),
        ],
        log_dir,
    )
    workers = [Worker.of(p) for p in procs]
    try:
        yield workers[0], workers[1]
    finally:
        for w in workers:
            w.close()
        for p in procs:
            p.stop_and_check()


def params(**kw: Any) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_new_tokens=64, **kw)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"json_schema": '{"type": "integer", "minimum": "x"}'}, "sampling_params.json_schema"),
        ({"regex": "[a-"}, "sampling_params.regex"),
        ({"ebnf": "root ::= missing"}, "sampling_params.ebnf"),
        ({"regex": "a", "json_schema": "{}"}, "sampling_params.regex"),
        ({"logit_bias": {10**6: 1.0}}, "sampling_params.logit_bias"),
    ],
)
def test_a_bad_constraint_is_invalid_argument_naming_the_field(
    aggregated: Worker, tok: Tokenizer, kw: dict[str, Any], field: str
) -> None:
    request = worker_pb2.GenerateRequest(
        request_id=f"bad-{field}", token_ids=chat(tok, "Hi"), sampling_params=params(**kw)
    )
    with pytest.raises(grpc.RpcError) as e:
        list(aggregated.stub.Generate(request, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    detail = error_detail(e.value)
    assert detail is not None and detail.field == field, detail
    # the same over the worker's Stream: the request's status names it too
    message = worker_pb2.WorkerStreamRequest(generate=request)
    (reply,) = [
        r for batch in aggregated.stub.Stream(iter([message]), timeout=30) for r in batch.outputs
    ]
    assert reply.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.status.detail.field == field
    wait_idle(aggregated, within=3.0)


def test_disaggregated_constrained_output_equals_aggregated(
    aggregated: Worker, pair: tuple[Worker, Worker], tok: Tokenizer
) -> None:
    prefill, decode = pair
    kw = {"temperature": 0.0, "max_new_tokens": 64, "json_schema": json.dumps(SCHEMA)}
    for question in QUESTIONS:
        prompt = chat(tok, question)
        request = worker_pb2.GenerateRequest(
            request_id=f"agg-{question}",
            token_ids=prompt,
            sampling_params=common_pb2.SamplingParams(**kw),
        )
        agg = list(aggregated.stub.Generate(request, timeout=60))
        call = send_pair(prefill, decode, prompt, **kw)
        disagg = ok(call.d_result.result(timeout=90))
        ok(call.p_result.result(timeout=90))
        assert tokens_of(disagg) == tokens_of(agg)
        assert disagg[-1].finish_reason == common_pb2.FINISH_REASON_STOP
        jsonschema.validate(json.loads(tok.decode(tokens_of(disagg))), SCHEMA)
    for w in (prefill, decode):
        wait_idle(w, within=3.0)
