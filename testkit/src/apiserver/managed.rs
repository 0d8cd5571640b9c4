//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Ownership is tracked on leaf paths: objects are descended into, scalars and lists
//! are leaves, empty objects own nothing. `metadata` contributes only `labels`,
//! `annotations`, `finalizers` and `ownerReferences`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

pub(crate) type FieldPath = Vec<String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Apply,
    Update,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ManagedEntry {
    pub manager: String,
    pub operation: Operation,
    pub api_version: String,
    /// "" for the main resource, "status" for the status subresource.
    pub subresource: String,
    pub time: String,
    pub fields: BTreeSet<FieldPath>,
}

impl ManagedEntry {
    fn is(&self, manager: &str, op: Operation, sub: &str) -> bool {
        self.manager == manager && self.operation == op && self.subresource == sub
    }
}

/// Which part of an object a write may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Everything; `status` excluded when the resource has a status subresource.
    Main { exclude_status: bool },
    /// Only `status`.
    Status,
}

const META_TRACKED: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];

fn collect(v: &Value, path: &mut FieldPath, out: &mut BTreeMap<FieldPath, Value>) {
    match v {
        // Empty maps own nothing: another manager may still set fields inside them.
        Value::Object(m) => {
            for (k, child) in m {
                path.push(k.clone());
                collect(child, path, out);
                path.pop();
            }
        }
        Value::Null => {}
        other => {
            out.insert(path.clone(), other.clone());
        }
    }
}

/// Leaf paths (with values) of the tracked part of `obj`.
pub(crate) fn leaves(obj: &Value, scope: Scope) -> BTreeMap<FieldPath, Value> {
    let mut out = BTreeMap::new();
    let Some(m) = obj.as_object() else {
        return out;
    };
    for (k, v) in m {
        let tracked = match (scope, k.as_str()) {
            (_, "apiVersion" | "kind") => false,
            (Scope::Status, "status") => true,
            (Scope::Status, _) => false,
            (Scope::Main { exclude_status }, "status") => !exclude_status,
            (Scope::Main { .. }, "metadata") => {
                if let Some(meta) = v.as_object() {
                    for f in META_TRACKED {
                        if let Some(fv) = meta.get(f) {
                            let mut p = vec!["metadata".to_string(), f.to_string()];
                            collect(fv, &mut p, &mut out);
                        }
                    }
                }
                false
            }
            (Scope::Main { .. }, _) => true,
        };
        if tracked {
            let mut p = vec![k.clone()];
            collect(v, &mut p, &mut out);
        }
    }
    out
}

pub(crate) fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for p in path {
        cur = cur.get(p)?;
    }
    Some(cur)
}

fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for p in parents {
        match cur.get_mut(p) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

fn related(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Drops owned paths that are no longer leaves of `obj` and entries left empty.
pub(crate) fn cleanup(entries: &mut Vec<ManagedEntry>, obj: &Value, scope_main: Scope) {
    let main = leaves(obj, scope_main);
    let status = leaves(obj, Scope::Status);
    for e in entries.iter_mut() {
        let set = if e.subresource == "status" {
            &status
        } else {
            &main
        };
        e.fields.retain(|p| set.contains_key(p));
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// Records a non-apply write by `manager`: the leaves it changed become its own and
/// are taken away from every other manager.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_update(
    entries: &mut Vec<ManagedEntry>,
    manager: &str,
    subresource: &str,
    api_version: &str,
    old: Option<&Value>,
    new: &Value,
    scope: Scope,
    now: &str,
) {
    let new_leaves = leaves(new, scope);
    let old_leaves = old.map(|o| leaves(o, scope)).unwrap_or_default();
    let changed: Vec<FieldPath> = new_leaves
        .iter()
        .filter(|(p, v)| old_leaves.get(*p) != Some(*v))
        .map(|(p, _)| p.clone())
        .collect();
    if changed.is_empty() {
        return;
    }
    for e in entries.iter_mut() {
        if !e.is(manager, Operation::Update, subresource) {
            e.fields.retain(|q| !changed.iter().any(|p| related(p, q)));
        }
    }
    match entries
        .iter_mut()
        .find(|e| e.is(manager, Operation::Update, subresource))
    {
        Some(e) => {
            e.fields.extend(changed);
            e.time = now.to_string();
            e.api_version = api_version.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: manager.to_string(),
            operation: Operation::Update,
            api_version: api_version.to_string(),
            subresource: subresource.to_string(),
            time: now.to_string(),
            fields: changed.into_iter().collect(),
        }),
    }
}

/// A field owned by another manager that an apply would change.
#[derive(Debug, Clone)]
pub(crate) struct ApplyConflict {
    pub manager: String,
    pub api_version: String,
    pub path: FieldPath,
}

/// Merges an applied configuration into `base` (objects merged recursively, null
/// removes, everything else replaces).
fn merge_applied(base: &mut Value, patch: &Value) {
    match (base.as_object_mut(), patch.as_object()) {
        (Some(b), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else if v.is_object() && b.get(k).is_some_and(Value::is_object) {
                    if let Some(child) = b.get_mut(k) {
                        merge_applied(child, v);
                    }
                } else {
                    b.insert(k.clone(), strip_nulls(v));
                }
            }
        }
        _ => *base = strip_nulls(patch),
    }
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Keeps only the part of an applied configuration that `scope` may change.
pub(crate) fn scoped_patch(patch: &Value, scope: Scope) -> Value {
    let mut out = Map::new();
    let Some(m) = patch.as_object() else {
        return Value::Object(out);
    };
    for (k, v) in m {
        match (scope, k.as_str()) {
            (_, "apiVersion" | "kind") => {}
            (Scope::Status, "status") => {
                out.insert(k.clone(), v.clone());
            }
            (Scope::Status, _) => {}
            (
                Scope::Main {
                    exclude_status: true,
                },
                "status",
            ) => {}
            (Scope::Main { .. }, "metadata") => {
                let mut meta = Map::new();
                if let Some(pm) = v.as_object() {
                    for f in META_TRACKED {
                        if let Some(fv) = pm.get(f) {
                            meta.insert(f.to_string(), fv.clone());
                        }
                    }
                }
                out.insert("metadata".into(), Value::Object(meta));
            }
            (Scope::Main { .. }, _) => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// Server-side apply of `patch` by `manager` onto `current`. Returns the new object,
/// or the conflicts when `force` is false and another manager owns a field the apply
/// would change.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply(
    entries: &mut Vec<ManagedEntry>,
    manager: &str,
    subresource: &str,
    api_version: &str,
    current: &Value,
    patch: &Value,
    force: bool,
    scope: Scope,
    now: &str,
) -> Result<Value, Vec<ApplyConflict>> {
    let patch = scoped_patch(patch, scope);
    let applied = leaves(&patch, scope);
    let me = |e: &ManagedEntry| e.is(manager, Operation::Apply, subresource);

    let mut conflicts = Vec::new();
    for e in entries.iter().filter(|e| !me(e)) {
        for q in &e.fields {
            for (p, pv) in &applied {
                if related(p, q) && value_at(current, p) != Some(pv) {
                    conflicts.push(ApplyConflict {
                        manager: e.manager.clone(),
                        api_version: e.api_version.clone(),
                        path: q.clone(),
                    });
                    break;
                }
            }
        }
    }
    if !conflicts.is_empty() {
        if !force {
            return Err(conflicts);
        }
        for e in entries.iter_mut().filter(|e| !me(e)) {
            e.fields.retain(|q| {
                !applied
                    .iter()
                    .any(|(p, pv)| related(p, q) && value_at(current, p) != Some(pv))
            });
        }
    }

    let mut new = current.clone();
    merge_applied(&mut new, &patch);

    // Fields this manager applied before but no longer applies are removed unless
    // another manager also owns them.
    let previously: BTreeSet<FieldPath> = entries
        .iter()
        .find(|e| me(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    for old in previously {
        if applied.contains_key(&old) {
            continue;
        }
        let owned_elsewhere = entries
            .iter()
            .filter(|e| !me(e))
            .any(|e| e.fields.iter().any(|q| related(q, &old)));
        if !owned_elsewhere {
            remove_at(&mut new, &old);
        }
    }

    let fields: BTreeSet<FieldPath> = applied.into_keys().collect();
    match entries.iter_mut().find(|e| me(e)) {
        Some(e) => {
            if e.fields != fields {
                e.time = now.to_string();
            }
            e.fields = fields;
            e.api_version = api_version.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: manager.to_string(),
            operation: Operation::Apply,
            api_version: api_version.to_string(),
            subresource: subresource.to_string(),
            time: now.to_string(),
            fields,
        }),
    }
    Ok(new)
}

/// Like the real server's last-applied manager: a `kubectl` apply may take over, without
/// force, fields that client-side apply set (those in the live object's
/// `kubectl.kubernetes.io/last-applied-configuration`). Returns true when every
/// conflict is such a field.
pub(crate) fn conflicts_allowed_by_last_applied(live: &Value, conflicts: &[ApplyConflict]) -> bool {
    let Some(text) = live
        .pointer("/metadata/annotations")
        .and_then(|a| a.get("kubectl.kubernetes.io/last-applied-configuration"))
        .and_then(Value::as_str)
    else {
        return false;
    };
    let Ok(last) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    let allowed = leaves(
        &last,
        Scope::Main {
            exclude_status: false,
        },
    );
    conflicts
        .iter()
        .all(|c| allowed.keys().any(|p| related(p, &c.path)))
}

/// Kubernetes-style message for apply conflicts.
pub(crate) fn conflict_message(conflicts: &[ApplyConflict]) -> String {
    let n = conflicts.len();
    let mut msg = format!(
        "Apply failed with {n} conflict{}: ",
        if n == 1 { "" } else { "s" }
    );
    let parts: Vec<String> = conflicts
        .iter()
        .map(|c| {
            format!(
                "conflict with \"{}\" using {}: .{}",
                c.manager,
                c.api_version,
                c.path.join(".")
            )
        })
        .collect();
    msg.push_str(&parts.join("\n"));
    msg
}

/// Renders entries in the real `metadata.managedFields` format (fieldsV1).
pub(crate) fn render(entries: &[ManagedEntry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| {
                let mut fields = Map::new();
                for path in &e.fields {
                    let mut cur = &mut fields;
                    for seg in path {
                        let entry = cur
                            .entry(format!("f:{seg}"))
                            .or_insert_with(|| Value::Object(Map::new()));
                        if !entry.is_object() {
                            *entry = Value::Object(Map::new());
                        }
                        cur = entry.as_object_mut().expect("just made an object");
                    }
                }
                let mut v = json!({
                    "manager": e.manager,
                    "operation": match e.operation { Operation::Apply => "Apply", Operation::Update => "Update" },
                    "apiVersion": e.api_version,
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": Value::Object(fields),
                });
                if !e.subresource.is_empty() {
                    v["subresource"] = json!(e.subresource);
                }
                v
            })
            .collect(),
    )
}

fn parse_fields(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    let Some(m) = v.as_object() else {
        return;
    };
    let mut children = false;
    for (k, child) in m {
        if let Some(name) = k.strip_prefix("f:") {
            children = true;
            path.push(name.to_string());
            parse_fields(child, path, out);
            path.pop();
        } else if k.starts_with("k:") || k.starts_with("v:") || k.starts_with("i:") {
            // List items: lists are atomic here, so the list itself is owned.
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
    }
    if !children && !path.is_empty() {
        out.insert(path.clone());
    }
}

/// Parses `metadata.managedFields` as written by a client (kubectl rewrites them
/// when moving from client-side to server-side apply). `None` if malformed.
pub(crate) fn parse(v: &Value) -> Option<Vec<ManagedEntry>> {
    let mut out = Vec::new();
    for e in v.as_array()? {
        let manager = e
            .get("manager")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if manager.is_empty() {
            // `[{}]` resets managed fields.
            continue;
        }
        let operation = match e.get("operation").and_then(Value::as_str) {
            Some("Apply") => Operation::Apply,
            Some("Update") => Operation::Update,
            _ => return None,
        };
        let mut fields = BTreeSet::new();
        if let Some(f) = e.get("fieldsV1") {
            parse_fields(f, &mut Vec::new(), &mut fields);
        }
        out.push(ManagedEntry {
            manager,
            operation,
            api_version: e
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            subresource: e
                .get("subresource")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            time: e
                .get("time")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            fields,
        });
    }
    Some(out)
}

/// Entries equal apart from timestamps (a write changing only those is a no-op).
pub(crate) fn same_ignoring_time(a: &[ManagedEntry], b: &[ManagedEntry]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.manager == y.manager
                && x.operation == y.operation
                && x.subresource == y.subresource
                && x.fields == y.fields
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2025-01-01T00:00:00Z";
    const MAIN: Scope = Scope::Main {
        exclude_status: false,
    };

    #[test]
    fn apply_conflicts_and_force() {
        let mut entries = Vec::new();
        let base = json!({"metadata": {"name": "l"}, "spec": {}});
        let a = json!({"spec": {"holderIdentity": "a", "leaseDurationSeconds": 10}});
        let obj = apply(&mut entries, "a", "", "v1", &base, &a, false, MAIN, NOW).unwrap();
        assert_eq!(obj["spec"]["holderIdentity"], "a");
        // Same value by another manager: shared, no conflict.
        let same = json!({"spec": {"leaseDurationSeconds": 10}});
        apply(&mut entries, "b", "", "v1", &obj, &same, false, MAIN, NOW).unwrap();
        let b = json!({"spec": {"holderIdentity": "b"}});
        let err = apply(&mut entries, "b", "", "v1", &obj, &b, false, MAIN, NOW).unwrap_err();
        assert_eq!(err[0].manager, "a");
        let obj2 = apply(&mut entries, "b", "", "v1", &obj, &b, true, MAIN, NOW).unwrap();
        assert_eq!(obj2["spec"]["holderIdentity"], "b");
        let a_entry = entries.iter().find(|e| e.manager == "a").unwrap();
        assert!(
            !a_entry
                .fields
                .contains(&vec!["spec".to_string(), "holderIdentity".to_string()])
        );
    }

    #[test]
    fn update_takes_ownership_and_removed_fields_lose_owners() {
        let mut entries = Vec::new();
        let base = json!({"spec": {}});
        let a = json!({"spec": {"holderIdentity": "a"}});
        let obj = apply(&mut entries, "a", "", "v1", &base, &a, false, MAIN, NOW).unwrap();
        let mut released = obj.clone();
        released["spec"]
            .as_object_mut()
            .unwrap()
            .remove("holderIdentity");
        record_update(
            &mut entries,
            "a",
            "",
            "v1",
            Some(&obj),
            &released,
            MAIN,
            NOW,
        );
        cleanup(&mut entries, &released, MAIN);
        let b = json!({"spec": {"holderIdentity": "b"}});
        apply(&mut entries, "b", "", "v1", &released, &b, false, MAIN, NOW).unwrap();
    }

    #[test]
    fn apply_removes_fields_no_longer_applied() {
        let mut entries = Vec::new();
        let base = json!({});
        let first = json!({"spec": {"x": 1, "y": 2}});
        let obj = apply(&mut entries, "a", "", "v1", &base, &first, false, MAIN, NOW).unwrap();
        let second = json!({"spec": {"x": 1}});
        let obj = apply(&mut entries, "a", "", "v1", &obj, &second, false, MAIN, NOW).unwrap();
        assert_eq!(obj, json!({"spec": {"x": 1}}));
        let fields = render(&entries);
        assert_eq!(fields[0]["fieldsV1"], json!({"f:spec": {"f:x": {}}}));
    }
}
