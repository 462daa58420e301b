"""The cuda_ipc KV-transfer backend between real processes (skipped without a GPU): the
receiver's cache lives in a spawned child on the last GPU, the test process writes from GPU 0."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from harness.kv_receiver import ReceiverProcess
from pdmesh.kv_transfer import KVTransferError, get_backend, layout_of

pytestmark = pytest.mark.gpu

SHAPE = (64, 2, 2, 16, 2, 64)  # [pages, layers, K/V, page_size, kv_heads, head_dim], 32 KiB pages


def test_cuda_ipc_pages_arrive_exactly_in_link_speed_memory() -> None:
    receiver_gpu = f"cuda:{torch.cuda.device_count() - 1}"
    source = torch.randn(48, *SHAPE[1:], device="cuda:0", dtype=torch.bfloat16)
    with ReceiverProcess("cuda_ipc", SHAPE, dtype="bfloat16", device=receiver_gpu) as rp:
        # the receiver's cache is cuMem memory: peers copy into it over the link, not the host
        assert json.loads(rp.handle.extra)["link_speed"] is True
        sender = get_backend("cuda_ipc").sender.open(source, layout_of(source), "127.0.0.1")
        writes = [
            (list(range(0, 8)), list(range(20, 28))),  # one run: a DMA copy
            ([30, 5, 47], [63, 0, 33]),  # a few runs: a DMA copy each
            # many runs: page_copy's kernel
            ([1, 3, 9, 11, 13, 15, 17, 40], [60, 2, 58, 4, 56, 6, 54, 9]),
        ]

        async def run() -> list[int]:
            try:
                return [(await sender.write(rp.handle, s, d, timeout=10)).bytes for s, d in writes]
            finally:
                await sender.close()

        sizes = asyncio.run(run())
        assert sizes == [len(s) * layout_of(source).page_bytes for s, _ in writes]
        got = rp.read(list(range(SHAPE[0])))
    written: set[int] = set()
    for s, d in writes:
        assert torch.equal(got[d], source[s].cpu())
        written.update(d)
    assert not got[[p for p in range(SHAPE[0]) if p not in written]].any()


def test_cuda_ipc_refuses_a_cache_in_host_memory() -> None:
    kv = torch.zeros(SHAPE)
    with pytest.raises(KVTransferError, match="needs the KV cache in GPU memory"):
        get_backend("cuda_ipc").sender.open(kv, layout_of(kv), "127.0.0.1")
