"""``MeshBenchConfig``: the flags of ``python -m benchmarks mesh``, one field per ``--flag``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchmarks.config_base import (
    MeshRunConfig,
    dash,
    int_list,
    name_list,
    require_choice,
    require_positive,
)
from pdmesh.config import flag
from pdmesh.models.source import DEFAULT_MODEL

WORKERS = ("stepping", "real")
# the arms, in the order they run at each concurrency
DIRECT, ROUTER_IDS, ROUTER_TEXT, GATEWAY, SMG = (
    "direct",
    "router-ids",
    "router-text",
    "gateway",
    "smg",
)
ARMS = (DIRECT, ROUTER_IDS, ROUTER_TEXT, GATEWAY, SMG)


@dataclass(frozen=True)
class MeshBenchConfig(MeshRunConfig):
    # --- the worker at the end of every arm
    worker: str = flag(
        "stepping",
        "'stepping': the model-free stepping worker (python -m benchmarks.mesh."
        "stepping_worker: the real worker servicer, one word token per active request every "
        "--step-ms, no model); 'real': services.decode with the real engine (--model, --device)",
    )
    step_ms: float = flag(
        10.0,
        "stepping worker: ms per engine step; the ideal output rate is concurrency / step_ms",
    )
    model: str = flag(
        DEFAULT_MODEL,
        "model: its tokenizer serves the text arms and prompts; the stepping worker takes its "
        "vocabulary, the real worker its weights. 'random:<preset>' has no tokenizer: only the "
        "token-id arms (direct, router-ids) run",
    )
    device: str = flag("auto", "real worker: --device of services.decode")
    worker_args: str = flag(
        "",
        "real worker: extra flags for services.decode (split on spaces), e.g. '--dtype "
        "bfloat16'; it already gets --max-running-requests (the largest concurrency), enough "
        "--num-pages, and --no-enable-prefix-cache (the arms reuse a pool of prompts)",
    )
    offline_reference: bool = flag(
        False,
        "real worker: after the arms, time the engine offline in this process (benchmarks.offline's "
        "PdmeshRunner: the same prompt and output lengths, batch = each concurrency, greedy) "
        "and print its decode tok/s as each level's ideal; without it, the real worker's arms "
        "have no ideal. Loads the model a second time, after the mesh has stopped",
    )
    # --- the load
    arms: str = flag(
        ",".join(ARMS),
        "comma-separated arms to run, in this order at each concurrency: 'direct' "
        "(WorkerService.Generate per request, token ids), 'router-ids' (RouterService.Generate, "
        "token ids, detokenize false), 'router-text' (RouterService.Generate, text prompt, "
        "text back), 'gateway' (OpenAI chat completions, SSE, through gateway + router), 'smg' "
        "(the same chat completions through SGLang's gateway smg in gRPC mode, skipped with "
        "a message when smg is missing or cannot start)",
    )
    concurrency: str = flag("1,64,256", "comma-separated concurrency levels (closed loop)")
    prompt_len: int = flag(128, "tokens of every prompt (random ordinary tokens)")
    output_len: int = flag(128, "output tokens of every request (EOS ignored)")
    num_requests: int = flag(
        0,
        "requests per arm and concurrency; 0: as many as the clients send in --arm-seconds "
        "(each client sends its next request as soon as one ends, until the time is up; the "
        "requests in flight then finish)",
    )
    arm_seconds: float = flag(
        10.0, "with --num-requests 0: seconds each arm keeps sending new requests"
    )
    client_processes: int = flag(
        1,
        "load generator processes per arm, the concurrency split between them and their "
        "results merged: one Python process may itself be the bottleneck at high concurrency "
        "(its CPU is printed beside every figure: near 1 core it limits the arm)",
    )
    warmup: bool = flag(
        True,
        "before each timed arm, send one short request (16 tokens) per concurrent client, "
        "which also opens the clients' connections; not timed, not counted",
    )
    # --- the run (the rest: MeshRunConfig)
    startup_timeout: float = flag(
        300.0, "seconds the processes get to become healthy (a first start converts the model)"
    )
    smg_args: str = flag("", "extra flags for smg (split on spaces); empty: smg's defaults")
    output: str = flag("", "also write the config, the environment and every figure to this JSON")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("worker", self.worker, WORKERS)
        require_positive(self, "prompt_len", "output_len", "client_processes")
        if self.num_requests < 0:
            raise ValueError(f"--num-requests={self.num_requests} must be >= 0")
        # finite too: inf seconds would never end an arm, never time a request out
        for name in ("step_ms", "arm_seconds", "request_timeout", "startup_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"--{dash(name)}={value} must be > 0")
        levels = self.levels()
        if not levels or min(levels) <= 0:
            raise ValueError(f"--concurrency={self.concurrency!r}: positive integers, e.g. 1,64")
        arms = self.arm_list()
        unknown = [a for a in arms if a not in ARMS]
        if not arms or unknown:
            raise ValueError(f"--arms={self.arms!r}: choose among {', '.join(ARMS)}")
        if self.offline_reference and self.worker != "real":
            raise ValueError("--offline-reference needs --worker real")

    def levels(self) -> list[int]:
        return int_list(self.concurrency)

    def arm_list(self) -> list[str]:
        return name_list(self.arms)

    def ideal_tok_s(self, concurrency: int) -> float | None:
        """What a stepping worker can deliver at ``concurrency``; None for a real worker."""
        return concurrency * 1000.0 / self.step_ms if self.worker == "stepping" else None

    def requests_for(self, concurrency: int) -> int:
        """Requests to draw prompts for: --num-requests, or a pool the clients cycle through."""
        return self.num_requests or max(2 * concurrency, 16)
