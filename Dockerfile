# Build stage and runtime stage share Debian bookworm, so the binary's glibc matches.
# The Rust tag is pinned (a floating `rust:1` changes the compiler under a rebuild): 1.95 is
# the toolchain the test suite runs with; Cargo.toml's rust-version (1.85) is the oldest allowed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies in their own layer: built against an empty crate, so a change under src/ reuses
# them and only a change to Cargo.toml or Cargo.lock rebuilds them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src bench \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > bench/admission.rs \
 && cargo build --release --locked \
 && rm -rf src bench
COPY src src
COPY bench/admission.rs bench/admission.rs
# COPY keeps the files' own times, which can be older than the empty crate's build: touch them
# so cargo rebuilds sluice itself instead of shipping the empty binary.
RUN find src bench -type f -exec touch {} + \
 && cargo build --release --locked

FROM debian:bookworm-slim
# ca-certificates: the system roots sluice trusts for https:// endpoints (plus `[upstream]
# ca_file`, for a private CA).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home sluice
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY config/sluice.toml /etc/sluice/sluice.toml
# `run`, `check`, `demo` and `healthcheck` all read this file unless --config says otherwise.
ENV SLUICE_CONFIG=/etc/sluice/sluice.toml
USER sluice
EXPOSE 8080
# `/readyz` on the admin listener named in $SLUICE_CONFIG (loopback by default); exits 1
# within --timeout when it does not answer 200.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["sluice", "healthcheck", "--timeout", "3s"]
ENTRYPOINT ["sluice"]
# The demo out of the box: three demo endpoints inside the container, the proxy on [::]:8080.
# `run` serves $SLUICE_CONFIG's real endpoints (docs/operations.md, "Docker").
CMD ["demo"]
