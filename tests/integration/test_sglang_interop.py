"""Interop with SGLang over its scheduler gRPC protocol, with real processes: SGLang's own gateway
(``smg`` 1.13.0 from PyPI) in front of pdmesh workers, in gRPC mode and in PD mode, and pdmesh's
router driving workers registered as ``sglang-grpc`` (pdmesh workers answering SGLang's protocol
stand in for SGLang engines). Greedy outputs are compared with pdmesh's own gateway and router
over the same model; the servicer's contract (info RPCs, errors, cancel, the proto3 zero
defaults) is checked by calling it directly.
"""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from pdmesh.models.fetch import ensure_default_model
from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.sglang import sglang_scheduler_pb2_grpc, smg_common_pb2
from pdmesh.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from tests.integration.procs import ServiceProc, start_service, worker_args
from tests.integration.smg_proc import start_smg
from tests.integration.test_gateway import start_gateway
from tests.integration.test_pd import Worker, decode_args, prefill_args, start_all, wait_idle

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
PROMPTS = ["What is 2+2?", "Name three colors.", "Say hello in one short sentence."]
MAX_TOKENS = 12
CALL_TIMEOUT_S = 60.0


@dataclass
class Workers:
    a: Worker  # the session's aggregated worker
    b: Worker  # a second aggregated worker
    prefill: Worker
    decode: Worker


@pytest.fixture(scope="module")
def workers(
    tmp_path_factory: pytest.TempPathFactory, worker_proc: ServiceProc
) -> Iterator[Workers]:
    procs = start_all(
        [
            ("services.decode", worker_args(), "worker-b"),
            ("services.prefill", prefill_args("mooncake"), "prefill"),
            ("services.decode", decode_args("mooncake"), "decode"),
        ],
        tmp_path_factory.mktemp("sglang-workers"),
    )
    ws = Workers(*(Worker.of(p) for p in (worker_proc, *procs)))
    try:
        yield ws
    finally:
        for w in (ws.b, ws.prefill, ws.decode):
            w.close()
        for p in procs:
            p.stop_and_check()
        ws.a.close()  # the session fixture stops its process


@pytest.fixture(autouse=True)
def idle(workers: Workers) -> Iterator[None]:
    """After each test: every page free and no request or room left anywhere."""
    yield
    for w in (workers.a, workers.b, workers.prefill, workers.decode):
        wait_idle(w, within=5.0)


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return ensure_default_model(progress=False)


def openai_client(url: str) -> openai.OpenAI:
    # no retries: a failure must show, not be papered over
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, prompt: str, stream: bool = False) -> tuple[str, str, int]:
    """Greedy chat completion: (text, finish_reason, completion tokens)."""
    messages: Any = [{"role": "user", "content": prompt}]
    if not stream:
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.usage is not None
        choice = reply.choices[0]
        return (
            choice.message.content or "",
            str(choice.finish_reason),
            reply.usage.completion_tokens,
        )
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text, finish, tokens = "", "", 0
    for chunk in chunks:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = str(c.finish_reason) if c.finish_reason else finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, finish, tokens


@pytest.fixture(scope="module")
def expected(
    router_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[str, str, int]]:
    """What pdmesh's own gateway answers for each prompt."""
    gateway = start_gateway(
        router_proc.address, "--grace-period", "2", log_dir=tmp_path_factory.mktemp("gw")
    )
    try:
        with openai_client(f"http://{gateway.address}") as client:
            return {p: chat(client, p) for p in PROMPTS}
    finally:
        gateway.stop_and_check()


# -- smg in front of pdmesh workers ------------------------------------------------------------


def test_smg_grpc_mode_over_two_workers_answers_like_pdmesh(
    workers: Workers,
    expected: dict[str, tuple[str, str, int]],
    tokenizer_dir: Path,
    tmp_path: Path,
) -> None:
    urls = [f"grpc://{w.proc.address}" for w in (workers.a, workers.b)]
    args = ["--worker-urls", *urls, "--policy", "round_robin"]
    with start_smg(args, tokenizer_dir, tmp_path, num_workers=2) as smg:
        registered = {w["url"]: w for w in smg.workers()}
        assert set(registered) == set(urls)
        assert all(w["connection_mode"] == "grpc" for w in registered.values())
        assert {w["model_id"] for w in registered.values()} == {MODEL}
        with openai_client(smg.url) as client:
            assert [m.id for m in client.models.list().data] == [MODEL]
            for prompt in PROMPTS:
                assert chat(client, prompt) == expected[prompt], prompt
                assert chat(client, prompt, stream=True) == expected[prompt], prompt


def test_smg_pd_mode_over_a_pdmesh_prefill_and_decode_answers_like_pdmesh(
    workers: Workers,
    expected: dict[str, tuple[str, str, int]],
    tokenizer_dir: Path,
    tmp_path: Path,
) -> None:
    bootstrap_port = workers.prefill.bootstrap.rsplit(":", 1)[1]
    args = [
        "--pd-disaggregation",
        "--prefill", f"grpc://{workers.prefill.proc.address}", bootstrap_port,
        "--decode", f"grpc://{workers.decode.proc.address}",
    ]  # fmt: skip
    rooms_before = workers.prefill.load().total_rooms
    with start_smg(args, tokenizer_dir, tmp_path, num_workers=2, name="smg-pd") as smg:
        kinds = {w["worker_type"] for w in smg.workers()}
        assert kinds == {"prefill", "decode"}
        with openai_client(smg.url) as client:
            for prompt in PROMPTS:
                assert chat(client, prompt) == expected[prompt], prompt
                assert chat(client, prompt, stream=True) == expected[prompt], prompt
    # every request went through a bootstrap room: prefilled on P, KV moved to D
    assert workers.prefill.load().total_rooms - rooms_before == 2 * len(PROMPTS)
    assert workers.decode.load().total_rooms >= 2 * len(PROMPTS)


# -- pdmesh's router driving sglang-grpc workers -----------------------------------------------


def route(
    router: ServiceProc, prompt: str, **params: Any
) -> list[router_pb2.RouterGenerateResponse]:
    request = router_pb2.RouterGenerateRequest(
        chat=common_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="user", content=prompt)]),
        sampling_params=common_pb2.SamplingParams(
            temperature=0, max_new_tokens=MAX_TOKENS, **params
        ),
    )
    with grpc.insecure_channel(router.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return list(stub.Generate(request, timeout=CALL_TIMEOUT_S))


def summary(replies: list[router_pb2.RouterGenerateResponse]) -> tuple[str, list[int], int, int]:
    last = replies[-1]
    tokens = [t for r in replies for t in r.token_ids]
    return (
        "".join(r.text for r in replies),
        tokens,
        last.finish_reason,
        last.usage.completion_tokens,
    )


def test_router_with_an_sglang_grpc_worker_answers_like_a_native_one(
    workers: Workers,
    router_proc: ServiceProc,
    tokenizer_proc: ServiceProc,
    tmp_path: Path,
) -> None:
    args = [
        "--workers", f"sglang-grpc://{workers.b.proc.address}",
        "--tokenizer", tokenizer_proc.address, "--grace-period", "2",
    ]  # fmt: skip
    with start_service("services.router", args, "router-sglang", log_dir=tmp_path) as router:
        for prompt in PROMPTS:
            native = route(router_proc, prompt, logprobs=True, top_logprobs=2)
            through_sglang = route(router, prompt, logprobs=True, top_logprobs=2)
            assert summary(through_sglang) == summary(native), prompt
            assert {r.worker_id for r in through_sglang} == {workers.b.proc.address}
            got = [lp for r in through_sglang for lp in r.logprobs]
            want = [lp for r in native for lp in r.logprobs]
            assert [lp.token_id for lp in got] == [lp.token_id for lp in want]
            assert [lp.logprob for lp in got] == pytest.approx(
                [lp.logprob for lp in want], abs=1e-3
            )
            assert [[t.token_id for t in lp.top] for lp in got] == [
                [t.token_id for t in lp.top] for lp in want
            ]


def test_router_pairs_sglang_grpc_prefill_and_decode(
    workers: Workers,
    router_proc: ServiceProc,
    tokenizer_proc: ServiceProc,
    tmp_path: Path,
) -> None:
    args = [
        "--prefill-workers", f"sglang-grpc://{workers.prefill.proc.address}",
        "--decode-workers", f"sglang-grpc://{workers.decode.proc.address}",
        "--tokenizer", tokenizer_proc.address, "--grace-period", "2",
    ]  # fmt: skip
    rooms_before = workers.prefill.load().total_rooms
    with start_service("services.router", args, "router-sglang-pd", log_dir=tmp_path) as router:
        for prompt in PROMPTS:
            assert summary(route(router, prompt)) == summary(route(router_proc, prompt)), prompt
    assert workers.prefill.load().total_rooms - rooms_before == len(PROMPTS)


# -- the servicer itself -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scheduler(workers: Workers) -> Iterator[sglang_scheduler_pb2_grpc.SglangSchedulerStub]:
    with grpc.insecure_channel(workers.b.proc.address) as channel:
        yield sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)


def tokenize(tokenizer_proc: ServiceProc, text: str) -> list[int]:
    with grpc.insecure_channel(tokenizer_proc.address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        return list(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=text), timeout=10).token_ids)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer_proc: ServiceProc) -> list[int]:
    return tokenize(tokenizer_proc, "The capital of France is")


def generate(
    scheduler: sglang_scheduler_pb2_grpc.SglangSchedulerStub,
    ids: list[int],
    params: sgl.SamplingParams,
    stream: bool = False,
) -> list[sgl.GenerateResponse]:
    request = sgl.GenerateRequest(
        request_id=f"t-{threading.get_ident()}-{id(params)}",
        tokenized=sgl.TokenizedInput(input_ids=ids),
        sampling_params=params,
        stream=stream,
    )
    return list(scheduler.Generate(request, timeout=CALL_TIMEOUT_S))


def test_proto3_zeros_are_read_as_sglangs_semantic_defaults(
    scheduler: sglang_scheduler_pb2_grpc.SglangSchedulerStub,
    prompt_ids: list[int],
    tokenizer_proc: ServiceProc,
) -> None:
    # top_p 0, repetition_penalty 0, n 0 and an unset max_new_tokens would be invalid or
    # degenerate taken literally; they must behave as SGLang's defaults (1, 1, 1, 128)
    (period,) = tokenize(tokenizer_proc, ".")  # ends the sentence: a short generation
    zeros = sgl.SamplingParams(temperature=0, stop_token_ids=[period])
    explicit = sgl.SamplingParams(
        temperature=0, top_p=1, top_k=-1, repetition_penalty=1, n=1, max_new_tokens=128,
        stop_token_ids=[period],
    )  # fmt: skip
    (got,) = generate(scheduler, prompt_ids, zeros)
    (want,) = generate(scheduler, prompt_ids, explicit)
    assert got.complete.output_ids == want.complete.output_ids
    assert len(got.complete.output_ids) > 1
    assert got.complete.finish_reason == want.complete.finish_reason


def test_streamed_chunks_add_up_to_the_complete(
    scheduler: sglang_scheduler_pb2_grpc.SglangSchedulerStub, prompt_ids: list[int]
) -> None:
    params = sgl.SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    out = generate(scheduler, prompt_ids, params, stream=True)
    assert [r.WhichOneof("response") for r in out] == ["chunk"] * 6 + ["complete"]
    done = out[-1].complete
    assert [t for r in out[:-1] for t in r.chunk.token_ids] == list(done.output_ids)
    assert (done.finish_reason, done.completion_tokens) == ("length", 6)
    assert done.prompt_tokens == len(prompt_ids)
    (whole,) = generate(scheduler, prompt_ids, params)
    assert whole.complete.output_ids == done.output_ids


def test_info_rpcs_describe_the_worker(
    scheduler: sglang_scheduler_pb2_grpc.SglangSchedulerStub,
    workers: Workers,
    tokenizer_dir: Path,
) -> None:
    info = scheduler.GetModelInfo(sgl.GetModelInfoRequest(), timeout=10)
    assert (info.served_model_name, info.tokenizer_path) == (MODEL, str(tokenizer_dir))
    assert (info.max_context_length, info.vocab_size, list(info.eos_token_ids)) == (
        2048,
        49152,
        [2],
    )
    assert info.is_generation and list(info.architectures) == ["LlamaForCausalLM"]
    server = scheduler.GetServerInfo(sgl.GetServerInfoRequest(), timeout=10)
    assert server.server_args["disaggregation_mode"] == "null"
    assert server.max_total_num_tokens == 256 * 16  # --num-pages 256, 16-token pages
    loads = scheduler.GetLoads(sgl.GetLoadsRequest(), timeout=10)
    assert loads.dp_rank_count == 1 and loads.loads[0].max_total_num_tokens == 256 * 16
    assert scheduler.HealthCheck(sgl.HealthCheckRequest(), timeout=10).healthy
    with grpc.insecure_channel(workers.prefill.proc.address) as channel:
        prefill = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        args = prefill.GetServerInfo(sgl.GetServerInfoRequest(), timeout=10).server_args
    assert args["disaggregation_mode"] == "prefill"
    assert f"127.0.0.1:{int(args['disaggregation_bootstrap_port'])}" == workers.prefill.bootstrap


def test_get_tokenizer_streams_a_zip_of_the_tokenizer_files(
    scheduler: sglang_scheduler_pb2_grpc.SglangSchedulerStub, tokenizer_dir: Path
) -> None:
    chunks = list(scheduler.GetTokenizer(smg_common_pb2.GetTokenizerRequest(), timeout=10))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.read("tokenizer.json") == (tokenizer_dir / "tokenizer.json").read_bytes()
        assert "chat_template.jinja" in archive.namelist()


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (sgl.GenerateRequest(request_id="no-ids"), grpc.StatusCode.INVALID_ARGUMENT, "tokenized"),
        (
            sgl.GenerateRequest(
                request_id="n2",
                tokenized=sgl.TokenizedInput(input_ids=[1, 2]),
                sampling_params=sgl.SamplingParams(n=2),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling_params.n",
        ),
        (
            sgl.GenerateRequest(
                request_id="big-id",
                tokenized=sgl.TokenizedInput(input_ids=[10**6]),
                sampling_params=sgl.SamplingParams(max_new_tokens=1),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tokenized.input_ids",  # named as in SGLang's request, not pdmesh's
        ),
    ],
)
def test_bad_requests_get_clear_errors(
    scheduler: sglang_scheduler_pb2_grpc.SglangSchedulerStub,
    request_: sgl.GenerateRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        list(scheduler.Generate(request_, timeout=10))
    assert e.value.code() == code and words in (e.value.details() or "")


def test_a_prefill_worker_refuses_a_request_without_a_room(workers: Workers) -> None:
    request = sgl.GenerateRequest(
        request_id="whole", tokenized=sgl.TokenizedInput(input_ids=[1, 2, 3])
    )
    with grpc.insecure_channel(workers.prefill.proc.address) as channel:
        prefill = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(prefill.Generate(request, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "disaggregated_params" in (e.value.details() or "")


def test_what_pdmesh_does_not_serve_is_unimplemented(
    scheduler: sglang_scheduler_pb2_grpc.SglangSchedulerStub,
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        scheduler.Embed(sgl.EmbedRequest(request_id="e"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "embeddings" in (e.value.details() or "")


def test_cancel_and_abort_stop_the_request_and_free_its_pages(
    scheduler: sglang_scheduler_pb2_grpc.SglangSchedulerStub,
    workers: Workers,
    prompt_ids: list[int],
) -> None:
    long = sgl.SamplingParams(temperature=0, max_new_tokens=1000, ignore_eos=True)
    call = scheduler.Generate(
        sgl.GenerateRequest(
            request_id="to-cancel",
            tokenized=sgl.TokenizedInput(input_ids=prompt_ids),
            sampling_params=long,
            stream=True,
        ),
        timeout=CALL_TIMEOUT_S,
    )
    assert next(call).WhichOneof("response") == "chunk"
    call.cancel()
    wait_idle(workers.b, within=3.0)

    call = scheduler.Generate(
        sgl.GenerateRequest(
            request_id="to-abort",
            tokenized=sgl.TokenizedInput(input_ids=prompt_ids),
            sampling_params=long,
            stream=True,
        ),
        timeout=CALL_TIMEOUT_S,
    )
    assert next(call).WhichOneof("response") == "chunk"
    reply = scheduler.Abort(sgl.AbortRequest(request_id="to-abort"), timeout=10)
    assert reply.success
    last = list(call)[-1]
    assert last.complete.finish_reason == "abort"
    assert len(last.complete.output_ids) < 1000
    assert not scheduler.Abort(sgl.AbortRequest(request_id="to-abort"), timeout=10).success
    wait_idle(workers.b, within=3.0)
