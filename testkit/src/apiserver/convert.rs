//! Resources served in two shapes from one storage, as a real API server does.
//!
//! `events.k8s.io/v1` Events are core/v1 Events: a Kubernetes API server keeps one object
//! and converts it to the shape of the API it is asked through. An Event an operator
//! publishes with `regarding` is listed by `kubectl describe` through core/v1 with
//! `involvedObject`, and the other way round. Here the store keeps the core/v1 shape and
//! requests through `events.k8s.io` are converted on the way in and out.

use serde_json::Value;

use super::resources::ResourceDef;

/// Field names of an `events.k8s.io/v1` Event and of the same field in core/v1.
const EVENT_FIELDS: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// The (group, plural) whose storage a resource shares, if it is not its own.
pub(crate) fn storage_of(group: &str, plural: &str) -> Option<(&'static str, &'static str)> {
    (group == "events.k8s.io" && plural == "events").then_some(("", "events"))
}

fn is_events_v1(res: &ResourceDef) -> bool {
    storage_of(&res.group, &res.plural).is_some()
}

/// Renames the top-level fields of `obj` from one shape to the other.
fn rename(obj: &mut Value, pairs: impl Iterator<Item = (&'static str, &'static str)>) {
    let Some(m) = obj.as_object_mut() else {
        return;
    };
    for (from, to) in pairs {
        if let Some(v) = m.remove(from) {
            m.insert(to.to_string(), v);
        }
    }
}

/// An object (or a part of one, such as an apply patch) sent through `view`, in the shape
/// the store keeps.
pub(crate) fn to_storage(view: &ResourceDef, mut obj: Value) -> Value {
    if is_events_v1(view) {
        rename(&mut obj, EVENT_FIELDS.into_iter());
    }
    obj
}

/// A stored object in the shape of `view`. Only the fields change; `present` sets the
/// apiVersion.
pub(crate) fn from_storage(view: &ResourceDef, obj: &Value) -> Value {
    let mut obj = obj.clone();
    if is_events_v1(view) {
        rename(&mut obj, EVENT_FIELDS.into_iter().map(|(v, c)| (c, v)));
    }
    obj
}

/// A field selector's field as named in `view`, renamed for the stored shape
/// (`regarding.name` is `involvedObject.name`).
pub(crate) fn field_path(view: &ResourceDef, path: &str) -> String {
    if is_events_v1(view) {
        for (v, c) in EVENT_FIELDS {
            if path == v {
                return c.to_string();
            }
            if let Some(rest) = path.strip_prefix(v).and_then(|r| r.strip_prefix('.')) {
                return format!("{c}.{rest}");
            }
        }
    }
    path.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::builtins;
    use serde_json::json;

    fn def(group: &str, plural: &str) -> ResourceDef {
        builtins()
            .into_iter()
            .find(|r| r.group == group && r.plural == plural)
            .expect("a built-in resource")
    }

    #[test]
    fn events_v1_and_core_events_are_one_object() {
        let v1 = def("events.k8s.io", "events");
        let sent = json!({
            "metadata": {"name": "e"},
            "regarding": {"kind": "ScgToken", "name": "t"},
            "note": "refreshed",
            "reportingController": "scgtoken.io/operator",
            "reason": "Refreshed",
            "series": {"count": 2},
        });
        let stored = to_storage(&v1, sent.clone());
        assert_eq!(stored["involvedObject"]["name"], "t");
        assert_eq!(stored["message"], "refreshed");
        assert_eq!(stored["reportingComponent"], "scgtoken.io/operator");
        assert_eq!(stored["reason"], "Refreshed");
        assert!(stored.get("regarding").is_none() && stored.get("note").is_none());
        assert_eq!(from_storage(&v1, &stored), sent);
        let core = def("", "events");
        assert_eq!(from_storage(&core, &stored), stored);
    }

    #[test]
    fn field_selectors_follow_the_rename() {
        let v1 = def("events.k8s.io", "events");
        assert_eq!(field_path(&v1, "regarding.name"), "involvedObject.name");
        assert_eq!(field_path(&v1, "reportingController"), "reportingComponent");
        assert_eq!(field_path(&v1, "regardingX.name"), "regardingX.name");
        assert_eq!(field_path(&v1, "metadata.name"), "metadata.name");
        let core = def("", "events");
        assert_eq!(field_path(&core, "regarding.name"), "regarding.name");
    }
}
