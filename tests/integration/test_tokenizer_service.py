"""The tokenizer service as a real process on a loopback port, called over real gRPC.

Answers are checked against transformers' own tokenizer for the same model directory.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdmesh.rpc.errors import error_detail
from pdmesh.rpc.server import RpcServer
from pdmesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer.server import TokenizerServicer

pytestmark = pytest.mark.model

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "pdmesh.v1.TokenizerService"
FFFD = "\ufffd"
MULTILINGUAL = "Hello 👋 世界! naïve café 🎉 日本語"
STARTUP_TIMEOUT_S = 120.0  # the first run may fetch and convert the default model

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Japan? 日本 🗾"},
    ],
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from pdmesh.models.fetch import ensure_default_model

    return Path(ensure_default_model(progress=False))


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """A ``python -m services.tokenizer`` process; its log goes to a file (a pipe nobody reads
    could fill up and block it)."""

    def __init__(self, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = log_path.open("w")
        argv = [sys.executable, "-m", "services.tokenizer", "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = tokenizer_pb2_grpc.TokenizerServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.log}")
            try:
                self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.2)
        raise AssertionError(f"service not healthy after {STARTUP_TIMEOUT_S}s:\n{self.log}")

    def stop(self) -> int:
        """SIGTERM, wait, return the exit code (killing it if it does not exit)."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


@pytest.fixture(scope="module")
def service(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("tokenizer") / "service.log", "--grace-period", "2")
    try:
        svc.wait_until_serving()
        yield svc
    finally:
        code = svc.stop()
    assert code == 0, f"exit code {code} after SIGTERM:\n{svc.log}"
    assert "SIGTERM received" in svc.log


@pytest.fixture(scope="module")
def stub(service: Service) -> tokenizer_pb2_grpc.TokenizerServiceStub:
    return service.stub


def chat_pb(messages: list[dict[str, str]], **kw: Any) -> tokenizer_pb2.ApplyChatTemplateRequest:
    msgs = [common_pb2.ChatMessage(**m) for m in messages]
    return tokenizer_pb2.ApplyChatTemplateRequest(chat=common_pb2.ChatRequest(messages=msgs, **kw))


def detok_stream(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub,
    chunks: list[list[int]],
    stop: tuple[str, ...] = (),
    final: bool = True,
    **options: Any,
) -> list[tokenizer_pb2.DetokenizeStreamResponse]:
    def requests() -> Iterator[tokenizer_pb2.DetokenizeStreamRequest]:
        yield tokenizer_pb2.DetokenizeStreamRequest(
            options=tokenizer_pb2.DetokenizeStreamOptions(stop=stop, **options)
        )
        for i, ids in enumerate(chunks):
            last = final and i == len(chunks) - 1
            tokens = tokenizer_pb2.DetokenizeStreamTokens(token_ids=ids, final=last)
            yield tokenizer_pb2.DetokenizeStreamRequest(tokens=tokens)

    return list(stub.DetokenizeStream(requests(), timeout=10))


def invalid_argument(call: Any) -> common_pb2.ErrorDetail:
    """Run ``call``; assert it fails with INVALID_ARGUMENT and return its ErrorDetail."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    detail = error_detail(e.value)
    assert detail is not None and detail.field and detail.reason
    return detail


# ------------------------------------------------------------------------ health, reflection


def test_health_is_serving(service: Service) -> None:
    health = service.health
    for name in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(service: Service) -> None:
    reflect = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    listed, file_reply = list(reflect.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert file_reply.file_descriptor_response.file_descriptor_proto  # clients can build stubs


# ------------------------------------------------------------------------ the RPCs


def test_tokenize_matches_transformers(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, hf_tokenizer: Any
) -> None:
    reply = stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=MULTILINGUAL), timeout=5)
    assert list(reply.token_ids) == hf_tokenizer.encode(MULTILINGUAL)
    empty = stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=""), timeout=5)
    assert list(empty.token_ids) == []


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, hf_tokenizer: Any, messages: list[dict[str, str]]
) -> None:
    reply = stub.ApplyChatTemplate(chat_pb(messages), timeout=5)  # add_generation_prompt unset
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert reply.text == expected
    assert list(reply.token_ids) == hf_tokenizer.encode(expected, add_special_tokens=False)

    no_prompt = stub.ApplyChatTemplate(chat_pb(messages, add_generation_prompt=False), timeout=5)
    assert no_prompt.text == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )
    assert no_prompt.text != reply.text


def test_detokenize_matches_transformers(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, hf_tokenizer: Any
) -> None:
    ids = hf_tokenizer.encode("<|im_start|>" + MULTILINGUAL + "<|im_end|>")
    for skip in (True, False):
        request = tokenizer_pb2.DetokenizeRequest(token_ids=ids, skip_special_tokens=skip)
        reply = stub.Detokenize(request, timeout=5)
        assert reply.text == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    unset = stub.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=ids), timeout=5)
    assert unset.text == MULTILINGUAL  # skip_special_tokens defaults to true


def test_detokenize_stream_is_utf8_safe(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, hf_tokenizer: Any
) -> None:
    ids = hf_tokenizer.encode(MULTILINGUAL)
    replies = detok_stream(stub, [[t] for t in ids])
    assert len(replies) == len(ids)  # one response per tokens message
    assert all(FFFD not in r.text for r in replies)
    assert "".join(r.text for r in replies) == MULTILINGUAL
    assert replies[-1].num_tokens == len(ids) and not replies[-1].stopped


def test_detokenize_stream_half_close_flushes(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, hf_tokenizer: Any
) -> None:
    ids = hf_tokenizer.encode("ok 🎉")
    replies = detok_stream(stub, [ids[:-1]], final=False)  # 🎉 is cut short, no final flag
    assert len(replies) == 2  # the extra response carries the flush
    assert FFFD not in replies[0].text  # held back while more bytes could come...
    assert "".join(r.text for r in replies) == "ok " + FFFD  # ...then U+FFFD: none will


def test_detokenize_stream_stop_string(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, hf_tokenizer: Any
) -> None:
    ids = hf_tokenizer.encode(MULTILINGUAL)
    replies = detok_stream(stub, [[t] for t in ids], stop=("世界", "never"))
    assert replies[-1].stopped and replies[-1].stop_string == "世界"
    assert "".join(r.text for r in replies) == "Hello 👋 "
    assert len(replies) < len(ids)  # the server ended the call at the stop
    prefix = hf_tokenizer.decode(ids[: replies[-1].num_tokens])
    assert prefix.endswith("世界")  # num_tokens ends at the token that completed the stop


def test_detokenize_stream_prompt_context(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, hf_tokenizer: Any
) -> None:
    prompt, generated = hf_tokenizer.encode("Say"), hf_tokenizer.encode(" hi there")
    replies = detok_stream(stub, [generated], prompt_token_ids=prompt)
    assert "".join(r.text for r in replies) == " hi there"


def test_tokenizer_info(stub: tokenizer_pb2_grpc.TokenizerServiceStub, hf_tokenizer: Any) -> None:
    info = stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest(), timeout=5)
    assert info.model_name == "smollm2-135m-instruct"
    assert info.vocab_size == len(hf_tokenizer)
    assert hf_tokenizer.eos_token_id in info.eos_token_ids
    assert info.HasField("bos_token_id") and info.bos_token_id == hf_tokenizer.bos_token_id
    assert info.eos_token == hf_tokenizer.eos_token
    assert info.has_chat_template


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_invalid_argument_and_the_service_keeps_serving(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub,
    service: Service,
) -> None:
    user = {"role": "user", "content": "hi"}
    cases: dict[str, Any] = {
        "messages[0].role": lambda: stub.ApplyChatTemplate(
            chat_pb([{"role": "wizard", "content": "hi"}]), timeout=5
        ),
        "messages": lambda: stub.ApplyChatTemplate(chat_pb([]), timeout=5),
        "messages[0].content": lambda: stub.ApplyChatTemplate(
            chat_pb([{"role": "user"}]), timeout=5
        ),
        "chat.tools_json": lambda: stub.ApplyChatTemplate(
            chat_pb([user], tools_json="{not json"), timeout=5
        ),
        "token_ids": lambda: stub.Detokenize(
            tokenizer_pb2.DetokenizeRequest(token_ids=[1, 10**6]), timeout=5
        ),
        "tokens.token_ids": lambda: detok_stream(stub, [[5], [-1]]),
        "stop[0]": lambda: detok_stream(stub, [[5]], stop=("",)),
    }
    for field, call in cases.items():
        detail = invalid_argument(call)
        assert detail.field == field, (field, detail)

    # a negative id in a unary call, and tokens sent before options
    invalid_argument(
        lambda: stub.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=[-3]), timeout=5)
    )
    tokens_first = tokenizer_pb2.DetokenizeStreamRequest(
        tokens=tokenizer_pb2.DetokenizeStreamTokens(token_ids=[5])
    )
    invalid_argument(lambda: list(stub.DetokenizeStream(iter([tokens_first]), timeout=5)))

    # still serving, still healthy
    assert service.proc.poll() is None
    assert list(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="ok"), timeout=5).token_ids)
    health = service.health
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------ lifecycle, errors


def tokens_request(ids: list[int], final: bool = False) -> tokenizer_pb2.DetokenizeStreamRequest:
    tokens = tokenizer_pb2.DetokenizeStreamTokens(token_ids=ids, final=final)
    return tokenizer_pb2.DetokenizeStreamRequest(tokens=tokens)


def test_sigterm_drains_an_open_stream(model_dir: Path, hf_tokenizer: Any, tmp_path: Path) -> None:
    svc = Service(tmp_path / "service.log", "--grace-period", "20")
    try:
        svc.wait_until_serving()
        ids = hf_tokenizer.encode(MULTILINGUAL)
        outbox: queue.Queue[tokenizer_pb2.DetokenizeStreamRequest | None] = queue.Queue()
        replies = svc.stub.DetokenizeStream(iter(outbox.get, None), timeout=30)
        outbox.put(tokenizer_pb2.DetokenizeStreamRequest(options={}))
        outbox.put(tokens_request(ids[:4]))
        first = next(replies)

        svc.proc.send_signal(signal.SIGTERM)
        # once draining, new calls are refused...
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                svc.stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="x"), timeout=1)
                time.sleep(0.05)
            except grpc.RpcError:
                break
        else:
            raise AssertionError("new calls still accepted 10 s after SIGTERM")
        # ...while the open stream is still served to its end
        outbox.put(tokens_request(ids[4:], final=True))
        rest = list(replies)
        assert first.text + "".join(r.text for r in rest) == MULTILINGUAL
        assert svc.proc.wait(timeout=15) == 0
    finally:
        svc.stop()


class BrokenTokenizer:
    """Raises an unexpected error from everything the servicer calls."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{name} exploded")

        return fail


def test_unexpected_errors_are_internal_and_the_server_keeps_serving() -> None:
    async def scenario() -> None:
        rpc = RpcServer([SERVICE])
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(
            TokenizerServicer(BrokenTokenizer()),  # type: ignore[arg-type]
            rpc.server,
        )
        port = await rpc.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
                for _ in range(2):  # the second call proves the server survived the first
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="x"), timeout=5)
                    assert e.value.code() == grpc.StatusCode.INTERNAL
                    assert "encode exploded" in (e.value.details() or "")
                stream = stub.DetokenizeStream(
                    iter([tokenizer_pb2.DetokenizeStreamRequest(options={})]), timeout=5
                )
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stream:
                        pass
                assert e.value.code() == grpc.StatusCode.INTERNAL
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await rpc.stop(grace=1)

    asyncio.run(scenario())
