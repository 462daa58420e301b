"""``python -m services.tokenizer``: serve one model's tokenizer over gRPC.

Examples:
    python -m services.tokenizer                                 # default model, 127.0.0.1:50052
    python -m services.tokenizer --model ~/models/Qwen2.5-0.5B-Instruct --port 0
"""

from __future__ import annotations

import argparse
import sys

from pdmesh.config import from_args
from pdmesh.rpc.server import configure_logging
from services.mesh import MeshOptions, parse_configs, run_service, service_parser
from services.tokenizer.config import TokenizerServiceConfig
from services.tokenizer.server import load_tokenizer, serve


def build_parser() -> argparse.ArgumentParser:
    return service_parser(
        "python -m services.tokenizer",
        (
            "pdmesh tokenizer service (gRPC pdmesh.v1.TokenizerService): tokenize, apply the "
            "model's chat template, detokenize, stream-detokenize generated tokens "
            "(UTF-8 safe, with stop strings), and hand out tokenizer.json to clients that "
            "detokenize themselves (the router). Also serves grpc.health.v1 and reflection; "
            "SIGTERM or Ctrl-C drains in-flight calls, then exits."
        ),
        TokenizerServiceConfig,
    )


def main(argv: list[str] | None = None) -> int:
    parsed = parse_configs(
        build_parser(),
        argv,
        lambda a: (from_args(TokenizerServiceConfig, a), MeshOptions.from_args(a)),
    )
    if parsed is None:
        return 2
    config, mesh = parsed
    configure_logging(config.log_level)
    try:
        loaded = load_tokenizer(config.model, config.chat_template)
    except (ValueError, OSError, RuntimeError) as e:  # bad spec, missing files, failed fetch
        print(f"error: cannot load the tokenizer of {config.model!r}: {e}", file=sys.stderr)
        return 2
    return run_service(serve(config, loaded, mesh))


if __name__ == "__main__":
    sys.exit(main())
