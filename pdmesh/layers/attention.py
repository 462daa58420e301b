"""Paged attention over the KV cache, and the per-step metadata it reads.

KV cache layout (one tensor for the whole cache, so it is one registered memory region):

    kv_cache: [num_pages, num_layers, 2 (K, V), page_size, num_kv_heads, head_dim]

Page-major: everything of page ``p`` (every layer, K and V) is the one contiguous byte range
``kv_cache[p]``, so a room of consecutive pages moves to a decode worker as a single copy, and
the pages a prefill chunk completes can be shipped as soon as it ends. (Layer-major, the usual
choice, costs ``2 * num_layers`` copies per run of pages; Mooncake's tcp transport spends a
request on each, ~40% of the throughput of rooms of a few MiB.)

Viewed as rows of ``[num_kv_heads, head_dim]``, the cache holds ``num_layers * 2 * page_size``
rows per page. A *slot* names a token's row in layer 0's K: ``page * rows_per_page(...) +
offset``; the same token's row in layer ``l``'s K (V) is that slot counted from row
``(2 * l) * page_size`` (``(2 * l + 1) * page_size``), which is what ``layer_rows`` hands each
layer: one slot mapping per step serves every layer. Attention writes the step's new K/V into
their slots, then reads each sequence's context through a gathered view of its slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSegment:
    """One sequence's chunk inside the flat token batch."""

    start: int  # first row of the chunk in the flat batch
    num_tokens: int
    context_len: int  # tokens of context after this chunk (cached prefix + chunk)
    slots: torch.Tensor  # [context_len] cache slots of the whole context
    causal_mask: torch.Tensor | None  # [num_tokens, context_len] bool; None = plain causal


@dataclass
class VarlenPrefill:
    """Consecutive prefill segments without context before them (a prompt's first chunk),
    attended in one variable-length flash-attention call per layer instead of one SDPA call
    per segment: at 30 layers x 32 new prompts that loop was ~1k kernel launches from Python
    per step, most of a busy GPU worker's engine time (py-spy on an H100, batch 256)."""

    segments: range  # indices into ``AttentionMetadata.prefills``
    rows: slice  # their rows in the flat batch
    cu_seqlens: torch.Tensor  # [len(segments) + 1] int32 on the device: row offsets in ``rows``
    max_len: int


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, read by every layer."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    num_decode: int  # the first num_decode rows are single-token decodes
    decode_slots: torch.Tensor | None  # [B, L] context slots, padded with slot 0
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] bool, True where a key is attended
    prefills: list[PrefillSegment]
    # the CUDA path (triton_attention) reads the pages in place instead of decode_slots/mask
    block_table: torch.Tensor | None = None  # [B, max_pages] int32 page ids of decode rows
    context_lens: torch.Tensor | None = None  # [B] int32, 0 for padding rows of a graph
    page_size: int = 0
    page_stride: int = 0  # rows per page (rows_per_page)
    prefill_varlen: VarlenPrefill | None = None  # CUDA, 16-bit: see VarlenPrefill


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [rows, num_kv_heads, head_dim]: this layer's K (``layer_rows``)
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    out = torch.empty_like(q)
    if meta.block_table is not None:  # CUDA: kernels that read the pages in place
        from pdmesh.layers import triton_attention as kernels  # triton: only where it exists

        kernels.store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.num_decode:
            assert meta.context_lens is not None
            kernels.decode_attention(
                q[: meta.num_decode],
                k_cache,
                v_cache,
                meta.block_table,
                meta.context_lens,
                meta.page_size,
                meta.page_stride,
                scale,
                out=out[: meta.num_decode],
            )
    else:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.num_decode and meta.block_table is None:
        assert meta.decode_slots is not None
        qd = q[: meta.num_decode].unsqueeze(2)  # [B, H, 1, D]
        kd = gather(k_cache, meta.decode_slots).transpose(1, 2)  # [B, Hkv, L, D]
        vd = gather(v_cache, meta.decode_slots).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        )
        out[: meta.num_decode] = od.squeeze(2)
    done = range(0)
    if meta.prefill_varlen is not None:
        batch = meta.prefill_varlen
        rows, done = batch.rows, batch.segments
        out[rows] = _flash_varlen(q[rows], k[rows], v[rows], batch, scale)
    for i, seg in enumerate(meta.prefills):
        if i in done:
            continue
        rows = slice(seg.start, seg.start + seg.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if seg.causal_mask is None:  # no cached prefix: the chunk is its whole context
            kp, vp = k[rows], v[rows]
        else:
            kp, vp = gather(k_cache, seg.slots), gather(v_cache, seg.slots)
        kp = kp.transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        vp = vp.transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(
            qp,
            kp,
            vp,
            attn_mask=seg.causal_mask,
            is_causal=seg.causal_mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out


def varlen_prefill(prefills: list[PrefillSegment], device: torch.device) -> VarlenPrefill | None:
    """The longest run of consecutive fresh segments (no context before the chunk), when it
    holds two or more; ``None`` otherwise (the per-segment path is as fast for one)."""
    best = cur = range(0)
    for i, seg in enumerate(prefills):
        if seg.causal_mask is not None:  # an earlier chunk or a cached prefix before it
            cur = range(0)
            continue
        cur = range(cur.start if cur else i, i + 1)
        if len(cur) > len(best):
            best = cur
    if len(best) < 2:
        return None
    segs = [prefills[i] for i in best]
    offsets = [0]
    for seg in segs:
        offsets.append(offsets[-1] + seg.num_tokens)
    return VarlenPrefill(
        segments=best,
        rows=slice(segs[0].start, segs[0].start + offsets[-1]),
        cu_seqlens=torch.tensor(offsets, dtype=torch.int32).to(device, non_blocking=True),
        max_len=max(seg.num_tokens for seg in segs),
    )


def _flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenPrefill, scale: float
) -> torch.Tensor:
    # FlashAttention-2's varlen forward (the kernel SDPA's flash backend runs), causal within
    # each segment; it takes fewer KV heads than query heads as they are (GQA)
    cu = batch.cu_seqlens
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, batch.max_len, batch.max_len, 0.0, True, False, scale=scale
    )[0]
    return out


def rows_per_page(num_layers: int, page_size: int) -> int:
    """Rows of ``[kv_heads, head_dim]`` in one page: the multiplier of a slot's page number."""
    return num_layers * 2 * page_size


def layer_rows(kv_cache: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``kv_cache`` as rows, offset so that a slot indexes ``layer``'s K (and V)."""
    page_size, heads, dim = kv_cache.shape[3:]
    rows = kv_cache.view(-1, heads, dim)
    first = 2 * layer * page_size
    return rows[first:], rows[first + page_size :]


def gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache[slots]`` (any index shape), through ``index_select`` on the flattened index.

    Same rows, same values; advanced indexing with a 2-D index is 4-5x slower on CPU (16 x 160
    slots of a [slots, 3, 64] cache: 159 us vs 34 us), and this runs twice per layer per step.
    """
    rows = cache.index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *cache.shape[1:])
