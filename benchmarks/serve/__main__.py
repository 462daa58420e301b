"""``python -m benchmarks.serve``: load-test a running mesh, like SGLang's bench_serving.

Examples:
    python -m benchmarks.serve --num-prompts 50 --random-input-len 128 --random-output-len 64
    python -m benchmarks.serve --backend openai-chat --dataset shared-prefix --request-rate 4
    python -m benchmarks.serve --backend grpc --input-format token-ids --max-concurrency 8 \\
        --ignore-eos --slo-ttft-ms 500 --slo-tpot-ms 100 --output-json results.json
    python -m benchmarks.serve --dataset sharegpt --dataset-path ShareGPT_V3.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
import textwrap

from benchmarks.cli import BAD_FLAGS, parse_config, run_or_fail
from benchmarks.logs import setup_logging
from benchmarks.serve.backends import Backend, BackendError, make_backend
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.constrained import split_report
from benchmarks.serve.datasets import BenchRequest, build_dataset
from benchmarks.serve.metrics import SLO, summarize
from benchmarks.serve.report import DEFINITIONS, RunInfo, render_table, to_json, write_json
from benchmarks.serve.runner import poisson_arrivals, raise_fd_limit, run_requests, warmup
from benchmarks.serve.tokenizer import load_tokenizer
from pdmesh.config import add_dataclass_args

log = logging.getLogger("benchmarks.serve")

PROG = "python -m benchmarks serve"
WRAP = 88  # the description is pre-wrapped: RawDescriptionHelpFormatter keeps the epilog's lines


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=textwrap.fill(
            "Load generator for a running pdmesh mesh: streams a dataset of prompts to the "
            "OpenAI-compatible gateway (HTTP/SSE) or the router (gRPC) at a Poisson request "
            "rate or a fixed concurrency, then prints TTFT, ITL, TPOT and end-to-end latency "
            "(mean/p50/p90/p99), request and token throughput, and goodput under the given "
            "SLOs. Token counts come from the server's usage when it reports one, else from "
            "the streamed chunks. Exits 1 when no request succeeded.",
            width=WRAP,
        ),
        epilog="definitions:\n" + "\n".join("  " + d for d in DEFINITIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(parser, ServeBenchConfig)
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    cfg = parse_config(build_parser(prog), ServeBenchConfig, argv)
    if cfg is None:
        return BAD_FLAGS
    # pdmesh's own progress lines (dataset, warmup, model fetch) at INFO; libraries' at WARNING
    setup_logging()
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
        requests = build_dataset(cfg, tokenizer)
        backend = make_backend(cfg)
    except (OSError, ValueError, RuntimeError) as e:  # bad paths, files, flags; failed fetch
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info(
        "%d requests: %d prompt tokens, %d output tokens asked in all",
        len(requests),
        sum(r.prompt_len for r in requests),
        sum(r.output_len for r in requests),
    )
    fd_limit = raise_fd_limit()
    in_flight = cfg.max_concurrency or len(requests)
    if 0 < fd_limit < in_flight + 64:
        log.warning(
            "up to %d requests may be in flight but only %d files may be open; "
            "expect 'Too many open files' failures, or pass --max-concurrency",
            in_flight,
            fd_limit,
        )
    return run_or_fail(lambda: asyncio.run(bench(cfg, backend, requests)), (BackendError,))


async def bench(cfg: ServeBenchConfig, backend: Backend, requests: list[BenchRequest]) -> int:
    run_id = secrets.token_hex(3)  # tells this run's request ids apart in server logs
    async with backend:
        if cfg.warmup_requests:
            warm = await warmup(backend, requests[0], cfg.warmup_requests, run_id)
            if not any(r.success for r in warm):
                print(f"error: every warmup request failed: {warm[0].error}", file=sys.stderr)
                return 1
            log.info("warmup: %d/%d ok", sum(r.success for r in warm), len(warm))
        arrivals = poisson_arrivals(len(requests), cfg.request_rate, cfg.seed)
        run = await run_requests(
            backend, requests, arrivals, cfg.max_concurrency, run_id, cfg.progress
        )
    slo = SLO(cfg.slo_ttft_ms, cfg.slo_tpot_ms, cfg.slo_e2e_ms)
    summary = summarize(run.results, run.duration_s, slo, run.max_in_flight)
    info = RunInfo(run_id, backend.target, backend.model, len(requests))
    print(render_table(cfg, info, summary, slo))
    if cfg.json_schema_fraction:
        print(split_report(run.results, run.duration_s, cfg.json_schema_fraction))
    if cfg.output_json:
        write_json(
            cfg.output_json,
            to_json(cfg, info, summary, run.results if cfg.output_details else None),
        )
        log.info("wrote %s", cfg.output_json)
    return 0 if summary.completed else 1


if __name__ == "__main__":
    sys.exit(main())
