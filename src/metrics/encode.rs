//! The exposition formats: Prometheus text 0.0.4 (the default) and OpenMetrics 1.0 (when the
//! scraper's `Accept` asks for it). Written by hand over the router's own counters: small, and
//! accepted by `promtool check metrics` (a test runs it on a real scrape).

use std::fmt::Write;

/// Label pairs of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// One histogram's state: bounds in integer units, per-bucket (not cumulative) counts with `+Inf`
/// last, the sum in the same units.
#[derive(Debug, Clone, Default)]
pub struct HistogramValue {
    pub bounds: &'static [u64],
    pub buckets: Vec<u64>,
    pub sum: u64,
    pub count: u64,
}

impl HistogramValue {
    /// An empty histogram over `bounds` (every bucket, `+Inf` included, at 0).
    pub fn new(bounds: &'static [u64]) -> HistogramValue {
        HistogramValue {
            bounds,
            buckets: vec![0; bounds.len() + 1],
            sum: 0,
            count: 0,
        }
    }

    /// Adds another core's histogram (over the same bounds).
    pub fn merge(&mut self, h: &crate::counter::Histogram) {
        if self.buckets.len() != h.bounds().len() + 1 {
            *self = HistogramValue::new(h.bounds());
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(h.buckets()) {
            *mine += theirs;
        }
        self.sum += h.sum();
        self.count += h.count();
    }
}

/// Builds one exposition.
pub struct Encoder {
    out: String,
    open_metrics: bool,
}

impl Encoder {
    pub fn new(open_metrics: bool) -> Encoder {
        Encoder {
            out: String::with_capacity(16 * 1024),
            open_metrics,
        }
    }

    /// A counter family; `name` ends in `_total`.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let family = if self.open_metrics {
            name.strip_suffix("_total").unwrap_or(name)
        } else {
            name
        };
        self.head(family, help, "counter");
        for (labels, v) in samples {
            self.sample(name, &labels, None, &v.to_string());
        }
    }

    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        self.head(name, help, "gauge");
        for (labels, v) in samples {
            self.sample(name, &labels, None, &number(v));
        }
    }

    /// A histogram family; values are divided by `scale` (1e6 turns microseconds into seconds).
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        scale: f64,
        samples: impl IntoIterator<Item = (Labels, HistogramValue)>,
    ) {
        self.head(name, help, "histogram");
        for (labels, h) in samples {
            let mut cumulative = 0;
            let bucket = format!("{name}_bucket");
            for (i, c) in h.buckets.iter().enumerate() {
                cumulative += c;
                let le = match h.bounds.get(i) {
                    Some(b) => number(*b as f64 / scale),
                    None => "+Inf".to_string(),
                };
                self.sample(&bucket, &labels, Some(&le), &cumulative.to_string());
            }
            self.sample(
                &format!("{name}_sum"),
                &labels,
                None,
                &number(h.sum as f64 / scale),
            );
            self.sample(
                &format!("{name}_count"),
                &labels,
                None,
                &h.count.to_string(),
            );
        }
    }

    pub fn finish(mut self) -> String {
        if self.open_metrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }

    fn head(&mut self, family: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {family} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {family} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &Labels, le: Option<&str>, value: &str) {
        self.out.push_str(name);
        if !labels.is_empty() || le.is_some() {
            self.out.push('{');
            let mut first = true;
            let le = le.map(|v| ("le", v.to_string()));
            for (k, v) in labels.iter().chain(le.iter()) {
                if !first {
                    self.out.push(',');
                }
                first = false;
                let _ = write!(self.out, "{k}=\"{}\"", escape_value(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(value);
        self.out.push('\n');
    }
}

/// A sample value: integers without a fraction, others as Rust prints them (shortest round trip).
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats() {
        let h = crate::counter::Histogram::new(&[1_000, 500_000]);
        h.observe(200);
        h.observe(700_000);
        let mut v = HistogramValue::new(&[1_000, 500_000]);
        v.merge(&h);
        v.merge(&h);
        for om in [false, true] {
            let mut e = Encoder::new(om);
            e.counter(
                "x_requests_total",
                "Requests.",
                [(vec![("a", "q\"uo\\te".to_string())], 3)],
            );
            e.gauge("x_open", "Open.", [(vec![], 2.5)]);
            e.histogram(
                "x_seconds",
                "Time.",
                1e6,
                [(vec![("r", "m".to_string())], v.clone())],
            );
            let text = e.finish();
            let family = if om { "x_requests" } else { "x_requests_total" };
            assert!(
                text.contains(&format!("# TYPE {family} counter\n")),
                "{text}"
            );
            assert!(
                text.contains("x_requests_total{a=\"q\\\"uo\\\\te\"} 3\n"),
                "{text}"
            );
            assert!(text.contains("x_open 2.5\n"));
            assert!(
                text.contains("x_seconds_bucket{r=\"m\",le=\"0.001\"} 2\n"),
                "{text}"
            );
            assert!(text.contains("x_seconds_bucket{r=\"m\",le=\"0.5\"} 2\n"));
            assert!(text.contains("x_seconds_bucket{r=\"m\",le=\"+Inf\"} 4\n"));
            assert!(text.contains("x_seconds_sum{r=\"m\"} 1.4004\n"), "{text}");
            assert!(text.contains("x_seconds_count{r=\"m\"} 4\n"));
            assert_eq!(text.ends_with("# EOF\n"), om);
        }
    }
}
