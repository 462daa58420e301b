"""How the gateway turns the router's admission errors into HTTP (429/408, told apart from an
ordinary deadline by ``ErrorDetail.code``), reads worker urls, and checks its new flags."""

from __future__ import annotations

import argparse

import grpc
import grpc.aio
import pytest

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.rpc.errors import ERROR_DETAIL_KEY
from pdmesh.v1 import common_pb2
from services.gateway.admin import worker_address
from services.gateway.config import GatewayConfig
from services.gateway.errors import APIError, from_rpc_error


def rpc_error(code: grpc.StatusCode, detail_code: str = "") -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if detail_code:
        detail = common_pb2.ErrorDetail(code=detail_code)
        trailing = grpc.aio.Metadata((ERROR_DETAIL_KEY, detail.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="why")


@pytest.mark.parametrize(
    ("code", "detail", "status", "error_code"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, "queue_timeout", 408, "queue_timeout"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full", 429, "queue_full"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", 504, "deadline_exceeded"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "", 429, "resource_exhausted"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "something_else", 504, "deadline_exceeded"),
    ],
)
def test_router_errors_map_by_detail_code_first(
    code: grpc.StatusCode, detail: str, status: int, error_code: str
) -> None:
    error = from_rpc_error(rpc_error(code, detail))
    assert (error.status, error.code) == (status, error_code)
    if status in (408, 429):
        assert error.type == "rate_limit_error"


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("127.0.0.1:50053", "127.0.0.1:50053"),
        ("grpc://10.0.0.5:50053/", "10.0.0.5:50053"),
        ("[::1]:7", "[::1]:7"),
        ("sglang-grpc://h:30001", "sglang-grpc://h:30001"),  # the router's to judge
    ],
)
def test_worker_urls(url: str, address: str) -> None:
    assert worker_address(url) == address


@pytest.mark.parametrize("url", ["", "host", "host:", ":80", "grpc://host:port"])
def test_bad_worker_urls(url: str) -> None:
    with pytest.raises(APIError) as caught:
        worker_address(url)
    assert (caught.value.status, caught.value.param) == (400, "url")


def parse(*argv: str) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, GatewayConfig)
    return from_args(GatewayConfig, parser.parse_args(list(argv)))


def test_request_id_and_cors_flags() -> None:
    default = parse()
    assert default.request_id_header_names == (
        "x-request-id",
        "x-correlation-id",
        "x-trace-id",
        "request-id",
    )
    assert default.cors_origins == ()
    cfg = parse(
        "--request-id-headers", "X-My-Id, x-request-id", "--cors-allowed-origins", "*,http://a:1"
    )
    assert cfg.request_id_header_names == ("x-my-id", "x-request-id")
    assert cfg.cors_origins == ("*", "http://a:1")
    assert parse("--request-id-headers", "").request_id_header_names == ()
    with pytest.raises(ValueError, match="--cors-allowed-origins"):
        parse("--cors-allowed-origins", "example.com")
    with pytest.raises(ValueError, match="--request-id-headers"):
        parse("--request-id-headers", "x id")
