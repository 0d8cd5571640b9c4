//! Request routing and the resource verbs.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::managed::{self, Scope};
use super::patch::{self, PatchKind};
use super::request::{
    Output, Query, content_type, delete_opts, dry_run, field_manager, object_body, output_format,
    parse_query, qbool, selectors,
};
use super::resources::ResourceDef;
use super::response::{
    Resp, error_response, json_response, plain_ok, present, render_list, render_one,
};
use super::shared::Shared;
use super::store::{main_scope, scoped_update};
use super::util::{self, ApiError, ApiResult, meta_str};
use super::{convert, discovery, openapi, watch};

pub(crate) async fn handle(shared: Arc<Shared>, req: hyper::Request<Incoming>) -> Resp {
    let latency = shared.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    match route(&shared, &parts, &body) {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn route(shared: &Arc<Shared>, parts: &http::request::Parts, body: &Bytes) -> ApiResult<Resp> {
    let path = parts.uri.path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let q = parse_query(&parts.uri);
    // Resource requests are counted (and may fail by injection) before anything else.
    let (prefix_len, group, version) = match segs.as_slice() {
        ["api", "v1", _, ..] => (2, "", "v1"),
        ["apis", g, v, _, ..] => (3, *g, *v),
        _ => (0, "", ""),
    };
    if prefix_len > 0 {
        return resource_request(shared, parts, body, &q, group, version, &segs[prefix_len..]);
    }
    if shared.faults.outage() {
        return Err(ApiError::unavailable());
    }
    if parts.method != Method::GET {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let store = shared.lock_store();
    let v = match segs.as_slice() {
        [] => {
            json!({"paths": ["/api", "/api/v1", "/apis", "/openapi/v3", "/version", "/healthz", "/livez", "/readyz"]})
        }
        ["version"] => discovery::version(),
        ["healthz" | "livez" | "readyz", ..] => return Ok(plain_ok()),
        ["api"] => {
            output_format(&parts.headers)?;
            discovery::api_versions()
        }
        ["apis"] => {
            output_format(&parts.headers)?;
            discovery::group_list(&store)
        }
        ["api", "v1"] => discovery::resource_list(&store, "", "v1")?,
        ["apis", g] => discovery::group(&store, g)?,
        ["apis", g, v] => discovery::resource_list(&store, g, v)?,
        ["openapi", "v3"] => openapi::index(&store),
        ["openapi", "v3", rest @ ..] => openapi::document(&store, &rest.join("/"))?,
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    Ok(json_response(200, &v))
}

/// A request for a resource: collection or object, maybe a subresource.
struct Target<'a> {
    /// The stored resource: what the store is asked for.
    res: Arc<ResourceDef>,
    /// The resource asked for: its shape, names and schema are what the client sees.
    /// The same as `res` but for resources that share another's storage (`convert`).
    view: Arc<ResourceDef>,
    version: &'a str,
    /// Namespace from the path ("" when none).
    ns: String,
    name: Option<String>,
    sub: Option<String>,
}

fn not_found_path() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn resolve<'a>(
    shared: &Shared,
    group: &str,
    version: &'a str,
    rest: &[&str],
) -> ApiResult<Target<'a>> {
    let (ns, plural, name, sub): (Option<&str>, &str, Option<&str>, Option<&str>) = match rest {
        ["namespaces"] => (None, "namespaces", None, None),
        ["namespaces", name] => (None, "namespaces", Some(*name), None),
        ["namespaces", name, sub @ ("status" | "finalize")] if group.is_empty() => {
            (None, "namespaces", Some(*name), Some(*sub))
        }
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        [plural] => (None, *plural, None, None),
        [plural, name] => (None, *plural, Some(*name), None),
        [plural, name, sub] => (None, *plural, Some(*name), Some(*sub)),
        _ => return Err(not_found_path()),
    };
    let (res, view) = {
        let store = shared.lock_store();
        let view = store
            .resource(group, plural)
            .filter(|r| r.serves(version))
            .ok_or_else(not_found_path)?;
        let res = match convert::storage_of(group, plural) {
            Some((g, p)) => store.resource(g, p).ok_or_else(not_found_path)?,
            None => view.clone(),
        };
        (res, view)
    };
    if ns.is_some() && !res.namespaced {
        return Err(not_found_path());
    }
    if !res.namespaced && ns.is_none() && plural != "namespaces" && rest.len() > 3 {
        return Err(not_found_path());
    }
    if res.namespaced && ns.is_none() && name.is_some() {
        return Err(not_found_path());
    }
    let sub = match sub {
        None => None,
        Some("status") if res.status => Some("status".to_string()),
        Some("finalize") if plural == "namespaces" => Some("finalize".to_string()),
        Some(_) => return Err(not_found_path()),
    };
    Ok(Target {
        res,
        view,
        version,
        ns: ns.unwrap_or("").to_string(),
        name: name.map(str::to_string),
        sub,
    })
}

fn verb_of(method: &Method, t: &Target, q: &Query) -> ApiResult<&'static str> {
    Ok(match (method, t.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if qbool(q, "watch") => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!(
                    "the server does not allow this method on the requested resource ({method})"
                ),
            ));
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn resource_request(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    body: &Bytes,
    q: &Query,
    group: &str,
    version: &str,
    rest: &[&str],
) -> ApiResult<Resp> {
    let t = match resolve(shared, group, version, rest) {
        Ok(t) => t,
        Err(e) => {
            if shared.faults.outage() {
                return Err(ApiError::unavailable());
            }
            return Err(e);
        }
    };
    let verb = verb_of(&parts.method, &t, q)?;
    let sub_suffix = t.sub.as_ref().map(|s| format!("/{s}")).unwrap_or_default();
    {
        let counter_key = (
            verb.to_string(),
            format!("{}/{}{}", t.view.counter_group(), t.view.plural, sub_suffix),
        );
        let mut counters = shared.counters.lock().unwrap_or_else(|e| e.into_inner());
        *counters.entry(counter_key).or_insert(0) += 1;
    }
    if shared.faults.outage() {
        return Err(ApiError::unavailable());
    }
    if let Some(code) = shared
        .faults
        .take(verb, &format!("{}{}", t.res.plural, sub_suffix))
    {
        return Err(ApiError::injected(code));
    }
    let output = output_format(&parts.headers)?;
    if !body.is_empty() && content_type(parts).contains("cbor") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json, application/vnd.kubernetes.protobuf (Secret, ConfigMap, Namespace only)",
        ));
    }
    verb_request(shared, parts, body, q, &t, verb, output).map_err(|e| relabel(&t, e))
}

/// An error the store raised about the stored resource, told in the names of the one
/// asked for (`events.events.k8s.io "x" not found`, not `events "x" not found`).
fn relabel(t: &Target, mut e: ApiError) -> ApiError {
    if Arc::ptr_eq(&t.res, &t.view) {
        return e;
    }
    let (stored, asked) = (t.res.qualified(), t.view.qualified());
    if e.message.starts_with(&format!("{stored} \"")) {
        e.message = format!("{asked}{}", &e.message[stored.len()..]);
    }
    if let Some(name) = e
        .details
        .as_ref()
        .and_then(|d| d.get("name")?.as_str().map(str::to_string))
    {
        e = e.with_details(&t.view, &name);
    }
    e
}

#[allow(clippy::too_many_arguments)]
fn verb_request(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    body: &Bytes,
    q: &Query,
    t: &Target,
    verb: &str,
    output: Output,
) -> ApiResult<Resp> {
    let (res, view) = (t.res.clone(), t.view.clone());
    match verb {
        "get" => {
            let name = t.name.as_deref().unwrap_or("");
            let obj = shared.lock_store().get(&res, &t.ns, name)?;
            Ok(json_response(
                200,
                &render_one(&view, t.version, &obj, output),
            ))
        }
        "list" => list(shared, t, q, output),
        "watch" => {
            let mut store = shared.lock_store();
            let ns = if t.ns.is_empty() {
                None
            } else {
                Some(t.ns.clone())
            };
            watch::start(
                shared,
                &mut store,
                res,
                view,
                t.version.to_string(),
                ns,
                q,
                output,
            )
        }
        "create" => {
            let body = object_body(parts, body)?;
            openapi::validate_strict(&view, t.version, &body, q)?;
            let body = convert::to_storage(&view, body);
            let manager = field_manager(parts, q);
            let obj = shared
                .lock_store()
                .create(&res, &t.ns, body, &manager, dry_run(q))?;
            Ok(json_response(
                201,
                &render_one(&view, t.version, &obj, output),
            ))
        }
        "update" => update(shared, parts, t, body, q, output),
        "patch" => patch_request(shared, parts, t, body, q, output),
        "delete" => {
            let opts = delete_opts(body, q)?;
            let name = t.name.as_deref().unwrap_or("");
            let obj = shared.lock_store().delete(&res, &t.ns, name, &opts)?;
            Ok(json_response(
                200,
                &render_one(&view, t.version, &obj, output),
            ))
        }
        "deletecollection" => {
            let opts = delete_opts(body, q)?;
            let (label, field) = selectors(q, &view)?;
            let mut store = shared.lock_store();
            let ns = if t.ns.is_empty() {
                None
            } else {
                Some(t.ns.as_str())
            };
            let names: Vec<(String, String)> = store
                .list(&res, ns)
                .filter(|(_, o)| label.matches(o) && field.matches(o))
                .map(|(k, _)| (k.2.clone(), k.3.clone()))
                .collect();
            let mut items = Vec::new();
            for (ns, name) in names {
                if let Ok(o) = store.delete(&res, &ns, &name, &opts) {
                    items.push(present(&view, t.version, &o));
                }
            }
            let rv = store.rv.to_string();
            Ok(json_response(
                200,
                &json!({"kind": view.list_kind, "apiVersion": view.api_version(t.version),
                        "metadata": {"resourceVersion": rv}, "items": items}),
            ))
        }
        _ => Err(not_found_path()),
    }
}

fn list(shared: &Arc<Shared>, t: &Target, q: &Query, output: Output) -> ApiResult<Resp> {
    let (label, field) = selectors(q, &t.view)?;
    let limit: usize = match q.get("limit").filter(|s| !s.is_empty()) {
        Some(l) => l
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?
            .max(0) as usize,
        None => 0,
    };
    let store = shared.lock_store();
    let mut after: Option<(String, String)> = None;
    if let Some(token) = q.get("continue").filter(|s| !s.is_empty()) {
        let decoded = util::hex_decode(token)
            .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
        let mut it = decoded.splitn(3, '\n');
        let (Some(rv), Some(ns), Some(name)) = (it.next(), it.next(), it.next()) else {
            return Err(ApiError::bad_request("invalid continue token"));
        };
        let rv: u64 = rv
            .parse()
            .map_err(|_| ApiError::bad_request("invalid continue token"))?;
        if rv < store.compacted {
            return Err(ApiError::expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        after = Some((ns.to_string(), name.to_string()));
    }
    let ns = if t.ns.is_empty() {
        None
    } else {
        Some(t.ns.as_str())
    };
    let res = &t.res;
    let mut items = Vec::new();
    let mut next: Option<String> = None;
    let mut remaining = 0usize;
    for (k, obj) in store.list(res, ns) {
        if let Some((ans, aname)) = &after
            && (k.2.as_str(), k.3.as_str()) <= (ans.as_str(), aname.as_str())
        {
            continue;
        }
        if !label.matches(obj) || !field.matches(obj) {
            continue;
        }
        if limit > 0 && items.len() >= limit {
            remaining += 1;
            continue;
        }
        items.push((k.clone(), obj));
    }
    if remaining > 0
        && let Some((k, _)) = items.last()
    {
        next = Some(util::hex_encode(&format!("{}\n{}\n{}", store.rv, k.2, k.3)));
    }
    let rv = store.rv.to_string();
    let mut meta = json!({"resourceVersion": rv});
    if let Some(c) = &next {
        meta["continue"] = json!(c);
        meta["remainingItemCount"] = json!(remaining);
    }
    let objs: Vec<Value> = items.iter().map(|(_, o)| (*o).clone()).collect();
    let include_object = q.get("includeObject").is_none_or(|v| v != "None");
    let v = render_list(&t.view, t.version, &objs, meta, output, include_object);
    Ok(json_response(200, &v))
}

fn scope_of(t: &Target) -> Scope {
    if t.sub.as_deref() == Some("status") {
        Scope::Status
    } else {
        main_scope(&t.res)
    }
}

/// Managed fields sent by the client replace the server's when they differ from
/// what the server last rendered (as in a real server).
fn client_managed(
    old: &Value,
    new: &Value,
    managed: Vec<managed::ManagedEntry>,
) -> ApiResult<Vec<managed::ManagedEntry>> {
    let sent = new.pointer("/metadata/managedFields");
    match sent {
        Some(sent) if Some(sent) != old.pointer("/metadata/managedFields") => managed::parse(sent)
            .ok_or_else(|| ApiError::bad_request("invalid metadata.managedFields")),
        _ => Ok(managed),
    }
}

fn update(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    t: &Target,
    body: &Bytes,
    q: &Query,
    output: Output,
) -> ApiResult<Resp> {
    let (res, view) = (&t.res, &t.view);
    let name = t.name.as_deref().unwrap_or("");
    let body = object_body(parts, body)?;
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    if let Some(bname) = meta_str(&body, "name")
        && bname != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({bname}) does not match the name on the URL ({name})"
        )));
    }
    if let Some(kind) = body.get("kind").and_then(Value::as_str)
        && kind != res.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the object ({kind}) does not match the resource ({})",
            res.kind
        )));
    }
    openapi::validate_strict(view, t.version, &body, q)?;
    let body = convert::to_storage(view, body);
    let manager = field_manager(parts, q);
    let mut store = shared.lock_store();
    let (old, managed) = store.stored(res, &t.ns, name)?;
    let (old, managed) = (old.clone(), managed.to_vec());
    let body_rv = meta_str(&body, "resourceVersion").unwrap_or("");
    if body_rv.is_empty() {
        if !res.unconditional_update {
            return Err(ApiError::invalid(
                res,
                name,
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
            ));
        }
    } else if Some(body_rv) != meta_str(&old, "resourceVersion") {
        return Err(ApiError::stale(res, name));
    }
    let scope = scope_of(t);
    let mut managed = client_managed(&old, &body, managed)?;
    let new = scoped_update(&old, body, scope);
    managed::record_update(
        &mut managed,
        &manager,
        t.sub.as_deref().unwrap_or(""),
        &view.api_version(t.version),
        Some(&old),
        &new,
        scope,
        &util::now_micro(),
    );
    let obj = store.commit(res, &t.ns, name, new, managed, dry_run(q))?;
    Ok(json_response(
        200,
        &render_one(view, t.version, &obj, output),
    ))
}

fn patch_request(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    t: &Target,
    body: &Bytes,
    q: &Query,
    output: Output,
) -> ApiResult<Resp> {
    let (res, view) = (&t.res, &t.view);
    let name = t.name.as_deref().unwrap_or("");
    let ct = content_type(parts);
    let kind = PatchKind::from_content_type(ct).ok_or_else(|| {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"),
        )
    })?;
    let patch_body = patch::parse_body(body, kind == PatchKind::Apply)?;
    let scope = scope_of(t);
    let sub = t.sub.as_deref().unwrap_or("");
    let api_version = view.api_version(t.version);
    let now = util::now_micro();
    let mut store = shared.lock_store();
    if kind == PatchKind::Apply {
        let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()) else {
            return Err(ApiError::bad_request(
                "PATCH with apply requires a non-empty fieldManager parameter",
            ));
        };
        if !patch_body.is_object() {
            return Err(ApiError::bad_request("apply patch must be an object"));
        }
        if let Some(bname) = meta_str(&patch_body, "name")
            && bname != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({bname}) does not match the name on the URL ({name})"
            )));
        }
        openapi::validate_strict(view, t.version, &patch_body, q)?;
        let patch_body = convert::to_storage(view, patch_body);
        let force = qbool(q, "force");
        match store.stored(res, &t.ns, name) {
            Ok((old, managed)) => {
                let (old, mut managed) = (old.clone(), managed.to_vec());
                if let Some(rv) = meta_str(&patch_body, "resourceVersion")
                    && !rv.is_empty()
                    && Some(rv) != meta_str(&old, "resourceVersion")
                {
                    return Err(ApiError::stale(res, name));
                }
                let mut result = managed::apply(
                    &mut managed,
                    manager,
                    sub,
                    &api_version,
                    &old,
                    &patch_body,
                    force,
                    scope,
                    &now,
                );
                if let Err(c) = &result
                    && manager == "kubectl"
                    && managed::conflicts_allowed_by_last_applied(&old, c)
                {
                    result = managed::apply(
                        &mut managed,
                        manager,
                        sub,
                        &api_version,
                        &old,
                        &patch_body,
                        true,
                        scope,
                        &now,
                    );
                }
                let new = result.map_err(|c| {
                    ApiError::new(409, "Conflict", managed::conflict_message(&c))
                        .with_details(res, name)
                })?;
                let new = scoped_update(&old, new, scope);
                let obj = store.commit(res, &t.ns, name, new, managed, dry_run(q))?;
                Ok(json_response(
                    200,
                    &render_one(view, t.version, &obj, output),
                ))
            }
            Err(e) if e.code == 404 && t.sub.is_none() => {
                let mut managed = Vec::new();
                let base = json!({"metadata": {"name": name}});
                let new = managed::apply(
                    &mut managed,
                    manager,
                    sub,
                    &api_version,
                    &base,
                    &patch_body,
                    force,
                    scope,
                    &now,
                )
                .map_err(|c| ApiError::new(409, "Conflict", managed::conflict_message(&c)))?;
                let obj = store.insert_new(res, &t.ns, name, new, managed, dry_run(q))?;
                Ok(json_response(
                    201,
                    &render_one(view, t.version, &obj, output),
                ))
            }
            Err(e) => Err(e),
        }
    } else {
        let manager = field_manager(parts, q);
        let (old, managed) = store.stored(res, &t.ns, name)?;
        let (old, managed) = (old.clone(), managed.to_vec());
        let mut doc = present(view, t.version, &old);
        patch::apply_patch(&mut doc, kind, &patch_body)?;
        if !doc.is_object() {
            return Err(ApiError::bad_request(
                "the patched object is not a JSON object",
            ));
        }
        let new_rv = meta_str(&doc, "resourceVersion").unwrap_or("");
        if !new_rv.is_empty() && Some(new_rv) != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(res, name));
        }
        if meta_str(&doc, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "metadata.name cannot be changed by a patch",
            ));
        }
        openapi::validate_strict(view, t.version, &doc, q)?;
        let doc = convert::to_storage(view, doc);
        let mut managed = client_managed(&old, &doc, managed)?;
        let new = scoped_update(&old, doc, scope);
        managed::record_update(
            &mut managed,
            &manager,
            sub,
            &api_version,
            Some(&old),
            &new,
            scope,
            &now,
        );
        let obj = store.commit(res, &t.ns, name, new, managed, dry_run(q))?;
        Ok(json_response(
            200,
            &render_one(view, t.version, &obj, output),
        ))
    }
}
