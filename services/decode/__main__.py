"""``python -m services.decode``: serve one model's engine over gRPC as a worker.

Examples:
    python -m services.decode                                # default model, 127.0.0.1:50053
    python -m services.decode --port 0 --num-pages 256 --max-model-len 2048
    python -m services.decode --model random:llama-3.1-8b --device cuda
    python -m services.decode --mode decode --kv-transfer-backend grpc   # PD decode worker
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import cast

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.discovery import ConsulError
from pdmesh.engine import LLMEngine
from pdmesh.engine.config import EngineConfig
from pdmesh.kv_transfer import KVTransferError
from pdmesh.rpc.server import configure_logging
from services.decode.config import WorkerServiceConfig
from services.decode.server import serve
from services.mesh import MeshOptions, add_mesh_args


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
            "Also serves grpc.health.v1 and reflection; SIGTERM or Ctrl-C turns health "
            "NOT_SERVING, lets in-flight generations finish for --grace-period, then exits."
        ),
    )
    # argument groups share add_argument with the parser, which is all add_dataclass_args uses
    worker = parser.add_argument_group("worker")
    add_dataclass_args(cast(argparse.ArgumentParser, worker), WorkerServiceConfig)
    engine = parser.add_argument_group("engine")
    add_dataclass_args(cast(argparse.ArgumentParser, engine), EngineConfig)
    add_mesh_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = from_args(WorkerServiceConfig, args)
        engine_config = from_args(EngineConfig, args)
        mesh = MeshOptions.from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)

    try:
        engine = LLMEngine(engine_config)
    except (ValueError, OSError, RuntimeError) as e:  # bad model spec, missing files, no memory
        print(f"error: cannot load the engine for {engine_config.model!r}: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, engine, mesh))
    except (OSError, KVTransferError) as e:  # a port is taken, the transfer engine cannot start
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConsulError as e:  # e.g. an ACL token that may not register
        print(f"error: cannot register with Consul: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
