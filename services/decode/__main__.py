"""``python -m services.decode``: serve one model's engine over gRPC as a worker.

Examples:
    python -m services.decode                                # default model, 127.0.0.1:50053
    python -m services.decode --port 0 --num-pages 256 --max-model-len 2048
    python -m services.decode --model random:llama-3.1-8b --device cuda
    python -m services.decode --mode decode --kv-transfer-backend grpc   # PD decode worker
"""

from __future__ import annotations

import argparse
import sys

from services.decode.config import WorkerServiceConfig
from services.decode.server import serve
from services.engine_service import (
    add_engine_service_args,
    load_worker_engine,
    run_engine_service,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.decode",
        description=(
            "pdmesh worker (gRPC pdmesh.v1.WorkerService): runs the paged-KV engine and streams "
            "generated token ids with logprobs, finish reason and usage; Abort, GetLoad and "
            "GetModelInfo for the router. Cancelling a Generate call aborts the request and "
            "frees its KV pages. With --mode decode it is the decode half of PD "
            "disaggregation: for a request whose 'disagg' names a prefill worker it allocates "
            "the prompt's pages, registers with the prefill's bootstrap server (once per "
            "prefill), receives the KV and first token (--kv-transfer-backend), then decodes; it "
            "heartbeats every prefill it holds rooms on and fails those rooms when one is lost. "
            "Also serves SGLang's scheduler protocol (sglang.grpc.scheduler.SglangScheduler) on "
            "the same port, for SGLang's gateway smg in gRPC mode (docs/sglang_interop.md), and "
            "grpc.health.v1 and reflection; SIGTERM or Ctrl-C turns health "
            "NOT_SERVING, lets in-flight generations finish for --grace-period, then exits."
        ),
    )
    return add_engine_service_args(parser, "worker", WorkerServiceConfig)


def main(argv: list[str] | None = None) -> int:
    return run_engine_service(
        build_parser(), WorkerServiceConfig, serve, argv, load=load_worker_engine
    )


if __name__ == "__main__":
    sys.exit(main())
