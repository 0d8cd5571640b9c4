//! The operator's consumer helpers against an API server: rollout restarts against the
//! in-memory API server, pod nudges against a recording stand-in for the pods API (it
//! records each list's selector and each patch, which the in-memory server does not).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use kube::{Api, api::PostParams};
use scg_token_operator::{
    consumers::{NudgeError, NudgeOutcome, RestartOutcome, nudge_pods, rollout_restart},
    crd::{
        NUDGED_FOR_ANNOTATION, RESTART_FOR_ANNOTATION, RESTARTED_AT_ANNOTATION,
        RESTARTED_FOR_ANNOTATION, RestartKind, RolloutRestartTarget,
    },
};
use serde_json::json;
use testkit::apiserver::ApiServer;

fn workload<K: serde::de::DeserializeOwned>(kind: &str, name: &str) -> K {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": "default",
            // Opted in for two ScgTokens, one of them "messaging".
            "annotations": {RESTART_FOR_ANNOTATION: "voice, messaging"}
        },
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"keep": "me"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}
            }
        }
    }))
    .expect("a workload")
}

fn template_annotations(api: &ApiServer, resource: &str, name: &str) -> BTreeMap<String, String> {
    let obj = api
        .object("apps", resource, "default", name)
        .expect("the workload");
    serde_json::from_value(obj["spec"]["template"]["metadata"]["annotations"].clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn rollout_restarts_change_the_pod_template_once_per_token_and_are_debounced() {
    let api = ApiServer::start().await.expect("API server");
    let client = api.client();
    let pp = PostParams::default();
    Api::<Deployment>::default_namespaced(client.clone())
        .create(&pp, &workload("Deployment", "web"))
        .await
        .unwrap();
    Api::<StatefulSet>::default_namespaced(client.clone())
        .create(&pp, &workload("StatefulSet", "db"))
        .await
        .unwrap();
    Api::<DaemonSet>::default_namespaced(client.clone())
        .create(&pp, &workload("DaemonSet", "node"))
        .await
        .unwrap();
    let target = |kind, name: &str| RolloutRestartTarget {
        kind,
        name: name.into(),
    };
    let now = Timestamp::now();
    let restart = |t: RolloutRestartTarget, fp: &'static str, at: Timestamp| {
        let client = client.clone();
        async move {
            rollout_restart(client, "default", "messaging", &t, fp, at)
                .await
                .unwrap()
        }
    };

    for (kind, resource, name) in [
        (RestartKind::Deployment, "deployments", "web"),
        (RestartKind::StatefulSet, "statefulsets", "db"),
        (RestartKind::DaemonSet, "daemonsets", "node"),
    ] {
        assert_eq!(
            restart(target(kind, name), "fp1", now).await,
            RestartOutcome::Restarted
        );
        let a = template_annotations(&api, resource, name);
        assert_eq!(a[RESTARTED_FOR_ANNOTATION], "fp1", "{resource}");
        assert_eq!(a[RESTARTED_AT_ANNOTATION], now.to_string());
        assert_eq!(a["keep"], "me", "other annotations are kept");
        let generation =
            api.object("apps", resource, "default", name).unwrap()["metadata"]["generation"]
                .as_i64();
        assert_eq!(
            generation,
            Some(2),
            "{resource}: the template change rolls the pods"
        );
    }

    // The same token again: nothing to do.
    let web = || target(RestartKind::Deployment, "web");
    assert_eq!(
        restart(web(), "fp1", now).await,
        RestartOutcome::AlreadyDone
    );
    // A new token within two minutes: debounced, with the time to come back.
    let soon = now + SignedDuration::from_secs(30);
    let until = now + SignedDuration::from_secs(120);
    assert_eq!(
        restart(web(), "fp2", soon).await,
        RestartOutcome::NotBefore(until)
    );
    assert_eq!(
        template_annotations(&api, "deployments", "web")[RESTARTED_FOR_ANNOTATION],
        "fp1"
    );
    assert_eq!(
        restart(web(), "fp2", until).await,
        RestartOutcome::Restarted
    );
    assert_eq!(
        template_annotations(&api, "deployments", "web")[RESTARTED_FOR_ANNOTATION],
        "fp2"
    );
    assert_eq!(
        restart(target(RestartKind::Deployment, "absent"), "fp2", until).await,
        RestartOutcome::NotFound
    );

    // A workload that does not name this ScgToken is left as it is: another team's.
    let mut payments: Deployment = workload("Deployment", "payments");
    payments.metadata.annotations = Some(BTreeMap::from([(
        RESTART_FOR_ANNOTATION.to_string(),
        "messaging-old".to_string(),
    )]));
    Api::<Deployment>::default_namespaced(client.clone())
        .create(&pp, &payments)
        .await
        .unwrap();
    assert_eq!(
        restart(target(RestartKind::Deployment, "payments"), "fp3", until).await,
        RestartOutcome::NotAllowed
    );
    let untouched = template_annotations(&api, "deployments", "payments");
    assert_eq!(untouched.get(RESTARTED_FOR_ANNOTATION), None);
}

/// A stand-in for the pods API of namespace `default`: lists the given pods (recording
/// the label selector) and records merge patches.
struct PodsApi {
    selector: Mutex<Option<String>>,
    patches: Mutex<Vec<(String, String, serde_json::Value)>>,
    pods: Vec<serde_json::Value>,
}

async fn pods_api(pods: Vec<serde_json::Value>) -> (kube::Client, Arc<PodsApi>) {
    use axum::{
        Json,
        extract::{Path, Query, State},
        http::HeaderMap,
        routing::{get, patch},
    };
    let state = Arc::new(PodsApi {
        selector: Mutex::new(None),
        patches: Mutex::new(Vec::new()),
        pods,
    });
    type S = State<Arc<PodsApi>>;
    async fn list(
        State(s): S,
        Query(q): Query<BTreeMap<String, String>>,
    ) -> Json<serde_json::Value> {
        *s.selector.lock().unwrap() = q.get("labelSelector").cloned();
        Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": s.pods}))
    }
    async fn patch_pod(
        State(s): S,
        Path(name): Path<String>,
        headers: HeaderMap,
        Json(body): Json<serde_json::Value>,
    ) -> Json<serde_json::Value> {
        let ct = headers["content-type"]
            .to_str()
            .unwrap_or_default()
            .to_string();
        s.patches.lock().unwrap().push((name.clone(), ct, body));
        Json(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}}))
    }
    let app = axum::Router::new()
        .route("/api/v1/namespaces/default/pods", get(list))
        .route("/api/v1/namespaces/default/pods/{name}", patch(patch_pod))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = kube::Config::new(url.parse().unwrap());
    (kube::Client::try_from(config).unwrap(), state)
}

fn pod(name: &str, nudged_for: Option<&str>, phase: &str, deleting: bool) -> serde_json::Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"app": "client"},
            "annotations": {RESTART_FOR_ANNOTATION: "messaging"}
        },
        "status": {"phase": phase}
    });
    if let Some(fp) = nudged_for {
        p["metadata"]["annotations"][NUDGED_FOR_ANNOTATION] = json!(fp);
    }
    if deleting {
        p["metadata"]["deletionTimestamp"] = json!("2030-01-01T00:00:00Z");
    }
    p
}

#[tokio::test]
async fn nudges_annotate_each_live_pod_once_per_token() {
    // A pod of another team's workload, caught by the selector: it does not opt in.
    let mut foreign = pod("foreign", None, "Running", false);
    foreign["metadata"]["annotations"] = json!({});
    let (client, state) = pods_api(vec![
        pod("fresh", None, "Running", false),
        pod("older", Some("fp0"), "Running", false),
        pod("done", Some("fp1"), "Running", false),
        pod("leaving", None, "Running", true),
        pod("finished", None, "Succeeded", false),
        foreign,
    ])
    .await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let selector = LabelSelector {
        match_labels: Some(BTreeMap::from([("app".into(), "client".into())])),
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "NotIn".into(),
            values: Some(vec!["batch".into()]),
        }]),
    };
    let outcome = nudge_pods(&pods, "messaging", &selector, "fp1")
        .await
        .expect("nudge");
    assert_eq!(
        outcome,
        NudgeOutcome {
            nudged: 2,
            not_allowed: 1,
            already: 1,
            skipped: 2,
            failed: 0
        }
    );
    assert_eq!(
        state.selector.lock().unwrap().as_deref(),
        Some("app=client,tier notin (batch)")
    );
    let mut patches = state.patches.lock().unwrap().clone();
    patches.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = patches.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["fresh", "older"]);
    for (_, content_type, body) in &patches {
        assert_eq!(content_type, "application/merge-patch+json");
        assert_eq!(
            body,
            &json!({"metadata": {"annotations": {NUDGED_FOR_ANNOTATION: "fp1"}}})
        );
    }

    // An empty selector would match every pod: refused before any request.
    let before = state.patches.lock().unwrap().len();
    let err = nudge_pods(&pods, "messaging", &LabelSelector::default(), "fp2").await;
    assert!(matches!(err, Err(NudgeError::Selector(_))));
    assert_eq!(state.patches.lock().unwrap().len(), before);
}
