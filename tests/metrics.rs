//! `/metrics` as a scraper reads it, over real sockets after real traffic: histograms that
//! Prometheus' `histogram_quantile` can use (buckets non-decreasing, `+Inf` equal to `_count`,
//! quantiles inside what the clients measured).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;

/// One sample line: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// An exposition's samples and the type of each family (`# TYPE` lines).
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    /// Parse the text format (0.0.4 or OpenMetrics: the sample lines are the same), panicking
    /// on a line of no known shape.
    fn parse(text: &str) -> Self {
        let mut scrape = Self::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                scrape.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            scrape.samples.push(parse_sample(line));
        }
        scrape
    }

    /// The families declared as histograms.
    fn histograms(&self) -> Vec<&str> {
        self.types
            .iter()
            .filter(|(_, kind)| *kind == "histogram")
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// Samples named `name`.
    fn named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s Sample> + 's {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

fn parse_sample(line: &str) -> Sample {
    let bad = || -> ! { panic!("bad sample line {line:?}") };
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad());
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next().unwrap_or_else(|| bad());
            match c {
                '}' => break i,
                ',' => {}
                '=' => {
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                    let mut value = String::new();
                    loop {
                        match chars.next().unwrap_or_else(|| bad()).1 {
                            '"' => break,
                            '\\' => match chars.next().unwrap_or_else(|| bad()).1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        };
        rest = &inner[end + 1..];
    }
    let value = rest.trim().parse::<f64>().unwrap_or_else(|_| bad());
    Sample {
        name,
        labels,
        value,
    }
}

/// Prometheus' `histogram_quantile(q, …)` over one series' cumulative buckets (upper bound,
/// count; ending with +Inf): the rank is q × the +Inf count, and the value is interpolated
/// linearly inside the bucket that holds it (the first bucket starts at 0; a rank in the +Inf
/// bucket gives the highest finite bound).
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let total = buckets.last().expect("an +Inf bucket").1;
    let rank = q * total;
    let at = buckets
        .iter()
        .position(|(_, count)| *count >= rank)
        .expect("the +Inf bucket holds every rank");
    if at == buckets.len() - 1 {
        return buckets[buckets.len() - 2].0;
    }
    let (lower, below) = if at == 0 { (0.0, 0.0) } else { buckets[at - 1] };
    let (upper, count) = buckets[at];
    lower + (upper - lower) * (rank - below) / (count - below)
}

/// The bounds of the bucket of `buckets` that holds `seconds`: what the histogram can say
/// about a latency at best.
fn bucket_around(seconds: f64, buckets: &[(f64, f64)]) -> (f64, f64) {
    let mut lower = 0.0;
    for (upper, _) in buckets {
        if seconds <= *upper {
            return (lower, *upper);
        }
        lower = *upper;
    }
    (lower, f64::INFINITY)
}

/// Two services, each over its own endpoint: "fast" answers at once, "slow" after `SLOW`.
const SLOW: Duration = Duration::from_millis(30);

async fn two_services() -> (Sluice, Mock, Mock) {
    let fast = mock().start().await;
    let slow = mock().hold(SLOW).start().await;
    let toml = config(&format!(
        "[[service]]\nname = \"fast\"\npath_prefix = \"/fast\"\nendpoints = [{:?}]\n\n\
         [[service]]\nname = \"slow\"\npath_prefix = \"/slow\"\nendpoints = [{:?}]\n",
        fast.url(),
        slow.url()
    ));
    (start_sluice(&toml).await, fast, slow)
}

async fn scrape(admin: SocketAddr, accept: Option<&str>) -> Answer {
    let mut req = get(admin, "/metrics");
    if let Some(accept) = accept {
        req.headers_mut()
            .insert("accept", accept.parse().expect("a header value"));
    }
    once(admin, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_histograms_count_each_request_once_and_give_quantiles_inside_what_was_measured() {
    const N: usize = 40;
    let (sluice, _fast, _slow) = two_services().await;
    let client = pool();
    // What the clients measured per service: sluice times a request inside the client's
    // round trip, and not before its endpoint answered.
    let mut measured: BTreeMap<&str, (Duration, Duration)> = BTreeMap::new();
    for (service, path, floor) in [("fast", "/fast", Duration::ZERO), ("slow", "/slow", SLOW)] {
        let mut slowest = Duration::ZERO;
        for _ in 0..N {
            let sent = Instant::now();
            let answer = send(&client, get(sluice.addr, path)).await;
            slowest = slowest.max(sent.elapsed());
            assert_eq!(answer.status, 200);
        }
        measured.insert(service, (floor, slowest));
    }
    let admin = sluice.admin.expect("admin listener");
    for accept in [None, Some("application/openmetrics-text; version=1.0.0")] {
        let text = scrape(admin, accept).await.text();
        let scrape = Scrape::parse(&text);
        let families = scrape.histograms();
        assert_eq!(
            families,
            [
                "sluice_request_duration_seconds",
                "sluice_upstream_duration_seconds"
            ],
            "{text}"
        );
        for family in families {
            let buckets_name = format!("{family}_bucket");
            let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for sample in scrape.named(&buckets_name) {
                let mut labels = sample.labels.clone();
                let le = labels.remove("le").expect("a bucket has le");
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le is a number")
                };
                series.entry(labels).or_default().push((le, sample.value));
            }
            assert_eq!(
                series.len(),
                2,
                "one series per service in {family}:\n{text}"
            );
            for (labels, mut buckets) in series {
                let what = format!("{family}{labels:?}");
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                assert_eq!(buckets.last().map(|b| b.0), Some(f64::INFINITY), "{what}");
                for pair in buckets.windows(2) {
                    assert!(
                        pair[0].1 <= pair[1].1,
                        "{what}: buckets decrease: {buckets:?}"
                    );
                }
                let count_name = format!("{family}_count");
                let count = scrape
                    .named(&count_name)
                    .find(|s| s.labels == labels)
                    .unwrap_or_else(|| panic!("no _count for {what}"))
                    .value;
                let inf = buckets.last().map_or(0.0, |b| b.1);
                assert_eq!(inf, count, "{what}: +Inf bucket is not _count: {buckets:?}");
                assert_eq!(count, N as f64, "{what}: one observation per request");
                let (floor, slowest) = measured[labels["service"].as_str()];
                let low = bucket_around(floor.as_secs_f64(), &buckets).0;
                let high = bucket_around(slowest.as_secs_f64(), &buckets).1;
                for q in [0.5, 0.9, 0.99] {
                    let value = histogram_quantile(q, &buckets);
                    assert!(
                        (low..=high).contains(&value),
                        "{what}: histogram_quantile({q}) = {value} s, outside {low}..={high} \
                         (clients measured {floor:?}..={slowest:?}): {buckets:?}"
                    );
                }
            }
        }
    }
    sluice.stop().await;
}

/// The `Accept` header Prometheus 2.42 sends on a scrape.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `promtool` (Debian's `prometheus`, `.ci/install-promtool`), or `None` after a loud notice
/// when it is missing outside CI; under CI (env `CI` set) a missing one fails the test.
fn promtool() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("promtool"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not on PATH: CI must install it (run .ci/install-promtool)"
        );
        // Straight to the process's stderr: the test harness captures `eprintln!` of passing
        // tests, and this notice must be seen.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"\n************************************************************************\n\
              SKIPPED tests/metrics.rs (promtool): promtool not installed; run .ci/install-promtool\n\
              ************************************************************************\n\n",
        );
    }
    found
}

/// Run `promtool args…` with `input` on stdin; its exit status and everything it printed.
async fn run_promtool(
    promtool: &std::path::Path,
    args: &[&str],
    input: &str,
) -> (std::process::ExitStatus, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(promtool)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start promtool");
    let mut stdin = child.stdin.take().expect("promtool's stdin");
    stdin
        .write_all(input.as_bytes())
        .await
        .expect("write to promtool");
    drop(stdin);
    let output = tokio::time::timeout(DEADLINE * 3, child.wait_with_output())
        .await
        .expect("promtool finishes")
        .expect("promtool runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, printed)
}

/// Every family has a `# HELP` text and, if asked, at least one sample.
fn assert_every_family_has_help_and_series(text: &str, every_family_has_series: bool) {
    let scrape = Scrape::parse(text);
    for (family, kind) in &scrape.types {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {family} ")) && l.len() > family.len() + 8),
            "no help text for {family}:\n{text}"
        );
        if !every_family_has_series {
            continue;
        }
        let suffixes: &[&str] = match kind.as_str() {
            "histogram" => &["_bucket", "_sum", "_count"],
            // OpenMetrics names a counter family without its samples' `_total`.
            "counter" if !family.ends_with("_total") => &["_total"],
            _ => &[""],
        };
        for suffix in suffixes {
            let name = format!("{family}{suffix}");
            assert!(
                scrape.named(&name).next().is_some(),
                "no {name} series after traffic:\n{text}"
            );
        }
    }
}

/// Scrape `admin` in both formats and check each with promtool: the text format with `promtool
/// check metrics` (exit 0, nothing printed), OpenMetrics with Prometheus' OpenMetrics parser;
/// and every family has a help text and, when the traffic made them all move, series.
async fn assert_promtool_accepts_both_formats(
    promtool: &std::path::Path,
    admin: SocketAddr,
    every_family_has_series: bool,
) {
    // What a scraper that asks for nothing in particular gets: the text format 0.0.4.
    let answer = scrape(admin, None).await;
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = answer.text();
    let (status, printed) = run_promtool(promtool, &["check", "metrics"], &text).await;
    assert!(
        status.success() && printed.trim().is_empty(),
        "promtool check metrics: {status}\n{printed}\non:\n{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE sluice_requests_total counter\n"),
        "{text}"
    );
    assert_every_family_has_help_and_series(&text, every_family_has_series);
    assert_eq!(answer.header("vary"), Some("Accept"));

    // What Prometheus asks for first: OpenMetrics.
    let answer = scrape(admin, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(
        answer.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = answer.text();
    assert!(text.ends_with("\n# EOF\n"), "{text}");
    assert!(text.contains("# TYPE sluice_requests counter\n"), "{text}");
    assert_every_family_has_help_and_series(&text, every_family_has_series);
    // `promtool check metrics` reads the text format only; Prometheus' OpenMetrics parser (the
    // one a scrape in this format goes through) runs in `promtool tsdb
    // create-blocks-from openmetrics`, which wants a timestamp on every sample.
    let stamped: String = text
        .lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("{l}\n")
            } else {
                format!("{l} 1700000000\n")
            }
        })
        .collect();
    let dir = std::env::temp_dir().join(format!(
        "sluice-openmetrics-{}-{}",
        std::process::id(),
        admin.port()
    ));
    let input = dir.join("scrape.txt");
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    std::fs::write(&input, &stamped).expect("write the scrape");
    let blocks = dir.join("blocks");
    let (status, printed) = run_promtool(
        promtool,
        &[
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            input.to_str().expect("a UTF-8 path"),
            blocks.to_str().expect("a UTF-8 path"),
        ],
        "",
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        status.success(),
        "promtool tsdb create-blocks-from openmetrics: {status}\n{printed}\non:\n{stamped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_metrics_in_the_text_format_and_openmetrics_when_asked() {
    let Some(promtool) = promtool() else {
        return;
    };
    let backend = mock()
        .reply(|r| {
            if r.uri.contains("fail") {
                Reply::status(500)
            } else {
                Reply::ok("ok")
            }
        })
        .start()
        .await;
    // One resource at 2 TPS that autoscales every second while throttled, so that every
    // family, the autoscale events included, has series.
    let toml = config(&format!(
        "{}\n[service.rate_limit]\ndefault_tps = 100\n\
         [[service.resource]]\nname = \"team-a\"\nkey = \"key-a\"\ntps = 2\nautoscale = true\n\
         [service.autoscale]\ninterval = \"1s\"\n[[service.autoscale.profile]]\nname = \"fast\"\n\
         {DOUBLE_WHILE_THROTTLED}",
        service(&[backend.url()], "")
    ))
    .replace("path_prefix = \"/\"", "path_prefix = \"/score\"");
    let sluice = start_sluice(&toml).await;
    let admin = sluice.admin.expect("admin listener");
    let client = pool();
    let keyed = |path: &str| {
        let mut req = get(sluice.addr, path);
        req.headers_mut()
            .insert("x-api-key", "key-a".parse().expect("a header value"));
        req
    };
    send(&client, keyed("/score/fail")).await;
    send(&client, get(sluice.addr, "/elsewhere")).await;
    // Throttled until the autoscaler has stepped at least once.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        for _ in 0..4 {
            send(&client, keyed("/score")).await;
        }
        let text = scrape(admin, None).await.text();
        if text.contains("sluice_autoscale_events_total{") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no autoscale event:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert_promtool_accepts_both_formats(&promtool, admin, true).await;
    sluice.stop().await;
}

/// The value of the one series of `name` whose labels are exactly `labels`.
fn value_of(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Scrape::parse(text)
        .named(name)
        .find(|s| s.labels == labels)
        .map(|s| s.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_given_before_routing_are_counted_without_a_service() {
    const TOKEN: &str = "t0ken-for-metrics";
    let backend = mock().start().await;
    let toml = config(&service(&[backend.url()], ""))
        .replace("path_prefix = \"/\"", "path_prefix = \"/score\"");
    let file = process::write_config("no-route", &toml);
    let sluice = start_sluice_with(&toml, Some(TOKEN), Some(file)).await;
    let admin = sluice.admin.expect("admin listener");
    let no_route = [("class", "4xx"), ("reason", "no_route")];
    let counted = |text: &str| {
        value_of(text, "sluice_requests_total", &no_route)
            .unwrap_or_else(|| panic!("no no_route series in:\n{text}"))
    };
    assert_eq!(counted(&scrape(admin, None).await.text()), 0.0);
    let client = pool();
    for path in ["/", "/nowhere", "/scores"] {
        let answer = send(&client, get(sluice.addr, path)).await;
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.reason(), "no_route", "{path}");
    }
    assert_eq!(send(&client, get(sluice.addr, "/score")).await.status, 200);
    // Refused before routing, on a path a service would take: no service either.
    let invalid_host =
        "GET /score HTTP/1.1\r\nhost: user@evil.example\r\nconnection: close\r\n\r\n";
    let answer = raw_exchange(sluice.addr, invalid_host.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let gzip =
        "POST /score HTTP/1.1\r\nhost: sluice\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n";
    let answer = raw_exchange(sluice.addr, gzip.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 501 "), "{answer}");
    let both = "POST /score HTTP/1.1\r\nhost: sluice\r\ncontent-length: 5\r\n\
                transfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    let answer = raw_exchange(sluice.addr, both.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    // A reload builds a new policy: the count carries over, like a service's.
    let mut reload = request("POST", admin, "/admin/reload", "");
    reload.headers_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("a header value"),
    );
    assert_eq!(once(admin, reload).await.status, 200);
    for accept in [None, Some("application/openmetrics-text")] {
        let text = scrape(admin, accept).await.text();
        assert_eq!(counted(&text), 3.0, "{text}");
        for (class, reason) in [
            ("4xx", "invalid_host"),
            ("5xx", "unsupported_transfer_coding"),
            ("4xx", "conflicting_framing"),
        ] {
            let series = [("class", class), ("reason", reason)];
            let n = value_of(&text, "sluice_requests_total", &series);
            assert_eq!(n, Some(1.0), "{reason} in:\n{text}");
        }
        // No per-service series for an answer given before there is a service: it could
        // never move.
        for sample in Scrape::parse(&text).named("sluice_requests_total") {
            let reason = sample.labels.get("reason").map(String::as_str);
            let before_routing = matches!(
                reason,
                Some(
                    "no_route"
                        | "invalid_host"
                        | "unsupported_transfer_coding"
                        | "conflicting_framing"
                )
            );
            assert!(
                !(sample.labels.contains_key("service") && before_routing),
                "impossible series {sample:?}"
            );
        }
    }
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capacity_view_never_shows_a_p99_above_the_slowest_response() {
    // 37 ms is just above a bucket bound (36.2 ms) of the last-minute latency window, whose
    // next bound is 51.2 ms: a p99 reported as the bucket's bound would be far above it.
    let backend = mock().hold(Duration::from_millis(37)).start().await;
    let sluice = start_sluice(&config(&service(&[backend.url()], ""))).await;
    let sent = Instant::now();
    assert_eq!(once(sluice.addr, get(sluice.addr, "/")).await.status, 200);
    let slowest_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let admin = sluice.admin.expect("admin listener");
    let view = once(admin, get(admin, "/admin/capacity")).await.json();
    let latency = &view["services"][0]["endpoints"][0]["latency"];
    let (count, mean, p99) = (
        latency["count"].as_u64(),
        latency["mean_ms"].as_f64().expect("mean_ms"),
        latency["p99_ms"].as_f64().expect("p99_ms"),
    );
    assert_eq!(count, Some(1), "{view}");
    // One response: its latency is the mean, the p99 and the slowest at once.
    assert_eq!(p99, mean, "{view}");
    assert!(
        (37.0..=slowest_ms).contains(&p99),
        "p99 {p99} ms, client saw {slowest_ms} ms"
    );
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_store_and_fleet_families() {
    let Some(promtool) = promtool() else {
        return;
    };
    let Some(redis) = support::redis::RedisServer::start() else {
        return;
    };
    let backend = mock().start().await;
    let toml = config(&format!(
        "[store]\nbackend = \"redis\"\nurl = {:?}\nreplica_id = \"metrics\"\ntimeout = \"500ms\"\n\n\
         {}\n[service.rate_limit]\ndefault_tps = 100\n\
         [[service.resource]]\nname = \"team-a\"\nkey = \"key-a\"\ntps = 50\n",
        redis.url(),
        service(&[backend.url()], "")
    ));
    let sluice = start_sluice(&toml).await;
    let admin = sluice.admin.expect("admin listener");
    let client = pool();
    for _ in 0..5 {
        let mut req = get(sluice.addr, "/");
        req.headers_mut()
            .insert("x-api-key", "key-a".parse().expect("a header value"));
        assert_eq!(send(&client, req).await.status, 200);
    }
    let text = scrape(admin, None).await.text();
    for family in [
        "sluice_store_up",
        "sluice_store_calls_total",
        "sluice_fleet_replicas",
        "sluice_fleet_policy_version",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no {family}:\n{text}"
        );
    }
    // No autoscale here: that family has no series.
    assert_promtool_accepts_both_formats(&promtool, admin, false).await;
    sluice.stop().await;
}
