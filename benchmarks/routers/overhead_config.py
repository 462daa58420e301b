"""``OverheadConfig``: the router-overhead benchmark's flags, one dataclass field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.config_base import ReportedRunConfig, name_list, require_at_least, require_choice
from pdmesh.config import flag

# the arms, in the order they are reported; the direct ones are the baselines
DIRECT_HTTP = "direct-http"
DIRECT_GRPC = "direct-grpc"
SGLANG = "sglang-router"
PDMESH_HTTP = "pdmesh-http"
PDMESH_GRPC = "pdmesh-grpc"
GRPC_FLOOR = "grpc-floor"
ARMS = (DIRECT_HTTP, DIRECT_GRPC, SGLANG, PDMESH_HTTP, PDMESH_GRPC, GRPC_FLOOR)
# the policies both routers have
POLICIES = ("round_robin", "random", "power_of_two", "cache_aware")


@dataclass(frozen=True)
class OverheadConfig(ReportedRunConfig):
    workers: int = flag(
        2, "echo workers behind the routers (python -m benchmarks.routers.echo_worker)"
    )
    num_tokens: int = flag(8, "tokens every request gets back from the echo workers")
    prompt_len: int = flag(16, "token ids in each prompt (random ids, a new prompt per request)")
    latency_requests: int = flag(
        300, "requests per arm and repeat sent one at a time (concurrency 1), for p50/p99"
    )
    throughput_requests: int = flag(
        2000, "requests per arm and repeat sent at --concurrency, for req/s"
    )
    concurrency: int = flag(32, "requests in flight in the throughput phase")
    repeats: int = flag(
        3,
        "rounds over every arm (the arms' order alternates per round, so drift hits each "
        "alike); the report gives medians over the rounds",
    )
    warmup_requests: int = flag(
        50, "requests per arm before the timed rounds (connections, caches; not timed)"
    )
    policy: str = flag("round_robin", f"routing policy of both routers: {', '.join(POLICIES)}")
    arms: str = flag(
        ",".join(ARMS),
        "comma-separated arms to run: direct-http and direct-grpc (the workers called "
        "directly: the baselines), sglang-router (HTTP /generate through sglang-router), "
        "pdmesh-http (HTTP /generate through the pdmesh gateway and router), pdmesh-grpc "
        "(RouterService.Generate through the pdmesh router), grpc-floor (the same call through "
        "a bare grpc.aio pass-through proxy: what any Python gRPC hop costs). A routed arm "
        "runs its baseline too",
    )
    # --- the run (the rest: ReportedRunConfig); echo workers start in seconds
    startup_timeout: float = flag(60.0, "seconds every process gets to become healthy")
    request_timeout: float = flag(30.0, "seconds one request may take before it counts as failed")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(
            self, 1, "workers", "num_tokens", "prompt_len", "latency_requests",
            "throughput_requests", "concurrency", "repeats",
        )  # fmt: skip
        require_at_least(self, 0, "warmup_requests")
        require_choice("policy", self.policy, POLICIES)
        unknown = [a for a in self.arm_list() if a not in ARMS]
        if unknown or not self.arm_list():
            raise ValueError(f"--arms={self.arms!r}; choose from {', '.join(ARMS)}")

    def arm_list(self) -> list[str]:
        """The arms to run, baselines included, in report order."""
        named = set(name_list(self.arms))
        if named & {SGLANG, PDMESH_HTTP}:
            named.add(DIRECT_HTTP)
        if named & {PDMESH_GRPC, GRPC_FLOOR}:
            named.add(DIRECT_GRPC)
        return [a for a in ARMS if a in named] + sorted(named - set(ARMS))
