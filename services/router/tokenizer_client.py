"""The router's client of the tokenizer service: prompts → token ids, and the detokenizer that
turns a worker's token stream into text deltas with stop strings applied — in this process.

It holds a live set of tokenizer instances (``--tokenizer``, or those Consul reports) and
spreads tokenize calls over them round-robin; every instance serves the same model's
tokenizer. Generated tokens never go to them: the router fetches the tokenizer itself once
(``GetTokenizerFiles``; eagerly when the first instance is added, else by the first request
that needs it), keeps it for its life, and detokenizes each stream with the Rust
``tokenizers`` library (``pdmesh.tokenizer.fast_detokenizer``). So a tokenizer that dies fails
only new requests that need tokenizing (UNAVAILABLE, naming it), never a stream in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import tokenizers

from pdmesh.errors import InvalidRequestError
from pdmesh.rpc import keepalive
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.telemetry import client_interceptors
from pdmesh.tokenizer import StreamDelta
from pdmesh.tokenizer.fast_detokenizer import FastDetokenizer
from pdmesh.v1 import common_pb2, router_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.router.upstream import OutgoingCalls, UpstreamError, calling

log = logging.getLogger(__name__)

# GetTokenizerFiles carries tokenizer.json: 3.5 MB for SmolLM2, several times that for models
# with larger vocabularies, past grpc's default 4 MiB receive limit
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (
    *keepalive.CLIENT_OPTIONS,  # pings find a hung tokenizer within seconds
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    # each channel its own connection: a fresh one (``_reconnect``) must not inherit the
    # reconnect backoff of the one it replaces through grpc's process-wide subchannel pool
    ("grpc.use_local_subchannel_pool", 1),
)


@dataclass
class _Instance:
    address: str
    channel: grpc.aio.Channel
    stub: tokenizer_pb2_grpc.TokenizerServiceStub

    @property
    def label(self) -> str:
        return f"tokenizer {self.address}"


@dataclass(frozen=True)
class LocalTokenizer:
    """The tokenizer a tokenizer service gave out (GetTokenizerFiles), loaded in the router."""

    model_name: str
    backend: tokenizers.Tokenizer
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    special_token_ids: tuple[int, ...]
    default_skip_special_tokens: bool

    @classmethod
    def from_pb(cls, files: tokenizer_pb2.GetTokenizerFilesResponse) -> LocalTokenizer:
        """Raises ``Exception`` (what ``tokenizers`` raises) when tokenizer_json does not load."""
        return cls(
            model_name=files.model_name,
            backend=tokenizers.Tokenizer.from_str(files.tokenizer_json),
            vocab_size=files.vocab_size,
            eos_token_ids=tuple(files.eos_token_ids),
            special_token_ids=tuple(files.special_token_ids),
            default_skip_special_tokens=files.default_skip_special_tokens,
        )

    def detokenizer(
        self, prompt_ids: Sequence[int], stop: Sequence[str], skip_special_tokens: bool | None
    ) -> Detokenizer:
        skip = (
            self.default_skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        )
        detok = FastDetokenizer(self.backend, skip, tuple(stop), prompt_ids)
        return Detokenizer(detok, self.vocab_size)


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
        long a removed tokenizer's calls in flight may run before its channel is closed under
        them (default ``rpc_timeout``)."""
        self._rpc_timeout = rpc_timeout
        self._drain_timeout = rpc_timeout if drain_timeout is None else drain_timeout
        self._closing: set[asyncio.Task[None]] = set()
        self._tls = tls
        self._instances: dict[str, _Instance] = {}
        self._turn = itertools.count()
        self._local: LocalTokenizer | None = None  # once fetched, for the router's life
        self._fetch: asyncio.Task[LocalTokenizer] | None = None  # a fetch in flight
        for address in [addresses] if isinstance(addresses, str) else addresses:
            if address:
                self.add(address)

    @property
    def addresses(self) -> list[str]:
        return list(self._instances)

    @property
    def local_tokenizer(self) -> LocalTokenizer | None:
        """The tokenizer the router detokenizes with, once fetched."""
        return self._local

    def add(self, address: str) -> None:
        if address in self._instances:
            return
        instance = self._instances[address] = self._connect(address)
        log.info("added tokenizer %s", address)
        if self._local is None and self._fetch is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # built outside the event loop: the first request fetches
                return
            # in the background, so the first request does not pay for it; waits for a
            # tokenizer that is still starting (``wait_for_ready``) up to rpc_timeout
            self._start_fetch(instance, self._rpc_timeout, wait_for_ready=True)

    async def remove(self, address: str) -> None:
        """Stop using ``address``; its calls in flight run on until they end."""
        instance = self._instances.pop(address, None)
        if instance is not None:
            log.info("removed tokenizer %s", address)
            self._close_later(instance.channel)

    def _connect(self, address: str) -> _Instance:
        channel = self._tls.channel(address, CHANNEL_OPTIONS, interceptors=client_interceptors())
        return _Instance(address, channel, tokenizer_pb2_grpc.TokenizerServiceStub(channel))

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        # in the background: the caller (a Consul watch, a request) must not wait out the calls
        task = asyncio.get_running_loop().create_task(channel.close(grace=self._drain_timeout))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @contextlib.contextmanager
    def _calling(self, instance: _Instance) -> Iterator[None]:
        """``calling(instance.label)``, and a fresh channel to it after an UNAVAILABLE."""
        try:
            with calling(instance.label):
                yield
        except UpstreamError as e:
            if e.code == grpc.StatusCode.UNAVAILABLE:
                self._reconnect(instance)
            raise

    def _reconnect(self, instance: _Instance) -> None:
        """NOTE: after a failed connect, grpc fails every call on the channel until its
        reconnect backoff (1 s, growing to 2 min) has passed, so a tokenizer restarted on its
        address would stay unused that long. A new channel dials on its first call: the next
        request finds a tokenizer that is back at once, or fails at once while it is not."""
        if self._instances.get(instance.address) is not instance:
            return  # removed, or a concurrent failure replaced it already
        self._instances[instance.address] = self._connect(instance.address)
        self._close_later(instance.channel)

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
        with self._calling(tokenizer):
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

    async def tokenize(self, text: str, add_special_tokens: bool, timeout: float) -> list[int]:
        """``text`` as token ids (the tokenizer service's Tokenize); ``timeout`` caps the call
        (the client's remaining deadline), as do ``rpc_timeout``."""
        tokenizer = self._pick()
        with self._calling(tokenizer):
            reply = await tokenizer.stub.Tokenize(
                tokenizer_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                timeout=min(timeout, self._rpc_timeout),
            )
        return list(reply.token_ids)

    async def render_chat(
        self, chat: common_pb2.ChatRequest, timeout: float
    ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        """``chat`` rendered with the model's chat template, and that text's token ids (no
        special tokens added: the template placed them), as a chat generation's prompt."""
        tokenizer = self._pick()
        with self._calling(tokenizer):
            rendered: tokenizer_pb2.ApplyChatTemplateResponse = (
                await tokenizer.stub.ApplyChatTemplate(
                    tokenizer_pb2.ApplyChatTemplateRequest(chat=chat),
                    timeout=min(timeout, self._rpc_timeout),
                )
            )
        return rendered

    async def detokenize(
        self, token_ids: Sequence[int], skip_special_tokens: bool | None, timeout: float
    ) -> str:
        """``token_ids`` as text (the tokenizer service's Detokenize, which refuses ids outside
        the vocabulary with INVALID_ARGUMENT naming ``token_ids``)."""
        request = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids)
        if skip_special_tokens is not None:
            request.skip_special_tokens = skip_special_tokens
        tokenizer = self._pick()
        with self._calling(tokenizer):
            reply = await tokenizer.stub.Detokenize(
                request, timeout=min(timeout, self._rpc_timeout)
            )
        return reply.text

    async def token_strings(self, token_ids: Sequence[int], timeout: float) -> list[str]:
        """Each id's string in the vocabulary (transformers' ``convert_ids_to_tokens``), from
        the tokenizer this router detokenizes with (fetched within ``timeout`` if not yet)."""
        backend = (self._local or await self.local_tokenizer_within(timeout)).backend
        return [backend.id_to_token(t) or "" for t in token_ids]

    async def open_detokenizer(
        self,
        prompt_ids: Sequence[int],
        stop: Sequence[str],
        skip_special_tokens: bool | None,
        timeout: float,
        calls: OutgoingCalls,
    ) -> Detokenizer:
        """A detokenizer for one generation, in this process. Only the first request(s) may
        wait, for the tokenizer's files (within ``timeout``); ``calls`` is not used: the fetch
        is shared by every request, so none of them may cancel it."""
        local = self._local or await self.local_tokenizer_within(timeout)
        return local.detokenizer(prompt_ids, stop, skip_special_tokens)

    async def local_tokenizer_within(self, timeout: float) -> LocalTokenizer:
        """The tokenizer, fetched from an instance unless it is already here or on its way;
        a failed fetch is an ``UpstreamError`` naming the tokenizer it asked."""
        if self._local is not None:
            return self._local
        fetch = self._fetch
        if fetch is None:
            fetch = self._start_fetch(self._pick(), min(timeout, self._rpc_timeout))
        try:
            # shielded: a request that gives up must not cancel the others' fetch
            return await asyncio.wait_for(asyncio.shield(fetch), timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on
            raise UpstreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the tokenizer's files did not arrive within {timeout:.1f}s",
            ) from None

    def _start_fetch(
        self, instance: _Instance, timeout: float, wait_for_ready: bool = False
    ) -> asyncio.Task[LocalTokenizer]:
        fetch = asyncio.get_running_loop().create_task(
            self._fetch_from(instance, timeout, wait_for_ready), name="fetch tokenizer files"
        )
        self._fetch = fetch
        fetch.add_done_callback(self._fetched)
        return fetch

    async def _fetch_from(
        self, instance: _Instance, timeout: float, wait_for_ready: bool
    ) -> LocalTokenizer:
        with self._calling(instance):
            files = await instance.stub.GetTokenizerFiles(
                tokenizer_pb2.GetTokenizerFilesRequest(),
                timeout=timeout,
                wait_for_ready=wait_for_ready,
            )
        try:
            # ~0.1 s of Rust for a few MB of JSON: off the event loop that streams tokens
            local = await asyncio.to_thread(LocalTokenizer.from_pb, files)
        except Exception as e:  # tokenizers raises a bare Exception
            raise UpstreamError(
                grpc.StatusCode.INTERNAL,
                f"{instance.label} gave out a tokenizer.json that does not load: {e}",
            ) from e
        self._local = local
        log.info(
            "router loaded the tokenizer of %s from %s: vocab %d, eos %s, %d special tokens; "
            "it detokenizes in-process",
            local.model_name,
            instance.label,
            local.vocab_size,
            list(local.eos_token_ids),
            len(local.special_token_ids),
        )
        return local

    def _fetched(self, fetch: asyncio.Task[LocalTokenizer]) -> None:
        if self._fetch is fetch:
            self._fetch = None  # done: the result is in _local, or the next request retries
        if fetch.cancelled():
            return
        error = fetch.exception()  # retrieved here, so a fetch nobody awaited logs no noise
        if error is not None:
            log.warning(
                "fetching the tokenizer's files failed (the next request retries): %s", error
            )

    async def close(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()
        for task in list(self._closing):  # removed ones: their calls end now too
            task.cancel()
        for instance in list(self._instances.values()):
            await instance.channel.close()
        self._instances.clear()


class Detokenizer:
    """One generation's detokenizer, in the router's process: ``push`` takes a worker
    message's token ids and returns at once what they add (no call leaves the router)."""

    __slots__ = ("_detok", "_vocab_size")

    def __init__(self, detok: FastDetokenizer, vocab_size: int) -> None:
        self._detok = detok
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def unknown(self, token_ids: Sequence[int]) -> list[int]:
        """The ids outside the tokenizer's vocabulary (the Rust decoder would drop them)."""
        return [t for t in token_ids if not 0 <= t < self._vocab_size]

    def push(self, token_ids: Sequence[int], final: bool) -> StreamDelta:
        """The new text (never a partial character nor any part of a stop string), whether a
        stop string matched (``stopped``, ``stop_string``: ids after it are ignored) and the
        tokens consumed so far (``num_tokens``), as DetokenizeStream answered."""
        # the Rust decoder would drop unknown ids silently; the tokenizer service refused them.
        # One id per engine step is the common case: checked without min/max over the
        # protobuf container (~3 us a token on the 2-core machine)
        vocab = self._vocab_size
        if len(token_ids) == 1:
            known = 0 <= token_ids[0] < vocab
        else:
            known = not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab)
        if not known:
            bad = self.unknown(token_ids)
            raise UpstreamError(
                grpc.StatusCode.INTERNAL,
                f"the worker generated ids {bad[:5]} outside the tokenizer's vocabulary "
                f"[0, {vocab}): do the model and the tokenizer match?",
            )
        return self._detok.add(token_ids, final)

    def close(self) -> None:
        """Nothing to release (kept so a stream's end reads the same for every kind of
        detokenizer)."""
        return None
