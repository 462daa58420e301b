#!/usr/bin/env bash
# Install the Mooncake transfer engine (the `mooncake` KV-transfer backend) into the venv, and the
# Debian libraries its shared objects load (run by `make install`; safe to run again).
#
#   scripts/install_mooncake.sh        # uses $PYTHON, else .venv/bin/python, else python3
#
# CPU hosts get `mooncake-transfer-engine-non-cuda`; a failure there fails the install, since the
# tests run real Mooncake over tcp. On a CUDA host (nvidia-smi works) the build matching
# torch.version.cuda is taken (12 → mooncake-transfer-engine, 13 → -cuda13) so KV in GPU memory
# can be registered directly; if that cannot be had the script only warns: the `grpc` backend
# still works there.
#
# The wheels bundle most of their libraries but not libibverbs (and expect libnuma, libcurl…
# from the system), even for tcp: `ldd` on every .so of the installed package says which are
# missing, and only those, plus the three Mooncake documents, are installed with apt-get.
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

MOONCAKE_VERSION="${MOONCAKE_VERSION:-0.3.13.post1}"
ALL_DISTS=(mooncake-transfer-engine mooncake-transfer-engine-cuda13
  mooncake-transfer-engine-non-cuda)
# Libraries Mooncake documents as runtime needs (RDMA verbs, connection manager, NUMA).
BASE_DEBS=(libibverbs1 librdmacm1 libnuma1)

log() { echo "install_mooncake: $*"; }
warn() { echo "install_mooncake: WARNING: $*" >&2; }

# --- which wheel ---------------------------------------------------------------------------
required=1
dist=mooncake-transfer-engine-non-cuda
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  cuda="$("$py" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)"
  case "${cuda%%.*}" in
    12) dist=mooncake-transfer-engine; required=0 ;;
    13) dist=mooncake-transfer-engine-cuda13; required=0 ;;
    *) warn "nvidia-smi works but torch has CUDA '${cuda:-none}': taking the non-CUDA build" \
         "(KV in GPU memory cannot be registered with it; use the grpc backend there)" ;;
  esac
fi

give_up() {
  if (( required )); then
    echo "install_mooncake: ERROR: $*" >&2
    exit 1
  fi
  warn "$* — the mooncake KV-transfer backend is unavailable on this host; use --kv-transfer grpc"
  exit 0
}

installed_version() {  # prints the installed version of dist $1, or nothing
  "$py" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

# --- the wheel -----------------------------------------------------------------------------
if [[ "$(installed_version "$dist")" == "$MOONCAKE_VERSION" ]]; then
  log "$dist==$MOONCAKE_VERSION already installed"
else
  # the builds all ship the same `mooncake` package: two installed at once overwrite each other
  for other in "${ALL_DISTS[@]}"; do
    if [[ "$other" != "$dist" && -n "$(installed_version "$other")" ]]; then
      log "removing $other (replaced by $dist)"
      "$py" -m pip uninstall -q -y "$other"
    fi
  done
  log "pip install $dist==$MOONCAKE_VERSION"
  "$py" -m pip install -q "$dist==$MOONCAKE_VERSION" || give_up "pip could not install $dist"
fi

# --- the Debian libraries it loads ---------------------------------------------------------
pkg_dir="$("$py" -c 'import importlib.util as u, os
s = u.find_spec("mooncake")
print(os.path.dirname(s.origin) if s and s.origin else "")')"
[[ -n "$pkg_dir" ]] || give_up "$dist is installed but has no importable 'mooncake' package"

deb_for() {  # soname -> Debian bookworm package (the ones Mooncake's wheels have been seen to need)
  case "$1" in
    libibverbs.so.*) echo libibverbs1 ;;
    librdmacm.so.*) echo librdmacm1 ;;
    libmlx5.so.*) echo ibverbs-providers ;;  # the CUDA builds link the mlx5 provider directly
    libnuma.so.*) echo libnuma1 ;;
    liburing.so.2*) echo liburing2 ;;
    libcurl.so.4*) echo libcurl4 ;;
    libssl.so.3* | libcrypto.so.3*) echo libssl3 ;;
    libz.so.1*) echo zlib1g ;;
    libgomp.so.1*) echo libgomp1 ;;
    libstdc++.so.6*) echo libstdc++6 ;;
    libgcc_s.so.1*) echo libgcc-s1 ;;
  esac
}

missing_debs=()
for deb in "${BASE_DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" ||
    missing_debs+=("$deb")
done
unknown=()
if command -v ldd >/dev/null 2>&1; then
  # the .so files of the package and of its auditwheel-vendored libs dir (<dist>.libs)
  mapfile -t sos < <(find "$pkg_dir" "$(dirname "$pkg_dir")"/mooncake_transfer_engine*.libs \
    -name '*.so*' -type f 2>/dev/null)
  while read -r soname; do
    [[ -n "$soname" ]] || continue
    deb="$(deb_for "$soname")"
    if [[ -n "$deb" ]]; then
      [[ " ${missing_debs[*]} " == *" $deb "* ]] || missing_debs+=("$deb")
    else
      unknown+=("$soname")
    fi
  done < <(for so in "${sos[@]}"; do ldd "$so" 2>/dev/null || true; done |
    awk '/=> not found/ {print $1}' | sort -u)
fi

if (( ${#missing_debs[@]} )); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "apt-get install ${missing_debs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || give_up "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null ||
      give_up "apt-get install ${missing_debs[*]} failed"
  else
    give_up "missing Debian packages ${missing_debs[*]} (run as root: apt-get install" \
      "${missing_debs[*]})"
  fi
else
  log "Debian libraries present"
fi
if (( ${#unknown[@]} )); then
  # e.g. libcuda (the driver's) or libcudart (torch's wheels load it): the import below is the
  # real check
  warn "ldd cannot resolve ${unknown[*]} (no known Debian package); checking the import"
fi

# --- the check that matters ------------------------------------------------------------------
# torch first, as pdmesh does: on CUDA hosts it loads the libcudart the CUDA builds link against
if ! err="$("$py" -c 'import torch
from mooncake.engine import TransferEngine
TransferEngine()' 2>&1)"; then
  give_up "'from mooncake.engine import TransferEngine' fails: ${err##*$'\n'}"
fi
log "ok: $dist==$MOONCAKE_VERSION (from mooncake.engine import TransferEngine works)"
