#!/usr/bin/env bash
# bench/run.sh — sluice side by side with nginx and HAProxy on this machine (issue 6).
#
#   bench/run.sh [SCENARIO...]      default: every scenario (1 2 3 4 5 6 7 8 9)
#
#   1  overhead: two instant endpoints, keyed requests (wrk), req/s, p50/p99, non-2xx and
#      proxy CPU time per request, each proxy alone on one core with one worker
#   2  scoring: three 50 ms endpoints, cap 20 each, 200 closed-loop clients; admitted
#      throughput vs the Little's-law ceiling, p99 of admitted and of refused answers apart
#   3  rate accuracy: one resource at 10, 100 and 1000 TPS (burst = tps), each driven alone at
#      3x its limit by an open-loop client at a fixed rate; admitted/expected per second and
#      overall, expected = tps x duration + burst
#   4  admission micro-benchmarks: `cargo bench --bench admission` (criterion), pinned, REPS times
#   5  memory: RSS idle, with 10k open idle client connections, and with 100k tracked keys
#   6  Redis store: scenario 1's overhead run with 1000 *configured* resources (so every
#      request goes through a shared bucket) with backend = "memory" and "redis" (a
#      redis-server of its own on the load core), ratios redis/memory; then scenario 3's rate
#      accuracy with backend = "redis".
#   7  scale-out (sluice only): scenario 2's service starting with 2 endpoints (ceiling 800
#      req/s) under S7_CONNS closed-loop clients for S7_DUR s; at 1/3 of the run 2 endpoints
#      join through the admin API (ceiling 1600), at 2/3 one of them leaves (1200). 2xx per
#      second vs the ceiling in each phase, how soon it follows a change, non-2xx by status,
#      and the capacity GET /admin/capacity reports after each change.
#   8  overload: scenario 2 with a fourth endpoint that, for the middle third of each run,
#      answers 503 with Retry-After: 10 at once (an overloaded model server); S8_CONNS
#      closed-loop clients POSTing a small JSON body; sluice (default [service.overload]) vs
#      nginx (proxy_next_upstream http_503 http_429 non_idempotent, max_fails=1 fail_timeout=10s)
#      vs HAProxy (retry-on 503, retries 2, redispatch, observe layer7 + on-error mark-down).
#      2xx per second in each phase vs its ceiling, non-2xx by status, the requests the
#      endpoints received (counted in their access log) per client request, and how soon the
#      endpoint served again after it recovered.
#   9  idle connections and memory return (issue 18), sluice vs nginx vs HAProxy, one worker
#      each, scenario 5's configs (RSS of the proxy's processes, as scenario 5): KiB per idle
#      connection held after one request, HOLD_CONNS of them, over HTTP/1.1 keep-alive and over
#      HTTP/2 with prior knowledge (h2c: sluice and HAProxy on scenario 5's listener, nginx on
#      a listener of its own); burst and return: RSS before, with the HOLD_CONNS HTTP/1.1
#      connections open, then 0, 5, 10, ... 30 s after they all close, and whether it is back
#      within 10 % of before; large-then-idle: S9_BIG_CONNS connections that each sent one
#      S9_HEAD_BYTES head and got a 1 MiB body, then idle (nginx and HAProxy with limits raised
#      for such a head: nginx.conf's 8382, haproxy-s9-large.cfg; sluice's default 64 KiB takes it)
#      Each connection's one request carries one of 1000 rotating keys, S9_BATCH requests in
#      flight at most: all admitted and proxied (the load client's statuses are in the table).
#
# Env knobs:
#   DUR=10        seconds per measured run (scenarios 1 and 2; "10s" accepted)
#   REPS=3        repetitions, interleaved (every target once per rep, rotating the order)
#   CONNS=64      wrk connections in scenario 1 (THREADS=2 wrk threads)
#   S1_TARGETS    default "direct nginx nginx-nocap haproxy sluice sluice-nolimit sluice-noqueue
#                 sluice-cap200" (what each is: the comments at the top of bench/conf/*)
#   S2_CONNS=200  clients in scenario 2;  S2_BACKOFFS="0 50": ms a client waits after a
#                 refusal before its next request, jittered ±50 % (0 = retry at once, a 429 storm)
#   S2_TARGETS    default "sluice sluice-queue nginx haproxy"
#   S3_LIMITS="10 100 1000"  TPS limits in scenario 3; S3_DUR=30 seconds per run; S3_FACTOR=3
#                 (driven at S3_FACTOR x the limit)
#   BENCH_SRC     source tree scenario 4 runs `cargo bench` in (default: this one)
#   HOLD_CONNS=10000  idle connections in scenario 5; S5_TARGETS default "sluice nginx haproxy"
#   S5_KEYS=100000    distinct keys sent through sluice for the tracked-keys figure (0: skip)
#   S6_REDIS_PORT=6399  the redis-server scenario 6 starts for itself
#   S7_DUR=30     seconds per scenario-7 run (changes at 1/3 and 2/3 of it); S7_CONNS=200 clients
#   S7_BACKOFFS="0 50"  as S2_BACKOFFS, for scenario 7;  S7_TICK_MS=100  the load client's
#                 counting interval (must divide 1000): per second figures are sums of ticks,
#                 the time to follow a change is measured in ticks
#   S8_DUR=21     seconds per scenario-8 run (the 4th endpoint full from 1/3 to 2/3 of it);
#                 S8_CONNS=200 clients; S8_BACKOFFS="0 50" as S2_BACKOFFS; S8_TICK_MS=100 as S7_TICK_MS
#   S8_TARGETS    default "sluice nginx haproxy"
#   S8_BODY       the JSON body each scenario-8 request POSTs (default: 110 bytes; empty: GET)
#   S9_TARGETS    default "sluice nginx haproxy";  HOLD_CONNS (above) connections for the idle and
#                 burst figures;  S9_BIG_CONNS=2000 large-then-idle connections;  S9_HEAD_BYTES=61440
#                 their request head;  S9_BATCH=20 connections opened (one request each) at a
#                 time: no more than the services' 20 concurrent requests, so none is refused
#   WARMUP=2      seconds of warm-up per target before the reps (0: none)
#   PIN=1         proxy alone on PROXY_CPU=0, load generator + endpoints on LOAD_CPU=1
#   SLUICE_BIN    use this sluice binary instead of building (cargo build --release)
#   LOADGEN_BIN   use this bench/loadgen binary instead of building it
#   OUT           where result tables and raw rows go (default: a new temp dir, kept)
#   NO_INSTALL=1  do not apt-get install missing tools
#   QUIET=1       before each measured run, wait (QUIET_MAX=60 s at most) until the machine is
#                 idle (< QUIET_BUSY=10 % CPU over 1 s): other work on a shared box skews
#                 results; a run that starts busy is logged and counted in the report
#
# Everything listens and connects on 127.0.0.1. Every process started here is stopped on exit.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
CONF=$BENCH/conf

DUR=${DUR:-10}; DUR=${DUR%s}
REPS=${REPS:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
KEYS=${KEYS:-1000}
WARMUP=${WARMUP:-2}
PIN=${PIN:-1}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
S1_TARGETS=${S1_TARGETS:-"direct nginx nginx-nocap haproxy sluice sluice-nolimit sluice-noqueue sluice-cap200"}
S2_TARGETS=${S2_TARGETS:-"sluice sluice-queue nginx haproxy"}
S2_CONNS=${S2_CONNS:-200}
S2_BACKOFFS=${S2_BACKOFFS:-"0 50"}
S5_TARGETS=${S5_TARGETS:-"sluice nginx haproxy"}
HOLD_CONNS=${HOLD_CONNS:-10000}
S3_LIMITS=${S3_LIMITS:-"10 100 1000"}
S3_DUR=${S3_DUR:-30}; S3_DUR=${S3_DUR%s}
S3_FACTOR=${S3_FACTOR:-3}
S5_KEYS=${S5_KEYS:-100000}
S6_REDIS_PORT=${S6_REDIS_PORT:-6399}
S7_DUR=${S7_DUR:-30}; S7_DUR=${S7_DUR%s}
S7_CONNS=${S7_CONNS:-200}
S7_BACKOFFS=${S7_BACKOFFS:-"0 50"}
S7_TICK_MS=${S7_TICK_MS:-100}
S8_DUR=${S8_DUR:-21}; S8_DUR=${S8_DUR%s}
S8_TICK_MS=${S8_TICK_MS:-100}
S8_CONNS=${S8_CONNS:-200}
S8_BACKOFFS=${S8_BACKOFFS:-"0 50"}
S8_TARGETS=${S8_TARGETS:-"sluice nginx haproxy"}
S9_TARGETS=${S9_TARGETS:-"sluice nginx haproxy"}
S9_BIG_CONNS=${S9_BIG_CONNS:-2000}
S9_BATCH=${S9_BATCH:-20}
S9_HEAD_BYTES=${S9_HEAD_BYTES:-61440}
S8_BODY=${S8_BODY-'{"inputs":[{"name":"features","shape":[1,8],"datatype":"FP32","data":[0.12,0.5,0.33,0.9,0.01,0.77,0.42,0.6]}]}'}
BENCH_SRC=${BENCH_SRC:-$ROOT}
CEILING=1200   # 3 endpoints x 20 slots x 1000 ms / 50 ms (scenario 8: its 3 healthy ones)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
OUT=${OUT:-$WORK/results}
mkdir -p "$WORK/run" "$WORK/logs" "$OUT"
CLK_TCK=$(getconf CLK_TCK)

log() { printf '%s\n' "$*" >&2; }
die() { log "bench: $*"; exit 1; }

# ---------------------------------------------------------------- processes we own
PIDS=()
LAST_PID=
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pinned() { # pinned CPU CMD...: run CMD on CPU when pinning
    local cpu=$1; shift
    if [ "$PIN" = 1 ]; then taskset -c "$cpu" "$@"; else "$@"; fi
}

start() { # start NAME CPU CMD...: start in the background; its pid in LAST_PID
    local name=$1 cpu=$2 pre=(); shift 2
    # a plain command, not a function: $! is then the process itself (taskset execs it)
    [ "$PIN" = 1 ] && pre=(taskset -c "$cpu")
    "${pre[@]}" "$@" >"$WORK/logs/$name.out" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

stop() { # stop PID...: TERM, wait (5 s at most), then KILL
    local p i
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for p in "$@"; do
        for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    local keep=() q
    for q in "${PIDS[@]}"; do
        for p in "$@"; do [ "$q" = "$p" ] && continue 2; done
        keep+=("$q")
    done
    PIDS=("${keep[@]}")
}

tree() { echo "$1"; pgrep -P "$1" || true; } # a pid and its children (nginx's workers)

cpu_ticks() { # utime+stime of a process tree, all threads included, in clock ticks
    local p t=0 v
    for p in $(tree "$1"); do
        v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk "{print ${2:-\$12 + \$13}}") || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
user_ticks() { cpu_ticks "$1" '$12'; } # utime alone: the process's own code, not the kernel's

rss_kib() { # resident memory of a process tree
    local p t=0 v
    for p in $(tree "$1"); do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

wait_up() { # wait_up ADDR NAME: until it answers 200 (10 s at most)
    local i code
    for i in $(seq 100); do
        code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' -H 'x-api-key: probe' "http://$1/" || true)
        [ "$code" = 200 ] && return 0
        sleep 0.1
    done
    die "$2 on $1 never answered 200 (last: $code); logs in $WORK/logs"
}

# wait_quiet: until CPU use over one second is under QUIET_BUSY % (QUIET_MAX s at most)
NOISY=0
wait_quiet() {
    [ "${QUIET:-1}" = 1 ] || return 0
    local waited=0 busy
    while :; do
        busy=$(
            { head -1 /proc/stat; sleep 1; head -1 /proc/stat; } | awk '
                { idle = $5 + $6; tot = 0; for (i = 2; i <= NF; i++) tot += $i
                  if (NR == 1) { i0 = idle; t0 = tot } else printf("%d\n", 100 * (1 - (idle - i0) / (tot - t0))) }')
        [ "$busy" -lt "${QUIET_BUSY:-10}" ] && return 0
        waited=$((waited + 1))
        if [ "$waited" -ge "${QUIET_MAX:-60}" ]; then
            log "bench: machine still ${busy}% busy after ${waited}s: measuring anyway"
            NOISY=$((NOISY + 1)); return 0
        fi
    done
}

# ---------------------------------------------------------------- setup
install_tools() {
    local need=()
    command -v wrk >/dev/null || need+=(wrk)
    command -v nginx >/dev/null || need+=(nginx-light)
    [ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || need+=(libnginx-mod-http-echo)
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v curl >/dev/null || need+=(curl)
    command -v taskset >/dev/null || need+=(util-linux)
    command -v pgrep >/dev/null || need+=(procps)
    command -v ss >/dev/null || need+=(iproute2)
    command -v redis-server >/dev/null || need+=(redis-server)
    [ ${#need[@]} -eq 0 ] && return 0
    [ "${NO_INSTALL:-0}" = 1 ] && die "missing: ${need[*]} (NO_INSTALL=1)"
    log "bench: installing ${need[*]}"
    local sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >&2
    # Debian starts a packaged nginx/haproxy service where it can; ours use their own ports,
    # so a system one does not get in the way and is left alone.
}

build() {
    local target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
    [ -n "${SLUICE_BIN:-}" ] && SLUICE_GIVEN=1
    if [ -z "${SLUICE_BIN:-}" ]; then
        log "bench: cargo build --release (sluice)"
        (cd "$ROOT" && cargo build --release --quiet) >&2
        SLUICE_BIN=$target_dir/release/sluice
    fi
    if [ -z "${LOADGEN_BIN:-}" ]; then
        log "bench: cargo build --release (bench/loadgen)"
        (cd "$BENCH/loadgen" && CARGO_TARGET_DIR=$target_dir cargo build --release --quiet) >&2
        LOADGEN_BIN=$target_dir/release/sluice-bench-load
    fi
    [ -x "$SLUICE_BIN" ] || die "no sluice binary at $SLUICE_BIN"
    [ -x "$LOADGEN_BIN" ] || die "no load client at $LOADGEN_BIN"
}

start_backends() {
    start backends "$LOAD_CPU" nginx -p "$WORK/" -e logs/backends-startup.log -c "$CONF/backends.conf"
    BACKENDS_PID=$LAST_PID
    wait_up 127.0.0.1:9001 backend
    wait_up 127.0.0.1:9011 backend-50ms
    # an nginx that could not bind its ports has exited: whatever answered above is not ours
    kill -0 "$BACKENDS_PID" 2>/dev/null || die "the backends' nginx exited (ports in use?): $(head -3 "$WORK/logs/backends.out")"
}

# start_proxy KIND CONFIG: pinned alone on the proxy core; pid in LAST_PID. CONFIG is a file
# in bench/conf, or an absolute path (generated configs).
start_proxy() {
    local kind=$1 cfg=$2 path
    case $cfg in /*) path=$cfg ;; *) path=$CONF/$cfg ;; esac
    case $kind in
        nginx) start "nginx" "$PROXY_CPU" nginx -p "$WORK/" -e logs/nginx-startup.log -c "$CONF/$cfg" ;;
        haproxy) start "haproxy" "$PROXY_CPU" haproxy -db -f "$CONF/$cfg" ;;
        sluice) start "sluice-$(basename "${cfg%.toml}")" "$PROXY_CPU" env SLUICE_LOG=warn \
            "$SLUICE_BIN" run --config "$path" --workers 1 ;;
    esac
}

versions() {
    local rev from
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ -n "${SLUICE_REV:-}" ]; then from="git rev $SLUICE_REV"
    elif [ -n "${SLUICE_GIVEN:-}" ]; then from="a given SLUICE_BIN (work tree at git rev $rev)"
    else
        from="git rev $rev"
        [ -n "$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] &&
            from="$from plus uncommitted changes"
    fi
    echo "- machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, kernel $(uname -r)"
    echo "- sluice: $("$SLUICE_BIN" --version 2>/dev/null || echo '?'), built from $from"
    echo "- nginx $(nginx -v 2>&1 | sed 's/^nginx version: nginx.//'), HAProxy $(haproxy -v | head -1 | awk '{print $3}'), wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "- pinning: $([ "$PIN" = 1 ] && echo "proxy alone on cpu $PROXY_CPU, load generator + endpoints on cpu $LOAD_CPU" || echo off); DUR=${DUR}s REPS=$REPS"
}

# ---------------------------------------------------------------- statistics
# stat FILE KEYCOLS KEY COL: "median min max" of column COL over the rows whose first
# KEYCOLS columns, joined by a space, equal KEY
stat() {
    awk -v kc="$2" -v key="$3" -v col="$4" '
        NR > 1 { k = $1; for (i = 2; i <= kc; i++) k = k " " $i; if (k == key && $col != "-") v[++n] = $col + 0 }
        END {
            if (n == 0) { print "- - -"; exit }
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
            med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
            print med, v[1], v[n]
        }' "$1"
}

fmt() { # fmt DECIMALS "median min max" -> "median (min–max)"
    awk -v d="$1" -v s="$2" 'BEGIN {
        split(s, a, " "); if (a[1] == "-") { print "-"; exit }
        f = "%." d "f"
        if (a[2] == a[3]) printf(f "\n", a[1]); else printf(f " (" f "–" f ")\n", a[1], a[2], a[3]) }'
}

ratio() { # ratio A B -> A/B with two decimals, "-" if either is missing
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf("%.2f\n", a / b) }'
}

median() { stat "$@" | awk '{print $1}'; }

# ---------------------------------------------------------------- scenario 1: overhead
scenario1() {
    local rows=$OUT/s1.tsv
    declare -A addr=([direct]=127.0.0.1:9001 [nginx]=127.0.0.1:8080 [nginx-nocap]=127.0.0.1:8083
        [haproxy]=127.0.0.1:8081 [sluice]=127.0.0.1:8090 [sluice-noqueue]=127.0.0.1:8091
        [sluice-cap200]=127.0.0.1:8092 [sluice-nolimit]=127.0.0.1:8093)
    declare -A pid=([direct]=-)
    local started=() t
    local targets=($S1_TARGETS)
    for t in "${targets[@]}"; do [ -n "${addr[$t]:-}" ] || die "scenario 1: unknown target $t"; done
    if [[ " $S1_TARGETS " =~ " nginx"(-nocap)?" " ]]; then
        start_proxy nginx nginx.conf; started+=("$LAST_PID"); pid[nginx]=$LAST_PID; pid[nginx-nocap]=$LAST_PID
    fi
    if [[ " $S1_TARGETS " == *" haproxy "* ]]; then
        start_proxy haproxy haproxy.cfg; started+=("$LAST_PID"); pid[haproxy]=$LAST_PID
    fi
    for t in sluice sluice-nolimit sluice-noqueue sluice-cap200; do
        [[ " $S1_TARGETS " == *" $t "* ]] || continue
        local cfg=sluice-s1${t#sluice}.toml
        start_proxy sluice "$cfg"; started+=("$LAST_PID"); pid[$t]=$LAST_PID
    done
    for t in "${targets[@]}"; do wait_up "${addr[$t]}" "$t"; done

    run_wrk() { # run_wrk ADDR SECONDS -> WRK line
        pinned "$LOAD_CPU" timeout $(($2 + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$2s" --timeout 2s \
            -s "$BENCH/wrk/keys.lua" "http://$1/" -- "$KEYS" | grep '^WRK' ||
            echo "WRK requests=0 rps=0 p50_ms=0 p99_ms=0 non2xx=0 sockerr=-1"
    }
    if [ "$WARMUP" -gt 0 ]; then
        log "scenario 1: warm-up ${WARMUP}s per target"
        for t in "${targets[@]}"; do run_wrk "${addr[$t]}" "$WARMUP" >/dev/null; done
    fi
    echo "target rep requests rps p50_ms p99_ms non2xx sockerr cpu_us_per_req user_us_per_req" >"$rows"
    local rep i n=${#targets[@]} line c0 c1 u0 u1 reqs cpu user
    per_req() { # per_req PID TICKS REQUESTS -> µs per request
        awk -v p="$1" -v d="$2" -v hz="$CLK_TCK" -v r="$3" \
            'BEGIN { if (p == "-" || r == 0) print "-"; else printf("%.2f\n", d / hz * 1e6 / r) }'
    }
    for rep in $(seq "$REPS"); do
        for i in $(seq 0 $((n - 1))); do
            t=${targets[$(((i + rep - 1) % n))]}
            wait_quiet
            c0=$([ "${pid[$t]}" = - ] && echo 0 || cpu_ticks "${pid[$t]}")
            u0=$([ "${pid[$t]}" = - ] && echo 0 || user_ticks "${pid[$t]}")
            line=$(run_wrk "${addr[$t]}" "$DUR")
            c1=$([ "${pid[$t]}" = - ] && echo 0 || cpu_ticks "${pid[$t]}")
            u1=$([ "${pid[$t]}" = - ] && echo 0 || user_ticks "${pid[$t]}")
            reqs=$(sed 's/.*requests=\([0-9]*\).*/\1/' <<<"$line")
            cpu=$(per_req "${pid[$t]}" $((c1 - c0)) "$reqs")
            user=$(per_req "${pid[$t]}" $((u1 - u0)) "$reqs")
            echo "$t $rep $(sed 's/^WRK //; s/[a-z0-9_]*=//g' <<<"$line") $cpu $user" >>"$rows"
            log "scenario 1 rep $rep/$REPS $t: $line cpu_us_per_req=$cpu user_us_per_req=$user"
            sleep 1
        done
    done
    stop "${started[@]}"

    {
        echo "### Scenario 1 — overhead (wrk -t$THREADS -c$CONNS -d${DUR}s, $KEYS rotating x-api-key values, median (min–max) over $REPS interleaved reps)"
        echo
        echo "| target | req/s | p50 ms | p99 ms | non-2xx per run | proxy CPU µs/req | of which user space µs/req |"
        echo "|---|---|---|---|---|---|---|"
        for t in "${targets[@]}"; do
            echo "| $t | $(fmt 0 "$(stat "$rows" 1 "$t" 4)") | $(fmt 3 "$(stat "$rows" 1 "$t" 5)") | $(fmt 3 "$(stat "$rows" 1 "$t" 6)") | $(fmt 0 "$(stat "$rows" 1 "$t" 7)") | $(fmt 2 "$(stat "$rows" 1 "$t" 9)") | $(fmt 2 "$(stat "$rows" 1 "$t" 10)") |"
        done
        echo
        echo "Ratios of medians (target: CPU/req ≤ 0.80 × nginx's, req/s ≥ 1.00 ×, p99 ≤ 1.00 ×):"
        echo
        echo "| ratio | req/s | p99 | CPU µs/req | user space µs/req |"
        echo "|---|---|---|---|---|"
        local s p
        for s in sluice sluice-nolimit sluice-noqueue sluice-cap200; do
            [[ " $S1_TARGETS " == *" $s "* ]] || continue
            for p in nginx-nocap nginx haproxy; do
                [[ " $S1_TARGETS " == *" $p "* ]] || continue
                echo "| $s / $p | $(ratio "$(median "$rows" 1 "$s" 4)" "$(median "$rows" 1 "$p" 4)") | $(ratio "$(median "$rows" 1 "$s" 6)" "$(median "$rows" 1 "$p" 6)") | $(ratio "$(median "$rows" 1 "$s" 9)" "$(median "$rows" 1 "$p" 9)") | $(ratio "$(median "$rows" 1 "$s" 10)" "$(median "$rows" 1 "$p" 10)") |"
            done
        done
        echo
    } | tee "$OUT/s1.md"
}

# ---------------------------------------------------------------- scenario 2: scoring
# The report's line for clients that wait B ms after a refusal (0: retry at once), with NOTE
# after "at once".
backoff_line() { # backoff_line B [NOTE]
    if [ "$1" = 0 ]; then echo "Clients retry a refused request at once${2:-}:"
    else echo "Clients wait $1 ms on average (drawn uniformly from $(($1 / 2))–$(($1 * 3 / 2)) ms) after a refused request before the next one:"; fi
}

scenario2() {
    local rows=$OUT/s2.tsv
    declare -A addr=([sluice]=127.0.0.1:8190 [sluice-queue]=127.0.0.1:8191 [nginx]=127.0.0.1:8180
        [haproxy]=127.0.0.1:8181)
    declare -A pid=()
    local started=() t
    local targets=($S2_TARGETS)
    for t in "${targets[@]}"; do
        [ -n "${addr[$t]:-}" ] || die "scenario 2: unknown target $t"
        case $t in
            nginx) start_proxy nginx nginx.conf ;;
            haproxy) start_proxy haproxy haproxy.cfg ;;
            sluice) start_proxy sluice sluice-s2.toml ;;
            sluice-queue) start_proxy sluice sluice-s2-queue.toml ;;
        esac
        started+=("$LAST_PID"); pid[$t]=$LAST_PID
    done
    for t in "${targets[@]}"; do wait_up "${addr[$t]}" "$t"; done

    run_load() { # run_load ADDR SECONDS BACKOFF_MS -> loadgen output
        pinned "$LOAD_CPU" timeout $(($2 + 30)) "$LOADGEN_BIN" run --addr "$1" --conns "$S2_CONNS" \
            --duration "$2" --keys "$KEYS" --backoff-ms "$3" || true
    }
    if [ "$WARMUP" -gt 0 ]; then
        log "scenario 2: warm-up ${WARMUP}s per target"
        for t in "${targets[@]}"; do run_load "${addr[$t]}" "$WARMUP" 0 >/dev/null; done
    fi
    echo "target backoff rep total_rps ok_rps ok_p50 ok_p99 ref_rps ref_p50 ref_p99 ref_codes errors cpu_us_per_req ok_of_ceiling" >"$rows"
    local rep b i n=${#targets[@]} out c0 c1 total cpu
    for rep in $(seq "$REPS"); do
        for b in $S2_BACKOFFS; do
            for i in $(seq 0 $((n - 1))); do
                t=${targets[$(((i + rep - 1) % n))]}
                wait_quiet
                c0=$(cpu_ticks "${pid[$t]}")
                out=$(run_load "${addr[$t]}" "$DUR" "$b")
                c1=$(cpu_ticks "${pid[$t]}")
                echo "$out" >"$OUT/s2-raw-$t-b$b-r$rep.txt"
                total=$(sed -n 's/^RESULT .* total=\([0-9]*\).*/\1/p' <<<"$out"); total=${total:-0}
                cpu=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v r="$total" \
                    'BEGIN { if (r == 0) print "-"; else printf("%.2f\n", d / hz * 1e6 / r) }')
                awk -v t="$t" -v b="$b" -v rep="$rep" -v cpu="$cpu" -v ceil="$CEILING" '
                    function val(line, k,   m) { if (match(line, k "=[^ ]*")) return substr(line, RSTART + length(k) + 1, RLENGTH - length(k) - 1); return "-" }
                    /^RESULT/ { trps = val($0, "rps"); err = val($0, "errors") }
                    /^CLASS ok/ { orps = val($0, "rps"); o50 = val($0, "p50_ms"); o99 = val($0, "p99_ms"); oc = val($0, "count") }
                    /^CLASS refused/ { rrps = val($0, "rps"); r50 = val($0, "p50_ms"); r99 = val($0, "p99_ms"); codes = val($0, "codes"); rc = val($0, "count") }
                    END {
                        if (trps == "") { trps = 0; err = -1 }
                        if (oc == 0) { o50 = "-"; o99 = "-" }
                        if (rc == 0) { r50 = "-"; r99 = "-" }
                        printf("%s %s %s %s %s %s %s %s %s %s %s %s %s %.3f\n", t, b, rep, trps, orps, o50, o99, rrps, r50, r99, codes, err, cpu, orps / ceil)
                    }' <<<"$out" >>"$rows"
                log "scenario 2 rep $rep/$REPS backoff ${b}ms $t: $(tail -1 "$rows")"
                sleep 1
            done
        done
    done
    stop "${started[@]}"

    {
        echo "### Scenario 2 — scoring (3 endpoints × 50 ms, cap 20 each, $S2_CONNS closed-loop clients, ${DUR}s runs, median (min–max) over $REPS interleaved reps)"
        echo
        echo "Little's-law ceiling: 3 × 20 × 1000 / 50 = $CEILING req/s. \"refused\" = every non-2xx answer (codes listed)."
        for b in $S2_BACKOFFS; do
            echo
            backoff_line "$b" " (a refusal storm: the proxy core is saturated)"
            echo
            echo "| target | admitted req/s | admitted / ceiling | admitted p50 ms | admitted p99 ms | refused req/s | refused p50 ms | refused p99 ms | codes | proxy CPU µs/answer |"
            echo "|---|---|---|---|---|---|---|---|---|---|"
            for t in "${targets[@]}"; do
                local codes
                codes=$(awk -v t="$t" -v b="$b" '$1 == t && $2 == b {print $11}' "$rows" | sort -u | paste -sd, -)
                echo "| $t | $(fmt 0 "$(stat "$rows" 2 "$t $b" 5)") | $(fmt 3 "$(stat "$rows" 2 "$t $b" 14)") | $(fmt 1 "$(stat "$rows" 2 "$t $b" 6)") | $(fmt 1 "$(stat "$rows" 2 "$t $b" 7)") | $(fmt 0 "$(stat "$rows" 2 "$t $b" 8)") | $(fmt 3 "$(stat "$rows" 2 "$t $b" 9)") | $(fmt 3 "$(stat "$rows" 2 "$t $b" 10)") | $codes | $(fmt 2 "$(stat "$rows" 2 "$t $b" 13)") |"
            done
        done
        echo
    } | tee "$OUT/s2.md"
}

# ---------------------------------------------------------------- scenario 3: rate accuracy
# One sluice (sluice-s3.toml) with a resource per limit; each run drives one resource alone with
# `loadgen rate` (open loop: request k leaves at start + k/rate whatever the answers) at
# S3_FACTOR x its limit for S3_DUR s, and counts 2xx per second of send time. Expected admitted:
# tps x S3_DUR + burst overall; tps + burst in second 0 (the full bucket), tps in each later one.
# scenario3 [CONFIG ADDR NAME TITLE]: by default sluice-s3.toml in memory; scenario 6 passes its
# Redis-backed copy.
scenario3() {
    local cfg=${1:-sluice-s3.toml} addr=${2:-127.0.0.1:8390} name=${3:-s3} title=${4:-"Scenario 3 — rate accuracy"}
    local rows=$OUT/$name.tsv secrows=$OUT/$name-seconds.tsv p
    local limits=($S3_LIMITS) n rep i tps rps out
    start_proxy sluice "$cfg"
    p=$LAST_PID
    wait_up "$addr" "sluice-$name"
    for tps in "${limits[@]}"; do
        grep -q "key = \"s3-key-$tps\"" "$CONF/sluice-s3.toml" || die "scenario 3: no resource for $tps TPS in sluice-s3.toml"
    done
    echo "tps rep rps sent ok refused errors expected ok_of_expected sec0_ok sec0_of_expected lag_p99_ms lag_max_ms conns_opened" >"$rows"
    echo "tps rep sec sent ok expected ok_of_expected" >"$secrows"
    n=${#limits[@]}
    for rep in $(seq "$REPS"); do
        for i in $(seq 0 $((n - 1))); do
            tps=${limits[$(((i + rep - 1) % n))]}
            rps=$((tps * S3_FACTOR))
            wait_quiet
            sleep 2 # the bucket of the previous run of this resource is full again after burst/tps = 1 s
            out=$(pinned "$LOAD_CPU" timeout $((S3_DUR + 30)) "$LOADGEN_BIN" rate --addr "$addr" --rps "$rps" \
                --duration "$S3_DUR" --header "x-api-key:s3-key-$tps" || true)
            echo "$out" >"$OUT/$name-raw-$tps-r$rep.txt"
            awk -v tps="$tps" -v rep="$rep" -v dur="$S3_DUR" -v rows="$rows" -v secrows="$secrows" '
                function val(line, k) { if (match(line, k "=[^ ]*")) return substr(line, RSTART + length(k) + 1, RLENGTH - length(k) - 1); return 0 }
                /^RATE/ { rps = val($0, "rps"); sent = val($0, "sent"); ok = val($0, "ok"); ref = val($0, "refused")
                          err = val($0, "errors"); l99 = val($0, "lag_p99_ms"); lmax = val($0, "lag_max_ms"); conns = val($0, "conns_opened") }
                /^SEC/ { s = $2; if (s >= dur) next   # answers counted by send time: only full seconds
                         e = (s == 0) ? 2 * tps : tps; sok = val($0, "ok"); if (s == 0) s0 = sok
                         printf("%s %s %s %s %s %s %.4f\n", tps, rep, s, val($0, "sent"), sok, e, sok / e) >> secrows }
                END {
                    expct = tps * dur + tps
                    printf("%s %s %s %s %s %s %s %s %.4f %s %.4f %s %s %s\n", tps, rep, rps, sent + 0, ok + 0, ref + 0, err + 0, expct, ok / expct, s0 + 0, s0 / (2 * tps), l99, lmax, conns) >> rows
                }' <<<"$out"
            log "$title rep $rep/$REPS ${tps} TPS at ${rps}/s: $(tail -1 "$rows")"
        done
    done
    stop "$p"

    {
        echo "### $title (one resource, burst = tps, driven open-loop at ${S3_FACTOR}× its limit for ${S3_DUR}s; $REPS reps)"
        echo
        echo "Expected admitted: tps × ${S3_DUR} + burst overall; per second of send time, tps + burst in second 0 and tps after."
        echo "Overall: median (min–max) over reps. Per second: min / median / max over every second of every rep."
        echo
        echo "| limit TPS | sent req/s | admitted (median rep) | expected | admitted / expected overall | per second: min | median | max | second 0 / (tps + burst) | per second, seconds 1–$((S3_DUR - 1)): min | max | client lag p99 / max ms |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
        local tps
        for tps in "${limits[@]}"; do
            local all steady
            all=$(awk -v t="$tps" 'NR > 1 && $1 == t { print $7 }' "$secrows" | sort -g | awk '{ v[NR] = $1 } END { if (NR) printf("%.3f %.3f %.3f", v[1], (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2, v[NR]); else print "- - -" }')
            steady=$(awk -v t="$tps" 'NR > 1 && $1 == t && $3 > 0 { print $7 }' "$secrows" | sort -g | awk '{ v[NR] = $1 } END { if (NR) printf("%.3f %.3f", v[1], v[NR]); else print "- -" }')
            read -r amin amed amax <<<"$all"
            read -r smin smax <<<"$steady"
            echo "| $tps | $((tps * S3_FACTOR)) | $(fmt 0 "$(stat "$rows" 1 "$tps" 5)") | $((tps * S3_DUR + tps)) | $(fmt 4 "$(stat "$rows" 1 "$tps" 9)") | $amin | $amed | $amax | $(fmt 3 "$(stat "$rows" 1 "$tps" 11)") | $smin | $smax | $(fmt 2 "$(stat "$rows" 1 "$tps" 12)") / $(fmt 2 "$(stat "$rows" 1 "$tps" 13)") |"
        done
        echo
    } | tee "$OUT/$name.md"
}

# ---------------------------------------------------------------- scenario 4: micro-benchmarks
# `cargo bench --bench admission` (bench/admission.rs), pinned on the proxy core, REPS times;
# the table holds criterion's point estimate (the middle of its [low est high]) per run.
scenario4() {
    local rows=$OUT/s4.tsv rep out
    log "scenario 4: cargo bench --no-run (in $BENCH_SRC)"
    (cd "$BENCH_SRC" && cargo bench --bench admission --no-run --quiet) >&2
    echo "bench rep ns" >"$rows"
    for rep in $(seq "$REPS"); do
        wait_quiet
        out=$(cd "$BENCH_SRC" && pinned "$PROXY_CPU" cargo bench --quiet --bench admission 2>&1) ||
            { log "$out"; die "scenario 4: cargo bench failed"; }
        echo "$out" >"$OUT/s4-raw-r$rep.txt"
        awk -v rep="$rep" '
            function ns(v, unit) { return unit == "ps" ? v / 1000 : unit == "ns" ? v : (unit == "µs" || unit == "us") ? v * 1000 : unit == "ms" ? v * 1e6 : v * 1e9 }
            /time:/ {
                name = ($1 == "time:") ? prev : $1
                sub(/.*time: *\[/, ""); split($0, a, " ")
                printf("%s %s %.2f\n", name, rep, ns(a[3], a[4]))
            }
            NF && !/time:/ { prev = $1 }' <<<"$out" >>"$rows"
        log "scenario 4 rep $rep/$REPS: $(awk -v r="$rep" '$2 == r { printf("%s=%s ", $1, $3) }' "$rows")"
    done
    {
        echo "### Scenario 4 — admission micro-benchmarks (criterion, \`cargo bench --bench admission\`, pinned on cpu $PROXY_CPU; ns per operation, median (min–max) of criterion's estimate over $REPS runs)"
        echo
        echo "| benchmark | ns |"
        echo "|---|---|"
        awk 'NR > 1 && !seen[$1]++ { print $1 }' "$rows" | while read -r b; do
            echo "| \`$b\` | $(fmt 1 "$(stat "$rows" 1 "$b" 3)") |"
        done
        echo
    } | tee "$OUT/s4.md"
}

# ---------------------------------------------------------------- scenario 5: memory
# hold_idle NAME PID ADDR CONNS [HOLD ARGS...]: RSS of the proxy PID (its workers included)
# before, and with CONNS client connections to ADDR that the load client holds idle after one
# request each (bench/loadgen `hold`, HOLD ARGS passed on). Sets HOLD_IDLE and HOLD_FULL (KiB),
# HOLD_EST (connections established on ADDR's port, counted by ss), HOLD_HELD (the ones the
# load client kept), HOLD_LINE (its HELD line) and HOLD_PID: the holder, still holding, for
# the caller to stop. (Scenarios 5 and 9.)
hold_idle() {
    local name=$1 p=$2 addr=$3 conns=$4 log=$WORK/logs/hold-$1.out; shift 4
    sleep 1
    HOLD_IDLE=$(rss_kib "$p")
    start "hold-$name" "$LOAD_CPU" "$LOADGEN_BIN" hold --addr "$addr" --conns "$conns" "$@"
    HOLD_PID=$LAST_PID
    for _ in $(seq 1200); do grep -q '^HELD' "$log" && break; sleep 0.1; done
    HOLD_LINE=$(grep -m1 '^HELD' "$log" || echo "HELD 0 (no answer from the load client in 120 s)")
    HOLD_HELD=$(sed -n 's/^HELD \([0-9]*\).*/\1/p' "$log"); HOLD_HELD=${HOLD_HELD:-0}
    sleep 2
    HOLD_FULL=$(rss_kib "$p")
    HOLD_EST=$(ss -Htn state established "( sport = :${addr##*:} )" | wc -l)
}

scenario5() {
    local rows=$OUT/s5.tsv
    declare -A addr=([sluice]=127.0.0.1:8290 [nginx]=127.0.0.1:8280 [haproxy]=127.0.0.1:8281)
    echo "target rss_idle_kib rss_held_kib established held rss_after_kib" >"$rows"
    local t p held est idle full after
    for t in $S5_TARGETS; do
        [ -n "${addr[$t]:-}" ] || die "scenario 5: unknown target $t"
        case $t in
            nginx) start_proxy nginx nginx.conf ;;
            haproxy) start_proxy haproxy haproxy.cfg ;;
            sluice) start_proxy sluice sluice-s5.toml ;;
        esac
        p=$LAST_PID
        wait_up "${addr[$t]}" "$t"
        hold_idle "$t" "$p" "${addr[$t]}" "$HOLD_CONNS"
        idle=$HOLD_IDLE full=$HOLD_FULL est=$HOLD_EST held=$HOLD_HELD
        stop "$HOLD_PID"
        sleep 2
        after=$(rss_kib "$p")
        stop "$p"
        echo "$t $idle $full $est $held $after" >>"$rows"
        log "scenario 5 $t: idle ${idle} KiB, ${full} KiB with $est established ($held held), ${after} KiB after closing"
    done
    {
        echo "### Scenario 5 — memory (RSS of the proxy's processes, one worker each)"
        echo
        echo "| target | RSS idle MiB | RSS with $HOLD_CONNS idle client connections MiB | connections open at the measure | KiB per connection | RSS after they close MiB |"
        echo "|---|---|---|---|---|---|"
        awk 'NR > 1 { printf("| %s | %.1f | %.1f | %d | %.1f | %.1f |\n", $1, $2 / 1024, $3 / 1024, $4, ($4 > 0 ? ($3 - $2) / $4 : 0), $6 / 1024) }' "$rows"
        echo
    } | tee "$OUT/s5.md"
    [ "$S5_KEYS" -gt 0 ] && scenario5_keys
    return 0
}

# RSS of sluice after S5_KEYS distinct unknown keys, each with its own bucket in a table bounded
# at 100 000 (sluice-s5-keys.toml); then after as many other keys again (the table full, the
# first ones evicted): what a key costs, and whether the bound holds.
scenario5_keys() {
    local rows=$OUT/s5-keys.tsv addr=127.0.0.1:8291 p idle one two out1 out2
    start_proxy sluice sluice-s5-keys.toml
    p=$LAST_PID
    wait_up "$addr" sluice-keys
    sleep 1
    idle=$(rss_kib "$p")
    sweep() { pinned "$LOAD_CPU" "$LOADGEN_BIN" sweep --addr "$addr" --keys "$S5_KEYS" --conns 50 --prefix "$1"; }
    out1=$(sweep a); sleep 2; one=$(rss_kib "$p")
    out2=$(sweep b); sleep 2; two=$(rss_kib "$p")
    stop "$p"
    echo "idle_kib after_keys_kib after_twice_kib sweep1 sweep2" >"$rows"
    echo "$idle $one $two ${out1// /,} ${out2// /,}" >>"$rows"
    log "scenario 5 tracked keys: idle ${idle} KiB, ${one} KiB after $S5_KEYS keys ($out1), ${two} KiB after $S5_KEYS more ($out2)"
    {
        echo "#### RSS of sluice with tracked keys (max_tracked_keys = 100000, unknown_keys = \"default\": one bucket per key)"
        echo
        echo "| RSS idle MiB | RSS after $S5_KEYS distinct keys MiB | bytes per key | RSS after $S5_KEYS more (table full, LRU evicts) MiB | load client |"
        echo "|---|---|---|---|---|"
        awk -v n="$S5_KEYS" -v o1="$out1" -v o2="$out2" 'NR == 2 { printf("| %.1f | %.1f | %.0f | %.1f | %s; %s |\n", $1 / 1024, $2 / 1024, ($2 - $1) * 1024 / n, $3 / 1024, o1, o2) }' "$rows"
        echo
    } | tee "$OUT/s5b.md"
}

# ---------------------------------------------------------------- scenario 6: Redis store
# s6_config BACKEND PORT ADMIN: scenario 1's sluice with KEYS configured resources (the keys
# wrk rotates over), so every request is checked against a resource's bucket; printed path.
s6_config() {
    local backend=$1 port=$2 admin=$3 file=$WORK/sluice-s6-$1.toml k
    sed -e "s/^proxy = .*/proxy = \"127.0.0.1:$port\"/" -e "s/^admin = .*/admin = \"127.0.0.1:$admin\"/" "$CONF/sluice-s1.toml" >"$file"
    for k in $(seq "$KEYS"); do
        printf '\n[[service.resource]]\nname = "r%s"\nkey = "bench-key-%s"\ntps = 1000\n' "$k" "$k" >>"$file"
    done
    if [ "$backend" = redis ]; then
        printf '\n[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:%s"\nkey_prefix = "bench-s6:"\n' "$S6_REDIS_PORT" >>"$file"
    fi
    echo "$file"
}

store_calls() { # store_calls ADMIN: sluice_store_calls_total of the sluice whose admin is there
    curl -s -m 2 "http://$1/metrics" | awk '$1 == "sluice_store_calls_total" { print $2 + 0; found = 1 } END { if (!found) print 0 }'
}

scenario6() {
    local rows=$OUT/s6.tsv redis_pid t
    command -v redis-server >/dev/null || die "scenario 6: redis-server not installed (apt-get install -y redis-server)"
    start redis "$LOAD_CPU" redis-server --port "$S6_REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no
    redis_pid=$LAST_PID
    for _ in $(seq 50); do
        [ "$( (exec 3<>/dev/tcp/127.0.0.1/"$S6_REDIS_PORT" && printf 'PING\r\n' >&3 && head -c 5 <&3) 2>/dev/null)" = "+PONG" ] && break
        sleep 0.1
    done
    declare -A addr=([memory]=127.0.0.1:8690 [redis]=127.0.0.1:8691)
    declare -A admin=([memory]=127.0.0.1:9690 [redis]=127.0.0.1:9691)
    declare -A pid=()
    local started=() targets=(memory redis)
    for t in "${targets[@]}"; do
        start_proxy sluice "$(s6_config "$t" "${addr[$t]#*:}" "${admin[$t]#*:}")"
        started+=("$LAST_PID"); pid[$t]=$LAST_PID
    done
    for t in "${targets[@]}"; do wait_up "${addr[$t]}" "sluice-s6-$t"; done
    run_wrk6() {
        pinned "$LOAD_CPU" timeout $(($2 + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$2s" --timeout 2s \
            -s "$BENCH/wrk/keys.lua" "http://$1/" -- "$KEYS" | grep '^WRK' ||
            echo "WRK requests=0 rps=0 p50_ms=0 p99_ms=0 non2xx=0 sockerr=-1"
    }
    if [ "$WARMUP" -gt 0 ]; then
        for t in "${targets[@]}"; do run_wrk6 "${addr[$t]}" "$WARMUP" >/dev/null; done
    fi
    echo "target rep requests rps p50_ms p99_ms non2xx sockerr cpu_us_per_req redis_us_per_req calls_per_1k" >"$rows"
    local rep i line c0 c1 r0 r1 k0 k1 reqs
    for rep in $(seq "$REPS"); do
        for i in 0 1; do
            t=${targets[$(((i + rep - 1) % 2))]}
            wait_quiet
            c0=$(cpu_ticks "${pid[$t]}"); r0=$(cpu_ticks "$redis_pid"); k0=$(store_calls "${admin[$t]}")
            line=$(run_wrk6 "${addr[$t]}" "$DUR")
            c1=$(cpu_ticks "${pid[$t]}"); r1=$(cpu_ticks "$redis_pid"); k1=$(store_calls "${admin[$t]}")
            reqs=$(sed 's/.*requests=\([0-9]*\).*/\1/' <<<"$line")
            echo "$t $rep $(sed 's/^WRK //; s/[a-z0-9_]*=//g' <<<"$line") $(awk -v c=$((c1 - c0)) -v r=$((r1 - r0)) -v k=$((k1 - k0)) -v hz="$CLK_TCK" -v n="$reqs" \
                'BEGIN { if (n == 0) print "- - -"; else printf("%.2f %.2f %.2f\n", c / hz * 1e6 / n, r / hz * 1e6 / n, k * 1000 / n) }')" >>"$rows"
            log "scenario 6 rep $rep/$REPS $t: $(tail -1 "$rows")"
            sleep 1
        done
    done
    stop "${started[@]}"
    {
        echo "### Scenario 6 — Redis store vs memory store (scenario 1's load: wrk -t$THREADS -c$CONNS -d${DUR}s over $KEYS keys, each a configured resource at 1000 TPS; redis-server on the load core; median (min–max) over $REPS interleaved reps)"
        echo
        echo "| store | req/s | p50 ms | p99 ms | non-2xx per run | sluice CPU µs/req | redis-server CPU µs/req | store calls per 1000 req |"
        echo "|---|---|---|---|---|---|---|---|"
        for t in "${targets[@]}"; do
            echo "| $t | $(fmt 0 "$(stat "$rows" 1 "$t" 4)") | $(fmt 3 "$(stat "$rows" 1 "$t" 5)") | $(fmt 3 "$(stat "$rows" 1 "$t" 6)") | $(fmt 0 "$(stat "$rows" 1 "$t" 7)") | $(fmt 2 "$(stat "$rows" 1 "$t" 9)") | $(fmt 2 "$(stat "$rows" 1 "$t" 10)") | $(fmt 1 "$(stat "$rows" 1 "$t" 11)") |"
        done
        echo
        echo "redis / memory (target: req/s ≥ 0.80): req/s $(ratio "$(median "$rows" 1 redis 4)" "$(median "$rows" 1 memory 4)"), p99 $(ratio "$(median "$rows" 1 redis 6)" "$(median "$rows" 1 memory 6)"), sluice CPU/req $(ratio "$(median "$rows" 1 redis 9)" "$(median "$rows" 1 memory 9)")"
        echo
    } | tee "$OUT/s6.md"
    local rate=$WORK/sluice-s6-rate.toml
    sed -e 's/^proxy = .*/proxy = "127.0.0.1:8692"/' "$CONF/sluice-s3.toml" >"$rate"
    printf '\n[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:%s"\nkey_prefix = "bench-s6-rate:"\n' "$S6_REDIS_PORT" >>"$rate"
    scenario3 "$rate" 127.0.0.1:8692 s6-rate "Scenario 6b — rate accuracy with backend = \"redis\""
    stop "$redis_pid"
}

# ---------------------------------------------------------------- scenario 7: scale-out
# sluice alone: open-source nginx changes an upstream's members only by reloading its config
# (the API for it is nginx Plus's), and HAProxy (≥ 2.4) only through its runtime API on the
# stats socket (`add server` / `del server`), which bench/conf/haproxy.cfg does not open and
# this harness does not drive; a reload mid-run would measure the reload, not the scale-out.
# Per run, a fresh sluice (sluice-s7.toml: service "scaleout", 127.0.0.1:9011 and :9012, 50 ms,
# cap 20 each; admin changes allowed by a token made here) under `loadgen run --tick-ms` (2xx,
# non-2xx, 5xx and I/O errors per S7_TICK_MS of answer time, and the wall clock of its start).
# At S7_DUR/3 :9013 and :9014 join (POST .../endpoints), at 2·S7_DUR/3 :9014 leaves (DELETE);
# GET /admin/capacity is read once at the start and once after each change. Phases are cut at
# the change times (when the first admin call left, on the load client's clock).
S7_SERVICE=scaleout
S7_EP_RPS=400 # one endpoint's ceiling: 20 slots x 1000 ms / 50 ms
now_ms() { date +%s%3N; }
sleep_until() { # sleep_until UNIX_MS
    local ms=$(($1 - $(now_ms)))
    [ "$ms" -gt 0 ] && sleep "$(awk -v m="$ms" 'BEGIN { printf("%.3f\n", m / 1000) }')"
    return 0
}

scenario7() {
    local rows=$OUT/s7.tsv secrows=$OUT/s7-seconds.tsv
    local proxy=127.0.0.1:8790 api=127.0.0.1:9790 token
    token=bench-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
    local auth="Authorization: Bearer $token"
    [ $((1000 % S7_TICK_MS)) = 0 ] || die "scenario 7: S7_TICK_MS=$S7_TICK_MS does not divide 1000"

    s7_admin() { # s7_admin METHOD PATH [JSON]: the admin call, its HTTP status printed
        local data=()
        [ -n "${3:-}" ] && data=(-H 'content-type: application/json' -d "$3")
        pinned "$LOAD_CPU" curl -s -o "$WORK/logs/s7-admin.out" -m 5 -w '%{http_code}' -X "$1" \
            -H "$auth" "${data[@]}" "http://$api$2" || true
    }
    s7_capacity() { # the service's capacity as GET /admin/capacity reports it ("-": no answer)
        local c
        c=$(pinned "$LOAD_CPU" curl -s -m 5 -H "$auth" "http://$api/admin/capacity" | tr -d ' \n' |
            sed -n "s/.*\"name\":\"$S7_SERVICE\",\"capacity\":\([0-9]*\).*/\1/p") || true
        echo "${c:--}"
    }
    s7_add() { # s7_add PORT
        local code
        code=$(s7_admin POST "/admin/services/$S7_SERVICE/endpoints" "{\"url\":\"http://127.0.0.1:$1\",\"max_concurrent\":20}")
        [ "$code" = 201 ] || [ "$code" = 200 ] || die "scenario 7: adding :$1 answered $code: $(cat "$WORK/logs/s7-admin.out")"
    }
    s7_remove() { # s7_remove PORT
        local url=http://127.0.0.1:$1 code
        url=${url//:/%3A}; url=${url//\//%2F}
        code=$(s7_admin DELETE "/admin/services/$S7_SERVICE/endpoints?url=$url")
        [ "$code" = 200 ] || [ "$code" = 204 ] || die "scenario 7: removing :$1 answered $code: $(cat "$WORK/logs/s7-admin.out")"
    }
    s7_sluice() { # a fresh sluice with the config's two endpoints; pid in LAST_PID
        start sluice-s7 "$PROXY_CPU" env SLUICE_LOG=warn SLUICE_ADMIN_TOKEN="$token" \
            "$SLUICE_BIN" run --config "$CONF/sluice-s7.toml" --workers 1
        wait_up "$proxy" sluice-s7
    }
    s7_load() { # s7_load NAME SECONDS BACKOFF_MS: the load client in the background; pid in LAST_PID
        start "$1" "$LOAD_CPU" timeout $(($2 + 30)) "$LOADGEN_BIN" run --addr "$proxy" \
            --conns "$S7_CONNS" --duration "$2" --keys "$KEYS" --backoff-ms "$3" --tick-ms "$S7_TICK_MS"
    }

    echo "backoff phase rep endpoints ceiling capacity seconds ok_rps ok_of_ceiling follow_ms non2xx s5xx errors change_ms admin_ms" >"$rows"
    echo "backoff rep sec ok non2xx s5xx errors" >"$secrows"
    local rep b p lg t0 c1 c2 d1 d2 cap0 cap1 cap2 raw i
    for rep in $(seq "$REPS"); do
        for b in $S7_BACKOFFS; do
            s7_sluice; p=$LAST_PID
            if [ "$WARMUP" -gt 0 ]; then
                s7_load s7-warmup "$WARMUP" "$b"; wait "$LAST_PID" || true; stop "$LAST_PID"
            fi
            wait_quiet
            raw=$OUT/s7-raw-b$b-r$rep.txt
            s7_load "s7-load-b$b-r$rep" "$S7_DUR" "$b"; lg=$LAST_PID
            for i in $(seq 100); do grep -q '^START' "$WORK/logs/s7-load-b$b-r$rep.out" && break; sleep 0.05; done
            t0=$(sed -n 's/^START unix_ms=\([0-9]*\).*/\1/p' "$WORK/logs/s7-load-b$b-r$rep.out")
            [ -n "$t0" ] || die "scenario 7: the load client did not start (see $WORK/logs)"
            cap0=$(s7_capacity)
            sleep_until $((t0 + S7_DUR * 1000 / 3))
            c1=$(now_ms); s7_add 9013; s7_add 9014; d1=$(($(now_ms) - c1)); cap1=$(s7_capacity)
            sleep_until $((t0 + S7_DUR * 2000 / 3))
            c2=$(now_ms); s7_remove 9014; d2=$(($(now_ms) - c2)); cap2=$(s7_capacity)
            wait "$lg" || true
            stop "$lg" "$p"
            cp "$WORK/logs/s7-load-b$b-r$rep.out" "$raw"
            awk -v b="$b" -v rep="$rep" -v tick="$S7_TICK_MS" -v dur="$S7_DUR" -v eprps="$S7_EP_RPS" \
                -v c1=$((c1 - t0)) -v c2=$((c2 - t0)) -v d1="$d1" -v d2="$d2" \
                -v caps="$cap0 $cap1 $cap2" -v rows="$rows" -v secrows="$secrows" '
                function val(line, k) { if (match(line, k "=[^ ]*")) return substr(line, RSTART + length(k) + 1, RLENGTH - length(k) - 1); return 0 }
                /^TICK/ { i = $2; ok[i] = val($0, "ok"); nx[i] = val($0, "non2xx"); s5[i] = val($0, "s5xx"); er[i] = val($0, "errors"); if (i + 1 > n) n = i + 1 }
                END {
                    for (i = 0; i < n; i++) { s = int(i * tick / 1000); sok[s] += ok[i]; snx[s] += nx[i]; s5x[s] += s5[i]; ser[s] += er[i] }
                    for (s = 0; s < dur; s++) printf("%s %s %d %d %d %d %d\n", b, rep, s, sok[s], snx[s], s5x[s], ser[s]) >> secrows
                    split(caps, cap, " ")
                    at[0] = 0; at[1] = c1; at[2] = c2; at[3] = dur * 1000; took[0] = 0; took[1] = d1; took[2] = d2
                    eps[0] = 2; eps[1] = 4; eps[2] = 3
                    for (k = 0; k < 3; k++) {
                        ceil = eps[k] * eprps
                        # median 2xx per whole second of the phase, from 2 s after its change on
                        m = 0; delete v
                        for (s = 0; s < dur; s++) if (s * 1000 >= at[k] + 2000 && (s + 1) * 1000 <= at[k + 1]) v[++m] = sok[s]
                        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { x = v[i]; v[i] = v[j]; v[j] = x }
                        med = m ? ((m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2) : 0
                        # the end of the first tick begun after the change whose rate is within
                        # reach of the new ceiling: >= 90 % of it going up, <= 110 % going down
                        follow = "-"
                        for (i = 0; i < n && i * tick < at[k + 1]; i++) {
                            if (i * tick < at[k]) continue
                            r = ok[i] * 1000 / tick
                            if ((k < 2 && r >= 0.9 * ceil) || (k == 2 && r <= 1.1 * ceil)) { follow = (i + 1) * tick - at[k]; break }
                        }
                        pn = p5 = pe = 0
                        for (i = 0; i < n; i++) if (i * tick >= at[k] && i * tick < at[k + 1]) { pn += nx[i]; p5 += s5[i]; pe += er[i] }
                        printf("%s %d %s %d %d %s %d %s %s %s %d %d %d %d %d\n", b, k + 1, rep, eps[k], ceil, (cap[k + 1] == "" ? "-" : cap[k + 1]), m,
                            (m ? med : "-"), (m ? sprintf("%.3f", med / ceil) : "-"), follow, pn, p5, pe, at[k], took[k]) >> rows
                    }
                }' "$raw"
            log "scenario 7 rep $rep/$REPS backoff ${b}ms: $(awk -v b="$b" -v r="$rep" '$1 == b && $3 == r { printf("phase %s: %s/%s req/s, follows in %s ms, capacity %s; ", $2, $8, $5, $10, $6) }' "$rows")"
            sleep 1
        done
    done

    {
        echo "### Scenario 7 — scale-out mid-run (sluice only; 50 ms endpoints, cap 20 each, $S7_CONNS closed-loop clients, ${S7_DUR}s runs; median (min–max) over $REPS reps)"
        echo
        echo "2 endpoints (ceiling 2 × 20 × 1000 / 50 = 800 req/s); at ${S7_DUR}/3 s two join through \`POST /admin/services/$S7_SERVICE/endpoints\` (1600 req/s); at 2·${S7_DUR}/3 s one leaves through \`DELETE …/endpoints?url=\` (1200 req/s)."
        echo "admitted = 2xx answers per second of arrival, median over the phase's whole seconds from 2 s after its change (phase 1: after the start)."
        echo "follows in = from the change to the end of the first ${S7_TICK_MS} ms tick begun after it with 2xx at ≥ 90 % of the new ceiling (≤ 110 % after a scale-in; phase 1: from the start). Ticks count answers by arrival and only a tick begun after the change counts, so the smallest figure possible is one tick plus the rest of the tick the change fell in."
        echo "capacity = the service's \`capacity\` in \`GET /admin/capacity\`, read once after the change (phase 1: at the start; slots, × 1000 / 50 = req/s)."
        for b in $S7_BACKOFFS; do
            echo
            backoff_line "$b"
            echo
            echo "| phase | endpoints | ceiling req/s | capacity (admin API) | admitted req/s | admitted / ceiling | follows in ms | seconds in median | non-2xx | of which 5xx | I/O errors |"
            echo "|---|---|---|---|---|---|---|---|---|---|---|"
            for i in 1 2 3; do
                awk -v b="$b" -v k="$i" 'NR > 1 && $1 == b && $2 == k { print $4, $5; exit }' "$rows" | {
                    read -r eps ceil
                    echo "| $i | $eps | $ceil | $(fmt 0 "$(stat "$rows" 2 "$b $i" 6)") | $(fmt 0 "$(stat "$rows" 2 "$b $i" 8)") | $(fmt 3 "$(stat "$rows" 2 "$b $i" 9)") | $(fmt 0 "$(stat "$rows" 2 "$b $i" 10)") | $(fmt 0 "$(stat "$rows" 2 "$b $i" 7)") | $(fmt 0 "$(stat "$rows" 2 "$b $i" 11)") | $(fmt 0 "$(stat "$rows" 2 "$b $i" 12)") | $(fmt 0 "$(stat "$rows" 2 "$b $i" 13)") |"
                }
            done
            echo
            echo "Non-2xx answers by status, all $REPS runs together: $(for rep in $(seq "$REPS"); do cat "$OUT/s7-raw-b$b-r$rep.txt"; done | awk '/^STATUS/ && $2 !~ /^2/ { n[$2] += substr($3, 7) } END { for (s in n) { printf("%s%s × %d", sep, s, n[s]); sep = ", " } if (sep == "") printf("none") }')."
            echo
            echo "2xx per second (a | before the second a change fell in), and 2xx per ${S7_TICK_MS} ms from 3 ticks before to 5 after each change ([the tick it fell in]):"
            echo
            for rep in $(seq "$REPS"); do
                local at
                at=$(awk -v b="$b" -v r="$rep" '$1 == b && $3 == r && $2 > 1 { printf("%s %s ", $14, $15) }' "$rows")
                read -r c1 d1 c2 d2 <<<"$at"
                echo "- rep $rep (changes at ${c1} ms and ${c2} ms after the start; the admin calls took ${d1} ms and ${d2} ms): $(awk -v b="$b" -v r="$rep" -v c1="$c1" -v c2="$c2" '
                    NR > 1 && $1 == b && $2 == r { if ((c1 >= $3 * 1000 && c1 < ($3 + 1) * 1000) || (c2 >= $3 * 1000 && c2 < ($3 + 1) * 1000)) printf("| "); printf("%d ", $4) }' "$secrows")"
                echo "  - around the changes: $(awk -v c1="$c1" -v c2="$c2" -v tick="$S7_TICK_MS" '
                    function around(c,   i, k, out) { k = int(c / tick); for (i = k - 3; i <= k + 5; i++) out = out (i == k ? "[" ok[i] "]" : ok[i]) " "; return out }
                    /^TICK/ { ok[$2] = substr($3, 4) }
                    END { printf("scale-out: %s; scale-in: %s", around(c1), around(c2)) }' "$OUT/s7-raw-b$b-r$rep.txt")"
            done
        done
        echo
    } | tee "$OUT/s7.md"
}

# ---------------------------------------------------------------- scenario 8: overload
# Scenario 2's service with a fourth endpoint that says it is full for the middle third of each
# run. Endpoints: 127.0.0.1:9021, :9022, :9023 (50 ms, cap 20 each: scenario 2's ceiling, 1200
# req/s) and :9024, the same while healthy (1600 req/s with it) and, while $WORK/html/s8-full
# exists, a 503 with Retry-After: 10 at once to every request. The load: S8_CONNS closed-loop
# clients POSTing S8_BODY, counted per S8_TICK_MS of arrival (`loadgen run --tick-ms`). At
# S8_DUR/3 the harness makes the file (:9024 full), at 2·S8_DUR/3 removes it (healthy again).
# Targets (their config headers say what each does with a 503): sluice-s8.toml (default
# [service.overload]), nginx-s8.conf, haproxy-s8.cfg, all started once and measured in turn.
# The endpoints log every request as "msec port status" to logs/s8-endpoints.log (buffered,
# flushed each second): the lines a run added, read 2 s after it ended, are what the endpoints
# received (with the few requests still in flight when the load stopped), and when :9024 served
# a 2xx again after it recovered. Counters the proxies keep themselves are read before and after
# each run: sluice's /metrics, HAProxy's stats CSV; nginx has none (stub_status counts only
# client connections and requests).
S8_FULL_PORT=9024
s8_log_size() { wc -c <"$WORK/logs/s8-endpoints.log" 2>/dev/null || echo 0; } # (stat is ours, above)

s8_counters() { # s8_counters TARGET: "name value" lines of what the proxy says it did
    case $1 in
        sluice) curl -s -m 2 "http://127.0.0.1:9890/metrics" | awk -v full="127.0.0.1:$S8_FULL_PORT" '
            /^sluice_retries_total/ && /result="made"/ { print "retries", $2 + 0 }
            /^sluice_retries_total/ && /result="refused"/ { print "retries_refused", $2 + 0 }
            /^sluice_requests_total/ && /endpoint=""/ && /class="5xx"/ { own += $2 }
            /^sluice_requests_total/ && index($0, "endpoint=\"http://" full "\"") && /class="5xx"/ { print "passed_5xx", $2 + 0 }
            /^sluice_endpoint_cooldowns_total/ && index($0, full) { print "held", $2 + 0 }
            END { print "own_5xx", own + 0 }' ;;
        haproxy) curl -s -m 2 "http://127.0.0.1:9881/stats;csv" | awk -F, '
            NR == 1 { sub(/^# /, ""); for (i = 1; i <= NF; i++) c[$i] = i; next }
            $1 != "overload" { next }
            $2 == "FRONTEND" { all = $c["hrsp_5xx"] }
            $2 == "BACKEND" { print "retries", $c["wretr"] + 0 }
            $2 != "FRONTEND" && $2 != "BACKEND" { passed += $c["hrsp_5xx"]; if ($2 == "s4") print "held", $c["chkdown"] + 0 }
            END { print "passed_5xx", passed + 0; print "own_5xx", all - passed }' ;;
    esac
}

scenario8() {
    local rows=$OUT/s8.tsv counts=$OUT/s8-counts.tsv flag=$WORK/html/s8-full
    declare -A addr=([sluice]=127.0.0.1:8890 [nginx]=127.0.0.1:8880 [haproxy]=127.0.0.1:8881)
    declare -A pid=()
    local started=() t targets
    read -ra targets <<<"$S8_TARGETS"
    [ $((1000 % S8_TICK_MS)) = 0 ] || die "scenario 8: S8_TICK_MS=$S8_TICK_MS does not divide 1000"
    # the backends' workers (nginx's unprivileged user, when run as root) stat the flag: let them
    # through the work dir (mktemp makes it 700), without reading it
    chmod 711 "$WORK"; mkdir -p "$WORK/html"; chmod 755 "$WORK/html"; rm -f "$flag"
    wait_up 127.0.0.1:9021 backend-s8; wait_up 127.0.0.1:$S8_FULL_PORT backend-s8-full
    for t in "${targets[@]}"; do
        [ -n "${addr[$t]:-}" ] || die "scenario 8: unknown target $t"
        case $t in
            nginx) start_proxy nginx nginx-s8.conf ;;
            haproxy) start_proxy haproxy haproxy-s8.cfg ;;
            sluice) start_proxy sluice sluice-s8.toml ;;
        esac
        started+=("$LAST_PID"); pid[$t]=$LAST_PID
    done
    for t in "${targets[@]}"; do wait_up "${addr[$t]}" "$t"; done

    local body=()
    [ -n "$S8_BODY" ] && body=(--body "$S8_BODY")
    s8_load() { # s8_load NAME ADDR SECONDS BACKOFF_MS: the load client in the background; pid in LAST_PID
        start "$1" "$LOAD_CPU" timeout $(($3 + 30)) "$LOADGEN_BIN" run --addr "$2" --conns "$S8_CONNS" \
            --duration "$3" --keys "$KEYS" --backoff-ms "$4" --tick-ms "$S8_TICK_MS" "${body[@]}"
    }
    if [ "$WARMUP" -gt 0 ]; then
        log "scenario 8: warm-up ${WARMUP}s per target (every endpoint healthy)"
        for t in "${targets[@]}"; do s8_load s8-warmup "${addr[$t]}" "$WARMUP" 0; wait "$LAST_PID" || true; stop "$LAST_PID"; done
        sleep 2 # the endpoints' log lines of the warm-up flushed before the first count
    fi
    echo "target backoff rep total_rps ok_rps ok_p99 errors reconnect_rps ok1_rps ok2_rps ok3_rps ok1_of_ceil ok2_of_ceil ok3_of_ceil ep_requests ep_per_answer ep_per_ok full_503 back_ms cpu_us_per_answer change1_ms change2_ms" >"$rows"
    echo "target backoff name rep value" >"$counts"
    local rep b i n=${#targets[@]} lg raw t0 c1 c2 cpu0 cpu1 l0 l1 k0 k1 ep
    for rep in $(seq "$REPS"); do
        for b in $S8_BACKOFFS; do
            for i in $(seq 0 $((n - 1))); do
                t=${targets[$(((i + rep - 1) % n))]}
                wait_quiet
                raw=$OUT/s8-raw-$t-b$b-r$rep.txt
                k0=$(s8_counters "$t"); l0=$(s8_log_size); cpu0=$(cpu_ticks "${pid[$t]}")
                s8_load "s8-load-$t-b$b-r$rep" "${addr[$t]}" "$S8_DUR" "$b"; lg=$LAST_PID
                for _ in $(seq 100); do grep -q '^START' "$WORK/logs/s8-load-$t-b$b-r$rep.out" && break; sleep 0.05; done
                t0=$(sed -n 's/^START unix_ms=\([0-9]*\).*/\1/p' "$WORK/logs/s8-load-$t-b$b-r$rep.out")
                [ -n "$t0" ] || die "scenario 8: the load client did not start (see $WORK/logs)"
                sleep_until $((t0 + S8_DUR * 1000 / 3)); c1=$(now_ms); : >"$flag"
                sleep_until $((t0 + S8_DUR * 2000 / 3)); c2=$(now_ms); rm -f "$flag"
                wait "$lg" || true
                cpu1=$(cpu_ticks "${pid[$t]}")
                stop "$lg"
                sleep 2 # answers still in flight come in, the endpoints' log is flushed
                l1=$(s8_log_size); k1=$(s8_counters "$t")
                cp "$WORK/logs/s8-load-$t-b$b-r$rep.out" "$raw"
                # the endpoints' log lines of this run: all of them, the full endpoint's 503s, and
                # when it served a 2xx again after it recovered (ms after c2; "-": not in the run)
                ep=$(tail -c +$((l0 + 1)) "$WORK/logs/s8-endpoints.log" | head -c $((l1 - l0)) |
                    awk -v full="$S8_FULL_PORT" -v c2="$c2" '
                        { n++ } $2 == full && $3 == 503 { f++ }
                        $2 == full && $3 ~ /^2/ && $1 * 1000 >= c2 && (back == "" || $1 * 1000 - c2 < back) { back = $1 * 1000 - c2 }
                        END { printf("%d %d %s\n", n, f, (back == "" ? "-" : sprintf("%.0f", back))) }')
                awk -v t="$t" -v b="$b" -v rep="$rep" -v ceil="$CEILING" -v ep="$ep" -v dur="$S8_DUR" -v tick="$S8_TICK_MS" \
                    -v c1=$((c1 - t0)) -v c2=$((c2 - t0)) -v dcpu=$((cpu1 - cpu0)) -v hz="$CLK_TCK" -v counts="$counts" '
                    function val(line, k) { if (match(line, k "=[^ ]*")) return substr(line, RSTART + length(k) + 1, RLENGTH - length(k) - 1); return "-" }
                    /^RESULT/ { total = val($0, "total"); trps = val($0, "rps"); err = val($0, "errors"); rec = val($0, "reconnects") }
                    /^STATUS/ && $2 !~ /^2/ { printf("%s %s status_%s %s %s\n", t, b, $2, rep, val($0, "count")) >> counts }
                    /^CLASS ok/ { o99 = val($0, "p99_ms"); ok = val($0, "count") }
                    /^TICK/ { at = $2 * tick; k = (at < c1) ? 1 : (at < c2) ? 2 : 3; pok[k] += val($0, "ok") }
                    END {
                        if (trps == "") { total = 0; trps = 0; err = -1; rec = 0 }
                        if (ok + 0 == 0) o99 = "-"
                        split(ep, e, " ")
                        len[1] = c1 / 1000; len[2] = (c2 - c1) / 1000; len[3] = dur - c2 / 1000
                        pc[1] = ceil * 4 / 3; pc[2] = ceil; pc[3] = ceil * 4 / 3   # with and without the 4th endpoint
                        for (k = 1; k <= 3; k++) { r[k] = pok[k] / len[k]; q[k] = r[k] / pc[k] }
                        printf("%s %s %s %s %.0f %s %s %.0f %.0f %.0f %.0f %.3f %.3f %.3f %d %s %s %d %s %s %d %d\n", t, b, rep, trps, ok / dur, o99, err, rec / dur,
                            r[1], r[2], r[3], q[1], q[2], q[3], e[1], (total > 0 ? sprintf("%.3f", e[1] / total) : "-"), (ok > 0 ? sprintf("%.3f", e[1] / ok) : "-"),
                            e[2], e[3], (total > 0 ? sprintf("%.2f", dcpu / hz * 1e6 / total) : "-"), c1, c2)
                    }' "$raw" >>"$rows"
                # what the proxy counted during the run: the counters' differences
                awk -v t="$t" -v b="$b" -v rep="$rep" 'NR == FNR { before[$1] = $2; next } { printf("%s %s %s %s %d\n", t, b, $1, rep, $2 - before[$1]) }' \
                    <(echo "$k0") <(echo "$k1") >>"$counts"
                log "scenario 8 rep $rep/$REPS backoff ${b}ms $t: $(tail -1 "$rows") | $(awk -v t="$t" -v b="$b" -v r="$rep" '$1 == t && $2 == b && $4 == r { printf("%s=%s ", $3, $5) }' "$counts")"
                sleep 1
            done
        done
    done
    stop "${started[@]}"

    s8_count() { # s8_count TARGET BACKOFF NAME: "median (min–max)" of a counter per run, "-" if none
        fmt 0 "$(stat "$counts" 3 "$1 $2 $3" 5)"
    }
    s8_status() { # s8_status TARGET BACKOFF CODE: as s8_count, a run without that status counting 0
        fmt 0 "$(awk -v k="$1 $2 status_$3" -v reps="$REPS" '
            NR > 1 && $1 " " $2 " " $3 == k { v[$4] = $5 }
            END {
                for (r = 1; r <= reps; r++) a[r] = (r in v) ? v[r] : 0
                for (i = 1; i <= reps; i++) for (j = i + 1; j <= reps; j++) if (a[j] < a[i]) { x = a[i]; a[i] = a[j]; a[j] = x }
                print (reps % 2) ? a[(reps + 1) / 2] : (a[reps / 2] + a[reps / 2 + 1]) / 2, a[1], a[reps]
            }' "$counts")"
    }
    local third=$((S8_DUR / 3)) hi=$((CEILING * 4 / 3))
    {
        echo "### Scenario 8 — one endpoint overloaded (3 endpoints × 50 ms and a 4th that answers 503 with Retry-After: 10 at once from ${third} s to $((2 * third)) s of each run, 50 ms otherwise; cap 20 each; $S8_CONNS closed-loop clients, $([ -n "$S8_BODY" ] && echo "POST of a ${#S8_BODY}-byte JSON body" || echo GET), ${S8_DUR}s runs, median (min–max) over $REPS interleaved reps)"
        echo
        echo "Ceilings: 4 × 20 × 1000 / 50 = $hi req/s while the 4th endpoint is healthy, $CEILING req/s (the 3 healthy ones) while it is full."
        echo "2xx/s in a phase: all 2xx answers that arrived in it ÷ its length (the change's transient included), then the median's share of the phase's ceiling. Non-2xx: answers per run, by status."
        echo "Endpoint requests: every request the 4 endpoints' access log shows for the run (the full one's 503s included), ÷ the answers the clients got, and ÷ the 2xx among them."
        echo "Back after: from the end of the full phase to the first 2xx the 4th endpoint logged (its 50 ms included); \"-\": none before the run ended."
        for b in $S8_BACKOFFS; do
            echo
            backoff_line "$b"
            echo
            echo "| target | 2xx/s before · ÷ $hi | 2xx/s while full · ÷ $CEILING | 2xx/s after · ÷ $hi | admitted p99 ms | non-2xx per run, by status | I/O errors | client reconnects/s | endpoint requests ÷ client answers | ÷ 2xx | 503s of the full endpoint per run | back after ms | proxy CPU µs/answer |"
            echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            for t in "${targets[@]}"; do
                local codes c
                codes=$(awk -v t="$t" -v b="$b" '$1 == t && $2 == b && $3 ~ /^status_/ { print substr($3, 8) }' "$counts" | sort -u |
                    while read -r c; do printf '%s × %s; ' "$c" "$(s8_status "$t" "$b" "$c")"; done)
                codes=${codes%; }
                echo "| $t | $(fmt 0 "$(stat "$rows" 2 "$t $b" 9)") · $(median "$rows" 2 "$t $b" 12 | awk '{ printf("%.3f", $1) }') | $(fmt 0 "$(stat "$rows" 2 "$t $b" 10)") · $(median "$rows" 2 "$t $b" 13 | awk '{ printf("%.3f", $1) }') | $(fmt 0 "$(stat "$rows" 2 "$t $b" 11)") · $(median "$rows" 2 "$t $b" 14 | awk '{ printf("%.3f", $1) }') | $(fmt 1 "$(stat "$rows" 2 "$t $b" 6)") | ${codes:-none} | $(fmt 0 "$(stat "$rows" 2 "$t $b" 7)") | $(fmt 0 "$(stat "$rows" 2 "$t $b" 8)") | $(fmt 3 "$(stat "$rows" 2 "$t $b" 16)") | $(fmt 3 "$(stat "$rows" 2 "$t $b" 17)") | $(fmt 0 "$(stat "$rows" 2 "$t $b" 18)") | $(fmt 0 "$(stat "$rows" 2 "$t $b" 19)") | $(fmt 2 "$(stat "$rows" 2 "$t $b" 20)") |"
            done
            echo
            echo "What the proxies counted themselves, per run (sluice: \`/metrics\`; HAProxy: its stats CSV; nginx keeps no such counters):"
            echo
            echo "| target | full endpoint's 503s passed to the client | the proxy's own 5xx | retries made | retries refused by the budget | full endpoint taken out (sluice: cooldowns begun; HAProxy: marked down) |"
            echo "|---|---|---|---|---|---|"
            for t in "${targets[@]}"; do
                case $t in
                    nginx) echo "| nginx | $(s8_status "$t" "$b" 503) (what the clients got: nginx makes no 503 of its own here) | its 502s, if any (table above): no server left to send to or retry on, capacity refusals included | - | - | - |" ;;
                    *) echo "| $t | $(s8_count "$t" "$b" passed_5xx) | $(s8_count "$t" "$b" own_5xx) | $(s8_count "$t" "$b" retries) | $([ "$t" = sluice ] && s8_count "$t" "$b" retries_refused || echo -) | $(s8_count "$t" "$b" held) |" ;;
                esac
            done
        done
        echo
    } | tee "$OUT/s8.md"
}

# ---------------------------------------------------------------- scenario 9: idle connections, memory return
# s9_proxy TARGET KIND: start TARGET for part KIND (h1, h2, big) on the proxy core; its pid in
# LAST_PID, the address to load in S9_ADDR
s9_proxy() {
    case $1:$2 in
        sluice:*) start_proxy sluice sluice-s5.toml; S9_ADDR=127.0.0.1:8290 ;;
        nginx:h1) start_proxy nginx nginx.conf; S9_ADDR=127.0.0.1:8280 ;;
        nginx:h2) start_proxy nginx nginx.conf; S9_ADDR=127.0.0.1:8380 ;;
        nginx:big) start_proxy nginx nginx.conf; S9_ADDR=127.0.0.1:8382 ;;
        haproxy:big) start_proxy haproxy haproxy-s9-large.cfg; S9_ADDR=127.0.0.1:8383 ;;
        haproxy:*) start_proxy haproxy haproxy.cfg; S9_ADDR=127.0.0.1:8281 ;;
        *) die "scenario 9: unknown target $1" ;;
    esac
}

scenario9() {
    local idle_rows=$OUT/s9-idle.tsv ret_rows=$OUT/s9-return.tsv t p kind at t0 samples
    # the 1 MiB body the backends serve at /s9-1mib (their nginx workers read it as nobody)
    chmod 711 "$WORK"; mkdir -p "$WORK/html"; chmod 755 "$WORK/html"
    head -c 1048576 /dev/zero | tr '\0' x >"$WORK/html/s9-1mib"; chmod 644 "$WORK/html/s9-1mib"
    echo "target kind conns rss_idle_kib rss_held_kib established held load_client" >"$idle_rows"
    echo "target rss_before_kib rss_open_kib established rss_0s rss_5s rss_10s rss_15s rss_20s rss_25s rss_30s" >"$ret_rows"
    for t in $S9_TARGETS; do
        # HTTP/1.1 idle, then the same connections closed: burst and return
        wait_quiet
        s9_proxy "$t" h1; p=$LAST_PID
        wait_up "$S9_ADDR" "$t"
        hold_idle "s9-$t-h1" "$p" "$S9_ADDR" "$HOLD_CONNS" --keys 1000 --batch "$S9_BATCH"
        echo "$t h1 $HOLD_CONNS $HOLD_IDLE $HOLD_FULL $HOLD_EST $HOLD_HELD ${HOLD_LINE// /;}" >>"$idle_rows"
        stop "$HOLD_PID"
        t0=$(now_ms); samples=""
        for at in 0 5 10 15 20 25 30; do
            sleep_until $((t0 + at * 1000))
            samples="$samples $(rss_kib "$p")"
        done
        stop "$p"
        echo "$t $HOLD_IDLE $HOLD_FULL $HOLD_EST$samples" >>"$ret_rows"
        log "scenario 9 $t HTTP/1.1: ${HOLD_IDLE} KiB idle, ${HOLD_FULL} KiB with $HOLD_EST established ($HOLD_LINE); after closing:$samples KiB"
        # h2c idle; large-then-idle
        for kind in h2 big; do
            wait_quiet
            s9_proxy "$t" "$kind"; p=$LAST_PID
            if [ "$kind" = h2 ]; then
                # nginx's 8380 takes h2c alone, out of the HTTP/1.1 probe's reach: probe its 8280
                if [ "$t" = nginx ]; then wait_up 127.0.0.1:8280 nginx; else wait_up "$S9_ADDR" "$t"; fi
                hold_idle "s9-$t-h2" "$p" "$S9_ADDR" "$HOLD_CONNS" --proto h2 --keys 1000 --batch "$S9_BATCH"
                echo "$t h2 $HOLD_CONNS $HOLD_IDLE $HOLD_FULL $HOLD_EST $HOLD_HELD ${HOLD_LINE// /;}" >>"$idle_rows"
            else
                wait_up "$S9_ADDR" "$t"
                hold_idle "s9-$t-big" "$p" "$S9_ADDR" "$S9_BIG_CONNS" --path /s9-1mib --keys 1000 --batch "$S9_BATCH" \
                    --head-bytes "$S9_HEAD_BYTES"
                echo "$t big $S9_BIG_CONNS $HOLD_IDLE $HOLD_FULL $HOLD_EST $HOLD_HELD ${HOLD_LINE// /;}" >>"$idle_rows"
            fi
            log "scenario 9 $t $kind: ${HOLD_IDLE} KiB idle, ${HOLD_FULL} KiB with $HOLD_EST established ($HOLD_LINE)"
            stop "$HOLD_PID"
            stop "$p"
        done
    done
    {
        echo "### Scenario 9 — idle connections and memory return (issue 18; RSS of the proxy's processes, one worker each)"
        echo
        echo "Each figure from a proxy of its own, started for it. KiB per connection = (RSS with the connections held idle − RSS before) ÷ connections open at the measure (ss)."
        echo
        echo "| target | connections, each idle after one request | RSS before MiB | RSS with them idle MiB | open at the measure | KiB per connection | issue 18 target | load client: connections failed, answers by status |"
        echo "|---|---|---|---|---|---|---|---|"
        awk -v head="$S9_HEAD_BYTES" 'NR > 1 {
            if ($2 == "h1") { what = $3 " HTTP/1.1 keep-alive"; goal = "≤ 4" }
            else if ($2 == "h2") { what = $3 " HTTP/2 (h2c, prior knowledge)"; goal = "≤ 8" }
            else { what = sprintf("%d HTTP/1.1 after a %.0f KiB head and a 1 MiB body", $3, head / 1024); goal = "no large buffer kept" }
            n = split($8, f, ";"); lc = ""
            for (i = 1; i <= n; i++) if (f[i] ~ /^(failed|statuses)=/) lc = lc (lc == "" ? "" : " ") f[i]
            if ($6 == 0) { printf("| %s | %s | %.1f | %.1f | 0 | n/a: no connection open | %s | %s |\n", $1, what, $4 / 1024, $5 / 1024, goal, lc); next }
            printf("| %s | %s | %.1f | %.1f | %d | %.1f | %s | %s |\n", $1, what, $4 / 1024, $5 / 1024, $6, ($5 - $4) / $6, goal, lc) }' "$idle_rows"
        echo
        echo "Burst and return: the $HOLD_CONNS HTTP/1.1 connections above, all closed at once (the load client exits); RSS since."
        echo
        echo "| target | RSS before MiB | with the burst open MiB (open) | 0 s after the close | 5 s | 10 s | 30 s | back within 10 % of before by 30 s? (issue 18 target) |"
        echo "|---|---|---|---|---|---|---|---|"
        awk 'NR > 1 {
            back = "no: +" sprintf("%.0f", 100 * ($11 - $2) / $2) " % at 30 s"
            split("0 5 10 15 20 25 30", at, " ")
            for (i = 5; i <= 11; i++) if ($i <= 1.1 * $2) { back = "yes, at " at[i - 4] " s"; break }
            printf("| %s | %.1f | %.1f (%d) | %.1f | %.1f | %.1f | %.1f | %s |\n", $1, $2 / 1024, $3 / 1024, $4, $5 / 1024, $6 / 1024, $7 / 1024, $11 / 1024, back) }' "$ret_rows"
        echo
    } | tee "$OUT/s9.md"
}

# ---------------------------------------------------------------- main
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=(1 2 3 4 5 6 7 8 9)
for s in "${SCENARIOS[@]}"; do
    case $s in
        1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9) ;;
        *) die "unknown scenario $s (1 to 9)" ;;
    esac
done
[ "$REPS" -ge 3 ] || log "bench: REPS=$REPS < 3: fine for a smoke run, not for published numbers"
if [ "$PIN" = 1 ] && [ "$(nproc)" -lt 2 ]; then log "bench: fewer than 2 cores, pinning off"; PIN=0; fi
# as many open files as allowed (10k held connections need >10k in the proxy and the holder)
hard=$(ulimit -Hn); [ "$hard" = unlimited ] && hard=65536; [ "$hard" -gt 65536 ] && hard=65536
ulimit -n "$hard" 2>/dev/null || true

install_tools
build
start_backends
{
    echo "## Run of $(date -u '+%Y-%m-%d %H:%M UTC'): bench/run.sh ${SCENARIOS[*]}"
    echo
    versions
    echo
} | tee "$OUT/header.md"
for s in "${SCENARIOS[@]}"; do
    case $s in
        1) scenario1 ;;
        2) scenario2 ;;
        3) scenario3 ;;
        4) scenario4 ;;
        5) scenario5 ;;
        6) scenario6 ;;
        7) scenario7 ;;
        8) scenario8 ;;
        9) scenario9 ;;
    esac
done
echo "Runs that started on a busy machine (see QUIET): $NOISY" | tee "$OUT/noisy.md"
cat "$OUT/header.md" "$OUT"/s[0-9]*.md "$OUT/noisy.md" >"$OUT/report.md" 2>/dev/null || true
log "bench: results in $OUT (report.md, raw rows *.tsv); logs in $WORK/logs"
