//! A parser of the Prometheus/OpenMetrics text format, enough for the operator's metrics.

use std::collections::BTreeMap;

/// One sample of the Prometheus/OpenMetrics text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| parse_sample(l).unwrap_or_else(|| panic!("unparsable metrics line {l:?}")))
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let i = line.find(['{', ' '])?;
    let (name, mut rest) = line.split_at(i);
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut it = body.chars();
        loop {
            let mut c = it.next()?;
            if c == ',' {
                c = it.next()?;
            }
            if c == '}' {
                break;
            }
            let mut key = String::new();
            while c != '=' {
                key.push(c);
                c = it.next()?;
            }
            if it.next()? != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match it.next()? {
                    '\\' => match it.next()? {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        }
        rest = it.as_str();
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The value of the sample `name` whose labels include `labels`.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}
