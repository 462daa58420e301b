#!/usr/bin/env bash
# A local trace UI for the mesh: Arize Phoenix, in a venv of its own (.venv-phoenix; its many
# dependencies stay out of pdmesh's). UI and OTLP/HTTP on :6006 (/v1/traces), OTLP/gRPC on
# :4317. Point the services at it with the standard variables, e.g.
#   OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 make run-disagg
# Environment: PYTHON (python3), PHOENIX_VENV (.venv-phoenix), PHOENIX_PORT (6006),
# PHOENIX_GRPC_PORT (4317), PHOENIX_WORKING_DIR (where it keeps its SQLite database).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${PHOENIX_VENV:-.venv-phoenix}
export PHOENIX_PORT=${PHOENIX_PORT:-6006}
export PHOENIX_GRPC_PORT=${PHOENIX_GRPC_PORT:-4317}
export PHOENIX_WORKING_DIR=${PHOENIX_WORKING_DIR:-$HOME/.cache/pdmesh/phoenix}
if [[ ! -x "$VENV/bin/phoenix" ]]; then
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q arize-phoenix
fi
mkdir -p "$PHOENIX_WORKING_DIR"
echo "Phoenix: UI http://127.0.0.1:$PHOENIX_PORT, OTLP gRPC 127.0.0.1:$PHOENIX_GRPC_PORT," \
  "OTLP/HTTP http://127.0.0.1:$PHOENIX_PORT/v1/traces" >&2
exec "$VENV/bin/phoenix" serve
