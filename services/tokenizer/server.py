"""The ``pdmesh.v1.TokenizerService`` servicer and the service's entry coroutine.

Handlers are thin: proto in → ``pdmesh.tokenizer`` call → proto out. They raise
``InvalidRequestError`` for bad input; ``pdmesh.rpc``'s interceptor turns it into
INVALID_ARGUMENT. Tokenizer calls run on the event loop: they take microseconds to a few
milliseconds (the Rust tokenizer), far less than a thread hop would save.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc.aio

from pdmesh.discovery import META_MODEL, TOKENIZER, make_discovery, registration_for
from pdmesh.errors import InvalidRequestError
from pdmesh.rpc.server import RpcServer
from pdmesh.tokenizer import StreamDetokenizer, Tokenizer
from pdmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.mesh import MeshOptions, Observed
from services.tokenizer import convert
from services.tokenizer.config import TokenizerServiceConfig

log = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer

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
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
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

    def _open_stream(self, options: tokenizer_pb2.DetokenizeStreamOptions) -> StreamDetokenizer:
        self._tok.check_token_ids(options.prompt_token_ids, "options.prompt_token_ids")
        skip = options.skip_special_tokens if options.HasField("skip_special_tokens") else True
        return StreamDetokenizer(
            self._tok,
            skip_special_tokens=skip,
            stop=tuple(options.stop),
            prompt_token_ids=tuple(options.prompt_token_ids),
        )


def load_tokenizer(model: str) -> Tokenizer:
    """The tokenizer of a model spec, resolved as the workers resolve it."""
    from pdmesh.models import source as model_source

    source = model_source.resolve(model)
    if source.path is None:
        raise ValueError(
            f"model {model!r} has random weights and no tokenizer files; "
            "give the tokenizer service a Hugging Face directory"
        )
    return Tokenizer.from_dir(source.path, name=source.name)


async def serve(
    config: TokenizerServiceConfig, tokenizer: Tokenizer, mesh: MeshOptions | None = None
) -> None:
    """Serve ``tokenizer`` until SIGTERM/SIGINT, registered (``--discovery consul``) while
    serving."""
    mesh = mesh or MeshOptions()
    observed = Observed.start("pdmesh-tokenizer", config.host, mesh.telemetry)
    rpc = RpcServer([SERVICE_NAME], interceptors=observed.interceptors(), tls=mesh.tls)
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(
        TokenizerServicer(tokenizer), rpc.server
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
