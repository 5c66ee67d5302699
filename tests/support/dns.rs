//! A real DNS server for tests: dnsmasq on a free port of 127.0.0.1, authoritative for `.test`
//! (a name it does not list is NXDOMAIN, not a question passed on), answering from a hosts
//! file with a TTL of 1 s. [`Dnsmasq::set`] rewrites the file and sends SIGHUP, which makes
//! dnsmasq re-read it; SRV records are command-line options, so [`Dnsmasq::set_srv`] restarts
//! it on the same port. [`Dnsmasq::stop`] stops it (lookups then fail: nobody answers).
//!
//! Availability: [`Dnsmasq::start`] returns `None` (and says "skipped" on stderr) when
//! `dnsmasq` is missing, unless env `CI` is set: then it panics, so CI cannot pass by skipping.

use std::net::{IpAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A dnsmasq child process serving `.test` names from a hosts file.
pub struct Dnsmasq {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    srv: Vec<String>,
}

/// `dnsmasq` where Debian puts it (root's PATH has it; a user's may not).
fn find_dnsmasq() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("dnsmasq"))
        .find(|candidate| candidate.is_file())
}

impl Dnsmasq {
    /// Start with an empty hosts file; `None` when dnsmasq is not installed (outside CI).
    pub fn start() -> Option<Self> {
        let Some(_) = find_dnsmasq() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "dnsmasq is not installed (Debian package dnsmasq-base); CI must run this test"
            );
            eprintln!("skipped: dnsmasq is not installed (Debian package dnsmasq-base)");
            return None;
        };
        for _ in 0..20 {
            // A server that does not start removes its directory when dropped: one each try.
            let dir = std::env::temp_dir().join(format!(
                "sluice-dns-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).expect("a directory for the hosts file");
            std::fs::write(dir.join("hosts"), "").expect("write the hosts file");
            let port = UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("find a free UDP port")
                .port();
            let mut server = Self {
                port,
                dir,
                child: None,
                srv: Vec::new(),
            };
            if server.spawn() {
                return Some(server);
            }
        }
        panic!("dnsmasq did not start on any of 20 free ports");
    }

    /// `ip:port` of the server, for `[resolver] nameservers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Serve exactly `records` (address, name) from now on.
    pub fn set(&self, records: &[(IpAddr, &str)]) {
        self.set_hosts_file(records);
        self.signal("HUP");
    }

    /// Write `records` (address, name) to the hosts file, for the next (re)start.
    pub fn set_hosts_file(&self, records: &[(IpAddr, &str)]) {
        let text: String = records
            .iter()
            .map(|(ip, name)| format!("{ip} {name}\n"))
            .collect();
        std::fs::write(self.dir.join("hosts"), text).expect("write the hosts file");
    }

    /// Start again on the same port after [`Dnsmasq::stop`].
    pub fn start_again(&mut self) {
        assert!(self.spawn(), "dnsmasq starts again on port {}", self.port);
    }

    /// Serve exactly `records` as the SRV records of their names (name, target, port), the
    /// hosts file unchanged: dnsmasq is restarted on its port to take them.
    pub fn set_srv(&mut self, records: &[(&str, &str, u16)]) {
        self.srv = records
            .iter()
            .map(|(name, target, port)| format!("--srv-host={name},{target},{port}"))
            .collect();
        self.stop();
        self.start_again();
    }

    /// Stop answering: the process ends, its port stays unanswered.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start dnsmasq on `self.port`; false when it could not bind it.
    fn spawn(&mut self) -> bool {
        let dnsmasq = find_dnsmasq().expect("dnsmasq was found at start");
        let mut child = Command::new(dnsmasq)
            .args([
                "--keep-in-foreground",
                "--no-daemon",
                &format!("--port={}", self.port),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--local=/test/",
                "--local-ttl=1",
                "--user=root",
                "--pid-file=",
                &format!("--addn-hosts={}", self.dir.join("hosts").display()),
            ])
            .args(&self.srv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run dnsmasq");
        // Up once it answers; a process that exited could not bind the port.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if self.answers() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Whether a query reaches the server: a minimal DNS question for `up.test`, any answer.
    fn answers(&self) -> bool {
        let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
            return false;
        };
        let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
        // Header: id 1, recursion desired, one question; then "up.test" A IN.
        let query =
            b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x02up\x04test\x00\x00\x01\x00\x01";
        if socket.send_to(query, ("127.0.0.1", self.port)).is_err() {
            return false;
        }
        let mut answer = [0u8; 512];
        socket.recv_from(&mut answer).is_ok()
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("dnsmasq runs");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} dnsmasq");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
