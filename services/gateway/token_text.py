"""Token ids → token strings, for the ``token`` fields of logprobs.

The router streams token ids and text but not each token's own string, so logprobs need a
look-up: through a tokenizer service when ``--tokenizer`` names one (each id decoded on its own,
special tokens kept, cached for the process: at most one entry per vocabulary id), otherwise
vLLM's ``token_id:<id>`` spelling, which clients already know.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.telemetry import client_interceptors
from pdmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc

LOOKUP_TIMEOUT_S = 5.0


class TokenTexts:
    def __init__(self, tokenizer_address: str = "", tls: TLSConfig = PLAINTEXT) -> None:
        self._channel = (
            tls.channel(tokenizer_address, interceptors=client_interceptors())
            if tokenizer_address
            else None
        )
        self._stub = (
            tokenizer_pb2_grpc.TokenizerServiceStub(self._channel) if self._channel else None
        )
        self._cache: dict[int, str] = {}

    async def lookup(self, token_ids: Iterable[int]) -> dict[int, str]:
        """The string of each id (raises ``AioRpcError`` if the tokenizer service fails)."""
        ids = set(token_ids)
        if self._stub is None:
            return {i: f"token_id:{i}" for i in ids}
        missing = sorted(ids - self._cache.keys())
        if missing:
            texts = await asyncio.gather(*(self._decode(i) for i in missing))
            self._cache.update(zip(missing, texts))
        return {i: self._cache[i] for i in ids}

    async def _decode(self, token_id: int) -> str:
        assert self._stub is not None
        reply = await self._stub.Detokenize(
            tokenizer_pb2.DetokenizeRequest(token_ids=[token_id], skip_special_tokens=False),
            timeout=LOOKUP_TIMEOUT_S,
        )
        return str(reply.text)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
