#!/usr/bin/env bash
# bench/soak.sh — the fault soak of tests/soak.rs (issue 7) for as long as asked.
#
#   bench/soak.sh DURATION [SEED] [VARIANT]
#       DURATION: seconds of faults per variant ("600", "600s" or "10m")
#       SEED:     default 7, the suite's fixed seed
#       VARIANT:  memory, store or both (default both, one after the other)
#
# It runs the tests of tests/soak.rs that `cargo test` runs for 14 s and 9 s, through the real
# sluice binary (release build), with SOAK_SECS / SOAK_STORE_SECS and SOAK_SEED set. Both
# variants: mixed load (keyed and unkeyed callers; HTTP/1.1 clients pooled or one connection
# per request, and HTTP/2 clients multiplexing 4 streams on a connection; uploads up to 2 MiB
# sent with Content-Length, chunked or as HTTP/2 DATA frames; 512 KiB and slow streamed answers)
# while endpoints are killed and restarted on their ports, reset before and in the middle of
# a body, stall past timeouts.response (500 ms) or answer garbage; clients abort after a
# random time, in the middle of an upload and of an answer (HTTP/2: a stream reset).
#   memory: the config is also reloaded (valid and invalid, by POST /admin/reload and SIGHUP)
#           and caps and queues change through the admin API; then SIGTERM under load.
#   store:  limits in a redis-server the test starts (store.on_error = "deny"), which is
#           killed and restarted empty, or hung with SIGSTOP past store.timeout and resumed;
#           needs redis-server (SLUICE_REQUIRE_REDIS=1 is set, so a missing one fails).
# It prints the summaries (requests, faults injected by kind, answers by kind, endpoint
# peaks, gauges, RSS and fds against their baseline, the shutdown, and the invariant
# violations, which must be 0) and exits non-zero on any violation.
#
# Env knobs:
#   OUT     where the log goes (default: a new temp dir, kept); the summary is also printed
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
duration="$1"
seed="${2:-7}"
variant="${3:-both}"
case "$variant" in
    memory) filter="soak_with_faults_then_sigterm" ;;
    store) filter="redis_store" ;;
    both) filter="" ;;
    *) echo "VARIANT must be memory, store or both, not '$variant'" >&2; exit 2 ;;
esac
case "$duration" in
    *m) secs=$(( ${duration%m} * 60 )) ;;
    *s) secs="${duration%s}" ;;
    *) secs="$duration" ;;
esac
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "DURATION must be a number of seconds (or Ns / Nm), not '$duration'" >&2
    exit 2
fi

out="${OUT:-$(mktemp -d /tmp/sluice-soak.XXXXXX)}"
mkdir -p "$out"
log="$out/soak-${variant}-${secs}s-seed${seed}.log"
echo "soak: ${secs}s of faults per variant (${variant}), seed ${seed}; log in $log"
echo "soak: git rev $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

cargo build --release --test soak --bin sluice >/dev/null 2>&1 || cargo build --release --test soak --bin sluice
status=0
SOAK_SECS="$secs" SOAK_STORE_SECS="$secs" SOAK_SEED="$seed" SLUICE_REQUIRE_REDIS=1 \
    cargo test --release --test soak -- --nocapture $filter >"$log" 2>&1 || status=$?
grep '^soak\(-store\)\?:\|^ \{4\}' "$log" || true
if [ "$status" -ne 0 ]; then
    echo "soak: FAILED (exit $status); the whole output is in $log" >&2
fi
exit "$status"
