"""The capacity workload of ``vs-smg``: ``cache_aware`` in pdmesh's router and in smg where a
worker's KV pool cannot keep every tenant's system prompt, so that where each tenant lands, and
whether it stays there while the load is balanced, decides the prefix hit rate.

Per repeat, one list of requests (``--capacity-tenants`` system prompts x
``--capacity-prompts-per-tenant`` questions, shuffled so tenants interleave) goes through each
arm in turn: pdmesh's router + gateway with ``cache_aware``, smg with ``cache_aware`` (each with
its own defaults: cache threshold 0.3, balance thresholds 64 requests and 1.5x in both), and,
for reference, pdmesh with ``round_robin``. Every arm gets fresh workers (empty prefix caches)
and a fresh router (an empty tree), so the arms see the same requests from the same cold start,
a paired comparison; the arm that goes first rotates from repeat to repeat.

Hit rate: the prompt tokens the workers served from their prefix caches (the deltas of their
``GetLoad.prefix_hit_tokens``, read the same way whichever protocol the front spoke) over the
prompt tokens of the completed requests (their usage). The best possible rate is computed from
the requests' token ids as the tokenizer service renders their chat template: every request
reuses the longest whole-page prefix it shares with any earlier request (a perfect router with
unbounded caches). Requests per worker come from the workers' own /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import statistics
from dataclasses import dataclass, field

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.routers.fleet import Fleet
from benchmarks.serve.backends import make_backend
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest, shared_prefix_requests
from benchmarks.serve.metrics import Summary, summarize
from benchmarks.serve.runner import run_requests, warmup
from benchmarks.serve.tokenizer import TokenizerLike
from benchmarks.smg_config import SmgBenchConfig
from benchmarks.smg_procs import (
    Worker,
    http_get,
    start_pdmesh,
    start_smg,
    start_workers,
    wait_ready,
)
from pdmesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger("benchmarks.smg")

RPC_TIMEOUT_S = 10.0
SEED_SALT = 2_000_003  # keeps these prompts apart from the other workloads' draws
WARM_TOKENS = 8  # prompt of the direct per-worker warm-up request (shares nothing)


@dataclass(frozen=True)
class Arm:
    name: str  # as printed
    front: str  # "pdmesh" (router + gateway) or "smg"
    policy: str


CACHE_AWARE_ARMS = (Arm("pdmesh", "pdmesh", "cache_aware"), Arm("smg", "smg", "cache_aware"))
REFERENCE_ARM = Arm("round_robin", "pdmesh", "round_robin")


@dataclass
class CapacityRun:
    """One arm's pass over one repeat's requests, on its own fresh workers."""

    arm: str
    repeat: int
    summary: Summary
    hit_tokens: list[int]  # per worker
    requests_served: list[int]  # per worker, from its /metrics (-1: unknown)
    best_hit_rate: float  # of this repeat's requests

    @property
    def hit_rate(self) -> float:
        prompt = self.summary.total_input_tokens
        return sum(self.hit_tokens) / prompt if prompt else float("nan")

    def figures(self) -> dict[str, object]:
        s = self.summary
        return {
            "arm": self.arm,
            "repeat": self.repeat,
            "prefix_hit_rate": self.hit_rate,
            "best_hit_rate": self.best_hit_rate,
            "hit_tokens_per_worker": self.hit_tokens,
            "requests_per_worker": self.requests_served,
            "prompt_tokens": s.total_input_tokens,
            "ttft_p50_ms": s.ttft_ms.p50 if s.ttft_ms else float("nan"),
            "failed": s.failed,
        }


@dataclass
class CapacityReport:
    runs: list[CapacityRun] = field(default_factory=list)

    def of(self, arm: str) -> list[CapacityRun]:
        return [r for r in self.runs if r.arm == arm]

    def median_hit_rate(self, arm: str) -> float:
        rates = [r.hit_rate for r in self.of(arm)]
        return statistics.median(rates) if rates else float("nan")

    def median_best(self) -> float:
        best = {r.repeat: r.best_hit_rate for r in self.runs}
        return statistics.median(best.values()) if best else float("nan")


def arms(cfg: SmgBenchConfig) -> list[Arm]:
    return [*CACHE_AWARE_ARMS, *([REFERENCE_ARM] if cfg.capacity_reference else [])]


def rotated(items: list[Arm], repeat: int) -> list[Arm]:
    """``items`` starting at ``repeat`` (mod len): each arm goes first in turn, so none always
    runs first on a machine that warms up or slows down."""
    k = repeat % len(items)
    return items[k:] + items[:k]


# -- running -----------------------------------------------------------------------------------


def run_capacity(
    cfg: SmgBenchConfig,
    fleet: Fleet,
    tokenizer_address: str,
    tokenizer: TokenizerLike,
    report: CapacityReport,
) -> None:
    for repeat in range(cfg.repeats):
        requests = capacity_requests(cfg, tokenizer, repeat)
        ids = chat_token_ids(tokenizer_address, requests)
        best = best_hit_rate(ids, cfg.capacity_page_size)
        for arm in rotated(arms(cfg), repeat):
            log.info("capacity workload, run %d: %s (%d requests)", repeat, arm.name, len(requests))
            run = run_arm(cfg, fleet, tokenizer_address, arm, requests, repeat, best)
            expected = sum(len(x) for x in ids)
            if not run.summary.failed and run.summary.total_input_tokens != expected:
                log.warning(
                    "%s: the workers counted %d prompt tokens, the tokenizer service's chat "
                    "template %d: the best possible hit rate is approximate",
                    arm.name,
                    run.summary.total_input_tokens,
                    expected,
                )
            report.runs.append(run)


def capacity_requests(
    cfg: SmgBenchConfig, tokenizer: TokenizerLike, repeat: int
) -> list[BenchRequest]:
    """This repeat's requests (text, for the chat API); every arm of the repeat sends these."""
    rng = np.random.default_rng([cfg.seed, repeat, SEED_SALT])
    return shared_prefix_requests(
        tokenizer, rng, cfg.capacity_tenants, cfg.capacity_prompts_per_tenant,
        cfg.capacity_system_prompt_len, cfg.capacity_question_len, cfg.capacity_output_len,
        False,
    )  # fmt: skip


def run_arm(
    cfg: SmgBenchConfig,
    fleet: Fleet,
    tokenizer_address: str,
    arm: Arm,
    requests: list[BenchRequest],
    repeat: int,
    best: float,
) -> CapacityRun:
    tag = f"cap{repeat}-{arm.name}"
    workers = start_workers(
        fleet,
        count=cfg.capacity_workers,
        model=cfg.model,
        device=cfg.device,
        num_pages=cfg.capacity_num_pages,
        max_model_len=cfg.capacity_max_model_len(),
        page_size=cfg.capacity_page_size,
        tag=tag,
        metrics=True,
    )
    addresses = [w.address for w in workers]
    try:
        if arm.front == "smg":
            url, front = start_smg(fleet, cfg.model, addresses, arm.policy, tag, cfg.smg_arg_list())
        else:
            url, front = start_pdmesh(fleet, tokenizer_address, addresses, arm.policy, tag)
        try:
            wait_ready(fleet, url, front, len(workers))
            warm_workers(workers, cfg.request_timeout, cfg.seed)
            summary, hits, served = asyncio.run(measure(cfg, url, workers, requests))
        finally:
            fleet.stop_children(front)
    finally:
        fleet.stop_children([w.child for w in workers])
    return CapacityRun(arm.name, repeat, summary, hits, served, best)


def warm_workers(workers: list[Worker], timeout: float, seed: int) -> None:
    """A short request straight to each worker, so no arm pays a cold engine's first step; its
    prompt (token ids without a chat template) shares no page with the workload's."""
    rng = np.random.default_rng([seed, SEED_SALT, 1])
    ids = [int(x) for x in rng.integers(1000, 10_000, size=WARM_TOKENS)]
    for i, worker in enumerate(workers):
        request = worker_pb2.GenerateRequest(
            request_id=f"capacity-warmup-{i}",
            token_ids=ids,
            sampling_params=common_pb2.SamplingParams(
                max_new_tokens=2, temperature=0.0, ignore_eos=True
            ),
        )
        with grpc.insecure_channel(worker.address) as channel:
            for _ in worker_pb2_grpc.WorkerServiceStub(channel).Generate(request, timeout=timeout):
                pass


async def measure(
    cfg: SmgBenchConfig, url: str, workers: list[Worker], requests: list[BenchRequest]
) -> tuple[Summary, list[int], list[int]]:
    """The timed run through ``url``: its summary, and per worker the prefix-cache hit tokens
    and the requests it served during it."""
    serve = ServeBenchConfig(
        backend="openai-chat",
        base_url=url,
        ignore_eos=True,
        temperature=0.0,
        max_concurrency=cfg.capacity_concurrency,
        request_timeout=cfg.request_timeout,
        progress=cfg.progress,
    )
    run_id = secrets.token_hex(3)
    backend = make_backend(serve)
    async with backend:
        # one short request through the front, so the arm is known to serve; it has no system
        # prompt and shares no page with the workload
        probe = BenchRequest(-1, "Hello.", 0, 1)
        warm = await warmup(backend, probe, 1, run_id)
        if not warm[0].success:
            raise RuntimeError(f"the warmup request to {url} failed: {warm[0].error}")
        hits_before, served_before = hit_tokens(workers), requests_served(workers)
        run = await run_requests(
            backend,
            requests,
            [0.0] * len(requests),
            cfg.capacity_concurrency,
            run_id,
            cfg.progress,
        )
        hits = [a - b for a, b in zip(hit_tokens(workers), hits_before, strict=True)]
        served = [
            a - b if a >= 0 and b >= 0 else -1
            for a, b in zip(requests_served(workers), served_before, strict=True)
        ]
    summary = summarize(run.results, run.duration_s, max_in_flight=run.max_in_flight)
    return summary, hits, served


def hit_tokens(workers: list[Worker]) -> list[int]:
    out = []
    for worker in workers:
        with grpc.insecure_channel(worker.address) as channel:
            load = worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(
                worker_pb2.GetLoadRequest(), timeout=RPC_TIMEOUT_S
            )
        out.append(int(load.prefix_hit_tokens))
    return out


def requests_served(workers: list[Worker]) -> list[int]:
    """Generate calls each worker finished (either protocol), from its /metrics; -1 where it
    serves none or cannot be read."""
    out = []
    for worker in workers:
        if not worker.metrics_url:
            out.append(-1)
            continue
        try:
            text = http_get(worker.metrics_url)
        except OSError:
            out.append(-1)
            continue
        out.append(generate_calls(text))
    return out


def generate_calls(metrics_text: str) -> int:
    """Finished ``.../Generate`` calls in a worker's Prometheus exposition."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "pdmesh_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("method", "").endswith(
                "/Generate"
            ):
                total += sample.value
    return int(total)


# -- the best possible hit rate ----------------------------------------------------------------


def chat_token_ids(tokenizer_address: str, requests: list[BenchRequest]) -> list[list[int]]:
    """Each request's prompt ids as the workers get them: its chat messages rendered by the
    tokenizer service (the template pdmesh's gateway uses; smg renders the same one)."""
    out = []
    with grpc.insecure_channel(tokenizer_address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        for request in requests:
            chat = common_pb2.ChatRequest(
                messages=[
                    common_pb2.ChatMessage(role=m["role"], content=m["content"])
                    for m in request.messages()
                ]
            )
            reply = stub.ApplyChatTemplate(
                tokenizer_pb2.ApplyChatTemplateRequest(chat=chat), timeout=RPC_TIMEOUT_S
            )
            out.append(list(reply.token_ids))
    return out


def best_hit_rate(prompts: list[list[int]], page_size: int) -> float:
    """Hit rate of a perfect router with unbounded caches: each prompt, in send order, reuses
    the whole pages of the longest prefix it shares with any earlier prompt (never its last
    token, which a step must compute, as the engine's prefix cache does)."""
    hits = 0
    for i, prompt in enumerate(prompts):
        shared = max((_common_prefix(prompt, earlier) for earlier in prompts[:i]), default=0)
        pages = min(shared, len(prompt) - 1) // page_size
        hits += pages * page_size
    total = sum(len(p) for p in prompts)
    return hits / total if total else float("nan")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# -- report ------------------------------------------------------------------------------------


def render_capacity(cfg: SmgBenchConfig, report: CapacityReport) -> list[str]:
    lines = [
        f"capacity workload: {cfg.capacity_workers} fresh workers x {cfg.capacity_num_pages} "
        f"pages of {cfg.capacity_page_size} tokens per arm; {cfg.capacity_tenants} tenants x "
        f"{cfg.capacity_prompts_per_tenant} requests of {cfg.capacity_system_prompt_len}+"
        f"{cfg.capacity_question_len} tokens (+ chat template), {cfg.capacity_output_len} out, "
        f"concurrency {cfg.capacity_concurrency}; the same requests through every arm of a run",
        f"{'arm':>11} {'hit rate':>9} {'TTFT p50 ms':>12} {'failed':>7}  "
        f"{'hit rate per run':<24} requests per worker, per run",
    ]
    names = [a.name for a in arms(cfg)]
    for name in names:
        runs = sorted(report.of(name), key=lambda r: r.repeat)
        if not runs:
            continue
        ttft = statistics.median(
            r.summary.ttft_ms.p50 if r.summary.ttft_ms else float("nan") for r in runs
        )
        failed = sum(r.summary.failed for r in runs)
        per_run = " ".join(f"{r.hit_rate:.3f}" for r in runs)
        per_worker = "  ".join("/".join(str(n) for n in r.requests_served) for r in runs)
        lines.append(
            f"{name:>11} {report.median_hit_rate(name):>9.3f} {ttft:>12.1f} {failed:>7}  "
            f"{per_run:<24} {per_worker}"
        )
    lines.append(f"{'best':>11} {report.median_best():>9.3f}")
    p, s = report.median_hit_rate("pdmesh"), report.median_hit_rate("smg")
    ratios = [f"hit rate pdmesh / smg {_ratio(p, s)}"]
    if cfg.capacity_reference:
        rr = report.median_hit_rate(REFERENCE_ARM.name)
        ratios += [f"pdmesh / round_robin {_ratio(p, rr)}", f"smg / round_robin {_ratio(s, rr)}"]
    ratios.append(f"pdmesh / best {_ratio(p, report.median_best())}")
    lines.append("ratios (medians): " + ", ".join(ratios))
    paired = [
        _ratio(a.hit_rate, b.hit_rate)
        for a, b in zip(
            sorted(report.of("pdmesh"), key=lambda r: r.repeat),
            sorted(report.of("smg"), key=lambda r: r.repeat),
            strict=False,
        )
    ]
    lines.append("pdmesh / smg per run (same requests): " + " ".join(paired))
    return lines


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b and b == b and a == a else "n/a"
