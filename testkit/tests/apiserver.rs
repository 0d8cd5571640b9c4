//! kube-rs against the in-memory API server.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, PropagationPolicy,
};
use kube::core::PartialObjectMeta;
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use testkit::apiserver::ApiServer;

const T: Duration = Duration::from_secs(10);

/// A CRD of the same shape as the operator's (the test kit does not depend on it).
pub const CRD_YAML: &str = include_str!("fixtures/scgtoken-crd.yaml");

fn secret(name: &str, labels: &[(&str, &str)]) -> Secret {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        },
        "stringData": {"token": "s3cret"},
    }))
    .expect("valid secret")
}

fn status_code(err: &kube::Error) -> Option<(u16, String)> {
    match err {
        kube::Error::Api(s) => Some((s.code, s.reason.clone())),
        _ => None,
    }
}

async fn install_crd(client: &kube::Client) -> Api<DynamicObject> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_yaml::from_str(CRD_YAML).expect("crd yaml");
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    let gvk = GroupVersionKind::gvk("scgtoken.io", "v1alpha1", "ScgToken");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "scgtokens");
    Api::namespaced_with(client.clone(), "default", &ar)
}

fn scgtoken(name: &str, secret_name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "scgtoken.io/v1alpha1",
        "kind": "ScgToken",
        "metadata": {"name": name},
        "spec": {"secretName": secret_name},
    }))
    .expect("valid object")
}

/// Next item of `stream` for which `f` returns Some, within `T`.
async fn next_where<S, I, F, R>(stream: &mut S, what: &str, mut f: F) -> R
where
    S: Stream<Item = I> + Unpin,
    F: FnMut(I) -> Option<R>,
{
    tokio::time::timeout(T, async {
        loop {
            let item = stream.next().await.expect("stream ended");
            if let Some(r) = f(item) {
                return r;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn secrets_crud_conflicts_selectors_and_pagination() {
    let server = ApiServer::start().await.expect("start");
    let secrets: Api<Secret> = Api::default_namespaced(server.client());

    let created = secrets
        .create(
            &PostParams::default(),
            &secret("a", &[("app", "x"), ("tier", "1")]),
        )
        .await
        .expect("create");
    // stringData is folded into base64 data.
    let data = created.data.clone().expect("data");
    assert_eq!(data["token"].0, b"s3cret");
    assert!(created.string_data.is_none());
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert!(
        created.metadata.generation.is_none(),
        "secrets have no generation"
    );
    let rv1: u64 = created
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();

    let err = secrets
        .create(&PostParams::default(), &secret("a", &[]))
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some((409, "AlreadyExists".into())));
    let err = secrets.get("nope").await.unwrap_err();
    assert_eq!(status_code(&err), Some((404, "NotFound".into())));

    // Update with the current resourceVersion works and bumps it; a stale one conflicts.
    let mut s = created.clone();
    s.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("app".into(), "y".into());
    let updated = secrets
        .replace("a", &PostParams::default(), &s)
        .await
        .expect("replace");
    let rv2: u64 = updated
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1);
    let err = secrets
        .replace("a", &PostParams::default(), &s)
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some((409, "Conflict".into())));
    // Without resourceVersion a Secret update is unconditional.
    s.metadata.resource_version = None;
    secrets
        .replace("a", &PostParams::default(), &s)
        .await
        .expect("unconditional replace");

    // generateName
    let mut g = secret("", &[("app", "x")]);
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let g = secrets
        .create(&PostParams::default(), &g)
        .await
        .expect("generateName");
    assert!(g.metadata.name.as_deref().unwrap().starts_with("gen-"));

    for (i, tier) in ["1", "2", "3"].iter().enumerate() {
        secrets
            .create(
                &PostParams::default(),
                &secret(&format!("s{i}"), &[("app", "z"), ("tier", tier)]),
            )
            .await
            .expect("create");
    }
    let names = |l: kube::core::ObjectList<Secret>| -> Vec<String> {
        l.items
            .into_iter()
            .map(|s| s.metadata.name.unwrap())
            .collect()
    };
    let all = secrets.list(&ListParams::default()).await.unwrap();
    assert_eq!(all.items.len(), 5);
    assert!(all.metadata.resource_version.is_some());
    assert_eq!(
        names(
            secrets
                .list(&ListParams::default().labels("app=z"))
                .await
                .unwrap()
        ),
        ["s0", "s1", "s2"]
    );
    assert_eq!(
        names(
            secrets
                .list(&ListParams::default().labels("app==z,tier!=2"))
                .await
                .unwrap()
        ),
        ["s0", "s2"]
    );
    assert_eq!(
        names(
            secrets
                .list(&ListParams::default().labels("tier in (1,3),app=z"))
                .await
                .unwrap()
        ),
        ["s0", "s2"]
    );
    assert_eq!(
        names(
            secrets
                .list(&ListParams::default().labels("tier notin (1,3),app=z"))
                .await
                .unwrap()
        ),
        ["s1"]
    );
    assert_eq!(
        names(
            secrets
                .list(&ListParams::default().labels("!tier"))
                .await
                .unwrap()
        ),
        vec![g.metadata.name.clone().unwrap()]
    );
    assert_eq!(
        names(
            secrets
                .list(&ListParams::default().fields("metadata.name=s1"))
                .await
                .unwrap()
        ),
        ["s1"]
    );
    let all_ns: Api<Secret> = Api::all(server.client());
    assert_eq!(
        names(
            all_ns
                .list(
                    &ListParams::default()
                        .fields("metadata.namespace=default,metadata.name!=a")
                        .labels("app=z")
                )
                .await
                .unwrap()
        ),
        ["s0", "s1", "s2"]
    );
    let other_ns: Api<Secret> = Api::namespaced(server.client(), "other");
    assert!(
        other_ns
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Pagination.
    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(2);
    loop {
        let page = secrets.list(&lp).await.unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(names(page.clone()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 5, "pages overlap: {seen:?}");

    // Merge and JSON patches.
    let p = secrets
        .patch(
            "s0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": null, "new": "v"}}})),
        )
        .await
        .unwrap();
    let labels = p.metadata.labels.unwrap();
    assert!(!labels.contains_key("tier") && labels["new"] == "v");
    let jp: json_patch::Patch = serde_json::from_value(
        json!([{"op": "add", "path": "/metadata/annotations", "value": {"k": "v"}}]),
    )
    .unwrap();
    let p = secrets
        .patch("s0", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .unwrap();
    assert_eq!(p.metadata.annotations.unwrap()["k"], "v");

    // Delete, then NotFound.
    secrets
        .delete("s0", &DeleteParams::default())
        .await
        .unwrap();
    let err = secrets.get("s0").await.unwrap_err();
    assert_eq!(status_code(&err), Some((404, "NotFound".into())));
    let err = secrets
        .delete("s0", &DeleteParams::default())
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some((404, "NotFound".into())));

    // Metadata-only get and list.
    let meta = secrets.get_metadata("a").await.unwrap();
    assert_eq!(meta.metadata.name.as_deref(), Some("a"));
    let metas = secrets.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(metas.items.len(), 4);
}

#[tokio::test]
async fn custom_resources_status_subresource_and_generation() {
    let server = ApiServer::start().await.expect("start");
    let client = server.client();
    let tokens = install_crd(&client).await;

    let mut obj = scgtoken("t1", "s1");
    obj.data["status"] = json!({"expiresAt": "ignored"});
    let created = tokens
        .create(&PostParams::default(), &obj)
        .await
        .expect("create CR");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "status is ignored on create"
    );

    // Status on the main resource is ignored; spec change bumps generation.
    let mut upd = created.clone();
    upd.data["spec"]["secretName"] = json!("s2");
    upd.data["status"] = json!({"expiresAt": "ignored"});
    let upd = tokens
        .replace("t1", &PostParams::default(), &upd)
        .await
        .expect("replace");
    assert_eq!(upd.metadata.generation, Some(2));
    assert!(upd.data.get("status").is_none());

    // Writes to /status change only status and do not bump generation.
    let st = tokens
        .patch_status(
            "t1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"secretName": "ignored"}, "status": {"expiresAt": "2030-01-01T00:00:00Z"}})),
        )
        .await
        .expect("patch status");
    assert_eq!(st.metadata.generation, Some(2));
    assert_eq!(st.data["spec"]["secretName"], "s2");
    assert_eq!(st.data["status"]["expiresAt"], "2030-01-01T00:00:00Z");

    // Metadata change does not bump generation.
    let m = tokens
        .patch(
            "t1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(m.metadata.generation, Some(2));

    // Custom resources require resourceVersion on update.
    let mut no_rv = m.clone();
    no_rv.metadata.resource_version = None;
    let err = tokens
        .replace("t1", &PostParams::default(), &no_rv)
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some((422, "Invalid".into())));

    // Status replace with a stale resourceVersion conflicts.
    let err = tokens
        .replace_status("t1", &PostParams::default(), &created)
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some((409, "Conflict".into())));

    // Discovery lists the resource with its status subresource and short name.
    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let group = discovery.get("scgtoken.io").expect("group discovered");
    let (ar, caps) = group.recommended_kind("ScgToken").expect("kind");
    assert_eq!(ar.plural, "scgtokens");
    assert!(
        caps.subresources
            .iter()
            .any(|(sub, _)| sub.plural == "status")
    );
}

#[tokio::test]
async fn server_side_apply_with_two_managers() {
    let server = ApiServer::start().await.expect("start");
    let leases: Api<Lease> = Api::default_namespaced(server.client());
    let apply = |holder: &str| {
        Patch::Apply(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
        }))
    };
    let a = PatchParams::apply("manager-a");
    let b = PatchParams::apply("manager-b");

    // Apply creates the object.
    let l = leases
        .patch("lock", &a, &apply("a"))
        .await
        .expect("apply create");
    assert_eq!(
        l.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("a")
    );
    let mf = l.metadata.managed_fields.clone().expect("managedFields");
    assert_eq!(mf[0].manager.as_deref(), Some("manager-a"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    assert!(
        serde_json::to_string(&mf[0].fields_v1)
            .unwrap()
            .contains("f:holderIdentity")
    );

    // Same values from another manager: shared ownership, no conflict.
    leases
        .patch("lock", &b, &Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"leaseDurationSeconds": 15}})))
        .await
        .expect("shared apply");

    // Different value owned by a: 409 Conflict unless forced.
    let err = leases.patch("lock", &b, &apply("b")).await.unwrap_err();
    assert_eq!(status_code(&err), Some((409, "Conflict".into())));
    let l = leases
        .patch("lock", &b.clone().force(), &apply("b"))
        .await
        .expect("forced apply");
    assert_eq!(l.spec.unwrap().holder_identity.as_deref(), Some("b"));

    // Now a conflicts; a strategic merge patch (an update) takes ownership back.
    let err = leases.patch("lock", &a, &apply("a")).await.unwrap_err();
    assert_eq!(status_code(&err), Some((409, "Conflict".into())));
    let release =
        Patch::Strategic(json!({"spec": {"holderIdentity": null, "leaseDurationSeconds": null}}));
    leases
        .patch(
            "lock",
            &PatchParams {
                field_manager: Some("manager-b".into()),
                ..Default::default()
            },
            &release,
        )
        .await
        .expect("release");
    // Released fields have no owner any more: a acquires without force.
    let l = leases
        .patch("lock", &a, &apply("a"))
        .await
        .expect("acquire after release");
    assert_eq!(l.spec.unwrap().holder_identity.as_deref(), Some("a"));

    // An apply that stops setting a field removes it (nobody else owns it).
    let l = leases
        .patch("lock", &a, &Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"holderIdentity": "a"}})))
        .await
        .unwrap();
    assert_eq!(l.spec.unwrap().lease_duration_seconds, None);

    // An apply without fieldManager is rejected.
    let err = leases
        .patch("lock", &PatchParams::default(), &apply("x"))
        .await
        .unwrap_err();
    assert_eq!(status_code(&err).map(|c| c.0), Some(400));
}

#[tokio::test]
async fn watchers_see_changes_and_survive_restart_and_expired_history() {
    let mut server = ApiServer::start().await.expect("start");
    let client = server.client();
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    secrets
        .create(&PostParams::default(), &secret("pre", &[]))
        .await
        .unwrap();

    let mut full = watcher::watcher(secrets.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let meta_api: Api<PartialObjectMeta<Secret>> = Api::default_namespaced(client.clone());
    let mut meta = watcher::watcher(meta_api, watcher::Config::default())
        .default_backoff()
        .boxed();
    next_where(&mut full, "initial list", |e| match e {
        Ok(Event::InitApply(s)) if s.metadata.name.as_deref() == Some("pre") => Some(()),
        _ => None,
    })
    .await;
    next_where(&mut full, "init done", |e| {
        matches!(e, Ok(Event::InitDone)).then_some(())
    })
    .await;
    next_where(&mut meta, "init done", |e| {
        matches!(e, Ok(Event::InitDone)).then_some(())
    })
    .await;

    secrets
        .create(&PostParams::default(), &secret("w1", &[]))
        .await
        .unwrap();
    let s = next_where(&mut full, "ADDED w1", |e| match e {
        Ok(Event::Apply(s)) if s.metadata.name.as_deref() == Some("w1") => Some(s),
        _ => None,
    })
    .await;
    assert!(s.data.is_some());
    next_where(&mut meta, "meta ADDED w1", |e| match e {
        Ok(Event::Apply(m)) if m.metadata.name.as_deref() == Some("w1") => Some(()),
        _ => None,
    })
    .await;
    secrets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
        )
        .await
        .unwrap();
    next_where(&mut meta, "meta MODIFIED w1", |e| match e {
        Ok(Event::Apply(m))
            if m.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key("x")) =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    secrets
        .delete("w1", &DeleteParams::default())
        .await
        .unwrap();
    next_where(&mut full, "DELETED w1", |e| match e {
        Ok(Event::Delete(s)) if s.metadata.name.as_deref() == Some("w1") => Some(()),
        _ => None,
    })
    .await;
    next_where(&mut meta, "meta DELETED w1", |e| match e {
        Ok(Event::Delete(m)) if m.metadata.name.as_deref() == Some("w1") => Some(()),
        _ => None,
    })
    .await;

    // Restart: watches are cut, objects and resourceVersions survive.
    let before = secrets.get("pre").await.unwrap().metadata.resource_version;
    server.restart().await.expect("restart");
    assert_eq!(
        secrets.get("pre").await.unwrap().metadata.resource_version,
        before
    );
    secrets
        .create(&PostParams::default(), &secret("w2", &[]))
        .await
        .unwrap();
    next_where(&mut full, "ADDED w2 after restart", |e| match e {
        Ok(Event::Apply(s) | Event::InitApply(s)) if s.metadata.name.as_deref() == Some("w2") => {
            Some(())
        }
        _ => None,
    })
    .await;
    next_where(&mut meta, "meta ADDED w2 after restart", |e| match e {
        Ok(Event::Apply(m) | Event::InitApply(m)) if m.metadata.name.as_deref() == Some("w2") => {
            Some(())
        }
        _ => None,
    })
    .await;

    // History gone: the re-watch gets 410 and the watcher relists.
    server.faults().compact_history();
    server.faults().close_watches();
    secrets
        .create(&PostParams::default(), &secret("w3", &[]))
        .await
        .unwrap();
    let mut saw_410 = false;
    next_where(&mut full, "relist after 410", |e| match e {
        Err(watcher::Error::WatchError(s)) if s.code == 410 => {
            saw_410 = true;
            None
        }
        Ok(Event::InitApply(s)) if s.metadata.name.as_deref() == Some("w3") => Some(()),
        _ => None,
    })
    .await;
    assert!(saw_410, "the watcher saw the 410 error event");
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_end_bookmark() {
    let server = ApiServer::start().await.expect("start");
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    secrets
        .create(&PostParams::default(), &secret("one", &[]))
        .await
        .unwrap();
    let mut w = watcher::watcher(
        secrets.clone(),
        watcher::Config::default().streaming_lists(),
    )
    .boxed();
    next_where(&mut w, "streamed initial object", |e| match e {
        Ok(Event::InitApply(s)) if s.metadata.name.as_deref() == Some("one") => Some(()),
        _ => None,
    })
    .await;
    next_where(&mut w, "initial-events-end", |e| {
        matches!(e, Ok(Event::InitDone)).then_some(())
    })
    .await;
    secrets
        .create(&PostParams::default(), &secret("two", &[]))
        .await
        .unwrap();
    next_where(&mut w, "live ADDED", |e| match e {
        Ok(Event::Apply(s)) if s.metadata.name.as_deref() == Some("two") => Some(()),
        _ => None,
    })
    .await;
}

#[tokio::test]
async fn garbage_collection_and_finalizers() {
    let server = ApiServer::start().await.expect("start");
    let client = server.client();
    let tokens = install_crd(&client).await;
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());

    let owner = tokens
        .create(&PostParams::default(), &scgtoken("owner", "owned"))
        .await
        .unwrap();
    let owner_ref = json!([{"apiVersion": "scgtoken.io/v1alpha1", "kind": "ScgToken", "name": "owner",
        "uid": owner.metadata.uid, "controller": true}]);
    let mut owned = secret("owned", &[]);
    owned.metadata.owner_references = serde_json::from_value(owner_ref.clone()).unwrap();
    secrets
        .create(&PostParams::default(), &owned)
        .await
        .unwrap();
    let mut kept = secret("orphaned", &[]);
    kept.metadata.owner_references = serde_json::from_value(owner_ref).unwrap();
    secrets.create(&PostParams::default(), &kept).await.unwrap();

    // A finalizer keeps the owner (with deletionTimestamp) and its dependents.
    tokens
        .patch(
            "owner",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["scgtoken.io/cleanup"]}})),
        )
        .await
        .unwrap();
    tokens
        .delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    let o = tokens.get("owner").await.expect("still there");
    assert!(o.metadata.deletion_timestamp.is_some());
    assert!(secrets.get("owned").await.is_ok());

    // Orphan one dependent explicitly by deleting... the owner is already terminating,
    // so orphaning is tested on a second owner below. Remove the finalizer: owner and
    // dependents go.
    tokens
        .patch(
            "owner",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert_eq!(
        status_code(&tokens.get("owner").await.unwrap_err()).map(|c| c.0),
        Some(404)
    );
    assert_eq!(
        status_code(&secrets.get("owned").await.unwrap_err()).map(|c| c.0),
        Some(404)
    );
    assert_eq!(
        status_code(&secrets.get("orphaned").await.unwrap_err()).map(|c| c.0),
        Some(404)
    );

    // propagationPolicy=Orphan keeps dependents and drops the owner reference.
    let owner2 = tokens
        .create(&PostParams::default(), &scgtoken("owner2", "x"))
        .await
        .unwrap();
    let mut dep = secret("dep", &[]);
    dep.metadata.owner_references =
        serde_json::from_value(json!([{"apiVersion": "scgtoken.io/v1alpha1",
        "kind": "ScgToken", "name": "owner2", "uid": owner2.metadata.uid}]))
        .unwrap();
    secrets.create(&PostParams::default(), &dep).await.unwrap();
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..Default::default()
    };
    tokens.delete("owner2", &dp).await.unwrap();
    let dep = secrets.get("dep").await.expect("orphan survives");
    assert!(dep.metadata.owner_references.unwrap_or_default().is_empty());

    // A finalizer on a plain secret.
    let mut f = secret("fin", &[]);
    f.metadata.finalizers = Some(vec!["example.com/x".into()]);
    secrets.create(&PostParams::default(), &f).await.unwrap();
    secrets
        .delete("fin", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        secrets
            .get("fin")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    secrets
        .patch(
            "fin",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([{"op": "remove", "path": "/metadata/finalizers"}]))
                    .unwrap(),
            ),
        )
        .await
        .unwrap();
    let gone = server
        .wait_for("", "secrets", "default", "fin", T, |o| o.is_none())
        .await;
    assert!(
        gone.is_some(),
        "secret removed once its finalizers are gone"
    );
}

#[tokio::test]
async fn faults_and_counters() {
    let server = ApiServer::start().await.expect("start");
    // Without kube's automatic retries of 503s, so the outage is visible at once.
    let secrets: Api<Secret> = Api::default_namespaced(server.client_without_retry());
    secrets
        .create(&PostParams::default(), &secret("a", &[]))
        .await
        .unwrap();
    let counters = server.counters();
    counters.reset();

    server.faults().fail_next("get", "secrets", 2, 500);
    for _ in 0..2 {
        let err = secrets.get("a").await.unwrap_err();
        assert_eq!(status_code(&err), Some((500, "InternalError".into())));
    }
    secrets.get("a").await.expect("recovered");
    secrets.list(&ListParams::default()).await.unwrap();
    secrets
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();

    let snap = counters.snapshot();
    assert_eq!(snap.get(&("get".into(), "core/secrets".into())), Some(&3));
    assert_eq!(snap.get(&("list".into(), "core/secrets".into())), Some(&1));
    assert_eq!(snap.get(&("patch".into(), "core/secrets".into())), Some(&1));
    assert_eq!(counters.get("create", "core/secrets"), 0);

    let leases: Api<Lease> = Api::default_namespaced(server.client());
    let _ = leases.get("x").await;
    assert_eq!(counters.get("get", "coordination.k8s.io/leases"), 1);

    // Status subresource faults and counters use "plural/status".
    let tokens = install_crd(&server.client()).await;
    tokens
        .create(&PostParams::default(), &scgtoken("t", "s"))
        .await
        .unwrap();
    server
        .faults()
        .fail_next("patch", "scgtokens/status", 1, 409);
    let status = Patch::Merge(json!({"status": {"x": 1}}));
    let err = tokens
        .patch_status("t", &PatchParams::default(), &status)
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some((409, "Conflict".into())));
    tokens
        .patch_status("t", &PatchParams::default(), &status)
        .await
        .unwrap();
    assert_eq!(counters.get("patch", "scgtoken.io/scgtokens/status"), 2);

    // Outage: 503 for everything, then back.
    server.faults().set_outage(true);
    let err = secrets.get("a").await.unwrap_err();
    assert_eq!(status_code(&err), Some((503, "ServiceUnavailable".into())));
    server.faults().set_outage(false);
    secrets.get("a").await.unwrap();

    // Latency is added to requests.
    server.faults().set_latency(Duration::from_millis(200));
    let t0 = std::time::Instant::now();
    secrets.get("a").await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(200));
    server.faults().set_latency(Duration::ZERO);
}

#[tokio::test]
async fn raw_watch_semantics() {
    let server = ApiServer::start().await.expect("start");
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    let a = secrets
        .create(&PostParams::default(), &secret("a", &[("app", "x")]))
        .await
        .unwrap();
    let rv = a.metadata.resource_version.clone().unwrap();
    secrets
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "y"}}})),
        )
        .await
        .unwrap();
    // From rv: the history replays the change; with a selector it becomes DELETED.
    let wp = kube::api::WatchParams::default().labels("app=x").timeout(2);
    let mut s = secrets.watch(&wp, &rv).await.unwrap().boxed();
    let ev = next_where(&mut s, "selector exit", |e| Some(e.expect("event"))).await;
    assert!(matches!(ev, kube::api::WatchEvent::Deleted(_)), "{ev:?}");
    // timeoutSeconds ends the stream.
    tokio::time::timeout(Duration::from_secs(5), async {
        while s.next().await.is_some() {}
    })
    .await
    .expect("stream ends after timeoutSeconds");

    // Bookmarks when allowed.
    server
        .faults()
        .set_bookmark_interval(Duration::from_millis(50));
    let wp = kube::api::WatchParams::default().timeout(5);
    let mut s = secrets.watch(&wp, "0").await.unwrap().boxed();
    next_where(&mut s, "bookmark", |e| {
        matches!(e, Ok(kube::api::WatchEvent::Bookmark(_))).then_some(())
    })
    .await;

    // A too old resourceVersion gives a 410 ERROR event.
    server.faults().compact_history();
    let mut s = secrets.watch(&wp, &rv).await.unwrap().boxed();
    let ev = next_where(&mut s, "410", |e| Some(e.expect("event"))).await;
    match ev {
        kube::api::WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected error event, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_lease_manager_leader_election() {
    use kube_lease_manager::LeaseManagerBuilder;
    let server = ApiServer::start().await.expect("start");
    let manager = |identity: &str| {
        LeaseManagerBuilder::new(server.client(), "leader")
            .with_namespace("default")
            .with_identity(identity)
            .with_duration(3)
            .with_grace(1)
            .build()
    };
    let (mut a_rx, a_task) = manager("a").await.expect("manager a").watch().await;
    tokio::time::timeout(T, a_rx.wait_for(|leader| *leader))
        .await
        .expect("a becomes leader in time")
        .expect("a's manager runs");

    let (mut b_rx, b_task) = manager("b").await.expect("manager b").watch().await;
    // While a renews, b stays a follower (its non-forced apply conflicts).
    let still_waiting =
        tokio::time::timeout(Duration::from_secs(2), b_rx.wait_for(|leader| *leader))
            .await
            .is_err();
    assert!(still_waiting, "b must not take a held lease");
    let leases: Api<Lease> = Api::default_namespaced(server.client());
    let lease = leases.get("leader").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("a"));

    // a steps down (closing its channel releases the lease); b takes over.
    drop(a_rx);
    tokio::time::timeout(T, a_task)
        .await
        .expect("a stops in time")
        .expect("a's task")
        .expect("a's manager");
    tokio::time::timeout(T, b_rx.wait_for(|leader| *leader))
        .await
        .expect("b becomes leader in time")
        .expect("b's manager runs");
    let lease = leases.get("leader").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("b"));
    drop(b_rx);
    let _ = tokio::time::timeout(T, b_task).await;
}

#[tokio::test]
async fn event_recorder_creates_then_patches_series() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::runtime::events::{Event as RtEvent, EventType, Recorder, Reporter};
    let server = ApiServer::start().await.expect("start");
    let client = server.client();
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let s = secrets
        .create(&PostParams::default(), &secret("about", &[]))
        .await
        .unwrap();
    let recorder = Recorder::new(client.clone(), Reporter::from("testkit-test"));
    let reference = kube::Resource::object_ref(&s, &());
    let ev = RtEvent {
        type_: EventType::Normal,
        reason: "Refreshed".into(),
        note: Some("token refreshed".into()),
        action: "Refresh".into(),
        secondary: None,
    };
    recorder
        .publish(&ev, &reference)
        .await
        .expect("create event");
    recorder
        .publish(&ev, &reference)
        .await
        .expect("patch event series");
    let events: Api<K8sEvent> = Api::default_namespaced(client.clone());
    let list = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let e = &list.items[0];
    assert_eq!(e.reason.as_deref(), Some("Refreshed"));
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(server.counters().get("create", "events.k8s.io/events"), 1);
    assert_eq!(server.counters().get("patch", "events.k8s.io/events"), 1);
}

/// As in a real cluster, an events.k8s.io/v1 Event is also a core/v1 Event: kubectl
/// describe finds an object's Events through core/v1 by `involvedObject` fields.
#[tokio::test]
async fn events_k8s_io_events_are_served_as_core_events() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    let server = ApiServer::start().await.expect("start");
    let client = server.client();
    let v1: Api<K8sEvent> = Api::default_namespaced(client.clone());
    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let event = |name: &str, about: &str, note: &str| -> K8sEvent {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "eventTime": "2026-01-02T03:04:05.000000Z",
            "reportingController": "testkit-test",
            "reportingInstance": "testkit-test-1",
            "action": "Refresh",
            "reason": "Refreshed",
            "type": "Normal",
            "regarding": {"kind": "ScgToken", "name": about, "namespace": "default", "uid": format!("uid-{about}")},
            "note": note,
        }))
        .expect("an events.k8s.io Event")
    };
    v1.create(
        &PostParams::default(),
        &event("a.1", "a", "token refreshed"),
    )
    .await
    .unwrap();
    v1.create(&PostParams::default(), &event("b.1", "b", "other"))
        .await
        .unwrap();

    // kubectl describe's query.
    let selector = "involvedObject.kind=ScgToken,involvedObject.name=a,\
                    involvedObject.namespace=default,involvedObject.uid=uid-a";
    let found = core
        .list(&ListParams::default().fields(selector))
        .await
        .unwrap();
    assert_eq!(found.items.len(), 1, "{:?}", found.items);
    let e = &found.items[0];
    assert_eq!(e.message.as_deref(), Some("token refreshed"));
    assert_eq!(e.reporting_component.as_deref(), Some("testkit-test"));
    assert_eq!(e.involved_object.name.as_deref(), Some("a"));

    // A change through one API is seen through the other, each in its own shape.
    core.patch(
        "a.1",
        &PatchParams::default(),
        &Patch::Merge(json!({"message": "changed", "count": 3})),
    )
    .await
    .unwrap();
    let back = v1.get("a.1").await.unwrap();
    assert_eq!(back.note.as_deref(), Some("changed"));
    assert_eq!(back.deprecated_count, Some(3));
    assert_eq!(back.regarding.and_then(|r| r.name).as_deref(), Some("a"));
    let by_regarding = v1
        .list(&ListParams::default().fields("regarding.name=b"))
        .await
        .unwrap();
    assert_eq!(by_regarding.items.len(), 1);
    assert_eq!(by_regarding.items[0].note.as_deref(), Some("other"));

    v1.delete("b.1", &DeleteParams::default()).await.unwrap();
    let err = core
        .get("b.1")
        .await
        .expect_err("deleted through events.k8s.io");
    assert_eq!(status_code(&err), Some((404, "NotFound".to_string())));
    let err = v1.get("b.1").await.expect_err("deleted");
    let kube::Error::Api(status) = &err else {
        panic!("{err}")
    };
    assert_eq!(status.message, "events.events.k8s.io \"b.1\" not found");
}
