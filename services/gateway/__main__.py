"""``python -m services.gateway``: the OpenAI-compatible HTTP gateway in front of the router.

Examples:
    python -m services.gateway --router 127.0.0.1:50051             # http://127.0.0.1:8000
    python -m services.gateway --router r1:50051,r2:50051 --host 0.0.0.0 --api-key "$KEY"
    python -m services.gateway --router 127.0.0.1:50051 --workers 4     # 4 processes, one port
"""

from __future__ import annotations

import argparse
import sys

from pdmesh.config import from_args
from pdmesh.rpc.server import configure_logging
from services.gateway import serve, workers
from services.gateway.config import GatewayConfig
from services.mesh import MeshOptions, service_parser


def build_parser() -> argparse.ArgumentParser:
    return service_parser(
        "python -m services.gateway",
        (
            "pdmesh HTTP gateway: OpenAI-compatible /v1/chat/completions, /v1/completions and "
            "/v1/models, SGLang-native /generate, and /health, served over one gRPC Stream per "
            "router (--no-router-stream: a Generate call per request), plus the SGLang "
            "router's worker admin (POST /add_worker?url=, POST /remove_worker?url=, "
            "GET /workers). Streams are server-sent events; a client that disconnects "
            "cancels its request down to the worker. Errors use OpenAI's error body (a router "
            "at its limit: 429, or 408 after waiting in its queue). "
            "SIGTERM or Ctrl-C stops accepting, lets open requests finish for --grace-period "
            "seconds, then exits. Prometheus metrics at /metrics (no API key needed); traces "
            "follow the standard OTEL_* environment variables."
        ),
        GatewayConfig,
        # no --metrics-port: /metrics is served on the gateway's own HTTP port
        telemetry=False,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = from_args(GatewayConfig, args)
        mesh = MeshOptions.from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    if config.workers > 1:
        return workers.run(config, mesh)
    return serve.run(config, mesh)


if __name__ == "__main__":
    sys.exit(main())
