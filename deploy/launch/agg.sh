#!/usr/bin/env bash
# Aggregated pdmesh on this host: tokenizer + worker + router + gateway.
# Flags pass through to the launcher (python -m services.launch --help); flags after '--' go to
# the worker, e.g.:  deploy/launch/agg.sh --gateway-port 8080 -- --max-running-requests 16
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
exec .venv/bin/python -m services.launch "$@"
