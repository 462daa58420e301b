#!/usr/bin/env bash
# Generate the Python gRPC stubs from protos/ (run by `make protos`): protos/pdmesh/v1/*.proto
# into pdmesh/v1/ (pdmesh's own wire) and protos/pdmesh/sglang/*.proto into pdmesh/sglang/
# (SGLang's scheduler protocol, package sglang.grpc.scheduler, for interop).
#
# The generated *_pb2.py / *_pb2.pyi / *_pb2_grpc.py are not committed: protos/ is the only
# definition of the wire. The old modules are replaced as a whole (only once protoc succeeded),
# so a deleted .proto leaves nothing behind and running this twice gives the same tree.
#
#   scripts/gen_protos.sh            # uses $PYTHON, else .venv/bin/python, else python3
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi

# each dir under protos/ and the package its stubs go to (the same path without protos/)
dirs=(pdmesh/v1 pdmesh/sglang)
shopt -s nullglob
protos=()
for dir in "${dirs[@]}"; do
  found=(protos/"$dir"/*.proto)
  if (( ${#found[@]} == 0 )); then
    echo "gen_protos: no .proto files under protos/$dir" >&2
    exit 1
  fi
  protos+=("${found[@]}")
done
if ! "$py" -c "import grpc_tools.protoc" 2>/dev/null; then
  echo "gen_protos: $py lacks grpcio-tools (pip install grpcio-tools)" >&2
  exit 1
fi

# Generate into a scratch dir first, so a proto that does not compile leaves the old stubs.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m grpc_tools.protoc -Iprotos --python_out="$tmp" --pyi_out="$tmp" \
  --grpc_python_out="$tmp" "${protos[@]}"
modules=()
for proto in "${protos[@]}"; do
  rel="${proto#protos/}"
  out="$(dirname "$rel")"
  name="$(basename "$rel" .proto)"
  for f in "${name}_pb2.py" "${name}_pb2.pyi" "${name}_pb2_grpc.py"; do
    [[ -f "$tmp/$out/$f" ]] || { echo "gen_protos: protoc did not write $out/$f" >&2; exit 1; }
  done
  modules+=("${out//\//.}.${name}_pb2_grpc")
done
for out in "${dirs[@]}"; do
  rm -f "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py
  cp "$tmp/$out"/*_pb2.py "$tmp/$out"/*_pb2.pyi "$tmp/$out"/*_pb2_grpc.py "$out"/
done
# Importing every module catches a protobuf runtime older than the generator.
"$py" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" "${modules[@]}"
echo "gen_protos: ${#protos[@]} protos -> ${dirs[*]}"
