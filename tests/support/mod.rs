//! Shared test support: mock endpoints that count what they receive ([`mock`]), clients
//! ([`client`]), sluice in-process ([`start_sluice`]) or as the real binary ([`process`]), a
//! real `redis-server` ([`redis`]), a fleet of replicas sharing it ([`fleet`]), and a real DNS
//! server ([`dns`]).
// Each test file uses a different part of this module.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod dns;
pub mod fleet;
pub mod mock;
pub mod process;
pub mod redis;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice::balance::Pool;
use sluice::config::{validate, Config};
use sluice::proxy::Proxy;
use sluice::App;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use client::*;
pub use mock::*;

/// How long a test waits for something that should happen "soon" before failing. Generous,
/// because waiting ends as soon as the condition holds.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Poll `condition` every few milliseconds until it holds; panic naming `what` after
/// [`DEADLINE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Ask `/readyz` at `admin` until it answers `status`; panic after [`DEADLINE`] with the last
/// answer.
pub async fn readyz_until(admin: SocketAddr, status: u16) -> Answer {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let answer = once(admin, get(admin, "/readyz")).await;
        if answer.status == status {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status}; last: {} {}",
            answer.status,
            answer.text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An autoscale rule for tests that want steps in seconds: +100% whenever the resource was
/// throttled in the last second (cooldown 1 s). Append after a `[[service.autoscale.profile]]`.
pub const DOUBLE_WHILE_THROTTLED: &str = r#"[[service.autoscale.profile.rule]]
metric = "throttled_requests"
statistic = "sum"
time_grain = "1s"
time_window = "1s"
time_aggregation = "total"
operator = "greater_than"
threshold = 0
direction = "increase"
type = "percent_change_count"
value = 100
cooldown = "1s"
"#;

/// A `kB` field ("VmRSS", "VmHWM") of /proc/PID/status; `pid` may be "self".
pub fn proc_status_kb(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Run the ignored test `child` of this test binary alone, in a process of its own, and fail
/// unless it ran and passed: for a test that measures the whole process (its RSS), which the
/// other tests of its binary would otherwise add to.
pub fn run_alone(child: &str) {
    let output = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            child,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("run the test binary again");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{child} failed:\n{text}");
    assert!(text.contains("1 passed"), "{child} did not run:\n{text}");
}

/// A config with the proxy and the admin API on ephemeral ports of 127.0.0.1, followed by
/// `rest`.
pub fn config(rest: &str) -> String {
    format!("[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{rest}")
}

/// One `[[service]]` named "scoring" at "/" over `urls`, with `extra` keys (one per line).
pub fn service(urls: &[String], extra: &str) -> String {
    let endpoints: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[[service]]\nname = \"scoring\"\npath_prefix = \"/\"\n{extra}\nendpoints = [{}]\n",
        endpoints.join(", ")
    )
}

/// The URLs of `mocks`.
pub fn urls(mocks: &[&Mock]) -> Vec<String> {
    mocks.iter().map(|m| m.url()).collect()
}

/// sluice running in this process.
pub struct Sluice {
    pub addr: SocketAddr,
    /// The admin API's address (`config()` enables it on an ephemeral port).
    pub admin: Option<SocketAddr>,
    pub proxy: Arc<Proxy>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Start sluice in-process from TOML text (use [`config`] for an ephemeral port).
pub async fn start_sluice(toml: &str) -> Sluice {
    start_sluice_with(toml, None, None).await
}

/// Start sluice in-process with an admin `token` and, to reload from, its config `file`.
pub async fn start_sluice_with(
    toml: &str,
    token: Option<&str>,
    file: Option<std::path::PathBuf>,
) -> Sluice {
    let config = Config::parse(toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
    let config = config
        .validated()
        .unwrap_or_else(|errors| panic!("test config is invalid: {errors:?}\n{toml}"));
    let mut app = App::bind(&config)
        .await
        .expect("sluice binds")
        .admin_token(token.map(str::to_owned));
    if let Some(file) = file {
        app = app.reload_from(file, config.clone());
    }
    let addr = app.proxy_addr();
    let admin = app.admin_addr();
    let proxy = app.proxy();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    Sluice {
        addr,
        admin,
        proxy,
        stop: Some(stop),
        task: Some(task),
    }
}

impl Sluice {
    /// The slots of service `i` (config order).
    pub fn pool(&self, i: usize) -> Arc<Pool> {
        Arc::clone(&self.proxy.policy().services[i].pool)
    }

    /// In flight at each endpoint of service `i`.
    pub fn endpoint_in_flight(&self, i: usize) -> Vec<u32> {
        let pool = self.pool(i);
        let shape = pool.shape();
        shape.endpoints.iter().map(|(e, _)| e.in_flight()).collect()
    }

    /// Every in-flight counter (service-wide and per endpoint) and queue, for messages.
    pub fn counters(&self) -> String {
        let policy = self.proxy.policy();
        policy
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    "{}: in_flight {} endpoints {:?} queue {}",
                    s.name,
                    s.pool.in_flight(),
                    self.endpoint_in_flight(i),
                    s.pool.queue_len()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// True when no slot is taken and nobody waits, in every service.
    pub fn is_idle(&self) -> bool {
        let policy = self.proxy.policy();
        policy.services.iter().all(|s| {
            s.pool.in_flight() == 0
                && s.pool.queue_len() == 0
                && s.pool
                    .shape()
                    .endpoints
                    .iter()
                    .all(|(e, _)| e.in_flight() == 0)
        })
    }

    /// Wait until every counter is back to 0 (invariant 1), failing with their values.
    pub async fn assert_idle(&self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !self.is_idle() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "slots still taken: {}",
                self.counters()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Begin a graceful shutdown (stop accepting, drain) without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shut down and wait until `run` returned.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        self.join().await;
    }

    /// Wait until `run` returned (after [`Sluice::begin_shutdown`]).
    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("sluice drains within the deadline")
                .expect("sluice's run task does not panic");
        }
    }
}
