"""``python -m services.tokenizer``: serve one model's tokenizer over gRPC.

Examples:
    python -m services.tokenizer                                 # default model, 127.0.0.1:50052
    python -m services.tokenizer --model ~/models/Qwen2.5-0.5B-Instruct --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.discovery import ConsulError
from pdmesh.rpc.server import configure_logging
from services.mesh import MeshOptions, add_mesh_args
from services.tokenizer.config import TokenizerServiceConfig
from services.tokenizer.server import load_tokenizer, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.tokenizer",
        description=(
            "pdmesh tokenizer service (gRPC pdmesh.v1.TokenizerService): tokenize, apply the "
            "model's chat template, detokenize, and stream-detokenize generated tokens "
            "(UTF-8 safe, with stop strings). Also serves grpc.health.v1 and reflection; "
            "SIGTERM or Ctrl-C drains in-flight calls, then exits."
        ),
    )
    add_dataclass_args(parser, TokenizerServiceConfig)
    add_mesh_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = from_args(TokenizerServiceConfig, args)
        mesh = MeshOptions.from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        tokenizer = load_tokenizer(config.model)
    except (ValueError, OSError, RuntimeError) as e:  # bad spec, missing files, failed fetch
        print(f"error: cannot load the tokenizer of {config.model!r}: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, tokenizer, mesh))
    except OSError as e:  # e.g. the port is taken
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConsulError as e:  # e.g. an ACL token that may not register
        print(f"error: cannot register with Consul: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
