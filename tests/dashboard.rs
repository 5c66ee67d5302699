//! The dashboard in a real browser: headless Chromium loads the admin listener's page against
//! a running sluice with live traffic and an autoscale step, and the rendered DOM must show the
//! service, its endpoints, a resource chart with the scale-up marked, the event list, and no
//! key material. A screenshot is kept as a test artefact (target/test-artifacts/dashboard.png).
//!
//! Needs Debian's chromium at /usr/bin/chromium (`.ci/install-chromium`); without it the test
//! fails in CI (env `CI` set) and is skipped, loudly, elsewhere.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::process::Command;
use tokio::task::JoinHandle;

const CHROMIUM: &str = "/usr/bin/chromium";
const TOKEN: &str = "t0ken-for-the-dashboard";
/// How long one Chromium run may take before it is killed and the test fails.
const CHROMIUM_LIMIT: Duration = Duration::from_secs(30);

/// The browser, or `None` (after a loud notice) when it is missing outside CI.
fn chromium() -> Option<&'static str> {
    if Path::new(CHROMIUM).exists() {
        return Some(CHROMIUM);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{CHROMIUM} is missing: CI must install it (run .ci/install-chromium)"
    );
    // Straight to the process's stderr: the test harness captures `eprintln!` of passing
    // tests, and this notice must be seen.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        b"\n************************************************************************\n\
          SKIPPED tests/dashboard.rs: chromium not installed; run .ci/install-chromium\n\
          ************************************************************************\n\n",
    );
    None
}

/// One service over two endpoints; team-a starts at 5 TPS and autoscales every second while
/// throttled (5 → 10 → 20 …); team-b and team-c have fixed limits of 20 and 2 TPS.
fn dashboard_config(urls: &[String]) -> String {
    config(&format!(
        r#"{}
[service.rate_limit]
default_tps = 5
[[service.resource]]
name = "team-a"
key = "key-a"
tps = 5
autoscale = true
[[service.resource]]
name = "team-b"
key = "key-b"
tps = 20
[[service.resource]]
name = "team-c"
key = "key-c"
tps = 2
[service.autoscale]
interval = "1s"
[[service.autoscale.profile]]
name = "fast"
{DOUBLE_WHILE_THROTTLED}"#,
        // The second endpoint learns its cap: the dashboard draws it over time.
        service(urls, "max_concurrent = 8").replace(
            &format!("{:?}]", urls[1]),
            &format!("{{ url = {:?}, max_concurrent = \"auto\" }}]", urls[1])
        )
    ))
}

/// Client load until `stop` is set: four callers with key-a (~40 req/s in all), one with key-b
/// (~8 req/s, within its limit) and one with key-c (~8 req/s, mostly throttled).
fn traffic(proxy: SocketAddr, stop: Arc<AtomicBool>) -> Vec<JoinHandle<()>> {
    let callers = [
        ("key-a", 100),
        ("key-a", 100),
        ("key-a", 100),
        ("key-a", 100),
        ("key-b", 120),
        ("key-c", 120),
    ];
    callers
        .into_iter()
        .map(|(key, every_ms)| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let client = pool();
                while !stop.load(Ordering::Relaxed) {
                    let mut req = get(proxy, "/score");
                    req.headers_mut()
                        .insert("x-api-key", key.parse().expect("header value"));
                    let answer = send(&client, req).await;
                    assert!(
                        matches!(answer.status.as_u16(), 200 | 429),
                        "unexpected answer {}",
                        answer.status
                    );
                    tokio::time::sleep(Duration::from_millis(every_ms)).await;
                }
            })
        })
        .collect()
}

/// GET an admin route with the bearer token.
async fn admin_get(admin: SocketAddr, path: &str) -> Answer {
    let mut req = get(admin, path);
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header value"),
    );
    once(admin, req).await
}

/// Where test artefacts go: `<target>/test-artifacts/`.
fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// Run headless Chromium with `args` on `url` in a fresh profile; its stdout. Killed (with
/// every process it started) if it outlives [`CHROMIUM_LIMIT`].
async fn run_chromium(browser: &str, label: &str, args: &[String], url: &str) -> String {
    let profile =
        std::env::temp_dir().join(format!("sluice-dashboard-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).expect("create a Chromium profile directory");
    let child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-extensions",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            "--hide-scrollbars",
            // Console messages (script errors included) go to stderr.
            "--enable-logging=stderr",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout can end the renderer and helpers too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let pid = child.id().expect("chromium has a pid");
    let output = tokio::time::timeout(CHROMIUM_LIMIT, child.wait_with_output()).await;
    let output = match output {
        Ok(output) => output.expect("chromium runs"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
            let _ = std::fs::remove_dir_all(&profile);
            panic!("chromium ({label}) did not finish within {CHROMIUM_LIMIT:?}");
        }
    };
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "chromium ({label}) failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let log = String::from_utf8_lossy(&output.stderr);
    for line in log.lines().filter(|l| l.contains("CONSOLE")) {
        assert!(
            !line.contains("Uncaught") && !line.contains("Error"),
            "a script error in the page ({label}): {line}"
        );
    }
    String::from_utf8(output.stdout).expect("the DOM is UTF-8")
}

/// The attributes of every `<tag ...>` opening tag in `html` whose class list has `class`.
fn elements(html: &str, tag: &str, class: &str) -> Vec<HashMap<String, String>> {
    let open = format!("<{tag} ");
    let mut found = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let end = after.find('>').expect("a complete opening tag");
        let attrs = attributes(&after[..end]);
        if attrs
            .get("class")
            .is_some_and(|c| c.split_whitespace().any(|c| c == class))
        {
            found.push(attrs);
        }
        rest = &after[end..];
    }
    found
}

/// Parse `name="value"` pairs as Chromium serializes them (values double-quoted, `"` and `&`
/// escaped).
fn attributes(text: &str) -> HashMap<String, String> {
    let mut attrs = HashMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let name_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let name = rest[..name_end].to_owned();
        rest = &rest[name_end..];
        if let Some(value) = rest.strip_prefix("=\"") {
            let close = value.find('"').expect("a closing quote");
            let unescaped = value[..close]
                .replace("&quot;", "\"")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&");
            attrs.insert(name, unescaped);
            rest = &value[close + 1..];
        } else {
            attrs.insert(name, String::new());
        }
        rest = rest.trim_start();
    }
    attrs
}

/// The part of `html` from the opening tag of the resource `name` (a chart card or a row of
/// the fixed-limit table) to the next resource or the event log.
fn resource_card<'a>(html: &'a str, name: &str) -> &'a str {
    let found = html
        .find(&format!("class=\"resource\" data-resource=\"{name}\""))
        .unwrap_or_else(|| panic!("no resource {name} in the page"));
    let start = html[..found].rfind('<').expect("inside an opening tag");
    let rest = &html[found..];
    let end = [
        "<div class=\"resource\"",
        "<tr class=\"resource\"",
        "id=\"event-log\"",
    ]
    .iter()
    .filter_map(|n| rest.find(n))
    .min()
    .unwrap_or(rest.len());
    &html[start..found + end]
}

fn attr<'a>(element: &'a HashMap<String, String>, name: &str) -> &'a str {
    element.get(name).map_or("", String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_live_capacity_autoscale_chart_and_events() {
    let Some(browser) = chromium() else {
        return;
    };
    let started = Instant::now();
    let fast = mock().hold(Duration::from_millis(30)).start().await;
    let slow = mock().hold(Duration::from_millis(60)).start().await;
    let sluice =
        start_sluice_with(&dashboard_config(&urls(&[&fast, &slow])), Some(TOKEN), None).await;
    let admin = sluice.admin.expect("config() turns the admin listener on");

    // The page itself needs no token; the JSON it polls does.
    let page = once(admin, get(admin, "/")).await;
    assert_eq!(page.status, 200);
    assert!(
        page.text().contains("id=\"services\""),
        "the dashboard page"
    );
    let refused = once(admin, get(admin, "/admin/capacity")).await;
    assert_eq!(refused.status, 401);

    // Live traffic until team-a was raised twice (5 → 10 → 20).
    let stop = Arc::new(AtomicBool::new(false));
    let callers = traffic(sluice.addr, Arc::clone(&stop));
    let scale_ups = loop {
        let events = admin_get(
            admin,
            "/admin/autoscale/events?service=scoring&resource=team-a",
        )
        .await
        .json();
        let ups: Vec<(u64, u64)> = events["events"]
            .as_array()
            .expect("an event list")
            .iter()
            .filter(|e| e["kind"] == "scale_up")
            .map(|e| (e["from"].as_u64().unwrap(), e["to"].as_u64().unwrap()))
            .collect();
        if ups.len() >= 2 {
            break ups;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "team-a was not scaled up twice: {events}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(&scale_ups[..2], &[(5, 10), (10, 20)]);
    // An operator raises team-b's limit by hand: a step on its chart.
    let mut raise = request(
        "PUT",
        admin,
        "/admin/services/scoring/resources/team-b",
        r#"{"tps": 30}"#,
    );
    raise.headers_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header value"),
    );
    raise.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("header value"),
    );
    let raised = once(admin, raise).await;
    assert_eq!(raised.status, 200, "{}", raised.text());
    // The change's event about team-b (its kind is the server's business; the chart shows it).
    let change = raised.json()["events"]
        .as_array()
        .expect("the change's events")
        .iter()
        .find(|e| e["resource"] == "team-b")
        .cloned()
        .unwrap_or_else(|| panic!("no event about team-b: {}", raised.text()));
    assert_eq!(
        (change["from"].as_u64(), change["to"].as_u64()),
        (Some(20), Some(30))
    );
    let change_kind = change["kind"].as_str().expect("a kind").to_owned();

    // The page as rendered after a few polls (virtual time runs ahead while nothing loads).
    let url = format!("http://{}/#token={TOKEN}", admin);
    let dom = run_chromium(
        browser,
        "dom",
        &["--virtual-time-budget=5000".into(), "--dump-dom".into()],
        &url,
    )
    .await;
    let dump = artifacts_dir().join("dashboard.html");
    std::fs::write(&dump, &dom).expect("save the rendered DOM");
    let context = format!("(rendered DOM saved at {})", dump.display());

    // Polled without error, at least twice (so rates exist), with the token from the fragment.
    let status = dom
        .find("id=\"status\"")
        .map(|i| attributes(&dom[i..i + dom[i..].find('>').unwrap()]))
        .unwrap_or_else(|| panic!("no status line {context}"));
    assert_eq!(
        attr(&status, "data-state"),
        "ok",
        "status {status:?} {context}"
    );
    let polls: u32 = attr(&status, "data-polls").parse().unwrap_or(0);
    assert!(polls >= 2, "polled {polls} times {context}");
    let auth = elements(&dom, "form", "card");
    assert!(
        auth.iter()
            .any(|f| attr(f, "id") == "auth" && f.contains_key("hidden")),
        "the token form stays hidden when the fragment gave the token {context}"
    );

    // The service, with both endpoints as healthy bars and their latency.
    assert!(
        dom.contains("class=\"service card\" data-service=\"scoring\""),
        "service section {context}"
    );
    let endpoints = elements(&dom, "tr", "endpoint");
    let mut urls: Vec<&str> = endpoints.iter().map(|e| attr(e, "data-endpoint")).collect();
    urls.sort_unstable();
    let mut expected = vec![fast.url(), slow.url()];
    expected.sort();
    assert_eq!(urls, expected, "{context}");
    for e in &endpoints {
        assert_eq!(attr(e, "data-healthy"), "true", "{e:?}");
        assert_eq!(attr(e, "data-source"), "config", "{e:?}");
        let learned = attr(e, "data-endpoint") == slow.url();
        // A false attribute is left out.
        let adaptive = if learned { "true" } else { "" };
        assert_eq!(attr(e, "data-adaptive"), adaptive, "{e:?}");
        match learned {
            false => assert_eq!(attr(e, "data-cap"), "8", "{e:?}"),
            // Starts at 20; this light load never reaches it, so it has no reason to move.
            true => assert_eq!(attr(e, "data-cap"), "20", "{e:?}"),
        }
    }
    assert_eq!(elements(&dom, "div", "bar-fill").len(), 2, "{context}");
    assert!(
        dom.matches("class=\"num latency-p99\">").count() == 2 && dom.contains(" ms</td>"),
        "latency per endpoint {context}"
    );
    assert_eq!(elements(&dom, "svg", "rate-chart").len(), 1, "{context}");
    // The learned cap of the second endpoint, as a line over the polls.
    assert_eq!(elements(&dom, "svg", "cap-chart").len(), 1, "{context}");
    let lines = elements(&dom, "polyline", "cap-line");
    assert_eq!(lines.len(), 1, "{context}");
    assert_eq!(attr(&lines[0], "data-endpoint"), slow.url(), "{context}");
    assert!(
        attr(&lines[0], "points").split(' ').count() > 1,
        "a line over several polls {context}"
    );
    for stat in [
        "in_flight",
        "request_rate",
        "throttle_rate",
        "queue",
        "projected_tps",
        "headroom_tps",
    ] {
        assert!(
            dom.contains(&format!("data-stat=\"{stat}\"")),
            "{stat} {context}"
        );
    }

    // team-a's chart: a step line with both raises marked; team-b's: the operator's change;
    // team-c, fixed and never changed, is a row of the compact table instead.
    let card = resource_card(&dom, "team-a");
    assert_eq!(elements(card, "svg", "limit-chart").len(), 1, "{card}");
    assert_eq!(elements(card, "polyline", "limit-line").len(), 1, "{card}");
    let markers = elements(card, "path", "marker");
    let ups: Vec<(&str, &str)> = markers
        .iter()
        .filter(|m| attr(m, "data-kind") == "scale_up")
        .map(|m| (attr(m, "data-from"), attr(m, "data-to")))
        .collect();
    assert!(
        ups.starts_with(&[("5", "10"), ("10", "20")]),
        "scale-up markers {ups:?}\n{card}"
    );
    let team_b = resource_card(&dom, "team-b");
    let team_b_markers = elements(team_b, "path", "marker");
    let changed: Vec<(&str, &str, &str)> = team_b_markers
        .iter()
        .map(|m| {
            (
                attr(m, "data-kind"),
                attr(m, "data-from"),
                attr(m, "data-to"),
            )
        })
        .collect();
    assert_eq!(changed, [(change_kind.as_str(), "20", "30")], "{team_b}");
    assert!(team_b.contains(">30 TPS<"), "{team_b}");
    let team_c = resource_card(&dom, "team-c");
    assert!(team_c.starts_with("<tr "), "{team_c}");
    assert!(
        elements(team_c, "svg", "limit-chart").is_empty(),
        "{team_c}"
    );
    assert!(team_c.contains(">2 TPS<"), "{team_c}");
    let throttled: u64 = team_c
        .split("data-count=\"throttled\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("team-c's throttled count: {team_c}"));
    assert!(throttled > 0, "team-c is throttled: {team_c}");

    // The event list, newest first, with team-a's first raise.
    let events = elements(&dom, "tr", "event");
    assert!(
        events.iter().any(|e| attr(e, "data-kind") == "scale_up"
            && attr(e, "data-resource") == "team-a"
            && attr(e, "data-from") == "5"
            && attr(e, "data-to") == "10"),
        "no scale_up 5 → 10 in the event list {context}"
    );
    let ids: Vec<u64> = events
        .iter()
        .map(|e| attr(e, "data-id").parse().expect("numeric id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");

    // Keys are secrets, and the token stays out of the page.
    for secret in ["key-a", "key-b", "key-c", TOKEN] {
        assert!(!dom.contains(secret), "{secret:?} in the DOM {context}");
    }

    // Without the token the page asks for it instead of showing data.
    let bare = format!("http://{}/", admin);
    let asked = run_chromium(
        browser,
        "no-token",
        &["--virtual-time-budget=2000".into(), "--dump-dom".into()],
        &bare,
    )
    .await;
    assert!(
        asked.contains("data-state=\"auth\""),
        "status asks for the token:\n{asked}"
    );
    assert!(
        elements(&asked, "form", "card")
            .iter()
            .any(|f| attr(f, "id") == "auth" && !f.contains_key("hidden")),
        "the token form shows:\n{asked}"
    );
    assert!(
        !asked.contains("data-service="),
        "no data without the token"
    );

    // A screenshot as a test artefact (docs/dashboard.png, shown in docs/admin-and-metrics.md, is
    // one of these), in real time: under a virtual-time budget the page's clock races ahead of the
    // traffic, so its rates (answers between polls / time between polls) would read near zero.
    // Headless Chromium shoots at the load event, so a frame holds the dashboard and an image that
    // loads for a few seconds holds the load event while the page polls for real.
    let load_holder = mock().hold(Duration::from_secs(5)).start().await;
    let frame = artifacts_dir().join("dashboard-frame.html");
    std::fs::write(
        &frame,
        format!(
            "<!doctype html><body style=\"margin:0\"><iframe src=\"{url}\" \
             style=\"border:0;width:1280px;height:1000px\"></iframe>\
             <img src=\"{}/hold-the-load-event\" alt=\"\" style=\"display:none\"></body>",
            load_holder.url()
        ),
    )
    .expect("write the screenshot frame");
    let shot = artifacts_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        browser,
        "screenshot",
        &[
            "--window-size=1280,1000".into(),
            format!("--screenshot={}", shot.display()),
        ],
        &format!("file://{}", frame.display()),
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    eprintln!(
        "dashboard screenshot: {} ({} KB); browser test took {:?}",
        shot.display(),
        png.len() / 1024,
        started.elapsed()
    );

    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.expect("a caller does not panic");
    }
    sluice.stop().await;
}
