"""``python -m services.router``: route generation requests over a set of workers.

Examples:
    python -m services.router --workers 127.0.0.1:50053                 # listens on :50051
    python -m services.router --workers 10.0.0.5:50053,10.0.0.6:50053 \\
        --tokenizer 10.0.0.4:50052 --host 0.0.0.0
    python -m services.router --prefill-workers 127.0.0.1:50054 \\
        --decode-workers 127.0.0.1:50053 --disagg-min-prompt-tokens 32    # PD disaggregation
    python -m services.router --discovery consul     # workers/tokenizers from Consul, live
"""

from __future__ import annotations

import argparse
import sys

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.rpc.server import configure_logging
from services.mesh import MeshOptions, add_mesh_args, parse_configs, run_service
from services.router.config import RouterServiceConfig
from services.router.server import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.router",
        description=(
            "pdmesh router (gRPC pdmesh.v1.RouterService): takes text, token ids or chat "
            "messages, tokenizes them with the tokenizer service, picks a worker round-robin, "
            "streams the worker's tokens back as text (stop strings applied) and manages the "
            "worker set (ListWorkers/AddWorker/RemoveWorker). With --prefill-workers and "
            "--decode-workers it disaggregates: each request gets a random 63-bit bootstrap room "
            "and goes to a prefill and a decode worker at once; the decode's tokens are streamed "
            "back, and a failure of either side before the first token cancels the other and "
            "is returned naming the side. Short prompts (--disagg-min-prompt-tokens) or no "
            "healthy prefill: the decode worker prefills itself. Cancelling a Generate call "
            "cancels it on every worker it reached. Also serves grpc.health.v1 and reflection; "
            "SIGTERM or Ctrl-C drains in-flight calls, then exits."
        ),
    )
    add_dataclass_args(parser, RouterServiceConfig)
    add_mesh_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parsed = parse_configs(
        build_parser(),
        argv,
        lambda a: (from_args(RouterServiceConfig, a), MeshOptions.from_args(a)),
    )
    if parsed is None:
        return 2
    config, mesh = parsed
    configure_logging(config.log_level)
    return run_service(serve(config, mesh))


if __name__ == "__main__":
    sys.exit(main())
