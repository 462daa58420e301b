"""``python -m services.worker``: serve one model's engine over gRPC as a worker, in the role
``--mode`` names: aggregated (the default), decode, or prefill (the prefill half of PD, with
its own flags: ``--bootstrap-port``…). ``python -m services.decode`` and
``python -m services.prefill`` are aliases of the aggregated/decode and the prefill command.

The command-line life is the same for every role: flags in groups, config from them, the engine
loaded, served until a signal, with the same exit codes (2: bad flags or model, 1: a port,
the transfer engine or Consul refused).

Examples:
    python -m services.worker                                # default model, 127.0.0.1:50053
    python -m services.worker --port 0 --num-pages 256 --max-model-len 2048
    python -m services.worker --mode decode --kv-transfer-backend grpc   # PD decode worker
    python -m services.worker --mode prefill --port 0 --bootstrap-port 0  # PD prefill worker
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from pdmesh.config import from_args
from pdmesh.engine import LLMEngine
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine_process import EngineProcess
from pdmesh.kv_transfer import KVTransferError
from pdmesh.rpc.server import configure_logging
from services.mesh import MeshOptions, parse_configs, run_service, service_parser
from services.worker.config import PrefillServiceConfig, WorkerServiceConfig
from services.worker.server import serve

log = logging.getLogger(__name__)


class ServiceConfig(Protocol):
    @property
    def log_level(self) -> str: ...  # a read-only member, so frozen dataclasses match


C = TypeVar("C", bound=ServiceConfig)
E = TypeVar("E", LLMEngine, "LLMEngine | EngineProcess")
Serve = Callable[[C, E, MeshOptions], Coroutine[Any, Any, None]]


def load_engine(config: ServiceConfig, engine_config: EngineConfig) -> LLMEngine:
    """The engine in this process (raises what ``LLMEngine`` raises on a bad model)."""
    _refuse_tp(engine_config, "a prefill worker")
    return LLMEngine(engine_config)


def _refuse_tp(engine_config: EngineConfig, who: str) -> None:
    # the PD sides move KV pages of the one cache in this process; each tp rank holds its own
    # KV heads in its own process, which the transfers do not reach yet
    if engine_config.tp_size > 1:
        raise ValueError(f"--tp-size={engine_config.tp_size}: {who} runs at --tp-size 1 only")


def load_worker_engine(config: Any, engine_config: EngineConfig) -> LLMEngine | EngineProcess:
    """A worker's engine: in this process, or with ``--engine-process`` or ``--tp-size`` > 1
    in processes of its own (loaded before this returns; one that cannot load raises
    ``RuntimeError`` with its reason)."""
    if config.mode != "aggregated":
        _refuse_tp(engine_config, f"a --mode {config.mode} worker")
    own_process = config.runs_engine_process(engine_config.torch_device().type)
    if not own_process and engine_config.tp_size == 1:
        return LLMEngine(engine_config)
    engine = EngineProcess(engine_config, on_death=_stop_worker)
    engine.launch()
    return engine


def _stop_worker(error: BaseException) -> None:
    # the worker cannot serve without its engine: stop as on SIGTERM, so it deregisters and
    # its process supervisor restarts it (the router migrates what was streaming)
    log.error("%s: stopping the worker", error)
    os.kill(os.getpid(), signal.SIGTERM)


def run_engine_service(
    parser: argparse.ArgumentParser,
    config_cls: type[C],
    serve: Serve[C, E],
    argv: list[str] | None = None,
    load: Callable[[C, EngineConfig], E] = load_engine,  # type: ignore[assignment]
) -> int:
    parsed = parse_configs(
        parser,
        argv,
        lambda a: (from_args(config_cls, a), from_args(EngineConfig, a), MeshOptions.from_args(a)),
    )
    if parsed is None:
        return 2
    config, engine_config, mesh = parsed
    configure_logging(config.log_level)
    try:
        engine = load(config, engine_config)
    except (ValueError, OSError, RuntimeError) as e:  # bad model spec, missing files, no memory
        print(f"error: cannot load the engine for {engine_config.model!r}: {e}", file=sys.stderr)
        return 2
    # KVTransferError: the transfer engine cannot start
    return run_service(serve(config, engine, mesh), refusals=(KVTransferError,))


WORKER_DESCRIPTION = (
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
)
PREFILL_DESCRIPTION = (
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
)


def build_parser(prog: str = "python -m services.decode") -> argparse.ArgumentParser:
    """The aggregated and decode worker's command line (``--mode``)."""
    return service_parser(
        prog, WORKER_DESCRIPTION, ("worker", WorkerServiceConfig), ("engine", EngineConfig)
    )


def build_prefill_parser(prog: str = "python -m services.prefill") -> argparse.ArgumentParser:
    """The prefill worker's command line."""
    return service_parser(
        prog,
        PREFILL_DESCRIPTION,
        ("prefill worker", PrefillServiceConfig),
        ("engine", EngineConfig),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m services.decode``: aggregated or decode (``--mode prefill`` is refused
    there, naming the prefill command, as it always was)."""
    return run_engine_service(
        build_parser(), WorkerServiceConfig, serve, argv, load=load_worker_engine
    )


def prefill_main(argv: list[str] | None = None) -> int:
    """``python -m services.prefill``."""
    return run_engine_service(build_prefill_parser(), PrefillServiceConfig, serve, argv)


def role_of(args: list[str]) -> str | None:
    """The value of ``--mode`` in ``args`` (None without one, or a malformed one: the
    worker's own parser then says what is wrong)."""
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode")
    try:
        known, _ = mode.parse_known_args(args)
    except SystemExit:
        return None
    return known.mode


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m services.worker``: ``--mode prefill`` picks the prefill command (its flags
    differ), any other mode the worker's."""
    args = list(sys.argv[1:] if argv is None else argv)
    if role_of(args) == "prefill":
        rest = [a for a in args if a not in ("--mode=prefill",)]
        if "--mode" in rest:  # "--mode prefill": the prefill command has no --mode
            at = rest.index("--mode")
            del rest[at : at + 2]
        return run_engine_service(
            build_prefill_parser("python -m services.worker --mode prefill"),
            PrefillServiceConfig,
            serve,
            rest,
        )
    return run_engine_service(
        build_parser("python -m services.worker"),
        WorkerServiceConfig,
        serve,
        args,
        load=load_worker_engine,
    )


if __name__ == "__main__":
    sys.exit(worker_main())
