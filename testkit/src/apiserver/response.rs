//! What the server answers: JSON responses, `Status` errors, and objects and lists
//! rendered in the output format the client asked for.

use axum::body::Body;
use hyper::StatusCode;
use serde_json::{Value, json};

use super::convert;
use super::request::Output;
use super::resources::ResourceDef;
use super::table;
use super::util::{ApiError, to_partial};

pub(crate) type Resp = hyper::Response<Body>;

pub(crate) fn json_response(code: u16, v: &Value) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_default();
    hyper::Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(Body::from(body))
        .unwrap_or_else(|_| hyper::Response::new(Body::empty()))
}

pub(crate) fn error_response(e: &ApiError) -> Resp {
    json_response(e.code, &e.to_status())
}

/// `200 ok` in plain text, as the health endpoints answer.
pub(crate) fn plain_ok() -> Resp {
    hyper::Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .body(Body::from("ok"))
        .unwrap_or_else(|_| hyper::Response::new(Body::empty()))
}

/// The stored object as served through `res` (its shape, see `convert`) for `version`.
pub(crate) fn present(res: &ResourceDef, version: &str, obj: &Value) -> Value {
    let mut o = convert::from_storage(res, obj);
    if let Some(m) = o.as_object_mut() {
        m.insert("apiVersion".into(), json!(res.api_version(version)));
    }
    o
}

pub(crate) fn render_one(res: &ResourceDef, version: &str, obj: &Value, output: Output) -> Value {
    match output {
        Output::Full => present(res, version, obj),
        Output::Meta => to_partial(obj),
        Output::Table => table::table(res, version, &[present(res, version, obj)], None, true),
    }
}

/// A list of `objs` with list metadata `meta`; `include_object` puts the objects'
/// metadata into the rows of a Table.
pub(crate) fn render_list(
    res: &ResourceDef,
    version: &str,
    objs: &[Value],
    meta: Value,
    output: Output,
    include_object: bool,
) -> Value {
    match output {
        Output::Full => json!({
            "kind": res.list_kind,
            "apiVersion": res.api_version(version),
            "metadata": meta,
            "items": objs.iter().map(|o| present(res, version, o)).collect::<Vec<_>>(),
        }),
        Output::Meta => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta,
            "items": objs.iter().map(to_partial).collect::<Vec<_>>(),
        }),
        Output::Table => {
            let objs: Vec<Value> = objs.iter().map(|o| present(res, version, o)).collect();
            table::table(res, version, &objs, Some(meta), include_object)
        }
    }
}
