"""The command-line life of a service that runs the engine (``services.decode``,
``services.prefill``): flags in groups, config from them, the engine loaded, served until a
signal — with the same exit codes everywhere (2: bad flags or model, 1: a port, the transfer
engine or Consul refused)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.engine import LLMEngine
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine_process import EngineProcess
from pdmesh.kv_transfer import KVTransferError
from pdmesh.rpc.server import configure_logging
from services.mesh import MeshOptions, add_mesh_args, parse_configs, run_service

log = logging.getLogger(__name__)


class ServiceConfig(Protocol):
    @property
    def log_level(self) -> str: ...  # a read-only member, so frozen dataclasses match


C = TypeVar("C", bound=ServiceConfig)
E = TypeVar("E", LLMEngine, "LLMEngine | EngineProcess")
Serve = Callable[[C, E, MeshOptions], Coroutine[Any, Any, None]]


def load_engine(config: ServiceConfig, engine_config: EngineConfig) -> LLMEngine:
    """The engine in this process (raises what ``LLMEngine`` raises on a bad model)."""
    return LLMEngine(engine_config)


def load_worker_engine(config: Any, engine_config: EngineConfig) -> LLMEngine | EngineProcess:
    """A worker's engine: in this process, or with ``--engine-process`` in its own (loaded
    before this returns; a child that cannot load raises ``RuntimeError`` with its reason)."""
    if not getattr(config, "engine_process", False):
        return LLMEngine(engine_config)
    engine = EngineProcess(engine_config, on_death=_stop_worker)
    engine.launch()
    return engine


def _stop_worker(error: BaseException) -> None:
    # the worker cannot serve without its engine: stop as on SIGTERM, so it deregisters and
    # its process supervisor restarts it (the router migrates what was streaming)
    log.error("%s: stopping the worker", error)
    os.kill(os.getpid(), signal.SIGTERM)


def add_engine_service_args(
    parser: argparse.ArgumentParser, title: str, config_cls: type
) -> argparse.ArgumentParser:
    """The service's own flags, the engine's and the mesh's, each in a ``--help`` group."""
    # argument groups share add_argument with the parser, which is all add_dataclass_args uses
    service = parser.add_argument_group(title)
    add_dataclass_args(cast(argparse.ArgumentParser, service), config_cls)
    engine = parser.add_argument_group("engine")
    add_dataclass_args(cast(argparse.ArgumentParser, engine), EngineConfig)
    add_mesh_args(parser)
    return parser


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
