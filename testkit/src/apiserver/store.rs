//! Object storage, write semantics, garbage collection and the watch event history.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::managed::{self, ManagedEntry, Scope};
use super::resources::{self, ResourceDef};
use super::util::{self, ApiError, ApiResult, meta_mut, meta_str};

/// (group, plural, namespace or "", name)
pub(crate) type ObjKey = (String, String, String, String);

/// Number of events kept for watches that resume from a resourceVersion.
pub(crate) const HISTORY: usize = 65_536;

pub(crate) struct Stored {
    /// The object as served (storage version), including rendered managedFields.
    pub obj: Value,
    pub managed: Vec<ManagedEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub etype: EventType,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub object: Arc<Value>,
    /// The previous state for MODIFIED events (selector transitions).
    pub old: Option<Arc<Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Propagation {
    Background,
    Orphan,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct DeleteOpts {
    pub orphan: bool,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

pub(crate) struct Store {
    pub rv: u64,
    pub objects: BTreeMap<ObjKey, Stored>,
    pub history: VecDeque<Arc<Event>>,
    /// Events with rv <= compacted are no longer in `history`.
    pub compacted: u64,
    pub resources: BTreeMap<(String, String), Arc<ResourceDef>>,
    tx: broadcast::Sender<Arc<Event>>,
}

fn key(res: &ResourceDef, ns: &str, name: &str) -> ObjKey {
    (
        res.group.clone(),
        res.plural.clone(),
        if res.namespaced {
            ns.to_string()
        } else {
            String::new()
        },
        name.to_string(),
    )
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

/// The object without the fields that change on every write.
fn content(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Some(m) = c.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    c
}

/// The part of an object whose change bumps `metadata.generation`.
fn spec_part(obj: &Value, exclude_status: bool) -> Value {
    let mut c = obj.clone();
    if let Some(m) = c.as_object_mut() {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if exclude_status {
            m.remove("status");
        }
    }
    c
}

pub(crate) fn main_scope(res: &ResourceDef) -> Scope {
    Scope::Main {
        exclude_status: res.status,
    }
}

impl Store {
    pub fn new() -> Store {
        let (tx, _) = broadcast::channel(65_536);
        let mut s = Store {
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 0,
            resources: BTreeMap::new(),
            tx,
        };
        for r in resources::builtins() {
            s.resources
                .insert((r.group.clone(), r.plural.clone()), Arc::new(r));
        }
        if let Some(ns) = s.resource("", "namespaces") {
            for name in ["default", "kube-system"] {
                let body =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
                let _ = s.create(&ns, "", body, "testkit", false);
            }
        }
        s
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    pub fn resource(&self, group: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.resources
            .get(&(group.to_string(), plural.to_string()))
            .cloned()
    }

    /// Forgets the event history. The resourceVersion advances (as if some other
    /// object had been written) so that every version a client holds is too old.
    pub fn compact(&mut self) {
        self.history.clear();
        self.rv += 1;
        self.compacted = self.rv;
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(
        &mut self,
        etype: EventType,
        key: &ObjKey,
        object: &Value,
        old: Option<&Value>,
        rv: u64,
    ) {
        let ev = Arc::new(Event {
            rv,
            etype,
            group: key.0.clone(),
            plural: key.1.clone(),
            namespace: key.2.clone(),
            object: Arc::new(object.clone()),
            old: old.map(|o| Arc::new(o.clone())),
        });
        self.history.push_back(ev.clone());
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        let _ = self.tx.send(ev);
    }

    pub fn get(&self, res: &ResourceDef, ns: &str, name: &str) -> ApiResult<Value> {
        self.objects
            .get(&key(res, ns, name))
            .map(|s| s.obj.clone())
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Objects of `res` in `ns` (all namespaces when `None`), sorted by namespace/name.
    pub fn list<'a>(
        &'a self,
        res: &'a ResourceDef,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Value)> + 'a {
        let start = (
            res.group.clone(),
            res.plural.clone(),
            ns.unwrap_or("").to_string(),
            String::new(),
        );
        self.objects
            .range(start..)
            .take_while(move |(k, _)| {
                k.0 == res.group && k.1 == res.plural && ns.is_none_or(|n| k.2 == n)
            })
            .map(|(k, s)| (k, &s.obj))
    }

    /// Resource-specific normalisation done on every write.
    fn normalize(&self, res: &ResourceDef, obj: &mut Value) -> ApiResult<()> {
        let name = meta_str(obj, "name").unwrap_or("").to_string();
        if res.group.is_empty() && res.plural == "secrets" {
            if let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
                let Some(sd) = sd.as_object() else {
                    return Err(ApiError::bad_request("stringData must be a map of strings"));
                };
                for (k, v) in sd {
                    let Some(s) = v.as_str() else {
                        return Err(ApiError::bad_request(format!(
                            "stringData[{k}] must be a string"
                        )));
                    };
                    if !obj.get("data").is_some_and(Value::is_object) {
                        obj["data"] = json!({});
                    }
                    obj["data"][k] = json!(util::base64_encode(s.as_bytes()));
                }
            }
            if let Some(data) = obj.get("data") {
                let Some(data) = data.as_object() else {
                    return Err(ApiError::bad_request(
                        "data must be a map of base64 strings",
                    ));
                };
                for (k, v) in data {
                    if !v.as_str().is_some_and(util::is_base64) {
                        return Err(ApiError::bad_request(format!(
                            "illegal base64 data in Secret data[{k}]"
                        )));
                    }
                }
                if data.is_empty()
                    && let Some(m) = obj.as_object_mut()
                {
                    m.remove("data");
                }
            }
            if obj
                .get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                obj["type"] = json!("Opaque");
            }
        }
        if res.group.is_empty() && res.plural == "namespaces" {
            let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
            obj["status"] = json!({"phase": if deleting { "Terminating" } else { "Active" }});
            let labels = meta_mut(obj).entry("labels").or_insert_with(|| json!({}));
            if let Some(l) = labels.as_object_mut() {
                l.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
        }
        if res.group == "apiextensions.k8s.io" && res.plural == "customresourcedefinitions" {
            let def = resources::from_crd(obj).map_err(|e| ApiError::invalid(res, &name, &e))?;
            if let Some(existing) = self.resource(&def.group, &def.plural)
                && !existing.custom
            {
                return Err(ApiError::invalid(
                    res,
                    &name,
                    "spec.names.plural: Invalid value: a built-in resource has this name",
                ));
            }
            let names = obj.pointer("/spec/names").cloned().unwrap_or(json!({}));
            let now = util::now_rfc3339();
            obj["status"] = json!({
                "acceptedNames": names,
                "storedVersions": [def.storage_version],
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": now},
                ],
            });
        }
        Ok(())
    }

    fn register_crd(&mut self, obj: &Value) {
        if let Ok(def) = resources::from_crd(obj) {
            self.resources
                .insert((def.group.clone(), def.plural.clone()), Arc::new(def));
        }
    }

    fn is_crd(res: &ResourceDef) -> bool {
        res.group == "apiextensions.k8s.io" && res.plural == "customresourcedefinitions"
    }

    /// Validates and stores a new object given as sent by a client.
    pub fn create(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        mut body: Value,
        manager: &str,
        dry_run: bool,
    ) -> ApiResult<Value> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        if let Some(kind) = body.get("kind").and_then(Value::as_str)
            && kind != res.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind of the object ({kind}) does not match the resource ({})",
                res.kind
            )));
        }
        let meta = meta_mut(&mut body);
        if meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    for _ in 0..20 {
                        name = format!("{prefix}{}", util::name_suffix());
                        if !self.objects.contains_key(&key(res, ns, &name)) {
                            break;
                        }
                    }
                }
                _ => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            }
        }
        if res.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(bns) if !bns.is_empty() && bns != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
        }
        let managed_base = body.clone();
        let mut managed = Vec::new();
        managed::record_update(
            &mut managed,
            manager,
            "",
            &res.api_version(&res.storage_version),
            None,
            &managed_base,
            main_scope(res),
            &util::now_micro(),
        );
        self.insert_new(res, ns, &name, body, managed, dry_run)
    }

    /// Stores a new object (system metadata is set here).
    pub fn insert_new(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        mut obj: Value,
        mut managed: Vec<ManagedEntry>,
        dry_run: bool,
    ) -> ApiResult<Value> {
        if !valid_name(name) {
            return Err(ApiError::invalid(
                res,
                name,
                &format!(
                    "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            ));
        }
        let k = key(res, ns, name);
        if self.objects.contains_key(&k) {
            return Err(ApiError::already_exists(res, name));
        }
        if let Some(m) = obj.as_object_mut() {
            m.insert(
                "apiVersion".into(),
                json!(res.api_version(&res.storage_version)),
            );
            m.insert("kind".into(), json!(res.kind));
            if res.status {
                m.remove("status");
            }
        }
        let meta = meta_mut(&mut obj);
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "managedFields",
            "selfLink",
            "resourceVersion",
        ] {
            meta.remove(f);
        }
        meta.insert("name".into(), json!(name));
        if res.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(util::new_uid()));
        meta.insert("creationTimestamp".into(), json!(util::now_rfc3339()));
        if res.generation {
            meta.insert("generation".into(), json!(1));
        }
        self.normalize(res, &mut obj)?;
        managed::cleanup(&mut managed, &obj, main_scope(res));
        if !managed.is_empty() {
            meta_mut(&mut obj).insert("managedFields".into(), managed::render(&managed));
        }
        if dry_run {
            return Ok(obj);
        }
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.emit(EventType::Added, &k, &obj, None, rv);
        if Self::is_crd(res) {
            self.register_crd(&obj);
        }
        self.objects.insert(
            k,
            Stored {
                obj: obj.clone(),
                managed,
            },
        );
        Ok(obj)
    }

    pub fn stored(
        &self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
    ) -> ApiResult<(&Value, &[ManagedEntry])> {
        self.objects
            .get(&key(res, ns, name))
            .map(|s| (&s.obj, s.managed.as_slice()))
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Commits a modified version of an existing object. `new` is the full desired
    /// object (already limited to what the request may change); `managed` the new
    /// field ownership.
    pub fn commit(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        mut new: Value,
        mut managed: Vec<ManagedEntry>,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let k = key(res, ns, name);
        let Some(old) = self.objects.get(&k) else {
            return Err(ApiError::not_found(res, name));
        };
        let old_obj = old.obj.clone();
        let old_managed = old.managed.clone();
        if !new.is_object() {
            return Err(ApiError::bad_request("the object must be a JSON object"));
        }
        // System metadata cannot be changed by clients.
        let old_meta = old_obj.get("metadata").cloned().unwrap_or(json!({}));
        if let Some(m) = new.as_object_mut() {
            m.insert(
                "apiVersion".into(),
                json!(res.api_version(&res.storage_version)),
            );
            m.insert("kind".into(), json!(res.kind));
        }
        let meta = meta_mut(&mut new);
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "name",
            "namespace",
        ] {
            match old_meta.get(f) {
                Some(v) => {
                    meta.insert(f.into(), v.clone());
                }
                None => {
                    meta.remove(f);
                }
            }
        }
        meta.remove("managedFields");
        meta.remove("selfLink");
        self.normalize(res, &mut new)?;
        if res.generation && spec_part(&old_obj, res.status) != spec_part(&new, res.status) {
            let g = old_meta
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                + 1;
            meta_mut(&mut new).insert("generation".into(), json!(g));
        }
        managed::cleanup(&mut managed, &new, main_scope(res));
        if !managed.is_empty() {
            meta_mut(&mut new).insert("managedFields".into(), managed::render(&managed));
        }
        if content(&new) == content(&old_obj) && managed::same_ignoring_time(&managed, &old_managed)
        {
            return Ok(old_obj);
        }
        if let Some(rv) = old_meta.get("resourceVersion") {
            meta_mut(&mut new).insert("resourceVersion".into(), rv.clone());
        }
        if dry_run {
            return Ok(new);
        }
        if new.pointer("/metadata/deletionTimestamp").is_some() && !has_finalizers(&new) {
            if let Some(s) = self.objects.get_mut(&k) {
                s.obj = new;
                s.managed = managed;
            }
            return Ok(self.remove_now(&k, false).unwrap_or(old_obj));
        }
        let rv = self.next_rv();
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        self.emit(EventType::Modified, &k, &new, Some(&old_obj), rv);
        if Self::is_crd(res) {
            self.register_crd(&new);
        }
        self.objects.insert(
            k,
            Stored {
                obj: new.clone(),
                managed,
            },
        );
        Ok(new)
    }

    /// Deletes an object as a client request does (finalizers, preconditions, GC).
    pub fn delete(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> ApiResult<Value> {
        let k = key(res, ns, name);
        let Some(stored) = self.objects.get(&k) else {
            return Err(ApiError::not_found(res, name));
        };
        for (label, field, wanted) in [
            ("UID", "uid", &opts.uid),
            ("ResourceVersion", "resourceVersion", &opts.resource_version),
        ] {
            if let Some(wanted) = wanted
                && meta_str(&stored.obj, field) != Some(wanted.as_str())
            {
                return Err(ApiError::conflict(
                    res,
                    name,
                    &format!(
                        "Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {}",
                        meta_str(&stored.obj, field).unwrap_or("")
                    ),
                ));
            }
        }
        if opts.dry_run {
            return Ok(stored.obj.clone());
        }
        Ok(self
            .delete_key(
                &k,
                if opts.orphan {
                    Propagation::Orphan
                } else {
                    Propagation::Background
                },
            )
            .unwrap_or(Value::Null))
    }

    /// Deletes by key honouring finalizers. Returns the object's last state.
    fn delete_key(&mut self, k: &ObjKey, propagation: Propagation) -> Option<Value> {
        let stored = self.objects.get(k)?;
        if has_finalizers(&stored.obj) {
            let uid = meta_str(&stored.obj, "uid").unwrap_or("").to_string();
            let mut obj = stored.obj.clone();
            if obj.pointer("/metadata/deletionTimestamp").is_none() {
                let old = obj.clone();
                let meta = meta_mut(&mut obj);
                meta.insert("deletionTimestamp".into(), json!(util::now_rfc3339()));
                meta.insert("deletionGracePeriodSeconds".into(), json!(0));
                // Like a real server, marking for deletion bumps the generation.
                if let Some(g) = meta.get("generation").and_then(Value::as_i64) {
                    meta.insert("generation".into(), json!(g + 1));
                }
                let rv = self.next_rv();
                meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
                if k.0.is_empty() && k.1 == "namespaces" {
                    obj["status"] = json!({"phase": "Terminating"});
                }
                self.emit(EventType::Modified, k, &obj, Some(&old), rv);
                if let Some(s) = self.objects.get_mut(k) {
                    s.obj = obj.clone();
                }
            }
            if propagation == Propagation::Orphan {
                self.orphan_dependents(&uid);
            }
            return Some(obj);
        }
        self.remove_now(k, propagation == Propagation::Orphan)
    }

    /// Removes an object now, emitting DELETED, then handles dependents.
    fn remove_now(&mut self, k: &ObjKey, orphan: bool) -> Option<Value> {
        let stored = self.objects.remove(k)?;
        let mut obj = stored.obj;
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.emit(EventType::Deleted, k, &obj, None, rv);
        let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
        if orphan {
            self.orphan_dependents(&uid);
        } else {
            self.collect_dependents(&uid);
        }
        if k.0 == "apiextensions.k8s.io"
            && k.1 == "customresourcedefinitions"
            && let Ok(def) = resources::from_crd(&obj)
        {
            let doomed: Vec<ObjKey> = self
                .objects
                .keys()
                .filter(|o| o.0 == def.group && o.1 == def.plural)
                .cloned()
                .collect();
            for d in doomed {
                self.remove_now(&d, false);
            }
            self.resources.remove(&(def.group, def.plural));
        }
        if k.0.is_empty() && k.1 == "namespaces" {
            let doomed: Vec<ObjKey> = self
                .objects
                .keys()
                .filter(|o| o.2 == k.3)
                .cloned()
                .collect();
            for d in doomed {
                self.delete_key(&d, Propagation::Background);
            }
        }
        Some(obj)
    }

    fn dependents(&self, owner_uid: &str) -> Vec<ObjKey> {
        if owner_uid.is_empty() {
            return Vec::new();
        }
        self.objects
            .iter()
            .filter(|(_, s)| owner_uids(&s.obj).iter().any(|u| u == owner_uid))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.objects
            .values()
            .any(|s| meta_str(&s.obj, "uid") == Some(uid))
    }

    /// Removes the owner reference `owner_uid` from an object (an update with an event).
    fn drop_owner_ref(&mut self, k: &ObjKey, owner_uid: &str) {
        let Some(stored) = self.objects.get(k) else {
            return;
        };
        let old = stored.obj.clone();
        let mut obj = old.clone();
        let meta = meta_mut(&mut obj);
        if let Some(Value::Array(refs)) = meta.get_mut("ownerReferences") {
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
            if refs.is_empty() {
                meta.remove("ownerReferences");
            }
        }
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.emit(EventType::Modified, k, &obj, Some(&old), rv);
        if let Some(s) = self.objects.get_mut(k) {
            s.obj = obj;
        }
    }

    fn orphan_dependents(&mut self, owner_uid: &str) {
        for d in self.dependents(owner_uid) {
            self.drop_owner_ref(&d, owner_uid);
        }
    }

    fn collect_dependents(&mut self, owner_uid: &str) {
        for d in self.dependents(owner_uid) {
            let Some(s) = self.objects.get(&d) else {
                continue;
            };
            let other_owner_alive = owner_uids(&s.obj)
                .iter()
                .any(|u| u != owner_uid && self.uid_exists(u));
            if other_owner_alive {
                self.drop_owner_ref(&d, owner_uid);
            } else {
                self.delete_key(&d, Propagation::Background);
            }
        }
    }

    /// Events after `rv` (exclusive), or `None` when that history is gone.
    pub fn events_since(&self, rv: u64) -> Option<Vec<Arc<Event>>> {
        if rv < self.compacted {
            return None;
        }
        Some(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }
}

/// Limits `candidate` to what a write through `scope` may change, starting from `old`.
pub(crate) fn scoped_update(old: &Value, candidate: Value, scope: Scope) -> Value {
    match scope {
        Scope::Status => {
            let mut out = old.clone();
            match candidate.get("status") {
                Some(s) if !s.is_null() => out["status"] = s.clone(),
                _ => {
                    if let Some(m) = out.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            out
        }
        Scope::Main {
            exclude_status: true,
        } => {
            let mut out = candidate;
            if let Some(m) = out.as_object_mut() {
                match old.get("status") {
                    Some(s) => {
                        m.insert("status".into(), s.clone());
                    }
                    None => {
                        m.remove("status");
                    }
                }
            }
            out
        }
        Scope::Main { .. } => candidate,
    }
}
