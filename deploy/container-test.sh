#!/usr/bin/env bash
# Build the image from the repository's Dockerfile and run the commands of docs/operations.md,
# "Docker", against it: the demo answers from the host, `check` and `healthcheck` work in the
# image, a request in flight survives `docker stop` (SIGTERM, default 10 s timeout), SIGHUP
# reloads the mounted config, and the container runs with --read-only. Not part of `cargo test`
# (building the image takes minutes). Exits non-zero at the first check that fails.
#
#   deploy/container-test.sh              # podman if installed, else docker
#   ENGINE=docker deploy/container-test.sh
#
# Without a registry (as on the CI machine), the two base images the Dockerfile names are made
# locally, once: debian:bookworm-slim from `debootstrap`, and the Rust build image from it plus
# this machine's Rust toolchain and CA bundle (cargo must still reach crates.io). The
# Dockerfile is unchanged: with a registry, the real images are pulled instead.
# Podman on a Debian 12 host with hybrid cgroups needs runc (crun fails) and lower default
# ulimits, in /etc/containers/containers.conf:
#   [containers]
#   default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
#   [engine]
#   runtime = "runc"
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
IMAGE=${IMAGE:-sluice:container-test}
HOST_PORT=${HOST_PORT:-18080}          # the host side of -p HOST_PORT:8080
BASE_DIR=${BASE_DIR:-/var/tmp/sluice-base-images}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
NAME=sluice-ct-$$

say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# --- base images ---------------------------------------------------------------------------

have_image() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# Pull `name`, or say why not within a minute (no registry: the pull fails or hangs).
try_pull() { timeout 60 "$ENGINE" pull "docker.io/library/$1" >/dev/null 2>&1 && "$ENGINE" tag "docker.io/library/$1" "$1"; }

debian_image() {
    local name=debian:bookworm-slim
    have_image "$name" && return
    try_pull "$name" && return
    say "no registry: making $name with debootstrap"
    local rootfs=$BASE_DIR/bookworm
    if [ ! -x "$rootfs/usr/bin/apt-get" ]; then
        rm -rf "$rootfs"
        mkdir -p "$BASE_DIR"
        debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR"
    fi
    # Leave out what the real slim image leaves out (package caches and lists, manuals,
    # translations), so the image size is comparable.
    tar -C "$rootfs" --exclude='./var/cache/apt/*' --exclude='./var/lib/apt/lists/*' \
        --exclude='./usr/share/man/*' --exclude='./usr/share/info/*' \
        --exclude='./usr/share/locale/*' --exclude='./var/log/*' -c . \
        | "$ENGINE" import - "$name" >/dev/null
}

rust_image() {
    local name=$1
    have_image "$name" && return
    try_pull "$name" && return
    say "no registry: making $name from debian:bookworm-slim and this machine's toolchain"
    local sysroot ctx=$BASE_DIR/rust-context
    sysroot=$(rustc --print sysroot)
    rm -rf "$ctx"
    mkdir -p "$ctx/rust"
    cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/rust/"
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
    cat >"$ctx/Containerfile" <<'CONTAINERFILE'
FROM debian:bookworm-slim
# What the official rust image brings for a build: a C toolchain (ring's C code, linking).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
# This machine's bundle: cargo reaches crates.io through whatever CA the host trusts.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CONTAINERFILE
    "$ENGINE" build --network host -t "$name" "$ctx"
    rm -rf "$ctx"
}

prepare_base_images() {
    debian_image
    # The build stage's image, as the Dockerfile names it.
    local rust
    rust=$(awk '/^FROM .* AS build/ {print $2}' "$ROOT/Dockerfile")
    [ -n "$rust" ] || fail "no 'FROM ... AS build' line in the Dockerfile"
    rust_image "$rust"
}

# --- helpers -------------------------------------------------------------------------------

CONTAINERS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-container-test.XXXXXX")
cleanup() {
    local i
    # Last started first: a container cannot go while another shares its network namespace.
    for ((i = ${#CONTAINERS[@]} - 1; i >= 0; i--)); do
        "$ENGINE" rm -f "${CONTAINERS[i]}" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Start a detached container named $1 with the remaining arguments (run options, image, args).
start() {
    local name=$1
    shift
    CONTAINERS+=("$name")
    # stderr aside: podman on a host without systemd complains there that it cannot schedule
    # the HEALTHCHECK (run by hand below).
    "$ENGINE" run -d --name "$name" "$@" >/dev/null 2>"$WORK/$name.err" \
        || { cat "$WORK/$name.err" >&2; fail "cannot start $name"; }
}

# `docker stop`, its complaints kept aside (the checks that follow say what matters).
stop() { "$ENGINE" stop "$@" >/dev/null 2>>"$WORK/stop.err"; }

logs() { "$ENGINE" logs "$1" 2>&1 | tail -n "${2:-20}"; }

# `docker run --rm IMAGE ARGS...` for a one-off command: no HEALTHCHECK (and so no complaint
# from podman about systemd, see `start`).
run_once() { "$ENGINE" run --rm --no-healthcheck "$@"; }

# Wait until `curl URL` answers 200; fail with the container's log after 30 s.
wait_for_200() {
    local url=$1 container=$2 i
    for i in $(seq 1 150); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url")" = 200 ] && return
        sleep 0.2
    done
    logs "$container" >&2
    fail "$url never answered 200"
}

exit_code() { "$ENGINE" inspect --format '{{.State.ExitCode}}' "$1"; }

# --- the image ------------------------------------------------------------------------------

prepare_base_images
[ "${1:-}" = "--base-images-only" ] && exit 0

build=(build -t "$IMAGE")
# Podman writes OCI images by default, which have no HEALTHCHECK: ask for Docker's format.
[ "$(basename "$ENGINE")" = podman ] && build+=(--format docker)
BUILD_LOG=${TMPDIR:-/tmp}/sluice-container-build.log
say "$ENGINE build -t $IMAGE (log: $BUILD_LOG)"
started=$(date +%s)
# --network host: cargo and apt reach their registries the way this host does.
if ! "$ENGINE" "${build[@]}" --network host "$ROOT" >"$BUILD_LOG" 2>&1; then
    tail -n 40 "$BUILD_LOG" >&2
    fail "the image does not build"
fi
say "built $IMAGE in $(( $(date +%s) - started )) s; $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.1f MB", $1/1e6}')"
user=$("$ENGINE" image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$user" = sluice ] || fail "the image runs as ${user:-root}, not as user sluice"
run_once --entrypoint id "$IMAGE" | grep -q 'uid=10001' || fail "user sluice is not uid 10001"
echo "ok: runs as user sluice (uid 10001)"
"$ENGINE" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q '"sluice","healthcheck"' \
    || fail "no HEALTHCHECK running sluice healthcheck in the image"
echo "ok: HEALTHCHECK is $("$ENGINE" image inspect --format '{{json .Config.Healthcheck.Test}}' "$IMAGE")"

# --- docker run sluice check / demo ---------------------------------------------------------

out=$(run_once "$IMAGE" check) || fail "docker run sluice check: $out"
echo "ok: docker run sluice check: $out"

DEMO=$NAME-demo
start "$DEMO" -p "$HOST_PORT:8080" "$IMAGE"
wait_for_200 "http://127.0.0.1:$HOST_PORT/score" "$DEMO"
answer=$(curl -s "http://127.0.0.1:$HOST_PORT/score" -d '{"features":[1,2,3]}')
echo "ok: docker run -p $HOST_PORT:8080 sluice (the demo) answers the host: $answer"
out=$("$ENGINE" exec "$DEMO" sluice check) || fail "docker exec sluice check: $out"
echo "ok: docker exec <c> sluice check: $out"
out=$("$ENGINE" exec "$DEMO" sluice healthcheck) || fail "docker exec sluice healthcheck: $out"
echo "ok: docker exec <c> sluice healthcheck: $out"

# The HEALTHCHECK itself, as the engine runs it. Podman schedules it with systemd timers, which
# a host without systemd lacks: run it by hand there (`podman healthcheck run`, the same
# command the timer would run), and read the status the engine recorded.
health_status() {
    "$ENGINE" inspect --format '{{.State.Health.Status}}' "$1" 2>/dev/null \
        || "$ENGINE" inspect --format '{{.State.Healthcheck.Status}}' "$1"
}
for i in $(seq 1 60); do
    [ "$(basename "$ENGINE")" = podman ] && "$ENGINE" healthcheck run "$DEMO" >/dev/null 2>&1
    status=$(health_status "$DEMO")
    [ "$status" = healthy ] && break
    sleep 1
done
[ "$status" = healthy ] || fail "the container's health is ${status:-unknown}, not healthy"
echo "ok: the HEALTHCHECK says healthy"
"$ENGINE" rm -f "$DEMO" >/dev/null 2>&1

# --- SIGTERM drains a request in flight within docker stop's timeout -------------------------

DRAIN=$NAME-drain
start "$DRAIN" -p "$HOST_PORT:8080" "$IMAGE" demo --latency 5s
for i in $(seq 1 150); do "$ENGINE" exec "$DRAIN" sluice healthcheck >/dev/null 2>&1 && break; sleep 0.2; done
curl -s -o "$WORK/drained.body" -w '%{http_code}' --max-time 30 "http://127.0.0.1:$HOST_PORT/score" >"$WORK/drained.status" &
curl_pid=$!
sleep 1   # the request is in flight: the demo endpoints answer after 5 s
started=$(date +%s.%N)
stop "$DRAIN"       # SIGTERM, SIGKILL after the default 10 s
stopped=$(date +%s.%N)
wait "$curl_pid" || true
took=$(awk -v a="$started" -v b="$stopped" 'BEGIN {printf "%.1f", b - a}')
[ "$(cat "$WORK/drained.status")" = 200 ] || { logs "$DRAIN" >&2; fail "the request in flight got $(cat "$WORK/drained.status") from a stop (body: $(cat "$WORK/drained.body"))"; }
[ "$(exit_code "$DRAIN")" = 0 ] || { logs "$DRAIN" >&2; fail "sluice exited $(exit_code "$DRAIN") on SIGTERM"; }
awk -v t="$took" 'BEGIN {exit !(t < 10)}' || fail "the stop took ${took} s: SIGKILLed, not drained"
echo "ok: docker stop during a 5 s request: the client got 200 ($(cat "$WORK/drained.body")), sluice exited 0 after ${took} s (before the 10 s SIGKILL)"
"$ENGINE" logs "$DRAIN" 2>&1 | grep -E 'shutting down|drain|stopped' | tail -n 3 | sed 's/^/   log: /' || true

# --- real endpoints: a mounted config, --read-only, SIGHUP reloads ---------------------------

# The endpoints: `sluice demo-endpoints` on 127.0.0.1:9001..9003 of their container, which the
# shipped config lists; the sluice container joins that network namespace (its 127.0.0.1).
ENDPOINTS=$NAME-endpoints
RUN=$NAME-run
start "$ENDPOINTS" -p "$HOST_PORT:8080" "$IMAGE" demo-endpoints
mkdir -p "$WORK/config"
cp "$ROOT/config/sluice.toml" "$WORK/config/sluice.toml"
chmod 755 "$WORK" "$WORK/config" && chmod 644 "$WORK/config/sluice.toml"
start "$RUN" --network "container:$ENDPOINTS" --read-only -v "$WORK/config:/etc/sluice:ro" "$IMAGE" run
wait_for_200 "http://127.0.0.1:$HOST_PORT/score" "$RUN"
echo "ok: docker run --read-only -v <dir>:/etc/sluice:ro sluice run answers from the endpoints: $(curl -s "http://127.0.0.1:$HOST_PORT/score")"
out=$("$ENGINE" exec "$RUN" sluice check) || fail "docker exec sluice check on the mounted file: $out"
echo "ok: docker exec <c> sluice check: $out"

policy() { curl -s -D - -o /dev/null "http://127.0.0.1:$HOST_PORT/score" | tr -d '\r' | awk -F': ' 'tolower($1) == "ratelimit-policy" {print $2}'; }
before=$(policy)
sed -i 's/^default_tps = 10 /default_tps = 7  /' "$WORK/config/sluice.toml"
grep -q '^default_tps = 7 ' "$WORK/config/sluice.toml" || fail "cannot edit default_tps in the copied config"
"$ENGINE" kill -s HUP "$RUN" >/dev/null
for i in $(seq 1 50); do
    after=$(policy)
    [ "$after" != "$before" ] && break
    sleep 0.2
done
case $after in
*q=7*) echo "ok: docker kill -s HUP reloads the mounted file: RateLimit-Policy $before -> $after" ;;
*) logs "$RUN" >&2; fail "after SIGHUP RateLimit-Policy is still $after" ;;
esac
"$ENGINE" logs "$RUN" 2>&1 | grep -m1 'config reloaded' | sed 's/^/   log: /' || true
stop "$RUN"
[ "$(exit_code "$RUN")" = 0 ] || fail "sluice run exited $(exit_code "$RUN") on docker stop"
echo "ok: docker stop: sluice run exited 0"

say "all container checks passed ($ENGINE, $IMAGE)"
