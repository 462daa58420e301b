"""``--kv-transfer-backend auto``: the decode offers every backend its cache allows, fastest
first, and the prefill keeps the first its sender can use (real Mooncake on this CPU host)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from pdmesh.errors import FailedPreconditionError
from pdmesh.kv_transfer import ReceiverHandle, get_backend, layout_of
from pdmesh.kv_transfer.cuda_ipc_backend import host_id
from pdmesh.pd.registry import DecodePeer, DecodeRegistry, by_backend
from services.worker.pd_convert import registration_from_pb, registration_to_pb

SHAPE = (16, 2, 2, 4, 2, 8)


def cuda_ipc_offer(kv: torch.Tensor, host: str) -> ReceiverHandle:
    """A cuda_ipc handle as a decode on a GPU of ``host`` would offer it."""
    extra = json.dumps({"host": host, "gpu_uuid": "GPU-0000", "handle": "", "link_speed": True})
    return ReceiverHandle("cuda_ipc", "10.0.0.9:1", "rid", layout_of(kv), extra.encode())


def test_a_cpu_cache_is_offered_over_mooncake_only_and_pages_arrive() -> None:
    kv = torch.zeros(SHAPE)
    source = torch.randn(SHAPE)
    receiver = get_backend("auto").receiver.open(kv, layout_of(kv), "127.0.0.1")
    sender = get_backend("auto").sender.open(source, layout_of(source), "127.0.0.1")
    try:
        assert [h.backend for h in receiver.handles] == ["mooncake"]
        assert sender.refusal(receiver.handle) is None

        async def write() -> int:
            return (await sender.write(receiver.handle, [1, 2, 7], [0, 5, 6], timeout=10)).bytes

        assert asyncio.run(write()) == 3 * layout_of(kv).page_bytes
        assert torch.equal(kv[[0, 5, 6]], source[[1, 2, 7]])
        assert not kv[[p for p in range(SHAPE[0]) if p not in (0, 5, 6)]].any()
    finally:
        receiver.close()
        asyncio.run(sender.close())


def test_the_prefill_keeps_the_first_offer_its_sender_can_use() -> None:
    kv = torch.zeros(SHAPE)
    receiver = get_backend("mooncake").receiver.open(kv, layout_of(kv), "127.0.0.1")
    sender = get_backend("auto").sender.open(kv, layout_of(kv), "127.0.0.1")
    try:
        # a decode on a GPU offers cuda_ipc first; this prefill's cache is in host memory
        offers = [cuda_ipc_offer(kv, host_id()), receiver.handle]
        peer = registration_from_pb(registration_to_pb("d1", "10.0.0.9:2", offers))
        assert [h.backend for h in (peer.receiver, *peer.alternatives)] == ["cuda_ipc", "mooncake"]
        registry = DecodeRegistry(layout_of(kv), sender.refusal)
        registry.register(peer)
        assert registry.get("d1").receiver == receiver.handle
        # a prefill set to one backend takes the offer of that backend
        explicit = DecodeRegistry(layout_of(kv), by_backend("mooncake"))
        explicit.register(peer)
        assert explicit.get("d1").receiver.backend == "mooncake"
    finally:
        receiver.close()
        asyncio.run(sender.close())


def test_no_usable_offer_is_refused_with_every_reason() -> None:
    kv = torch.zeros(SHAPE)
    registry = DecodeRegistry(layout_of(kv), by_backend("grpc"))
    peer = DecodePeer(
        "d1",
        "10.0.0.9:2",
        cuda_ipc_offer(kv, "other-host/boot"),
        (ReceiverHandle("mooncake", "10.0.0.9:3", "rid", layout_of(kv)),),
    )
    with pytest.raises(FailedPreconditionError) as e:
        registry.register(peer)
    assert "'cuda_ipc' transfer backend" in str(e.value)
    assert "'mooncake' transfer backend" in str(e.value)
    assert len(registry) == 0
