"""The gateway's guards without a network: API keys (several, from a flag and a file, compared
in constant time), the per-client limit on open generation requests (driven through the real
``GatewayMiddleware`` with an ASGI app that holds its requests open), the bounds of token
counts, ids and choices, and secrets kept out of configs' reprs."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
from starlette.types import Message, Receive, Scope, Send

from pdmesh.discovery import DiscoveryConfig
from services.gateway import api_keys as api_keys_module
from services.gateway import convert
from services.gateway.api_keys import APIKeys
from services.gateway.client_streams import ClientStreams, client_id
from services.gateway.config import GatewayConfig
from services.gateway.errors import APIError
from services.gateway.middleware import GatewayMiddleware
from services.gateway.native_schema import GenerateRequest
from services.gateway.openai_schema import (
    MAX_CHOICES,
    MAX_INT32,
    ChatCompletionRequest,
    CompletionRequest,
)

# -- API keys ---------------------------------------------------------------------------------


def test_keys_from_the_flag_list_and_a_file(tmp_path: Path) -> None:
    listed = tmp_path / "keys.txt"
    listed.write_text("# rotated 2024-05\nsk-file-1\n\n  sk-file-2  \n")
    keys = APIKeys.load("sk-a, sk-b,,", str(listed))
    assert len(keys) == 4
    assert [keys.match(f"Bearer {k}") for k in ("sk-a", "sk-b", "sk-file-1", "sk-file-2")] == [
        0,
        1,
        2,
        3,
    ]
    assert keys.match("bearer  sk-b ") == 1  # the scheme is case-insensitive
    for wrong in ("", "Bearer", "Bearer ", "Bearer sk-", "Bearer sk-a2", "Basic sk-a", "sk-a"):
        assert keys.match(wrong) is None, wrong
    assert not APIKeys.load("") and not APIKeys.load(" , ")


def test_bad_key_files_and_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--api-key-file=/nonexistent/keys"):
        APIKeys.load("", "/nonexistent/keys")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no key in it"):
        APIKeys.load("", str(empty))
    with pytest.raises(ValueError, match="whitespace"):
        APIKeys.load("two words")
    with pytest.raises(ValueError, match="--api-key-file"):
        GatewayConfig(api_key_file="/nonexistent/keys")


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key is compared, with ``hmac.compare_digest``, on fixed-length digests, whether a
    presented key matches the first key, the last or none: no early exit or length check that
    timing could reveal."""
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(api_keys_module.hmac, "compare_digest", counting)
    keys = APIKeys.load("sk-first,sk-second-key-much-longer,sk-third")
    for presented in ("sk-first", "sk-third", "nope", "x" * 500, ""):
        calls.clear()
        keys.match(f"Bearer {presented}")
        assert len(calls) == 3, presented
        assert {len(a) for a, _ in calls} | {len(b) for _, b in calls} == {32}
    # nothing of the keys themselves is kept
    assert "sk-first" not in repr(vars(keys))


def test_secrets_stay_out_of_config_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "sk-hidden" not in repr(GatewayConfig(api_key="sk-hidden"))
    assert "tok-hidden" not in repr(DiscoveryConfig(consul_token="tok-hidden"))
    # pdmesh's own variable wins over the consul CLI's
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-consul-env")
    monkeypatch.setenv("PDMESH_CONSUL_TOKEN", "from-pdmesh-env")
    assert DiscoveryConfig().resolved_consul_token() == "from-pdmesh-env"
    monkeypatch.delenv("PDMESH_CONSUL_TOKEN")
    assert DiscoveryConfig().resolved_consul_token() == "from-consul-env"


# -- streams per client -----------------------------------------------------------------------


def test_client_streams_count_and_forget() -> None:
    streams = ClientStreams(2)
    assert streams.try_open("a") and streams.try_open("a") and not streams.try_open("a")
    assert streams.try_open("b")
    streams.close("a")
    assert streams.open_count("a") == 1 and streams.try_open("a")
    for client in ("a", "a", "b"):
        streams.close(client)
    assert streams.clients == 0
    assert not ClientStreams(0)  # no limit
    assert client_id(2, "10.0.0.1") == "key#2" and client_id(None, "10.0.0.1") == "addr:10.0.0.1"


class HeldApp:
    """An ASGI app whose requests stay open until ``release``; answers 200 then."""

    def __init__(self) -> None:
        self.entered = 0
        self.gate = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.entered += 1
        await self.gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def call(
    app: Callable[[Scope, Receive, Send], Any],
    path: str,
    key: str | None = None,
    client: str = "10.0.0.1",
) -> tuple[int, dict[str, Any]]:
    """One POST through ``app``; its status and JSON body."""
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers,
        "client": (client, 50000),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_streams_per_api_key() -> None:
    async def scenario() -> None:
        app = HeldApp()
        streams = ClientStreams(2)
        guarded = GatewayMiddleware(app, APIKeys.load("sk-a,sk-b"), 1024, streams=streams)
        chat = "/v1/chat/completions"
        # two open from key a, over two addresses: one client all the same
        held = [
            asyncio.create_task(call(guarded, chat, "sk-a", "10.0.0.1")),
            asyncio.create_task(call(guarded, "/generate", "sk-a", "10.0.0.2")),
        ]
        while app.entered < 2:
            await asyncio.sleep(0)
        status, body = await call(guarded, "/v1/completions", "sk-a", "10.0.0.3")
        assert status == 429
        assert body["error"]["code"] == "too_many_streams"
        assert body["error"]["type"] == "rate_limit_error"
        assert "at most 2" in body["error"]["message"]
        # a bad key is refused as such, not counted
        assert (await call(guarded, chat, "sk-c"))[0] == 401
        assert streams.open_count("key#0") == 2 and streams.clients == 1
        # key b is another client; /v1/models is not a generation route
        held.append(asyncio.create_task(call(guarded, chat, "sk-b")))
        models = asyncio.create_task(call(guarded, "/v1/models", "sk-a"))
        while app.entered < 4:
            await asyncio.sleep(0)
        assert streams.open_count("key#1") == 1
        app.gate.set()
        assert [s for s, _ in await asyncio.gather(*held, models)] == [200] * 4
        assert streams.clients == 0  # every slot given back
        assert (await call(guarded, chat, "sk-a"))[0] == 200

    asyncio.run(scenario())


def test_streams_per_address_without_keys_and_released_on_errors() -> None:
    async def scenario() -> None:
        async def failing(scope: Scope, receive: Receive, send: Send) -> None:
            raise RuntimeError("the app failed")

        streams = ClientStreams(1)
        guarded = GatewayMiddleware(failing, APIKeys([]), 1024, streams=streams)
        with pytest.raises(RuntimeError):
            await call(guarded, "/generate")
        assert streams.clients == 0  # the slot came back though the app raised

        app = HeldApp()
        guarded = GatewayMiddleware(app, APIKeys([]), 1024, streams=ClientStreams(1))
        held = asyncio.create_task(call(guarded, "/generate", client="10.0.0.1"))
        while app.entered < 1:
            await asyncio.sleep(0)
        assert (await call(guarded, "/generate", client="10.0.0.1"))[0] == 429
        other = asyncio.create_task(call(guarded, "/generate", client="10.0.0.2"))
        while app.entered < 2:
            await asyncio.sleep(0)
        app.gate.set()
        assert [s for s, _ in await asyncio.gather(held, other)] == [200, 200]

    asyncio.run(scenario())


# -- bounds of the request bodies ---------------------------------------------------------------

GREETING = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": MAX_INT32 + 1}, "max_tokens"),
        ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
        ({"min_tokens": MAX_INT32 + 1}, "min_tokens"),
        ({"top_k": 2**40}, "top_k"),
        ({"stop_token_ids": [1, 2**31]}, "stop_token_ids"),
        ({"n": 65}, "n"),
    ],
)
def test_counts_past_the_wire_width_are_invalid(body: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        ChatCompletionRequest.model_validate({"model": "m", "messages": GREETING, **body})
    assert caught.value.errors()[0]["loc"][0] == field


def test_the_largest_counts_and_ids_the_wire_carries_pass() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": GREETING,
            "max_tokens": MAX_INT32,
            "stop_token_ids": [-(2**31), MAX_INT32],
        }
    )
    (request,) = convert.chat_requests(body, "r")
    assert request.sampling_params.max_new_tokens == MAX_INT32
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(model="m", prompt=[[1], [2**31]])
    with pytest.raises(pydantic.ValidationError):
        GenerateRequest(input_ids=[2**35])
    with pytest.raises(pydantic.ValidationError):
        GenerateRequest.model_validate({"text": "x", "sampling_params": {"max_new_tokens": 2**31}})


def test_choices_per_request_are_bounded() -> None:
    fits = CompletionRequest(model="m", prompt=["a"] * 4, n=64)
    assert len(convert.completion_requests(fits, "r")) == MAX_CHOICES
    with pytest.raises(APIError) as caught:
        convert.completion_requests(CompletionRequest(model="m", prompt=["a"] * 5, n=64), "r")
    assert caught.value.status == 400 and caught.value.param == "n"
    with pytest.raises(APIError):
        convert.native_requests(GenerateRequest(input_ids=[[1]] * (MAX_CHOICES + 1)), "r")
