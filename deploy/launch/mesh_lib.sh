#!/usr/bin/env bash
# Shared by agg_router.sh and disagg_router.sh (sourced, not run): a local Consul agent unless
# CONSUL_HTTP_ADDR names one, background services registered in it, and one clean stop of all
# of them on Ctrl-C, SIGTERM or the first one to exit.
#
# Environment: MODEL (default smollm2-135m-instruct), HOST (127.0.0.1), GATEWAY_PORT (8000),
# ROUTER_PORT (50051), CONSUL_HTTP_ADDR (empty: start `consul agent -dev` on 127.0.0.1:8500).

MODEL=${MODEL:-smollm2-135m-instruct}
HOST=${HOST:-127.0.0.1}
GATEWAY_PORT=${GATEWAY_PORT:-8000}
ROUTER_PORT=${ROUTER_PORT:-50051}
PY=.venv/bin/python
PIDS=()
# every gRPC service: registered in Consul, /metrics on a free port (found through Consul meta)
# shellcheck disable=SC2034  # used by the scripts that source this file
MESH=(--host "$HOST" --discovery consul --metrics-port 0)

stop_all() {
  trap - EXIT INT TERM
  # newest first: the gateway stops taking requests before the workers drain
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[i]}" 2>/dev/null || true
  done
  wait || true
}

start() {
  echo "starting: $*" >&2
  "$@" &
  PIDS+=("$!")
}

start_consul() {
  if [[ -n "${CONSUL_HTTP_ADDR:-}" ]]; then
    return
  fi
  export CONSUL_HTTP_ADDR=127.0.0.1:8500
  start consul agent -dev -bind 127.0.0.1 -client 127.0.0.1 -dns-port -1 -log-level warn
  # the catalog takes registrations once the agent has elected itself leader
  until curl -sf "http://$CONSUL_HTTP_ADDR/v1/status/leader" | grep -q ':'; do sleep 0.2; done
}

# a fetched model is converted once, here, before several services want it at once
prepare_model() {
  if [[ "$MODEL" == smollm2-135m-instruct ]]; then
    "$PY" -c 'from pdmesh.models.fetch import ensure_default_model; ensure_default_model()'
  fi
}

serve_until_stopped() {
  echo "pdmesh is starting: http://$HOST:$GATEWAY_PORT/v1 (Consul http://$CONSUL_HTTP_ADDR/ui)" >&2
  wait -n || true
  echo "a service exited; stopping the mesh" >&2
  stop_all
  return 1
}
