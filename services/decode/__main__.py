"""``python -m services.decode``: an alias of ``python -m services.worker`` in its aggregated
and decode roles (``--mode``), kept so deploy files, scripts and docs work as written.

Examples:
    python -m services.decode                                # default model, 127.0.0.1:50053
    python -m services.decode --port 0 --num-pages 256 --max-model-len 2048
    python -m services.decode --model random:llama-3.1-8b --device cuda
    python -m services.decode --mode decode --kv-transfer-backend grpc   # PD decode worker
"""

from __future__ import annotations

import sys

from services.worker.__main__ import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
