#!/usr/bin/env bash
# Run every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each (default 60), starting
# from the committed seeds (fuzz/seeds/<target>) plus anything earlier runs added to the
# working corpus (fuzz/corpus/<target>, not committed). Crashes land in
# fuzz/artifacts/<target>/; copy each into fuzz/regressions/<target>/ so that
# `cargo test --test fuzz_corpus` replays it on stable from then on.
#
# Needs a nightly toolchain (`rustup toolchain list`) and cargo-fuzz (`cargo install cargo-fuzz`).
# Usage: bench/fuzz.sh [seconds] [target...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(config keys autoscale admin)
fi
jobs="${FUZZ_JOBS:-1}"
cargo +nightly fuzz build -O >/dev/null
status=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log="artifacts/$target/run.log"
    echo "== $target: ${seconds}s"
    if cargo +nightly fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -jobs="$jobs" -workers="$jobs" -max_len=4096 \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        result="no crash"
    else
        result="CRASH (see $log and fuzz/artifacts/$target/)"
        status=1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
    corpus=$(ls "corpus/$target" | wc -l)
    echo "   ${runs:-?} runs, coverage ${cov:-?} edges, corpus ${corpus} inputs: $result"
done
exit $status
