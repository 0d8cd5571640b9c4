//! What a request asks for, read from its query, headers and body: output format,
//! selectors, field manager, dry-run and delete options.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::Value;

use super::convert;
use super::patch;
use super::protobuf;
use super::resources::ResourceDef;
use super::selector::{FieldSelector, LabelSelector};
use super::store::DeleteOpts;
use super::util::{ApiError, ApiResult};

pub(crate) type Query = HashMap<String, String>;

pub(crate) fn parse_query(uri: &hyper::Uri) -> Query {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub(crate) fn qbool(q: &Query, k: &str) -> bool {
    q.get(k).is_some_and(|v| v == "true" || v == "1")
}

pub(crate) fn dry_run(q: &Query) -> bool {
    q.get("dryRun").is_some_and(|v| v == "All")
}

/// How the client wants objects rendered (from the Accept header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    Full,
    Meta,
    Table,
}

pub(crate) fn output_format(headers: &hyper::HeaderMap) -> ApiResult<Output> {
    let Some(accept) = headers.get("accept").and_then(|v| v.to_str().ok()) else {
        return Ok(Output::Full);
    };
    if accept.trim().is_empty() {
        return Ok(Output::Full);
    }
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let base = parts.next().unwrap_or("");
        if !matches!(base, "application/json" | "*/*" | "application/*") {
            continue;
        }
        let params: HashMap<&str, &str> = parts.filter_map(|p| p.split_once('=')).collect();
        match params.get("as").copied() {
            None => return Ok(Output::Full),
            Some("Table") if params.get("g").is_none_or(|g| *g == "meta.k8s.io") => {
                return Ok(Output::Table);
            }
            Some("PartialObjectMetadata" | "PartialObjectMetadataList")
                if params.get("g").is_none_or(|g| *g == "meta.k8s.io") =>
            {
                return Ok(Output::Meta);
            }
            Some(_) => continue,
        }
    }
    Err(ApiError::new(
        406,
        "NotAcceptable",
        format!(
            "only the following media types are accepted: application/json (asked for {accept})"
        ),
    ))
}

/// The request's label and field selectors; field paths as named in `view`, matched
/// against the stored shape (see `convert`).
pub(crate) fn selectors(
    q: &Query,
    view: &ResourceDef,
) -> ApiResult<(LabelSelector, FieldSelector)> {
    let label = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let field = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad_request)?
        .map_paths(|p| convert::field_path(view, p));
    Ok((label, field))
}

pub(crate) fn content_type(parts: &http::request::Parts) -> &str {
    parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A create/update body: JSON, or protobuf for the kinds kubectl's typed clients send.
pub(crate) fn object_body(parts: &http::request::Parts, body: &Bytes) -> ApiResult<Value> {
    if content_type(parts).starts_with("application/vnd.kubernetes.protobuf") {
        protobuf::decode(body)
    } else {
        patch::parse_body(body, false)
    }
}

pub(crate) fn field_manager(parts: &http::request::Parts, q: &Query) -> String {
    if let Some(m) = q.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    parts
        .headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

pub(crate) fn delete_opts(body: &Bytes, q: &Query) -> ApiResult<DeleteOpts> {
    let mut opts = DeleteOpts {
        dry_run: dry_run(q),
        ..Default::default()
    };
    let mut policy = q.get("propagationPolicy").cloned();
    if !body.is_empty() {
        let b = patch::parse_body(body, false)?;
        if let Some(p) = b.get("propagationPolicy").and_then(Value::as_str) {
            policy = Some(p.to_string());
        }
        if b.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
            policy = Some("Orphan".into());
        }
        if let Some(pre) = b.get("preconditions") {
            opts.uid = pre.get("uid").and_then(Value::as_str).map(str::to_string);
            opts.resource_version = pre
                .get("resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        if b.get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|v| v == "All"))
        {
            opts.dry_run = true;
        }
    }
    match policy.as_deref() {
        None | Some("" | "Background" | "Foreground") => {}
        Some("Orphan") => opts.orphan = true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid propagationPolicy {other:?}"
            )));
        }
    }
    Ok(opts)
}
