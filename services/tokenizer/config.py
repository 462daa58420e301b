"""``TokenizerServiceConfig``: the tokenizer service's flags, one dataclass field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag
from pdmesh.rpc.server import LOG_LEVELS

DEFAULT_PORT = 50052


@dataclass(frozen=True)
class TokenizerServiceConfig:
    host: str = flag(
        "127.0.0.1", "address to listen on; 0.0.0.0 or :: to accept other hosts (no auth!)"
    )
    port: int = flag(DEFAULT_PORT, "gRPC port; 0 picks a free one (the log line says which)")
    model: str = flag(
        "smollm2-135m-instruct",
        "whose tokenizer to serve: 'smollm2-135m-instruct' (fetched and converted on first use) "
        "or a local Hugging Face directory with tokenizer.json (same spec as the workers')",
    )
    chat_template: str = flag(
        "",
        "chat template instead of the model's own: a Jinja file, or a built-in name "
        "(smollm2-tools: SmolLM2-Instruct's template plus tools in the Hermes <tool_call> form "
        "that the router's --tool-call-parser qwen25 reads); empty: the model's",
    )
    log_level: str = flag("info", f"log verbosity: {', '.join(LOG_LEVELS)}")
    grace_period: float = flag(
        5.0, "seconds in-flight calls get to finish after SIGTERM/SIGINT before they are cancelled"
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port={self.port} must be in [0, 65535]")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level={self.log_level!r}; choose {', '.join(LOG_LEVELS)}")
        if self.grace_period < 0:
            raise ValueError(f"--grace-period={self.grace_period} must be >= 0")
        if not self.host:
            raise ValueError("--host must not be empty")
