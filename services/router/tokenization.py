"""RouterService.Tokenize and Detokenize: the gateway's ``/tokenize`` and ``/detokenize``.

Text and chats are tokenized by the tokenizer service exactly as a generation's prompt is
(``Tokenize``; ``ApplyChatTemplate`` for a chat, so the template code lives there only); ids
are decoded by its ``Detokenize``, which refuses ids outside the vocabulary (INVALID_ARGUMENT
naming ``token_ids``). ``token_strs`` come from the tokenizer the router already holds for
detokenizing its streams. ``max_model_len`` is the smallest context length of the healthy
generating workers, asked with ``GetModelInfo`` (at the same time as the tokenizer call) and
kept for ``MODEL_INFO_TTL_S``, so a worker restarted with another ``--max-model-len`` is seen
again soon; a worker that does not answer in time is left out of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc.aio

from pdmesh.errors import InvalidRequestError
from pdmesh.v1 import router_pb2
from services.router.tokenizer_client import TokenizerClient
from services.router.workers import GENERATING_ROLES, WorkerHandle, WorkerSet

log = logging.getLogger(__name__)

MODEL_INFO_TIMEOUT_S = 2.0  # a side figure of the answer: a worker slower than this is skipped
MODEL_INFO_TTL_S = 30.0


class ContextLengths:
    """The workers' ``max_model_len``, asked once per worker and ``MODEL_INFO_TTL_S``."""

    def __init__(self, workers: WorkerSet, clock: Callable[[], float] = time.monotonic) -> None:
        self._workers = workers
        self._clock = clock
        self._known: dict[WorkerHandle, tuple[int, float]] = {}  # worker → (length, asked at)

    async def smallest(self, timeout: float) -> int | None:
        """The smallest context length of the healthy aggregated and decode workers (None when
        none is healthy or none answered within ``timeout``)."""
        workers = [w for w in self._workers.all() if w.healthy and w.role in GENERATING_ROLES]
        for gone in set(self._known) - set(workers):
            del self._known[gone]
        now = self._clock()
        stale = [
            w
            for w in workers
            if w not in self._known or now - self._known[w][1] >= MODEL_INFO_TTL_S
        ]
        if stale:
            limit = min(timeout, MODEL_INFO_TIMEOUT_S)
            await asyncio.gather(*(self._ask(w, limit) for w in stale))
        lengths = [self._known[w][0] for w in workers if w in self._known]
        return min(lengths) if lengths else None

    async def _ask(self, worker: WorkerHandle, timeout: float) -> None:
        try:
            info = await worker.client.model_info(timeout)
        except grpc.aio.AioRpcError as e:
            log.debug("GetModelInfo of %s failed: %s", worker.label, e.code().name)
            return
        except Exception as e:  # e.g. its channel closed by a concurrent remove: a side figure
            log.debug("GetModelInfo of %s failed: %r", worker.label, e)
            return
        if info.max_model_len > 0:
            self._known[worker] = (info.max_model_len, self._clock())


class Tokenization:
    def __init__(self, tokenizer: TokenizerClient, workers: WorkerSet) -> None:
        self._tokenizer = tokenizer
        self._lengths = ContextLengths(workers)

    async def tokenize(
        self, request: router_pb2.RouterTokenizeRequest, timeout: float
    ) -> router_pb2.RouterTokenizeResponse:
        """``timeout``: seconds left of the client's deadline (each call is capped by it)."""
        length = asyncio.ensure_future(self._lengths.smallest(timeout))
        try:
            reply = await self._tokens(request, timeout)
            if request.return_token_strs:
                reply.token_strs.extend(
                    await self._tokenizer.token_strings(reply.token_ids, timeout)
                )
            max_model_len = await length
        finally:
            length.cancel()  # a failed tokenize does not wait for the workers
        if max_model_len is not None:
            reply.max_model_len = max_model_len
        return reply

    async def _tokens(
        self, request: router_pb2.RouterTokenizeRequest, timeout: float
    ) -> router_pb2.RouterTokenizeResponse:
        kind = request.WhichOneof("input")
        given = request.HasField("add_special_tokens")
        if kind == "text":
            add_special = request.add_special_tokens if given else True
            ids = await self._tokenizer.tokenize(request.text, add_special, timeout)
            return router_pb2.RouterTokenizeResponse(token_ids=ids)
        if kind == "chat":
            rendered = await self._tokenizer.render_chat(request.chat, timeout)
            ids = list(rendered.token_ids)
            if given and request.add_special_tokens:
                # the special tokens once more around the rendered text, as vLLM does
                ids = await self._tokenizer.tokenize(rendered.text, True, timeout)
            return router_pb2.RouterTokenizeResponse(token_ids=ids, text=rendered.text)
        raise InvalidRequestError("input", "set one of text or chat")

    async def detokenize(
        self, request: router_pb2.RouterDetokenizeRequest, timeout: float
    ) -> router_pb2.RouterDetokenizeResponse:
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else None
        text = await self._tokenizer.detokenize(request.token_ids, skip, timeout)
        return router_pb2.RouterDetokenizeResponse(text=text)
