"""Clients and a closed-loop driver for the router benchmarks: token-id prompts in, token ids
out, over SGLang's HTTP ``/generate``, pdmesh's ``RouterService`` or a worker's
``WorkerService`` directly.

Every client asks for token ids only (``detokenize: false``, which SGLang-style backends here
accept and ignore), so no arm involves a tokenizer. ``closed_loop`` keeps ``concurrency``
requests in flight until every prompt was sent and records each one's latency (and, for
streamed replies, its time to first token).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import grpc
import grpc.aio

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

GRPC_OPTIONS = (("grpc.max_receive_message_length", 64 * 1024 * 1024),)


class RequestFailed(Exception):
    """One request got an error status or a malformed reply."""


@dataclass(frozen=True)
class Reply:
    token_ids: list[int]
    latency_s: float
    ttft_s: float | None = None  # streamed replies: seconds to the first token
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prefix-cache hits the serving worker reported
    worker: str = ""  # the serving worker, where the reply names it


class Client(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def generate(self, prompt: list[int], max_new_tokens: int) -> Reply: ...


class HttpGenerate:
    """``POST {base_url}/generate`` with ``input_ids`` (SGLang's native API); ``stream``: as
    server-sent events, for the time to first token; ``sampling``: more sampling_params."""

    def __init__(
        self,
        base_url: str,
        timeout: float,
        stream: bool = False,
        sampling: Mapping[str, Any] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._stream = stream
        self._sampling = dict(sampling or {})
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # keep-alive connections, as many as requests in flight
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def generate(self, prompt: list[int], max_new_tokens: int) -> Reply:
        assert self._session is not None, "open() first"
        body = {
            "input_ids": prompt,
            "sampling_params": {
                "max_new_tokens": max_new_tokens,
                "detokenize": False,
                **self._sampling,
            },
            "stream": self._stream,
        }
        start = time.perf_counter()
        async with self._session.post(self.base_url + "/generate", json=body) as resp:
            if resp.status != 200:
                raise RequestFailed(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            if not self._stream:
                out = await resp.json(content_type=None)
                return _http_reply(out, time.perf_counter() - start, None)
            ttft, last = None, None
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RequestFailed(f"stream error: {event['error']}")
                if ttft is None and event.get("output_ids"):
                    ttft = time.perf_counter() - start
                last = event
        if last is None:
            raise RequestFailed("the stream ended without an event")
        return _http_reply(last, time.perf_counter() - start, ttft)


def _http_reply(out: dict[str, Any], latency: float, ttft: float | None) -> Reply:
    try:
        meta = out["meta_info"]
        return Reply(
            list(out["output_ids"]),
            latency,
            ttft,
            int(meta.get("prompt_tokens") or 0),
            int(meta.get("cached_tokens") or 0),
            str(meta.get("pdmesh_worker") or ""),
        )
    except (KeyError, TypeError) as e:
        raise RequestFailed(f"not an SGLang /generate body: {str(out)[:300]}") from e


class _GrpcClient:
    def __init__(
        self, target: str, timeout: float, sampling: Mapping[str, Any] | None = None
    ) -> None:
        """``sampling``: more SamplingParams fields for every request."""
        self.target = target
        self._timeout = timeout
        self._sampling = dict(sampling or {})
        self._channel: grpc.aio.Channel | None = None

    async def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=GRPC_OPTIONS)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    @property
    def channel(self) -> grpc.aio.Channel:
        assert self._channel is not None, "open() first"
        return self._channel


class RouterGrpc(_GrpcClient):
    """pdmesh ``RouterService.Generate`` with ``token_ids`` and ``detokenize=false``."""

    async def open(self) -> None:
        await super().open()
        self._stub = router_pb2_grpc.RouterServiceStub(self.channel)

    async def generate(self, prompt: list[int], max_new_tokens: int) -> Reply:
        request = router_pb2.RouterGenerateRequest(
            token_ids=router_pb2.TokenIds(ids=prompt),
            sampling_params=common_pb2.SamplingParams(
                max_new_tokens=max_new_tokens, detokenize=False, **self._sampling
            ),
        )
        start = time.perf_counter()
        return await _read_stream(self._stub.Generate(request, timeout=self._timeout), start)


class WorkerGrpc(_GrpcClient):
    """A worker's own ``WorkerService.Generate``: the direct baseline of the gRPC arms."""

    async def open(self) -> None:
        await super().open()
        self._stub = worker_pb2_grpc.WorkerServiceStub(self.channel)

    async def generate(self, prompt: list[int], max_new_tokens: int) -> Reply:
        request = worker_pb2.GenerateRequest(
            request_id=f"bench-{time.monotonic_ns():x}",
            token_ids=prompt,
            sampling_params=common_pb2.SamplingParams(
                max_new_tokens=max_new_tokens, **self._sampling
            ),
        )
        start = time.perf_counter()
        return await _read_stream(self._stub.Generate(request, timeout=self._timeout), start)


async def _read_stream(call: Any, start: float) -> Reply:
    """A router's or a worker's Generate stream (both carry token_ids, finish_reason, usage;
    a router's also worker_id) read to its end."""
    ids: list[int] = []
    ttft = None
    usage = common_pb2.Usage()
    worker = ""
    try:
        async for msg in call:
            worker = getattr(msg, "worker_id", "") or worker
            if ttft is None and msg.token_ids:
                ttft = time.perf_counter() - start
            ids.extend(msg.token_ids)
            if msg.HasField("usage"):
                usage = msg.usage
            if msg.finish_reason == common_pb2.FINISH_REASON_ERROR:
                raise RequestFailed(f"finished with an error: {msg.error}")
    except grpc.aio.AioRpcError as e:
        raise RequestFailed(f"{e.code().name}: {e.details()}") from e
    latency = time.perf_counter() - start
    return Reply(ids, latency, ttft, usage.prompt_tokens, usage.cached_tokens, worker)


class ManyClients:
    """Requests spread round-robin over several clients (the direct baselines: one client per
    worker, as a router would spread them)."""

    def __init__(self, clients: Sequence[Client]) -> None:
        self._clients = list(clients)
        self._turn = 0

    async def open(self) -> None:
        for c in self._clients:
            await c.open()

    async def close(self) -> None:
        for c in self._clients:
            await c.close()

    async def generate(self, prompt: list[int], max_new_tokens: int) -> Reply:
        client = self._clients[self._turn % len(self._clients)]
        self._turn += 1
        return await client.generate(prompt, max_new_tokens)


@dataclass
class Phase:
    """The outcome of one ``closed_loop`` run."""

    replies: dict[int, Reply] = field(default_factory=dict)  # by prompt index
    failures: int = 0
    first_error: str = ""
    wall_s: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.replies) / self.wall_s if self.wall_s > 0 else 0.0


async def closed_loop(
    client: Client,
    prompts: Sequence[list[int]],
    max_new_tokens: int | Sequence[int],
    concurrency: int,
    on_done: Callable[[], None] = lambda: None,
) -> Phase:
    """Send every prompt with at most ``concurrency`` in flight; ``on_done`` after each."""
    phase = Phase()
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < len(prompts):
            i = next_index
            next_index += 1
            try:
                phase.replies[i] = await client.generate(prompts[i], budgets[i])
            except (RequestFailed, aiohttp.ClientError, asyncio.TimeoutError) as e:
                phase.failures += 1
                phase.first_error = phase.first_error or f"{type(e).__name__}: {e}"
            on_done()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(prompts))))))
    phase.wall_s = time.perf_counter() - start
    return phase
