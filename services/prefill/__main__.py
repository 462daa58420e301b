"""``python -m services.prefill``: the prefill half of PD disaggregation.

Examples:
    python -m services.prefill                         # :50054, bootstrap :8998, mooncake tcp
    python -m services.prefill --port 0 --bootstrap-port 0 --kv-transfer-backend grpc
    python -m services.prefill --model random:llama-3.1-8b --device cuda --host 10.0.0.5
"""

from __future__ import annotations

import argparse
import sys

from services.engine_service import add_engine_service_args, run_engine_service
from services.prefill.config import PrefillServiceConfig
from services.prefill.server import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.prefill",
        description=(
            "pdmesh prefill worker for PD disaggregation. gRPC pdmesh.v1.WorkerService on "
            "--port: Generate with disagg.bootstrap_room set prefills the prompt at once, waits "
            "(at most --bootstrap-timeout) for the decode worker's page ids, writes the KV "
            "straight into the decode's memory (--kv-transfer-backend), frees its pages and "
            "answers with the first token and usage. pdmesh.v1.BootstrapService on "
            "--bootstrap-port: decode workers register their KV layout there (a mismatch is "
            "refused, naming it), send each room's page ids (Transfer) and ping it. Cancelling "
            "either call stops the room at any stage and frees its pages. GetModelInfo "
            "advertises role 'prefill' and the bootstrap port. SGLang's scheduler protocol "
            "(sglang.grpc.scheduler.SglangScheduler) is served on --port too, its "
            "disaggregated_params driving the same flow (docs/sglang_interop.md). Also "
            "grpc.health.v1 and "
            "reflection on both ports; SIGTERM or Ctrl-C drains for --grace-period, then exits."
        ),
    )
    return add_engine_service_args(parser, "prefill worker", PrefillServiceConfig)


def main(argv: list[str] | None = None) -> int:
    return run_engine_service(build_parser(), PrefillServiceConfig, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
