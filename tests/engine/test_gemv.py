"""The batch-1 GEMV kernels (skipped without a GPU) against torch's GEMMs, and the KV cache's
shareable allocation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdmesh.engine.kv_cache import allocate_kv_cache, in_expandable_segment
from pdmesh.layers import gemv

pytestmark = pytest.mark.gpu


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # bf16 outputs of float32 sums taken in another order: within a few bf16 ulps of the scale
    err = (a.float() - b.float()).abs().max() / b.float().abs().max()
    assert err < 1e-2, f"relative error {err:.3g}"


@pytest.mark.parametrize("n,k", [(96, 64), (4096, 1024), (1000, 3000), (5, 2048)])
def test_linear_matches_torch(n: int, k: int) -> None:
    torch.manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    assert gemv.applies(x, w)
    _close(gemv.linear(x, w), F.linear(x, w))
    _close(gemv.linear(x, w, b), F.linear(x, w, b))


def test_silu_mul_linear_matches_the_unfused_ops() -> None:
    torch.manual_seed(1)
    inter, k = 1536, 512
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    gate_up = torch.randn(2 * inter, k, device="cuda", dtype=torch.float16) * 0.05
    h = F.linear(x, gate_up)
    _close(gemv.silu_mul_linear(x, gate_up), F.silu(h[:, :inter]) * h[:, inter:])


def test_applies_only_to_one_half_precision_row() -> None:
    w = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
    assert not gemv.applies(torch.randn(2, 16, device="cuda", dtype=torch.bfloat16), w)
    assert not gemv.applies(torch.randn(1, 16, device="cuda"), w.float())  # float32: exact path
    assert not gemv.applies(torch.randn(1, 16, dtype=torch.bfloat16), w.cpu())
    assert not gemv.applies(torch.randn(16, 2, device="cuda", dtype=torch.bfloat16).t(), w)


def test_kv_cache_is_shareable_and_the_rest_is_not() -> None:
    kv = allocate_kv_cache((256, 2, 2, 16, 2, 64), torch.bfloat16, torch.device("cuda"))
    assert in_expandable_segment(kv) and kv.abs().sum().item() == 0
    # the allocator setting was restored: later allocations are ordinary blocks
    assert not in_expandable_segment(torch.empty(1 << 20, device="cuda"))
    cpu = allocate_kv_cache((2, 2), torch.float32, torch.device("cpu"))
    assert cpu.device.type == "cpu" and not in_expandable_segment(cpu)
