# mypy: disable-error-code="no-untyped-def"
# (triton kernels: triton types their arguments itself)
"""Fused Triton kernels for the model's small ops on CUDA: RMSNorm (with the residual add), RoPE
on q and k in place, and SiLU-and-multiply.

Why: at decode batch sizes every op of a layer is a launch over a few KB, and torch runs RMSNorm
as six kernels and RoPE as five per tensor; on an 8B model that was ~1.5 ms of a ~7 ms step. Each
kernel rounds exactly where the torch code it replaces rounds (the CPU path in ``llama.py``), and
is compiled without FMA contraction, so float32 results match the CPU bit for bit.
"""

from __future__ import annotations

import functools
import os

import torch

ENV_KERNELS = "PDMESH_CUDA_KERNELS"  # "0": plain torch ops on CUDA too


@functools.cache
def _triton_ok() -> bool:
    return triton is not None and os.environ.get(ENV_KERNELS, "1") != "0"


def enabled(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_ok()


try:  # only CUDA hosts have (and need) triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU hosts
    triton = None

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
        if HAS_RES:  # residual += x, in the model dtype like torch's add; then normalise it
            x = x + tl.load(res_ptr + row * n + cols, mask=mask, other=0.0)
            tl.store(res_ptr + row * n + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / n
        y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * n + cols, w * y, mask=mask)

    @triton.jit
    def _rope_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        stride_t,
        HEADS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        D: tl.constexpr,
        HALF: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, HALF)
        hmask = (h < HEADS)[:, None]
        base = x_ptr + t * stride_t + h[:, None] * D + d[None, :]
        x1 = tl.load(base, mask=hmask, other=0.0)
        x2 = tl.load(base + HALF, mask=hmask, other=0.0)
        c1 = tl.load(cos_ptr + t * D + d)[None, :]
        c2 = tl.load(cos_ptr + t * D + HALF + d)[None, :]
        s1 = tl.load(sin_ptr + t * D + d)[None, :]
        s2 = tl.load(sin_ptr + t * D + HALF + d)[None, :]
        # x * cos + cat(-x2, x1) * sin, each product rounded to the dtype as torch does
        tl.store(base, x1 * c1 + (-x2) * s1, mask=hmask)
        tl.store(base + HALF, x2 * c2 + x1 * s2, mask=hmask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, inter, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(x_ptr + t * 2 * inter + cols, mask=mask, other=0.0)
        u = tl.load(x_ptr + t * 2 * inter + inter + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(out_ptr + t * inter + cols, act * u, mask=mask)


_NO_FMA = {"enable_fp_fusion": False}


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight * norm(x)``; with ``residual``: ``residual += x`` first (in place) and the
    sum is normalised. ``x`` is [..., n], contiguous."""
    n = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // n
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        n,
        eps,
        HAS_RES=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
        **_NO_FMA,
    )
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``x`` [T, heads, head_dim] in place (rows may be strided, heads contiguous);
    ``cos``/``sin``: [T, head_dim] contiguous in x's dtype."""
    t, heads, dim = x.shape
    assert x.stride(2) == 1 and x.stride(1) == dim
    _rope_kernel[(t,)](
        x,
        cos,
        sin,
        x.stride(0),
        HEADS=heads,
        BLOCK_H=triton.next_power_of_2(heads),
        D=dim,
        HALF=dim // 2,
        **_NO_FMA,
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of [T, 2 * inter] -> [T, inter]."""
    t, width = gate_up.shape
    inter = width // 2
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(t, -(-inter // block))](
        gate_up.contiguous(), out, inter, BLOCK=block, **_NO_FMA
    )
    return out
