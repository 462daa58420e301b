"""The router's client of the tokenizer service: prompts → token ids, and the incremental
detokenizer that turns a worker's token stream into text deltas with stop strings applied.

It holds a live set of tokenizer instances (``--tokenizer``, or those Consul reports) and
spreads calls over them round-robin; every instance serves the same model's tokenizer, so the
tokenize call and the detokenize stream of one request may go to different ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import grpc
import grpc.aio

from pdmesh.errors import InvalidRequestError
from pdmesh.rpc import keepalive
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.telemetry import client_interceptors
from pdmesh.v1 import router_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.router.upstream import OutgoingCalls, UpstreamError, calling

log = logging.getLogger(__name__)

# the tokenizer keeps only the prompt's last few ids as context for the first generated tokens
# (5 today); a few more cost nothing and leave it room to change
PROMPT_CONTEXT_TOKENS = 8

DetokenizeCall: TypeAlias = (
    "grpc.aio.StreamStreamCall[tokenizer_pb2.DetokenizeStreamRequest, "
    "tokenizer_pb2.DetokenizeStreamResponse]"
)


@dataclass
class _Instance:
    address: str
    channel: grpc.aio.Channel
    stub: tokenizer_pb2_grpc.TokenizerServiceStub

    @property
    def label(self) -> str:
        return f"tokenizer {self.address}"


class TokenizerClient:
    def __init__(
        self,
        addresses: str | Sequence[str],
        rpc_timeout: float,
        tls: TLSConfig = PLAINTEXT,
        drain_timeout: float | None = None,
    ) -> None:
        """``addresses``: the tokenizers to start with (``host:port``; more via ``add``);
        ``tls``: how the channels to them are secured (``--tls-*``); ``drain_timeout``: how
        long a removed tokenizer's open detokenize streams (whole generations) may run before
        its channel is closed under them (default ``rpc_timeout``)."""
        self._rpc_timeout = rpc_timeout
        self._drain_timeout = rpc_timeout if drain_timeout is None else drain_timeout
        self._closing: set[asyncio.Task[None]] = set()
        self._tls = tls
        self._instances: dict[str, _Instance] = {}
        self._turn = itertools.count()
        for address in [addresses] if isinstance(addresses, str) else addresses:
            if address:
                self.add(address)

    @property
    def addresses(self) -> list[str]:
        return list(self._instances)

    def add(self, address: str) -> None:
        if address in self._instances:
            return
        # pings find a hung tokenizer within seconds (pdmesh.rpc.keepalive)
        channel = self._tls.channel(
            address, keepalive.CLIENT_OPTIONS, interceptors=client_interceptors()
        )
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        self._instances[address] = _Instance(address, channel, stub)
        log.info("added tokenizer %s", address)

    async def remove(self, address: str) -> None:
        """Stop using ``address``; its open detokenize streams run on until they end."""
        instance = self._instances.pop(address, None)
        if instance is not None:
            log.info("removed tokenizer %s", address)
            # in the background: the caller (a Consul watch) must not wait out the streams
            close = instance.channel.close(grace=self._drain_timeout)
            task = asyncio.get_running_loop().create_task(close)
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _pick(self) -> _Instance:
        if not self._instances:
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE, "no tokenizer service is known")
        instances = list(self._instances.values())
        return instances[next(self._turn) % len(instances)]

    async def prompt_ids(
        self, request: router_pb2.RouterGenerateRequest, timeout: float
    ) -> list[int]:
        """The prompt of ``request`` as token ids: as given, tokenized text, or a rendered chat.
        ``timeout`` caps the tokenizer call (the client's remaining deadline)."""
        kind = request.WhichOneof("input")
        timeout = min(timeout, self._rpc_timeout)
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidRequestError(kind, "the prompt must not be empty")
            return ids
        if kind not in ("text", "chat"):
            raise InvalidRequestError("input", "set one of text, token_ids or chat")
        tokenizer = self._pick()
        with calling(tokenizer.label):
            if kind == "text":
                tokenized = await tokenizer.stub.Tokenize(
                    tokenizer_pb2.TokenizeRequest(text=request.text), timeout=timeout
                )
                ids = list(tokenized.token_ids)
            else:
                rendered = await tokenizer.stub.ApplyChatTemplate(
                    tokenizer_pb2.ApplyChatTemplateRequest(chat=request.chat), timeout=timeout
                )
                ids = list(rendered.token_ids)
        if not ids:
            raise InvalidRequestError(kind, "the prompt must not be empty")
        return ids

    async def open_detokenizer(
        self,
        prompt_ids: Sequence[int],
        stop: Sequence[str],
        skip_special_tokens: bool | None,
        timeout: float,
        calls: OutgoingCalls,
    ) -> Detokenizer:
        options = tokenizer_pb2.DetokenizeStreamOptions(
            stop=stop, prompt_token_ids=prompt_ids[-PROMPT_CONTEXT_TOKENS:]
        )
        if skip_special_tokens is not None:
            options.skip_special_tokens = skip_special_tokens
        tokenizer = self._pick()
        call: DetokenizeCall = calls.track(tokenizer.stub.DetokenizeStream(timeout=timeout))
        with calling(tokenizer.label):
            await call.write(tokenizer_pb2.DetokenizeStreamRequest(options=options))
        return Detokenizer(call, tokenizer.label)

    async def close(self) -> None:
        for task in list(self._closing):  # removed ones: their streams end now too
            task.cancel()
        for instance in list(self._instances.values()):
            await instance.channel.close()
        self._instances.clear()


class Detokenizer:
    """One DetokenizeStream call: each ``push`` sends tokens and returns the one response the
    protocol promises for them."""

    def __init__(self, call: DetokenizeCall, label: str) -> None:
        self._call = call
        self._label = label

    async def push(
        self, token_ids: Sequence[int], final: bool
    ) -> tokenizer_pb2.DetokenizeStreamResponse:
        tokens = tokenizer_pb2.DetokenizeStreamTokens(token_ids=token_ids, final=final)
        with calling(self._label):
            try:
                await self._call.write(tokenizer_pb2.DetokenizeStreamRequest(tokens=tokens))
            except asyncio.InvalidStateError:
                # the call ended between two pushes (the tokenizer died or went away): grpc
                # refuses the write without saying why; the call's status does
                raise await self._ended() from None
            reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise UpstreamError(
                grpc.StatusCode.INTERNAL, f"{self._label} ended the detokenize stream early"
            )
        return reply

    async def _ended(self) -> grpc.aio.AioRpcError:
        code, details = await self._call.code(), await self._call.details()
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    async def close(self) -> None:
        """End the call cleanly once the tokenizer has ended its side (after a final or
        stopping response): half-close and read its end, so the call's client span ends now
        rather than whenever the call is garbage-collected."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._call.done_writing()
            await self._call.read()
