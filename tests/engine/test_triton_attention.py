"""The CUDA kernels (skipped without a GPU) against SDPA over gathered pages, the CPU path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdmesh.layers.attention import layer_rows, rows_per_page

pytestmark = pytest.mark.gpu

PAGE = 16
LAYERS = 3


def reference(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    tables: list[list[int]],
    lens: list[int],
    stride: int,
) -> torch.Tensor:
    out = torch.zeros_like(q)
    for b, (table, n) in enumerate(zip(tables, lens)):
        if n == 0:
            continue
        slots = torch.tensor(
            [table[t // PAGE] * stride + t % PAGE for t in range(n)], device=q.device
        )
        k = k_rows[slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
        v = v_rows[slots].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q[b].unsqueeze(0).unsqueeze(2).float(),
            k.float(),
            v.float(),
            enable_gqa=True,
            scale=q.shape[-1] ** -0.5,
        )
        out[b] = o[0, :, 0].to(q.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 16), (32, 8, 128), (9, 3, 64)])
def test_decode_attention_matches_sdpa(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int
) -> None:
    from pdmesh.layers import triton_attention as kernels

    torch.manual_seed(0)
    dev = torch.device("cuda")
    num_pages = 96
    cache = torch.randn(num_pages, LAYERS, 2, PAGE, kv_heads, dim, dtype=dtype, device=dev)
    stride = rows_per_page(LAYERS, PAGE)
    # scattered pages, a long and a short context, one exactly a page, one padding row (0)
    lens = [700, 5, 16, 0, 129]
    perm = torch.randperm(num_pages).tolist()
    tables, used = [], 0
    for n in lens:
        pages = -(-n // PAGE)
        tables.append(perm[used : used + pages])
        used += pages
    width = max(len(t) for t in tables)
    table = torch.tensor(
        [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev
    )
    ctx = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(len(lens), heads, dim, dtype=dtype, device=dev)
    for layer in (0, LAYERS - 1):
        k_rows, v_rows = layer_rows(cache, layer)
        got = kernels.decode_attention(q, k_rows, v_rows, table, ctx, PAGE, stride, dim**-0.5)
        want = reference(q, k_rows, v_rows, tables, lens, stride)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        assert not got[3].any()  # the padding row attends to nothing


def test_store_kv_writes_the_slots_and_skips_negative_ones() -> None:
    from pdmesh.layers import triton_attention as kernels

    dev = torch.device("cuda")
    cache = torch.zeros(8, LAYERS, 2, PAGE, 2, 16, device=dev)
    stride = rows_per_page(LAYERS, PAGE)
    k_rows, v_rows = layer_rows(cache, 1)
    k = torch.randn(3, 2, 16, device=dev)
    v = torch.randn(3, 2, 16, device=dev)
    slots = torch.tensor([5 * stride + 3, -1, 2 * stride + 15], device=dev)
    kernels.store_kv(k_rows, v_rows, k, v, slots)
    assert torch.equal(cache[5, 1, 0, 3], k[0]) and torch.equal(cache[5, 1, 1, 3], v[0])
    assert torch.equal(cache[2, 1, 0, 15], k[2]) and torch.equal(cache[2, 1, 1, 15], v[2])
    assert int((cache != 0).sum()) == 4 * 2 * 16  # nothing else, and nothing for slot -1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_round_like_the_torch_path(dtype: torch.dtype) -> None:
    from pdmesh.layers import cuda_ops
    from pdmesh.models.llama import RMSNorm, apply_rope

    torch.manual_seed(1)
    dev = torch.device("cuda")
    x = torch.randn(5, 96, dtype=dtype, device=dev)
    res = torch.randn(5, 96, dtype=dtype, device=dev)
    norm = RMSNorm(96, 1e-5).to(dev, dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    want_res = res + x
    want = norm.weight * (
        want_res.float() * torch.rsqrt(want_res.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    ).to(dtype)
    got_res = res.clone()
    got = cuda_ops.rms_norm(x, norm.weight, 1e-5, got_res)
    assert torch.equal(got_res, want_res) and torch.equal(got, want)

    q = torch.randn(5, 6, 32, dtype=dtype, device=dev)
    cos, sin = (
        torch.randn(5, 32, dtype=dtype, device=dev),
        torch.randn(5, 32, dtype=dtype, device=dev),
    )
    want_q = apply_rope(q, cos, sin)
    cuda_ops.rope_(q, cos, sin)
    assert torch.equal(q, want_q)

    gu = torch.randn(5, 2 * 40, dtype=dtype, device=dev)
    want_act = F.silu(gu[:, :40]) * gu[:, 40:]
    # torch's float32 SiLU evaluates its own formula (an ulp apart); bf16 rounds identically
    tol = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(cuda_ops.silu_mul(gu), want_act, atol=tol, rtol=tol)


def test_varlen_prefill_matches_per_segment_sdpa() -> None:
    from pdmesh.layers.attention import PrefillSegment, _flash_varlen, varlen_prefill

    torch.manual_seed(0)
    lens, heads, kv_heads, dim = [5, 17, 33, 1, 64], 9, 3, 64
    total = sum(lens)
    q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    empty = torch.empty(0, dtype=torch.long, device="cuda")
    segs = [PrefillSegment(s, n, n, empty, None) for s, n in zip(starts, lens)]
    batch = varlen_prefill(segs, torch.device("cuda"))
    assert batch is not None and batch.segments == range(len(lens)) and batch.max_len == 64
    got = _flash_varlen(q, k, v, batch, dim**-0.5)
    for s, n in zip(starts, lens):
        rows = slice(s, s + n)
        ref = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0).float(),
            k[rows].transpose(0, 1).unsqueeze(0).float(),
            v[rows].transpose(0, 1).unsqueeze(0).float(),
            is_causal=True,
            scale=dim**-0.5,
            enable_gqa=True,
        )[0].transpose(0, 1)
        torch.testing.assert_close(got[rows].float(), ref, atol=2e-2, rtol=2e-2)
