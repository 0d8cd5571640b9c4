//! The subset of Kubernetes JSONPath used by printer columns: `.a.b`, `[0]`, `[*]`,
//! `['key']`, and filters `[?(@.x.y=="v")]` / `!=` (string, number or bool literals).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(i64),
    All,
    Filter(Vec<String>, bool, Value),
}

fn parse(path: &str) -> Option<Vec<Step>> {
    let p = path.trim();
    let p = p
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(p)
        .trim();
    let p = p.strip_prefix('$').unwrap_or(p);
    let chars: Vec<char> = p.chars().collect();
    let mut i = 0;
    let mut steps = Vec::new();
    while i < chars.len() {
        match chars[i] {
            '.' => {
                i += 1;
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if name == "*" {
                    steps.push(Step::All);
                } else if !name.is_empty() {
                    steps.push(Step::Field(name));
                }
            }
            '[' => {
                let mut depth = 0;
                let start = i + 1;
                let mut j = i;
                while j < chars.len() {
                    match chars[j] {
                        '[' => depth += 1,
                        ']' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                if j >= chars.len() {
                    return None;
                }
                let inner: String = chars[start..j].iter().collect();
                let inner = inner.trim();
                i = j + 1;
                if inner == "*" {
                    steps.push(Step::All);
                } else if let Some(f) = inner.strip_prefix("?(").and_then(|s| s.strip_suffix(')')) {
                    let (lhs, eq, rhs) = if let Some((l, r)) = f.split_once("!=") {
                        (l, false, r)
                    } else if let Some((l, r)) = f.split_once("==") {
                        (l, true, r)
                    } else {
                        return None;
                    };
                    let lhs = lhs.trim().strip_prefix('@')?;
                    let fields: Vec<String> = lhs
                        .split('.')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    let rhs = rhs.trim();
                    let lit = if let Some(s) = rhs
                        .strip_prefix('"')
                        .and_then(|s| s.strip_suffix('"'))
                        .or_else(|| rhs.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
                    {
                        Value::String(s.to_string())
                    } else {
                        serde_json::from_str(rhs).ok()?
                    };
                    steps.push(Step::Filter(fields, eq, lit));
                } else if let Some(s) = inner
                    .strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                {
                    steps.push(Step::Field(s.to_string()));
                } else {
                    steps.push(Step::Index(inner.parse().ok()?));
                }
            }
            _ => {
                // A leading bare name ("status.x").
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                steps.push(Step::Field(chars[start..i].iter().collect()));
            }
        }
    }
    Some(steps)
}

/// Evaluates `path` against `obj`, returning every match.
pub(crate) fn eval(path: &str, obj: &Value) -> Vec<Value> {
    let Some(steps) = parse(path) else {
        return Vec::new();
    };
    let mut cur: Vec<&Value> = vec![obj];
    for step in &steps {
        let mut next = Vec::new();
        for v in cur {
            match step {
                Step::Field(f) => {
                    if let Some(x) = v.get(f) {
                        next.push(x);
                    }
                }
                Step::Index(n) => {
                    if let Some(a) = v.as_array() {
                        let idx = if *n < 0 { a.len() as i64 + n } else { *n };
                        if let Some(x) = usize::try_from(idx).ok().and_then(|i| a.get(i)) {
                            next.push(x);
                        }
                    }
                }
                Step::All => match v {
                    Value::Array(a) => next.extend(a.iter()),
                    Value::Object(m) => next.extend(m.values()),
                    _ => {}
                },
                Step::Filter(fields, eq, lit) => {
                    if let Some(a) = v.as_array() {
                        for item in a {
                            let mut x = Some(item);
                            for f in fields {
                                x = x.and_then(|x| x.get(f));
                            }
                            if (x == Some(lit)) == *eq {
                                next.push(item);
                            }
                        }
                    }
                }
            }
        }
        cur = next;
    }
    cur.into_iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn printer_column_paths() {
        let obj = json!({"status": {"expiresAt": "2025-01-01T00:00:00Z",
            "conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]},
            "spec": {"items": [1, 2]}});
        assert_eq!(
            eval(r#".status.conditions[?(@.type=="Ready")].status"#, &obj),
            vec![json!("True")]
        );
        assert_eq!(
            eval(".status.expiresAt", &obj),
            vec![json!("2025-01-01T00:00:00Z")]
        );
        assert_eq!(eval("{.spec.items[*]}", &obj), vec![json!(1), json!(2)]);
        assert_eq!(eval(".spec.items[-1]", &obj), vec![json!(2)]);
        assert!(eval(".status.missing", &obj).is_empty());
    }
}
