# mypy: disable-error-code="no-untyped-def"
# (triton kernels: triton types their arguments itself)
"""Triton kernels of the CUDA path: writing new K/V into their slots, and decode attention that
reads the paged cache in place (no gathered copy of the context).

Both take the cache as ``attention.layer_rows`` hands it to a layer: rows of
``[num_kv_heads, head_dim]`` starting at that layer's K (or V), where a token at offset ``o`` of
page ``p`` is row ``p * page_stride + o``. Shapes are static for a given batch size (the block
table is padded, context lengths are read on the device), so both kernels can be captured in a
CUDA graph; a row with context length 0 (batch padding) produces zeros, a slot < 0 is skipped.

Decode attention is split-K ("flash decoding"): each (sequence, KV head) is cut into ``splits``
ranges of its context so that even batch 1 keeps every SM busy, each program handles all the
query heads of its KV head at once (GQA: the K/V tile is loaded once for the group), and a
second kernel merges the partial results by their log-sum-exp.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # context tokens per inner iteration of the decode kernel


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_rows_ptr,
    v_rows_ptr,
    slots_ptr,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < ROW) & (slot >= 0)
    src = t.to(tl.int64) * ROW + offs
    dst = slot * ROW + offs
    tl.store(k_rows_ptr + dst, tl.load(k_ptr + src, mask=mask), mask=mask)
    tl.store(v_rows_ptr + dst, tl.load(v_ptr + src, mask=mask), mask=mask)


def store_kv(
    k_rows: torch.Tensor,  # [rows, kv_heads, head_dim] (a layer's K view)
    v_rows: torch.Tensor,
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,
    slots: torch.Tensor,  # [T] int64; < 0 = skip (padding)
) -> None:
    t = k.shape[0]
    if t == 0:
        return
    row = k.shape[1] * k.shape[2]
    _store_kv_kernel[(t,)](
        k.contiguous(),
        v.contiguous(),
        k_rows,
        v_rows,
        slots,
        ROW=row,
        BLOCK=triton.next_power_of_2(row),
    )


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, H, D]
    k_rows_ptr,
    v_rows_ptr,
    block_table_ptr,  # [B, max_pages] int32
    ctx_lens_ptr,  # [B] int32
    mid_o_ptr,  # [B, H, SPLITS, D] float32
    mid_lse_ptr,  # [B, H, SPLITS] float32
    scale,
    stride_bt,
    page_stride,
    stride_qb,
    stride_qh,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kvh * G + g
    gmask = g < G
    q_rows = b.to(tl.int64) * stride_qb + heads * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        page = tl.load(block_table_ptr + b * stride_bt + t // PAGE, mask=tmask, other=0)
        row = page.to(tl.int64) * page_stride + t % PAGE
        offs = (row * HKV + kvh)[:, None] * D + d[None, :]
        k = tl.load(k_rows_ptr + offs, mask=tmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows_ptr + offs, mask=tmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    base = (b * H + heads) * SPLITS + split
    tl.store(mid_o_ptr + base[:, None] * D + d[None, :], o, mask=gmask[:, None])
    tl.store(mid_lse_ptr + base, lse, mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,  # [B, H, D], rows strided
    stride_ob,
    stride_oh,
    H: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    smask = s < SPLITS
    base = (b * H + h) * SPLITS + s
    lse = tl.load(mid_lse_ptr + base, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    finite = m > float("-inf")
    w = tl.where(smask & finite, tl.exp(lse - tl.where(finite, m, 0.0)), 0.0)
    o = tl.load(mid_o_ptr + base[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    o_row = b.to(tl.int64) * stride_ob + h * stride_oh
    tl.store(out_ptr + o_row + d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Context splits per (sequence, KV head): enough programs for ~2 waves over the SMs.
    Depends only on the batch size, so a captured graph keeps it."""
    programs = batch * num_kv_heads
    target = 2 * _num_sms(device.index if device.index is not None else 0)
    return max(1, min(32, -(-target // programs)))


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_rows: torch.Tensor,  # [rows, kv_heads, head_dim] (a layer's K view)
    v_rows: torch.Tensor,
    block_table: torch.Tensor,  # [B, max_pages] int32
    context_lens: torch.Tensor,  # [B] int32 (including the new token)
    page_size: int,
    page_stride: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, H, D]
    """``q`` and ``out`` may be views with strided rows (e.g. slices of the fused qkv output
    and of the layer's output): no copies in or out."""
    batch, heads, dim = q.shape
    assert q.stride(2) == 1 and (out is None or out.stride(2) == 1)
    kv_heads = k_rows.shape[1]
    group = heads // kv_heads
    splits = num_splits(batch, kv_heads, q.device)
    mid_o = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, kv_heads, splits)](
        q,
        k_rows,
        v_rows,
        block_table,
        context_lens,
        mid_o,
        mid_lse,
        scale,
        block_table.stride(0),
        page_stride,
        q.stride(0),
        q.stride(1),
        H=heads,
        HKV=kv_heads,
        D=dim,
        G=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        PAGE=page_size,
        BLOCK_N=BLOCK_N,
        SPLITS=splits,
        # float32 caches (tests, CPU parity) get exact products, not TF32
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    if out is None:
        out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    _decode_reduce_kernel[(batch, heads)](
        mid_o,
        mid_lse,
        out,
        out.stride(0),
        out.stride(1),
        H=heads,
        D=dim,
        SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits),
    )
    return out
