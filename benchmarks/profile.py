"""``--profile-steps``: where the time of one pdmesh decode step goes, phase by phase and op by op.

Each phase of ``LLMEngine.step`` is wrapped in a ``torch.profiler.record_function`` range for
the profiled steps only, then unwrapped: ``schedule``; ``prepare`` (the input tensors);
``forward`` and ``logits`` (eager steps) or ``graph`` (a decode graph's replay); ``sample``;
``wait`` (for the sampled tokens to reach the host); ``update`` (the host state before and
after: placeholders, tokens, finished requests, outputs). On CUDA every phase but ``wait`` is
host time spent queuing work; with the overlap schedule (llm_engine.py) it runs while the GPU
computes, and ``wait`` is what is left of the GPU time after it. The op table sorts by GPU time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.offline import PdmeshRunner
from pdmesh.engine.sampling_params import SamplingParams

PHASES = ("schedule", "prepare", "forward", "graph", "logits", "sample", "wait", "update")


def _labelled(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(f"pdmesh.{name}"):
            return fn(*args, **kwargs)

    return wrapper


@contextmanager
def _phases(runner: PdmeshRunner) -> Iterator[None]:
    """Instance attributes shadow the methods for a while; deleting them restores the class's."""
    eng = runner.engine
    targets: list[tuple[Any, str, str]] = [
        (eng.scheduler, "schedule", "schedule"),
        (eng.runner, "_prepare", "prepare"),
        (eng.runner.model, "forward", "forward"),
        (eng.runner.model, "compute_logits", "logits"),
        (eng.runner, "_sample", "sample"),
        (eng.runner, "fetch", "wait"),
        (eng, "_advance", "update"),
        (eng, "_update", "update"),
    ]
    if eng.runner.graphs is not None:
        targets.append((eng.runner.graphs, "replay", "graph"))
    for obj, attr, name in targets:
        setattr(obj, attr, _labelled(getattr(obj, attr), name))
    try:
        yield
    finally:
        for obj, attr, _ in targets:
            delattr(obj, attr)


def profile_decode(runner: PdmeshRunner, prompts: list[list[int]], steps: int) -> str:
    """Prefill ``prompts``, then profile ``steps`` decode steps; returns the printable report."""
    eng = runner.engine
    params = SamplingParams(temperature=0.0, max_new_tokens=steps + 4, ignore_eos=True)
    ids = [f"profile-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        eng.add_request(rid, prompt, params)
    for _ in range(3):  # the prefill step, then two decode steps untimed
        eng.step()
    on_cuda = eng.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with _phases(runner), profile(activities=activities) as prof:
        t0 = runner.clock.now()
        for _ in range(steps):
            eng.step()
        wall = (runner.clock.now() - t0) / steps
    while eng.has_work:
        eng.step()
    return _render(prof, wall, steps, len(prompts), on_cuda, eng.overlap)


def _render(prof: Any, wall_s: float, steps: int, batch: int, on_cuda: bool, overlap: bool) -> str:
    events = prof.key_averages()
    # with CUDA a range also appears as a GPU annotation under the same name: keep the CPU one
    cpu_ms: dict[str, float] = {}
    for e in events:
        cpu_ms[e.key] = max(cpu_ms.get(e.key, 0.0), e.cpu_time_total / 1e3 / steps)
    lines = [
        f"pdmesh decode step at batch {batch}: {wall_s * 1e3:.2f} ms wall per step "
        f"(profiled, {steps} steps, overlap schedule {'on' if overlap else 'off'}); "
        "CPU ms per step by phase:"
    ]
    for phase in PHASES:
        ms = cpu_ms.get(f"pdmesh.{phase}", float("nan"))
        lines.append(f"  {phase:<9}{ms:8.2f}")
    sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=15)
    lines += [f"top ops by {sort} (totals over {steps} steps):", table]
    return "\n".join(lines)
