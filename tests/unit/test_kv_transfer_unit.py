"""KV transfer pieces that need no second process: coalescing, the backend registry, the
handle's wire form, the sender's checks and the grpc backend's chunking."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.kv_transfer import (
    KVTransferError,
    ReceiverHandle,
    TransferStats,
    backend_names,
    coalesce,
    get_backend,
    layout_of,
    page_runs,
)
from pdmesh.kv_transfer.grpc_backend import GrpcSender, KVReceiverServicer
from pdmesh.kv_transfer.handle import check_cache
from pdmesh.v1 import kv_transfer_pb2
from services.worker.kv_convert import handle_from_pb, handle_to_pb

PAGE_BYTES = 4 * 2 * 8 * 4  # one layer's K of a page: page_size 4, 2 kv heads, head_dim 8, fp32


def layout(num_pages: int = 64, num_layers: int = 2, base_ptr: int = 0, **kw: object) -> KVLayout:
    fields: dict[str, object] = dict(
        base_ptr=base_ptr,
        total_bytes=num_layers * 2 * num_pages * PAGE_BYTES,
        num_layers=num_layers,
        num_pages=num_pages,
        page_size=4,
        num_kv_heads=2,
        head_dim=8,
        dtype="float32",
        device="cpu",
    )
    fields.update(kw)
    return KVLayout(**fields)  # type: ignore[arg-type]


def expand(blocks: list[tuple[int, int, int]], page_bytes: int) -> list[tuple[int, int]]:
    """Blocks back to (src, dst) page-sized copies, to compare with the naive mapping."""
    return [(s + i, d + i) for s, d, n in blocks for i in range(0, n, page_bytes)]


def naive(src: KVLayout, dst: KVLayout, src_pages: list[int], dst_pages: list[int]) -> list:
    return [
        (src.page_addr(s) - src.base_ptr, dst.page_addr(d) - dst.base_ptr)
        for s, d in zip(src_pages, dst_pages)
    ]


# --- coalesce -----------------------------------------------------------------------------


def test_contiguous_room_is_one_block_of_every_layer() -> None:
    lay = layout(num_pages=64, num_layers=3)
    page = 3 * 2 * PAGE_BYTES  # page-major: a page holds every layer's K and V
    assert lay.page_bytes == page
    blocks = coalesce(lay, list(range(10, 20)), list(range(40, 50)))
    assert blocks == [(10 * page, 40 * page, 10 * page)]


def test_non_contiguous_pages_stay_separate() -> None:
    blocks = coalesce(layout(num_layers=1), [0, 2, 4], [1, 3, 5])
    assert [n for _, _, n in blocks] == [2 * PAGE_BYTES] * 3
    assert page_runs([0, 2, 4], [1, 3, 5]) == [(0, 1, 1), (2, 3, 1), (4, 5, 1)]


def test_run_breaks_where_either_side_breaks() -> None:
    # source contiguous, destination jumps after two pages; then destination contiguous,
    # source jumps; then a run going backwards is no run at all
    assert page_runs([0, 1, 2, 3], [4, 5, 9, 10]) == [(0, 4, 2), (2, 9, 2)]
    assert page_runs([0, 1, 7, 8], [0, 1, 2, 3]) == [(0, 0, 2), (7, 2, 2)]
    assert page_runs([3, 2, 1], [0, 1, 2]) == [(3, 0, 1), (2, 1, 1), (1, 2, 1)]


def test_interleaved_runs_and_their_offsets() -> None:
    src, dst = layout(num_pages=16, num_layers=2), layout(num_pages=64, num_layers=2)
    src_pages, dst_pages = [0, 1, 2, 8, 9, 5], [30, 31, 32, 3, 4, 50]
    blocks = coalesce(src, src_pages, dst_pages, dst)
    assert len(blocks) == 3  # one per run
    assert expand(blocks, src.page_bytes) == naive(src, dst, src_pages, dst_pages)


def test_pools_of_different_sizes_address_pages_alike() -> None:
    # a prefill with 16 pages writing into a decode with 64: page-major, a page's offset does
    # not depend on the pool's size (layer-major it would, per layer and kind)
    src, dst = layout(num_pages=16, num_layers=1), layout(num_pages=64, num_layers=1)
    page = 2 * PAGE_BYTES
    assert coalesce(src, [3], [7], dst) == [(3 * page, 7 * page, page)]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_blocks_expand_to_the_page_by_page_copy(data: st.DataObject) -> None:
    n_src = data.draw(st.integers(1, 40))
    n_dst = data.draw(st.integers(1, 40))
    count = data.draw(st.integers(0, min(n_src, n_dst)))
    src_pages = data.draw(st.lists(st.integers(0, n_src - 1), min_size=count, max_size=count))
    dst_pages = data.draw(st.permutations(range(n_dst)))[:count]
    src, dst = layout(num_pages=n_src, num_layers=2), layout(num_pages=n_dst, num_layers=2)
    blocks = coalesce(src, src_pages, dst_pages, dst)
    assert expand(blocks, src.page_bytes) == naive(src, dst, src_pages, dst_pages)
    assert len(blocks) == len(page_runs(src_pages, dst_pages))


def test_empty_room_has_no_blocks() -> None:
    assert coalesce(layout(), [], []) == []


@pytest.mark.parametrize(
    ("src_pages", "dst_pages", "message"),
    [
        ([0, 1], [0], "2 source pages but 1 destination pages"),
        ([64], [0], "source page 64 is outside [0, 64)"),
        ([0], [-1], "destination page -1 is outside [0, 64)"),
        ([0, 1], [5, 5], "destination pages repeat"),
    ],
)
def test_bad_page_lists_are_refused(
    src_pages: list[int], dst_pages: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        coalesce(layout(), src_pages, dst_pages)


def test_incompatible_layouts_are_refused_naming_the_fields() -> None:
    with pytest.raises(ValueError, match="page_size: 4 != 8.*dtype: float32 != bfloat16"):
        coalesce(layout(), [0], [0], layout(page_size=8, dtype="bfloat16"))
    # a peer from before the order was sent (layer-major) is refused, not written into
    with pytest.raises(ValueError, match=r"order: page_major != \(not set\)"):
        coalesce(layout(), [0], [0], layout(order=""))


# --- registry, handle, stats ---------------------------------------------------------------


def test_registry_error_lists_valid_names() -> None:
    assert backend_names() == ["auto", "cuda_ipc", "grpc", "mooncake"]
    with pytest.raises(
        ValueError,
        match="unknown KV transfer backend .nixl.; choose one of: auto, cuda_ipc, grpc, mooncake",
    ):
        get_backend("nixl")


def test_registry_returns_receiver_and_sender_classes() -> None:
    backend = get_backend("grpc")
    assert (backend.receiver.backend, backend.sender.backend) == ("grpc", "grpc")


def test_handle_round_trips_through_the_proto() -> None:
    lay = layout(num_pages=1000, base_ptr=2**63 + 4096, dtype="bfloat16", device="cuda:1")
    handle = ReceiverHandle("mooncake", "10.0.0.7:15123", "abc123", lay)
    wire = handle_to_pb(handle).SerializeToString()
    back = handle_from_pb(kv_transfer_pb2.KVReceiverHandle.FromString(wire))
    assert back == handle
    assert back.base_ptr == 2**63 + 4096


def test_layout_of_matches_page_addr_of_the_tensor() -> None:
    kv = torch.zeros(8, 2, 2, 4, 2, 8)
    lay = layout_of(kv)
    assert lay.page_bytes == 2 * 2 * PAGE_BYTES == kv[0].nbytes
    assert lay.page_addr(3) == kv[3].data_ptr()
    check_cache(kv, lay)
    with pytest.raises(ValueError, match="does not describe kv_cache"):
        check_cache(kv, dataclasses.replace(lay, base_ptr=lay.base_ptr + 1))
    with pytest.raises(ValueError, match="contiguous"):
        check_cache(kv.transpose(0, 1), lay)
    with pytest.raises(ValueError, match="pages, layers, 2"):
        layout_of(torch.zeros(8, 2, 3, 4, 2, 8))


def test_stats_gbps() -> None:
    assert TransferStats(2_000_000_000, 10, 4, 0.5, "grpc").gbps == pytest.approx(4.0)
    assert TransferStats(0, 0, 0, 0.0, "grpc").gbps == 0.0


# --- sender checks and grpc chunking -------------------------------------------------------


def sender(num_pages: int = 64, chunk_bytes: int = 4000) -> tuple[GrpcSender, torch.Tensor]:
    kv = torch.randn(num_pages, 2, 2, 4, 2, 8)
    return GrpcSender.open(kv, layout_of(kv), "127.0.0.1", chunk_bytes=chunk_bytes), kv


def test_write_to_a_mismatched_receiver_fails_before_sending() -> None:
    s, _ = sender()
    other = ReceiverHandle("grpc", "127.0.0.1:1", "r", layout(page_size=8))
    with pytest.raises(
        KVTransferError, match="127.0.0.1:1 does not match ours: page_size: 4 != 8"
    ) as e:
        asyncio.run(s.write(other, [0], [0], timeout=1))
    assert e.value.peer == "127.0.0.1:1"
    wrong = ReceiverHandle("mooncake", "127.0.0.1:2", "r", layout())
    with pytest.raises(KVTransferError, match="uses the 'mooncake' backend"):
        asyncio.run(s.write(wrong, [0], [0], timeout=1))


def test_chunks_respect_the_size_limit_and_land_at_the_right_offsets() -> None:
    s, src = sender(num_pages=16, chunk_bytes=1000)  # < one page: every block is split
    dst = torch.zeros(64, 2, 2, 4, 2, 8)
    servicer = KVReceiverServicer(dst, "rid")
    src_pages, dst_pages = [0, 1, 2, 9, 4], [10, 11, 12, 3, 60]
    blocks = coalesce(s.layout, src_pages, dst_pages, layout_of(dst))
    chunks = list(s._chunks("rid", blocks))
    assert all(len(c.data) <= 1000 for c in chunks)
    assert sum(len(c.data) for c in chunks) == len(src_pages) * 4 * PAGE_BYTES
    for chunk in chunks:
        assert servicer._check(chunk) is None
        servicer._apply(chunk)
    assert torch.equal(dst[dst_pages], src[src_pages])
    untouched = [p for p in range(64) if p not in dst_pages]
    assert not dst[untouched].any()


def test_receiver_refuses_segments_outside_the_cache() -> None:
    servicer = KVReceiverServicer(torch.zeros(2, 1, 2, 4, 2, 8), "rid")
    size = 1 * 2 * 2 * PAGE_BYTES
    bad = kv_transfer_pb2.PageChunk(
        receiver_id="rid", dst_offsets=[size - 8], lengths=[16], data=bytes(16)
    )
    assert f"[{size - 8}, {size + 8}) is outside the {size}-byte KV cache" in (
        servicer._check(bad) or ""
    )
    short = kv_transfer_pb2.PageChunk(
        receiver_id="rid", dst_offsets=[0], lengths=[16], data=bytes(8)
    )
    assert "lengths add up to 16 bytes, data has 8" in (servicer._check(short) or "")


def test_mooncake_splits_long_blocks_into_parts_that_cover_them_exactly() -> None:
    from pdmesh.kv_transfer.mooncake_backend import split_blocks

    kib = 1 << 10
    blocks = [(0, 4096 * kib, 3000 * kib), (8192 * kib, 0, 300 * kib), (100, 200, 10)]
    parts = split_blocks(blocks, 4)
    # the long block in 4 parts; 300 KiB is one part (parts stay >= 256 KiB); 10 bytes as is
    assert len(parts) == 4 + 1 + 1
    for (s, d, n), group in zip(blocks, (parts[:4], parts[4:5], parts[5:])):
        assert group[0][:2] == (s, d)
        assert sum(p[2] for p in group) == n
        for a, b in zip(group, group[1:]):
            assert (b[0], b[1]) == (a[0] + a[2], a[1] + a[2])  # contiguous on both sides
    assert split_blocks(blocks, 1) == blocks
