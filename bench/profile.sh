#!/usr/bin/env bash
# bench/profile.sh — where sluice's CPU goes per request, counted by valgrind's callgrind
# (instructions, steady on a busy or counter-less VM where `perf stat -e instructions` says
# "not supported"). Runs the scenario-1 setup (bench/conf/sluice-s1.toml: per-key limits,
# cap 20, queue) under callgrind, drives it with the bench load client, and prints
# instructions per request and the top functions, inclusive and self.
#
#   bench/profile.sh [CONFIG]        default bench/conf/sluice-s1.toml
# Env: PROF_SECS=15 (load duration), PROF_CONNS=16, PEER=1 also profiles nginx the same way
#      (instructions per request, for scale), SLUICE_BIN / LOADGEN_BIN as in run.sh (build
#      with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only for file:line in the annotations).
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
CONFIG=${1:-$BENCH/conf/sluice-s1.toml}
PROF_SECS=${PROF_SECS:-15}
PROF_CONNS=${PROF_CONNS:-16}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-prof.XXXXXX")
mkdir -p "$WORK/run" "$WORK/logs"
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v nginx >/dev/null || need+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || need+=(libnginx-mod-http-echo)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
TD=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${SLUICE_BIN:-}" ]; then
    (cd "$ROOT" && CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --quiet)
    SLUICE_BIN=$TD/release/sluice
fi
if [ -z "${LOADGEN_BIN:-}" ]; then
    (cd "$BENCH/loadgen" && CARGO_TARGET_DIR=$TD cargo build --release --quiet)
    LOADGEN_BIN=$TD/release/sluice-bench-load
fi

PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

taskset -c 1 nginx -p "$WORK/" -e logs/backends-startup.log -c "$BENCH/conf/backends.conf" >"$WORK/logs/backends.out" 2>&1 &
PIDS+=($!)
sleep 1

# profile NAME ADDR CMD...: run CMD under callgrind on cpu 0, load it, stop it, annotate
profile() {
    local name=$1 addr=$2 pid i; shift 2
    taskset -c 0 valgrind --tool=callgrind --trace-children=yes \
        --callgrind-out-file="$WORK/callgrind.$name.%p" "$@" >"$WORK/logs/$name.out" 2>&1 &
    pid=$!; PIDS+=("$pid")
    for i in $(seq 300); do
        [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' -H 'x-api-key: probe' "http://$addr/" || true)" = 200 ] && break
        sleep 0.2
    done
    taskset -c 1 "$LOADGEN_BIN" run --addr "$addr" --conns "$PROF_CONNS" --duration "$PROF_SECS" >"$WORK/load.$name.txt"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    local reqs files total
    reqs=$(sed -n 's/^RESULT .* total=\([0-9]*\).*/\1/p' "$WORK/load.$name.txt")
    files=$(ls "$WORK"/callgrind."$name".* )
    total=$(for f in $files; do sed -n 's/^summary: //p; s/^totals: //p' "$f" | head -1; done | awk '{s += $1} END {print s}')
    echo "## $name: $reqs requests in ${PROF_SECS}s under callgrind ($(grep -h '^STATUS' "$WORK/load.$name.txt" | awk '{print $2":"$3}' | paste -sd' ' -))"
    echo "instructions per request (whole process, startup and shutdown included): $(awk -v t="$total" -v r="$reqs" 'BEGIN { printf("%.0f", t / r) }')"
    for f in $files; do
        echo; echo "### $f — inclusive, top 40"
        { callgrind_annotate --inclusive=yes "$f" 2>/dev/null | sed -n '/^Ir/,$p' | head -42; } || true
        echo; echo "### $f — self, top 30"
        { callgrind_annotate "$f" 2>/dev/null | sed -n '/^Ir/,$p' | head -32; } || true
    done
}

profile sluice 127.0.0.1:8090 env SLUICE_LOG=warn "$SLUICE_BIN" run --config "$CONFIG" --workers 1
if [ "${PEER:-0}" = 1 ]; then
    profile nginx 127.0.0.1:8083 nginx -p "$WORK/" -e logs/nginx-startup.log -g "master_process off;" -c "$BENCH/conf/nginx.conf"
fi
echo; echo "callgrind files in $WORK (open with callgrind_annotate or kcachegrind)"
