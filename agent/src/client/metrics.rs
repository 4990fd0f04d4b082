//! The agent's `/metrics` text read back by the client: samples for `get metrics -o json|yaml`.
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
        assert_eq!(s[1].labels["pod"], "a\"b\\c\nd");
        assert_eq!(s[1].labels["cgroup"], "");
        assert_eq!(s[1].labels["broker"], "5");
        assert_eq!(s[2].labels["le"], "+Inf");
        assert!(s[3].value.is_nan());
    }
}
