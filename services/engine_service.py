"""The command-line life of a service that runs the engine (``services.decode``,
``services.prefill``): flags in groups, config from them, the engine loaded, served until a
signal — with the same exit codes everywhere (2: bad flags or model, 1: a port, the transfer
engine or Consul refused)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.engine import LLMEngine
from pdmesh.engine.config import EngineConfig
from pdmesh.kv_transfer import KVTransferError
from pdmesh.rpc.server import configure_logging
from services.mesh import MeshOptions, add_mesh_args, parse_configs, run_service


class ServiceConfig(Protocol):
    @property
    def log_level(self) -> str: ...  # a read-only member, so frozen dataclasses match


C = TypeVar("C", bound=ServiceConfig)
Serve = Callable[[C, LLMEngine, MeshOptions], Coroutine[Any, Any, None]]


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
    serve: Serve[C],
    argv: list[str] | None = None,
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
        engine = LLMEngine(engine_config)
    except (ValueError, OSError, RuntimeError) as e:  # bad model spec, missing files, no memory
        print(f"error: cannot load the engine for {engine_config.model!r}: {e}", file=sys.stderr)
        return 2
    # KVTransferError: the transfer engine cannot start
    return run_service(serve(config, engine, mesh), refusals=(KVTransferError,))
