"""RouterService.Tokenize / Detokenize's logic (``services.router.tokenization``) over fakes of
the tokenizer client and the worker set: which tokenizer calls a text and a chat make, the
add_special_tokens defaults, and ``max_model_len`` from the healthy generating workers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from pdmesh.errors import InvalidRequestError
from pdmesh.v1 import common_pb2, router_pb2, tokenizer_pb2, worker_pb2
from services.gateway.router_errors import rpc_error
from services.router import tokenization
from services.router.tokenization import ContextLengths, Tokenization


class FakeTokenizer:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def tokenize(self, text: str, add_special_tokens: bool, timeout: float) -> list[int]:
        self.calls.append(("tokenize", text, add_special_tokens))
        return [1, *range(10, 10 + len(text))] if add_special_tokens else list(range(len(text)))

    async def render_chat(
        self, chat: common_pb2.ChatRequest, timeout: float
    ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        self.calls.append(("render_chat", len(chat.messages)))
        return tokenizer_pb2.ApplyChatTemplateResponse(text="<s>hi", token_ids=[7, 8])

    async def detokenize(self, ids: list[int], skip: bool | None, timeout: float) -> str:
        self.calls.append(("detokenize", list(ids), skip))
        return "text"

    async def token_strings(self, ids: list[int], timeout: float) -> list[str]:
        return [f"t{i}" for i in ids]


@dataclass
class FakeClient:
    """The part of a ``WorkerClient`` the context-length lookup uses."""

    length: int
    asked: int = 0
    fail: bool = False

    async def model_info(self, timeout: float) -> worker_pb2.GetModelInfoResponse:
        self.asked += 1
        if self.fail:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "down")
        return worker_pb2.GetModelInfoResponse(max_model_len=self.length)


@dataclass(eq=False)
class FakeWorker:
    length: int
    role: str = "aggregated"
    healthy: bool = True
    label: str = "worker"
    client: FakeClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = FakeClient(self.length)


@dataclass
class FakeWorkers:
    workers: list[FakeWorker]

    def all(self) -> list[FakeWorker]:
        return list(self.workers)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def service(*workers: FakeWorker) -> tuple[Tokenization, FakeTokenizer]:
    fake = FakeTokenizer()
    return Tokenization(fake, FakeWorkers(list(workers))), fake  # type: ignore[arg-type]


def test_text_adds_special_tokens_unless_told() -> None:
    svc, fake = service(FakeWorker(4096))
    reply = run(svc.tokenize(router_pb2.RouterTokenizeRequest(text="ab"), 5))
    assert list(reply.token_ids) == [1, 10, 11] and reply.max_model_len == 4096
    assert not reply.token_strs and not reply.text
    request = router_pb2.RouterTokenizeRequest(
        text="ab", add_special_tokens=False, return_token_strs=True
    )
    reply = run(svc.tokenize(request, 5))
    assert list(reply.token_ids) == [0, 1] and list(reply.token_strs) == ["t0", "t1"]
    assert fake.calls == [("tokenize", "ab", True), ("tokenize", "ab", False)]


def test_chat_takes_the_templates_tokens_or_adds_special_tokens_to_its_text() -> None:
    svc, fake = service()
    chat = common_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="user", content="hi")])
    reply = run(svc.tokenize(router_pb2.RouterTokenizeRequest(chat=chat), 5))
    assert list(reply.token_ids) == [7, 8] and reply.text == "<s>hi"
    assert not reply.HasField("max_model_len")  # no worker known
    request = router_pb2.RouterTokenizeRequest(chat=chat, add_special_tokens=True)
    reply = run(svc.tokenize(request, 5))
    assert list(reply.token_ids) == [1, *range(10, 15)]
    assert fake.calls == [("render_chat", 1), ("render_chat", 1), ("tokenize", "<s>hi", True)]


def test_no_input_is_refused_naming_it() -> None:
    svc, _ = service()
    with pytest.raises(InvalidRequestError) as info:
        run(svc.tokenize(router_pb2.RouterTokenizeRequest(), 5))
    assert info.value.field == "input"


def test_detokenize_passes_skip_special_tokens_only_when_set() -> None:
    svc, fake = service()
    run(svc.detokenize(router_pb2.RouterDetokenizeRequest(token_ids=[3]), 5))
    request = router_pb2.RouterDetokenizeRequest(token_ids=[4], skip_special_tokens=False)
    assert run(svc.detokenize(request, 5)).text == "text"
    assert fake.calls == [("detokenize", [3], None), ("detokenize", [4], False)]


def test_context_length_is_the_smallest_of_healthy_generating_workers() -> None:
    big, small = FakeWorker(8192), FakeWorker(1024, role="decode")
    prefill, sick, down = (
        FakeWorker(10, role="prefill"),
        FakeWorker(20, healthy=False),
        FakeWorker(30),
    )
    down.client.fail = True
    workers = FakeWorkers([big, small, prefill, sick, down])
    now = [100.0]
    lengths = ContextLengths(workers, clock=lambda: now[0])  # type: ignore[arg-type]
    assert run(lengths.smallest(5)) == 1024
    assert (prefill.client.asked, sick.client.asked, down.client.asked) == (0, 0, 1)
    assert run(lengths.smallest(5)) == 1024
    assert (big.client.asked, small.client.asked) == (1, 1)  # kept
    assert down.client.asked == 2  # no answer yet: asked again
    workers.workers.remove(small)  # gone from the set: forgotten
    assert run(lengths.smallest(5)) == 8192
    now[0] += tokenization.MODEL_INFO_TTL_S
    big.client.length = 4096  # restarted with another --max-model-len: seen after the TTL
    assert run(lengths.smallest(5)) == 4096
