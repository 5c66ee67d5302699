//! DNS discovery: every endpoint entry with `resolve` is looked up — A and AAAA for
//! `resolve = true`, SRV (then each target's addresses) for `"srv"` — when its records expire,
//! no sooner than `[resolver] min_ttl` and no later than `max_ttl`. A new answer rebuilds the
//! policy in force through [`Control::rediscovered`], so the endpoints that joined or left are
//! events and capacity follows. A lookup that fails keeps the last known endpoints (a DNS
//! hiccup never empties a service) and is retried after `min_ttl`; an answer that the name
//! has none (NXDOMAIN, no records) is an empty set. Lookups run off the request path.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, ResolverOpts};
use hickory_resolver::config::{NameServerConfig, ResolverConfig as ServersConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Control;
use crate::balance::Found;
use crate::config::{Config, Resolve, ResolverConfig};

/// How often the loop looks for lookups that are due and for entries a change added.
const TICK: Duration = Duration::from_millis(100);

/// An entry to resolve: its URL and how.
type Entry = (String, Resolve);

/// What one lookup found.
enum Answer {
    /// The endpoints the name stands for (empty: it has none), how long the answer holds,
    /// and how many more the answer had than `max_endpoints` let in.
    Found(Vec<Found>, Duration, usize),
    /// No answer: why.
    Failed(String),
}

/// Keep every entry with `resolve` in the live policy resolved until aborted.
pub async fn run(control: Arc<Control>) {
    let live = Arc::clone(control.live());
    let mut known = (*live.discovered()).clone();
    let mut resolver: Option<(ResolverConfig, Arc<TokioResolver>)> = None;
    let mut unbuildable: Option<(ResolverConfig, Instant)> = None;
    let mut due: HashMap<Entry, Instant> = HashMap::new();
    let mut failing: HashSet<Entry> = HashSet::new();
    let mut lookups: JoinSet<(Entry, Answer)> = JoinSet::new();
    let mut running: HashSet<Entry> = HashSet::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut changes: Vec<String> = Vec::new();
        tokio::select! {
            _ = ticker.tick() => {
                let policy = live.policy();
                let settings = &policy.config.resolver;
                let wanted = wanted(&policy.config);
                let before = known.len();
                known.retain(|entry| wanted.contains(entry));
                if known.len() != before {
                    changes.push("an entry to resolve was removed".into());
                }
                due.retain(|entry, _| wanted.contains(entry));
                if wanted.is_empty() {
                    resolver = None;
                } else {
                    let resolver = match &resolver {
                        Some((built, r)) if built == settings => Arc::clone(r),
                        // It could not be built with these settings a moment ago: try again
                        // after min_ttl, and say so once.
                        _ if unbuildable.as_ref().is_some_and(|(failed, at): &(ResolverConfig, Instant)| {
                            failed == settings && at.elapsed() < settings.min_ttl
                        }) => continue,
                        _ => match build(settings) {
                            Ok(r) => {
                                unbuildable = None;
                                Arc::clone(&resolver.insert((settings.clone(), Arc::new(r))).1)
                            }
                            Err(why) => {
                                if unbuildable.as_ref().is_none_or(|(failed, _)| failed != settings) {
                                    tracing::error!(error = %why, "cannot build the DNS resolver (no /etc/resolv.conf? set [resolver] nameservers); endpoints to resolve keep what they had");
                                }
                                unbuildable = Some((settings.clone(), Instant::now()));
                                continue;
                            }
                        },
                    };
                    let now = Instant::now();
                    for entry in wanted {
                        if running.contains(&entry) || due.get(&entry).is_some_and(|&d| d > now) {
                            continue;
                        }
                        running.insert(entry.clone());
                        let (resolver, settings) = (Arc::clone(&resolver), settings.clone());
                        lookups.spawn(async move {
                            let answer = look_up(&resolver, &settings, &entry).await;
                            (entry, answer)
                        });
                    }
                }
            }
            Some(Ok((entry, answer))) = lookups.join_next() => {
                running.remove(&entry);
                let settings = live.policy().config.resolver.clone();
                let name = name_of(&entry.0);
                let next = match answer {
                    Answer::Found(found, ttl, cut) => {
                        control.dns().count(&name, Some(found.len()));
                        if failing.remove(&entry) {
                            tracing::info!(name, endpoints = found.len(), "DNS lookups of an endpoint name answer again");
                        }
                        if cut > 0 {
                            tracing::warn!(name, cut, max_endpoints = settings.max_endpoints, "a DNS answer had more endpoints than max_endpoints; the rest were left out");
                        }
                        if known.get(&entry.0, entry.1) != Some(found.as_slice()) {
                            changes.push(format!("DNS: {name} has {} endpoint(s)", found.len()));
                            known.set(&entry.0, entry.1, found);
                        }
                        settings.next_lookup(ttl)
                    }
                    Answer::Failed(why) => {
                        control.dns().count(&name, None);
                        if failing.insert(entry.clone()) {
                            let kept = known.get(&entry.0, entry.1).map_or(0, <[Found]>::len);
                            tracing::warn!(name, error = %why, kept, "DNS lookup of an endpoint name failed; its last known endpoints stay");
                        }
                        settings.min_ttl
                    }
                };
                due.insert(entry, Instant::now() + next);
            }
        }
        if !changes.is_empty() {
            let reason = changes.join("; ");
            if let Err(e) = control.rediscovered(known.clone(), &reason).await {
                tracing::error!(error = %e, "what DNS found could not be applied");
            }
        }
    }
}

/// Every entry of `config` to resolve.
fn wanted(config: &Config) -> BTreeSet<Entry> {
    config
        .services
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| !e.resolve().is_off())
        .map(|e| (e.url().to_owned(), e.resolve()))
        .collect()
}

/// The host of `url`, the name it is looked up under.
fn name_of(url: &str) -> String {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
        .unwrap_or_else(|| url.to_owned())
}

/// A resolver that asks `settings.nameservers` (else the system's), once per lookup within
/// `timeout`, without a cache of its own (the loop schedules lookups by TTL).
fn build(settings: &ResolverConfig) -> Result<TokioResolver, ResolveError> {
    let provider = TokioConnectionProvider::default();
    let mut builder = match settings.nameserver_addrs() {
        servers if servers.is_empty() => TokioResolver::builder(provider)?,
        servers => {
            let mut config = ServersConfig::new();
            for addr in servers.into_iter().flatten() {
                config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(addr, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(config, provider)
        }
    };
    let options: &mut ResolverOpts = builder.options_mut();
    options.timeout = settings.timeout;
    options.attempts = 1;
    options.cache_size = 0;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    Ok(builder.build())
}

/// Look `entry` up: what it stands for, or why there is no answer.
async fn look_up(resolver: &TokioResolver, settings: &ResolverConfig, entry: &Entry) -> Answer {
    let Ok(uri) = entry.0.parse::<http::Uri>() else {
        return Answer::Failed(format!("{:?} is not a URL", entry.0)); // validation refuses it first
    };
    let host = uri.host().unwrap_or_default().to_owned();
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    // `timeout` bounds the whole lookup (an SRV answer's targets included), whatever the
    // resolver does (it may try a server over UDP, then TCP).
    let bound = settings.timeout;
    let outcome = match entry.1 {
        Resolve::Srv => tokio::time::timeout(bound, srv(resolver, &host)).await,
        _ => tokio::time::timeout(bound, addresses(resolver, &host, port, &uri)).await,
    };
    let (mut found, ttl) = match outcome {
        Err(_) => return Answer::Failed(format!("no answer within {bound:?}")),
        Ok(Err(e)) if e.is_no_records_found() => (Vec::new(), negative_ttl(&e)),
        Ok(Err(e)) => return Answer::Failed(e.to_string()),
        Ok(Ok(found)) => found,
    };
    found.sort();
    found.dedup();
    let max = usize::try_from(settings.max_endpoints).unwrap_or(usize::MAX);
    let cut = found.len().saturating_sub(max);
    found.truncate(max);
    Answer::Found(found, ttl, cut)
}

/// Every A and AAAA address of `host`, at `port`, sent `host:port` (as the URL has it) in
/// `Host`.
async fn addresses(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
    uri: &http::Uri,
) -> Result<(Vec<Found>, Duration), ResolveError> {
    let answer = resolver.lookup_ip(host).await?;
    let authority = uri.authority().map_or(host, |a| a.as_str()).to_owned();
    let found = answer
        .iter()
        .map(|ip| Found {
            addr: SocketAddr::new(ip, port),
            host: authority.clone(),
        })
        .collect();
    Ok((found, until(answer.valid_until())))
}

/// Every target and port of `name`'s SRV records, each target looked up for its addresses,
/// sent `target:port` in `Host`. A target that has no address is left out; one whose lookup
/// fails fails the whole answer (the last known set is kept rather than half of it).
async fn srv(resolver: &TokioResolver, name: &str) -> Result<(Vec<Found>, Duration), ResolveError> {
    let answer = resolver.srv_lookup(name).await?;
    let mut ttl = until(answer.as_lookup().valid_until());
    let mut found = Vec::new();
    for record in answer.iter() {
        let target = record.target().to_utf8();
        let target = target.trim_end_matches('.');
        // "." as the target: the service is decidedly not available here (RFC 2782).
        if target.is_empty() || record.port() == 0 {
            continue;
        }
        let ips = match resolver.lookup_ip(target).await {
            Ok(ips) => ips,
            Err(e) if e.is_no_records_found() => continue,
            Err(e) => return Err(e),
        };
        ttl = ttl.min(until(ips.valid_until()));
        let host = format!("{target}:{}", record.port());
        found.extend(ips.iter().map(|ip| Found {
            addr: SocketAddr::new(ip, record.port()),
            host: host.clone(),
        }));
    }
    Ok((found, ttl))
}

/// Time left until `valid_until`.
fn until(valid_until: std::time::Instant) -> Duration {
    valid_until.saturating_duration_since(std::time::Instant::now())
}

/// How long an answer that the name has no records holds (its SOA's negative TTL), 0 when it
/// does not say.
fn negative_ttl(e: &ResolveError) -> Duration {
    use hickory_resolver::proto::ProtoErrorKind;
    match e.proto().map(|p| p.kind()) {
        Some(ProtoErrorKind::NoRecordsFound { negative_ttl, .. }) => {
            Duration::from_secs(u64::from(negative_ttl.unwrap_or(0)))
        }
        _ => Duration::ZERO,
    }
}
