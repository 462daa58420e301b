"""``python -m services.prefill``: an alias of ``python -m services.worker --mode prefill``,
kept so deploy files, scripts and docs work as written.

Examples:
    python -m services.prefill                         # :50054, bootstrap :8998, mooncake tcp
    python -m services.prefill --port 0 --bootstrap-port 0 --kv-transfer-backend grpc
    python -m services.prefill --model random:llama-3.1-8b --device cuda --host 10.0.0.5
"""

from __future__ import annotations

import sys

from services.worker.__main__ import build_prefill_parser as build_parser
from services.worker.__main__ import prefill_main as main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
