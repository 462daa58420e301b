#!/usr/bin/env bash
# PD-disaggregated pdmesh on this host: tokenizer + prefill worker + decode worker + router (PD
# mode) + gateway; KV moves from prefill to decode with Mooncake over tcp unless
# --kv-transfer-backend grpc. Flags pass through to the launcher (python -m services.launch
# --help); flags after '--' go to both workers, e.g.:
#   deploy/launch/disagg.sh --kv-transfer-backend grpc -- --num-pages 512
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
exec .venv/bin/python -m services.launch --mode disagg "$@"
