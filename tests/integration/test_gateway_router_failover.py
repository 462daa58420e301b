"""A router ``kill -9``-ed while it streams: the gateway resumes each of its streams on the other
router from the tokens the client already has (``Resume``), and the client, the official
``openai`` client streaming a chat, gets the fault-free answer, token for token, with usage
counting every completion token."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.integration.procs import ServiceProc, start_service
from tests.integration.test_gateway import MODEL, start_gateway

pytestmark = pytest.mark.model

MAX_TOKENS = 48
STREAMS = 4
QUESTION = [{"role": "user", "content": "Tell me a short story about a robot."}]


@pytest.fixture
def routers(
    tmp_path: Path, worker_proc: ServiceProc, tokenizer_proc: ServiceProc
) -> Iterator[list[ServiceProc]]:
    """Two routers over the session's worker; the test kills the first, the second must still
    stop cleanly."""
    args = ["--workers", worker_proc.address, "--tokenizer", tokenizer_proc.address]
    procs: list[ServiceProc] = []
    try:
        for i in range(2):
            procs.append(
                start_service(
                    "services.router",
                    [*args, "--grace-period", "1"],
                    f"router-{i}",
                    log_dir=tmp_path,
                )
            )
        yield procs
        procs[1].stop_and_check()
    finally:
        for proc in procs:
            proc.stop()


def _stream(client: openai.OpenAI, first: threading.Barrier | None = None) -> tuple[str, int]:
    """The streamed answer's text and its usage's completion tokens; ``first`` is waited at
    once the first content arrived."""
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage = "", 0
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if first is not None and text:
                first.wait(timeout=60)
                first = None
    return text, usage


def test_a_killed_router_s_streams_resume_on_the_other(
    tmp_path: Path, routers: list[ServiceProc]
) -> None:
    addresses = ",".join(r.address for r in routers)
    gateway = start_gateway(addresses, "--grace-period", "1", log_dir=tmp_path)
    try:
        base_url = f"http://{gateway.address}/v1"
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
            expected = _stream(client)
            assert expected[1] == MAX_TOKENS
            first = threading.Barrier(STREAMS + 1)
            results: list[tuple[str, int] | BaseException] = []

            def run() -> None:
                try:
                    results.append(_stream(client, first))
                except BaseException as e:  # noqa: BLE001 (asserted below)
                    results.append(e)

            # round-robin: half the streams run on each router
            threads = [threading.Thread(target=run) for _ in range(STREAMS)]
            for t in threads:
                t.start()
            first.wait(timeout=60)  # every stream has text
            routers[0].kill()
            for t in threads:
                t.join(timeout=120)
        assert results == [expected] * STREAMS
        assert "resuming it on the next router" in gateway.log
    finally:
        gateway.stop()


def _request(**resume: list[int]) -> router_pb2.RouterGenerateRequest:
    params = common_pb2.SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    request = router_pb2.RouterGenerateRequest(text="Once upon a time", sampling_params=params)
    if "tokens" in resume:
        request.resume.output_token_ids[:] = resume["tokens"]
    return request


def test_a_resumed_request_continues_after_the_tokens_sent(router_proc: ServiceProc) -> None:
    with grpc.insecure_channel(router_proc.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        whole = list(stub.Generate(_request(), timeout=60))
        tokens = [t for r in whole for t in r.token_ids]
        text = "".join(r.text for r in whole)
        head = tokens[:10]
        rest = list(stub.Generate(_request(tokens=head), timeout=60))
        assert [t for r in rest for t in r.token_ids] == tokens[10:]
        # the head's text was the other router's to send; the rest is what comes after it
        assert text.endswith("".join(r.text for r in rest))
        assert rest[-1].usage.completion_tokens == 24
        assert rest[-1].usage.prompt_tokens == whole[-1].usage.prompt_tokens
        with pytest.raises(grpc.RpcError) as bad:
            list(stub.Generate(_request(tokens=[1, 10**8]), timeout=60))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "resume.output_token_ids" in (bad.value.details() or "")
