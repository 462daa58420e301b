"""``python -m benchmarks.mesh.stepping_worker``: the model-free stepping worker, a benchmark
instrument: the real worker process (``services.worker.server.serve``: the same servicers,
``AsyncEngine``, interceptors, health, SGLang protocol) with a ``SteppingEngine`` in place of
the model, so tokens leave it exactly as a real worker sends them, at a known rate.

Examples:
    python -m benchmarks.mesh.stepping_worker --port 50053 --step-ms 10
    python -m benchmarks.mesh.stepping_worker --port 0 --step-ms 5 --model random:llama-3.1-8b
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from typing import cast

from benchmarks.mesh.stepping_engine import SteppingEngine, SteppingEngineConfig
from pdmesh.config import add_dataclass_args, flag, from_args
from pdmesh.engine import LLMEngine
from pdmesh.rpc.server import LOG_LEVELS, configure_logging
from services.mesh import MeshOptions, add_mesh_args, parse_configs, run_service
from services.worker.config import DEFAULT_PORT, WorkerServiceConfig
from services.worker.server import serve

PROG = "python -m benchmarks.mesh.stepping_worker"


@dataclass(frozen=True)
class SteppingWorkerConfig:
    """The worker process's own flags (the servicer's; the engine's are
    ``SteppingEngineConfig``'s)."""

    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(DEFAULT_PORT, "gRPC port; 0 picks a free one (the log line says which)")
    log_level: str = flag("info", f"log verbosity: {', '.join(LOG_LEVELS)}")
    grace_period: float = flag(
        5.0, "seconds in-flight generations get to finish after SIGTERM/SIGINT"
    )

    def worker_config(self) -> WorkerServiceConfig:
        """As ``services.decode`` would be configured: aggregated, nothing else changed."""
        return WorkerServiceConfig(
            host=self.host,
            port=self.port,
            log_level=self.log_level,
            grace_period=self.grace_period,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill(
            "Model-free stepping worker for benchmarks of the token path: serves "
            "pdmesh.v1.WorkerService (and SGLang's scheduler protocol) through the real worker "
            "servicer, with an engine that, every --step-ms, gives each active request one "
            "ordinary word token of the model's vocabulary (no weights loaded, no compute). "
            "Requests finish with 'length' at max_new_tokens; usage and logprobs are reported "
            "as by the real engine; cancelling a call aborts its request.",
            width=88,
        ),
    )
    worker = parser.add_argument_group("worker")
    # argument groups share add_argument with the parser, which is all add_dataclass_args uses
    add_dataclass_args(cast(argparse.ArgumentParser, worker), SteppingWorkerConfig)
    engine = parser.add_argument_group("stepping engine")
    add_dataclass_args(cast(argparse.ArgumentParser, engine), SteppingEngineConfig)
    add_mesh_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parsed = parse_configs(
        build_parser(),
        argv,
        lambda a: (
            from_args(SteppingWorkerConfig, a).worker_config(),
            from_args(SteppingEngineConfig, a),
            MeshOptions.from_args(a),
        ),
    )
    if parsed is None:
        return 2
    worker, engine_config, mesh = parsed
    configure_logging(worker.log_level)
    try:
        engine = SteppingEngine(engine_config)
    except (ValueError, OSError) as e:  # a bad model spec, missing files
        print(f"error: cannot read the model {engine_config.model!r}: {e}", file=sys.stderr)
        return 2
    # the seam: serve() takes the engine object; SteppingEngine has every member of
    # LLMEngine that the worker's servicers and AsyncEngine use (tests/unit check the list)
    return run_service(serve(worker, cast(LLMEngine, engine), mesh))


if __name__ == "__main__":
    sys.exit(main())
