"""``python -m benchmarks.tp``: the engine at several tensor-parallel sizes in one run.

For each TP size N: N rank processes (NCCL over cuda:0..N-1 on a GPU host, gloo on CPU) build the
same engine on their shards and time, all on the same calls in the same order (the way a worker's
ranks follow rank 0):

    decode    ms per step at each batch (contexts of --context tokens), and its ratio to TP 1
    prefill   tokens/s and TFLOP/s of one --prefill-tokens prompt, and its ratio to TP 1
    allreduce the time of one all-reduce of a decode step's hidden states ([batch, hidden] in
              the model's dtype) and the bus bandwidth it reaches (2 (N-1) / N x bytes / time,
              NCCL's definition)

On CPU the figures show that the path works and what gloo costs, not what GPUs gain.

Examples:
    python -m benchmarks.tp --device cpu --model random:tiny --tp-size 1,2
    python -m benchmarks.tp --tp-size 1,2,4 --model random:llama-3.1-8b     # 4 GPUs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.cli import BAD_FLAGS, parse_config, write_json
from benchmarks.config_base import positive_ints
from benchmarks.gpu import pool_pages, sync, time_decode, time_prefill
from pdmesh.config import add_dataclass_args, flag
from pdmesh.distributed import TPGroup
from pdmesh.distributed.spawn import run_ranks
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine

PAGE = 16


@dataclass(frozen=True)
class TPBenchConfig:
    model: str = flag("random:llama-3.1-8b", "model ('random:<preset>' needs no download)")
    device: str = flag("cuda", "'cuda' (rank r on cuda:r) or 'cpu' (gloo)")
    dtype: str = flag("auto", "bfloat16 on CUDA, float32 on CPU when 'auto'")
    tp_size: str = flag("1,2", "TP sizes, comma-separated; 1 is the reference of the ratios")
    decode_batches: str = flag("1,8,64", "decode batch sizes, comma-separated")
    context: int = flag(512, "tokens of context of every decode row")
    prefill_tokens: int = flag(2048, "prompt length of the prefill measurement")
    steps: int = flag(16, "timed decode steps per batch")
    repeats: int = flag(3, "timed runs of each measurement; medians are shown")
    json_out: str = flag("", "also write every figure to this JSON file")

    def ints(self, name: str) -> list[int]:
        return positive_ints(self, name)

    def __post_init__(self) -> None:
        self.ints("tp_size")
        self.ints("decode_batches")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device={self.device!r}; choose cuda or cpu")
        if self.context < 1 or self.prefill_tokens < 1:
            raise ValueError("--context and --prefill-tokens must be >= 1")
        if self.steps < 2 or self.repeats < 1:
            raise ValueError("--steps must be >= 2, --repeats >= 1")


@dataclass
class SizeResult:
    tp: int
    decode_ms: dict[int, float] = field(default_factory=dict)  # batch -> ms per step
    prefill_tok_s: float = 0.0
    prefill_tflops: float = 0.0
    allreduce_us: dict[int, float] = field(default_factory=dict)  # batch -> µs
    bus_gb_s: dict[int, float] = field(default_factory=dict)


def _engine(cfg: TPBenchConfig, tp: TPGroup) -> LLMEngine:
    batches = cfg.ints("decode_batches")
    longest = max(cfg.context + cfg.steps + 16, cfg.prefill_tokens + 16)
    pages = pool_pages(max(batches), cfg.context, cfg.steps, longest, PAGE)
    config = EngineConfig(
        model=cfg.model,
        device=cfg.device,
        dtype=cfg.dtype,
        page_size=PAGE,
        num_pages=pages,
        max_running_requests=max(batches),
        max_num_batched_tokens=cfg.prefill_tokens,
        max_model_len=longest,
        enable_prefix_cache=False,
        tp_size=tp.size,
    )
    return LLMEngine(config.for_rank(tp.rank), None, tp)


def _allreduce_s(engine: LLMEngine, tp: TPGroup, batch: int, iters: int = 20) -> float:
    hidden = engine.source.config.hidden_size
    x = torch.ones(batch, hidden, dtype=engine.dtype, device=engine.device)
    for _ in range(3):
        tp.all_reduce(x)
    sync(engine.device)
    dist.barrier(group=tp.control)
    t0 = time.perf_counter()
    for _ in range(iters):
        tp.all_reduce(x)
    sync(engine.device)
    return (time.perf_counter() - t0) / iters


def _measure(tp: TPGroup, cfg: TPBenchConfig) -> dict[str, Any]:
    """One rank's figures (each rank runs the same calls; rank 0's are reported)."""
    engine = _engine(cfg, tp)
    med = statistics.median
    out: dict[str, Any] = {"decode": {}, "allreduce": {}}
    for batch in cfg.ints("decode_batches"):
        out["decode"][batch] = med(
            time_decode(engine, batch, cfg.context, cfg.steps, f"d{batch}-{r}")
            for r in range(cfg.repeats)
        )
        if tp.size > 1:
            out["allreduce"][batch] = med(
                _allreduce_s(engine, tp, batch) for _ in range(cfg.repeats)
            )
    time_prefill(engine, min(cfg.prefill_tokens, 64), "warm")
    out["prefill"] = med(
        time_prefill(engine, cfg.prefill_tokens, f"p{r}") for r in range(cfg.repeats)
    )
    out["params"] = engine.source.config.num_params
    out["element_size"] = torch.tensor([], dtype=engine.dtype).element_size()
    out["hidden"] = engine.source.config.hidden_size
    return out


def run(cfg: TPBenchConfig) -> list[SizeResult]:
    results = []
    for size in cfg.ints("tp_size"):
        device = (
            (lambda rank: torch.device(f"cuda:{rank}"))
            if cfg.device == "cuda"
            else (lambda rank: torch.device("cpu"))
        )
        rank0 = run_ranks(size, _measure, cfg, device=device, timeout_s=1800)[0]
        res = SizeResult(size)
        res.decode_ms = {b: s * 1e3 for b, s in rank0["decode"].items()}
        res.prefill_tok_s = cfg.prefill_tokens / rank0["prefill"]
        res.prefill_tflops = 2 * rank0["params"] * cfg.prefill_tokens / rank0["prefill"] / 1e12
        for batch, seconds in rank0["allreduce"].items():
            nbytes = batch * rank0["hidden"] * rank0["element_size"]
            res.allreduce_us[batch] = seconds * 1e6
            res.bus_gb_s[batch] = 2 * (size - 1) / size * nbytes / seconds / 1e9
        results.append(res)
        print(f"tp {size}: done", file=sys.stderr)
    return results


def report(cfg: TPBenchConfig, results: list[SizeResult]) -> str:
    base = results[0]
    lines = [
        f"model {cfg.model}, device {cfg.device}"
        + (f" ({torch.cuda.get_device_name(0)})" if cfg.device == "cuda" else " (gloo)")
        + f", context {cfg.context}, medians of {cfg.repeats}; ratios to TP {base.tp}",
        "",
        f"{'tp':>3} {'batch':>6} {'decode ms/step':>15} {'ratio':>6} "
        f"{'allreduce µs':>13} {'bus GB/s':>9}",
    ]
    for res in results:
        for batch, ms in res.decode_ms.items():
            ar = res.allreduce_us.get(batch)
            lines.append(
                f"{res.tp:>3} {batch:>6} {ms:>15.3f} {ms / base.decode_ms[batch]:>6.2f} "
                + (
                    f"{ar:>13.1f} {res.bus_gb_s[batch]:>9.3f}"
                    if ar is not None
                    else f"{'-':>13} {'-':>9}"
                )
            )
    lines += ["", f"{'tp':>3} {'prefill tok/s':>14} {'ratio':>6} {'TFLOP/s':>8}"]
    for res in results:
        lines.append(
            f"{res.tp:>3} {res.prefill_tok_s:>14.0f} "
            f"{res.prefill_tok_s / base.prefill_tok_s:>6.2f} {res.prefill_tflops:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tp",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    add_dataclass_args(parser, TPBenchConfig)
    cfg = parse_config(parser, TPBenchConfig, argv)
    if cfg is None:
        return BAD_FLAGS
    if cfg.device == "cuda":
        have = torch.cuda.device_count()
        if have < max(cfg.ints("tp_size")):
            print(
                f"error: --tp-size up to {max(cfg.ints('tp_size'))} needs as many GPUs "
                f"(this host has {have})",
                file=sys.stderr,
            )
            return BAD_FLAGS
    results = run(cfg)
    print(report(cfg, results))
    if cfg.json_out:
        write_json(cfg.json_out, [asdict(r) for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
