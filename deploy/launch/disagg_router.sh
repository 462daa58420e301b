#!/usr/bin/env bash
# PD-disaggregated pdmesh behind the router, workers found through Consul: tokenizer +
# NUM_PREFILL prefill workers + NUM_DECODE decode workers + router + gateway, each registered
# in Consul (an agent -dev is started unless CONSUL_HTTP_ADDR is set). The router pairs a
# prefill and a decode per request (prefill routing by ROUTER_POLICY) and follows the catalog,
# so workers can join and leave while it runs. KV moves with KV_BACKEND (mooncake, or grpc).
# Flags pass through to every worker, e.g.:
#   NUM_PREFILL=2 NUM_DECODE=2 KV_BACKEND=grpc deploy/launch/disagg_router.sh --num-pages 512
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
# shellcheck source=deploy/launch/mesh_lib.sh
source deploy/launch/mesh_lib.sh
NUM_PREFILL=${NUM_PREFILL:-1}
NUM_DECODE=${NUM_DECODE:-1}
KV_BACKEND=${KV_BACKEND:-auto}
ROUTER_POLICY=${ROUTER_POLICY:-round_robin}
trap stop_all EXIT INT TERM

start_consul
prepare_model
start "$PY" -m services.tokenizer "${MESH[@]}" --port 50052 --model "$MODEL"
for ((i = 0; i < NUM_PREFILL; i++)); do
  start "$PY" -m services.prefill "${MESH[@]}" --port $((50070 + i)) \
    --bootstrap-port $((8998 + i)) --kv-transfer-backend "$KV_BACKEND" --model "$MODEL" "$@"
done
for ((i = 0; i < NUM_DECODE; i++)); do
  start "$PY" -m services.decode "${MESH[@]}" --port $((50080 + i)) --mode decode \
    --kv-transfer-backend "$KV_BACKEND" --model "$MODEL" "$@"
done
start "$PY" -m services.router "${MESH[@]}" --port "$ROUTER_PORT" --policy "$ROUTER_POLICY"
start "$PY" -m services.gateway --host "$HOST" --port "$GATEWAY_PORT" --discovery consul
serve_until_stopped
