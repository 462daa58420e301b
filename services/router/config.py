"""``RouterServiceConfig``: the router's flags, one dataclass field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag
from pdmesh.routing import POLICIES
from pdmesh.rpc.server import LOG_LEVELS

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class RouterServiceConfig:
    host: str = flag(
        "127.0.0.1", "address to listen on; 0.0.0.0 or :: to accept other hosts (no auth!)"
    )
    port: int = flag(DEFAULT_PORT, "gRPC port; 0 picks a free one (the log line says which)")
    workers: str = flag(
        "",
        "comma-separated host:port list of aggregated workers (python -m services.decode) to "
        "route to; more can be added at run time with the AddWorker RPC, and with --discovery "
        "consul every worker in the catalog is added and removed as it comes and goes",
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
    policy: str = flag("round_robin", f"routing policy: {', '.join(POLICIES)}")
    request_timeout: float = flag(
        600.0,
        "deadline in seconds of a whole generation on its worker (a client's own, shorter "
        "deadline wins)",
    )
    rpc_timeout: float = flag(
        10.0, "deadline in seconds of short calls: tokenize, chat template, health, model info"
    )
    health_check_interval: float = flag(
        5.0,
        "seconds between health checks of each worker; unhealthy workers get no new requests "
        "while a healthy one exists",
    )
    log_level: str = flag("info", f"log verbosity: {', '.join(LOG_LEVELS)}")
    grace_period: float = flag(
        30.0,
        "seconds in-flight generations get to finish after SIGTERM/SIGINT before they are "
        "cancelled (and with them their worker requests)",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port={self.port} must be in [0, 65535]")
        if not self.host:
            raise ValueError("--host must not be empty")
        if not self.tokenizer:
            raise ValueError("--tokenizer must name the tokenizer service's host:port")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy={self.policy!r}; choose {', '.join(POLICIES)}")
        for name in ("request_timeout", "rpc_timeout", "health_check_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level={self.log_level!r}; choose {', '.join(LOG_LEVELS)}")
        if self.grace_period < 0:
            raise ValueError(f"--grace-period={self.grace_period} must be >= 0")
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
