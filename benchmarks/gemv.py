"""``python -m benchmarks.gemv``: the batch-1 GEMV kernels (``pdmesh/layers/gemv.py``)
against cuBLAS on one model's weight shapes.

Each product is timed the way a decode step runs it: one CUDA graph replays it over
``--layers`` different weight copies (cold in L2, as each layer's weights are in a step), and
the time per product is a median over ``--repeats``. The gate/up product is compared with what
it replaces: cuBLAS' GEMM followed by the SiLU-and-multiply kernel. ``--sweep`` also times a
grid of kernel configurations per shape and prints the fastest, which is how ``gemv.config``
was chosen.

Examples:
    python -m benchmarks.gemv                       # Llama-3.1-8B shapes, bf16
    python -m benchmarks.gemv --sweep
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pdmesh.config import add_dataclass_args, flag, from_args
from pdmesh.layers import cuda_ops, gemv
from pdmesh.models.source import resolve

Config = tuple[int, int, int, int]
_PAIRS = [(1, 1024), (1, 2048), (2, 512), (2, 1024), (2, 2048), (4, 512), (4, 1024), (8, 512)]
SWEEP: list[Config] = [(bn, bk, w, s) for bn, bk in _PAIRS for w in (4, 8) for s in (2, 4)]


@dataclass(frozen=True)
class GemvBenchConfig:
    model: str = flag(
        "random:llama-3.1-8b", "model whose weight shapes are timed ('random:<preset>' or a dir)"
    )
    device: str = flag("cuda", "CUDA device")
    dtype: str = flag("bfloat16", "bfloat16 or float16")
    layers: int = flag(16, "weight copies per graph (cold in L2 like a step's layers)")
    repeats: int = flag(5, "timed replays; medians")
    sweep: bool = flag(False, "also time every configuration of the sweep grid per shape")

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"--dtype={self.dtype!r}: bfloat16 or float16")
        if self.layers < 1 or self.repeats < 1:
            raise ValueError("--layers and --repeats must be >= 1")


@dataclass(frozen=True)
class Shape:
    name: str
    n: int  # output rows of the weight (gate/up: both halves)
    k: int
    silu_mul: bool = False


def shapes(model: str) -> list[Shape]:
    cfg = resolve(model).config
    h, d = cfg.hidden_size, cfg.head_dim
    return [
        Shape("q/k/v", (cfg.num_heads + 2 * cfg.num_kv_heads) * d, h),
        Shape("o", h, cfg.num_heads * d),
        Shape("gate/up + SiLU", 2 * cfg.intermediate_size, h, silu_mul=True),
        Shape("down", h, cfg.intermediate_size),
        Shape("lm_head", cfg.vocab_size, h),
    ]


def time_us(
    fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor], repeats: int
) -> float:
    """Median microseconds of one ``fn(w)``, replayed in a CUDA graph over ``weights``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles, picks cuBLAS algorithms: before the capture
        for w in weights:
            fn(w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weights))
    return statistics.median(times)


def bench_shape(s: Shape, cfg: GemvBenchConfig) -> dict[str, object]:
    dtype = getattr(torch, cfg.dtype)
    # the vocabulary projection is larger than L2 by itself: two copies are enough
    copies = 2 if s.n * s.k * 2 > (512 << 20) else cfg.layers
    weights = [torch.randn(s.n, s.k, device=cfg.device, dtype=dtype) * 0.02 for _ in range(copies)]
    x = torch.randn(1, s.k, device=cfg.device, dtype=dtype)
    n_out = s.n // 2 if s.silu_mul else s.n
    out = torch.empty(1, n_out, device=cfg.device, dtype=dtype)

    def cublas(w: torch.Tensor) -> object:
        y = F.linear(x, w)
        return cuda_ops.silu_mul(y) if s.silu_mul else y

    def kernel(config: Config | None) -> Callable[[torch.Tensor], object]:
        return lambda w: gemv._launch(x, w, None, out, n_out, s.k, s.silu_mul, config)

    row: dict[str, object] = {"shape": s, "cublas_us": time_us(cublas, weights, cfg.repeats)}
    row["gemv_us"] = time_us(kernel(None), weights, cfg.repeats)
    if cfg.sweep:
        timed = [(time_us(kernel(c), weights, cfg.repeats), c) for c in SWEEP]
        row["best_us"], row["best_config"] = min(timed)
    del weights
    torch.cuda.empty_cache()
    return row


def report(rows: list[dict[str, object]], cfg: GemvBenchConfig) -> str:
    head = (
        f"{'product':<16} {'N x K':>14} {'cuBLAS us':>10} {'GEMV us':>8} {'speedup':>8} {'TB/s':>6}"
    )
    if cfg.sweep:
        head += f" {'sweep best us':>14}  config (BLOCK_N, BLOCK_K, warps, stages)"
    lines = [head]
    for r in rows:
        s = r["shape"]
        assert isinstance(s, Shape)
        cub, mine = float(r["cublas_us"]), float(r["gemv_us"])  # type: ignore[arg-type]
        line = (
            f"{s.name:<16} {f'{s.n} x {s.k}':>14} {cub:>10.1f} {mine:>8.1f} {cub / mine:>8.2f} "
            f"{s.n * s.k * 2 / mine / 1e6:>6.2f}"
        )
        if cfg.sweep:
            line += f" {float(r['best_us']):>14.1f}  {r['best_config']}"  # type: ignore[arg-type]
        lines.append(line)
    lines.append("speedup = cuBLAS time / GEMV time (gate/up: cuBLAS GEMM + SiLU kernel)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gemv",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_dataclass_args(parser, GemvBenchConfig)
    try:
        cfg = from_args(GemvBenchConfig, parser.parse_args(argv))
        todo = shapes(cfg.model)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: python -m benchmarks.gemv needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(cfg.device)}, {cfg.model} shapes, {cfg.dtype}")
    rows = [bench_shape(s, cfg) for s in tqdm(todo, desc="shapes", unit="shape")]
    print(report(rows, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
