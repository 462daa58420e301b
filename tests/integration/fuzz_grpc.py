"""The gRPC fuzzers' parts: which values each service accepts (``tame_hints``), the methods
of a service with a payload strategy each (``methods``, ``calls``), and one raw call with its
outcome (``send``). The fuzz runs themselves are ``test_fuzz_grpc.py``.

A call goes through a generic ``channel.unary_unary`` / ``unary_stream`` / ``stream_stream``
with identity serializers, so the bytes ``fuzz_proto`` wrote reach the server as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.v1 import (
    bootstrap_pb2,
    common_pb2,
    kv_transfer_pb2,
    router_pb2,
    tokenizer_pb2,
    worker_pb2,
)
from tests.integration.fuzz_proto import SAFE_ADDRESS, MessageFuzz, keep_local, length_delimited
from tests.integration.fuzzing import Outcome

CALL_TIMEOUT_S = 5.0  # a tame generation takes well under a second; this is for the odd
# request that asks for 2^31 - 1 tokens, or 128 (the default) on a corrupted copy (the deadline
# ends it, the worker aborts it: no leak allowed)
MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
# the statuses a service answers a bad request with; anything else is a server fault
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,  # e.g. a bootstrap room whose other half gave up
        grpc.StatusCode.UNIMPLEMENTED,  # SGLang calls pdmesh workers refuse on purpose
    }
)
SERVICES = {
    s.full_name: s
    for module in (tokenizer_pb2, router_pb2, worker_pb2, bootstrap_pb2, sgl)
    for s in module.DESCRIPTOR.services_by_name.values()
}
GENERATE_WEIGHT = 3  # Generate gets this many shares of the inputs, every other method one
ROLES = ("system", "developer", "user", "assistant", "tool")
CLOSED_PORTS = (1, 9)  # nothing listens: AddWorker's health check fails at once


# -- strategies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What tame requests need to know about the served model."""

    vocab_size: int
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str


def tame_hints(m: ModelFacts) -> dict[str, Any]:
    """Values every service accepts, by field; None leaves a field out of tame requests."""
    token = st.integers(0, m.vocab_size - 1)
    ids = st.lists(token, min_size=1, max_size=8)
    text = st.text(max_size=40)
    rid = st.text(min_size=1, max_size=24)
    json_list = st.sampled_from(['[{"type": "function", "function": {"name": "f"}}]', "[]"])
    sp = "pdmesh.v1.SamplingParams."
    sg = "sglang.grpc.scheduler."
    layout = kv_transfer_pb2.KVReceiverHandle(
        backend="mooncake",
        address=SAFE_ADDRESS,
        num_layers=m.num_layers,
        page_size=m.page_size,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        dtype=m.dtype,
        device="cpu",
        order="page_major",
    )
    receiver = st.tuples(st.integers(1, 4096), st.integers(0, 2**48)).map(
        lambda t: _with(layout, num_pages=t[0], base_ptr=t[1], total_bytes=t[0] * 4096)
    )
    return {
        sp + "temperature": st.floats(0, 2),
        sp + "top_p": st.floats(0.05, 1),
        sp + "top_k": st.integers(-1, 50),
        sp + "min_p": st.floats(0, 1),
        sp + "repetition_penalty": st.floats(0.5, 2),
        sp + "frequency_penalty": st.floats(-2, 2),
        sp + "presence_penalty": st.floats(-2, 2),
        sp + "seed": st.integers(0, 2**64 - 1),
        sp + "max_new_tokens": st.integers(0, 2),
        sp + "min_new_tokens": st.integers(0, 2),
        sp + "stop_token_ids": st.lists(token, max_size=3),
        sp + "stop": st.lists(st.text(min_size=1, max_size=6), max_size=2),
        sp + "top_logprobs": st.integers(0, 20),
        "pdmesh.v1.GenerateRequest.request_id": rid,
        "pdmesh.v1.GenerateRequest.token_ids": ids,
        "pdmesh.v1.GenerateRequest.disagg": None,  # aggregated: refused (the prefill's own below)
        "pdmesh.v1.AbortRequest.request_id": rid,
        "pdmesh.v1.TokenIds.ids": ids,
        "pdmesh.v1.RouterGenerateRequest.text": text,
        "pdmesh.v1.ChatMessage.role": st.sampled_from(ROLES),
        "pdmesh.v1.ChatMessage.tool_calls_json": st.sampled_from(
            ['[{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]']
        ),
        "pdmesh.v1.ChatRequest.tools_json": json_list,
        "pdmesh.v1.ChatRequest.template_kwargs_json": st.sampled_from(["{}", '{"x": 1}']),
        "pdmesh.v1.AddWorkerRequest.address": st.sampled_from(CLOSED_PORTS).map(
            lambda p: f"127.0.0.1:{p}"
        ),
        "pdmesh.v1.TokenizeRequest.text": st.text(max_size=200),
        "pdmesh.v1.DetokenizeRequest.token_ids": st.lists(token, max_size=32),
        "pdmesh.v1.DetokenizeStreamOptions.prompt_token_ids": st.lists(token, max_size=8),
        "pdmesh.v1.DetokenizeStreamOptions.stop": st.lists(st.text(min_size=1), max_size=2),
        "pdmesh.v1.DetokenizeStreamTokens.token_ids": st.lists(token, max_size=8),
        # the bootstrap server: a decode with this prefill's own layout, rooms it may join
        "pdmesh.v1.RegisterDecodeRequest.decode_id": st.sampled_from(["d0", "d1"]),
        "pdmesh.v1.RegisterDecodeRequest.receiver": receiver,
        "pdmesh.v1.RegisterDecodeRequest.decode_address": st.just(SAFE_ADDRESS),
        "pdmesh.v1.TransferRequest.decode_id": st.sampled_from(["d0", "d1", "nobody"]),
        "pdmesh.v1.TransferRequest.dst_page_ids": st.lists(st.integers(0, 300), max_size=4),
        # SGLang's scheduler protocol
        sg + "GenerateRequest.request_id": rid,
        sg + "TokenizedInput.input_ids": ids,
        sg + "SamplingParams.temperature": st.floats(0, 2),
        sg + "SamplingParams.top_p": st.floats(0.05, 1),
        sg + "SamplingParams.top_k": st.integers(-1, 50),
        sg + "SamplingParams.min_p": st.floats(0, 1),
        sg + "SamplingParams.frequency_penalty": st.floats(-2, 2),
        sg + "SamplingParams.presence_penalty": st.floats(-2, 2),
        sg + "SamplingParams.repetition_penalty": st.floats(0.5, 2),
        sg + "SamplingParams.max_new_tokens": st.integers(0, 2),
        sg + "SamplingParams.min_new_tokens": st.integers(0, 2),
        sg + "SamplingParams.stop_token_ids": st.lists(token, max_size=3),
        sg + "SamplingParams.n": st.integers(0, 1),
        sg + "GenerateRequest.top_logprobs_num": st.integers(0, 20),
        **{
            sg + name: None  # what pdmesh workers refuse outright (each is tested one-wild)
            for name in (
                "SamplingParams.regex",
                "SamplingParams.json_schema",
                "SamplingParams.ebnf_grammar",
                "SamplingParams.structural_tag",
                "SamplingParams.logit_bias",
                "GenerateRequest.mm_inputs",
                "GenerateRequest.input_embeds",
                "GenerateRequest.lora_id",
                "GenerateRequest.return_hidden_states",
                "GenerateRequest.disaggregated_params",
            )
        },
    }


# fields every tame request sets: an unset max_new_tokens means 128 tokens, seconds on a CPU
ALWAYS_SET = frozenset(
    {
        "pdmesh.v1.GenerateRequest.sampling_params",
        "pdmesh.v1.RouterGenerateRequest.sampling_params",
        "pdmesh.v1.SamplingParams.max_new_tokens",
        "sglang.grpc.scheduler.GenerateRequest.sampling_params",
        "sglang.grpc.scheduler.SamplingParams.max_new_tokens",
    }
)

# counts whose wild values are mostly invalid or small: a wild 2^31 - 1 still comes now and then
# (the call's deadline ends it), but not one input in three
TOKEN_COUNT_EDGES = st.sampled_from(
    [-1, -(2**31), 2**31, 2**32 - 1, 2**32, 2**32 + 2, 2**63 - 1, 2**64 - 1, 2**31 - 1]
)
# JSON carried in string fields: invalid, of the wrong shape, or nested past the parser
WILD_JSON = st.one_of(
    st.sampled_from(
        [
            "", "{", "null", "5", '"x"', "[1]", "[{}]", "[[]]", '{"a": NaN}', "[Infinity]",
            '{"messages": 1}', '{"add_generation_prompt": true}', '{"tools": "x"}',
            "[" * 3000 + "]" * 3000, '{"a":' * 3000 + "1" + "}" * 3000, "[" * 100000,
            '[{"function": {"name": "f", "arguments": "' + "[" * 3000 + '"}}]',
            '[{"function": {"name": "f", "arguments": "{\\"a\\": 1}"}}]',
            '[{"function": 7}]', '[{"type": "function", "function": {"name": 5}}]',
        ]
    ),
    st.text(max_size=40),
)  # fmt: skip
WILD_HINTS = {
    **{
        name: TOKEN_COUNT_EDGES
        for name in (
            "pdmesh.v1.SamplingParams.max_new_tokens",
            "pdmesh.v1.SamplingParams.min_new_tokens",
            "sglang.grpc.scheduler.SamplingParams.max_new_tokens",
            "sglang.grpc.scheduler.SamplingParams.min_new_tokens",
        )
    },
    "pdmesh.v1.ChatRequest.tools_json": WILD_JSON,
    "pdmesh.v1.ChatRequest.template_kwargs_json": WILD_JSON,
    "pdmesh.v1.ChatMessage.tool_calls_json": WILD_JSON,
}


def _with(message: Message, **fields: Any) -> bytes:
    copy = type(message)()
    copy.CopyFrom(message)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy.SerializeToString()


@dataclass(frozen=True)
class Method:
    """One RPC: its path, message classes, and the payloads to send (one ``bytes``, or a
    list of them for a streamed request)."""

    path: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool
    payloads: st.SearchStrategy[Any]

    def __repr__(self) -> str:  # failure reports show the path, not the strategy tree
        return self.path


def methods(
    service: ServiceDescriptor,
    hints: dict[str, Any],
    required: frozenset[str] = frozenset(),
    streams: dict[str, st.SearchStrategy[list[bytes]]] | None = None,
) -> list[Method]:
    out = []
    for m in service.methods:
        request = GetMessageClass(m.input_type)
        fuzzer = MessageFuzz(m.input_type, hints, WILD_HINTS, ALWAYS_SET | required)
        payloads: st.SearchStrategy[Any] = fuzzer.requests()
        if m.client_streaming:
            wild = st.lists(payloads, min_size=1, max_size=4)
            tame = (streams or {}).get(m.name)
            payloads = st.one_of(wild, tame) if tame is not None else wild
        out.append(
            Method(
                f"/{service.full_name}/{m.name}",
                request,
                GetMessageClass(m.output_type),
                m.client_streaming,
                m.server_streaming,
                payloads,
            )
        )
    return out


@st.composite
def calls(draw: st.DrawFn, api_methods: Sequence[Method]) -> tuple[Method, Any]:
    """A (method, payload) pair, Generate weighted up: it is where the work is. (A composite,
    so that a failure names it, not the whole tree of field strategies.)"""
    method = draw(st.sampled_from([m for m in api_methods for _ in range(_weight(m))]))
    return method, draw(method.payloads)


def _weight(m: Method) -> int:
    return GENERATE_WEIGHT if m.path.endswith("/Generate") else 1


def detokenize_streams(hints: dict[str, Any]) -> st.SearchStrategy[list[bytes]]:
    """A tame DetokenizeStream: options, then a few token batches."""
    options = MessageFuzz(tokenizer_pb2.DetokenizeStreamOptions.DESCRIPTOR, hints).tame()
    tokens = MessageFuzz(tokenizer_pb2.DetokenizeStreamTokens.DESCRIPTOR, hints).tame()
    return st.tuples(
        options.map(lambda raw: length_delimited(1, raw)),
        st.lists(tokens.map(lambda raw: length_delimited(2, raw)), max_size=4),
    ).map(lambda t: [t[0], *t[1]])


# -- sending ------------------------------------------------------------------------------------


def send(channel: grpc.Channel, method: Method, payload: Any) -> Outcome:
    """One raw call; its outcome (a server error for a non-client-error status, a reply that
    does not parse, or an in-band FINISH_REASON_ERROR)."""

    def identity(raw: bytes) -> bytes:
        return raw

    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    make = kinds[(method.client_streaming, method.server_streaming)]
    stub: Callable[..., Any] = make(
        method.path, request_serializer=identity, response_deserializer=identity
    )
    if method.client_streaming:
        payload = [keep_local(method.request, raw) for raw in payload]
        request: Any = iter(payload)
    else:
        payload = request = keep_local(method.request, payload)
    try:
        result = stub(request, timeout=CALL_TIMEOUT_S)
        replies = list(result) if method.server_streaming else [result]
    except grpc.RpcError as e:
        code = e.code()
        if code in CLIENT_ERRORS:
            return Outcome(code.name)
        return Outcome(code.name, f"{method.path}: {e.details()}")
    for raw in replies:
        try:
            reply = method.response.FromString(raw)
        except Exception as e:
            return Outcome("OK", f"{method.path}: reply does not parse: {e}")
        if (problem := _in_band_error(reply)) is not None:
            return Outcome("FINISH_REASON_ERROR", f"{method.path}: {problem}")
    return Outcome("OK")


def _in_band_error(reply: Message) -> str | None:
    """A pdmesh reply saying the request failed inside the server."""
    for fd, value in reply.ListFields():
        is_finish = fd.type == FieldDescriptor.TYPE_ENUM and fd.enum_type.name == "FinishReason"
        if is_finish and value == common_pb2.FINISH_REASON_ERROR:
            return f"FINISH_REASON_ERROR: {getattr(reply, 'error', '')}"
    return None
