"""``python -m benchmarks``: time pdmesh's engine against transformers in one process.

Examples:
    python -m benchmarks                                   # CPU, SmolLM2-135M, float32
    python -m benchmarks --compare-dtypes                  # pdmesh float32 vs bfloat16
    python -m benchmarks --model random:llama-3.1-8b --device cuda --dtype bfloat16

Subcommands (each with its own --help): ``serve`` (load-test a running mesh),
``router-overhead`` and ``routing-quality`` (pdmesh's router beside sglang-router), ``vs-smg``
(SGLang's gateway smg beside pdmesh's, in front of the same workers), ``mesh`` (the token path
from worker to client, arm by arm, with each process's CPU per streamed token).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm import tqdm

from benchmarks.cli import BAD_FLAGS, parse_config
from benchmarks.config import BenchConfig
from benchmarks.host import loadavg
from benchmarks.offline import PdmeshRunner
from benchmarks.report import Comparison, Report, render_table, write_json
from benchmarks.workload import DEFINITIONS, Timing, random_prompts
from pdmesh.config import add_dataclass_args
from pdmesh.models import loader


class Runner(Protocol):
    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing: ...


# `python -m benchmarks <subcommand> ...`: each module's main(argv) takes the rest of the line
SUBCOMMANDS = {
    "serve": "benchmarks.serve.__main__",  # the online load generator
    "router-overhead": "benchmarks.routers.overhead",  # routers side by side
    "routing-quality": "benchmarks.routers.quality",
    "pd-vs-agg": "benchmarks.pd_vs_agg.main",  # 1 prefill + 1 decode vs 2 aggregated
    "mesh": "benchmarks.mesh.main",  # the token path, arm by arm, at a known worker speed
    "vs-smg": "benchmarks.smg",  # SGLang's gateway vs pdmesh's, same workers
    "tp": "benchmarks.tp",  # the engine at several tensor-parallel sizes
}


@dataclass(frozen=True)
class Plan:
    """One measurement: its prompts and how many tokens each row generates."""

    kind: str  # "prefill" | "decode"
    prompts: list[list[int]]
    new_tokens: int

    @property
    def batch(self) -> int:
        return len(self.prompts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Offline benchmark of the pdmesh engine against transformers generate on the same\n"
            "weights, in the same process: prefill tok/s, decode tok/s and ms per decode step,\n"
            "medians over --repeats, printed with ratios (never asserted).\n\n"
            "Subcommands, each with its own --help: 'serve' (load-test a running mesh), "
            "'router-overhead' (what pdmesh's router and sglang-router add to a request), "
            "'routing-quality' (prefix hits, TTFT and balance of every routing policy), 'vs-smg' "
            "(SGLang's gateway beside pdmesh's) and 'mesh' (the token path, arm by arm, with "
            "CPU per streamed token)."
        ),
        epilog="definitions:\n" + "\n".join("  " + d for d in DEFINITIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(parser, BenchConfig)
    return parser


def make_plans(cfg: BenchConfig, vocab_size: int) -> list[Plan]:
    plans = [
        Plan("prefill", random_prompts(cfg.prefill_size(), cfg.prompt_len, vocab_size, cfg.seed), 1)
    ]
    for b in cfg.batches():
        prompts = random_prompts(b, cfg.prompt_len, vocab_size, cfg.seed + b)
        plans.append(Plan("decode", prompts, cfg.decode_tokens))
    return plans


def measure(
    cfg: BenchConfig, plans: list[Plan], sides: dict[str, Runner], dtype: str
) -> list[Comparison]:
    """Warm up, then time every plan on every side, alternating sides so drift hits both."""
    names = list(sides)
    total = len(plans) * len(names) * (cfg.warmup + cfg.repeats)
    comps = []
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr) as bar:
        for plan in plans:
            other = names[1] if len(names) > 1 else None
            comp = Comparison(plan.kind, plan.batch, dtype, names[0], other)
            comp.runs = {n: [] for n in names}
            for _ in range(cfg.warmup):
                for n in names:
                    bar.set_postfix_str(f"{plan.kind} b{plan.batch} {n} warmup")
                    # full length: on CUDA a first 64-token run was 2.5x slower than the next ones
                    # even after a 4-token warmup (both sides alike)
                    sides[n].run(plan.prompts, plan.new_tokens)
                    bar.update()
            for r in range(cfg.repeats):
                for n in names if r % 2 == 0 else reversed(names):
                    bar.set_postfix_str(f"{plan.kind} b{plan.batch} {n} #{r + 1}")
                    comp.runs[n].append(sides[n].run(plan.prompts, plan.new_tokens))
                    bar.update()
            comps.append(comp)
    return comps


def build_sides(cfg: BenchConfig, dtype: str, source: loader.ModelSource) -> dict[str, Runner]:
    pd = PdmeshRunner(cfg, dtype, source)
    sides: dict[str, Runner] = {"pdmesh": pd}
    if not cfg.skip_reference:
        from benchmarks import reference  # transformers is slow to import: only when used

        hf = reference.build_model(source, pd.engine.dtype, pd.engine.device, pd.model)
        sides["transformers"] = reference.HFRunner(
            hf, pd.engine.device, source.config.eos_token_ids
        )
    return sides


def run(cfg: BenchConfig) -> Report:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = loader.resolve(cfg.model)
    plans = make_plans(cfg, source.config.vocab_size)
    comps: list[Comparison] = []
    profiles: dict[str, str] = {}
    if cfg.compare_dtypes:
        # both engines live at once so their runs interleave; ratios are bfloat16 over float32
        sides: dict[str, Runner] = {
            d: PdmeshRunner(cfg, d, source) for d in ("bfloat16", "float32")
        }
        comps += measure(cfg, plans, sides, "-")
        profiles |= profile_sides(cfg, plans, sides, "pdmesh ")
    else:
        for dtype in cfg.dtype_names():
            sides = build_sides(cfg, dtype, source)
            comps += measure(cfg, plans, sides, dtype)
            profiles |= profile_sides(cfg, plans, sides, f"{dtype} ")
            del sides
            _free_memory(cfg)
    env = environment(cfg, source)
    env["loadavg_1min_at_end"] = loadavg()
    return Report(cfg, env, comps, profiles)


def profile_sides(
    cfg: BenchConfig, plans: list[Plan], sides: dict[str, Runner], prefix: str
) -> dict[str, str]:
    """--profile-steps: the pdmesh sides' decode step at the largest decode batch, op by op."""
    if not cfg.profile_steps:
        return {}
    from benchmarks.profile import profile_decode

    plan = max((p for p in plans if p.kind == "decode"), key=lambda p: p.batch)
    return {
        prefix + name: profile_decode(side, plan.prompts, cfg.profile_steps)
        for name, side in sides.items()
        if isinstance(side, PdmeshRunner)
    }


def _free_memory(cfg: BenchConfig) -> None:
    gc.collect()
    if cfg.on_cuda():
        torch.cuda.empty_cache()


def environment(cfg: BenchConfig, source: loader.ModelSource) -> dict[str, Any]:
    device = cfg.torch_device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"
    return {
        "model": source.name,
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        # imported only when asked for: each pulls in its own stack (grpc, aiohttp, ...)
        command: Callable[[list[str]], int] = importlib.import_module(SUBCOMMANDS[argv[0]]).main
        return command(argv[1:])
    cfg = parse_config(build_parser(), BenchConfig, argv)
    if cfg is None:
        return BAD_FLAGS
    report = run(cfg)
    print(render_table(report))
    if cfg.json_out:
        write_json(report, cfg.json_out)
        print(f"wrote {cfg.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
