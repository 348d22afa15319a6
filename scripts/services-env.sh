#!/usr/bin/env bash
# Makes sure redis-server and nats-server are installed (Debian's redis-server and nats-server
# packages), for the cluster-mode tests: they start private instances of both on free loopback
# ports with temporary directories (testkit::services), never the services a machine may run.
# Installs the missing packages, which needs root and Debian's package registry. Idempotent.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v redis-server >/dev/null
command -v nats-server >/dev/null
