//! The test harness's real `redis-server` (tests/support/redis.rs): start, raw commands, stop,
//! start again on the same port with the data gone, kill on drop, and what happens when
//! `redis-server` is not installed (skip, or fail under `SLUICE_REQUIRE_REDIS`).

mod support;

use std::process::Command;

use support::redis::{self, RedisServer, REQUIRE_ENV};

/// Env var that makes [`probe_start_without_redis_on_path`] do its work (only when this file
/// runs itself as a child process).
const PROBE_ENV: &str = "SLUICE_REDIS_HARNESS_PROBE";

#[test]
fn starts_answers_and_comes_back_empty_on_the_same_port() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let port = server.port();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert!(server.ping());
    assert_eq!(server.command(&["PING"]), "PONG");
    assert_eq!(server.command(&["SET", "sluice:test", "v1"]), "OK");
    assert_eq!(server.command(&["GET", "sluice:test"]), "v1");
    assert_eq!(server.command(&["DBSIZE"]), "1");
    let first_pid = server.pid().expect("running");

    server.stop();
    assert!(!server.is_running());
    assert!(!server.ping(), "nothing answers on {port} once stopped");
    assert!(
        redis::try_command(server.addr(), &["PING"]).is_err(),
        "a command to a stopped server fails"
    );

    server.start_again();
    assert_eq!(server.port(), port, "same port after a restart");
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert!(server.is_running());
    assert_ne!(server.pid(), Some(first_pid), "a new process");
    assert!(server.ping());
    assert_eq!(
        server.command(&["GET", "sluice:test"]),
        "(nil)",
        "no persistence: the key is gone"
    );
    assert_eq!(server.command(&["DBSIZE"]), "0");
}

#[test]
fn start_again_replaces_a_running_server() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    server.command(&["SET", "k", "v"]);
    server.start_again();
    assert_eq!(server.command(&["EXISTS", "k"]), "0");
}

#[test]
fn command_renders_every_reply_kind() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // Simple string, integer, bulk (binary-safe: CR LF inside a value), nil.
    assert_eq!(server.command(&["SET", "two-lines", "a\r\nb"]), "OK");
    assert_eq!(server.command(&["GET", "two-lines"]), "a\r\nb");
    assert_eq!(server.command(&["STRLEN", "two-lines"]), "4");
    assert_eq!(server.command(&["GET", "missing"]), "(nil)");
    assert_eq!(server.command(&["SET", "empty", ""]), "OK");
    assert_eq!(server.command(&["GET", "empty"]), "");
    // Arrays: elements joined by '\n', empty as "".
    assert_eq!(server.command(&["RPUSH", "list", "x", "y", "z"]), "3");
    assert_eq!(server.command(&["LRANGE", "list", "0", "-1"]), "x\ny\nz");
    assert_eq!(server.command(&["KEYS", "nothing:*"]), "");
    // Errors keep their '-'.
    let error = server.command(&["NO-SUCH-COMMAND"]);
    assert!(error.starts_with("-ERR"), "{error}");
    // Expiry, as the store's keys will have.
    assert_eq!(server.command(&["SET", "ttl", "1", "PX", "60000"]), "OK");
    let ttl: i64 = server.command(&["PTTL", "ttl"]).parse().unwrap();
    assert!((1..=60_000).contains(&ttl), "{ttl}");
    // FLUSHALL empties it for the next phase of a test.
    assert_eq!(server.command(&["FLUSHALL"]), "OK");
    assert_eq!(server.command(&["DBSIZE"]), "0");
}

#[test]
fn two_servers_run_side_by_side() {
    let (Some(a), Some(b)) = (RedisServer::start(), RedisServer::start()) else {
        return;
    };
    assert_ne!(a.port(), b.port());
    a.command(&["SET", "who", "a"]);
    b.command(&["SET", "who", "b"]);
    assert_eq!(a.command(&["GET", "who"]), "a");
    assert_eq!(b.command(&["GET", "who"]), "b");
}

#[test]
fn drop_kills_the_server() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let addr = server.addr();
    let pid = server.pid().expect("running");
    drop(server);
    assert!(!redis::ping(addr), "nothing answers on {addr} after drop");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "redis-server {pid} was killed and reaped"
    );
}

#[test]
fn required_only_for_a_non_empty_value_other_than_zero() {
    assert!(!redis::required(None));
    assert!(!redis::required(Some("")));
    assert!(!redis::required(Some("0")));
    assert!(redis::required(Some("1")));
    assert!(redis::required(Some("yes")));
}

/// Run [`probe_start_without_redis_on_path`] in a child copy of this test binary whose PATH
/// holds no `redis-server`, with `SLUICE_REQUIRE_REDIS` set to `require`.
fn probe(require: Option<&str>) -> std::process::Output {
    let empty = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "probe_start_without_redis_on_path",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("PATH", &empty)
        .env(PROBE_ENV, "1")
        .env_remove(REQUIRE_ENV);
    if let Some(value) = require {
        command.env(REQUIRE_ENV, value);
    }
    command.output().expect("run the test binary")
}

#[test]
fn without_redis_server_tests_skip_unless_it_is_required() {
    for require in [None, Some(""), Some("0")] {
        let output = probe(require);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{require:?}: {stdout}\n{stderr}");
        assert!(stdout.contains("probe: skipped"), "{require:?}: {stdout}");
        assert!(
            stderr.contains("skipped: redis-server not installed"),
            "{require:?}: {stderr}"
        );
    }
    for require in ["1", "true"] {
        let output = probe(Some(require));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{require}: {stdout}\n{stderr}");
        assert!(
            stderr.contains("redis-server is not on PATH but SLUICE_REQUIRE_REDIS"),
            "{require}: {stderr}"
        );
        assert!(!stdout.contains("probe: skipped"), "{require}: {stdout}");
    }
}

/// Does nothing in a normal run; in the child of
/// [`without_redis_server_tests_skip_unless_it_is_required`] it tries to start Redis.
#[test]
fn probe_start_without_redis_on_path() {
    if std::env::var_os(PROBE_ENV).is_none() {
        return;
    }
    match RedisServer::start() {
        Some(server) => println!("probe: started on {}", server.url()),
        None => println!("probe: skipped"),
    }
}
