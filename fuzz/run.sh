#!/usr/bin/env bash
# Runs every fuzz target for a given time each (default 60 s) with cargo-fuzz on the nightly
# toolchain, installing cargo-fuzz first if it is missing. Not part of CI: CI runs the seed
# corpora through the same entry points (tests/fuzz_corpora.rs).
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# New inputs the fuzzer finds go to fuzz/corpus/<target>/ (ignored by git; add a crashing one
# under a readable name to keep it as a regression test); crashes go to fuzz/artifacts/.
# Prints one line per target: executions, and crashes found.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(segment_json segment_ndjson decode_gzip decode_deflate decode_zstd decode_br log_codec config)
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked
fi
summary=()
for target in "${targets[@]}"; do
    log="$(mktemp)"
    status=0
    # -rss_limit_mb: a body is at most a few MiB; more means a leak or an amplification.
    cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -max_len=1048576 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
    crashes="$(find "artifacts/$target" -type f 2>/dev/null | wc -l)"
    summary+=("$target: ${runs:-?} executions, $crashes crash files, exit $status")
    if [ "$status" -ne 0 ]; then
        tail -40 "$log"
    fi
    rm -f "$log"
done
printf '%s\n' "${summary[@]}"
