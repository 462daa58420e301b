"""``SmgBenchConfig``: the flags of ``python -m pdmesh.bench vs-smg``, one field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag

DEFAULT_MODEL = "smollm2-135m-instruct"
POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")  # both routers have these


@dataclass(frozen=True)
class SmgBenchConfig:
    # --- the workers both gateways drive
    workers: int = flag(2, "aggregated pdmesh workers (python -m services.decode)")
    model: str = flag(DEFAULT_MODEL, "model the workers serve (as services.decode --model)")
    device: str = flag("cpu", "device of the workers")
    num_pages: int = flag(512, "KV pages per worker")
    max_model_len: int = flag(2048, "context length of the workers")
    # --- the random workload: TTFT, ITL and throughput at each concurrency
    concurrency: str = flag("1,8,32", "comma-separated concurrency levels (closed loop)")
    requests_per_client: int = flag(
        3, "requests sent per concurrent client at each level (at least 8 in all)"
    )
    input_len: int = flag(128, "random workload: prompt tokens of every request")
    output_len: int = flag(32, "random workload: output tokens of every request (EOS ignored)")
    policy: str = flag(
        "round_robin", f"routing policy of both gateways on the random workload: {POLICIES}"
    )
    # --- the shared-prefix workload: prefix hit rate with cache_aware on both
    shared_prefix: bool = flag(True, "also run the shared-prefix workload (cache_aware)")
    num_groups: int = flag(8, "shared-prefix: distinct system prompts (tenants)")
    prompts_per_group: int = flag(6, "shared-prefix: requests per system prompt")
    system_prompt_len: int = flag(256, "shared-prefix: tokens of each system prompt")
    question_len: int = flag(32, "shared-prefix: tokens of each question")
    shared_output_len: int = flag(8, "shared-prefix: output tokens of every request")
    shared_concurrency: int = flag(8, "shared-prefix: requests in flight at once")
    # --- the run
    repeats: int = flag(
        1, "runs of every (workload, level); the arms alternate which goes first; medians"
    )
    seed: int = flag(1, "seed of the prompts; every run and arm draws its own")
    startup_timeout: float = flag(
        600.0, "seconds the processes get to become healthy (the first start converts the model)"
    )
    request_timeout: float = flag(600.0, "seconds one request may take before it counts as failed")
    log_dir: str = flag("", "where the processes' logs go; empty: a new temporary directory")
    json_out: str = flag("", "also write the config and every figure to this JSON file")
    progress: bool = flag(True, "show progress bars on stderr")

    def __post_init__(self) -> None:
        for name in (
            "workers", "num_pages", "max_model_len", "requests_per_client", "input_len",
            "output_len", "num_groups", "prompts_per_group", "system_prompt_len",
            "question_len", "shared_output_len", "shared_concurrency", "repeats",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"--{_dash(name)}={getattr(self, name)} must be > 0")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy={self.policy!r}; choose {', '.join(POLICIES)}")
        levels = self.levels()
        if not levels or min(levels) <= 0:
            raise ValueError(f"--concurrency={self.concurrency!r}: positive integers, e.g. 1,8,32")
        for name in ("startup_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{_dash(name)}={getattr(self, name)} must be > 0")

    def levels(self) -> list[int]:
        try:
            return [int(x) for x in self.concurrency.split(",") if x.strip()]
        except ValueError:
            return []


def _dash(name: str) -> str:
    return name.replace("_", "-")
