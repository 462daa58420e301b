"""``python -m services.gateway``: the OpenAI-compatible HTTP gateway in front of the router.

Examples:
    python -m services.gateway --router 127.0.0.1:50051             # http://127.0.0.1:8000
    python -m services.gateway --router r1:50051,r2:50051 --host 0.0.0.0 --api-key "$KEY"
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from types import FrameType

import uvicorn

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.discovery import ConsulError
from pdmesh.rpc.server import configure_logging
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from services.mesh import MeshOptions, add_mesh_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway",
        description=(
            "pdmesh HTTP gateway: OpenAI-compatible /v1/chat/completions, /v1/completions and "
            "/v1/models, SGLang-native /generate, and /health, served from the router's gRPC "
            "Generate stream, plus the SGLang router's worker admin (POST /add_worker?url=, "
            "POST /remove_worker?url=, GET /workers). Streams are server-sent events; a client "
            "that disconnects "
            "cancels its request down to the worker. Errors use OpenAI's error body (a router "
            "at its limit: 429, or 408 after waiting in its queue). "
            "SIGTERM or Ctrl-C stops accepting, lets open requests finish for --grace-period "
            "seconds, then exits. Prometheus metrics at /metrics (no API key needed); traces "
            "follow the standard OTEL_* environment variables."
        ),
    )
    add_dataclass_args(parser, GatewayConfig)
    # no --metrics-port: /metrics is served on the gateway's own HTTP port
    add_mesh_args(parser, telemetry=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = from_args(GatewayConfig, args)
        mesh = MeshOptions.from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, mesh.discovery, mesh.tls),
            host=config.host,
            port=config.port,
            log_config=None,  # keep the one log format every pdmesh service uses
            log_level=config.log_level,
            timeout_graceful_shutdown=math.ceil(config.grace_period),
        )
    )
    # uvicorn handles SIGTERM/SIGINT itself while it serves; after its graceful shutdown it
    # restores the handlers it found and raises the signal again. Finding these, the process
    # exits 0 (as every pdmesh service does) instead of dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    try:
        server.run()
    except ConsulError as e:  # e.g. an ACL token that may not register
        print(f"error: cannot register with Consul: {e}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def _exit_cleanly(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
