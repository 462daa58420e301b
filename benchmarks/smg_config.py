"""``SmgBenchConfig``: the flags of ``python -m benchmarks vs-smg``, one field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.config_base import (
    ReportedRunConfig,
    int_list,
    require_choice,
    require_positive,
)
from pdmesh.config import flag

DEFAULT_MODEL = "smollm2-135m-instruct"
POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")  # both routers have these


@dataclass(frozen=True)
class SmgBenchConfig(ReportedRunConfig):
    # --- the workers both gateways drive
    workers: int = flag(2, "aggregated pdmesh workers (python -m services.decode)")
    model: str = flag(DEFAULT_MODEL, "model the workers serve (as services.decode --model)")
    device: str = flag("cpu", "device of the workers")
    num_pages: int = flag(512, "KV pages per worker")
    max_model_len: int = flag(2048, "context length of the workers")
    # --- the random workload: TTFT, ITL and throughput at each concurrency
    random_workload: bool = flag(
        True, "run the random workload (TTFT, ITL and throughput at each --concurrency)"
    )
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
    shared_prefix: bool = flag(
        True,
        "also run the shared-prefix workload (cache_aware) on the --workers workers, whose "
        "--num-pages hold every system prompt: both routers reach its ceiling",
    )
    num_groups: int = flag(8, "shared-prefix: distinct system prompts (tenants)")
    prompts_per_group: int = flag(6, "shared-prefix: requests per system prompt")
    system_prompt_len: int = flag(256, "shared-prefix: tokens of each system prompt")
    question_len: int = flag(32, "shared-prefix: tokens of each question")
    shared_output_len: int = flag(8, "shared-prefix: output tokens of every request")
    shared_concurrency: int = flag(8, "shared-prefix: requests in flight at once")
    # --- the capacity workload: prefix hit rate with cache_aware where KV pages are scarce
    capacity: bool = flag(
        True,
        "also run the capacity workload: cache_aware on both in front of fresh workers whose "
        "KV pools cannot keep every tenant's system prompt, so where each tenant lands (and "
        "whether it stays there) decides the hit rate; the same requests through each arm",
    )
    capacity_workers: int = flag(3, "capacity: workers (fresh ones for every arm and repeat)")
    capacity_num_pages: int = flag(
        48,
        "capacity: KV pages per worker; with the defaults a worker keeps about 4 tenants' "
        "system prompts next to its running requests, so a 4/4/4 placement fits and a "
        "lopsided one evicts",
    )
    capacity_page_size: int = flag(
        16, "capacity: tokens per KV page (the prefix cache matches whole pages)"
    )
    capacity_tenants: int = flag(12, "capacity: distinct system prompts (tenants)")
    capacity_prompts_per_tenant: int = flag(
        8, "capacity: requests per tenant, shuffled so that tenants interleave"
    )
    capacity_system_prompt_len: int = flag(128, "capacity: tokens of each system prompt")
    capacity_question_len: int = flag(16, "capacity: tokens of each question")
    capacity_output_len: int = flag(4, "capacity: output tokens of every request (EOS ignored)")
    capacity_concurrency: int = flag(6, "capacity: requests in flight at once (closed loop)")
    capacity_reference: bool = flag(
        True,
        "capacity: also run pdmesh's router with round_robin (fresh workers too): the hit "
        "rate of a router that ignores prefixes, for reference",
    )
    smg_args: str = flag(
        "",
        "extra flags for every smg launched (split on spaces), e.g. '--worker-warmup-secs 0' "
        "to see a setting's effect; empty: smg's defaults but for --policy",
    )
    # --- the run (the rest: ReportedRunConfig)
    repeats: int = flag(
        1, "runs of every (workload, level); the arms alternate which goes first; medians"
    )
    seed: int = flag(1, "seed of the prompts; every run and arm draws its own")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(
            self,
            "workers", "num_pages", "max_model_len", "requests_per_client", "input_len",
            "output_len", "num_groups", "prompts_per_group", "system_prompt_len",
            "question_len", "shared_output_len", "shared_concurrency", "repeats",
            "capacity_workers", "capacity_num_pages", "capacity_page_size", "capacity_tenants",
            "capacity_prompts_per_tenant", "capacity_system_prompt_len",
            "capacity_question_len", "capacity_output_len", "capacity_concurrency",
        )  # fmt: skip
        require_choice("policy", self.policy, POLICIES)
        concurrency = self.levels()
        if not concurrency or min(concurrency) <= 0:
            raise ValueError(f"--concurrency={self.concurrency!r}: positive integers, e.g. 1,8,32")
        if not (self.random_workload or self.shared_prefix or self.capacity):
            raise ValueError(
                "nothing to run: --no-random-workload, --no-shared-prefix and --no-capacity"
            )
        # a request (its chat template's few tokens aside) must fit a worker's pool, or every
        # request of the capacity workload fails
        request = self.capacity_system_prompt_len + self.capacity_question_len
        request += self.capacity_output_len
        if self.capacity and self.capacity_pool_tokens() <= request:
            raise ValueError(
                f"--capacity-num-pages={self.capacity_num_pages} x --capacity-page-size="
                f"{self.capacity_page_size} = {self.capacity_pool_tokens()} tokens cannot hold "
                f"one request of {request} tokens"
            )

    def smg_arg_list(self) -> list[str]:
        return self.smg_args.split()

    def capacity_pool_tokens(self) -> int:
        return self.capacity_num_pages * self.capacity_page_size

    def capacity_max_model_len(self) -> int:
        """Context of the capacity workers: what their pool holds, at most --max-model-len."""
        return min(self.max_model_len, self.capacity_pool_tokens())

    def levels(self) -> list[int]:
        return int_list(self.concurrency)
