//! `sluice check`: every invalid config exits 1 with a message naming the key and what is
//! allowed; every problem is listed at once; the shipped config passes.

mod support;

use std::path::Path;

use support::process::{check, sluice_bin, write_config};

/// A valid config with `service_keys` added to its one service.
fn with_service_keys(service_keys: &str) -> String {
    format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\n\n[[service]]\nname = \"scoring\"\n{service_keys}\n\
         endpoints = [\"http://127.0.0.1:9001\"]\n"
    )
}

/// A valid config whose one service has the one endpoint entry `entry`.
fn with_endpoint(entry: &str) -> String {
    format!("[[service]]\nname = \"scoring\"\nendpoints = [{entry}]\n")
}

/// Assert that `sluice check` refuses `text`, naming each of `expected` in its message.
fn assert_rejected(what: &str, text: &str, expected: &[&str]) {
    let path = write_config("check", text);
    let output = check(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{what}: expected exit 1; stderr: {stderr}\nconfig:\n{text}"
    );
    assert!(
        stderr.contains(path.to_str().unwrap()),
        "{what}: the message names the file: {stderr}"
    );
    for needle in expected {
        assert!(
            stderr.contains(needle),
            "{what}: message lacks {needle:?}: {stderr}"
        );
    }
}

#[test]
fn each_invalid_value_is_rejected_with_its_key_and_what_is_allowed() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "max_concurrent 0",
            with_service_keys("max_concurrent = 0"),
            vec!["service[0].max_concurrent", "1..=200"],
        ),
        (
            "max_concurrent 201",
            with_service_keys("max_concurrent = 201"),
            vec!["service[0].max_concurrent", "1..=200"],
        ),
        (
            "endpoint max_concurrent 201",
            "[[service]]\nname = \"scoring\"\nendpoints = [\"http://127.0.0.1:9001\", \
             { url = \"http://127.0.0.1:9002\", max_concurrent = 201 }]\n"
                .into(),
            vec!["service[0].endpoints[1].max_concurrent", "1..=200"],
        ),
        (
            "endpoint max_concurrent 0",
            "[[service]]\nname = \"scoring\"\n\
             endpoints = [{ url = \"http://127.0.0.1:9002\", max_concurrent = 0 }]\n"
                .into(),
            vec!["service[0].endpoints[0].max_concurrent", "1..=200"],
        ),
        (
            "max_concurrent neither a number nor auto",
            with_service_keys("max_concurrent = \"many\""),
            vec!["max_concurrent", "a number of requests or \"auto\""],
        ),
        (
            "negative max_concurrent",
            with_endpoint("{ url = \"http://127.0.0.1:80\", max_concurrent = -3 }"),
            vec!["max_concurrent", "a number of requests or \"auto\""],
        ),
        (
            "adaptive_min 0",
            with_service_keys("max_concurrent = \"auto\"\nadaptive_min = 0"),
            vec!["service[0].adaptive_min", "1..=200"],
        ),
        (
            "adaptive_max 500",
            with_service_keys("max_concurrent = \"auto\"\nadaptive_max = 500"),
            vec!["service[0].adaptive_max", "1..=200"],
        ),
        (
            "adaptive bounds the wrong way round",
            with_service_keys("max_concurrent = \"auto\"\nadaptive_min = 50\nadaptive_max = 10"),
            vec!["service[0].adaptive_min", "50 is above adaptive_max (10)"],
        ),
        (
            "a learned cap that an autoscale rule would change too",
            format!(
                "{}[service.autoscale]\n[[service.autoscale.profile]]\n\
                 name = \"queue\"\n[[service.autoscale.profile.rule]]\nmetric = \"queue_length\"\n\
                 statistic = \"max\"\ntime_grain = \"10s\"\ntime_window = \"30s\"\n\
                 time_aggregation = \"minimum\"\noperator = \"greater_than\"\nthreshold = 0\n\
                 direction = \"increase\"\ntype = \"exact_count\"\nvalue = 50\ncooldown = \"1m\"\n\
                 target = \"endpoint_concurrency\"\n",
                with_service_keys("max_concurrent = \"auto\"")
            ),
            vec!["service[0].max_concurrent", "endpoint_concurrency"],
        ),
        (
            "missing endpoint list",
            "[[service]]\nname = \"scoring\"\n".into(),
            vec!["endpoints"],
        ),
        (
            "duplicate service name",
            "[[service]]\nname = \"scoring\"\npath_prefix = \"/a\"\n\
             endpoints = [\"http://127.0.0.1:9001\"]\n\
             [[service]]\nname = \"scoring\"\npath_prefix = \"/b\"\n\
             endpoints = [\"http://127.0.0.1:9002\"]\n"
                .into(),
            vec!["service[1].name", "duplicate"],
        ),
        (
            "duplicate path prefix",
            "[[service]]\nname = \"a\"\npath_prefix = \"/score\"\n\
             endpoints = [\"http://127.0.0.1:9001\"]\n\
             [[service]]\nname = \"b\"\npath_prefix = \"/score\"\n\
             endpoints = [\"http://127.0.0.1:9002\"]\n"
                .into(),
            vec!["service[1].path_prefix", "duplicate"],
        ),
        (
            "ftp URL",
            "[[service]]\nname = \"scoring\"\nendpoints = [\"ftp://127.0.0.1:21\"]\n".into(),
            vec!["service[0].endpoints[0]", "ftp://127.0.0.1:21", "http"],
        ),
        (
            "duplicate endpoint",
            "[[service]]\nname = \"scoring\"\n\
             endpoints = [\"http://127.0.0.1:9001\", \"http://127.0.0.1:9001\"]\n"
                .into(),
            vec!["service[0].endpoints[1]", "duplicate"],
        ),
        (
            "URL without scheme",
            "[[service]]\nname = \"scoring\"\nendpoints = [\"127.0.0.1:9001\"]\n".into(),
            vec!["service[0].endpoints[0]", "http"],
        ),
        (
            // `u8::from_str_radix` took a sign: `+f` passed as the byte 0x0f.
            "key_sha256 with signs among its digits",
            format!(
                "{}\n[[service.resource]]\nname = \"team-a\"\nkey_sha256 = \"{}\"\n",
                with_service_keys(""),
                "+f".repeat(32)
            ),
            vec!["service[0].resource[0].key_sha256", "64 hex digits"],
        ),
        (
            "zero connect timeout",
            format!("[timeouts]\nconnect = \"0s\"\n\n{}", with_service_keys("")),
            vec!["timeouts.connect", "greater than 0"],
        ),
        (
            "zero response timeout",
            format!(
                "[timeouts]\nresponse = \"0ms\"\n\n{}",
                with_service_keys("")
            ),
            vec!["timeouts.response", "greater than 0"],
        ),
        (
            "zero client header timeout",
            format!(
                "[timeouts]\nclient_header = \"0s\"\n\n{}",
                with_service_keys("")
            ),
            vec!["timeouts.client_header", "greater than 0"],
        ),
        (
            "client body timeout below its range",
            format!(
                "[timeouts]\nclient_body = \"50ms\"\n\n{}",
                with_service_keys("")
            ),
            vec!["timeouts.client_body: 50ms is out of range; allowed 100ms..=1h"],
        ),
        (
            "client body timeout above its range",
            format!(
                "[timeouts]\nclient_body = \"2h\"\n\n{}",
                with_service_keys("")
            ),
            vec!["timeouts.client_body: 2h is out of range; allowed 100ms..=1h"],
        ),
        (
            "lingering close above its range",
            format!(
                "[limits]\nlingering_close = \"1m\"\n\n{}",
                with_service_keys("")
            ),
            vec!["limits.lingering_close: 1m is out of range; allowed 0s..=30s"],
        ),
        (
            "zero shutdown grace",
            format!(
                "[timeouts]\nshutdown_grace = \"0s\"\n\n{}",
                with_service_keys("")
            ),
            vec!["timeouts.shutdown_grace", "greater than 0"],
        ),
        (
            "zero queue timeout with a queue",
            with_service_keys("queue_size = 5\nqueue_timeout = \"0s\""),
            vec!["service[0].queue_timeout", "greater than 0"],
        ),
        (
            "zero cluster cap",
            with_service_keys("cluster_max_concurrent = 0"),
            vec!["service[0].cluster_max_concurrent"],
        ),
        (
            "unknown key in a service",
            with_service_keys("max_concurrency = 20"),
            vec!["max_concurrency"],
        ),
        (
            "unknown key in an endpoint table",
            "[[service]]\nname = \"scoring\"\n\
             endpoints = [{ url = \"http://127.0.0.1:9001\", weight = 3 }]\n"
                .into(),
            vec!["weight"],
        ),
        (
            "unknown table",
            format!("[throttle]\nrps = 10\n\n{}", with_service_keys("")),
            vec!["throttle"],
        ),
        (
            "unknown timeout",
            format!("[timeouts]\nidle = \"5s\"\n\n{}", with_service_keys("")),
            vec!["idle"],
        ),
        (
            "unknown balance",
            with_service_keys("balance = \"round-robin\""),
            vec!["balance", "round-robin"],
        ),
        (
            "bad duration",
            with_service_keys("queue_timeout = \"5 parsecs\""),
            vec!["queue_timeout"],
        ),
        (
            "no service",
            "[listen]\nproxy = \"127.0.0.1:0\"\n".into(),
            vec!["service"],
        ),
        (
            "listen address",
            with_service_keys("").replace("127.0.0.1:0", "localhost"),
            vec!["listen.proxy"],
        ),
        (
            "prefix without slash",
            with_service_keys("path_prefix = \"score\""),
            vec!["service[0].path_prefix"],
        ),
        (
            "resolve with https",
            with_endpoint("{ url = \"https://scoring.test:8443\", resolve = true }"),
            vec!["service[0].endpoints[0].resolve", "http:// URLs only"],
        ),
        (
            "resolve an address",
            with_endpoint("{ url = \"http://10.0.3.7:8080\", resolve = true }"),
            vec!["service[0].endpoints[0].resolve", "an address, not a name"],
        ),
        (
            "srv with a port",
            with_endpoint("{ url = \"http://_http._tcp.scoring.test:80\", resolve = \"srv\" }"),
            vec!["service[0].endpoints[0].url", "SRV records"],
        ),
        (
            "resolve neither true, false nor srv",
            with_endpoint("{ url = \"http://scoring.test:80\", resolve = \"aaaa\" }"),
            vec!["resolve = \"aaaa\": expected true, false or \"srv\""],
        ),
        (
            "a misspelt key of an endpoint table",
            with_endpoint("{ url = \"http://127.0.0.1:80\", max_concurent = 3 }"),
            vec!["unknown field `max_concurent`", "`max_concurrent`"],
        ),
        (
            "overload settings",
            format!(
                "{}[service.overload]\nstatus = [503, 200]\ncooldown_min = \"2m\"\n\
                 cooldown_max = \"1m\"\nretries = 11\n",
                with_service_keys("")
            ),
            vec![
                "service[0].overload.status[1]",
                "400..=599",
                "service[0].overload.cooldown_max",
                "below cooldown_min",
                "service[0].overload.retries",
                "0..=10",
            ],
        ),
        (
            "outlier settings",
            format!(
                "{}[service.outlier]\nmax_ejected_percent = 101\nbase_ejection = \"10m\"\n\
                 max_ejection = \"5m\"\n",
                with_service_keys("")
            ),
            vec![
                "service[0].outlier.max_ejected_percent",
                "0..=100",
                "service[0].outlier.max_ejection",
                "below base_ejection",
            ],
        ),
        (
            "nameserver not an address",
            format!(
                "[resolver]\nnameservers = [\"dns.local\"]\n{}",
                with_service_keys("")
            ),
            vec!["resolver.nameservers[0]", "ip:port"],
        ),
        (
            "resolver ttls",
            format!(
                "[resolver]\nmin_ttl = \"10s\"\nmax_ttl = \"5s\"\nmax_endpoints = 0\n\
                 timeout = \"1m\"\n{}",
                with_service_keys("")
            ),
            vec![
                "resolver.max_ttl",
                "below min_ttl",
                "resolver.max_endpoints",
                "1..=10000",
                "resolver.timeout",
            ],
        ),
    ];
    for (what, text, expected) in cases {
        assert_rejected(what, &text, &expected);
    }
}

#[test]
fn every_problem_is_listed_at_once() {
    let text = "[timeouts]\nresponse = \"0s\"\n\n\
        [[service]]\nname = \"a\"\nmax_concurrent = 0\nendpoints = [\"ftp://x\"]\n\
        [[service]]\nname = \"a\"\nmax_concurrent = 500\n\
        endpoints = [\"http://h:1\", \"http://h:1\"]\n";
    assert_rejected(
        "several problems",
        text,
        &[
            "timeouts.response",
            "service[0].max_concurrent",
            "service[0].endpoints[0]",
            "service[1].name",
            "service[1].max_concurrent",
            "service[1].endpoints[1]",
        ],
    );
}

/// A service may start without endpoints (issue 16): they come through the admin API, and
/// until then it answers 503 `no_endpoints`.
#[test]
fn names_to_resolve_pass_without_being_resolved() {
    // Names that resolve nowhere: `check` validates the entries, it looks nothing up.
    let text = "[resolver]\nnameservers = [\"192.0.2.1\"]\ntimeout = \"100ms\"\n\n\
                [[service]]\nname = \"scoring\"\nendpoints = [\"http://127.0.0.1:9001\", \
                { url = \"http://scoring.invalid:8080\", resolve = true }, \
                { url = \"http://_http._tcp.scoring.invalid\", resolve = \"srv\" }]\n";
    let path = write_config("check-resolve", text);
    let output = check(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains("1 endpoint(s) and 2 name(s) to look up in DNS"),
        "{stdout}"
    );
}

#[test]
fn learned_caps_pass() {
    let path = write_config(
        "adaptive",
        "[[service]]\nname = \"scoring\"\nmax_concurrent = \"auto\"\nadaptive_min = 4\n\
         adaptive_max = 64\nendpoints = [\"http://127.0.0.1:9001\", \
         { url = \"http://127.0.0.1:9002\", max_concurrent = 30 }]\n\
         [[service]]\nname = \"fixed\"\npath_prefix = \"/fixed\"\n\
         endpoints = [{ url = \"http://127.0.0.1:9003\", max_concurrent = \"auto\" }]\n",
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("70 concurrent slot(s) in all (2 learned cap(s) counted where they start)"),
        "20 + 30 + 20: {stdout}"
    );
}

#[test]
fn a_service_without_endpoints_passes() {
    let path = write_config(
        "no-endpoints",
        "[[service]]\nname = \"scoring\"\nendpoints = []\n",
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 endpoint(s)"), "{stdout}");
}

#[test]
fn a_valid_config_passes_with_a_one_line_summary() {
    let path = write_config(
        "valid",
        &with_service_keys(
            "max_concurrent = 200\nqueue_size = 3\nqueue_timeout = \"250ms\"\nbalance = \"p2c\"",
        ),
    );
    let output = check(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
}

#[test]
fn the_shipped_config_passes_check() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sluice.toml");
    let output = check(&shipped);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_reads_config_sluice_toml_by_default_and_sluice_config_overrides_it() {
    let output = sluice_bin()
        .arg("check")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("config/sluice.toml"));

    let invalid = write_config("env", &with_service_keys("max_concurrent = 0"));
    let output = sluice_bin()
        .arg("check")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("SLUICE_CONFIG", &invalid)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("service[0].max_concurrent"));
}

#[test]
fn run_refuses_to_start_with_an_invalid_config() {
    let invalid = write_config("run-invalid", &with_service_keys("max_concurrent = 201"));
    let output = sluice_bin()
        .arg("run")
        .arg("--config")
        .arg(&invalid)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(all.contains("service[0].max_concurrent"), "{all}");
}
