"""``python -m services.router``: route generation requests over a set of workers.

Examples:
    python -m services.router --workers 127.0.0.1:50053                 # listens on :50051
    python -m services.router --workers 10.0.0.5:50053,10.0.0.6:50053 \\
        --tokenizer 10.0.0.4:50052 --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.rpc.server import configure_logging
from services.router.config import RouterServiceConfig
from services.router.server import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.router",
        description=(
            "pdmesh router (gRPC pdmesh.v1.RouterService): takes text, token ids or chat "
            "messages, tokenizes them with the tokenizer service, picks a worker round-robin, "
            "streams the worker's tokens back as text (stop strings applied) and manages the "
            "worker set (ListWorkers/AddWorker/RemoveWorker). Cancelling a Generate call "
            "cancels it on the worker. Also serves grpc.health.v1 and reflection; SIGTERM or "
            "Ctrl-C drains in-flight calls, then exits."
        ),
    )
    add_dataclass_args(parser, RouterServiceConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = from_args(RouterServiceConfig, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except OSError as e:  # e.g. the port is taken
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
