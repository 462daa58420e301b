"""``WorkerServiceConfig``: the worker process's own flags. The engine's flags are
``pdmesh.engine.EngineConfig``'s, parsed beside these (one dataclass field per ``--flag``)."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag
from pdmesh.rpc.server import LOG_LEVELS

DEFAULT_PORT = 50053
MODES = ("aggregated",)
# roles the proto already names but whose machinery (bootstrap server, KV transfer) is not built
FUTURE_MODES = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerServiceConfig:
    host: str = flag(
        "127.0.0.1", "address to listen on; 0.0.0.0 or :: to accept other hosts (no auth!)"
    )
    port: int = flag(DEFAULT_PORT, "gRPC port; 0 picks a free one (the log line says which)")
    mode: str = flag(
        "aggregated",
        "worker role: 'aggregated' (prefill and decode locally); the disaggregated 'prefill' and "
        "'decode' modes come with the PD issue",
    )
    log_level: str = flag("info", f"log verbosity: {', '.join(LOG_LEVELS)}")
    grace_period: float = flag(
        30.0,
        "seconds in-flight generations get to finish after SIGTERM/SIGINT before they are "
        "cancelled (health turns NOT_SERVING at once, so balancers stop sending)",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port={self.port} must be in [0, 65535]")
        if self.mode in FUTURE_MODES:
            raise ValueError(
                f"--mode={self.mode} is not available yet: prefill/decode disaggregation comes "
                "with the PD issue; use --mode aggregated"
            )
        if self.mode not in MODES:
            raise ValueError(f"--mode={self.mode!r}; choose {', '.join(MODES)}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level={self.log_level!r}; choose {', '.join(LOG_LEVELS)}")
        if self.grace_period < 0:
            raise ValueError(f"--grace-period={self.grace_period} must be >= 0")
        if not self.host:
            raise ValueError("--host must not be empty")
