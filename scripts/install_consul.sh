#!/usr/bin/env bash
# Install the Consul agent (Debian's `consul` 1.8.7) when it is missing; idempotent.
#
# Bookworm ships no consul package, bullseye does. The bullseye suite is added with an apt pin of
# priority 100 for it: below the default 500, so apt never takes another package from bullseye
# on its own (upgrades keep coming from bookworm), yet `apt-get install consul` still works
# because bookworm offers no candidate to compete with.
#
#   scripts/install_consul.sh          # as root (CI and dev machines run as root)
set -euo pipefail

SOURCE_FILE=/etc/apt/sources.list.d/pdmesh-bullseye.list
PIN_FILE=/etc/apt/preferences.d/pdmesh-bullseye
SOURCE_LINE="deb http://deb.debian.org/debian bullseye main"

if command -v consul >/dev/null 2>&1; then
  consul version | sed -n 1p  # sed reads it all: head would SIGPIPE consul under pipefail
  exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
  echo "error: consul is missing and installing it needs root (apt-get)" >&2
  exit 1
fi

if [[ ! -f "$SOURCE_FILE" ]] || ! grep -qxF "$SOURCE_LINE" "$SOURCE_FILE"; then
  echo "$SOURCE_LINE" >"$SOURCE_FILE"
fi
cat >"$PIN_FILE" <<'EOF'
# pdmesh: only consul comes from bullseye (installed by name); nothing else is preferred there
Package: *
Pin: release n=bullseye
Pin-Priority: 100
EOF

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q consul

consul version | sed -n 1p  # sed reads it all: head would SIGPIPE consul under pipefail
