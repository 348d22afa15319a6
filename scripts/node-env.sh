#!/usr/bin/env bash
# Creates (or brings up to date) the project-local Node environment the SDK conformance suite
# uses: target/node-env, with the packages of tests/sdk/node/package.json at the versions its
# package-lock.json pins. Idempotent and quick when nothing changed; .ci/run calls it before
# the tests, and the tests call it again.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="target/node-env"
source_dir="tests/sdk/node"
stamp="$env_dir/.installed"
wanted="$(cat "$source_dir/package.json" "$source_dir/package-lock.json")"
if [ -d "$env_dir/node_modules" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi
mkdir -p "$env_dir"
cp "$source_dir/package.json" "$source_dir/package-lock.json" "$env_dir/"
(cd "$env_dir" && npm ci --no-audit --no-fund --loglevel=error)
printf '%s' "$wanted" > "$stamp"
