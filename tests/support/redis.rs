//! A real `redis-server` for tests: started on a free port of 127.0.0.1 without persistence,
//! stopped and started again on the same port (empty, like a restart without persistence),
//! killed on drop. The port is chosen below the kernel's ephemeral range so nothing else takes
//! it while the server is stopped. Plus a raw RESP client for reading keys or flushing, so tests need no Redis
//! crate.
//!
//! Availability: [`RedisServer::start`] returns `None` (and says "skipped" on stderr) when
//! `redis-server` is not on PATH, unless env `SLUICE_REQUIRE_REDIS` is set (non-empty, not
//! "0"): then it panics, so CI cannot pass by skipping.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The env var that turns a missing `redis-server` into a failure instead of a skip.
pub const REQUIRE_ENV: &str = "SLUICE_REQUIRE_REDIS";

/// How long one raw command may take to connect, send or answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A `redis-server` child process listening on 127.0.0.1.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Everything the server printed, across restarts, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
    /// Its working directory: where `SAVE` writes a snapshot and a start reads one.
    dir: PathBuf,
}

/// Whether `value` (of [`REQUIRE_ENV`]) asks for a missing `redis-server` to fail the test.
pub fn required(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// `redis-server` on PATH, if any.
pub fn find_redis_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A port of 127.0.0.1 that was free a moment ago (the OS picked it; the listener is dropped).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// A free port for a server that must come back on the same port after a stop: below the
/// kernel's ephemeral range when there is room, so that neither a `:0` listener nor the local
/// end of an outgoing connection (a test under load makes thousands) takes it while the
/// server is down. Falls back to [`free_port`].
fn restartable_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(0);
    if low > 12_000 {
        use rand::Rng;
        for _ in 0..50 {
            let port = rand::thread_rng().gen_range(10_000..low);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    free_port()
}

impl RedisServer {
    /// Start `redis-server` on a free port and wait until it answers PING. `None` when it is
    /// not installed and [`REQUIRE_ENV`] is not set; panics when it is required but missing,
    /// or installed but does not start.
    pub fn start() -> Option<RedisServer> {
        let Some(binary) = find_redis_server() else {
            let setting = std::env::var(REQUIRE_ENV).ok();
            if required(setting.as_deref()) {
                panic!(
                    "redis-server is not on PATH but {REQUIRE_ENV}={:?} requires it: install it \
                     (Debian/Ubuntu: `apt-get install -y redis-server`, or run .ci/install-redis)",
                    setting.unwrap_or_default()
                );
            }
            eprintln!(
                "skipped: redis-server not installed (set {REQUIRE_ENV}=1 to make this a failure)"
            );
            return None;
        };
        // Another process may take the port between our probe and redis-server's bind: then
        // redis-server exits at once and we try another port.
        let mut failures = Vec::new();
        for _ in 0..5 {
            let port = restartable_port();
            let dir =
                std::env::temp_dir().join(format!("sluice-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a directory for redis-server");
            let mut server = RedisServer {
                port,
                child: None,
                log: Arc::default(),
                dir,
            };
            match server.spawn(&binary) {
                Ok(()) => return Some(server),
                Err(why) => failures.push(why),
            }
        }
        panic!(
            "redis-server ({}) did not start:\n{}",
            binary.display(),
            failures.join("\n---\n")
        );
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT`, for a `[store]` url.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kill the server (SIGKILL, like a crash) and wait for it; its data is gone. Clients see
    /// their connections reset and new connections refused.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Write a snapshot of its data as it is now (`SAVE`: an RDB file, what a backup holds)
    /// and return it, for [`RedisServer::restore`].
    pub fn snapshot(&self) -> Vec<u8> {
        assert_eq!(self.command(&["SAVE"]), "OK");
        std::fs::read(self.dir.join(SNAPSHOT)).expect("the snapshot SAVE wrote")
    }

    /// Restart on the same port from `snapshot`, as an operator restoring a backup: its data
    /// is what it was when the snapshot was taken.
    pub fn restore(&mut self, snapshot: &[u8]) {
        self.stop();
        std::fs::write(self.dir.join(SNAPSHOT), snapshot).expect("write the snapshot");
        self.launch();
    }

    /// Start a fresh, empty server on the same port (after [`RedisServer::stop`], or after
    /// killing the current one). Panics when it does not come up.
    pub fn start_again(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.dir.join(SNAPSHOT));
        self.launch();
    }

    /// Start the server again on its port, from whatever its directory holds.
    fn launch(&mut self) {
        let binary = find_redis_server().expect("redis-server was on PATH a moment ago");
        // The old process is gone, but give the kernel a moment if the bind races its exit.
        let deadline = Instant::now() + super::DEADLINE;
        loop {
            match self.spawn(&binary) {
                Ok(()) => return,
                Err(why) if Instant::now() >= deadline => {
                    panic!(
                        "redis-server did not start again on port {}:\n{why}",
                        self.port
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Everything the server wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Send one command (e.g. `["SET", "k", "v"]`) and return its reply as text: a simple
    /// string or an integer as written ("OK", "1"), an error with its leading '-' ("-ERR ..."),
    /// a bulk string as its content, a nil as "(nil)", an array as its elements joined by
    /// '\n' ("" when empty). Panics when the server cannot be reached.
    pub fn command(&self, args: &[&str]) -> String {
        try_command(self.addr(), args).unwrap_or_else(|e| {
            panic!(
                "redis {args:?} on port {}: {e}\nserver log:\n{}",
                self.port,
                self.log()
            )
        })
    }

    /// Every key matching `pattern` (e.g. `"sluice:*"`) with its value as text: a string as
    /// it is, a hash, set, sorted set or list as its fields/members (and scores) joined by
    /// '\n'. A value that is not UTF-8 is shown as `<binary>`.
    pub fn dump(&self, pattern: &str) -> Vec<(String, String)> {
        let keys = self.command(&["KEYS", pattern]);
        keys.lines()
            .filter(|key| !key.is_empty())
            .map(|key| {
                let read: &[&str] = match self.command(&["TYPE", key]).as_str() {
                    "string" => &["GET", key],
                    "hash" => &["HGETALL", key],
                    "set" => &["SMEMBERS", key],
                    "zset" => &["ZRANGE", key, "0", "-1", "WITHSCORES"],
                    "list" => &["LRANGE", key, "0", "-1"],
                    // Expired between KEYS and TYPE.
                    _ => &[],
                };
                let value = if read.is_empty() {
                    String::new()
                } else {
                    try_command(self.addr(), read).unwrap_or_else(|_| "<binary>".into())
                };
                (key.to_owned(), value)
            })
            .collect()
    }

    /// Whether it answers PING right now.
    pub fn ping(&self) -> bool {
        ping(self.addr())
    }

    fn spawn(&mut self, binary: &std::path::Path) -> Result<(), String> {
        let mut child = Command::new(binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--dbfilename", SNAPSHOT])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let first_line = self.log.lock().unwrap().len();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let log = Arc::clone(&self.log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line);
                }
            });
        }
        let deadline = Instant::now() + super::DEADLINE;
        loop {
            if ping(self.addr()) && serves_pid(self.addr(), child.id()) {
                self.child = Some(child);
                return Ok(());
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                if exited.is_none() {
                    let _ = child.kill();
                }
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                // Let the reader threads catch the last lines.
                std::thread::sleep(Duration::from_millis(50));
                let log = self.log.lock().unwrap()[first_line..].join("\n");
                return Err(format!(
                    "port {}: no PONG ({status}); output:\n{log}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The file name of a snapshot in a server's directory.
const SNAPSHOT: &str = "dump.rdb";

/// Whether something at `addr` answers an inline `PING` with `+PONG`.
pub fn ping(addr: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = connect(addr)?;
        stream.write_all(b"PING\r\n")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line == "+PONG\r\n")
    };
    attempt().unwrap_or(false)
}

/// Whether the Redis at `addr` is process `pid` (and not another that took the port first).
fn serves_pid(addr: SocketAddr, pid: u32) -> bool {
    try_command(addr, &["INFO", "server"]).is_ok_and(|info| {
        info.lines()
            .any(|l| l.trim() == format!("process_id:{pid}"))
    })
}

/// Send one command to the Redis at `addr` as a RESP array and read one reply (see
/// [`RedisServer::command`] for how it is rendered).
pub fn try_command(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    let mut stream = connect(addr)?;
    stream.write_all(&request)?;
    read_reply(&mut BufReader::new(stream))
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn read_reply(reader: &mut impl BufRead) -> std::io::Result<String> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = line
        .strip_suffix("\r\n")
        .ok_or_else(|| bad(format!("reply line without CRLF: {line:?}")))?;
    let (kind, rest) = line.split_at(line.len().min(1));
    let length = || -> std::io::Result<i64> {
        rest.parse()
            .map_err(|_| bad(format!("bad length in {line:?}")))
    };
    match kind {
        "+" | ":" => Ok(rest.to_owned()),
        "-" => Ok(line.to_owned()),
        "$" => match length()? {
            -1 => Ok("(nil)".into()),
            n => {
                let mut bulk = vec![0; usize::try_from(n).map_err(|_| bad(line.into()))? + 2];
                reader.read_exact(&mut bulk)?;
                bulk.truncate(bulk.len() - 2);
                String::from_utf8(bulk).map_err(|e| bad(e.to_string()))
            }
        },
        "*" => match length()? {
            -1 => Ok("(nil)".into()),
            n => {
                let items = (0..n)
                    .map(|_| read_reply(reader))
                    .collect::<std::io::Result<Vec<_>>>()?;
                Ok(items.join("\n"))
            }
        },
        _ => Err(bad(format!("unexpected reply {line:?}"))),
    }
}

/// A quota of `tps` with `burst`, for lease and store tests.
pub fn quota(tps: u32, burst: u32) -> sluice::limit::Quota {
    sluice::limit::Quota::new(
        std::num::NonZeroU32::new(tps).expect("tps > 0"),
        std::num::NonZeroU32::new(burst),
    )
}

/// Replica `id` of a fleet on `redis`, connected directly (no proxy around it). Its store
/// timeout is generous: a loaded CI machine; tests that measure the bound set their own.
pub fn store_fleet(redis: &RedisServer, id: &str) -> Arc<sluice::store::Fleet> {
    let config = sluice::config::StoreConfig {
        backend: sluice::config::Backend::Redis,
        url: redis.url(),
        replica_id: id.into(),
        timeout: Duration::from_millis(500),
        ..sluice::config::StoreConfig::default()
    };
    sluice::store::Fleet::connect(&config).expect("a fleet on the test's redis-server")
}

/// A clock in ns since `start` for a lease (the limiter's clock in production).
pub fn lease_clock(start: Instant) -> impl Fn() -> u64 + Clone {
    move || start.elapsed().as_nanos() as u64
}
