"""``--kv-transfer-protocol`` / ``--disaggregation-ib-device``: what is asked of Mooncake, the
fallback to tcp where no RDMA device exists (this host has none: real Mooncake shows it), and
the transport on the handle, the bootstrap registration and the pair check."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdmesh.config import from_args
from pdmesh.kv_transfer import get_backend, layout_of
from pdmesh.kv_transfer.mooncake_transport import (
    effective_transport,
    pair_refusal,
    plan_transport,
    rdma_devices,
    topology_devices,
)
from pdmesh.pd.registry import DecodePeer, DecodeRegistry, transport_of
from services.decode.__main__ import build_parser as decode_parser
from services.prefill.__main__ import build_parser as prefill_parser
from services.worker.config import PrefillServiceConfig, WorkerServiceConfig
from services.worker.kv_convert import handle_from_pb, handle_to_pb
from services.worker.pd_convert import registration_from_pb, registration_to_pb

SHAPE = (16, 2, 2, 4, 2, 8)
NO_HCA = '{\n\t"cpu:0" : \n\t[\n\t\t[],\n\t\t[]\n\t]\n}\n'  # what Mooncake prints here


def test_auto_takes_rdma_only_where_the_kernel_lists_the_devices(tmp_path: Path) -> None:
    assert rdma_devices(tmp_path / "absent") == []
    (tmp_path / "mlx5_1").mkdir()
    (tmp_path / "mlx5_0").mkdir()
    assert rdma_devices(tmp_path) == ["mlx5_0", "mlx5_1"]

    plan = plan_transport("auto", "", available=[])
    assert (plan.protocol, plan.device_name) == ("tcp", "")
    assert "no RDMA device" in plan.reason
    plan = plan_transport("auto", "", available=["mlx5_0"])
    assert (plan.protocol, plan.device_name) == ("rdma", "")
    plan = plan_transport("auto", "mlx5_0, mlx5_1", available=["mlx5_0", "mlx5_1"])
    assert (plan.protocol, plan.device_name) == ("rdma", "mlx5_0,mlx5_1")
    plan = plan_transport("auto", "mlx5_0,mlx5_3", available=["mlx5_0"])
    assert plan.protocol == "tcp" and "mlx5_3 not in" in plan.reason
    # explicit choices pass through as they are, devices or not
    assert plan_transport("rdma", "mlx5_2", available=[]).device_name == "mlx5_2"
    assert plan_transport("tcp", "mlx5_0", available=["mlx5_0"]).protocol == "tcp"
    with pytest.raises(ValueError, match="kv-transfer-protocol"):
        plan_transport("roce", "")


def test_rdma_without_devices_in_mooncakes_topology_is_its_fallback_to_tcp() -> None:
    assert topology_devices(NO_HCA) == []
    assert topology_devices('{"cpu:0": [["mlx5_0"], ["mlx5_1"]]}') == ["mlx5_0", "mlx5_1"]
    assert topology_devices("not json") is None
    rdma = plan_transport("rdma", "mlx5_0", available=[])
    transport, reason = effective_transport(rdma, NO_HCA)
    assert transport == "tcp" and "fell back to tcp" in reason and "mlx5_0" in reason
    assert effective_transport(rdma, '{"cpu:0": [["mlx5_0"], []]}')[0] == "rdma"
    assert effective_transport(plan_transport("tcp"), NO_HCA)[0] == "tcp"


def test_a_pair_is_refused_on_different_transports() -> None:
    assert pair_refusal("tcp", "tcp") is None
    assert pair_refusal("", "tcp") is None  # an older decode: tcp
    assert pair_refusal("rdma", "rdma") is None
    reason = pair_refusal("rdma", "tcp")
    assert reason is not None and "mooncake rdma" in reason and "runs tcp" in reason


FRESH_ENGINE = """
import torch
from pdmesh.kv_transfer import get_backend, layout_of
kv = torch.zeros(16, 2, 2, 4, 2, 8)
receiver = get_backend("mooncake").receiver.open(
    kv, layout_of(kv), "127.0.0.1", protocol="rdma", device_name="mlx5_0"
)
print("transport", receiver.handle.transport, flush=True)
receiver.close()
"""


def test_the_protocol_reaches_mooncake() -> None:
    """In a fresh process (Mooncake names the protocol only for its first engine): Mooncake
    itself is asked for rdma, finds no device and runs tcp."""
    done = subprocess.run(
        [sys.executable, "-c", FRESH_ENGINE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "protocol: rdma" in done.stderr  # Mooncake's own line
    assert "Found 0 HCAs" in done.stderr or "No RDMA devices found" in done.stderr
    assert "transport tcp" in done.stdout


def test_the_flags_reach_mooncake_which_falls_back_to_tcp_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real Mooncake on a host without RDMA NICs: asked for rdma on mlx5_0, it runs tcp; the
    handle, the sender and the log say tcp, and pages still move."""
    kv = torch.zeros(SHAPE)
    source = torch.randn(SHAPE)
    backend = get_backend("mooncake")
    with caplog.at_level(logging.INFO, logger="pdmesh.kv_transfer.mooncake_backend"):
        receiver = backend.receiver.open(
            kv, layout_of(kv), "127.0.0.1", protocol="rdma", device_name="mlx5_0"
        )
        sender = backend.sender.open(source, layout_of(source), "127.0.0.1")  # auto
    try:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, caplog.text
        assert "receiver" in warnings[0].getMessage()
        assert "transport tcp" in warnings[0].getMessage()
        assert "fell back to tcp" in warnings[0].getMessage()
        assert "auto: no RDMA device" in caplog.text  # the sender's choice, at INFO
        assert receiver.handle.transport == "tcp" and receiver.transport == "tcp"
        assert sender.transport == "tcp"
        assert sender.refusal(receiver.handle) is None
        rdma_offer = dataclasses.replace(receiver.handle, transport="rdma")
        assert "mooncake rdma" in (sender.refusal(rdma_offer) or "")

        async def write() -> int:
            return (await sender.write(receiver.handle, [1, 2], [4, 9], timeout=10)).bytes

        assert asyncio.run(write()) == 2 * layout_of(kv).page_bytes
        assert torch.equal(kv[[4, 9]], source[[1, 2]])
    finally:
        receiver.close()
        asyncio.run(sender.close())


def test_the_transport_travels_in_the_bootstrap_registration() -> None:
    kv = torch.zeros(SHAPE)
    receiver = get_backend("auto").receiver.open(
        kv, layout_of(kv), "127.0.0.1", protocol="tcp", device_name=""
    )
    sender = get_backend("auto").sender.open(kv, layout_of(kv), "127.0.0.1", protocol="auto")
    try:
        assert handle_from_pb(handle_to_pb(receiver.handle)) == receiver.handle
        pb = registration_to_pb("d1", "10.0.0.3:50053", receiver.handles)
        assert pb.receiver.transport == "tcp"
        registry = DecodeRegistry(layout_of(kv), sender.refusal)
        registry.register(registration_from_pb(pb))
        assert registry.transport("d1") == "mooncake tcp"
        assert registry.transport("unknown") == ""
        # a decode whose engine runs rdma is refused by this tcp prefill, naming both
        rdma = dataclasses.replace(receiver.handle, transport="rdma")
        with pytest.raises(Exception, match="mooncake rdma"):
            registry.register(DecodePeer("d2", "10.0.0.4:50053", rdma))
        assert transport_of(dataclasses.replace(receiver.handle, transport="")) == "mooncake tcp"
    finally:
        receiver.close()
        asyncio.run(sender.close())


@pytest.mark.parametrize(
    ("parser", "config"),
    [(prefill_parser, PrefillServiceConfig), (decode_parser, WorkerServiceConfig)],
)
def test_worker_flags(parser: object, config: type) -> None:
    p = parser()  # type: ignore[operator]
    text = p.format_help()
    assert "--kv-transfer-protocol" in text and "--disaggregation-ib-device" in text
    args = p.parse_args(
        ["--kv-transfer-protocol", "rdma", "--disaggregation-ib-device", "mlx5_0,mlx5_1"]
    )
    parsed = from_args(config, args)
    assert parsed.kv_transfer_protocol == "rdma"
    assert parsed.disaggregation_ib_device == "mlx5_0,mlx5_1"
    assert from_args(config, p.parse_args([])).kv_transfer_protocol == "auto"
    with pytest.raises(ValueError, match="kv-transfer-protocol"):
        from_args(config, p.parse_args(["--kv-transfer-protocol", "ib"]))
