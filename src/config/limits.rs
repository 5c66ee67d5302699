//! `[limits]`: bounds on what one client connection may make the proxy hold (request heads,
//! HTTP/2 streams and resets, open connections, idle time). Every value has a safe default,
//! so a config without the table is already hardened; see docs/limits-and-threat-model.md,
//! "Limits".

use std::ops::RangeInclusive;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::Problems;

/// Allowed `max_header_bytes`: hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
pub const MAX_HEADER_BYTES_RANGE: RangeInclusive<u32> = 8 * 1024..=1024 * 1024;
/// Allowed `max_headers`.
pub const MAX_HEADERS_RANGE: RangeInclusive<u32> = 1..=1000;
/// Allowed `http2_max_concurrent_streams`.
pub const H2_STREAMS_RANGE: RangeInclusive<u32> = 1..=10_000;
/// Allowed `http2_max_pending_accept_reset_streams` and `http2_max_local_error_reset_streams`.
pub const H2_RESETS_RANGE: RangeInclusive<u32> = 1..=100_000;
/// Allowed `max_connections`.
pub const MAX_CONNECTIONS_RANGE: RangeInclusive<u32> = 1..=1_000_000;

/// Allowed `lingering_close` (0 turns it off).
pub const LINGERING_CLOSE_RANGE: RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(30);

/// hyper's own default for `max_headers`: kept on the stack, so sluice only sets a value
/// that differs from it (any other value costs a heap allocation per request).
pub const HYPER_DEFAULT_MAX_HEADERS: u32 = 100;

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line + headers) in bytes; larger → 431. For HTTP/2,
    /// the largest header list.
    pub max_header_bytes: u32,
    /// Most header lines in an HTTP/1 request; more → 431.
    pub max_headers: u32,
    /// Streams one HTTP/2 connection may have open at once; more are refused
    /// (RST_STREAM REFUSED_STREAM) while the connection lives.
    pub http2_max_concurrent_streams: u32,
    /// Streams a client may open and reset before sluice accepted them (HTTP/2 rapid reset,
    /// CVE-2023-44487); past it the connection gets GOAWAY ENHANCE_YOUR_CALM.
    pub http2_max_pending_accept_reset_streams: u32,
    /// Streams sluice may reset for a client's protocol errors on one connection; past it
    /// the connection gets GOAWAY (RUSTSEC-2024-0003).
    pub http2_max_local_error_reset_streams: u32,
    /// Client connections open at once; past it new connections are accepted and closed at
    /// once (the listener keeps draining its backlog).
    pub max_connections: u32,
    /// A client connection with no request in flight and no bytes moving for this long is
    /// closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// After an answer given before the request body was read, how long the connection goes
    /// on reading (and discarding) what the client still sends before closing, so the answer
    /// is not lost to a TCP reset. 0 closes at once.
    #[serde(with = "humantime_serde")]
    pub lingering_close: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: HYPER_DEFAULT_MAX_HEADERS,
            http2_max_concurrent_streams: 256,
            http2_max_pending_accept_reset_streams: 20,
            http2_max_local_error_reset_streams: 1024,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(60),
            lingering_close: Duration::from_secs(2),
        }
    }
}

/// Add every out-of-range value of `limits` to `p`.
pub(super) fn validate(p: &mut Problems, limits: &Limits) {
    let key = |field: &str| format!("limits.{field}");
    p.range(
        key("max_header_bytes"),
        limits.max_header_bytes,
        &MAX_HEADER_BYTES_RANGE,
    );
    p.range(key("max_headers"), limits.max_headers, &MAX_HEADERS_RANGE);
    p.range(
        key("http2_max_concurrent_streams"),
        limits.http2_max_concurrent_streams,
        &H2_STREAMS_RANGE,
    );
    p.range(
        key("http2_max_pending_accept_reset_streams"),
        limits.http2_max_pending_accept_reset_streams,
        &H2_RESETS_RANGE,
    );
    p.range(
        key("http2_max_local_error_reset_streams"),
        limits.http2_max_local_error_reset_streams,
        &H2_RESETS_RANGE,
    );
    p.range(
        key("max_connections"),
        limits.max_connections,
        &MAX_CONNECTIONS_RANGE,
    );
    p.positive(key("idle_timeout"), limits.idle_timeout);
    p.duration_range(
        key("lingering_close"),
        limits.lingering_close,
        &LINGERING_CLOSE_RANGE,
    );
}

#[cfg(test)]
mod tests {
    use super::super::{validate, Config};

    fn problems(limits: &str) -> Vec<String> {
        let text = format!(
            "[limits]\n{limits}\n[[service]]\nname = \"s\"\nendpoints = [\"http://127.0.0.1:1\"]\n"
        );
        let config = Config::parse(&text).expect("parses");
        match validate(&config) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn defaults_are_valid_and_out_of_range_values_name_their_key() {
        assert!(problems("").is_empty());
        assert_eq!(
            problems("max_headers = 0"),
            ["limits.max_headers: 0 is out of range; allowed 1..=1000"]
        );
        assert_eq!(
            problems("max_header_bytes = 4096\nidle_timeout = \"0s\"\nmax_connections = 0"),
            [
                "limits.max_header_bytes: 4096 is out of range; allowed 8192..=1048576",
                "limits.max_connections: 0 is out of range; allowed 1..=1000000",
                "limits.idle_timeout: must be greater than 0 (e.g. \"500ms\", \"2s\")",
            ]
        );
        assert!(problems("lingering_close = \"0s\"").is_empty());
        assert!(problems("lingering_close = \"30s\"").is_empty());
        assert_eq!(
            problems("lingering_close = \"31s\""),
            ["limits.lingering_close: 31s is out of range; allowed 0s..=30s"]
        );
        assert_eq!(
            problems("http2_max_concurrent_streams = 0\nhttp2_max_pending_accept_reset_streams = 0\nhttp2_max_local_error_reset_streams = 100001"),
            [
                "limits.http2_max_concurrent_streams: 0 is out of range; allowed 1..=10000",
                "limits.http2_max_pending_accept_reset_streams: 0 is out of range; allowed 1..=100000",
                "limits.http2_max_local_error_reset_streams: 100001 is out of range; allowed 1..=100000",
            ]
        );
    }

    #[test]
    fn unknown_keys_in_limits_are_errors() {
        let text = "[limits]\nmax_header = 1\n";
        let error = Config::parse(text).expect_err("unknown key").to_string();
        assert!(error.contains("max_header"), "{error}");
    }
}
