# mypy: disable-error-code="no-untyped-def"
# (triton kernels: triton types their arguments itself)
"""Matrix-vector products for decode at batch 1 on CUDA (bf16/fp16): ``x @ W.T`` of one row.

Why: a decode step at batch 1 reads every weight once, so its time is the time the GEMMs take to
stream 16 GB of weights (Llama-3.1-8B). cuBLAS runs these [1, K] x [K, N] products as split-K
GEMMs: ~81% of the measured HBM bandwidth on an H200 plus a reduce kernel after most of them,
and the step at batch 1 took 1.43x its memory roofline. Here each program owns ``BLOCK_N``
output columns, streams their weight rows once in ``BLOCK_K`` slices (rows are contiguous in
K: wide coalesced loads), keeps a [BLOCK_N, BLOCK_K] float32 partial sum in registers and
reduces it once at the end: no split-K, no second kernel. The gate/up variant computes a row
of gate and the matching row of up in the same program and writes ``silu(gate) * up``,
removing the SiLU kernel too; it rounds gate and up to the model dtype first, as the unfused
path does.

Float32 models keep torch's GEMMs (the CPU-exact path is float32), and so do batches of more
than one row, whose GEMMs reuse each weight across rows.
"""

from __future__ import annotations

import torch

try:  # only CUDA hosts have (and need) triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU hosts
    triton = None

_DTYPES = (torch.bfloat16, torch.float16)

if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        N,
        K,
        HAS_BIAS: tl.constexpr,
        SILU_MUL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # SILU_MUL: W is [2N, K] (gate rows then up rows), out[n] = silu(x.g[n]) * (x.u[n])
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rk = tl.arange(0, BLOCK_K)
        rows = w_ptr + rn.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + rk
            kmask = cols < K
            x = tl.load(x_ptr + cols, mask=kmask, other=0.0).to(tl.float32)[None, :]
            m = nmask[:, None] & kmask[None, :]
            w = tl.load(rows + cols[None, :], mask=m, other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x
            if SILU_MUL:
                u = tl.load(
                    rows + N * K + cols[None, :], mask=m, other=0.0, eviction_policy="evict_first"
                )
                acc_up += u.to(tl.float32) * x
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        y = y.to(out_ptr.dtype.element_ty)
        if SILU_MUL:
            up = tl.sum(acc_up, 1).to(out_ptr.dtype.element_ty)
            g = y.to(tl.float32)
            y = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty) * up
        tl.store(out_ptr + rn, y, mask=nmask)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes ``x`` (one contiguous half-precision row on CUDA)."""
    return (
        triton is not None
        and x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and x.is_contiguous()
        and weight.is_contiguous()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of one row ``x`` [1, K] with ``weight`` [N, K] -> [1, N]."""
    n, k = weight.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)

    _launch(x, weight, bias, out, n, k, silu_mul=False)
    return out


def silu_mul_linear(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` of one row; ``gate_up`` is [2 * inter, K]."""
    two_n, k = gate_up.shape
    n = two_n // 2
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)

    _launch(x, gate_up, None, out, n, k, silu_mul=True)
    return out


def config(n: int, k: int, silu_mul: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight.

    Few rows per program, long K slices: measured on an H200 over the Llama-3.1-8B shapes with
    the weights cold in L2 (a sweep of 64 configurations; triton's autotuner would time them
    with the weight hot in L2 and pick for that), 1.03-1.28x cuBLAS on every shape, at 3.2-4.5
    TB/s. Gate/up reads two rows per output, so one output row per program.
    """
    return (1, 1024, 4, 4) if silu_mul else (2, 1024, 4, 4)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    n: int,
    k: int,
    silu_mul: bool,
    cfg: tuple[int, int, int, int] | None = None,
) -> None:
    block_n, block_k, warps, stages = cfg or config(n, k, silu_mul)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else x,
        out,
        n,
        k,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
