"""The ``pdmesh.v1.TokenizerService`` servicer and the service's entry coroutine.

Handlers are thin: proto in → ``pdmesh.tokenizer`` call → proto out. They raise
``InvalidRequestError`` for bad input; ``pdmesh.rpc``'s interceptor turns it into
INVALID_ARGUMENT. Tokenizer calls run on the event loop: they take microseconds to a few
milliseconds (the Rust tokenizer), far less than a thread hop would save.

``GetTokenizerFiles`` hands out the ``tokenizer.json`` text the service loaded, so the router
detokenizes generated tokens in its own process (``pdmesh.tokenizer.fast_detokenizer``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc.aio

from pdmesh.discovery import META_MODEL, TOKENIZER, make_discovery, registration_for
from pdmesh.errors import InvalidRequestError
from pdmesh.rpc.server import RpcServer
from pdmesh.tokenizer import StreamDetokenizer, Tokenizer
from pdmesh.tokenizer.chat_template_spec import read_chat_template
from pdmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.mesh import MeshOptions, Observed
from services.tokenizer import convert
from services.tokenizer.config import TokenizerServiceConfig

log = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
# an unset skip_special_tokens; GetTokenizerFiles tells clients, so theirs match
DEFAULT_SKIP_SPECIAL_TOKENS = True


@dataclass(frozen=True)
class LoadedTokenizer:
    """A model's tokenizer, and the ``tokenizer.json`` text it was loaded from."""

    tokenizer: Tokenizer
    tokenizer_json: str


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, tokenizer: Tokenizer, tokenizer_json: str | None = None) -> None:
        """``tokenizer_json``: what GetTokenizerFiles gives out (None: it fails with
        FAILED_PRECONDITION)."""
        self._tok = tokenizer
        # built once (it parses a few MB of JSON), not on the event loop of a call
        self._files = (
            None
            if tokenizer_json is None
            else convert.files_to_pb(tokenizer.info(), tokenizer_json, DEFAULT_SKIP_SPECIAL_TOKENS)
        )

    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.TokenizeResponse:
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        return tokenizer_pb2.TokenizeResponse(token_ids=self._tok.encode(request.text, add_special))

    async def ApplyChatTemplate(
        self, request: tokenizer_pb2.ApplyChatTemplateRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        text = self._tok.apply_chat_template(convert.chat_from_pb(request.chat))
        # the template placed the special tokens itself, as transformers assumes too
        ids = self._tok.encode(text, add_special_tokens=False)
        return tokenizer_pb2.ApplyChatTemplateResponse(text=text, token_ids=ids)

    async def Detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.DetokenizeResponse:
        self._tok.check_token_ids(request.token_ids, "token_ids")
        skip = _skip_special_tokens(request)
        return tokenizer_pb2.DetokenizeResponse(text=self._tok.decode(request.token_ids, skip))

    async def DetokenizeStream(
        self,
        request_iterator: AsyncIterator[tokenizer_pb2.DetokenizeStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[tokenizer_pb2.DetokenizeStreamResponse]:
        stream: StreamDetokenizer | None = None
        async for request in request_iterator:
            kind = request.WhichOneof("message")
            if kind == "options":
                if stream is not None:
                    raise InvalidRequestError("options", "only the first message carries options")
                stream = self._open_stream(request.options)
                continue
            if stream is None:
                raise InvalidRequestError("options", "the first message must carry options")
            tokens = request.tokens
            self._tok.check_token_ids(tokens.token_ids, "tokens.token_ids")
            delta = stream.add(tokens.token_ids, final=tokens.final)
            yield convert.delta_to_pb(delta)
            if delta.stopped or tokens.final:
                return
        if stream is not None:  # half-closed without `final`: flush, as an empty final would
            yield convert.delta_to_pb(stream.add((), final=True))

    async def GetTokenizerInfo(
        self, request: tokenizer_pb2.GetTokenizerInfoRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.GetTokenizerInfoResponse:
        return convert.info_to_pb(self._tok.info())

    async def GetTokenizerFiles(
        self, request: tokenizer_pb2.GetTokenizerFilesRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.GetTokenizerFilesResponse:
        if self._files is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this tokenizer service was started without its tokenizer.json",
            )
            raise AssertionError("unreachable: context.abort raises")
        return self._files

    def _open_stream(self, options: tokenizer_pb2.DetokenizeStreamOptions) -> StreamDetokenizer:
        self._tok.check_token_ids(options.prompt_token_ids, "options.prompt_token_ids")
        skip = _skip_special_tokens(options)
        return StreamDetokenizer(
            self._tok,
            skip_special_tokens=skip,
            stop=tuple(options.stop),
            prompt_token_ids=tuple(options.prompt_token_ids),
        )


def _skip_special_tokens(
    message: tokenizer_pb2.DetokenizeRequest | tokenizer_pb2.DetokenizeStreamOptions,
) -> bool:
    if message.HasField("skip_special_tokens"):
        return message.skip_special_tokens
    return DEFAULT_SKIP_SPECIAL_TOKENS


def load_tokenizer(model: str, chat_template: str = "") -> LoadedTokenizer:
    """The tokenizer of a model spec, resolved as the workers resolve it; ``chat_template``:
    a --chat-template spec ("" for the model's own)."""
    from pdmesh.models import source as model_source

    source = model_source.resolve(model)
    if source.path is None:
        raise ValueError(
            f"model {model!r} has random weights and no tokenizer files; "
            "give the tokenizer service a Hugging Face directory"
        )
    template = read_chat_template(chat_template) if chat_template else None
    tokenizer = Tokenizer.from_dir(source.path, name=source.name, chat_template=template)
    if chat_template:
        log.info("chat template: %s (--chat-template)", chat_template)
    # read as it was loaded: GetTokenizerFiles gives the same text to the router
    return LoadedTokenizer(tokenizer, (source.path / "tokenizer.json").read_text("utf-8"))


async def serve(
    config: TokenizerServiceConfig, loaded: LoadedTokenizer, mesh: MeshOptions | None = None
) -> None:
    """Serve ``loaded`` until SIGTERM/SIGINT, registered (``--discovery consul``) while
    serving."""
    tokenizer = loaded.tokenizer
    mesh = mesh or MeshOptions()
    observed = Observed.start("pdmesh-tokenizer", config.host, mesh.telemetry)
    rpc = RpcServer([SERVICE_NAME], interceptors=observed.interceptors(), tls=mesh.tls)
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(
        TokenizerServicer(tokenizer, loaded.tokenizer_json), rpc.server
    )
    meta = {META_MODEL: tokenizer.info().model_name, **observed.meta()}
    registration = registration_for(
        mesh.discovery, TOKENIZER, config.host, 0, meta=meta, grpc_tls=mesh.tls.serves_tls
    )
    await observed.serve(
        rpc,
        config.host,
        config.port,
        config.grace_period,
        make_discovery(mesh.discovery),
        registration,
    )
