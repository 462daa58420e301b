"""HTTP errors in the OpenAI shape, and the one place gRPC status codes become HTTP statuses.

Every error the gateway answers has the body OpenAI clients parse:
``{"error": {"message", "type", "param", "code"}}``. Handlers raise ``APIError``; router failures
arrive as ``grpc.aio.AioRpcError`` and go through ``from_rpc_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import grpc
import grpc.aio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pdmesh.rpc.errors import error_detail
from services.gateway.generation import GenerationError

log = logging.getLogger(__name__)

HTTP_STATUS_FOR_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# causes the router tells apart with ``ErrorDetail.code`` where one status code has several
HTTP_STATUS_FOR_ERROR_CODE = {
    "queue_full": 429,  # RESOURCE_EXHAUSTED from the router's admission queue
    "queue_timeout": 408,  # DEADLINE_EXCEEDED in that queue, not on a worker (504)
}

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    # the router's admission control: too busy to take the request (now, or in time)
    408: "rate_limit_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An error answered as ``status`` with an OpenAI error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class BodyTooLargeError(HTTPException):
    """Raised from inside ``receive`` while FastAPI reads a body; an HTTPException so FastAPI
    lets it through instead of turning it into a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit}-byte limit")


def from_rpc_error(error: grpc.aio.AioRpcError) -> APIError:
    code = error.code()
    detail = error_detail(error)
    param = detail.field if detail is not None and detail.field else None
    message = error.details() or code.name
    if detail is not None and detail.code in HTTP_STATUS_FOR_ERROR_CODE:
        return APIError(HTTP_STATUS_FOR_ERROR_CODE[detail.code], message, param, detail.code)
    status = HTTP_STATUS_FOR_GRPC.get(code, 500)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the request did not finish before the deadline: {message}"
    elif code == grpc.StatusCode.UNAVAILABLE:
        message = f"the router is unavailable: {message}"
    return APIError(status, message, param=param, code=code.name.lower())


def from_validation_error(error: RequestValidationError) -> APIError:
    """The first problem pydantic found, with ``param`` as a dotted path into the body: of the
    first field's problems, the deepest (a union like ``str | list[Item]`` reports "not a
    string" first, while the client sent a list whose item is wrong)."""
    found = [(e, _body_loc(e)) for e in error.errors()]
    first, loc = found[0] if found else ({}, [])
    if loc:
        same_field = [(e, p) for e, p in found if p[:1] == loc[:1]]
        first, loc = max(same_field, key=lambda f: len(f[1]))  # max keeps the first of ties
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return APIError(400, f"the body is not valid JSON: {ctx.get('error', 'parse error')}")
    param = _dotted(loc) or None
    if param is None and kind == "model_attributes_type":
        return APIError(400, "the body must be a JSON object")
    message = str(first.get("msg", "invalid request"))
    if kind == "extra_forbidden":  # OpenAI's wording; never silently ignored
        message = "unrecognized request argument (pdmesh does not implement it)"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


_LOCATIONS = ("body", "query")  # pydantic's first loc part says where the field was


def _body_loc(error: Any) -> list[Any]:
    loc = list(error.get("loc", ()))
    if loc and loc[0] in _LOCATIONS:
        loc = loc[1:]
    return [p for p in loc if not _is_union_tag(p)]


def _is_union_tag(part: object) -> bool:
    # pydantic puts the union member it tried into ``loc`` ("str", "list[str]", a model class
    # name); body fields are snake_case, so anything else is such a tag
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none") or "[" in part or part[:1].isupper()
    )


def _dotted(loc: list[object]) -> str:
    # ["messages", 0, "role"] → "messages[0].role"; a dict key stays a key even when it is
    # digits (["logit_bias", "5"] → "logit_bias.5"): pydantic gives list indices as ints
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return from_validation_error(exc).response()


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (404 for an unknown path, 405, 413 from the body limit)."""
    assert isinstance(exc, HTTPException)
    code = "request_too_large" if exc.status_code == 413 else None
    return APIError(exc.status_code, str(exc.detail), code=code).response(exc.headers)


def as_api_error(exc: BaseException) -> APIError | None:
    """The HTTP error for a failure from the router (None for anything unexpected)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_rpc_error(exc)
    if isinstance(exc, GenerationError):
        return APIError(500, f"generation failed: {exc}", code="generation_error")
    return None


async def router_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """AioRpcError / GenerationError escaping a handler (before any response was sent)."""
    error = as_api_error(exc)
    assert error is not None
    return in_body_terms(error, request.url.path).response()


# The router and workers name the proto field (``sampling_params.json_schema``); a client of
# the OpenAI routes should see the field of its own body. SGLang's /generate keeps the names:
# its body has ``sampling_params``.
_OPENAI_RENAMES = {"json_schema": "response_format", "max_new_tokens": "max_tokens"}
_BODY_NAMES: dict[str, dict[str, str]] = {
    "/v1/chat/completions": _OPENAI_RENAMES,
    "/v1/completions": _OPENAI_RENAMES,
    "/v1/responses": {
        **_OPENAI_RENAMES,
        "json_schema": "text.format",
        "max_new_tokens": "max_output_tokens",
    },
}
_WIRE_PREFIX = "sampling_params."
_TOOLS_WIRE = "chat.tools_json"


def in_body_terms(error: APIError, path: str) -> APIError:
    """``error`` with a wire field name turned into the name the request body at ``path``
    used (the message keeps both: it starts with the wire name)."""
    renames = _BODY_NAMES.get(path)
    param = error.param
    if renames is None or not param:
        return error
    if param.startswith(_TOOLS_WIRE):  # the chat's tools travel as JSON text
        param = "tools" + param[len(_TOOLS_WIRE) :]
    elif param.startswith(_WIRE_PREFIX):
        field, _, rest = param[len(_WIRE_PREFIX) :].partition(".")
        param = renames.get(field, field) + (f".{rest}" if rest else "")
    else:
        return error
    return APIError(error.status, error.message, param=param, code=error.code)


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected: still OpenAI's body (the traceback goes to the log)."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}").response()
