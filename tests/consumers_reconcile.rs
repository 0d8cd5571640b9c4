//! The consumers' part of a reconcile pass (`spec.consumers`), with a scripted token API
//! and a hand-moved clock: the agents' report Leases (fed from the in-memory API server
//! through a Lease cache, as the controller does) turn into `status.consumers`, the
//! `ConsumersUpToDate` condition, Events, metrics and wake-ups; pods are nudged and
//! workloads restarted after each stored token.
//!
//! The operator's client talks to a front that answers the pods list and patches itself
//! (recording label selectors and patches, or refusing them) and relays everything else,
//! pod reads included, to the in-memory API server.

mod common {
    pub mod context;
}

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Pod, Secret},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, MicroTime, ObjectMeta},
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, controller::Action, reflector::Store, watcher},
};
use prometheus_client::registry::Registry;
use scg_token_operator::{
    chain,
    crd::{
        AGENT_SCGTOKEN_LABEL, ConsumersSpec, NUDGED_FOR_ANNOTATION, RESTART_FOR_ANNOTATION,
        RESTARTED_FOR_ANNOTATION, RestartKind, RolloutRestartTarget, SERVED_FINGERPRINT_ANNOTATION,
        SERVED_SINCE_ANNOTATION, ScgToken, ScgTokenSpec,
    },
    policy::Clock,
    reconcile::{Context, reconcile},
    scg::{RefreshError, RefreshRequest, Refreshed, SecretString, TokenApi},
};
use serde_json::{Value, json};
use testkit::apiserver::ApiServer;

use common::context::{ManualClock, deps, install_crd};

const NS: &str = "default";
const CONSUMER_SECRET: &str = "planted-consumer-secret-77aa";

/// Issues the queued tokens, each valid for its lifetime.
#[derive(Default)]
struct FakeApi(Mutex<VecDeque<(String, u64)>>);

impl FakeApi {
    fn issue(&self, token: &str, secs: u64) {
        self.0.lock().unwrap().push_back((token.into(), secs));
    }
}

impl TokenApi for FakeApi {
    fn refresh<'a>(
        &'a self,
        _req: &'a RefreshRequest<'a>,
    ) -> BoxFuture<'a, Result<Refreshed, RefreshError>> {
        let next = self.0.lock().unwrap().pop_front();
        let out = match next {
            Some((token, secs)) => Ok(Refreshed {
                token: SecretString::new(token),
                lifetime: Duration::from_secs(secs),
            }),
            None => Err(RefreshError::Unavailable {
                status: 599,
                retry_after: None,
            }),
        };
        Box::pin(async move { out })
    }
}

/// What the pods API of the front saw and answers.
#[derive(Default)]
struct Pods {
    pods: Mutex<Vec<Value>>,
    selectors: Mutex<Vec<String>>,
    /// (pod, patch body)
    patches: Mutex<Vec<(String, Value)>>,
    /// Answer 403 to everything, as without the consumer-nudge permission.
    deny: AtomicBool,
}

impl Pods {
    fn patched(&self) -> Vec<(String, Value)> {
        self.patches.lock().unwrap().clone()
    }
}

/// The front: the pods API answered here, the rest relayed to `upstream`.
async fn front(upstream: String, pods: Arc<Pods>) -> String {
    use axum::{
        Json,
        extract::{Path, Query, Request, State},
        http::StatusCode,
        response::{IntoResponse, Response},
        routing::get,
    };
    type S = State<(Arc<Pods>, String, reqwest::Client)>;
    fn forbidden() -> Response {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "Forbidden", "code": 403, "message": "pods is forbidden"});
        (StatusCode::FORBIDDEN, Json(status)).into_response()
    }
    async fn list(State((p, ..)): S, Query(q): Query<BTreeMap<String, String>>) -> Response {
        if p.deny.load(Ordering::SeqCst) {
            return forbidden();
        }
        let selector = q.get("labelSelector").cloned().unwrap_or_default();
        p.selectors.lock().unwrap().push(selector);
        let items = p.pods.lock().unwrap().clone();
        Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}))
            .into_response()
    }
    async fn patch(
        State((p, ..)): S,
        Path(name): Path<String>,
        Json(body): Json<Value>,
    ) -> Response {
        if p.deny.load(Ordering::SeqCst) {
            return forbidden();
        }
        p.patches.lock().unwrap().push((name.clone(), body));
        Json(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}})).into_response()
    }
    async fn relay(State((_, upstream, http)): S, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let Ok(body) = axum::body::to_bytes(body, 64 << 20).await else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request = http
            .request(parts.method, format!("{upstream}{path}"))
            .body(body);
        for (name, value) in &parts.headers {
            if name != axum::http::header::HOST {
                request = request.header(name, value);
            }
        }
        let Ok(resp) = request.send().await else {
            return StatusCode::BAD_GATEWAY.into_response();
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap_or_default();
        let mut out = (status, body).into_response();
        for (name, value) in &headers {
            if name != axum::http::header::CONTENT_LENGTH
                && name != axum::http::header::TRANSFER_ENCODING
            {
                out.headers_mut().insert(name, value.clone());
            }
        }
        out
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let app = axum::Router::new()
        .route("/api/v1/namespaces/default/pods", get(list))
        .route(
            "/api/v1/namespaces/default/pods/{name}",
            axum::routing::patch(patch).get(relay),
        )
        .fallback(relay)
        .with_state((pods, upstream, http));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

struct World {
    server: ApiServer,
    /// Through the front.
    client: kube::Client,
    api: Arc<FakeApi>,
    clock: Arc<ManualClock>,
    ctx: Arc<Context>,
    pods: Arc<Pods>,
    /// The operator's Lease cache, when on.
    leases: Option<Store<Lease>>,
    registry: Registry,
    /// When the agents started (every Lease's `acquireTime`): an hour before the test.
    agents_started: Timestamp,
}

impl World {
    /// A fresh operator; `reports` turns the Lease cache on, fed by a watch of the API
    /// server as the controller's.
    async fn new(reports: bool) -> World {
        let server = ApiServer::start().await.expect("API server");
        let pods = Arc::new(Pods::default());
        let url = front(server.url(), pods.clone()).await;
        let mut config = kube::Config::new(url.parse().unwrap());
        config.default_retry = false;
        let client = kube::Client::try_from(config).unwrap();
        install_crd(&client).await;
        let api = Arc::new(FakeApi::default());
        let clock = ManualClock::new();
        let mut registry = Registry::default();
        let ctx = Context::new(deps(&client, api.clone(), clock.clone(), &mut registry));
        // Fed from the API server directly, as the controller's watch would be.
        let (ctx, writer) = ctx.with_consumer_reports(reports);
        let mut leases = None;
        if let Some(writer) = writer {
            leases = Some(writer.as_reader());
            let watch = watcher(Api::<Lease>::all(server.client()), Default::default())
                .reflect(writer)
                .for_each(|_| async {});
            tokio::spawn(watch);
        }
        let agents_started = clock.now() - SignedDuration::from_hours(1);
        let w = World {
            server,
            client,
            api,
            clock,
            ctx: Arc::new(ctx),
            pods,
            leases,
            registry,
            agents_started,
        };
        w.credentials().await;
        w
    }

    fn tokens(&self) -> Api<ScgToken> {
        Api::namespaced(self.client.clone(), NS)
    }

    async fn credentials(&self) {
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some("creds".into()),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([
                ("consumerKey".into(), "key".into()),
                ("consumerSecret".into(), CONSUMER_SECRET.into()),
                ("accessToken".into(), "planted-seed-1234".into()),
            ])),
            ..Default::default()
        };
        scg_token_operator::access::opt_in(&mut secret.metadata);
        Api::<Secret>::namespaced(self.client.clone(), NS)
            .create(&PostParams::default(), &secret)
            .await
            .expect("credentials");
    }

    async fn create(&self, name: &str, validity: &str, consumers: ConsumersSpec) {
        let mut spec = ScgTokenSpec::new("creds");
        spec.endpoint = "https://scg.example/apptoken-refresh".into();
        spec.validity = validity.into();
        spec.consumers = Some(consumers);
        self.tokens()
            .create(&PostParams::default(), &ScgToken::new(name, spec))
            .await
            .expect("ScgToken");
    }

    async fn reconcile(&self, name: &str) -> Action {
        let obj = self.tokens().get(name).await.expect("ScgToken");
        reconcile(Arc::new(obj), self.ctx.clone())
            .await
            .expect("a pass")
    }

    /// Asks for one refresh, `token` valid for `secs`, and runs the pass.
    async fn rotate(&self, name: &str, token: &str, secs: u64) -> Action {
        self.api.issue(token, secs);
        let value = format!("{token}-request");
        let annotate = json!({"metadata": {"annotations": {
            scg_token_operator::crd::REFRESH_REQUEST_ANNOTATION: value}}});
        self.tokens()
            .patch(name, &PatchParams::default(), &Patch::Merge(&annotate))
            .await
            .expect("annotate");
        self.reconcile(name).await
    }

    async fn fingerprint(&self, name: &str) -> String {
        let t = self.tokens().get(name).await.unwrap();
        t.status.unwrap().token_fingerprint.unwrap()
    }

    /// (status, reason, message) of ConsumersUpToDate.
    async fn condition(&self, name: &str) -> Option<(String, String, String)> {
        let t = self.tokens().get(name).await.unwrap();
        let c = t
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "ConsumersUpToDate")?;
        Some((c.status, c.reason, c.message))
    }

    async fn summary(&self, name: &str) -> Option<String> {
        let t = self.tokens().get(name).await.unwrap();
        Some(t.status?.consumers?.summary)
    }

    /// Every Event: (type, reason, note).
    async fn events(&self) -> Vec<(String, String, String)> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), NS);
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }

    async fn has_event(&self, type_: &str, reason: &str) -> Option<String> {
        self.events()
            .await
            .into_iter()
            .find(|e| e.0 == type_ && e.1 == reason)
            .map(|e| e.2)
    }

    /// Writes the report Lease of `pod` as an agent does, renewed now by the fake clock,
    /// and waits until the operator's cache has it.
    async fn report(&self, scgtoken: &str, pod: &str, fingerprint: &str, since: Timestamp) {
        let now = self.clock.now();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(format!("{pod}.{scgtoken}")),
                namespace: Some(NS.into()),
                labels: Some(BTreeMap::from([(
                    AGENT_SCGTOKEN_LABEL.into(),
                    scgtoken.into(),
                )])),
                annotations: Some(BTreeMap::from([
                    (SERVED_FINGERPRINT_ANNOTATION.into(), fingerprint.into()),
                    (SERVED_SINCE_ANNOTATION.into(), since.to_string()),
                ])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(pod.into()),
                lease_duration_seconds: Some(30),
                acquire_time: Some(MicroTime(self.agents_started)),
                renew_time: Some(MicroTime(now)),
                ..Default::default()
            }),
        };
        let leases: Api<Lease> = Api::namespaced(self.server.client(), NS);
        leases
            .patch(
                &format!("{pod}.{scgtoken}"),
                &PatchParams::apply("agent").force(),
                &Patch::Apply(&lease),
            )
            .await
            .expect("write the Lease");
        let cached = |l: &Lease| {
            l.spec.as_ref().and_then(|s| s.renew_time.clone()) == Some(MicroTime(now))
                && l.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SERVED_FINGERPRINT_ANNOTATION))
                    == Some(&fingerprint.to_string())
        };
        for _ in 0..500 {
            let leases = self.leases.as_ref().expect("the Lease cache is on");
            if leases.state().iter().any(|l| {
                l.metadata.name.as_deref() == Some(&format!("{pod}.{scgtoken}")) && cached(l)
            }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the Lease cache never saw {pod}'s report");
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

fn consumers() -> ConsumersSpec {
    ConsumersSpec {
        agents: true,
        stale_after: "5s".into(),
        ..ConsumersSpec::default()
    }
}

#[tokio::test]
async fn agent_reports_become_status_condition_events_metrics_and_wake_ups() {
    let w = World::new(true).await;
    w.create("messaging", "1h", consumers()).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await;
    let fp = w.fingerprint("messaging").await;
    let stored = w.clock.now();
    assert_eq!(
        w.condition("messaging").await.map(|c| c.1),
        Some("NoReports".into())
    );

    // One pod switched, one still on the previous token: switching, not yet stale.
    w.clock.advance(Duration::from_secs(1));
    w.report("messaging", "pod-a", &fp, w.clock.now()).await;
    w.report("messaging", "pod-b", "previous", stored).await;
    let action = w.reconcile("messaging").await;
    let (status, reason, message) = w.condition("messaging").await.unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "UpToDate"));
    assert!(message.contains("1 switching"), "{message}");
    assert_eq!(w.summary("messaging").await.as_deref(), Some("1/2"));
    // The pass comes back when pod-b would turn stale: 5 s after the store, just after.
    assert_eq!(action, Action::requeue(Duration::from_millis(4100)));

    // That pass: stale, by name, with a Warning.
    w.clock.advance(Duration::from_millis(4100));
    w.reconcile("messaging").await;
    let (status, reason, message) = w.condition("messaging").await.unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "StaleConsumers")
    );
    assert!(message.ends_with("pod-b"), "{message}");
    let t = w.tokens().get("messaging").await.unwrap();
    let consumers = t.status.unwrap().consumers.unwrap();
    assert_eq!(consumers.stale_pods, ["pod-b"]);
    assert_eq!(consumers.slowest_switch_seconds, Some(1.0));
    assert!(w.has_event("Warning", "StaleConsumers").await.is_some());
    let metrics = w.metrics();
    for (state, n) in [("current", 1), ("switching", 0), ("stale", 1)] {
        let line = format!(
            "scgtoken_consumers{{namespace=\"default\",name=\"messaging\",state=\"{state}\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }

    // pod-b switches: up to date again, told by an Event.
    w.report("messaging", "pod-b", &fp, w.clock.now()).await;
    w.reconcile("messaging").await;
    let (status, _, _) = w.condition("messaging").await.unwrap();
    assert_eq!(status, "True");
    assert_eq!(w.summary("messaging").await.as_deref(), Some("2/2"));
    assert!(w.has_event("Normal", "ConsumersUpToDate").await.is_some());

    // pod-a stops renewing: it drops out when its heartbeat expires, which the pass
    // wakes up for.
    w.clock.advance(Duration::from_secs(10));
    w.report("messaging", "pod-b", &fp, w.clock.now()).await;
    let action = w.reconcile("messaging").await;
    // pod-a renewed 1 s after the store, for 30 s.
    assert_eq!(action, Action::requeue(Duration::from_secs(16)));
    w.clock.advance(Duration::from_secs(16));
    w.reconcile("messaging").await;
    assert_eq!(w.summary("messaging").await.as_deref(), Some("1/1"));

    // No secret anywhere the operator reports to.
    let t = w.tokens().get("messaging").await.unwrap();
    let shown = format!(
        "{}\n{:?}\n{}",
        serde_json::to_string(&t.status).unwrap(),
        w.events().await,
        w.metrics()
    );
    for secret in ["token-1", CONSUMER_SECRET, "planted-seed-1234"] {
        assert!(!shown.contains(secret), "{secret} leaked");
    }
}

/// A pod stuck on an old token is not forgiven at each new rotation: its staleness counts
/// from the first store it missed, so the condition stays False, with no Normal Event
/// saying that all is well, while tokens keep coming.
#[tokio::test]
async fn a_pod_stuck_on_an_old_token_stays_stale_across_rotations() {
    let w = World::new(true).await;
    w.create("messaging", "1h", consumers()).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await;
    let fp = w.fingerprint("messaging").await;
    let stuck_since = w.clock.now() - SignedDuration::from_mins(5);
    w.report("messaging", "pod-a", &fp, w.clock.now()).await;
    w.report("messaging", "pod-b", "previous", stuck_since)
        .await;
    w.clock.advance(Duration::from_secs(6));
    w.reconcile("messaging").await;
    let (status, reason, _) = w.condition("messaging").await.unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "StaleConsumers")
    );

    // Two rotations, 16 s apart; pod-a switches each time, pod-b heartbeats on "previous".
    for token in ["token-2", "token-3"] {
        w.clock.advance(Duration::from_secs(16));
        w.report("messaging", "pod-b", "previous", stuck_since)
            .await;
        w.rotate("messaging", token, 3600).await;
        let fp = w.fingerprint("messaging").await;
        let (status, reason, message) = w.condition("messaging").await.unwrap();
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "StaleConsumers"),
            "right after {token} was stored: {message}"
        );
        assert!(message.ends_with("pod-b"), "{message}");
        w.clock.advance(Duration::from_secs(1));
        w.report("messaging", "pod-a", &fp, w.clock.now()).await;
        w.report("messaging", "pod-b", "previous", stuck_since)
            .await;
        w.reconcile("messaging").await;
        let t = w.tokens().get("messaging").await.unwrap();
        let consumers = t.status.unwrap().consumers.unwrap();
        assert_eq!(
            (consumers.summary.as_str(), consumers.stale_pods.clone()),
            ("1/2", vec!["pod-b".to_string()]),
            "after pod-a switched to {token}"
        );
    }
    assert_eq!(w.has_event("Normal", "ConsumersUpToDate").await, None);
    let warnings = w
        .events()
        .await
        .into_iter()
        .filter(|e| e.1 == "StaleConsumers")
        .count();
    assert_eq!(warnings, 1, "one Warning for one stuck pod");
}

/// A pod whose agent went silent (its Lease expired, never released) while the pod still
/// exists stays in the count as lost, and the condition is False while it does; once the
/// pod is deleted it leaves the count.
#[tokio::test]
async fn a_silent_agent_in_a_pod_that_still_exists_is_lost_until_the_pod_is_deleted() {
    let w = World::new(true).await;
    let pods: Api<Pod> = Api::namespaced(w.server.client(), NS);
    for name in ["pod-a", "pod-b"] {
        let pod: Pod = serde_json::from_value(pod(name)).unwrap();
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("pod");
    }
    w.create("messaging", "1h", consumers()).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await;
    let fp = w.fingerprint("messaging").await;
    w.report("messaging", "pod-a", &fp, w.clock.now()).await;
    w.report("messaging", "pod-b", &fp, w.clock.now()).await;
    w.reconcile("messaging").await;
    assert_eq!(w.summary("messaging").await.as_deref(), Some("2/2"));

    // pod-b's agent is killed; pod-a keeps reporting. Past pod-b's 30 s Lease: lost.
    w.clock.advance(Duration::from_secs(31));
    w.report("messaging", "pod-a", &fp, w.clock.now()).await;
    let action = w.reconcile("messaging").await;
    let (status, reason, message) = w.condition("messaging").await.unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "LostConsumers")
    );
    assert!(message.ends_with("unknown: pod-b"), "{message}");
    let t = w.tokens().get("messaging").await.unwrap();
    let consumers = t.status.unwrap().consumers.unwrap();
    assert_eq!(
        (
            consumers.summary.as_str(),
            consumers.lost,
            consumers.lost_pods.clone()
        ),
        ("1/2", 1, vec!["pod-b".to_string()])
    );
    assert!(w.has_event("Warning", "LostConsumers").await.is_some());
    let line = r#"scgtoken_consumers{namespace="default",name="messaging",state="lost"} 1"#;
    assert!(w.metrics().contains(line), "{}", w.metrics());
    // It comes back to see whether the pod is gone.
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));

    // The pod is deleted (its Lease, which names no owner here, stays): it leaves.
    pods.delete("pod-b", &Default::default())
        .await
        .expect("delete");
    w.reconcile("messaging").await;
    let (status, reason, _) = w.condition("messaging").await.unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "UpToDate"));
    let t = w.tokens().get("messaging").await.unwrap();
    let consumers = t.status.unwrap().consumers.unwrap();
    assert_eq!((consumers.summary.as_str(), consumers.lost), ("1/1", 0));
    assert!(w.has_event("Normal", "ConsumersUpToDate").await.is_some());
}

#[tokio::test]
async fn without_the_lease_cache_agents_get_a_condition_that_says_how_to_enable_it() {
    let w = World::new(false).await;
    w.create("messaging", "1h", consumers()).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await;
    let (status, reason, message) = w.condition("messaging").await.unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("Unknown", "ReportsDisabled")
    );
    assert!(message.contains("--consumer-reports"), "{message}");
    assert!(
        message.contains("deploy/components/consumer-reports"),
        "{message}"
    );
    assert_eq!(w.summary("messaging").await, None);
    let note = w.has_event("Warning", "ReportsDisabled").await;
    assert_eq!(note.as_deref(), Some(message.as_str()));
    // The token itself is unaffected.
    let t = w.tokens().get("messaging").await.unwrap();
    assert_eq!(t.ready_condition().unwrap().status, "True");
}

/// A pod of `spec.podSelector` that opts in to nudges for "messaging".
fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "client"},
            "annotations": {RESTART_FOR_ANNOTATION: "messaging"}},
        "status": {"phase": "Running"}})
}

#[tokio::test]
async fn pods_are_nudged_once_per_stored_token_and_a_failure_only_warns() {
    let w = World::new(false).await;
    // Another team's pod that the selector catches too: it does not opt in.
    let mut foreign = pod("other-team");
    foreign["metadata"]["annotations"] = json!({});
    *w.pods.pods.lock().unwrap() = vec![pod("client-1"), pod("client-2"), foreign];
    let spec = ConsumersSpec {
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "client".into())])),
            ..Default::default()
        }),
        ..ConsumersSpec::default()
    };
    w.create("messaging", "1h", spec).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await;
    let fp1 = w.fingerprint("messaging").await;
    let want = |fp: &str| json!({"metadata": {"annotations": {NUDGED_FOR_ANNOTATION: fp}}});
    let mut patched = w.pods.patched();
    patched.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        patched,
        [
            ("client-1".to_string(), want(&fp1)),
            ("client-2".to_string(), want(&fp1))
        ]
    );
    assert_eq!(*w.pods.selectors.lock().unwrap(), ["app=client"]);
    let note = w
        .has_event("Warning", "NudgeNotAllowed")
        .await
        .expect("a NudgeNotAllowed Event");
    assert!(
        note.contains("1 pods") && note.contains(RESTART_FOR_ANNOTATION),
        "{note}"
    );
    // No ConsumersUpToDate without agents or restarts.
    assert_eq!(w.condition("messaging").await, None);

    // A pass without a new token nudges nobody.
    w.clock.advance(Duration::from_secs(60));
    w.reconcile("messaging").await;
    assert_eq!(w.pods.patched().len(), 2);

    // The next token: nudged again, for it.
    w.rotate("messaging", "token-2", 3600).await;
    let fp2 = w.fingerprint("messaging").await;
    assert_ne!(fp1, fp2);
    let patched = w.pods.patched();
    assert_eq!(patched.len(), 4);
    assert!(patched[2..].iter().all(|(_, body)| *body == want(&fp2)));

    // Without the permission: the token is stored and Ready all the same; a Warning says
    // what is missing.
    w.pods.deny.store(true, Ordering::SeqCst);
    w.rotate("messaging", "token-3", 3600).await;
    let secret = Api::<Secret>::namespaced(w.client.clone(), NS)
        .get("messaging")
        .await
        .unwrap();
    assert_eq!(
        chain::fingerprint(&w.tokens().get("messaging").await.unwrap(), "token-3"),
        w.fingerprint("messaging").await
    );
    assert_eq!(secret.data.unwrap()["accessToken"].0, b"token-3");
    let t = w.tokens().get("messaging").await.unwrap();
    assert_eq!(t.ready_condition().unwrap().reason, "Refreshed");
    let note = w
        .has_event("Warning", "NudgeFailed")
        .await
        .expect("a NudgeFailed Event");
    assert!(note.contains("403 Forbidden"), "{note}");
    assert!(note.contains("deploy/components/consumer-nudge"), "{note}");
    assert!(!format!("{:?}", w.events().await).contains("token-"));
}

/// A Deployment that opts in to restarts for the ScgTokens "messaging" and "short".
fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS,
            "annotations": {RESTART_FOR_ANNOTATION: "messaging,short"}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        }
    }))
    .unwrap()
}

fn restarted_for(w: &World, name: &str) -> Option<String> {
    let obj = w.server.object("apps", "deployments", NS, name)?;
    obj.pointer(&format!(
        "/spec/template/metadata/annotations/{}",
        RESTARTED_FOR_ANNOTATION.replace('/', "~1")
    ))?
    .as_str()
    .map(str::to_string)
}

#[tokio::test]
async fn workloads_are_restarted_once_per_token_debounced_and_refused_for_short_lifetimes() {
    let w = World::new(false).await;
    let deployments: Api<Deployment> = Api::namespaced(w.client.clone(), NS);
    for name in ["web", "legacy"] {
        deployments
            .create(&PostParams::default(), &deployment(name))
            .await
            .unwrap();
    }
    // Another team's Deployment, named by the ScgToken but not opting in.
    let mut payments = deployment("payments");
    payments.metadata.annotations = None;
    deployments
        .create(&PostParams::default(), &payments)
        .await
        .unwrap();
    let targets = |names: &[&str]| ConsumersSpec {
        rollout_restart_targets: names
            .iter()
            .map(|n| RolloutRestartTarget {
                kind: RestartKind::Deployment,
                name: n.to_string(),
            })
            .collect(),
        ..ConsumersSpec::default()
    };
    w.create("messaging", "1h", targets(&["web", "absent", "payments"]))
        .await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await;
    let fp1 = w.fingerprint("messaging").await;
    assert_eq!(restarted_for(&w, "web"), Some(fp1.clone()));
    assert_eq!(restarted_for(&w, "payments"), None, "not opted in");
    let refused = w.has_event("Warning", "RestartNotAllowed").await.unwrap();
    assert!(refused.contains("\"payments\""), "{refused}");
    let note = w.has_event("Normal", "RolloutRestarted").await.unwrap();
    assert!(note.contains("\"web\""), "{note}");
    assert!(
        w.has_event("Warning", "RestartTargetNotFound")
            .await
            .is_some()
    );
    // Long-lived tokens: nothing refused, and no agents asked for.
    assert_eq!(w.condition("messaging").await, None);

    // A second token 10 s later: the restart waits for the debounce, and the pass comes
    // back for it.
    w.clock.advance(Duration::from_secs(10));
    let action = w.rotate("messaging", "token-2", 3600).await;
    let fp2 = w.fingerprint("messaging").await;
    assert_eq!(restarted_for(&w, "web"), Some(fp1));
    assert_eq!(action, Action::requeue(Duration::from_secs(110)));
    w.clock.advance(Duration::from_secs(110));
    w.reconcile("messaging").await;
    assert_eq!(restarted_for(&w, "web"), Some(fp2.clone()));
    // And only once.
    let generation = |w: &World| {
        w.server.object("apps", "deployments", NS, "web").unwrap()["metadata"]["generation"]
            .as_i64()
    };
    let before = generation(&w);
    w.clock.advance(Duration::from_secs(300));
    w.reconcile("messaging").await;
    assert_eq!(generation(&w), before);

    // Tokens living 60 s: refused, said in the condition and a Warning, nothing restarted.
    w.create("short", "60s", targets(&["legacy"])).await;
    w.api.issue("token-s", 60);
    w.reconcile("short").await;
    let (status, reason, message) = w.condition("short").await.unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "RestartRefused")
    );
    assert!(message.contains("tokens live 60s"), "{message}");
    assert!(w.has_event("Warning", "RestartRefused").await.is_some());
    assert_eq!(restarted_for(&w, "legacy"), None);
}
