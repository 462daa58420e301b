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

from pdmesh.config import from_args
from pdmesh.rpc.server import configure_logging
from services.mesh import MeshOptions, parse_configs, run_service, service_parser
from services.router.config import RouterServiceConfig
from services.router.server import serve


def build_parser() -> argparse.ArgumentParser:
    parser = service_parser(
        "python -m services.router",
        (
            "pdmesh router (gRPC pdmesh.v1.RouterService): takes text, token ids or chat "
            "messages, tokenizes them with the tokenizer service, picks a worker by --policy, "
            "streams the worker's tokens back as text (stop strings applied) and manages the "
            "worker set (ListWorkers/AddWorker/RemoveWorker). With --prefill-workers and "
            "--decode-workers it disaggregates: each request gets a random 63-bit bootstrap room "
            "and goes to a prefill and a decode worker at once; the decode's tokens are streamed "
            "back, and a failure of either side before the first token cancels the other and "
            "is returned naming the side. Short prompts (--disagg-min-prompt-tokens) or no "
            "healthy prefill: the decode worker prefills itself. Cancelling a Generate call "
            "cancels it on every worker it reached. At most --max-concurrent-requests run at "
            "once; --queue-size more wait up to --queue-timeout-secs (a full queue: "
            "RESOURCE_EXHAUSTED; a wait too long: DEADLINE_EXCEEDED with error code "
            "queue_timeout). Prometheus metrics on --prometheus-port (= --metrics-port). Also "
            "serves grpc.health.v1 and reflection; SIGTERM or Ctrl-C drains in-flight calls, "
            "then exits."
        ),
        RouterServiceConfig,
    )
    parser.add_argument(
        "--request-timeout",
        dest="request_timeout_secs",
        type=float,
        default=argparse.SUPPRESS,  # --request-timeout-secs's default stands
        help="the old spelling of --request-timeout-secs",
    )
    return parser


def _configs(args: argparse.Namespace) -> tuple[RouterServiceConfig, MeshOptions]:
    config, mesh = from_args(RouterServiceConfig, args), MeshOptions.from_args(args)
    config.metrics_address(mesh.telemetry.metrics_port)  # both /metrics ports agree
    return config, mesh


def main(argv: list[str] | None = None) -> int:
    parsed = parse_configs(build_parser(), argv, _configs)
    if parsed is None:
        return 2
    config, mesh = parsed
    configure_logging(config.log_level)
    return run_service(serve(config, mesh))


if __name__ == "__main__":
    sys.exit(main())
