"""``QualityConfig``: the routing-quality benchmark's flags, one dataclass field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.config_base import ReportedRunConfig, name_list, require_at_least, require_choice
from pdmesh.config import flag

PDMESH_POLICIES = ("random", "round_robin", "power_of_two", "cache_aware", "kv_cost")
SGLANG_POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class QualityConfig(ReportedRunConfig):
    # --- the engines
    workers: int = flag(3, "engine workers (python -m services.decode, aggregated, CPU)")
    model: str = flag(DEFAULT_MODEL, "model the workers serve (as services.decode --model)")
    tokenizer: str = flag(
        "",
        "tokenizer.json (or its dir) to draw prompt ids from (no special tokens); empty: the "
        "default model's",
    )
    device: str = flag("cpu", "device of the workers")
    num_pages: int = flag(
        48,
        "KV pages per worker: small, so that a worker cannot keep every tenant's system prompt "
        "cached (here about a third of them, next to the running requests' pages) and where a "
        "request goes decides whether its prefix is still there",
    )
    page_size: int = flag(16, "tokens per KV page (the prefix cache matches whole pages)")
    # --- the workload (benchmarks.serve's shared-prefix dataset, as token ids)
    tenants: int = flag(12, "distinct system prompts (tenants)")
    prompts_per_tenant: int = flag(8, "requests (user questions) per tenant, interleaved")
    system_prompt_len: int = flag(128, "tokens of each tenant's system prompt")
    question_len: int = flag(16, "tokens of each question")
    output_len: int = flag(4, "tokens each request generates (greedy, EOS ignored)")
    concurrency: int = flag(6, "requests in flight at once (closed loop)")
    # --- what to compare
    policies: str = flag(
        ",".join(PDMESH_POLICIES),
        f"comma-separated pdmesh router policies to run, each behind its own router: "
        f"{', '.join(PDMESH_POLICIES)}; empty: none",
    )
    sglang_policy: str = flag(
        "cache_aware",
        "policy of the sglang-router arm (in front of one sglang_shim per worker); empty: no "
        f"sglang-router arm; choose {', '.join(SGLANG_POLICIES)}",
    )
    # --- the run (the rest: ReportedRunConfig)
    seed: int = flag(
        1,
        "seed of the prompts; each arm draws its own tenants from it (same shape, new ids), so "
        "no arm finds another's prefixes in the caches",
    )
    request_timeout: float = flag(300.0, "seconds one request may take before it counts as failed")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(
            self, 1, "workers", "num_pages", "page_size", "tenants", "prompts_per_tenant",
            "system_prompt_len", "question_len", "output_len", "concurrency",
        )  # fmt: skip
        unknown = [p for p in self.policy_list() if p not in PDMESH_POLICIES]
        if unknown:
            raise ValueError(
                f"--policies: {', '.join(unknown)}; choose {', '.join(PDMESH_POLICIES)}"
            )
        if self.sglang_policy:
            require_choice("sglang-policy", self.sglang_policy, SGLANG_POLICIES)
        if not self.policy_list() and not self.sglang_policy:
            raise ValueError("nothing to run: give --policies or --sglang-policy")

    def policy_list(self) -> list[str]:
        return name_list(self.policies)

    @property
    def prompt_len(self) -> int:
        return self.system_prompt_len + self.question_len

    @property
    def max_model_len(self) -> int:
        """Context the workers need: prompt, output and a page of slack."""
        return self.prompt_len + self.output_len + self.page_size
