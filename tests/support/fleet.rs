//! A fleet of real `sluice` processes (replicas) sharing one test `redis-server`: their
//! configs, starting them with an admin token, killing one like a crash (SIGKILL), their admin
//! views (`/admin/capacity`, `/readyz`, `/metrics`), and an open-loop load generator that
//! sends at a fixed rate whatever the answers take and records every request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use tokio::time::Instant;

use super::client::{collect, once, request, Answer};
use super::process::{start_binary_with_env, write_config, Running};

/// The admin token every replica gets (env `SLUICE_ADMIN_TOKEN`).
pub const TOKEN: &str = "fleet-admin-t0ken";

/// `store.heartbeat` of every test fleet: short, so joining (2 heartbeats) and a dead replica's
/// departure (3 heartbeats) take well under a second.
pub const HEARTBEAT: Duration = Duration::from_millis(200);

/// `store.timeout` of every test fleet. The default is 20 ms; on a loaded 2-core CI machine
/// running three debug replicas, Redis and the load generator, a healthy round trip
/// occasionally takes longer than 20 ms (the process is simply not scheduled), and every such
/// call switches that replica to `on_error` until its next heartbeat, which blurs what the
/// rate tests measure. 50 ms keeps those false alarms rare and still bounds every request.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(50);

/// Fleet tests time things and drive three processes each: they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Hold this for the whole test so fleet tests do not compete for the two cores.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// A replica's config: proxy and admin on ephemeral ports, `[store]` on `redis_url` with
/// `id`, `on_error` and the test heartbeat and timeout, then `services` (TOML).
pub fn replica_config(redis_url: &str, id: &str, on_error: &str, services: &str) -> String {
    replica_config_with(redis_url, id, on_error, HEARTBEAT, services)
}

/// [`replica_config`] with another `heartbeat`.
pub fn replica_config_with(
    redis_url: &str,
    id: &str,
    on_error: &str,
    heartbeat: Duration,
    services: &str,
) -> String {
    super::config(&format!(
        "[store]\nbackend = \"redis\"\nurl = \"{redis_url}\"\nreplica_id = \"{id}\"\n\
         on_error = \"{on_error}\"\nheartbeat = \"{}ms\"\ntimeout = \"{}ms\"\n\n{services}",
        heartbeat.as_millis(),
        STORE_TIMEOUT.as_millis()
    ))
}

/// One `sluice run` process of the fleet.
pub struct Replica {
    /// Its `store.replica_id`.
    pub id: String,
    /// Where its proxy listens.
    pub addr: SocketAddr,
    /// Where its admin API listens.
    pub admin: SocketAddr,
    process: Mutex<Running>,
}

impl Replica {
    /// Write `toml` to a file and start `sluice --log-format json run --config FILE` with the
    /// admin token; returns once it logged "sluice listening".
    pub async fn start(id: &str, toml: &str) -> Replica {
        Self::start_with_env(id, toml, &[]).await
    }

    /// [`Replica::start`] with more environment variables.
    pub async fn start_with_env(id: &str, toml: &str, env: &[(&str, &str)]) -> Replica {
        let path = write_config(&format!("fleet-{id}"), toml);
        let path = path.to_str().expect("temp paths are UTF-8");
        let mut env = env.to_vec();
        env.push(("SLUICE_ADMIN_TOKEN", TOKEN));
        let process = start_binary_with_env(&["run", "--config", path], &env).await;
        Replica {
            id: id.to_owned(),
            addr: process.addr,
            admin: process.admin.expect("fleet configs enable the admin API"),
            process: Mutex::new(process),
        }
    }

    /// Kill it like a crash: SIGKILL, no draining, no goodbye to the store.
    pub fn kill(&mut self) {
        self.kill_in_place();
    }

    /// [`Replica::kill`] through a shared reference (the process handle is behind a lock).
    pub fn kill_in_place(&self) {
        self.process.lock().unwrap().kill();
    }

    /// Everything it logged so far.
    pub fn output(&self) -> String {
        self.process.lock().unwrap().output()
    }

    /// Its JSON log lines whose message is `message`.
    pub fn logged(&self, message: &str) -> Vec<Value> {
        let lines = self.process.lock().unwrap().json_lines();
        lines
            .into_iter()
            .filter(|j| j["message"] == message)
            .collect()
    }

    /// Its access lines (target `sluice::access`), JSON.
    pub fn logged_access(&self) -> Vec<Value> {
        let lines = self.process.lock().unwrap().json_lines();
        lines
            .into_iter()
            .filter(|j| j["target"] == "sluice::access")
            .collect()
    }

    /// An admin call with the token (and a JSON body when `body` is not empty).
    pub async fn call(&self, method: &str, path: &str, body: &str) -> Answer {
        let mut req = request(method, self.admin, path, body.to_owned());
        req.headers_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        if !body.is_empty() {
            req.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
        }
        once(self.admin, req).await
    }

    /// `GET /admin/capacity`.
    pub async fn capacity(&self) -> Value {
        let answer = self.call("GET", "/admin/capacity", "").await;
        assert_eq!(answer.status, 200, "{}: {}", self.id, answer.text());
        answer.json()
    }

    /// Its `store` standing from `/admin/capacity`.
    pub async fn store(&self) -> Value {
        self.capacity().await["store"].clone()
    }

    /// `limit_tps` of resource `name` of the first service.
    pub async fn limit_tps(&self, name: &str) -> u64 {
        let capacity = self.capacity().await;
        resource_view(&capacity, name)["limit_tps"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no limit_tps for {name} in {capacity}", self.id))
    }

    /// `local_max_concurrent` of the first endpoint of the first service.
    pub async fn local_cap(&self) -> u64 {
        let capacity = self.capacity().await;
        capacity["services"][0]["endpoints"][0]["local_max_concurrent"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no local_max_concurrent in {capacity}", self.id))
    }

    /// `GET /readyz`: status code and body.
    pub async fn readyz(&self) -> (u16, Value) {
        let answer = self.call("GET", "/readyz", "").await;
        (answer.status.as_u16(), answer.json())
    }

    /// The value of a metric without labels in `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.call("GET", "/metrics", "").await.text();
        metric(&text, name).unwrap_or_else(|| panic!("{}: no {name} in /metrics:\n{text}", self.id))
    }

    /// Wait until `/readyz` answers 200 "ready" (a replica that starts is "joining the fleet"
    /// for 2 heartbeats).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + super::DEADLINE;
        loop {
            let (status, body) = self.readyz().await;
            if status == 200 && body["status"] == "ready" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} not ready: {status} {body}\noutput:\n{}",
                self.id,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A resource's entry in a capacity view (first service).
pub fn resource_view(capacity: &Value, name: &str) -> Value {
    capacity["services"][0]["resources"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no resource {name} in {capacity}"))
}

/// The value of the unlabelled sample `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        // sluice writes an empty label set as `{}`.
        let rest = rest.strip_prefix("{}").unwrap_or(rest);
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Start one replica per id with `services` on `redis_url` (all at once), wait until each is
/// ready and every one counts the whole fleet.
pub async fn start_fleet(
    redis_url: &str,
    ids: &[&str],
    on_error: &str,
    services: &str,
) -> Vec<Replica> {
    start_fleet_with(redis_url, ids, on_error, STORE_TIMEOUT, services).await
}

/// [`start_fleet`] with another `store.timeout`.
pub async fn start_fleet_with(
    redis_url: &str,
    ids: &[&str],
    on_error: &str,
    timeout: Duration,
    services: &str,
) -> Vec<Replica> {
    let starting: Vec<_> = ids
        .iter()
        .map(|id| {
            let toml = replica_config(redis_url, id, on_error, services).replace(
                &format!("timeout = \"{}ms\"", STORE_TIMEOUT.as_millis()),
                &format!("timeout = \"{}ms\"", timeout.as_millis()),
            );
            let id = id.to_string();
            tokio::spawn(async move { Replica::start(&id, &toml).await })
        })
        .collect();
    let mut replicas = Vec::new();
    for replica in starting {
        replicas.push(replica.await.expect("replica start"));
    }
    for replica in &replicas {
        replica.wait_ready().await;
    }
    wait_for_fleet(&replicas.iter().collect::<Vec<_>>(), ids.len()).await;
    replicas
}

/// Wait until each of `replicas` is up, joined, and counts `size` live replicas.
pub async fn wait_for_fleet(replicas: &[&Replica], size: usize) {
    let deadline = Instant::now() + super::DEADLINE;
    for replica in replicas {
        loop {
            let store = replica.store().await;
            if store["up"] == true && store["joined"] == true && store["replicas"] == size {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} does not count {size} replicas: {store}",
                replica.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The first service's TOML: one endpoint `url` (cap `max_concurrent`), `extra` service keys,
/// and resource "team-a" (key "key-a") at `tps` with `burst`.
pub fn rated_service(url: &str, extra: &str, tps: u32, burst: u32) -> String {
    format!(
        "{}\n[service.rate_limit]\ndefault_tps = {tps}\n\n\
         [[service.resource]]\nname = \"team-a\"\nkey = \"key-a\"\ntps = {tps}\nburst = {burst}\n",
        super::service(&[url.to_owned()], extra)
    )
}

/// One request of an open-loop load.
#[derive(Debug, Clone)]
pub struct Shot {
    /// Which target it went to (index in the target list).
    pub target: usize,
    /// When it was due, from the start of the load.
    pub due: Duration,
    /// When it was actually sent, from the start of the load.
    pub sent: Duration,
    /// From sending to the whole answer (or the error).
    pub latency: Duration,
    /// The answer's status; 0 when there was none (connection refused or broken).
    pub status: u16,
    /// `reason` of sluice's own JSON answers.
    pub reason: Option<String>,
}

impl Shot {
    /// How late it was sent.
    pub fn lag(&self) -> Duration {
        self.sent.saturating_sub(self.due)
    }

    /// Admitted and answered 2xx by the endpoint.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Where an open-loop load sends: the addresses of its targets, and which are live (a dead
/// one is skipped, its share of the rate goes to the others).
#[derive(Clone)]
pub struct Targets {
    addrs: Vec<SocketAddr>,
    live: Arc<Vec<AtomicBool>>,
}

impl Targets {
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        let live = addrs.iter().map(|_| AtomicBool::new(true)).collect();
        Self {
            addrs,
            live: Arc::new(live),
        }
    }

    /// Stop sending to target `i`.
    pub fn drop_target(&self, i: usize) {
        self.live[i].store(false, Ordering::SeqCst);
    }

    /// The live target the `k`-th request goes to: round robin over the live ones.
    fn pick(&self, k: u64) -> Option<usize> {
        let live: Vec<usize> = (0..self.addrs.len())
            .filter(|&i| self.live[i].load(Ordering::SeqCst))
            .collect();
        (!live.is_empty()).then(|| live[(k % live.len() as u64) as usize])
    }
}

/// A load running in the background; [`RunningLoad::stop`] ends it and returns every request.
pub struct RunningLoad {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Shot>>,
    /// When the load started.
    pub started: Instant,
}

impl RunningLoad {
    /// Stop sending, wait for the answers in flight, and return every request in due order.
    pub async fn stop(self) -> Vec<Shot> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("load generator")
    }

    /// Wait until a load with a duration has sent everything and every answer is in.
    pub async fn finish(self) -> Vec<Shot> {
        self.task.await.expect("load generator")
    }
}

/// Send GET /score with `x-api-key: key` to `targets` at `rate` per second, on a fixed
/// schedule (request k is due at k / rate: open loop, nobody waits for an answer before
/// sending the next), until stopped or for `limit`.
pub fn open_loop(targets: Targets, key: &str, rate: f64, limit: Option<Duration>) -> RunningLoad {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let key: http::HeaderValue = key.parse().expect("key");
    let client = super::client::pool();
    let stopping = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let mut sent = Vec::new();
        let total = limit.map_or(u64::MAX, |l| (l.as_secs_f64() * rate).round() as u64);
        for k in 0..total {
            let due = Duration::from_secs_f64(k as f64 / rate);
            tokio::time::sleep_until(started + due).await;
            if stopping.load(Ordering::SeqCst) {
                break;
            }
            let Some(target) = targets.pick(k) else {
                continue;
            };
            let addr = targets.addrs[target];
            let client = client.clone();
            let key = key.clone();
            sent.push(tokio::spawn(async move {
                let at = Instant::now();
                let mut req = super::client::get(addr, "/score");
                req.headers_mut().insert("x-api-key", key);
                let answer: Option<Answer> = match client.request(req).await {
                    Ok(response) => collect(response).await.ok(),
                    Err(_) => None,
                };
                let latency = at.elapsed();
                let (status, reason) = match &answer {
                    Some(a) => {
                        let reason = (!a.status.is_success())
                            .then(|| serde_json::from_slice::<Value>(&a.body).ok())
                            .flatten()
                            .and_then(|j| j["reason"].as_str().map(str::to_owned));
                        (a.status.as_u16(), reason)
                    }
                    None => (0, None),
                };
                Shot {
                    target,
                    due,
                    sent: at - started,
                    latency,
                    status,
                    reason,
                }
            }));
        }
        let mut shots = Vec::with_capacity(sent.len());
        for shot in sent {
            shots.push(shot.await.expect("request task"));
        }
        shots
    });
    RunningLoad {
        stop,
        task,
        started,
    }
}

/// `n`-th percentile (0..=100) of `values` (sorted here).
pub fn percentile(values: &mut [Duration], n: usize) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    values[(values.len() - 1) * n / 100]
}

/// Count of `shots` matching `pred`.
pub fn count(shots: &[Shot], pred: impl Fn(&Shot) -> bool) -> usize {
    shots.iter().filter(|s| pred(s)).count()
}

/// Closed-loop clients: `per_target[i]` clients keep one request each in flight to target i
/// (a new one as soon as the last is answered) until `stop` is set. Returns the statuses seen.
pub fn closed_loop(
    addrs: &[SocketAddr],
    per_target: &[usize],
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u16>> {
    let mut clients = Vec::new();
    for (&addr, &n) in addrs.iter().zip(per_target) {
        for _ in 0..n {
            let stop = Arc::clone(&stop);
            clients.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                let mut connection: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> =
                    None;
                while !stop.load(Ordering::SeqCst) {
                    let usable = match connection.as_mut() {
                        Some(s) => s.ready().await.is_ok(),
                        None => false,
                    };
                    if !usable {
                        connection = Some(super::client::connect_http1(addr).await);
                    }
                    let sender = connection.as_mut().expect("connected");
                    let status = match sender.send_request(super::client::get(addr, "/")).await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let _ = collect(response).await;
                            status
                        }
                        Err(_) => {
                            connection = None;
                            0
                        }
                    };
                    statuses.push(status);
                }
                statuses
            }));
        }
    }
    tokio::spawn(async move {
        let mut all = Vec::new();
        for client in clients {
            all.extend(client.await.expect("client task"));
        }
        all
    })
}

/// Sample `/readyz` of each of `admins` every 25 ms until `stop`: for each, every answer that
/// differs from the one before, with when it came (from the start of the watch).
pub fn watch_readiness(
    admins: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Vec<(Duration, u16, Value)>>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut seen: Vec<Vec<(Duration, u16, Value)>> = vec![Vec::new(); admins.len()];
        while !stop.load(Ordering::SeqCst) {
            for (i, &admin) in admins.iter().enumerate() {
                let mut req = super::client::get(admin, "/readyz");
                req.headers_mut()
                    .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
                let answer = once(admin, req).await;
                let (status, body) = (answer.status.as_u16(), answer.json());
                if seen[i].last().map(|(_, s, b)| (*s, b)) != Some((status, &body)) {
                    seen[i].push((started.elapsed(), status, body));
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        seen
    })
}

/// A TCP relay to Redis that a test can cut, to take one replica off the store while the
/// others keep it (a network partition): cutting breaks every relayed connection and refuses
/// the new ones (accepted, then closed at once) until [`Gate::restore`].
pub struct Gate {
    /// Where the relay listens.
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// A relay to `to` on an ephemeral port of 127.0.0.1, open.
    pub async fn start(to: SocketAddr) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accept = {
            let open = Arc::clone(&open);
            let connections = Arc::clone(&connections);
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if !open.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(relay);
                }
            })
        };
        Gate {
            addr,
            open,
            connections,
            accept,
        }
    }

    /// `redis://` URL of the relay.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Break every relayed connection and refuse new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for relay in self.connections.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    /// Relay again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.accept.abort();
        for relay in self.connections.lock().unwrap().drain(..) {
            relay.abort();
        }
    }
}
