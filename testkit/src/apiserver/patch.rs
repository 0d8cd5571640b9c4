//! JSON patch, JSON merge patch and a simplified strategic merge patch.

use serde_json::{Map, Value};

use super::util::{ApiError, ApiResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<PatchKind> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

/// Parses a request body as JSON, or YAML (apply patches may be YAML).
pub(crate) fn parse_body(body: &[u8], yaml_ok: bool) -> ApiResult<Value> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(e) if yaml_ok => serde_yaml::from_slice::<Value>(body).map_err(|ye| {
            ApiError::bad_request(format!("error decoding YAML: {ye} (as JSON: {e})"))
        }),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Applies a JSON, merge or strategic patch to `doc`.
pub(crate) fn apply_patch(doc: &mut Value, kind: PatchKind, patch: &Value) -> ApiResult<()> {
    match kind {
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(doc, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })
        }
        PatchKind::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("merge patch must be a JSON object"));
            }
            json_patch::merge(doc, patch);
            Ok(())
        }
        PatchKind::Strategic => {
            let Some(p) = patch.as_object() else {
                return Err(ApiError::bad_request(
                    "strategic merge patch must be a JSON object",
                ));
            };
            if !doc.is_object() {
                *doc = Value::Object(Map::new());
            }
            strategic_merge(doc, p);
            Ok(())
        }
        PatchKind::Apply => Err(ApiError::bad_request(
            "apply patches are handled separately",
        )),
    }
}

/// Merge key for keyed lists of built-in types (by field name).
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "volumeDevices"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "ports" => "containerPort",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "tolerations" => "key",
        "hostAliases" => "ip",
        _ => return None,
    })
}

/// Lists of scalars that strategic merge treats as sets.
fn is_primitive_set(field: &str) -> bool {
    matches!(field, "finalizers")
}

fn strategic_merge(doc: &mut Value, patch: &Map<String, Value>) {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut p = patch.clone();
            p.remove("$patch");
            *doc = strip_directives(&Value::Object(p));
            return;
        }
        Some("delete") => {
            *doc = Value::Object(Map::new());
            return;
        }
        _ => {}
    }
    let retain: Option<Vec<String>> = patch.get("$retainKeys").and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    });
    let Some(d) = doc.as_object_mut() else {
        *doc = strip_directives(&Value::Object(patch.clone()));
        return;
    };
    if let Some(keep) = retain {
        d.retain(|k, _| keep.contains(k) || patch.contains_key(k));
    }
    for (k, pv) in patch {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (d.get_mut(field), pv.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if pv.is_null() {
            d.remove(k);
            continue;
        }
        match (d.get_mut(k), pv) {
            (Some(dv @ Value::Object(_)), Value::Object(pm)) => strategic_merge(dv, pm),
            (Some(Value::Array(list)), Value::Array(items)) => {
                if let Some(key) = merge_key(k) {
                    merge_keyed_list(list, items, key);
                } else if is_primitive_set(k) {
                    for it in items {
                        if !list.contains(it) {
                            list.push(it.clone());
                        }
                    }
                } else {
                    *list = items.iter().map(strip_directives).collect();
                }
            }
            _ => {
                d.insert(k.clone(), strip_directives(pv));
            }
        }
    }
}

fn merge_keyed_list(list: &mut Vec<Value>, items: &[Value], key: &str) {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *list = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .map(strip_directives)
            .collect();
        return;
    }
    for item in items {
        let Some(kv) = item.get(key) else {
            list.push(strip_directives(item));
            continue;
        };
        let pos = list.iter().position(|x| x.get(key) == Some(kv));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = pos {
                list.remove(i);
            }
            continue;
        }
        match (pos, item.as_object()) {
            (Some(i), Some(pm)) => strategic_merge(&mut list[i], pm),
            _ => list.push(strip_directives(item)),
        }
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, v)| !k.starts_with('$') && !v.is_null())
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_containers_by_name() {
        let mut doc = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        let patch = json!({"spec": {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "b", "image": "z"}]}});
        apply_patch(&mut doc, PatchKind::Strategic, &patch).unwrap();
        assert_eq!(doc["spec"]["containers"][1]["image"], "z");
        assert_eq!(doc["spec"]["containers"][0]["image"], "x");
    }

    #[test]
    fn strategic_null_removes() {
        let mut doc = json!({"spec": {"holderIdentity": "a", "renewTime": "t"}});
        let patch = json!({"spec": {"holderIdentity": null}});
        apply_patch(&mut doc, PatchKind::Strategic, &patch).unwrap();
        assert_eq!(doc, json!({"spec": {"renewTime": "t"}}));
    }
}
