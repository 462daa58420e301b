"""The command-line life of a service that runs the engine (``services.decode``,
``services.prefill``): flags in groups, config from them, the engine loaded, served until a
signal — with the same exit codes everywhere (2: bad flags or model, 1: a port, the transfer
engine or Consul refused)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.discovery import ConsulError
from pdmesh.engine import LLMEngine
from pdmesh.engine.config import EngineConfig
from pdmesh.kv_transfer import KVTransferError
from pdmesh.rpc.server import configure_logging
from services.mesh import MeshOptions, add_mesh_args


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
    args = parser.parse_args(argv)
    try:
        config = from_args(config_cls, args)
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
