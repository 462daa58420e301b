"""HTTP fuzzing of the gateway from the OpenAPI description it serves, against a real mesh:
tokenizer + worker (the session's) and a router and gateway of this module's own (the fuzzer
adds and removes workers through ``/add_worker``, which must not touch other tests' router).

Calls come from ``fuzz_openapi``: tame bodies (tiny token counts, so a worker answers in
milliseconds), tame bodies with one wild value, random JSON, corrupted bytes, odd content types,
methods and paths. Checked on every answer: never a 5xx (a client error is a 4xx), every error
body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``, a 200 stream ends with
``[DONE]`` or an error event that is not a server error. Checked along the way and at the end:
every service still answers its health check; afterwards the worker holds no request and no
page, and the router's worker set is what it was. ``test_found_by_fuzzing`` pins the bugs this
found.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import strategies as st

from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.fuzz_openapi import CallFactory, HttpCall, operations
from tests.integration.fuzz_proto import is_safe_address
from tests.integration.fuzzing import EXAMPLES, Outcome, fuzz
from tests.integration.procs import ServiceProc, start_service
from tests.integration.test_gateway import MODEL, start_gateway, wait_until_idle

pytestmark = pytest.mark.model

# a tame generation takes well under a second; a wild max_tokens of 2^31 - 1 runs until the
# client gives up (the gateway then cancels it: no leak allowed)
CALL_TIMEOUT_S = 5.0
# a cancelled request stops at the engine's next step: up to a long prompt's prefill chunk
IDLE_WITHIN_S = 30.0
ERROR_KEYS = {"message", "type", "param", "code"}
SERVING = health_pb2.HealthCheckResponse.SERVING
# /add_worker?url=...: junk the gateway or router refuses, or loopback addresses nobody serves
WORKER_URLS = st.one_of(
    st.text(max_size=30).filter(lambda u: ":" not in u),
    st.sampled_from(
        [
            "127.0.0.1:9", "127.0.0.1:1/", "grpc://127.0.0.1:9", "sglang-grpc://127.0.0.1:9",
            "[::1]:9", " 127.0.0.1:1 ", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:99999999999",
            "localhost:9", "http://127.0.0.1:9", "127.0.0.1:-1",
        ]
    ),
)  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_mesh(
    tokenizer_proc: ServiceProc,
    worker_proc: ServiceProc,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServiceProc, ServiceProc]]:
    """(router, gateway) over the session's tokenizer and worker."""
    log_dir = tmp_path_factory.mktemp("fuzz-http")
    args = ["--workers", worker_proc.address, "--tokenizer", tokenizer_proc.address]
    router = start_service(
        "services.router", [*args, "--grace-period", "2"], "fuzz-router", log_dir=log_dir
    )
    try:
        flags = ["--tokenizer", tokenizer_proc.address, "--grace-period", "2"]
        gateway = start_gateway(router.address, *flags, log_dir=log_dir, name="fuzz-gateway")
        try:
            yield router, gateway
        finally:
            gateway.stop_and_check()
    finally:
        router.stop_and_check()


# -- checking one answer -----------------------------------------------------------------------


def strict_json(text: str) -> Any:
    """``json.loads`` without Python's extensions: NaN and Infinity are not JSON, and clients
    in other languages reject them."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def error_body_problem(response: httpx.Response) -> str | None:
    """What is wrong with an error answer's body, if anything (it must be OpenAI's)."""
    try:
        body = strict_json(response.text)
    except ValueError:
        return f"error body is not JSON: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != ERROR_KEYS:
        return f"not an OpenAI error body: {body!r:.300}"
    if not isinstance(error["message"], str) or not error["message"]:
        return f"error without a message: {body!r:.300}"
    if not isinstance(error["type"], str):
        return f"error type is not a string: {body!r:.300}"
    for key in ("param", "code"):
        if error[key] is not None and not isinstance(error[key], str):
            return f"error {key} is neither a string nor null: {body!r:.300}"
    return None


def stream_problem(response: httpx.Response) -> str | None:
    """A 200 event stream must end with [DONE], or with an error event for a client-side or
    capacity problem (a 5xx-typed one is a server error)."""
    for line in response.text.splitlines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return None
        try:
            event = strict_json(data)
        except ValueError:
            return f"event is not JSON: {data[:200]!r}"
        if isinstance(event, dict) and "error" in event:
            error = event["error"]
            if not isinstance(error, dict) or error.get("type") == "server_error":
                return f"server error in the stream: {event!r:.300}"
            return None
    return f"stream ended without [DONE]: {response.text[-300:]!r}"


def send(client: httpx.Client, call: HttpCall) -> Outcome:
    query = parse_qs(urlsplit(call.path).query)
    # the router must only ever dial this machine
    assert all(is_safe_address(u.strip()) for u in query.get("url", [])), call
    try:
        # bytes: httpx would encode str values as ascii
        headers = {k.encode("latin-1"): v.encode("latin-1") for k, v in call.headers.items()}
        response = client.request(call.method, call.path, content=call.body, headers=headers)
    except httpx.TimeoutException:
        return Outcome("client timeout")
    except httpx.LocalProtocolError:  # httpx itself refused to send it (odd header bytes)
        return Outcome("not sent")
    except httpx.HTTPError as e:  # the server dropped the connection: a crash or a bug
        return Outcome("transport error", f"{type(e).__name__}: {e}")
    status = response.status_code
    label = str(status)
    if status >= 500:
        return Outcome(label, response.text[:300])
    if status >= 400:
        problem = error_body_problem(response)
        return Outcome(label, problem) if problem else Outcome(label)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        problem = stream_problem(response)
        return Outcome("200 stream", problem) if problem else Outcome("200 stream")
    try:
        body = strict_json(response.text)
    except ValueError as e:
        return Outcome(label, f"the 200 body is not JSON ({e}): {response.text[:200]!r}")
    if call.path.startswith("/add_worker") and status == 200:
        # keep the worker set small: what was added goes again
        url = body["worker"]["url"]
        client.post("/remove_worker", params={"url": url})
    return Outcome(label)


# -- the run -----------------------------------------------------------------------------------


def test_fuzz_gateway(
    fuzz_mesh: tuple[ServiceProc, ServiceProc],
    tokenizer_proc: ServiceProc,
    worker_proc: ServiceProc,
) -> None:
    router, gateway = fuzz_mesh
    base = f"http://{gateway.address}"
    document = httpx.get(f"{base}/openapi.json", timeout=10).json()
    vocab = _vocab_size(worker_proc)
    factory = CallFactory(operations(document), MODEL, vocab, {"url": WORKER_URLS})
    procs = [tokenizer_proc, worker_proc, router, gateway]
    with httpx.Client(base_url=base, timeout=CALL_TIMEOUT_S) as client:

        def alive() -> None:
            for proc in procs:
                assert proc.proc.poll() is None, f"{proc.name} died:\n{proc.log[-3000:]}"
            for proc in procs[:-1]:  # the gRPC ones
                assert proc.health() == SERVING, f"{proc.name} is not SERVING"
            assert client.get("/health").status_code == 200, "the gateway lost its router"

        tally = fuzz("http", factory.calls(), lambda call: send(client, call), alive)
        wait_until_idle(worker_proc, time.monotonic(), limit_s=IDLE_WITHIN_S)
        workers = client.get("/workers").json()["workers"]
    assert [w["url"] for w in workers] == [worker_proc.address], workers
    tally.check(minimum=EXAMPLES * 9 // 10)


def _vocab_size(worker: ServiceProc) -> int:
    with grpc.insecure_channel(worker.address) as channel:
        info = worker_pb2_grpc.WorkerServiceStub(channel).GetModelInfo(
            worker_pb2.GetModelInfoRequest(), timeout=10
        )
    return int(info.vocab_size)


# -- regressions: what the fuzzers found ------------------------------------------------------


def _chat(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            **overrides}  # fmt: skip


def _completion(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 1, **overrides}


# (route, JSON text, the param the 400 names): each was a 500 before its fix. JSON text, not
# objects: a lone surrogate must reach the gateway as the escape \ud800, as a client wrote it.
FOUND_BY_FUZZING: list[tuple[str, str, str | None]] = [
    # lone UTF-16 surrogates: no UTF-8 form, so protobuf refused them (UnicodeEncodeError)
    ("/v1/chat/completions", json.dumps(_chat(messages=[{"role": "user", "content": "\ud800"}])),
     "messages[0].content"),
    ("/v1/chat/completions", json.dumps(_chat(stop=["a", "x\udfff"])), "stop[1]"),
    ("/v1/completions", json.dumps(_completion(prompt="\ud800")), "prompt"),
    ("/generate", json.dumps({"text": "hi", "rid": "\udc00",
                              "sampling_params": {"max_new_tokens": 1}}), "rid"),
    # integers past the wire's int32 (ValueError building the message)
    ("/v1/chat/completions", json.dumps(_chat(max_tokens=2**40)), "max_tokens"),
    ("/v1/chat/completions", json.dumps(_chat(top_k=2**40)), "top_k"),
    ("/v1/chat/completions", json.dumps(_chat(min_tokens=2**40)), "min_tokens"),
    ("/v1/chat/completions", json.dumps(_chat(stop_token_ids=[2**40])), "stop_token_ids[0]"),
    ("/v1/completions", json.dumps(_completion(prompt=[2**40])), "prompt[0]"),
    ("/generate", json.dumps({"text": "hi", "sampling_params": {"max_new_tokens": 2**40}}),
     "sampling_params.max_new_tokens"),
    # a stop string's cost grew with the square of its length: it held the tokenizer (a
    # timeout rather than a 500, but every other request waited behind it)
    # (the router names sampling_params.stop[0]; the gateway gives the body's name)
    ("/v1/completions", json.dumps(_completion(stop=["x" * 100_000])), "stop[0]"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "param"),
    FOUND_BY_FUZZING,
    ids=[f"{p} {b[:60]}" for p, b, _ in FOUND_BY_FUZZING],
)
def test_found_by_fuzzing(
    fuzz_mesh: tuple[ServiceProc, ServiceProc], path: str, body: str, param: str | None
) -> None:
    _, gateway = fuzz_mesh
    response = httpx.post(
        f"http://{gateway.address}{path}",
        content=body.encode(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert error_body_problem(response) is None, response.text
    if param is not None:
        assert response.json()["error"]["param"] == param, response.text


def test_deeply_nested_tool_call_arguments_regression(
    fuzz_mesh: tuple[ServiceProc, ServiceProc], worker_proc: ServiceProc
) -> None:
    """Tool-call arguments are parsed as JSON for the template; nested past Python's parser
    they were a 500 (RecursionError in the tokenizer); they stay text now, as other arguments
    that are not a JSON object do."""
    _, gateway = fuzz_mesh
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[" * 5000}}
    messages = [
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "user", "content": "and?"},
    ]
    response = httpx.post(
        f"http://{gateway.address}/v1/chat/completions",
        json=_chat(messages=messages),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1
    wait_until_idle(worker_proc, time.monotonic(), limit_s=IDLE_WITHIN_S)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_logprobs_that_are_not_finite_regression(
    fuzz_mesh: tuple[ServiceProc, ServiceProc], worker_proc: ServiceProc, stream: bool
) -> None:
    """With every token a stop token and ``min_tokens`` set, the sampler bans all of them: the
    logprobs come back NaN, which JSON cannot carry (the body was a 500: ``json.dumps`` refused
    it; a stream carried NaN). They are reported as -9999.0, vLLM's convention."""
    _, gateway = fuzz_mesh
    everything = list(range(_vocab_size(worker_proc)))
    body = _completion(
        max_tokens=1, min_tokens=1, stop_token_ids=everything, logprobs=3, stream=stream
    )
    url = f"http://{gateway.address}/v1/completions"
    response = httpx.post(url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    if stream:
        events = [strict_json(line[6:]) for line in response.text.splitlines() if line[6:7] == "{"]
        logprobs = [e["choices"][0]["logprobs"] for e in events if e["choices"]]
    else:
        logprobs = [strict_json(response.text)["choices"][0]["logprobs"]]
    values = [v for lp in logprobs if lp for v in lp["token_logprobs"]]
    tops = [v for lp in logprobs if lp for top in lp["top_logprobs"] for v in top.values()]
    assert values and all(math.isfinite(v) for v in values + tops), logprobs
    assert -9999.0 in values + tops, logprobs  # the overflow really happened
    wait_until_idle(worker_proc, time.monotonic(), limit_s=IDLE_WITHIN_S)
