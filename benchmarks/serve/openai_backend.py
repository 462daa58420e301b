"""The OpenAI-compatible HTTP backend: streamed ``/v1/completions`` or ``/v1/chat/completions``.

Every request asks for ``stream_options.include_usage`` so the token counts are the server's;
servers that ignore it are counted by streamed chunks instead (see ``timing``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.serve.backends import CONNECT_TIMEOUT_S, Backend, BackendError
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.sse import SSEDecoder
from benchmarks.serve.timing import RequestResult, StreamClock

ERROR_BODY_CHARS = 300  # of a non-JSON error body, kept in the error message


class OpenAIBackend(Backend):
    def __init__(self, cfg: ServeBenchConfig, chat: bool) -> None:
        super().__init__(cfg)
        base = cfg.base_url.rstrip("/")
        # The openai client's base_url convention ends in /v1; accept that spelling too.
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.chat = chat
        self.url = self.base_url + ("/v1/chat/completions" if chat else "/v1/completions")
        self.model = cfg.model
        self._headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def target(self) -> str:
        return self.url

    async def start(self) -> None:
        # limit=0: aiohttp's default pool of 100 connections would silently cap the
        # concurrency below --max-concurrency; arrivals and the semaphore are the only limits.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), headers=self._headers
        )
        if not self.model:
            self.model = await self._first_model()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _first_model(self) -> str:
        url = self.base_url + "/v1/models"
        try:
            async with self._client().get(
                url, timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)
            ) as resp:
                if resp.status != 200:
                    detail = error_message(await resp.text())
                    raise BackendError(f"GET {url}: HTTP {resp.status}: {detail}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
            raise BackendError(f"GET {url} failed ({type(e).__name__}: {e}); is it up?") from e
        models = body.get("data") if isinstance(body, dict) else None
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise BackendError(f"GET {url} listed no model; pass --model")
        return str(models[0]["id"])

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OpenAIBackend.start() was not awaited")
        return self._session

    def payload(self, req: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": req.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            body["messages"] = req.messages()
        else:
            body["prompt"] = req.full_prompt()
        if self.ignore_eos:
            body["ignore_eos"] = True  # the SGLang/vLLM extension
        body.update(self.extra)
        return body

    async def _stream(
        self, req: BenchRequest, request_id: str, clock: StreamClock, result: RequestResult
    ) -> RequestResult:
        headers = {"x-request-id": request_id}
        async with self._client().post(self.url, json=self.payload(req), headers=headers) as resp:
            if resp.status != 200:
                return clock.fail(result, f"HTTP {resp.status}: {error_message(await resp.text())}")
            stream = ChunkStream(chat=self.chat, clock=clock)
            decoder = SSEDecoder()
            # Read to the end even after [DONE] (the clock stopped there), so the connection
            # goes back to the pool for reuse; stop at once only on an error event.
            async for chunk in resp.content.iter_any():
                for data in decoder.feed(chunk):
                    stream.event(data)
                if stream.error:
                    break
            else:
                for data in decoder.flush():
                    stream.event(data)
        return stream.result(result)


@dataclass
class ChunkStream:
    """The events of one OpenAI stream, folded into text, a finish reason and usage."""

    chat: bool
    clock: StreamClock
    texts: list[str] = field(default_factory=list)
    finish_reason: str = ""
    usage: dict[str, Any] | None = None
    done: bool = False  # saw "data: [DONE]"
    error: str = ""

    @property
    def over(self) -> bool:
        return self.done or bool(self.error)

    def event(self, data: str) -> None:
        if self.over:
            return
        if data.strip() == "[DONE]":
            self.done = True
            self.clock.stop()
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            self.error = f"malformed SSE data: {data[:ERROR_BODY_CHARS]!r}"
            return
        if not isinstance(obj, dict):
            self.error = f"unexpected SSE data: {data[:ERROR_BODY_CHARS]!r}"
            return
        if obj.get("error"):  # an error after the 200 arrives as an event
            self.error = "error event: " + error_message(json.dumps(obj))
            return
        for choice in obj.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # n > 1 is not benchmarked; time the first choice only
            text = self._text(choice)
            if text:
                self.clock.arrived(1)
                self.texts.append(text)
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        if isinstance(obj.get("usage"), dict):  # servers may send "usage": null on each chunk
            self.usage = obj["usage"]

    def _text(self, choice: dict[str, Any]) -> str:
        if not self.chat:
            return str(choice.get("text") or "")
        delta = choice.get("delta") or {}
        # A first delta with only the role carries no token; reasoning models stream their
        # thinking in reasoning_content, which is output all the same.
        return str(delta.get("content") or delta.get("reasoning_content") or "")

    def result(self, result: RequestResult) -> RequestResult:
        if self.error:
            return self.clock.fail(result, self.error)
        if not self.done and not self.finish_reason:
            return self.clock.fail(result, "the stream ended before [DONE] or a finish_reason")
        result.text = "".join(self.texts)
        result.finish_reason = self.finish_reason
        usage = self.usage or {}
        return self.clock.finish(
            result,
            _int_or_none(usage.get("completion_tokens")),
            _int_or_none(usage.get("prompt_tokens")),
        )


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def error_message(body: str) -> str:
    """The ``error.message`` of an OpenAI error body, else the body's start."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:ERROR_BODY_CHARS]
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(err, str):
        return err
    if isinstance(obj, dict) and obj.get("detail"):  # FastAPI's own error shape
        return str(obj["detail"])[:ERROR_BODY_CHARS]
    return body.strip()[:ERROR_BODY_CHARS]
