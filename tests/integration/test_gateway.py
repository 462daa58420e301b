"""The HTTP gateway in front of a real mesh (tokenizer + worker + router + gateway, each a process
on a loopback port), called with the official ``openai`` client and with plain HTTP.

Token counts are checked against transformers' own tokenizer for the same model directory, so
usage is verified by an implementation the mesh does not use. Generations stay a few tokens long:
CI machines have 2 cores.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.procs import ServiceProc, free_port

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"  # what the worker reports; the gateway lists it by default
GATEWAY_STARTUP_S = 60.0
FFFD = "\ufffd"
GREETING = [{"role": "user", "content": "Say hello in one short sentence."}]


# -- processes --------------------------------------------------------------------------------


def start_gateway(router: str, *flags: str, log_dir: Path, name: str = "gateway") -> ServiceProc:
    """``python -m services.gateway`` on a free port, returned once it answers HTTP (any status:
    a gateway in front of a dead router answers /health with 503)."""
    svc = ServiceProc("services.gateway", ["--router", router, *flags], name, free_port(), log_dir)
    deadline = time.monotonic() + GATEWAY_STARTUP_S
    while time.monotonic() < deadline:
        if svc.proc.poll() is not None:
            raise AssertionError(f"{name} exited with {svc.proc.returncode}:\n{svc.log}")
        try:
            httpx.get(f"http://{svc.address}/health", timeout=2)
            return svc
        except httpx.TransportError:
            time.sleep(0.2)
    svc.kill()
    raise AssertionError(f"{name} not answering after {GATEWAY_STARTUP_S:.0f}s:\n{svc.log}")


@pytest.fixture(scope="module")
def gateway_proc(
    router_proc: ServiceProc,
    tokenizer_proc: ServiceProc,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProc]:
    # --tokenizer: logprobs spell out their tokens
    flags = ["--tokenizer", tokenizer_proc.address, "--grace-period", "2"]
    svc = start_gateway(router_proc.address, *flags, log_dir=tmp_path_factory.mktemp("gateway"))
    yield svc
    svc.stop_and_check()


@pytest.fixture(scope="module")
def base_url(gateway_proc: ServiceProc) -> str:
    return f"http://{gateway_proc.address}"


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    # no retries: a failure must show, not be papered over
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from pdmesh.models.fetch import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model(progress=False))


def worker_load(worker: ServiceProc) -> worker_pb2.GetLoadResponse:
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        return stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


def wait_until_idle(worker: ServiceProc, since: float, limit_s: float = 1.0) -> None:
    """Assert the worker has no request and every page free within ``limit_s`` of ``since``."""
    while True:
        load = worker_load(worker)
        idle = load.num_running == 0 and load.num_waiting == 0
        if idle and load.num_free_pages == load.num_total_pages:
            return
        assert time.monotonic() - since < limit_s, f"worker busy {limit_s} s after close: {load}"
        time.sleep(0.05)


def chat_prompt_len(hf_tokenizer: Any, messages: list[dict[str, str]]) -> int:
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers: a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def sse_events(response: httpx.Response) -> list[Any]:
    """The JSON payloads of an SSE body, up to ``[DONE]`` (which must be there)."""
    events = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return events
        events.append(json.loads(data))
    raise AssertionError(f"stream ended without [DONE] after {events}")


# -- OpenAI client ----------------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_non_streamed_with_usage_and_request_id(
    client: openai.OpenAI, hf_tokenizer: Any
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=GREETING,
        max_tokens=6,
        extra_body={"ignore_eos": True},  # exactly max_tokens tokens
        extra_headers={"x-request-id": "gw-test-chat-1"},
    )
    assert raw.headers["x-request-id"] == "gw-test-chat-1"
    reply = raw.parse()
    assert reply.id == "chatcmpl-gw-test-chat-1"
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == chat_prompt_len(hf_tokenizer, GREETING)
    assert reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6


def test_request_id_generated_when_absent(base_url: str) -> None:
    body = {"model": MODEL, "messages": GREETING, "max_tokens": 1}
    first = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    second = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert first.status_code == second.status_code == 200
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(ids)
    assert first.json()["id"] == f"chatcmpl-{first.headers['x-request-id']}"


def test_chat_streamed_equals_non_streamed_for_a_seed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=GREETING,
        max_tokens=10,
        temperature=0.8,
        seed=1234,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and not chunks[-1].choices
    assert usage_chunks[0].usage == whole.usage


def test_seed_reproducibility_and_n(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a word about the sea."}],
        max_tokens=8,
        temperature=0.8,
        extra_body={"ignore_eos": True},
    )
    first = client.chat.completions.create(**kwargs, seed=7)
    again = client.chat.completions.create(**kwargs, seed=7)
    assert first.choices[0].message.content == again.choices[0].message.content
    # n choices: choice i uses seed + i, so choice 0 repeats the single answer
    pair = client.chat.completions.create(**kwargs, seed=7, n=2)
    assert [c.index for c in pair.choices] == [0, 1]
    assert pair.choices[0].message.content == first.choices[0].message.content
    assert pair.choices[1].message.content == (
        client.chat.completions.create(**kwargs, seed=8).choices[0].message.content
    )
    assert pair.usage is not None and first.usage is not None
    assert pair.usage.prompt_tokens == first.usage.prompt_tokens  # the prompt counts once
    assert pair.usage.completion_tokens == 16


def test_n_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL, prompt="The ocean is", max_tokens=6, temperature=0.9, seed=21, n=2
    )
    whole = client.completions.create(**kwargs)
    texts = ["", ""]
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]


def test_completions_greedy_with_usage(client: openai.OpenAI, hf_tokenizer: Any) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(hf_tokenizer(prompt)["input_ids"])
    assert 1 <= reply.usage.completion_tokens <= 5
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_completions_token_id_prompt_and_batch(client: openai.OpenAI, hf_tokenizer: Any) -> None:
    ids = hf_tokenizer("The capital of France is")["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    by_text = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(
        model=MODEL, prompt=["The capital of France is", "One, two,"], max_tokens=3, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text[: len(batch.choices[0].text)]


def test_stop_strings(client: openai.OpenAI) -> None:
    prompt = "List the days of the week: Monday, Tuesday,"
    kwargs: dict[str, Any] = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    free = client.completions.create(**kwargs).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip(), f"greedy text too short to cut: {free!r}"
    expected = free[: free.index(stop)]
    stopped = client.completions.create(**kwargs, stop=[stop, "@@never@@"])
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kwargs, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_multibyte_characters_arrive_intact(client: openai.OpenAI, base_url: str) -> None:
    # the byte-level tokenizer spells CJK and emoji as several byte tokens each; a repeated
    # pattern makes greedy decoding produce them, split across stream messages
    prompt = "你好 👋\n" * 6
    kwargs: dict[str, Any] = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    deltas = [
        c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices
    ]
    assert whole.startswith("你好 👋")
    assert FFFD not in whole
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == whole
    # SGLang-native stream: cumulative text, intact at every step
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
    with httpx.stream("POST", f"{base_url}/generate", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert all(FFFD not in e["text"] for e in events)
    assert events[-1]["text"] == whole


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=GREETING,
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        # greedy: the sampled token is the most likely one
        assert entry.top_logprobs[0].token == entry.token


def test_completions_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=3, logprobs=2, temperature=0
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    assert logprobs.top_logprobs is not None
    assert all(len(t) <= 2 for t in logprobs.top_logprobs)


# -- SGLang-native /generate ------------------------------------------------------------------


def test_generate_native(base_url: str, hf_tokenizer: Any) -> None:
    body: dict[str, Any] = {
        "text": "The capital of France is",
        "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
    }
    reply = httpx.post(f"{base_url}/generate", json=body, timeout=60).json()
    assert reply["text"] and len(reply["output_ids"]) == 4
    assert hf_tokenizer.decode(reply["output_ids"]) == reply["text"]
    meta = reply["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["prompt_tokens"] == len(hf_tokenizer(body["text"])["input_ids"])
    assert meta["completion_tokens"] == 4
    # token ids in, the same answer out
    ids = hf_tokenizer(body["text"])["input_ids"]
    by_ids = {"input_ids": ids, "sampling_params": body["sampling_params"]}
    assert (
        httpx.post(f"{base_url}/generate", json=by_ids, timeout=60).json()["text"] == reply["text"]
    )
    # streamed: cumulative text, finish_reason only on the last event
    with httpx.stream("POST", f"{base_url}/generate", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1]["text"] == reply["text"]
    assert [e["meta_info"]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    # a batch answers a list
    batch = {"text": [body["text"], "Hi"], "sampling_params": {"max_new_tokens": 2}}
    assert len(httpx.post(f"{base_url}/generate", json=batch, timeout=60).json()) == 2


# -- cancellation -----------------------------------------------------------------------------


def test_client_disconnect_cancels_the_request(
    client: openai.OpenAI, worker_proc: ServiceProc
) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=GREETING,
        max_tokens=1000,
        stream=True,
        extra_body={"ignore_eos": True},  # would run for a long while
    )
    received = [next(stream) for _ in range(4)]
    assert received[-1].choices[0].delta.content is not None
    busy = worker_load(worker_proc)
    assert busy.num_running == 1 and busy.num_free_pages < busy.num_total_pages
    stream.close()  # closes the HTTP connection mid-stream
    wait_until_idle(worker_proc, since=time.monotonic())


def test_client_disconnect_cancels_a_non_streamed_request(
    base_url: str, worker_proc: ServiceProc
) -> None:
    body = {"model": MODEL, "messages": GREETING, "max_tokens": 1000, "ignore_eos": True}
    outcome: list[BaseException] = []

    def call() -> None:  # gives up after 3 s: httpx closes the connection
        try:
            httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=3.0)
        except httpx.TimeoutException as e:
            outcome.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 3.0
    while worker_load(worker_proc).num_running == 0:  # the request did reach the worker
        assert time.monotonic() < deadline, "the request never started on the worker"
        time.sleep(0.05)
    caller.join()
    assert outcome and isinstance(outcome[0], httpx.TimeoutException)
    wait_until_idle(worker_proc, since=time.monotonic())
