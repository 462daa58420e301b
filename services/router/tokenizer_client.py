"""The router's client of the tokenizer service: prompts → token ids, and the incremental
detokenizer that turns a worker's token stream into text deltas with stop strings applied."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import grpc
import grpc.aio

from pdmesh.errors import InvalidRequestError
from pdmesh.v1 import router_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.router.upstream import OutgoingCalls, UpstreamError, calling

# the tokenizer keeps only the prompt's last few ids as context for the first generated tokens
# (5 today); a few more cost nothing and leave it room to change
PROMPT_CONTEXT_TOKENS = 8

DetokenizeCall: TypeAlias = (
    "grpc.aio.StreamStreamCall[tokenizer_pb2.DetokenizeStreamRequest, "
    "tokenizer_pb2.DetokenizeStreamResponse]"
)


class TokenizerClient:
    def __init__(self, address: str, rpc_timeout: float) -> None:
        self.address = address
        self.label = f"tokenizer {address}"
        self._rpc_timeout = rpc_timeout
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = tokenizer_pb2_grpc.TokenizerServiceStub(self._channel)

    async def prompt_ids(
        self, request: router_pb2.RouterGenerateRequest, timeout: float
    ) -> list[int]:
        """The prompt of ``request`` as token ids: as given, tokenized text, or a rendered chat.
        ``timeout`` caps the tokenizer call (the client's remaining deadline)."""
        kind = request.WhichOneof("input")
        timeout = min(timeout, self._rpc_timeout)
        with calling(self.label):
            if kind == "token_ids":
                ids = list(request.token_ids.ids)
            elif kind == "text":
                tokenized = await self._stub.Tokenize(
                    tokenizer_pb2.TokenizeRequest(text=request.text), timeout=timeout
                )
                ids = list(tokenized.token_ids)
            elif kind == "chat":
                rendered = await self._stub.ApplyChatTemplate(
                    tokenizer_pb2.ApplyChatTemplateRequest(chat=request.chat), timeout=timeout
                )
                ids = list(rendered.token_ids)
            else:
                raise InvalidRequestError("input", "set one of text, token_ids or chat")
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
        call: DetokenizeCall = calls.track(self._stub.DetokenizeStream(timeout=timeout))
        with calling(self.label):
            await call.write(tokenizer_pb2.DetokenizeStreamRequest(options=options))
        return Detokenizer(call, self.label)

    async def close(self) -> None:
        await self._channel.close()


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
            await self._call.write(tokenizer_pb2.DetokenizeStreamRequest(tokens=tokens))
            reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise UpstreamError(
                grpc.StatusCode.INTERNAL, f"{self._label} ended the detokenize stream early"
            )
        return reply
