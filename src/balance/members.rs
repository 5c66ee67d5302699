//! What a service's endpoint entries stand for: an entry is one endpoint, or — with
//! `resolve` — every address DNS found for its host, each an endpoint with the entry's scheme,
//! port (or the SRV record's), base path and cap, reached at its address and sent the name in
//! `Host`. The one place entries become endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::config::{Resolve, ServiceConfig};

/// An endpoint DNS found: where to connect, and the name it was found under (with the port)
/// for `Host`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    /// Address and port to connect to.
    pub addr: SocketAddr,
    /// `name:port` as the `Host` of requests to it.
    pub host: String,
}

/// The endpoints DNS found for each entry that asks to be resolved, by (URL, how): what the
/// discovery loop learned last. An entry with no answer yet stands for no endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovered(BTreeMap<(String, Resolve), Vec<Found>>);

impl Discovered {
    /// What `url` resolved as `how` stands for, if it was resolved.
    pub fn get(&self, url: &str, how: Resolve) -> Option<&[Found]> {
        self.0.get(&(url.to_owned(), how)).map(Vec::as_slice)
    }

    /// Record what `url` resolved as `how` stands for now (sorted, so every replica orders a
    /// name's endpoints alike).
    pub fn set(&mut self, url: &str, how: Resolve, mut found: Vec<Found>) {
        found.sort();
        found.dedup();
        self.0.insert((url.to_owned(), how), found);
    }

    /// How many entries were resolved.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Forget entries `keep` says are no longer wanted.
    pub fn retain(&mut self, mut keep: impl FnMut(&(String, Resolve)) -> bool) {
        self.0.retain(|entry, _| keep(entry));
    }
}

/// Where an endpoint came from, as `/admin/capacity` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Listed in the config file.
    Config,
    /// Added through the admin API.
    Admin,
    /// Found in DNS under this name.
    Dns(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config => f.write_str("config"),
            Self::Admin => f.write_str("admin"),
            Self::Dns(name) => write!(f, "dns:{name}"),
        }
    }
}

/// One endpoint of a service as its entries say: its URL (what identifies it), the `Host` it
/// is sent when that differs from the URL's authority, its cap, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// `scheme://host:port[/base]`; for a found endpoint, its address in place of the name.
    pub url: String,
    /// The `Host` of a found endpoint: the name it was found under.
    pub host: Option<String>,
    /// Its own cap, if its entry sets one (else the service's).
    pub own_cap: Option<crate::config::Cap>,
    /// Where it came from.
    pub source: Source,
}

/// The endpoints `service`'s entries stand for, given what DNS found: entries in order, a
/// name's endpoints in address order; an endpoint two entries name is listed once (first).
pub fn members(service: &ServiceConfig, discovered: &Discovered) -> Vec<Member> {
    let mut members: Vec<Member> = Vec::new();
    for entry in &service.endpoints {
        let source = match entry.from_admin() {
            true => Source::Admin,
            false => Source::Config,
        };
        let how = entry.resolve();
        let found = match how {
            Resolve::Off => {
                members.push(Member {
                    url: entry.url().to_owned(),
                    host: None,
                    own_cap: entry.max_concurrent(),
                    source,
                });
                continue;
            }
            _ => discovered.get(entry.url(), how).unwrap_or_default(),
        };
        let Ok(uri) = entry.url().parse::<http::Uri>() else {
            continue; // validation refuses such URLs first
        };
        let scheme = uri.scheme_str().unwrap_or("http");
        let path = uri.path().trim_end_matches('/');
        let name = uri.host().unwrap_or_default().to_owned();
        for f in found {
            let url = format!("{scheme}://{}{path}", f.addr);
            if members.iter().any(|m| m.url == url) {
                continue;
            }
            members.push(Member {
                url,
                host: Some(f.host.clone()),
                own_cap: entry.max_concurrent(),
                source: Source::Dns(name.clone()),
            });
        }
    }
    members
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_name_stands_for_each_address_with_the_entrys_port_path_and_cap() {
        let config = Config::parse(
            r#"
            [[service]]
            name = "s"
            endpoints = [
                "http://127.0.0.9:7000",
                { url = "http://scoring.test:8080/v1/", resolve = true, max_concurrent = 5 },
                { url = "http://_http._tcp.scoring.test", resolve = "srv" },
            ]
            "#,
        )
        .unwrap();
        let service = &config.services[0];
        let mut discovered = Discovered::default();
        // Nothing resolved yet: the names stand for no endpoint.
        let urls = |d: &Discovered| -> Vec<String> {
            members(service, d).into_iter().map(|m| m.url).collect()
        };
        assert_eq!(urls(&discovered), ["http://127.0.0.9:7000"]);
        let found = |addr: &str, host: &str| Found {
            addr: addr.parse().unwrap(),
            host: host.into(),
        };
        discovered.set(
            "http://scoring.test:8080/v1/",
            Resolve::Addresses,
            vec![
                found("127.0.0.3:8080", "scoring.test:8080"),
                found("[::1]:8080", "scoring.test:8080"),
                found("127.0.0.2:8080", "scoring.test:8080"),
            ],
        );
        discovered.set(
            "http://_http._tcp.scoring.test",
            Resolve::Srv,
            vec![
                found("127.0.0.2:8080", "a.scoring.test:8080"),
                found("127.0.0.4:9000", "b.scoring.test:9000"),
            ],
        );
        let all = members(service, &discovered);
        assert_eq!(
            all.iter().map(|m| m.url.as_str()).collect::<Vec<_>>(),
            [
                "http://127.0.0.9:7000",
                "http://127.0.0.2:8080/v1",
                "http://127.0.0.3:8080/v1",
                "http://[::1]:8080/v1",
                "http://127.0.0.2:8080",
                "http://127.0.0.4:9000",
            ]
        );
        assert_eq!(all[1].host.as_deref(), Some("scoring.test:8080"));
        assert_eq!(all[1].own_cap, Some(crate::config::Cap::Fixed(5)));
        assert_eq!(all[1].source.to_string(), "dns:scoring.test");
        assert_eq!(all[5].host.as_deref(), Some("b.scoring.test:9000"));
        assert_eq!(all[0].source, Source::Config);
    }
}
