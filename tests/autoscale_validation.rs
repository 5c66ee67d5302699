//! `[service.autoscale]` parsing and validation: unknown names are refused by the parser
//! with the allowed list, and every semantic problem is reported under its own key.

use sluice::autoscale::{validate, AutoscaleSettings};

const KEY: &str = "service[0].autoscale";

fn parse(toml_text: &str) -> AutoscaleSettings {
    toml::from_str(toml_text).expect("test settings parse")
}

fn keys(settings: &AutoscaleSettings, max_tps: u32) -> Vec<String> {
    validate(settings, KEY, max_tps)
        .into_iter()
        .map(|e| e.key)
        .collect()
}

const RULE: &str = r#"
metric = "throttled_requests"
statistic = "sum"
time_grain = "1m"
time_window = "5m"
time_aggregation = "total"
operator = "greater_than"
threshold = 0
direction = "increase"
type = "percent_change_count"
value = 100
cooldown = "5m"
"#;

/// A settings document with one profile holding one rule, the rule's fields overridden.
fn one_rule(profile_extra: &str, rule_extra: &str) -> String {
    let mut rule: Vec<String> = RULE.lines().map(str::to_owned).collect();
    for line in rule_extra.lines().filter(|l| !l.trim().is_empty()) {
        let field = line.split('=').next().unwrap_or("").trim();
        rule.retain(|l| l.split('=').next().unwrap_or("").trim() != field);
        rule.push(line.to_owned());
    }
    format!(
        "[[profile]]\nname = \"p\"\n{profile_extra}\n[[profile.rule]]\n{}\n",
        rule.join("\n")
    )
}

#[test]
fn the_documented_example_and_the_default_are_valid() {
    let settings = parse(&format!(
        r#"
        interval = "5m"
        expected_latency = "50ms"
        notify = ["https://hooks.example/scale"]
        [[profile]]
        name = "default"
        min = 10
        max = 1000
        default = 10
        [[profile.rule]]
        {RULE}
        [[profile]]
        name = "christmas"
        fixed_date = {{ time_zone = "Europe/Paris", start = "2026-12-24T00:00:00", end = "2026-12-24T23:59:00" }}
        [[profile]]
        name = "weekend"
        recurrence = {{ time_zone = "America/Los_Angeles", days = ["Saturday","Sunday"], hours = [0], minutes = [0] }}
        "#
    ));
    assert_eq!(validate(&settings, KEY, 1000), vec![]);
    assert_eq!(validate(&AutoscaleSettings::default(), KEY, 1000), vec![]);
    let spec = AutoscaleSettings::default().window_spec();
    assert_eq!((spec.grain.as_secs(), spec.len), (60, 32));
}

#[test]
fn durations_down_to_one_second_are_accepted() {
    let settings = parse(&format!(
        "interval = \"1s\"\n{}",
        one_rule(
            "",
            "time_grain = \"1s\"\ntime_window = \"1s\"\ncooldown = \"1s\""
        )
    ));
    assert_eq!(validate(&settings, KEY, 1000), vec![]);
    assert_eq!(settings.window_spec().grain.as_secs(), 1);
}

#[test]
fn unknown_names_are_refused_with_the_allowed_ones() {
    for (field, bad, allowed) in [
        ("metric", "\"cpu\"", "throttled_requests"),
        ("statistic", "\"median\"", "average"),
        ("time_aggregation", "\"sum\"", "total"),
        ("operator", "\"gt\"", "greater_than_or_equal"),
        ("direction", "\"up\"", "increase"),
        ("type", "\"percent\"", "percent_change_count"),
        ("target", "\"gpu\"", "endpoint_concurrency"),
    ] {
        let text = one_rule("", &format!("{field} = {bad}"));
        let err = toml::from_str::<AutoscaleSettings>(&text)
            .expect_err("unknown name must not parse")
            .to_string();
        assert!(err.contains(&format!("{field} = {bad}")), "{field}: {err}");
        assert!(err.contains("unknown variant"), "{field}: {err}");
        assert!(err.contains(allowed), "{field}: {err}");
    }
    let err = toml::from_str::<AutoscaleSettings>(&one_rule("", "treshold = 3"))
        .expect_err("typo in a key")
        .to_string();
    assert!(err.contains("unknown field `treshold`"), "{err}");
    let days = r#"recurrence = { time_zone = "UTC", days = ["Caturday"] }"#;
    let err = toml::from_str::<AutoscaleSettings>(&one_rule(days, ""))
        .expect_err("unknown day")
        .to_string();
    assert!(err.contains("Saturday"), "{err}");
}

/// Each case: the settings text, and the one key its problem must be reported under.
#[test]
fn each_rejection_names_its_key() {
    let p = format!("{KEY}.profile[0]");
    let r = format!("{p}.rule[0]");
    let cases: Vec<(String, String)> = vec![
        (format!("interval = \"0s\"\n{}", one_rule("", "")), format!("{KEY}.interval")),
        (format!("interval = \"500ms\"\n{}", one_rule("", "")), format!("{KEY}.interval")),
        (format!("expected_latency = \"0s\"\n{}", one_rule("", "")), format!("{KEY}.expected_latency")),
        (format!("notify = [\"http://ok\", \"ftp://x\"]\n{}", one_rule("", "")), format!("{KEY}.notify[1]")),
        (one_rule("min = 0", ""), format!("{p}.min")),
        (one_rule("min = 20\ndefault = 10", ""), format!("{p}.default")),
        (one_rule("default = 900\nmax = 500", ""), format!("{p}.default")),
        (one_rule("min = 600\nmax = 500", ""), format!("{p}.min")),
        (one_rule("max = 2000", ""), format!("{p}.max")),
        (
            one_rule(r#"fixed_date = { time_zone = "Mars/Olympus", start = "2026-01-01T00:00:00", end = "2026-01-02T00:00:00" }"#, ""),
            format!("{p}.fixed_date.time_zone"),
        ),
        (
            one_rule(r#"fixed_date = { time_zone = "UTC", start = "2026-01-02T00:00:00", end = "2026-01-01T00:00:00" }"#, ""),
            format!("{p}.fixed_date.end"),
        ),
        (
            one_rule(r#"recurrence = { time_zone = "Pacific/Nowhere", days = ["Monday"] }"#, ""),
            format!("{p}.recurrence.time_zone"),
        ),
        (
            one_rule(r#"recurrence = { time_zone = "UTC", days = [] }"#, ""),
            format!("{p}.recurrence.days"),
        ),
        (
            one_rule(r#"recurrence = { time_zone = "UTC", days = ["Monday"], hours = [0, 24] }"#, ""),
            format!("{p}.recurrence.hours[1]"),
        ),
        (
            one_rule(r#"recurrence = { time_zone = "UTC", days = ["Monday"], minutes = [60] }"#, ""),
            format!("{p}.recurrence.minutes[0]"),
        ),
        (
            one_rule(
                r#"recurrence = { time_zone = "UTC", days = ["Monday"] }
fixed_date = { time_zone = "UTC", start = "2026-01-01T00:00:00", end = "2026-01-02T00:00:00" }"#,
                "",
            ),
            p.clone(),
        ),
        (one_rule("", "time_grain = \"0s\""), format!("{r}.time_grain")),
        (one_rule("", "time_grain = \"1500ms\""), format!("{r}.time_grain")),
        (one_rule("", "time_grain = \"13h\"\ntime_window = \"13h\""), format!("{r}.time_grain")),
        (one_rule("", "time_window = \"30s\""), format!("{r}.time_window")),
        (one_rule("", "time_window = \"2days\""), format!("{r}.time_window")),
        (one_rule("", "cooldown = \"999ms\""), format!("{r}.cooldown")),
        (one_rule("", "threshold = nan"), format!("{r}.threshold")),
        (one_rule("", "value = 0"), format!("{r}.value")),
        (one_rule("", "direction = \"decrease\"\nvalue = 150"), format!("{r}.value")),
        (one_rule("", "target = \"endpoint_concurrency\""), format!("{r}.target")),
        (
            one_rule("", "metric = \"queue_length\"\ntarget = \"endpoint_concurrency\"\ntype = \"exact_count\"\nvalue = 201"),
            format!("{r}.value"),
        ),
        (
            one_rule("", "time_grain = \"1s\"\ntime_window = \"10h\""),
            format!("{r}.time_window"),
        ),
    ];
    for (text, key) in cases {
        let settings = parse(&text);
        let errors = validate(&settings, KEY, 1000);
        let found: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            found,
            vec![key.as_str()],
            "for:\n{text}\nerrors: {errors:?}"
        );
        assert!(!errors[0].message.is_empty());
    }
}

#[test]
fn profile_level_problems_and_collecting_everything_at_once() {
    let settings = parse(&format!(
        r#"
        interval = "0s"
        [[profile]]
        name = "a"
        [[profile]]
        name = "a"
        max = 5000
        [[profile.rule]]
        {}
        "#,
        RULE.replace("cooldown = \"5m\"", "cooldown = \"0s\"")
    ));
    let found = keys(&settings, 1000);
    let p1 = format!("{KEY}.profile[1]");
    assert_eq!(
        found,
        vec![
            format!("{KEY}.interval"),
            format!("{p1}.name"),
            // A second profile with neither fixed_date nor recurrence.
            p1.clone(),
            format!("{p1}.max"),
            format!("{p1}.rule[0].cooldown"),
        ]
    );
    let errors = validate(&settings, KEY, 1000);
    let max = errors
        .iter()
        .find(|e| e.key.ends_with(".max"))
        .expect("max error");
    assert!(max.message.contains("allowed 1..=1000"), "{}", max.message);
    assert!(errors[0]
        .to_string()
        .starts_with("service[0].autoscale.interval: "));
}
