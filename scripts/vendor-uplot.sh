#!/usr/bin/env bash
# Vendors the dashboard's charting library, uPlot (MIT), from the npm registry into
# dashboard/vendor/uplot: its minified browser build, its stylesheet and its licence. The
# dashboard is embedded in the binary and must work offline, so the files live in the
# repository; this script is how they got there and how to move to another version:
#   scripts/vendor-uplot.sh 1.6.32
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/vendor-uplot.sh VERSION}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack "uplot@$version" --silent >/dev/null && tar xzf "uplot-$version.tgz")
target="dashboard/vendor/uplot"
mkdir -p "$target"
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" "$work/package/LICENSE" "$target/"
printf 'uplot %s (npm registry): dist/uPlot.iife.min.js, dist/uPlot.min.css, LICENSE\n' "$version" > "$target/VERSION"
