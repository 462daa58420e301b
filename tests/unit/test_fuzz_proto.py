"""The fuzzers' protobuf wire encoder (tests/integration/fuzz_proto.py) agrees with protobuf:
what it writes for in-range values is what protobuf writes, out-of-range values parse the way
servers will read them, tame messages always parse, and peer addresses stay on loopback."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.v1 import bootstrap_pb2, common_pb2, router_pb2, tokenizer_pb2, worker_pb2
from tests.integration.fuzz_proto import (
    SAFE_ADDRESS,
    MessageFuzz,
    encode_field,
    is_repeated,
    is_safe_address,
    keep_local,
)

FIELDS = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name
REQUESTS = [
    worker_pb2.GenerateRequest,
    router_pb2.RouterGenerateRequest,
    router_pb2.AddWorkerRequest,
    tokenizer_pb2.DetokenizeStreamRequest,
    tokenizer_pb2.ApplyChatTemplateRequest,
    bootstrap_pb2.RegisterDecodeRequest,
    sgl.GenerateRequest,
]


def test_in_range_values_encode_as_protobuf_does() -> None:
    values: dict[str, list[Any]] = {
        "temperature": [0.5],
        "top_k": [-1],
        "seed": [2**64 - 1],
        "max_new_tokens": [7],
        "stop_token_ids": [1, 300, 2],
        "stop": ["é", "\n"],
        "ignore_eos": [True],
    }
    ours = b"".join(
        encode_field(FIELDS[name], v, packed=True)
        for name, v in sorted(values.items(), key=lambda kv: FIELDS[kv[0]].number)
    )
    given: dict[str, Any] = {k: v if is_repeated(FIELDS[k]) else v[0] for k, v in values.items()}
    theirs = common_pb2.SamplingParams(**given).SerializeToString()
    assert ours == theirs


def test_out_of_range_values_parse_as_servers_read_them() -> None:
    raw = encode_field(FIELDS["max_new_tokens"], [2**32 + 5]) + encode_field(
        FIELDS["top_k"], [-(2**31) - 1]
    )
    parsed = common_pb2.SamplingParams.FromString(raw)
    assert parsed.max_new_tokens == 5  # an int32 keeps the low 32 bits
    assert parsed.top_k == 2**31 - 1
    # unpacked repeated values parse too, and a lone surrogate is invalid UTF-8
    ids = common_pb2.SamplingParams.FromString(encode_field(FIELDS["stop_token_ids"], [1, 2]))
    assert list(ids.stop_token_ids) == [1, 2]
    with pytest.raises(DecodeError):
        common_pb2.SamplingParams.FromString(encode_field(FIELDS["stop"], ["\ud800"]))


@pytest.mark.parametrize("request_class", REQUESTS, ids=lambda c: c.DESCRIPTOR.full_name)
def test_tame_messages_always_parse(request_class: type) -> None:
    fuzz = MessageFuzz(request_class.DESCRIPTOR)  # type: ignore[attr-defined]

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fuzz.tame())
    def parses(raw: bytes) -> None:
        request_class.FromString(raw)  # type: ignore[attr-defined]

    parses()


@given(st.sampled_from(["8.8.8.8:53", "example.com:443", "ipv4:10.0.0.1:80", "a:1", "[::2]:9"]))
def test_addresses_off_this_machine_are_replaced(address: str) -> None:
    assert not is_safe_address(address)
    raw = router_pb2.AddWorkerRequest(address=address, id="w").SerializeToString()
    fixed = router_pb2.AddWorkerRequest.FromString(keep_local(router_pb2.AddWorkerRequest, raw))
    assert fixed.address == SAFE_ADDRESS and fixed.id == "w"
    nested = bootstrap_pb2.RegisterDecodeRequest(decode_id="d")
    nested.receiver.address = address
    out = keep_local(bootstrap_pb2.RegisterDecodeRequest, nested.SerializeToString())
    assert bootstrap_pb2.RegisterDecodeRequest.FromString(out).receiver.address == SAFE_ADDRESS


def test_loopback_and_portless_addresses_are_kept() -> None:
    for address in ("127.0.0.1:9", "[::1]:1", "localhost:5", "sglang-grpc://127.0.0.1:9", "x"):
        assert is_safe_address(address)
        raw = router_pb2.AddWorkerRequest(address=address).SerializeToString()
        assert keep_local(router_pb2.AddWorkerRequest, raw) == raw
