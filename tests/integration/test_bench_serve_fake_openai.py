"""``bench serve``'s OpenAI client against a FAKE streaming server, started here.

The fake (aiohttp, on a free loopback port, in its own thread) exists only to test the client:
SSE parsing over real TCP reads split at awkward places, TTFT/ITL bookkeeping against known
sleeps, usage vs chunk counting, and error handling. It is not the gateway; the load generator
against the real mesh is tested elsewhere. Timing assertions are lower bounds set by the fake's
own sleeps (which cannot flake on a slow machine), never upper bounds on speed.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from aiohttp import web
from tokenizers import models, pre_tokenizers

from benchmarks.serve.__main__ import main
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.openai_backend import OpenAIBackend
from benchmarks.serve.timing import RequestResult

FIRST_DELAY = 0.15  # before the first token
GAP = 0.04  # between tokens
TEXT = ["é", "世", "界", " 🎉", "!"]  # multi-byte pieces, split across TCP writes below


@dataclass
class Behavior:
    """What the fake does with the next requests."""

    first_delay: float = FIRST_DELAY
    gap: float = GAP
    pieces: list[str] | None = None  # None: one piece "tN" per asked max_tokens
    usage: bool = True  # honour stream_options.include_usage
    usage_tokens_extra: int = 0  # usage reports this many more tokens than pieces
    role_chunk: bool = True  # chat: a first delta with the role only
    status: int = 200
    error_event: bool = False  # an error event after the first piece
    done: bool = True  # end with data: [DONE]
    finish: bool = True  # a chunk with finish_reason


@dataclass
class FakeOpenAI:
    """A fake OpenAI streaming server, for testing the client only."""

    behavior: Behavior = field(default_factory=Behavior)
    received: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    url: str = ""

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(
            (request.path, body, {k.lower(): v for k, v in request.headers.items()})
        )
        b = self.behavior
        if b.status != 200:
            err = {"error": {"message": "fake says no", "type": "invalid_request_error"}}
            return web.json_response(err, status=b.status)
        chat = request.path.endswith("chat/completions")
        pieces = b.pieces if b.pieces is not None else [f"t{i} " for i in range(body["max_tokens"])]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
            data = f"data: {payload}\n\n".encode()
            # three writes per event, cut inside lines and multi-byte characters
            for part in (data[:7], data[7 : len(data) - 3], data[len(data) - 3 :]):
                await resp.write(part)
                await asyncio.sleep(0.001)

        def chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return {"id": "x", "object": "chunk", "choices": [choice], "usage": None}

        if chat and b.role_chunk:  # sent at once: it must not count as the first token
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(b.first_delay)
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(b.gap)
            await send(chunk(piece))
            if b.error_event:
                await send({"error": {"message": "fake engine fell over"}})
                return resp
        if b.finish:
            await send(chunk(None, "length"))
        include = (body.get("stream_options") or {}).get("include_usage")
        if b.usage and include:
            n = len(pieces) + b.usage_tokens_extra
            await send({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": n}})
        if b.done:
            await send("[DONE]")
        return resp


@pytest.fixture()
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/completions", server.complete)
    app.router.add_post("/v1/chat/completions", server.complete)
    loop = asyncio.new_event_loop()
    # handler_cancellation: a client that gives up (timeout test) cancels the fake's handler,
    # so teardown does not wait for its sleep
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        host, port = runner.addresses[0][:2]
        server.url = f"http://{host}:{port}"
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10), "the fake server did not start"
    yield server
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def send_one(fake: FakeOpenAI, req: BenchRequest, chat: bool = False, **cfg: Any) -> RequestResult:
    config = ServeBenchConfig(base_url=fake.url, backend="openai-chat" if chat else "openai", **cfg)

    async def go() -> RequestResult:
        async with OpenAIBackend(config, chat=chat) as backend:
            return await backend.send(req, "bench-test-0")

    return asyncio.run(go())


REQ = BenchRequest(0, "hello there", 2, 5)


def test_completions_stream_timing_text_and_usage(fake: FakeOpenAI) -> None:
    fake.behavior = Behavior(pieces=TEXT, usage_tokens_extra=2)
    r = send_one(fake, REQ, ignore_eos=True)
    assert r.success, r.error
    assert r.text == "".join(TEXT)  # multi-byte characters survive the split reads
    assert r.ttft_s >= FIRST_DELAY
    assert len(r.itl_s) == len(TEXT) - 1 and min(r.itl_s) >= GAP
    assert r.e2e_s >= FIRST_DELAY + GAP * (len(TEXT) - 1)
    assert r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-6
    # the server's usage wins over the chunk count
    assert (r.output_tokens, r.prompt_tokens, r.usage_reported) == (len(TEXT) + 2, 11, True)
    assert r.chunks == len(TEXT) and r.finish_reason == "length"
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / (r.output_tokens - 1))
    path, body, headers = fake.received[-1]
    assert path == "/v1/completions"
    assert body["model"] == "fake-model"  # resolved through GET /v1/models
    assert body["prompt"] == "hello there" and body["max_tokens"] == 5
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True
    assert headers["x-request-id"] == "bench-test-0"


def test_without_usage_tokens_are_counted_by_chunks(fake: FakeOpenAI) -> None:
    fake.behavior = Behavior(pieces=TEXT, usage=False)
    r = send_one(fake, REQ)
    assert r.success and not r.usage_reported
    assert r.output_tokens == len(TEXT) and r.prompt_tokens == REQ.prompt_len


def test_chat_role_chunk_is_not_the_first_token(fake: FakeOpenAI) -> None:
    fake.behavior = Behavior(pieces=["a", "b", "c"])
    r = send_one(fake, BenchRequest(0, "q", 1, 3, prefix="sys"), chat=True, model="given")
    assert r.success, r.error
    assert r.ttft_s >= FIRST_DELAY  # the role-only delta came at once and did not count
    assert r.text == "abc" and len(r.itl_s) == 2
    path, body, _ = fake.received[-1]
    assert path == "/v1/chat/completions" and body["model"] == "given"
    assert body["messages"][0] == {"role": "system", "content": "sys"}


@pytest.mark.parametrize(
    ("behavior", "message"),
    [
        (Behavior(status=400), "HTTP 400: fake says no"),
        (Behavior(error_event=True), "error event: fake engine fell over"),
        (Behavior(done=False, finish=False), "ended before [DONE]"),
    ],
)
def test_failures_become_failed_results(fake: FakeOpenAI, behavior: Behavior, message: str) -> None:
    fake.behavior = behavior
    r = send_one(fake, REQ)
    assert not r.success and message in r.error


def test_request_timeout(fake: FakeOpenAI) -> None:
    fake.behavior = Behavior(first_delay=30.0)
    r = send_one(fake, REQ, request_timeout=0.3)
    assert not r.success and "timed out after 0.3 s" in r.error
    assert 0.3 <= r.e2e_s < 10  # gave up near the timeout instead of waiting the 30 s out


def word_tokenizer_file(tmp_path: Path) -> Path:
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_cli_end_to_end_against_the_fake(
    fake: FakeOpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.behavior = Behavior(first_delay=0.01, gap=0.002)  # one piece per asked token
    out = tmp_path / "result.json"
    argv = ["--base-url", fake.url + "/v1", "--tokenizer", str(word_tokenizer_file(tmp_path)),
            "--num-prompts", "6", "--random-input-len", "12", "--random-output-len", "8",
            "--random-range-ratio", "0.5", "--max-concurrency", "2", "--request-rate", "50",
            "--ignore-eos", "--slo-ttft-ms", "60000", "--output-json", str(out),
            "--output-details", "--no-progress", "--input-format", "token-ids"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "Successful requests:" in table and "Goodput (req/s)" in table
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert (s["completed"], s["failed"], s["good_requests"]) == (6, 0, 6)
    assert s["usage_reported"] == 6 and s["output_len_mismatch"] == 0
    reqs = doc["requests"]
    assert [r["index"] for r in reqs] == list(range(6))
    assert all(4 <= r["expected_output_len"] <= 8 for r in reqs)
    assert s["total_output_tokens"] == sum(r["expected_output_len"] for r in reqs)
    assert s["ttft_ms"]["p50"] >= 10.0
    assert doc["model"] == "fake-model" and doc["config"]["max_concurrency"] == 2
    bodies = [b for p, b, _ in fake.received if p == "/v1/completions"]
    assert len(bodies) == 7  # one warmup + six timed
    timed = bodies[1:]
    assert sorted(len(b["prompt"]) for b in timed) == sorted(r["prompt_len"] for r in reqs)
    assert all(isinstance(b["prompt"], list) and 6 <= len(b["prompt"]) <= 12 for b in timed)


def test_cli_stops_when_the_server_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--base-url", "http://127.0.0.1:9", "--tokenizer", str(word_tokenizer_file(tmp_path)),
            "--num-prompts", "2", "--random-input-len", "4", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    assert "is it up?" in capsys.readouterr().err


def test_cli_shared_prefix_over_chat(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.behavior = Behavior(first_delay=0.0, gap=0.0)
    argv = ["--backend", "openai-chat", "--dataset", "shared-prefix", "--num-groups", "3",
            "--prompts-per-group", "4", "--system-prompt-len", "20", "--question-len", "5",
            "--shared-prefix-output-len", "3", "--warmup-requests", "0", "--no-progress",
            "--base-url", fake.url, "--tokenizer", str(word_tokenizer_file(tmp_path)),
            "--output-json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    bodies = [b for p, b, _ in fake.received if p == "/v1/chat/completions"]
    assert len(bodies) == 12
    systems = [b["messages"][0]["content"] for b in bodies]
    assert len(set(systems)) == 3 and all(systems.count(s) == 4 for s in systems)
    assert all(b["messages"][1]["role"] == "user" and b["max_tokens"] == 3 for b in bodies)
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["completed"] == 12 and summary["total_output_tokens"] == 36
