//! Server-side printing (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`).

use serde_json::{Value, json};

use super::jsonpath;
use super::resources::{Column, ResourceDef};
use super::util::{age_of, to_partial};

fn col(name: &str, type_: &str, json_path: &str) -> Column {
    Column {
        name: name.into(),
        type_: type_.into(),
        format: if name == "Name" {
            "name".into()
        } else {
            String::new()
        },
        description: String::new(),
        priority: 0,
        json_path: json_path.into(),
    }
}

const AGE: &str = ".metadata.creationTimestamp";

/// Columns after Name for a resource and version.
fn columns(res: &ResourceDef, version: &str) -> Vec<Column> {
    if res.custom {
        let cols = res.columns.get(version).cloned().unwrap_or_default();
        if cols.is_empty() {
            return vec![col("Age", "date", AGE)];
        }
        return cols;
    }
    match (res.group.as_str(), res.plural.as_str()) {
        ("", "secrets") => vec![
            col("Type", "string", ".type"),
            col("Data", "integer", "#data"),
            col("Age", "date", AGE),
        ],
        ("", "configmaps") => vec![col("Data", "integer", "#data"), col("Age", "date", AGE)],
        ("", "namespaces") => vec![
            col("Status", "string", ".status.phase"),
            col("Age", "date", AGE),
        ],
        ("coordination.k8s.io", "leases") => vec![
            col("Holder", "string", ".spec.holderIdentity"),
            col("Age", "date", AGE),
        ],
        ("apps", "deployments") => vec![
            col("Ready", "string", "#ready"),
            col("Up-to-date", "integer", ".status.updatedReplicas"),
            col("Available", "integer", ".status.availableReplicas"),
            col("Age", "date", AGE),
        ],
        ("apps", "statefulsets") => vec![col("Ready", "string", "#ready"), col("Age", "date", AGE)],
        ("", "events") => vec![
            col("Type", "string", ".type"),
            col("Reason", "string", ".reason"),
            col("Object", "string", "#involved"),
            col("Message", "string", ".message"),
        ],
        ("events.k8s.io", "events") => vec![
            col("Type", "string", ".type"),
            col("Reason", "string", ".reason"),
            col("Object", "string", "#regarding"),
            col("Message", "string", ".note"),
        ],
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            vec![col("Created At", "date", "#created")]
        }
        _ => vec![col("Age", "date", AGE)],
    }
}

fn scalar_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn cell(c: &Column, obj: &Value) -> Value {
    match c.json_path.as_str() {
        "#data" => {
            return json!(
                obj.get("data")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len())
                    + obj
                        .get("binaryData")
                        .and_then(Value::as_object)
                        .map_or(0, |m| m.len())
            );
        }
        "#ready" => {
            let ready = obj
                .pointer("/status/readyReplicas")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let want = obj
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            return json!(format!("{ready}/{want}"));
        }
        "#created" => {
            // Real servers print the CRD creation time as a timestamp, not an age.
            return obj
                .pointer("/metadata/creationTimestamp")
                .cloned()
                .unwrap_or(Value::Null);
        }
        "#involved" | "#regarding" => {
            let field = if c.json_path == "#involved" {
                "involvedObject"
            } else {
                "regarding"
            };
            let o = obj.get(field);
            let kind = o
                .and_then(|o| o.get("kind"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let name = o
                .and_then(|o| o.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            return json!(format!("{}/{name}", kind.to_lowercase()));
        }
        _ => {}
    }
    // Like the real custom resource printer, only the first match is shown.
    let Some(first) = jsonpath::eval(&c.json_path, obj).into_iter().next() else {
        return Value::Null;
    };
    match (c.type_.as_str(), &first) {
        (_, Value::Null) => Value::Null,
        // Real servers print dates as ages; future dates show as "<invalid>".
        ("date", Value::String(s)) => json!(age_of(s)),
        ("integer" | "number" | "boolean", _) => first,
        _ => json!(scalar_string(&first)),
    }
}

/// A meta.k8s.io/v1 Table for `objs`.
pub(crate) fn table(
    res: &ResourceDef,
    version: &str,
    objs: &[Value],
    list_meta: Option<Value>,
    include_object: bool,
) -> Value {
    let cols = columns(res, version);
    let mut defs = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    })];
    for c in &cols {
        defs.push(json!({
            "name": c.name, "type": c.type_, "format": c.format,
            "description": c.description, "priority": c.priority,
        }));
    }
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let mut cells = vec![o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            cells.extend(cols.iter().map(|c| cell(c, o)));
            let mut row = json!({"cells": cells});
            if include_object {
                row["object"] = to_partial(o);
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta.unwrap_or(json!({})),
        "columnDefinitions": defs,
        "rows": rows,
    })
}
