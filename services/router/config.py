"""``RouterServiceConfig``: the router's flags, one dataclass field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag
from pdmesh.parsers.reasoning import REASONING_PARSERS
from pdmesh.parsers.tool_calls import TOOL_CALL_PARSERS
from pdmesh.routing import (
    POLICIES,
    CacheAwareConfig,
    CircuitBreakerConfig,
    KvCostConfig,
    PolicySettings,
    RetryConfig,
)
from pdmesh.routing import admission as ad
from pdmesh.routing import cache_aware as ca
from pdmesh.routing import circuit_breaker as cb
from pdmesh.routing import kv_cost as kv
from pdmesh.routing import retry as rt
from pdmesh.routing.admission import AdmissionConfig
from pdmesh.rpc.config import PORT_HELP, ServerConfig, grace_flag

DEFAULT_PORT = 50051
# SGLang router's --max-payload-size as its docs give it; a request message larger than this is
# refused by grpc itself with RESOURCE_EXHAUSTED
DEFAULT_MAX_PAYLOAD_SIZE = 256 * 1024 * 1024


@dataclass(frozen=True)
class RouterServiceConfig(ServerConfig):
    port: int = flag(DEFAULT_PORT, PORT_HELP)
    workers: str = flag(
        "",
        "comma-separated host:port list of aggregated workers (python -m services.decode) to "
        "route to; more can be added at run time with the AddWorker RPC, and with --discovery "
        "consul every worker in the catalog is added and removed as it comes and goes. In this "
        "and the other worker lists, sglang-grpc://host:port names a worker that speaks SGLang's "
        "scheduler gRPC protocol (an SGLang engine started with --grpc-mode)",
    )
    prefill_workers: str = flag(
        "",
        "PD disaggregation: comma-separated host:port list of prefill workers (python -m "
        "services.prefill); each request's prompt is prefilled on one of them and its KV sent "
        "to a --decode-workers worker",
    )
    decode_workers: str = flag(
        "",
        "PD disaggregation: comma-separated host:port list of decode workers (python -m "
        "services.decode --mode decode); they stream the tokens, and prefill locally when no "
        "prefill worker is healthy or the prompt is short (--disagg-min-prompt-tokens)",
    )
    disagg_min_prompt_tokens: int = flag(
        0,
        "conditional disaggregation: prompts shorter than this many tokens are prefilled on the "
        "decode worker itself (a remote prefill's round trips and KV transfer cost more than "
        "they save on short prompts); 0 disaggregates every prompt",
    )
    tokenizer: str = flag(
        "127.0.0.1:50052",
        "host:port of the tokenizer service (python -m services.tokenizer); ignored with "
        "--discovery consul, which uses every tokenizer in the catalog",
    )
    tool_call_parser: str = flag(
        "",
        "how the served model writes tool calls, SGLang's names: "
        f"{', '.join(sorted(TOOL_CALL_PARSERS))} (qwen25/hermes: <tool_call> JSON; llama3: JSON "
        "objects; mistral: [TOOL_CALLS]); chat requests with tools and tool_choice auto (the "
        "default) need one and get their calls parsed out of the text here. Empty: such "
        "requests are refused (tool_choice required or a named function works without it: "
        "constrained decoding writes the calls)",
    )
    reasoning_parser: str = flag(
        "",
        "split a reasoning model's <think> block into reasoning_content: "
        f"{', '.join(sorted(REASONING_PARSERS))} (SGLang's names); empty: the text as written",
    )
    policy: str = flag("round_robin", f"routing policy: {', '.join(POLICIES)}")
    prefill_policy: str = flag(
        "", "PD: routing policy of prefill workers; empty inherits --policy (SGLang's rule)"
    )
    decode_policy: str = flag(
        "", "PD: routing policy of decode workers; empty inherits --policy (SGLang's rule)"
    )
    cache_threshold: float = flag(
        ca.DEFAULT_CACHE_THRESHOLD,
        "cache_aware: minimum fraction of the prompt a worker's tree must match for the "
        "request to follow its cache (else the least-loaded worker)",
    )
    balance_abs_threshold: int = flag(
        ca.DEFAULT_BALANCE_ABS_THRESHOLD,
        "cache_aware: the fleet is imbalanced (least-loaded wins) when max - min in-flight "
        "requests exceeds this and --balance-rel-threshold also holds",
    )
    balance_rel_threshold: float = flag(
        ca.DEFAULT_BALANCE_REL_THRESHOLD,
        "cache_aware: ... and max in-flight exceeds min times this",
    )
    eviction_interval_secs: float = flag(
        ca.DEFAULT_EVICTION_INTERVAL_SECS,
        "cache_aware/kv_cost: seconds between evictions of the routing trees",
    )
    max_tree_size: int = flag(
        ca.DEFAULT_MAX_TREE_SIZE,
        "cache_aware/kv_cost: tokens each worker's routing tree keeps after an eviction",
    )
    kv_overlap_score_weight: float = flag(
        kv.DEFAULT_OVERLAP_SCORE_WEIGHT,
        "kv_cost: weight of prefill blocks (prompt blocks not cached on the worker) against "
        "its active decode blocks; 0 ignores the cache",
    )
    router_temperature: float = flag(
        kv.DEFAULT_TEMPERATURE, "kv_cost: softmax temperature over costs; 0 takes the cheapest"
    )
    kv_block_size: int = flag(kv.DEFAULT_BLOCK_SIZE, "kv_cost: tokens per KV block (page)")
    retry_max_retries: int = flag(
        rt.DEFAULT_MAX_RETRIES,
        "retries of a request that failed before anything was streamed (each on a newly "
        "chosen worker or pair)",
    )
    retry_initial_backoff_ms: float = flag(
        rt.DEFAULT_INITIAL_BACKOFF_MS, "milliseconds before the first retry"
    )
    retry_max_backoff_ms: float = flag(rt.DEFAULT_MAX_BACKOFF_MS, "cap of the retry backoff")
    retry_backoff_multiplier: float = flag(
        rt.DEFAULT_BACKOFF_MULTIPLIER, "backoff growth per retry"
    )
    retry_jitter_factor: float = flag(
        rt.DEFAULT_JITTER_FACTOR, "each backoff is scaled by a random factor in [1-j, 1+j]"
    )
    disable_retries: bool = flag(False, "never retry a failed request")
    cb_failure_threshold: int = flag(
        cb.DEFAULT_FAILURE_THRESHOLD,
        "consecutive failures (within --cb-window-duration-secs) that open a worker's circuit",
    )
    cb_success_threshold: int = flag(
        cb.DEFAULT_SUCCESS_THRESHOLD, "successes in half-open state that close the circuit"
    )
    cb_timeout_duration_secs: float = flag(
        cb.DEFAULT_TIMEOUT_DURATION_SECS,
        "seconds an open circuit keeps its worker out before letting traffic probe it",
    )
    cb_window_duration_secs: float = flag(
        cb.DEFAULT_WINDOW_DURATION_SECS, "window the consecutive failures must fall within"
    )
    disable_circuit_breaker: bool = flag(False, "never take a worker out for its failures")
    request_timeout_secs: float = flag(
        600.0,
        "deadline in seconds of a whole generation on its workers, counted from admission (a "
        "client's own, shorter deadline wins); also how long a removed worker's in-flight "
        "requests may run before its channel is closed",
    )
    max_concurrent_requests: int = flag(
        ad.DEFAULT_MAX_CONCURRENT_REQUESTS,
        "requests the router runs at once; more wait in a queue (--queue-size); <= 0: no limit",
    )
    queue_size: int = flag(
        ad.DEFAULT_QUEUE_SIZE,
        "requests that may wait for a slot when --max-concurrent-requests are running; one "
        "more is refused at once with RESOURCE_EXHAUSTED (HTTP 429 at the gateway); 0: no queue",
    )
    queue_timeout_secs: float = flag(
        ad.DEFAULT_QUEUE_TIMEOUT_SECS,
        "seconds a request may wait in the queue; then DEADLINE_EXCEEDED with error code "
        "queue_timeout (HTTP 408 at the gateway)",
    )
    max_payload_size: int = flag(
        DEFAULT_MAX_PAYLOAD_SIZE,
        "largest request message in bytes the router accepts; a larger one is refused with "
        "RESOURCE_EXHAUSTED",
    )
    prometheus_host: str = flag(
        "", "address of the Prometheus /metrics server; empty: --host (SGLang router's name)"
    )
    prometheus_port: int = flag(
        -1,
        "port of the Prometheus /metrics server (SGLang router's name for --metrics-port: both "
        "reach the same one server; give either, or both with the same value); -1: "
        "--metrics-port's value, 0: a free port",
    )
    rpc_timeout: float = flag(
        10.0, "deadline in seconds of short calls: tokenize, chat template, health, model info"
    )
    health_check_interval: float = flag(
        5.0,
        "seconds between health checks of each worker; unhealthy workers get no new requests "
        "while a healthy one exists",
    )
    grace_period: float = grace_flag(
        30.0, "in-flight generations", "and with them their worker requests"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tokenizer:
            raise ValueError("--tokenizer must name the tokenizer service's host:port")
        if self.tool_call_parser and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"--tool-call-parser {self.tool_call_parser!r} is not one of "
                f"{', '.join(sorted(TOOL_CALL_PARSERS))}"
            )
        if self.reasoning_parser and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"--reasoning-parser {self.reasoning_parser!r} is not one of "
                f"{', '.join(sorted(REASONING_PARSERS))}"
            )
        for name in ("prefill_policy", "decode_policy"):
            value = getattr(self, name)
            if value and value not in POLICIES:
                raise ValueError(
                    f"--{name.replace('_', '-')}={value!r}; choose {', '.join(POLICIES)}"
                )
        if self.policy not in POLICIES:
            raise ValueError(f"--policy={self.policy!r}; choose {', '.join(POLICIES)}")
        # the routing dataclasses check their own ranges; build them once to fail at startup
        self.policy_settings()
        self.retry_config()
        self.breaker_config()
        self.admission_config()
        if self.max_payload_size <= 0:
            raise ValueError(f"--max-payload-size={self.max_payload_size} must be > 0")
        if not -1 <= self.prometheus_port <= 65535:
            raise ValueError(f"--prometheus-port={self.prometheus_port} must be -1 or a port")
        for name in ("request_timeout_secs", "rpc_timeout", "health_check_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        if self.disagg_min_prompt_tokens < 0:
            raise ValueError(
                f"--disagg-min-prompt-tokens={self.disagg_min_prompt_tokens} must be >= 0"
            )
        seen: set[str] = set()
        for role, addresses in self.workers_by_role.items():
            name = "--workers" if role == "aggregated" else f"--{role}-workers"
            for address in addresses:
                if ":" not in address:
                    raise ValueError(f"{name}: {address!r} is not host:port")
                if address in seen:
                    raise ValueError(f"{name}: {address} is listed twice")
                seen.add(address)

    def policy_for(self, role: str) -> str:
        """The policy name of ``role``'s workers: SGLang's inheritance rules."""
        if role == "prefill":
            return self.prefill_policy or self.policy
        if role == "decode":
            return self.decode_policy or self.policy
        return self.policy

    def policy_settings(self) -> PolicySettings:
        return PolicySettings(
            cache_aware=CacheAwareConfig(
                cache_threshold=self.cache_threshold,
                balance_abs_threshold=self.balance_abs_threshold,
                balance_rel_threshold=self.balance_rel_threshold,
                eviction_interval_secs=self.eviction_interval_secs,
                max_tree_size=self.max_tree_size,
            ),
            kv_cost=KvCostConfig(
                block_size=self.kv_block_size,
                overlap_score_weight=self.kv_overlap_score_weight,
                temperature=self.router_temperature,
                eviction_interval_secs=self.eviction_interval_secs,
                max_tree_size=self.max_tree_size,
            ),
        )

    def retry_config(self) -> RetryConfig:
        return RetryConfig(
            max_retries=self.retry_max_retries,
            initial_backoff_ms=self.retry_initial_backoff_ms,
            max_backoff_ms=self.retry_max_backoff_ms,
            backoff_multiplier=self.retry_backoff_multiplier,
            jitter_factor=self.retry_jitter_factor,
            enabled=not self.disable_retries,
        )

    def admission_config(self) -> AdmissionConfig:
        return AdmissionConfig(
            max_concurrent_requests=self.max_concurrent_requests,
            queue_size=self.queue_size,
            queue_timeout_secs=self.queue_timeout_secs,
        )

    def metrics_address(self, metrics_port: int) -> tuple[str, int]:
        """(host, port) of the one /metrics server, from --prometheus-host/--prometheus-port
        and the mesh's ``--metrics-port`` (port -1: none). Raises ValueError when the two
        ports disagree."""
        port = metrics_port
        if self.prometheus_port != -1:
            if metrics_port not in (-1, self.prometheus_port):
                raise ValueError(
                    f"--prometheus-port={self.prometheus_port} and --metrics-port={metrics_port} "
                    "name two ports for the router's one /metrics server; give one of them"
                )
            port = self.prometheus_port
        return self.prometheus_host or self.host, port

    def breaker_config(self) -> CircuitBreakerConfig:
        return CircuitBreakerConfig(
            failure_threshold=self.cb_failure_threshold,
            success_threshold=self.cb_success_threshold,
            timeout_duration_secs=self.cb_timeout_duration_secs,
            window_duration_secs=self.cb_window_duration_secs,
            enabled=not self.disable_circuit_breaker,
        )

    @property
    def worker_addresses(self) -> tuple[str, ...]:
        return _split(self.workers)

    @property
    def workers_by_role(self) -> dict[str, tuple[str, ...]]:
        """Every worker of the command line by role: aggregated, prefill, decode."""
        return {
            "aggregated": _split(self.workers),
            "prefill": _split(self.prefill_workers),
            "decode": _split(self.decode_workers),
        }


def _split(addresses: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in addresses.split(",") if a.strip())
