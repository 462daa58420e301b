"""gRPC fuzzing of every pdmesh service (calls from ``fuzz_grpc``, bytes from ``fuzz_proto``):
the tokenizer, a router, an aggregated worker's WorkerService and SGLang scheduler service, and
a prefill worker's WorkerService, SGLang service and bootstrap server, each a real process.

Requests reach the servers as generated: truncated and corrupted messages, integers past their
field's width, unknown enum values, invalid UTF-8, huge fields. A client error must come back
as a client-error status (INVALID_ARGUMENT, NOT_FOUND, ...), never INTERNAL / UNKNOWN /
UNAVAILABLE; a reply must parse and never report FINISH_REASON_ERROR; every service must keep
answering its health check; and afterwards no worker may hold a page, a request or a bootstrap
room, and the router's worker set must be what it was. Bugs these found are pinned by the
``test_*_regression`` tests below.

Generations stay tiny (tame ``max_new_tokens`` <= 2) and the prefill's bootstrap rooms time out
in 0.2 s, so the default run (``fuzzing.EXAMPLES`` inputs per API) takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from pdmesh.rpc.errors import error_detail
from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.sglang import sglang_scheduler_pb2_grpc
from pdmesh.tokenizer.stop_strings import MAX_STOP_CHARS
from pdmesh.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.integration.fuzz_grpc import (
    CHANNEL_OPTIONS,
    SERVICES,
    Method,
    ModelFacts,
    calls,
    detokenize_streams,
    methods,
    send,
    tame_hints,
)
from tests.integration.fuzz_proto import SAFE_ADDRESS, MessageFuzz
from tests.integration.fuzzing import EXAMPLES, Outcome, fuzz
from tests.integration.procs import ServiceProc, start_service, worker_args
from tests.integration.test_pd import Worker, wait_idle

pytestmark = pytest.mark.model

BOOTSTRAP_TIMEOUT_S = 0.2  # the fuzz prefill's rooms: the decode half never comes
# a cancelled request stops at the engine's next step: up to a long prompt's prefill chunk
IDLE_WITHIN_S = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING


# -- the run -------------------------------------------------------------------------------------


def fuzz_api(
    api: str,
    address: str,
    api_methods: list[Method],
    procs: Sequence[ServiceProc],
    also_serving: Sequence[str] = (),
) -> None:
    """Send ``fuzzing.EXAMPLES`` calls drawn from ``api_methods`` to ``address``; each of
    ``procs`` (and the gRPC servers at ``also_serving``) must stay up and SERVING, and no
    server error may come back."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:

        def alive() -> None:
            for proc in procs:
                assert proc.proc.poll() is None, f"{proc.name} died:\n{proc.log[-3000:]}"
                assert proc.health() == SERVING, f"{proc.name} is not SERVING"
            for other in also_serving:
                with grpc.insecure_channel(other) as ch:
                    reply = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=5
                    )
                assert reply.status == SERVING, f"{other} is not SERVING"

        tally = fuzz(api, calls(api_methods), lambda c: send(channel, *c), alive)
    tally.check(minimum=EXAMPLES * 9 // 10)


# -- processes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facts(worker_proc: ServiceProc) -> ModelFacts:
    with grpc.insecure_channel(worker_proc.address) as channel:
        info = worker_pb2_grpc.WorkerServiceStub(channel).GetModelInfo(
            worker_pb2.GetModelInfoRequest(), timeout=10
        )
    return ModelFacts(
        info.vocab_size, info.num_layers, info.page_size, info.num_kv_heads, info.head_dim,
        info.dtype,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_router(
    tokenizer_proc: ServiceProc,
    worker_proc: ServiceProc,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProc]:
    """A router of its own: AddWorker / RemoveWorker fuzzing must not touch the session's."""
    args = ["--workers", worker_proc.address, "--tokenizer", tokenizer_proc.address]
    log_dir = tmp_path_factory.mktemp("fuzz-router")
    svc = start_service(
        "services.router", [*args, "--grace-period", "2"], "fuzz-router", log_dir=log_dir
    )
    yield svc
    svc.stop_and_check()


@pytest.fixture(scope="module")
def prefill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    args = worker_args(
        "--bootstrap-port", "0", "--bootstrap-timeout", str(BOOTSTRAP_TIMEOUT_S),
        "--num-pages", "64",
    )  # fmt: skip
    log_dir = tmp_path_factory.mktemp("fuzz-prefill")
    svc = start_service("services.prefill", args, "fuzz-prefill", log_dir=log_dir)
    worker = Worker.of(svc)
    yield worker
    worker.close()
    svc.stop_and_check()


def idle_worker(proc: ServiceProc) -> None:
    """No request, page or room left on the worker (rooms end within their timeout)."""
    worker = Worker.of(proc)
    try:
        wait_idle(worker, within=IDLE_WITHIN_S)
    except AssertionError as e:
        tail = "\n".join(proc.log.splitlines()[-40:])
        raise AssertionError(f"{e}\nits log ends:\n{tail}") from None
    finally:
        worker.close()


# -- the fuzz runs ------------------------------------------------------------------------------


def test_fuzz_tokenizer(tokenizer_proc: ServiceProc, facts: ModelFacts) -> None:
    hints = tame_hints(facts)
    service = SERVICES["pdmesh.v1.TokenizerService"]
    streams = {"DetokenizeStream": detokenize_streams(hints)}
    fuzz_api(
        "tokenizer",
        tokenizer_proc.address,
        methods(service, hints, streams=streams),
        [tokenizer_proc],
    )


def test_fuzz_router(
    fuzz_router: ServiceProc,
    tokenizer_proc: ServiceProc,
    worker_proc: ServiceProc,
    facts: ModelFacts,
) -> None:
    service = SERVICES["pdmesh.v1.RouterService"]
    procs = [fuzz_router, tokenizer_proc, worker_proc]
    fuzz_api("router", fuzz_router.address, methods(service, tame_hints(facts)), procs)
    idle_worker(worker_proc)
    # workers the fuzzer added are removed again; the real one stayed
    with grpc.insecure_channel(fuzz_router.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        listed = stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=10).workers
        for w in listed:
            if w.address != worker_proc.address:
                stub.RemoveWorker(router_pb2.RemoveWorkerRequest(id=w.id), timeout=10)
        listed = stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=10).workers
    assert [w.address for w in listed] == [worker_proc.address]


def test_fuzz_worker(worker_proc: ServiceProc, facts: ModelFacts) -> None:
    service = SERVICES["pdmesh.v1.WorkerService"]
    fuzz_api("worker", worker_proc.address, methods(service, tame_hints(facts)), [worker_proc])
    idle_worker(worker_proc)


def test_fuzz_sglang_scheduler(worker_proc: ServiceProc, facts: ModelFacts) -> None:
    service = SERVICES["sglang.grpc.scheduler.SglangScheduler"]
    required = frozenset({"sglang.grpc.scheduler.GenerateRequest.tokenized"})
    fuzz_api(
        "sglang", worker_proc.address, methods(service, tame_hints(facts), required), [worker_proc]
    )
    idle_worker(worker_proc)


def test_fuzz_prefill_worker(prefill: Worker, facts: ModelFacts) -> None:
    """The prefill's WorkerService and SGLang service: tame requests carry a bootstrap room
    (whose decode half never comes: the room times out and frees its pages)."""
    hints = tame_hints(facts)
    hints["pdmesh.v1.GenerateRequest.disagg"] = MessageFuzz(
        worker_pb2.DisaggParams.DESCRIPTOR,
        {"pdmesh.v1.DisaggParams.bootstrap_address": st.just(SAFE_ADDRESS)},
    ).tame()
    required = frozenset({"pdmesh.v1.GenerateRequest.disagg"})
    worker_service = SERVICES["pdmesh.v1.WorkerService"]
    sglang_service = SERVICES["sglang.grpc.scheduler.SglangScheduler"]
    sglang_hints = {
        **hints,
        "sglang.grpc.scheduler.GenerateRequest.disaggregated_params": (
            MessageFuzz(
                sgl.DisaggregatedParams.DESCRIPTOR,
                {
                    "sglang.grpc.scheduler.DisaggregatedParams.bootstrap_host": st.just(
                        "127.0.0.1"
                    ),
                },
            ).tame()
        ),
    }
    api_methods = methods(worker_service, hints, required) + methods(sglang_service, sglang_hints)
    fuzz_api("prefill", prefill.proc.address, api_methods, [prefill.proc])
    idle_worker(prefill.proc)


def test_fuzz_bootstrap(prefill: Worker, facts: ModelFacts) -> None:
    service = SERVICES["pdmesh.v1.BootstrapService"]
    api_methods = methods(service, tame_hints(facts))
    fuzz_api("bootstrap", prefill.bootstrap, api_methods, [prefill.proc], [prefill.bootstrap])
    idle_worker(prefill.proc)


# -- regressions: what the fuzzers found ---------------------------------------------------------


def _invalid_argument(call: Callable[[], Any]) -> str:
    """Run ``call``; it must fail with INVALID_ARGUMENT; the field its ErrorDetail names."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    detail = error_detail(e.value)
    assert detail is not None, e.value.details()
    return detail.field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.tokenized.input_ids.append(2**31 + 5), "tokenized.input_ids"),
        (lambda r: setattr(r.sampling_params, "max_new_tokens", 2**31), "sampling_params.max_new_tokens"),
        (lambda r: setattr(r.sampling_params, "min_new_tokens", 2**32 - 1), "sampling_params.min_new_tokens"),
        (lambda r: r.sampling_params.stop_token_ids.append(2**32 - 1), "sampling_params.stop_token_ids"),
    ],
    ids=["input_ids", "max_new_tokens", "min_new_tokens", "stop_token_ids"],
)  # fmt: skip
def test_sglang_uint32_past_int32_regression(
    worker_proc: ServiceProc, change: Callable[[Any], None], field: str
) -> None:
    """SGLang's uint32 ids and counts past pdmesh's int32 were INTERNAL (a ValueError building
    the pdmesh message); now INVALID_ARGUMENT naming the SGLang field."""
    request = sgl.GenerateRequest(
        request_id="uint32",
        tokenized=sgl.TokenizedInput(input_ids=[1, 2]),
        sampling_params=sgl.SamplingParams(max_new_tokens=1),
    )
    change(request)
    with grpc.insecure_channel(worker_proc.address) as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        assert _invalid_argument(lambda: list(stub.Generate(request, timeout=10))) == field
    idle_worker(worker_proc)


def _chat(**fields: Any) -> tokenizer_pb2.ApplyChatTemplateRequest:
    hello = common_pb2.ChatMessage(role="user", content="hi")
    messages = fields.pop("messages", [hello])
    return tokenizer_pb2.ApplyChatTemplateRequest(
        chat=common_pb2.ChatRequest(messages=messages, **fields)
    )


def test_tokenizer_deeply_nested_json_regression(tokenizer_proc: ServiceProc) -> None:
    """JSON nested past Python's parser in a string field was INTERNAL (RecursionError); now
    INVALID_ARGUMENT naming the field; in tool-call arguments (parsed only when they are a
    JSON object) it stays text, as other unparseable arguments do."""
    deep = "[" * 5000 + "]" * 5000
    with grpc.insecure_channel(tokenizer_proc.address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        field = _invalid_argument(
            lambda: stub.ApplyChatTemplate(_chat(tools_json=deep), timeout=10)
        )
        assert field == "chat.tools_json"
        kwargs = '{"a": ' + deep + "}"
        request = _chat(template_kwargs_json=kwargs)
        field = _invalid_argument(lambda: stub.ApplyChatTemplate(request, timeout=10))
        assert field == "chat.template_kwargs_json"
        call = '[{"id": "1", "type": "function", "function": {"name": "f", "arguments": "%s"}}]'
        assistant = common_pb2.ChatMessage(
            role="assistant", content="", tool_calls_json=call % deep
        )
        user = common_pb2.ChatMessage(role="user", content="and?")
        reply = stub.ApplyChatTemplate(_chat(messages=[assistant, user]), timeout=10)
        assert reply.token_ids and "and?" in reply.text


def test_undecodable_request_regression(
    tokenizer_proc: ServiceProc, worker_proc: ServiceProc, prefill: Worker
) -> None:
    """Bytes that do not parse as the request message were UNKNOWN (grpc's answer to a
    deserializer that raises); now INVALID_ARGUMENT on every service, unary or streamed."""
    cut_short = b"\x0a\x05ab"  # a string field whose bytes end early
    bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 is a string in each request below
    calls = [
        (tokenizer_proc.address, "/pdmesh.v1.TokenizerService/Tokenize"),
        (tokenizer_proc.address, "/pdmesh.v1.TokenizerService/DetokenizeStream"),
        (worker_proc.address, "/pdmesh.v1.WorkerService/Generate"),
        (worker_proc.address, "/sglang.grpc.scheduler.SglangScheduler/Generate"),
        (prefill.bootstrap, "/pdmesh.v1.BootstrapService/RegisterDecode"),
    ]
    for address, path in calls:
        service = SERVICES[path.split("/")[1]]
        method = next(m for m in methods(service, {}) if m.path == path)
        with grpc.insecure_channel(address) as channel:
            for raw in (cut_short, bad_utf8):
                payload = [raw] if method.client_streaming else raw
                assert send(channel, method, payload) == Outcome("INVALID_ARGUMENT"), path


def test_long_stop_strings_regression(
    tokenizer_proc: ServiceProc, fuzz_router: ServiceProc
) -> None:
    """A stop string's prefix set grew with the square of its length: a 100k-character one
    held the tokenizer's event loop (every other call with it) for minutes. Now stop strings
    are at most MAX_STOP_CHARS long: INVALID_ARGUMENT at once, from the tokenizer and, before
    any worker starts, from the router."""
    long_stop = "世" * (MAX_STOP_CHARS + 1)
    options = tokenizer_pb2.DetokenizeStreamOptions(stop=["ok", long_stop])
    first = tokenizer_pb2.DetokenizeStreamRequest(options=options)
    with grpc.insecure_channel(tokenizer_proc.address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        field = _invalid_argument(lambda: list(stub.DetokenizeStream(iter([first]), timeout=10)))
    assert field == "stop[1]"
    request = router_pb2.RouterGenerateRequest(
        text="hi", sampling_params=common_pb2.SamplingParams(max_new_tokens=1, stop=[long_stop])
    )
    with grpc.insecure_channel(fuzz_router.address) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        field = _invalid_argument(lambda: list(router.Generate(request, timeout=10)))
    assert field == "sampling_params.stop[0]"
