#!/usr/bin/env bash
# Makes sure target/tools/promtool exists, for checking and testing the Prometheus rules in
# deploy/prometheus (`promtool check rules`, `promtool test rules`). Takes the binary out of
# Debian's `prometheus` package without installing the package: installing it would start a
# Prometheus server as a system service, and the tests need only the command-line tool. No
# daemon is started and nothing outside target/ is written. Needs Debian's package registry
# (`apt-get update`, run only when the download fails, needs root). Idempotent and quick once
# the binary is there.
set -euo pipefail
cd "$(dirname "$0")/.."
tool="target/tools/promtool"
if [ -x "$tool" ] && "$tool" --version >/dev/null 2>&1; then
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
    apt-get update -qq
    (cd "$work" && apt-get download prometheus >/dev/null)
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
mkdir -p "$(dirname "$tool")"
cp "$work/root/usr/bin/promtool" "$tool.tmp"
chmod 755 "$tool.tmp"
mv "$tool.tmp" "$tool"
"$tool" --version >/dev/null
