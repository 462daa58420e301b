"""``python -m services.prefill``: the prefill half of PD disaggregation.

Examples:
    python -m services.prefill                         # :50054, bootstrap :8998, mooncake tcp
    python -m services.prefill --port 0 --bootstrap-port 0 --kv-transfer-backend grpc
    python -m services.prefill --model random:llama-3.1-8b --device cuda --host 10.0.0.5
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
from services.mesh import MeshOptions, add_mesh_args
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
            "advertises role 'prefill' and the bootstrap port. Also grpc.health.v1 and "
            "reflection on both ports; SIGTERM or Ctrl-C drains for --grace-period, then exits."
        ),
    )
    worker = parser.add_argument_group("prefill worker")
    add_dataclass_args(cast(argparse.ArgumentParser, worker), PrefillServiceConfig)
    engine = parser.add_argument_group("engine")
    add_dataclass_args(cast(argparse.ArgumentParser, engine), EngineConfig)
    add_mesh_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = from_args(PrefillServiceConfig, args)
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
