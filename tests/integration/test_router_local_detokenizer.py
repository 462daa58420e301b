"""The router detokenizes in its own process with the tokenizer it fetched once from a real
tokenizer service (``GetTokenizerFiles``), so a tokenizer killed with SIGKILL fails no stream in
flight: only new requests that need tokenizing fail, with UNAVAILABLE naming it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from pdmesh.rpc.server import RpcServer
from pdmesh.tokenizer import StreamDelta, Tokenizer
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.router.tokenizer_client import (
    CHANNEL_OPTIONS,
    Detokenizer,
    LocalTokenizer,
    TokenizerClient,
)
from services.router.upstream import OutgoingCalls, UpstreamError
from services.tokenizer.server import TokenizerServicer
from tests.integration.procs import ServiceProc, free_port, start_service

pytestmark = pytest.mark.model

MULTILINGUAL = "Hello 👋 世界! naïve café 🎉 日本語 <|im_end|> done"
TOKENIZER_ARGS = ["--grace-period", "2"]


@pytest.fixture(scope="module")
def files(tokenizer_proc: ServiceProc) -> tokenizer_pb2.GetTokenizerFilesResponse:
    with grpc.insecure_channel(tokenizer_proc.address, options=CHANNEL_OPTIONS) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        return stub.GetTokenizerFiles(tokenizer_pb2.GetTokenizerFilesRequest(), timeout=30)


@pytest.fixture(scope="module")
def model_dir_tokenizer() -> Tokenizer:
    from pdmesh.models.fetch import ensure_default_model

    return Tokenizer.from_dir(Path(ensure_default_model(progress=False)))


@pytest.fixture(scope="module")
def stub(tokenizer_proc: ServiceProc) -> Iterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    with grpc.insecure_channel(tokenizer_proc.address) as channel:
        yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)


def service_stream(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub,
    chunks: list[list[int]],
    options: tokenizer_pb2.DetokenizeStreamOptions,
) -> list[tokenizer_pb2.DetokenizeStreamResponse]:
    """The service's own DetokenizeStream answers to ``chunks`` (the last one final)."""
    requests = [tokenizer_pb2.DetokenizeStreamRequest(options=options)]
    for i, ids in enumerate(chunks):
        tokens = tokenizer_pb2.DetokenizeStreamTokens(token_ids=ids, final=i == len(chunks) - 1)
        requests.append(tokenizer_pb2.DetokenizeStreamRequest(tokens=tokens))
    return list(stub.DetokenizeStream(iter(requests), timeout=30))


def pushed(detok: Detokenizer, chunks: list[list[int]]) -> list[StreamDelta]:
    out = []
    for i, ids in enumerate(chunks):
        out.append(detok.push(ids, final=i == len(chunks) - 1))
        if out[-1].stopped:
            break
    return out


def text_of(deltas: list[StreamDelta]) -> str:
    return "".join(d.text for d in deltas)


def test_tokenizer_files_describe_the_served_tokenizer(
    files: tokenizer_pb2.GetTokenizerFilesResponse, stub: tokenizer_pb2_grpc.TokenizerServiceStub
) -> None:
    info = stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest(), timeout=10)
    assert files.model_name == info.model_name == "smollm2-135m-instruct"
    assert files.vocab_size == info.vocab_size
    assert list(files.eos_token_ids) == list(info.eos_token_ids)
    assert files.default_skip_special_tokens
    local = LocalTokenizer.from_pb(files)
    assert local.backend.get_vocab_size(with_added_tokens=True) == files.vocab_size
    im_end = local.backend.token_to_id("<|im_end|>")
    assert im_end in files.special_token_ids and im_end in files.eos_token_ids
    assert not set(local.backend.encode("Hello world").ids) & set(files.special_token_ids)
    ids = list(
        stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=MULTILINGUAL), timeout=10).token_ids
    )
    assert local.backend.encode(MULTILINGUAL).ids == ids  # the same tokenizer, not just alike
    for skip in (True, False):
        request = tokenizer_pb2.DetokenizeRequest(token_ids=ids, skip_special_tokens=skip)
        assert local.backend.decode(ids, skip) == stub.Detokenize(request, timeout=10).text


@pytest.mark.parametrize(
    ("stop", "skip", "prompt_text"),
    [
        ((), None, ""),
        (("世界",), None, "Say:"),
        (("<|im_end|>",), False, ""),
        (("never there",), False, "ok 👋"),
    ],
)
def test_the_router_detokenizer_answers_as_detokenize_stream(
    files: tokenizer_pb2.GetTokenizerFilesResponse,
    stub: tokenizer_pb2_grpc.TokenizerServiceStub,
    stop: tuple[str, ...],
    skip: bool | None,
    prompt_text: str,
) -> None:
    local = LocalTokenizer.from_pb(files)
    ids = local.backend.encode(MULTILINGUAL).ids
    prompt = local.backend.encode(prompt_text).ids if prompt_text else []
    options = tokenizer_pb2.DetokenizeStreamOptions(stop=stop, prompt_token_ids=prompt)
    if skip is not None:
        options.skip_special_tokens = skip
    for chunks in ([[t] for t in ids], [ids[:3], [], ids[3:9], ids[9:]]):
        expected = service_stream(stub, chunks, options)
        got = pushed(local.detokenizer(prompt, stop, skip), chunks)
        assert [(d.text, d.stopped, d.stop_string or "", d.num_tokens) for d in got] == [
            (r.text, r.stopped, r.stop_string, r.num_tokens) for r in expected
        ]
    with pytest.raises(UpstreamError) as e:  # the service refused such ids; so does the router
        local.detokenizer(prompt, stop, skip).push([5, files.vocab_size], final=False)
    assert e.value.code == grpc.StatusCode.INTERNAL and "vocabulary" in e.value.details


async def wait_for_local(client: TokenizerClient, within: float = 30.0) -> LocalTokenizer:
    deadline = time.monotonic() + within
    while client.local_tokenizer is None:
        assert time.monotonic() < deadline, "the tokenizer's files never arrived"
        await asyncio.sleep(0.05)
    return client.local_tokenizer


def test_streams_outlive_a_killed_tokenizer(tmp_path: Path) -> None:
    tok = start_service("services.tokenizer", TOKENIZER_ARGS, "tokenizer", log_dir=tmp_path)

    async def scenario() -> None:
        client = TokenizerClient([tok.address], rpc_timeout=10)
        try:
            # fetched in the background as soon as the instance was added: no request asked
            local = await wait_for_local(client)
            request = router_pb2.RouterGenerateRequest(text="Say hi")
            prompt = await client.prompt_ids(request, timeout=10)
            ids = local.backend.encode(" " + MULTILINGUAL).ids
            detok = await client.open_detokenizer(prompt, ["never"], None, 10, OutgoingCalls())
            first = [detok.push([t], final=False) for t in ids[:5]]

            tok.kill()  # SIGKILL: no drain, no goodbye
            assert tok.proc.returncode == -9

            rest = [detok.push([t], final=False) for t in ids[5:]] + [detok.push([], final=True)]
            assert text_of(first + rest) == " " + MULTILINGUAL.replace("<|im_end|>", "")
            assert rest[-1].num_tokens == len(ids) and not rest[-1].stopped
            detok.close()
            # a new stream needs nothing from the dead tokenizer either...
            later = await client.open_detokenizer(prompt, [], True, 10, OutgoingCalls())
            assert later.push(ids, final=True).text == text_of(first + rest)
            # ...but a prompt that needs tokenizing does, and says which tokenizer failed
            with pytest.raises(UpstreamError) as e:
                await client.prompt_ids(request, timeout=10)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
            assert f"tokenizer {tok.address}" in e.value.details

            # a tokenizer back on the address serves the very next request
            back = await asyncio.to_thread(start_tokenizer_on, tok.port, tmp_path)
            try:
                assert await client.prompt_ids(request, timeout=10) == prompt
            finally:
                back.stop_and_check()
        finally:
            await client.close()

    try:
        asyncio.run(scenario())
    finally:
        tok.kill()


def test_the_first_request_fetches_when_the_background_fetch_failed(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"

    async def scenario() -> None:
        # nothing listens yet: the background fetch waits for it, then gives up
        client = TokenizerClient([address], rpc_timeout=1.0)
        try:
            await asyncio.sleep(1.5)
            assert client.local_tokenizer is None
            with pytest.raises(UpstreamError) as e:  # a request's own fetch: it fails at once
                await client.open_detokenizer([1, 2], [], None, 5, OutgoingCalls())
            assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
            assert f"tokenizer {address}" in e.value.details

            tok = await asyncio.to_thread(start_tokenizer_on, port, tmp_path)
            try:
                # the failure above gave the tokenizer a fresh channel: no reconnect backoff
                # to wait out, the first request after the start gets through
                detok = await client.open_detokenizer([1, 2], [], None, 30, OutgoingCalls())
                local = client.local_tokenizer
                assert local is not None
                ids = local.backend.encode("fetched lazily 🎉").ids
                assert detok.push(ids, final=True).text == "fetched lazily 🎉"
            finally:
                tok.stop_and_check()
        finally:
            await client.close()

    asyncio.run(scenario())


def start_tokenizer_on(port: int, log_dir: Path) -> ServiceProc:
    svc = ServiceProc("services.tokenizer", TOKENIZER_ARGS, "tokenizer-late", port, log_dir)
    try:
        svc.wait_until_serving()
    except BaseException:
        svc.kill()
        raise
    return svc


def test_a_router_stream_outlives_a_killed_tokenizer(
    tmp_path: Path, worker_proc: ServiceProc
) -> None:
    """End to end: a real router streaming a real worker's tokens while its tokenizer is
    killed finishes the stream with the same text as before the kill."""
    tok = start_service("services.tokenizer", TOKENIZER_ARGS, "tokenizer", log_dir=tmp_path)
    args = ["--workers", worker_proc.address, "--tokenizer", tok.address, "--grace-period", "2"]
    try:
        with start_service("services.router", args, "router", log_dir=tmp_path) as router:
            channel = grpc.insecure_channel(router.address)
            stub = router_pb2_grpc.RouterServiceStub(channel)
            sampling = common_pb2.SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True)
            with grpc.insecure_channel(tok.address) as tok_channel:
                tokenize = tokenizer_pb2_grpc.TokenizerServiceStub(tok_channel).Tokenize
                reply = tokenize(tokenizer_pb2.TokenizeRequest(text="Once upon a time"))
            prompt = router_pb2.TokenIds(ids=reply.token_ids)
            request = router_pb2.RouterGenerateRequest(token_ids=prompt, sampling_params=sampling)
            before = "".join(r.text for r in stub.Generate(request, timeout=120))
            assert before

            stream = stub.Generate(request, timeout=120)
            texts = [next(stream).text]
            killed_at = time.monotonic()
            tok.kill()
            arrived = []
            for reply in stream:  # the stream goes on without the tokenizer
                texts.append(reply.text)
                arrived.append(time.monotonic() - killed_at)
            assert "".join(texts) == before
            assert arrived and arrived[-1] > 0.05, arrived  # the worker was still generating

            text_request = router_pb2.RouterGenerateRequest(text="hi", sampling_params=sampling)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(text_request, timeout=30))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
            assert f"tokenizer {tok.address}" in (e.value.details() or "")
            # a token-id prompt needs no tokenizer at all now
            assert "".join(r.text for r in stub.Generate(request, timeout=120)) == before
            channel.close()
        assert "loaded the tokenizer of smollm2-135m-instruct" in router.log
    finally:
        tok.kill()


def test_a_servicer_without_tokenizer_json_refuses_to_give_files(
    model_dir_tokenizer: Tokenizer,
) -> None:
    async def scenario() -> None:
        rpc = RpcServer(["pdmesh.v1.TokenizerService"])
        servicer = TokenizerServicer(model_dir_tokenizer)  # no tokenizer.json given
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(servicer, rpc.server)
        port = await rpc.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GetTokenizerFiles(tokenizer_pb2.GetTokenizerFilesRequest())
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "tokenizer.json" in (e.value.details() or "")
        finally:
            await rpc.stop(grace=1)

    asyncio.run(scenario())
