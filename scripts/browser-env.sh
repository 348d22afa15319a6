#!/usr/bin/env bash
# Makes sure Debian's Chromium is installed, for the browser SDK tests (tests/sdk drives it
# with playwright-core from target/node-env). Installs the `chromium` package when it is
# missing, which needs root and Debian's package registry. Idempotent and quick once installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
