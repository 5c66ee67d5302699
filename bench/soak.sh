#!/usr/bin/env bash
# bench/soak.sh — the fault soak of tests/soak.rs (issue 7) for as long as asked.
#
#   bench/soak.sh DURATION [SEED]     DURATION: seconds of faults ("600", "600s" or "10m");
#                                     SEED: default 7, the suite's fixed seed
#
# It runs the same test that `cargo test` runs for 14 s, through the real sluice binary
# (release build), with SOAK_SECS and SOAK_SEED set: mixed load (keyed and unkeyed callers,
# uploads up to 2 MiB sent with Content-Length or chunked, 512 KiB and slow streamed answers)
# while endpoints are killed and restarted on their ports, reset before and in the middle of
# a body, stall past timeouts.response (500 ms) or answer garbage; clients abort after a
# random time, in the middle of an upload and of an answer; the config is reloaded (valid and
# invalid, by POST /admin/reload and SIGHUP) and caps and queues change through the admin API.
# Then SIGTERM under load. It prints the summary (requests, faults injected by kind, answers
# by kind, endpoint peaks, gauges, RSS and fds against their baseline, the shutdown, and the
# invariant violations, which must be 0) and exits non-zero on any violation.
#
# Env knobs:
#   OUT     where the log goes (default: a new temp dir, kept); the summary is also printed
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
duration="$1"
seed="${2:-7}"
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
log="$out/soak-${secs}s-seed${seed}.log"
echo "soak: ${secs}s of faults, seed ${seed}; log in $log"
echo "soak: git rev $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

cargo build --release --tests --bin sluice >/dev/null 2>&1 || cargo build --release --tests --bin sluice
status=0
SOAK_SECS="$secs" SOAK_SEED="$seed" cargo test --release --test soak -- --nocapture \
    >"$log" 2>&1 || status=$?
grep '^soak:\|^ \{4\}' "$log" || true
if [ "$status" -ne 0 ]; then
    echo "soak: FAILED (exit $status); the whole output is in $log" >&2
fi
exit "$status"
