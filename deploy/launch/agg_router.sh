#!/usr/bin/env bash
# Aggregated pdmesh behind the router, several workers found through Consul: tokenizer +
# NUM_WORKERS aggregated workers + router + gateway, each registered in Consul (an agent -dev is
# started unless CONSUL_HTTP_ADDR is set); the router and gateway follow the catalog, so more
# workers can join later (python -m services.decode --discovery consul). Flags pass through to
# every worker, e.g.:
#   NUM_WORKERS=4 ROUTER_POLICY=round_robin deploy/launch/agg_router.sh --num-pages 512
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
# shellcheck source=deploy/launch/mesh_lib.sh
source deploy/launch/mesh_lib.sh
NUM_WORKERS=${NUM_WORKERS:-2}
ROUTER_POLICY=${ROUTER_POLICY:-round_robin}
trap stop_all EXIT INT TERM

start_consul
prepare_model
start "$PY" -m services.tokenizer "${MESH[@]}" --port 50052 --model "$MODEL"
for ((i = 0; i < NUM_WORKERS; i++)); do
  start "$PY" -m services.decode "${MESH[@]}" --port $((50060 + i)) --model "$MODEL" "$@"
done
start "$PY" -m services.router "${MESH[@]}" --port "$ROUTER_PORT" --policy "$ROUTER_POLICY"
start "$PY" -m services.gateway --host "$HOST" --port "$GATEWAY_PORT" --discovery consul
serve_until_stopped
