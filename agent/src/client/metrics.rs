//! The agent's `/metrics` text read back by the client: samples for `get metrics -o json|yaml`,
//! and the counters and histograms `top` turns into rates and quantiles.
//!
//! Reads the Prometheus text format (0.0.4) the agent writes; lines it cannot read are skipped,
//! never fatal: a newer agent may add what this client does not know.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Every sample of the text, in order.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"}` → the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

/// A histogram's cumulative buckets (`le`, count), `le` ascending, `+Inf` last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// The histogram `name` whose samples carry every label of `select`.
    pub fn find(samples: &[Sample], name: &str, select: &[(&str, &str)]) -> Option<Self> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name == bucket && select.iter().all(|(k, v)| s.label(k) == *v))
            .filter_map(|s| {
                let le = match s.label("le") {
                    "+Inf" => f64::INFINITY,
                    le => le.parse().ok()?,
                };
                Some((le, s.value))
            })
            .collect();
        if buckets.is_empty() {
            return None;
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Self { buckets })
    }

    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// What was observed since `earlier` (the same histogram, read before).
    pub fn since(&self, earlier: Option<&Histogram>) -> Histogram {
        let Some(earlier) = earlier else {
            return self.clone();
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let before = earlier
                        .buckets
                        .iter()
                        .find(|b| b.0 == le)
                        .map_or(0.0, |b| b.1);
                    // A counter that went down was reset (the agent restarted): all is new.
                    (le, if n >= before { n - before } else { n })
                })
                .collect(),
        }
    }

    /// The `q` quantile's upper bound: the `le` of the first bucket holding it (the agent's
    /// buckets are powers of two, so this says "under 2 ms" rather than inventing a value
    /// between bounds). None without observations; the last finite bound when the quantile
    /// falls in `+Inf`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut last_finite = None;
        for &(le, n) in &self.buckets {
            if le.is_finite() {
                last_finite = Some(le);
            }
            if n >= rank && n > 0.0 {
                return if le.is_finite() {
                    Some(le)
                } else {
                    last_finite
                };
            }
        }
        last_finite
    }
}

/// The value of the sample `name` with every label of `select`, summed over the others.
pub fn sum(samples: &[Sample], name: &str, select: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for s in samples
        .iter()
        .filter(|s| s.name == name && select.iter().all(|(k, v)| s.label(k) == *v))
    {
        *found.get_or_insert(0.0) += s.value;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_labels_escapes_and_special_values() {
        let text = "# HELP x y\n# TYPE x counter\n\
            brokerscope_up 1\n\
            brokerscope_broker_info{broker=\"5\",pod=\"a\\\"b\\\\c\\nd\",cgroup=\"\"} 1\n\
            h_bucket{le=\"+Inf\"} 3\n\
            bad line here\n\
            weird{unterminated=\"x} 1\n\
            n NaN\n";
        let s = parse(text);
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(s[0].name, "brokerscope_up");
        assert_eq!(s[0].value, 1.0);
        assert_eq!(s[1].label("pod"), "a\"b\\c\nd");
        assert_eq!(s[1].label("cgroup"), "");
        assert_eq!(s[1].label("broker"), "5");
        assert_eq!(s[2].label("le"), "+Inf");
        assert!(s[3].value.is_nan());
    }

    #[test]
    fn quantiles_are_bucket_bounds_over_a_window() {
        let text = "rtt_bucket{port=\"1\",le=\"0.001\"} 0\n\
            rtt_bucket{port=\"1\",le=\"0.002\"} 50\n\
            rtt_bucket{port=\"1\",le=\"0.004\"} 99\n\
            rtt_bucket{port=\"1\",le=\"+Inf\"} 100\n\
            rtt_bucket{port=\"2\",le=\"+Inf\"} 7\n";
        let h = Histogram::find(&parse(text), "rtt", &[("port", "1")]).unwrap();
        assert_eq!(h.count(), 100.0);
        assert_eq!(h.quantile(0.5), Some(0.002));
        assert_eq!(h.quantile(0.99), Some(0.004));
        // The top 1% is over the last finite bound: said as that bound.
        assert_eq!(h.quantile(1.0), Some(0.004));
        let later = Histogram {
            buckets: vec![
                (0.001, 10.0),
                (0.002, 60.0),
                (0.004, 109.0),
                (f64::INFINITY, 110.0),
            ],
        };
        let window = later.since(Some(&h));
        assert_eq!(window.count(), 10.0);
        assert_eq!(window.quantile(0.5), Some(0.001));
        assert_eq!(h.since(Some(&h)).quantile(0.5), None);
        assert!(Histogram::find(&parse(text), "rtt", &[("port", "3")]).is_none());
    }

    #[test]
    fn sums_over_unselected_labels() {
        let text = "r{broker=\"1\",dir=\"sent\"} 2\nr{broker=\"1\",dir=\"received\"} 3\n\
            r{broker=\"2\",dir=\"sent\"} 9\n";
        let s = parse(text);
        assert_eq!(sum(&s, "r", &[("broker", "1")]), Some(5.0));
        assert_eq!(sum(&s, "r", &[("broker", "3")]), None);
    }
}
