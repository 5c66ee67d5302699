//! The real `sluice` binary as a subprocess: temp config files, `check`, and
//! `run`/`demo`/`demo-endpoints` with their output captured line by line.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// The binary, with the environment variables it reads cleared.
pub fn sluice_bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.env_remove("SLUICE_LOG").env_remove("SLUICE_CONFIG");
    command
}

/// Write `text` to a fresh file under the target's temp dir.
pub fn write_config(name: &str, text: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sluice-tests");
    std::fs::create_dir_all(&dir).expect("create the temp config dir");
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{name}-{}-{n}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write a temp config");
    path
}

/// `sluice check --config PATH`.
pub fn check(path: &Path) -> Output {
    sluice_bin()
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run sluice check")
}

/// A running `sluice` process with its stdout and stderr collected.
pub struct Running {
    child: Child,
    /// Where its proxy listens (for `demo-endpoints`: its first endpoint).
    pub addr: SocketAddr,
    /// Where its admin API listens, if enabled.
    pub admin: Option<SocketAddr>,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Start `sluice --log-format json ARGS...` and wait until its proxy listens.
pub async fn start_binary(args: &[&str]) -> Running {
    start_binary_with_env(args, &[]).await
}

/// [`start_binary`] with environment variables (e.g. `SLUICE_ADMIN_TOKEN`).
pub async fn start_binary_with_env(args: &[&str], env: &[(&str, &str)]) -> Running {
    start_binary_until(args, env, listening_addr).await.0
}

/// Start `sluice --log-format json demo-endpoints ARGS...` and wait until its endpoints
/// listen; returns their addresses, in port order as given.
pub async fn start_demo_endpoints(args: &[&str]) -> (Running, Vec<SocketAddr>) {
    let args: Vec<&str> = ["demo-endpoints"].iter().chain(args).copied().collect();
    start_binary_until(&args, &[], |rx| {
        let json = next_log_line(rx, "demo endpoints listening")?;
        let addrs: Vec<SocketAddr> = json["endpoints"]
            .as_str()?
            .split(", ")
            .map(|url| url.strip_prefix("http://")?.parse().ok())
            .collect::<Option<_>>()?;
        Some(((*addrs.first()?, None), addrs))
    })
    .await
}

/// A process's main address and its admin address, if any (see [`Running`]).
type Addrs = (SocketAddr, Option<SocketAddr>);

/// Start `sluice --log-format json ARGS...`; `ready` reads its output lines until it returns
/// the (address, admin address) for [`Running`] and anything else the caller wants, or `None`
/// when the output ended or took longer than the deadline.
async fn start_binary_until<T: Send + 'static>(
    args: &[&str],
    env: &[(&str, &str)],
    ready: impl FnOnce(&mpsc::Receiver<String>) -> Option<(Addrs, T)> + Send + 'static,
) -> (Running, T) {
    let mut child = sluice_bin()
        .envs(env.iter().copied())
        .arg("--log-format")
        .arg("json")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let readers = vec![
        collect_lines(child.stdout.take().expect("stdout"), &lines, tx.clone()),
        collect_lines(child.stderr.take().expect("stderr"), &lines, tx),
    ];
    let found = tokio::task::spawn_blocking(move || ready(&rx))
        .await
        .expect("reader thread");
    let Some(((addr, admin), extra)) = found else {
        let _ = child.kill();
        let output = lines.lock().unwrap().join("\n");
        panic!("sluice did not report its address; output:\n{output}");
    };
    let running = Running {
        child,
        addr,
        admin,
        lines,
        readers,
    };
    (running, extra)
}

fn collect_lines(
    stream: impl Read + Send + 'static,
    lines: &Arc<Mutex<Vec<String>>>,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    let lines = Arc::clone(lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    })
}

/// The proxy and admin addresses from the "sluice listening" log line.
fn listening_addr(rx: &mpsc::Receiver<String>) -> Option<(Addrs, ())> {
    let json = next_log_line(rx, "sluice listening")?;
    let admin = json["admin"].as_str().and_then(|a| a.parse().ok());
    Some(((json["proxy"].as_str()?.parse().ok()?, admin), ()))
}

/// The next JSON log line with `message`, within the deadline.
fn next_log_line(rx: &mpsc::Receiver<String>, message: &str) -> Option<serde_json::Value> {
    let deadline = std::time::Instant::now() + super::DEADLINE;
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        let line = rx.recv_timeout(left).ok()?;
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if json["message"] == message {
            return Some(json);
        }
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `kB` field of /proc/PID/status, e.g. "VmRSS" or "VmHWM".
    pub fn status_kb(&self, field: &str) -> u64 {
        super::proc_status_kb(&self.pid().to_string(), field)
    }

    /// Send a signal by name ("TERM", "INT").
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg("-s")
            .arg(name)
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Wait for the process to exit, at most `limit`; then all its output has been read.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The pipes are at their end once the process is gone.
                for reader in self.readers.drain(..) {
                    reader.join().expect("output reader");
                }
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sluice did not exit within {limit:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL (like a crash) if it still runs, and reap it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Everything it wrote so far, stdout and stderr interleaved by arrival.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Its output lines parsed as JSON (lines that are not JSON are skipped).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}
