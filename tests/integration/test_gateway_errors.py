"""The gateway's failure paths against a real mesh: bad input, the API key, the body limit, the
request deadline (before and after the stream started) and a router that is down. Every error
must carry OpenAI's error body, and the gateway must keep serving afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest

from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.procs import ServiceProc, free_port
from tests.integration.test_gateway import GREETING, MODEL, start_gateway

pytestmark = pytest.mark.model

API_KEY = "sk-test-gateway"
SMALL_BODY_LIMIT = 4096
SHORT_TIMEOUT_S = 2.0  # far shorter than 2000 tokens take on any machine here


@pytest.fixture(scope="module")
def gateway(router_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    svc = start_gateway(router_proc.address, log_dir=tmp_path_factory.mktemp("gateway-errors"))
    yield f"http://{svc.address}"
    svc.stop_and_check()


@pytest.fixture(scope="module")
def strict_gateway(
    router_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """API key on, a small body limit, a short deadline."""
    flags = [
        "--api-key", API_KEY,
        "--max-body-bytes", str(SMALL_BODY_LIMIT),
        "--request-timeout", str(SHORT_TIMEOUT_S),
        "--model-name", MODEL,
        "--grace-period", "1",
    ]  # fmt: skip
    log_dir = tmp_path_factory.mktemp("gateway-strict")
    svc = start_gateway(router_proc.address, *flags, log_dir=log_dir, name="strict-gateway")
    yield f"http://{svc.address}"
    svc.stop_and_check()


def assert_openai_error(
    response: httpx.Response, status: int, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return dict(error)


def openai_client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)


def chat(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": GREETING, "max_tokens": 2, **overrides}


BAD_CHAT_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("missing messages", {"model": MODEL}, "messages"),
    ("empty messages", chat(messages=[]), "messages"),
    ("max_tokens < 0", chat(max_tokens=-1), "max_tokens"),
    ("temperature < 0", chat(temperature=-0.5), "temperature"),
    ("temperature > 2", chat(temperature=2.5), "temperature"),
    ("top_p > 1", chat(top_p=1.5), "top_p"),
    ("top_p = 0", chat(top_p=0), "top_p"),
    ("n < 1", chat(n=0), "n"),
    ("bad role", chat(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    ("stop not a string", chat(stop=5), "stop"),
    ("top_logprobs without logprobs", chat(top_logprobs=2), "top_logprobs"),
]


@pytest.mark.parametrize(
    ("body", "param"), [c[1:] for c in BAD_CHAT_BODIES], ids=[c[0] for c in BAD_CHAT_BODIES]
)
def test_bad_values_are_400(gateway: str, body: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=30)
    error = assert_openai_error(response, 400, param)
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_400(gateway: str) -> None:
    for raw in (b'{"model": "x", "messages": [', b"not json", b"[1, 2]"):
        response = httpx.post(
            f"{gateway}/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert_openai_error(response, 400)


def test_unknown_model_is_404(gateway: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client(gateway).chat.completions.create(model="gpt-17", messages=GREETING)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


def test_prompt_longer_than_the_context_is_400(gateway: str, worker_proc: ServiceProc) -> None:
    with grpc.insecure_channel(worker_proc.address) as channel:
        info = worker_pb2_grpc.WorkerServiceStub(channel).GetModelInfo(
            worker_pb2.GetModelInfoRequest(), timeout=5
        )
    prompt = "hello " * (info.max_model_len + 10)  # " hello" is one token
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    error = assert_openai_error(httpx.post(f"{gateway}/v1/completions", json=body, timeout=60), 400)
    assert error["param"]  # the router's ErrorDetail names the field
    # streamed, the error still comes as an HTTP status, not as a 200 stream
    streamed = httpx.post(f"{gateway}/v1/completions", json={**body, "stream": True}, timeout=60)
    assert_openai_error(streamed, 400)
    # the openai client sees a BadRequestError
    with pytest.raises(openai.BadRequestError):
        openai_client(gateway).completions.create(model=MODEL, prompt=prompt, max_tokens=2)


def test_native_generate_bad_input(gateway: str) -> None:
    both = {"text": "hi", "input_ids": [1, 2]}
    assert_openai_error(httpx.post(f"{gateway}/generate", json=both, timeout=30), 400, "text")
    bad_top_p = {"text": "hi", "sampling_params": {"top_p": 2}}
    response = httpx.post(f"{gateway}/generate", json=bad_top_p, timeout=30)
    assert_openai_error(response, 400, "sampling_params.top_p")


def test_gateway_keeps_serving_after_errors(gateway: str) -> None:
    for _ in range(3):
        httpx.post(f"{gateway}/v1/chat/completions", content=b"{", timeout=30)
        httpx.post(f"{gateway}/v1/chat/completions", json=chat(top_p=9), timeout=30)
    response = httpx.post(f"{gateway}/v1/chat/completions", json=chat(), timeout=60)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{gateway}/health", timeout=10).status_code == 200


def test_api_key(strict_gateway: str) -> None:
    models = f"{strict_gateway}/v1/models"
    error = assert_openai_error(httpx.get(models, timeout=10), 401)
    assert error["code"] == "invalid_api_key"
    wrong = httpx.get(models, headers={"authorization": "Bearer sk-wrong"}, timeout=10)
    assert_openai_error(wrong, 401)
    right = httpx.get(models, headers={"authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert right.status_code == 200 and right.json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{strict_gateway}/health", timeout=10).status_code == 200  # probes: no key
    with pytest.raises(openai.AuthenticationError):
        openai_client(strict_gateway, "nope").models.list()
    assert [m.id for m in openai_client(strict_gateway, API_KEY).models.list().data] == [MODEL]


def test_oversize_body_is_413(strict_gateway: str) -> None:
    auth = {"authorization": f"Bearer {API_KEY}"}
    body = json.dumps(chat(messages=[{"role": "user", "content": "x" * SMALL_BODY_LIMIT}]))
    response = httpx.post(
        f"{strict_gateway}/v1/chat/completions",
        content=body,
        headers={**auth, "content-type": "application/json"},
        timeout=30,
    )
    assert_openai_error(response, 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield body.encode()

    response = httpx.post(
        f"{strict_gateway}/v1/chat/completions",
        content=chunked(),
        headers={**auth, "content-type": "application/json"},
        timeout=30,
    )
    assert_openai_error(response, 413)
    small = httpx.post(
        f"{strict_gateway}/v1/chat/completions", json=chat(), headers=auth, timeout=60
    )
    assert small.status_code == 200


def test_deadline(strict_gateway: str) -> None:
    auth = {"authorization": f"Bearer {API_KEY}"}
    body = chat(max_tokens=2000, ignore_eos=True)
    url = f"{strict_gateway}/v1/chat/completions"
    error = assert_openai_error(httpx.post(url, json=body, headers=auth, timeout=60), 504)
    assert error["code"] == "deadline_exceeded"
    # streamed: the stream started, so the error arrives as its last event
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=auth, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "error" in events[-1] and events[-1]["error"]["code"] == "deadline_exceeded"
    # the openai client raises it
    stream = openai_client(strict_gateway, API_KEY).chat.completions.create(
        model=MODEL,
        messages=GREETING,
        max_tokens=2000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    with pytest.raises(openai.APIError, match="deadline"):
        for _ in stream:
            pass


def test_router_down(tmp_path_factory: pytest.TempPathFactory) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    svc = start_gateway(dead, "--model-name", MODEL, log_dir=tmp_path_factory.mktemp("gw-dead"))
    try:
        base = f"http://{svc.address}"
        assert_openai_error(httpx.get(f"{base}/health", timeout=10), 503)
        response = httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=30)
        assert_openai_error(response, 503)
        streamed = httpx.post(f"{base}/v1/chat/completions", json=chat(stream=True), timeout=30)
        assert_openai_error(streamed, 503)
    finally:
        svc.stop_and_check()


def test_a_dead_router_in_the_list_is_skipped(
    router_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    routers = f"127.0.0.1:{free_port()},{router_proc.address}"  # the first one is dead
    svc = start_gateway(routers, log_dir=tmp_path_factory.mktemp("gw-failover"))
    try:
        base = f"http://{svc.address}"
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        for _ in range(2):  # round-robin starts on each router once
            response = httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=60)
            assert response.status_code == 200, response.text
    finally:
        svc.stop_and_check()
    assert "unavailable" in svc.log
