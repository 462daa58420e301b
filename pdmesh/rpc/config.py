"""``ServerConfig``: the flags every pdmesh service process has — where it listens, how much it
logs, how long it drains — and their checks, in one place. Each service's config dataclass
subclasses it and adds its own flags; a subclass re-declares a field only to give it its own
default or help text (the flag keeps its name, so command lines do not change)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdmesh.config import flag
from pdmesh.rpc.server import LOG_LEVELS

HOST_HELP = "address to listen on; 0.0.0.0 or :: to accept other hosts (no auth!)"
PORT_HELP = "gRPC port; 0 picks a free one (the log line says which)"
WILDCARDS = ("0.0.0.0", "::", "[::]")


def grace_flag(default: float, what: str = "in-flight calls", then: str = "") -> Any:
    """The ``--grace-period`` flag of a service whose drain waits for ``what``; ``then``: what
    else happens meanwhile, in parentheses after the help text."""
    help_text = f"seconds {what} get to finish after SIGTERM/SIGINT before they are cancelled"
    return flag(default, f"{help_text} ({then})" if then else help_text)


def check_port(name: str, value: int) -> None:
    """``name``: the field's name (``bootstrap_port``), for the ``--flag`` in the message."""
    if not 0 <= value <= 65535:
        raise ValueError(f"--{name.replace('_', '-')}={value} must be in [0, 65535]")


@dataclass(frozen=True)
class ServerConfig:
    host: str = flag("127.0.0.1", HOST_HELP)
    port: int = flag(0, PORT_HELP)
    log_level: str = flag("info", f"log verbosity: {', '.join(LOG_LEVELS)}")
    grace_period: float = grace_flag(30.0)

    def __post_init__(self) -> None:
        check_port("port", self.port)
        if not self.host:
            raise ValueError("--host must not be empty")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level={self.log_level!r}; choose {', '.join(LOG_LEVELS)}")
        if self.grace_period < 0:
            raise ValueError(f"--grace-period={self.grace_period} must be >= 0")
