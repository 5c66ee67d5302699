//! The exposition writer: one family at a time, in the format the scraper asked for. The two
//! formats differ only in how a counter family is named, in escaping and in the closing
//! `# EOF`.

use std::fmt::Write as _;

use crate::recorders::Histogram;

/// An exposition format, chosen per scrape from the `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4: what any scraper understands, and the default.
    Prometheus,
    /// OpenMetrics 1.0.0 text, for a scraper that asks for `application/openmetrics-text`
    /// (Prometheus does, first, by default).
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header prefers: the acceptable media type with the highest
    /// `q` (the first listed on a tie) among OpenMetrics and `text/plain`; the text format
    /// when the header is absent or names neither (`*/*` included), as Prometheus' own client
    /// libraries do. Any OpenMetrics `version` is answered with 1.0.0 (the only other one is
    /// the draft 0.0.1, which it extends).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let mut best = (0.0, Self::Prometheus);
        for item in accept.unwrap_or("").split(',') {
            let mut parts = item.split(';').map(str::trim);
            let format = match parts.next() {
                Some(t) if t.eq_ignore_ascii_case("application/openmetrics-text") => {
                    Self::OpenMetrics
                }
                Some(t) if t.eq_ignore_ascii_case("text/plain") => Self::Prometheus,
                _ => continue,
            };
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f64>().ok())
                .filter(|q| (0.0..=1.0).contains(q))
                .unwrap_or(0.0);
            if q > best.0 {
                best = (q, format);
            }
        }
        best.1
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// What a metric family is, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exposition being written, family by family.
pub(super) struct Exposition {
    format: Format,
    out: String,
    /// The family being written: the name its samples start with.
    name: &'static str,
}

impl Exposition {
    pub(super) fn new(format: Format) -> Self {
        Self {
            format,
            out: String::with_capacity(16 * 1024),
            name: "",
        }
    }

    /// Start a family: its `# HELP` and `# TYPE` lines. OpenMetrics names a counter family
    /// without its samples' `_total`; the text format 0.0.4 has no such rule, and Prometheus
    /// (and `promtool check metrics`) file the metadata under the exact name, so there the
    /// family is named as its samples are.
    pub(super) fn family(&mut self, name: &'static str, help: &str, kind: Kind) {
        self.name = name;
        let total = match (kind, self.format) {
            (Kind::Counter, Format::Prometheus) => "_total",
            _ => "",
        };
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push_str(total);
        self.out.push(' ');
        // The text format leaves a help text's quotes as they are; OpenMetrics escapes them.
        push_escaped(&mut self.out, help, self.format == Format::OpenMetrics);
        self.out.push_str("\n# TYPE ");
        self.out.push_str(name);
        self.out.push_str(total);
        self.out.push(' ');
        self.out.push_str(kind);
        self.out.push('\n');
    }

    /// One sample line of the current family: its name with `suffix`, `labels` (then `le`,
    /// for a bucket) and `value`.
    fn sample(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        le: Option<&str>,
        value: impl std::fmt::Display,
    ) {
        self.out.push_str(self.name);
        self.out.push_str(suffix);
        let extra = le.map(|le| ("le", le));
        let mut all = labels.iter().copied().chain(extra).peekable();
        if all.peek().is_some() {
            self.out.push('{');
            for (i, (key, value)) in all.enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(key);
                self.out.push_str("=\"");
                push_escaped(&mut self.out, value, true);
                self.out.push('"');
            }
            self.out.push('}');
        }
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, " {value}");
    }

    pub(super) fn counter(&mut self, labels: &[(&str, &str)], value: u64) {
        self.sample("_total", labels, None, value);
    }

    pub(super) fn gauge(&mut self, labels: &[(&str, &str)], value: i64) {
        self.sample("", labels, None, value);
    }

    /// A gauge with a fractional value (written like a histogram's sum: `0.25`, `3.0`).
    pub(super) fn gauge_f64(&mut self, labels: &[(&str, &str)], value: f64) {
        self.sample("", labels, None, format!("{value:?}"));
    }

    /// `_bucket` (cumulative, ending at `+Inf`), `_sum` and `_count`. Bounds and the sum are
    /// written with `{:?}` (`1.0`, not `1`): the canonical form OpenMetrics asks of `le`.
    pub(super) fn histogram(&mut self, labels: &[(&str, &str)], histogram: &Histogram) {
        let (sum, count, buckets) = histogram.snapshot();
        for (bound, cumulative) in buckets {
            let le = if bound.is_finite() {
                format!("{bound:?}")
            } else {
                "+Inf".to_owned()
            };
            self.sample("_bucket", labels, Some(&le), cumulative);
        }
        self.sample("_sum", labels, None, format_args!("{sum:?}"));
        self.sample("_count", labels, None, count);
    }

    pub(super) fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

/// `text` with `\`, a line break and, if `quotes`, `"` escaped, as both formats write help
/// texts and label values.
fn push_escaped(out: &mut String, text: &str, quotes: bool) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_chooses_the_format_by_preference() {
        let cases = [
            (None, Format::Prometheus),
            (Some(""), Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain; version=0.0.4"), Format::Prometheus),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; Version=1.0.0; charset=utf-8"),
                Format::OpenMetrics,
            ),
            // Prometheus 2.42's default.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,\
                     application/openmetrics-text;version=0.0.1;q=0.75,\
                     text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Format::OpenMetrics,
            ),
            // Prometheus with `scrape_protocols` putting the text format first.
            (
                Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"),
                Format::Prometheus,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Prometheus),
            (Some("application/openmetrics-text;q=x"), Format::Prometheus),
            (
                Some("text/plain, application/openmetrics-text"),
                Format::Prometheus,
            ),
        ];
        for (accept, format) in cases {
            assert_eq!(Format::negotiate(accept), format, "{accept:?}");
        }
    }

    #[test]
    fn escaping_follows_each_format() {
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let mut e = Exposition::new(format);
            e.family("x", "a \"b\" \\ c\nd", Kind::Counter);
            e.counter(&[("l", "q\"\\\n")], 1);
            let text = e.finish();
            let (help, eof) = match format {
                Format::Prometheus => (
                    "# HELP x_total a \"b\" \\\\ c\\nd\n# TYPE x_total counter\n",
                    "",
                ),
                Format::OpenMetrics => (
                    "# HELP x a \\\"b\\\" \\\\ c\\nd\n# TYPE x counter\n",
                    "# EOF\n",
                ),
            };
            assert_eq!(
                text,
                format!("{help}x_total{{l=\"q\\\"\\\\\\n\"}} 1\n{eof}")
            );
        }
    }
}
