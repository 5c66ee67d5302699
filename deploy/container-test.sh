#!/usr/bin/env bash
# Build the image from the repository's Dockerfile and run README.md's "Docker" commands
# against it: the demo answers from the host, `check` and `healthcheck` work in the image, a
# request in flight survives `docker stop` (SIGTERM, default 10 s timeout), SIGHUP reloads the
# mounted config, and the container runs with --read-only. Not part of `cargo test` (building
# the image takes minutes). Exits non-zero at the first check that fails.
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
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    fi
    tar -C "$rootfs" -c . | "$ENGINE" import - "$name" >/dev/null
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

prepare_base_images
[ "${1:-}" = "--base-images-only" ] && exit 0
