"""``python -m benchmarks.gpu``: the engine on a GPU against the physical limits measured in the
same run, and against transformers ``generate``.

In one process: the HBM read bandwidth (a reduction over a 4 GiB tensor) and the bf16 matmul
rate (8192^3) of this GPU, then pdmesh's decode step time per (batch, context) and prefill
throughput per prompt length, then transformers on the same weights. Printed as ratios:

    decode   ms/step against the memory roofline: (weights read + KV read) / HBM bandwidth
    prefill  TFLOP/s against the measured matmul rate
    speedup  transformers' ms/step over pdmesh's, same batch and context

Decode contexts are set up the way a PD decode worker receives them (pages allocated, the KV
"arrived"): the KV values do not change the work, so no prefill of 64 x 4k tokens is needed.

Examples:
    python -m benchmarks.gpu                                   # Llama-3.1-8B shape, bf16
    python -m benchmarks.gpu --decode-batches 1 --contexts 1024 --prefill-tokens 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from benchmarks.cli import BAD_FLAGS, parse_config
from benchmarks.config_base import positive_ints
from pdmesh.config import add_dataclass_args, flag
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.sampling_params import SamplingParams

TARGETS = {
    "decode_b1_vs_roofline": "<= 1.4",
    "decode_b1_speedup_vs_transformers": ">= 8",
    "decode_b64_tok_s_vs_roofline": ">= 0.60",
    "prefill_vs_matmul": ">= 0.60",
}


@dataclass(frozen=True)
class GpuBenchConfig:
    model: str = flag("random:llama-3.1-8b", "model (a preset's random weights need no download)")
    device: str = flag("cuda", "CUDA device")
    decode_batches: str = flag("1,8,32,64", "decode batch sizes, comma-separated")
    contexts: str = flag("1024,4096", "decode context lengths in tokens, comma-separated")
    prefill_tokens: str = flag("2048,8192", "prompt lengths of the prefill measurement")
    steps: int = flag(32, "timed decode steps per (batch, context)")
    repeats: int = flag(3, "timed runs of each measurement; the table shows medians")
    reference_batches: str = flag(
        "1,8", "batch sizes transformers generate is timed at (first context); empty: none"
    )
    reference_tokens: int = flag(16, "tokens transformers generates per timed run")
    disable_cuda_graph: bool = flag(False, "time pdmesh without CUDA graphs")
    json_out: str = flag("", "also write every figure to this JSON file")

    def ints(self, name: str) -> list[int]:
        return positive_ints(self, name)

    def __post_init__(self) -> None:
        for name in ("decode_batches", "contexts", "prefill_tokens", "reference_batches"):
            self.ints(name)
        if self.steps < 2 or self.repeats < 1 or self.reference_tokens < 2:
            raise ValueError("--steps and --reference-tokens must be >= 2, --repeats >= 1")


@dataclass
class Results:
    gpu: str = ""
    hbm_read_gbs: float = 0.0
    matmul_tflops: float = 0.0
    weight_bytes_read: int = 0
    decode: list[dict[str, float]] = field(default_factory=list)
    prefill: list[dict[str, float]] = field(default_factory=list)
    reference: list[dict[str, float]] = field(default_factory=list)


def _time_cuda(fn: object, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, with CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()  # type: ignore[operator]
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_hbm(device: torch.device) -> float:
    x = torch.ones(1 << 30, dtype=torch.float32, device=device)  # 4 GiB
    x.sum()  # warm-up
    seconds = _time_cuda(x.sum, 10)
    return 4 * (1 << 30) / seconds / 1e9


def measure_matmul(device: torch.device) -> float:
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    seconds = _time_cuda(lambda: a @ b, 10)
    return 2 * n**3 / seconds / 1e12


def weight_bytes_read(engine: LLMEngine) -> tuple[int, int]:
    """(bytes a decode step reads from the weights, non-embedding parameter count). The
    embedding table is read a row per token, so it counts only when it is also the LM head."""
    model = engine.runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == embed.data_ptr()
    embed_bytes = embed.numel() * embed.element_size()
    params = sum(p.numel() for p in model.parameters()) - embed.numel()
    return (total if tied else total - embed_bytes), params + (embed.numel() if tied else 0)


def kv_bytes_per_token(engine: LLMEngine) -> int:
    cfg = engine.source.config
    return (
        cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * engine.runner.kv_cache.element_size()
    )


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(engine: LLMEngine, batch: int, context: int, steps: int, tag: str) -> float:
    """Seconds per decode step of ``batch`` requests at ``context`` tokens."""
    params = SamplingParams(max_new_tokens=steps + 4, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for rid in ids:
        prompt = torch.randint(0, engine.vocab_size, (context,), generator=gen).tolist()
        engine.allocate_incoming(rid, prompt, params)
        engine.start_decode(rid, prompt[-1])
    try:
        for _ in range(2):  # warm-up steps
            engine.step()
        sync(engine.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()  # ends in the sampler's .tolist(): the step's work is done
        return (time.perf_counter() - t0) / steps
    finally:
        for rid in ids:
            engine.abort(rid)
        while engine.has_work:
            engine.step()


def time_prefill(engine: LLMEngine, tokens: int, tag: str) -> float:
    prompt = torch.randint(0, engine.vocab_size, (tokens,)).tolist()
    sync(engine.device)
    t0 = time.perf_counter()
    engine.add_request(tag, prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
    while engine.has_work:
        engine.step()
    sync(engine.device)
    return time.perf_counter() - t0


def prefill_flops(engine: LLMEngine, params: int, tokens: int) -> float:
    cfg = engine.source.config
    attn = cfg.num_layers * 2 * 2 * cfg.num_heads * cfg.head_dim * tokens * (tokens + 1) / 2
    return 2 * params * tokens + attn


def pool_pages(batch: int, context: int, steps: int, longest: int, page: int) -> int:
    """KV pages for ``batch`` decode rows of ``context`` tokens growing by ``steps`` (and a
    margin), plus two prompts of ``longest`` tokens."""
    return batch * -(-(context + steps + 16) // page) + 2 * -(-longest // page)


def build_engine(cfg: GpuBenchConfig) -> LLMEngine:
    batches, contexts = cfg.ints("decode_batches"), cfg.ints("contexts")
    longest = max(max(contexts) + cfg.steps + 16, max(cfg.ints("prefill_tokens")) + 16)
    page = 16
    pages = pool_pages(max(batches), max(contexts), cfg.steps, longest, page)
    return LLMEngine(
        EngineConfig(
            model=cfg.model,
            device=cfg.device,
            dtype="bfloat16",
            page_size=page,
            num_pages=pages,
            max_running_requests=max(batches),
            max_num_batched_tokens=max(cfg.ints("prefill_tokens")),
            max_model_len=longest,
            enable_prefix_cache=False,
            disable_cuda_graph=cfg.disable_cuda_graph,
        )
    )


def run(cfg: GpuBenchConfig) -> Results:
    device = torch.device(cfg.device)
    res = Results(gpu=torch.cuda.get_device_name(device))
    res.hbm_read_gbs = measure_hbm(device)
    res.matmul_tflops = measure_matmul(device)
    print(
        f"{res.gpu}: HBM read {res.hbm_read_gbs:.0f} GB/s, bf16 matmul {res.matmul_tflops:.0f} TFLOP/s",
        flush=True,
    )
    engine = build_engine(cfg)
    res.weight_bytes_read, params = weight_bytes_read(engine)
    kv_tok = kv_bytes_per_token(engine)
    combos = [(c, b) for c in cfg.ints("contexts") for b in cfg.ints("decode_batches")]
    with tqdm(
        total=len(combos) + len(cfg.ints("prefill_tokens")), desc="pdmesh", file=sys.stderr
    ) as bar:
        for context, batch in combos:
            s = statistics.median(
                time_decode(engine, batch, context, cfg.steps, f"d{batch}-{context}-{r}")
                for r in range(cfg.repeats)
            )
            roof = (res.weight_bytes_read + batch * context * kv_tok) / (res.hbm_read_gbs * 1e9)
            res.decode.append(
                dict(
                    batch=batch,
                    context=context,
                    ms=s * 1e3,
                    roofline_ms=roof * 1e3,
                    tok_s=batch / s,
                    roofline_tok_s=batch / roof,
                )
            )
            bar.update()
        for tokens in cfg.ints("prefill_tokens"):
            time_prefill(engine, tokens, f"warm-{tokens}")
            s = statistics.median(
                time_prefill(engine, tokens, f"p{tokens}-{r}") for r in range(cfg.repeats)
            )
            tflops = prefill_flops(engine, params, tokens) / s / 1e12
            res.prefill.append(dict(tokens=tokens, ms=s * 1e3, tflops=tflops))
            bar.update()
    ref_batches = cfg.ints("reference_batches")
    if ref_batches:
        run_reference(cfg, engine, ref_batches, res)
    return res


def run_reference(cfg: GpuBenchConfig, engine: LLMEngine, batches: list[int], res: Results) -> None:
    from benchmarks.reference import HFRunner, build_model

    context = cfg.ints("contexts")[0]
    model = engine.runner.model
    # the engine's KV pool and graphs go first: transformers needs room for a second model copy
    engine.runner.graphs = None
    engine.runner.kv_cache = torch.empty(0, device=engine.device)
    torch.cuda.empty_cache()
    hf = build_model(engine.source, engine.dtype, engine.device, model)
    runner = HFRunner(hf, engine.device, ())
    for batch in tqdm(batches, desc="transformers", file=sys.stderr):
        prompts = torch.randint(0, engine.vocab_size, (batch, context)).tolist()
        runner.run(prompts, cfg.reference_tokens)  # warm-up
        ms = statistics.median(
            runner.run(prompts, cfg.reference_tokens).decode_ms_step for _ in range(cfg.repeats)
        )
        res.reference.append(dict(batch=batch, context=context, ms=ms))


def report(res: Results) -> str:
    lines = [
        f"GPU: {res.gpu}; HBM read {res.hbm_read_gbs:.0f} GB/s; bf16 matmul "
        f"{res.matmul_tflops:.0f} TFLOP/s (both measured in this run); decode reads "
        f"{res.weight_bytes_read / 1e9:.2f} GB of weights per step",
        "",
        f"{'batch':>5} {'ctx':>6} {'ms/step':>8} {'roofline':>9} {'x roof':>7} {'tok/s':>8} "
        f"{'of roof':>8} {'HF ms':>8} {'speedup':>8}",
    ]
    ref = {(r["batch"], r["context"]): r["ms"] for r in res.reference}
    for d in res.decode:
        hf = ref.get((d["batch"], d["context"]))
        lines.append(
            f"{d['batch']:>5.0f} {d['context']:>6.0f} {d['ms']:>8.2f} {d['roofline_ms']:>9.2f} "
            f"{d['ms'] / d['roofline_ms']:>7.2f} {d['tok_s']:>8.0f} "
            f"{d['tok_s'] / d['roofline_tok_s']:>8.2f} "
            + (f"{hf:>8.2f} {hf / d['ms']:>8.1f}" if hf else f"{'':>8} {'':>8}")
        )
    lines += ["", f"{'prefill tokens':>14} {'ms':>9} {'TFLOP/s':>8} {'of matmul':>9}"]
    for p in res.prefill:
        lines.append(
            f"{p['tokens']:>14.0f} {p['ms']:>9.1f} {p['tflops']:>8.0f} "
            f"{p['tflops'] / res.matmul_tflops:>9.2f}"
        )
    lines += ["", "targets: " + ", ".join(f"{k} {v}" for k, v in TARGETS.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_dataclass_args(parser, GpuBenchConfig)
    cfg = parse_config(parser, GpuBenchConfig, argv)
    if cfg is None:
        return BAD_FLAGS
    if not torch.cuda.is_available():
        print("error: python -m benchmarks.gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    res = run(cfg)
    print(report(res))
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump(asdict(res), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
