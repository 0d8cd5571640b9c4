//! Minimal OpenAPI v3 documents and strict field validation for custom resources.
//!
//! Custom resources get the CRD's `openAPIV3Schema` (plus `apiVersion`, `kind`,
//! `metadata`); built-in kinds get a schema that accepts any object. Every document
//! declares the `fieldValidation` query parameter on PATCH so that kubectl leaves
//! validation to the server, which checks for unknown fields when asked for
//! `fieldValidation=Strict` (CRD schema for custom resources, k8s-openapi's schemas
//! for built-ins).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use super::request::Query;
use super::resources::ResourceDef;
use super::store::Store;
use super::util::{ApiError, ApiResult};

/// "api/v1" or "apis/{group}/{version}" for every served group-version.
fn group_versions(store: &Store) -> BTreeMap<String, Vec<(ResourceDef, String)>> {
    let mut out: BTreeMap<String, Vec<(ResourceDef, String)>> = BTreeMap::new();
    for r in store.resources.values() {
        for v in &r.versions {
            let key = if r.group.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{}/{v}", r.group)
            };
            out.entry(key).or_default().push(((**r).clone(), v.clone()));
        }
    }
    out
}

fn fnv(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016X}")
}

pub(crate) fn index(store: &Store) -> Value {
    let mut paths = Map::new();
    for (gv, resources) in group_versions(store) {
        let doc = build(&resources);
        let hash = fnv(&doc.to_string());
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hash}")}),
        );
    }
    json!({"paths": paths})
}

pub(crate) fn document(store: &Store, gv: &str) -> ApiResult<Value> {
    let gvs = group_versions(store);
    let resources = gvs
        .get(gv)
        .ok_or_else(|| ApiError::new(404, "NotFound", format!("no OpenAPI document for {gv}")))?;
    Ok(build(resources))
}

fn schema_name(res: &ResourceDef, version: &str) -> String {
    if res.custom {
        let mut parts: Vec<&str> = res.group.split('.').collect();
        parts.reverse();
        format!("{}.{version}.{}", parts.join("."), res.kind)
    } else {
        let g = if res.group.is_empty() {
            "core".to_string()
        } else {
            res.group.split('.').next().unwrap_or("").to_string()
        };
        format!("io.k8s.api.{g}.{version}.{}", res.kind)
    }
}

fn gvk(res: &ResourceDef, version: &str) -> Value {
    json!({"group": res.group, "version": version, "kind": res.kind})
}

fn object_schema(res: &ResourceDef, version: &str) -> Value {
    let mut s = match res.schemas.get(version) {
        Some(s) if res.custom => s.clone(),
        _ => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
    };
    if let Some(m) = s.as_object_mut() {
        let props = m.entry("properties").or_insert_with(|| json!({}));
        if let Some(p) = props.as_object_mut() {
            p.entry("apiVersion").or_insert(json!({"type": "string"}));
            p.entry("kind").or_insert(json!({"type": "string"}));
            p.insert(
                "metadata".into(),
                json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            );
        }
        m.insert(
            "x-kubernetes-group-version-kind".into(),
            json!([gvk(res, version)]),
        );
    }
    s
}

fn build(resources: &[(ResourceDef, String)]) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for (res, version) in resources {
        let name = schema_name(res, version);
        schemas.insert(name.clone(), object_schema(res, version));
        let prefix = if res.group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{}/{version}", res.group)
        };
        let item = if res.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", res.plural)
        } else {
            format!("{prefix}/{}/{{name}}", res.plural)
        };
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}}});
        let op = |action: &str| {
            json!({
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk(res, version),
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                ],
                "responses": ok,
            })
        };
        paths.insert(
            item,
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        );
        let collection = if res.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", res.plural)
        } else {
            format!("{prefix}/{}", res.plural)
        };
        paths.insert(collection, json!({"post": op("post"), "get": op("list")}));
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

/// JSON Schemas of the built-in kinds, from k8s-openapi (generated once).
fn builtin_schema(res: &ResourceDef) -> Option<&'static Value> {
    use k8s_openapi::api::{apps, coordination, core, events};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions;
    static SCHEMAS: OnceLock<BTreeMap<(&'static str, &'static str), Value>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        fn s<T: schemars::JsonSchema>() -> Value {
            serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null)
        }
        BTreeMap::from([
            (("", "Secret"), s::<core::v1::Secret>()),
            (("", "ConfigMap"), s::<core::v1::ConfigMap>()),
            (("", "Namespace"), s::<core::v1::Namespace>()),
            (("", "Event"), s::<core::v1::Event>()),
            (("events.k8s.io", "Event"), s::<events::v1::Event>()),
            (
                ("coordination.k8s.io", "Lease"),
                s::<coordination::v1::Lease>(),
            ),
            (("apps", "Deployment"), s::<apps::v1::Deployment>()),
            (("apps", "StatefulSet"), s::<apps::v1::StatefulSet>()),
            (("apps", "DaemonSet"), s::<apps::v1::DaemonSet>()),
            (
                ("apiextensions.k8s.io", "CustomResourceDefinition"),
                s::<apiextensions::v1::CustomResourceDefinition>(),
            ),
        ])
    });
    schemas
        .iter()
        .find(|((g, k), _)| *g == res.group && *k == res.kind)
        .map(|(_, v)| v)
        .filter(|v| v.is_object())
}

/// Follows `$ref: "#/$defs/NAME"` (k8s-openapi schemas) within `root`.
fn resolve<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    let mut cur = schema;
    for _ in 0..32 {
        match cur
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .and_then(|name| root.get("$defs").and_then(|d| d.get(name)))
        {
            Some(next) => cur = next,
            None => break,
        }
    }
    cur
}

fn unknown_fields(schema: &Value, root: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    let schema = resolve(schema, root);
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match v {
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (k, child) in m {
                let child_path = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    unknown_fields(s, root, child, &child_path, out);
                } else if let Some(a) = additional {
                    if a.is_object() {
                        unknown_fields(a, root, child, &child_path, out);
                    }
                } else if props.is_some() {
                    out.push(child_path);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    unknown_fields(s, root, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// With `fieldValidation=Strict` (kubectl's default), rejects objects with fields
/// their schema does not declare: the CRD schema for custom resources (metadata not
/// checked), k8s-openapi's schema for built-ins.
pub(crate) fn validate_strict(
    res: &ResourceDef,
    version: &str,
    obj: &Value,
    q: &Query,
) -> ApiResult<()> {
    if q.get("fieldValidation").map(String::as_str) != Some("Strict") {
        return Ok(());
    }
    let mut out = Vec::new();
    if res.custom {
        let Some(schema) = res.schemas.get(version) else {
            return Ok(());
        };
        let mut body = obj.clone();
        if let Some(m) = body.as_object_mut() {
            m.remove("metadata");
            m.remove("apiVersion");
            m.remove("kind");
        }
        unknown_fields(schema, schema, &body, "", &mut out);
    } else if let Some(schema) = builtin_schema(res) {
        unknown_fields(schema, schema, obj, "", &mut out);
    }
    if out.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = out
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    Err(ApiError::bad_request(format!(
        "strict decoding error: {}",
        list.join(", ")
    )))
}
