"""``TokenizerServiceConfig``: the tokenizer service's flags, one dataclass field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag
from pdmesh.rpc.config import PORT_HELP, ServerConfig, grace_flag

DEFAULT_PORT = 50052


@dataclass(frozen=True)
class TokenizerServiceConfig(ServerConfig):
    port: int = flag(DEFAULT_PORT, PORT_HELP)
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
    grace_period: float = grace_flag(5.0)

    # host, log level and grace period, and their checks: ServerConfig's
