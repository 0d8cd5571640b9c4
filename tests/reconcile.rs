//! Reconcile tests: `reconcile()` against the in-memory API server, with a scripted
//! token API and a hand-moved clock. Each test drives one situation a user would meet
//! and asserts what they would see: the target Secret, status, Events, API calls.

mod common {
    pub mod context;
}

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{core::v1::Secret, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use prometheus_client::registry::Registry;
use scg_token_operator::{
    access, chain,
    crd::{DeletionPolicy, MANAGED_BY_LABEL, OWNER_ANNOTATION, ScgToken, ScgTokenSpec},
    policy::{self, Clock},
    reconcile::{CachedScgToken, Context, Deps, TokenCache, reconcile, token_cache},
    scg::{RefreshError, RefreshRequest, Refreshed, SecretString, TokenApi},
};
use testkit::apiserver::ApiServer;

use common::context::{LogBuffer, ManualClock, api_server, deps};

const KEY: &str = "planted-consumer-key-5c1d";
const SECRET: &str = "planted-consumer-secret-9b2e";
const SEED: &str = "planted-seed-token-0a7f";
const NS: &str = "default";

/// A token API that answers from a script and records the old tokens it was sent.
#[derive(Default)]
struct FakeApi {
    script: Mutex<VecDeque<Result<Refreshed, RefreshError>>>,
    calls: Mutex<Vec<String>>,
    issued: Mutex<Vec<String>>,
}

impl FakeApi {
    /// Queues a success issuing `token` valid for `secs`.
    fn issue(&self, token: &str, secs: u64) {
        self.script.lock().unwrap().push_back(Ok(Refreshed {
            token: SecretString::new(token),
            lifetime: Duration::from_secs(secs),
        }));
    }
    fn fail(&self, e: RefreshError) {
        self.script.lock().unwrap().push_back(Err(e));
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl TokenApi for FakeApi {
    fn refresh<'a>(
        &'a self,
        req: &'a RefreshRequest<'a>,
    ) -> BoxFuture<'a, Result<Refreshed, RefreshError>> {
        self.calls
            .lock()
            .unwrap()
            .push(req.old_token.expose().to_string());
        let next = self.script.lock().unwrap().pop_front();
        let out = next.unwrap_or(Err(RefreshError::Unavailable {
            status: 599,
            retry_after: None,
        }));
        if let Ok(r) = &out {
            self.issued
                .lock()
                .unwrap()
                .push(r.token.expose().to_string());
        }
        Box::pin(async move { out })
    }
}

/// A fresh operator context: what a newly started process has (nothing in memory).
fn context(client: &kube::Client, api: &Arc<FakeApi>, clock: &Arc<ManualClock>) -> Arc<Context> {
    context_with_cache(client, api, clock, token_cache().0)
}

/// A fresh context whose ScgToken cache is `tokens`.
fn context_with_cache(
    client: &kube::Client,
    api: &Arc<FakeApi>,
    clock: &Arc<ManualClock>,
    tokens: TokenCache,
) -> Arc<Context> {
    let deps = deps(client, api.clone(), clock.clone(), &mut Registry::default());
    Arc::new(Context::new(Deps { tokens, ..deps }))
}

struct World {
    server: ApiServer,
    client: kube::Client,
    api: Arc<FakeApi>,
    clock: Arc<ManualClock>,
    ctx: Arc<Context>,
}

impl World {
    async fn new() -> World {
        let (server, client) = api_server().await;
        let api = Arc::new(FakeApi::default());
        let clock = ManualClock::new();
        let ctx = context(&client, &api, &clock);
        let w = World {
            server,
            client,
            api,
            clock,
            ctx,
        };
        w.put_credentials(SEED).await;
        w
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), NS)
    }
    fn tokens(&self) -> Api<ScgToken> {
        Api::namespaced(self.client.clone(), NS)
    }

    async fn put_credentials(&self, seed: &str) {
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some("creds".into()),
                ..Default::default()
            },
            string_data: Some(
                [
                    ("consumerKey", KEY),
                    ("consumerSecret", SECRET),
                    ("accessToken", seed),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        };
        access::opt_in(&mut secret.metadata);
        let pp = PatchParams::apply("test").force();
        self.secrets()
            .patch("creds", &pp, &Patch::Apply(&secret))
            .await
            .expect("write credentials");
    }

    async fn create(&self, name: &str, f: impl FnOnce(&mut ScgTokenSpec)) {
        let mut spec = ScgTokenSpec::new("creds");
        spec.endpoint = "https://scg.example/apptoken-refresh".into();
        f(&mut spec);
        self.tokens()
            .create(&PostParams::default(), &ScgToken::new(name, spec))
            .await
            .expect("create ScgToken");
    }

    /// Runs one reconcile pass on the stored object, as the controller would.
    async fn reconcile(&self, name: &str) -> Result<kube::runtime::controller::Action, String> {
        let obj = self.tokens().get(name).await.expect("get ScgToken");
        reconcile(Arc::new(obj), self.ctx.clone())
            .await
            .map_err(|e| e.to_string())
    }

    /// What `kubectl annotate scgtoken NAME scgtoken.io/refresh-requested-at=VALUE` does.
    async fn request_refresh(&self, name: &str, value: &str) {
        let annotate = serde_json::json!({"metadata": {"annotations": {
            scg_token_operator::crd::REFRESH_REQUEST_ANNOTATION: value}}});
        self.tokens()
            .patch(name, &PatchParams::default(), &Patch::Merge(&annotate))
            .await
            .expect("annotate");
    }

    /// Sets (or, with null, removes) the adopt-target annotation of "messaging".
    async fn adopt(&self, value: serde_json::Value) {
        let patch = serde_json::json!({"metadata": {"annotations": {
            scg_token_operator::crd::ADOPT_TARGET_ANNOTATION: value}}});
        self.tokens()
            .patch("messaging", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("annotate ScgToken");
    }

    async fn token(&self, name: &str) -> ScgToken {
        self.tokens().get(name).await.expect("get ScgToken")
    }

    /// (Ready status, reason) of an ScgToken.
    async fn ready(&self, name: &str) -> (String, String) {
        let t = self.token(name).await;
        let c = t.ready_condition().expect("Ready condition");
        (c.status.clone(), c.reason.clone())
    }

    async fn target_token(&self, name: &str) -> Option<String> {
        let s = self.secrets().get_opt(name).await.unwrap()?;
        let b = s.data?.get("accessToken")?.0.clone();
        Some(String::from_utf8(b).unwrap())
    }

    async fn event_reasons(&self) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), NS);
        let mut reasons: Vec<String> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect();
        reasons.sort();
        reasons
    }

    /// Writes (create/update/patch) counted by the API server so far.
    fn writes(&self) -> u64 {
        self.server
            .counters()
            .snapshot()
            .iter()
            .filter(|((verb, resource), _)| {
                matches!(verb.as_str(), "create" | "update" | "patch" | "delete")
                    && !resource.contains("events")
            })
            .map(|(_, n)| n)
            .sum()
    }
}

#[tokio::test]
async fn first_refresh_replaces_the_seed_and_creates_the_target() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);

    w.reconcile("messaging").await.unwrap();

    assert_eq!(
        w.api.calls(),
        vec![SEED.to_string()],
        "one call, with the seed"
    );
    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-1")
    );
    let secret = w.secrets().get("messaging").await.unwrap();
    assert_eq!(
        secret.labels().get(MANAGED_BY_LABEL).unwrap(),
        "scg-token-operator"
    );
    assert_eq!(
        secret.annotations().get(OWNER_ANNOTATION).unwrap(),
        "messaging"
    );
    assert!(
        secret.metadata.owner_references.is_none(),
        "Retain: no owner reference"
    );
    let t = w.token("messaging").await;
    let status = t.status.clone().unwrap();
    let now = w.clock.now();
    assert_eq!(
        status.expires_at.unwrap().0,
        now + SignedDuration::from_secs(3600)
    );
    let next = status.next_refresh_at.unwrap().0;
    // A third of the lifetime is left at the refresh, less up to 30 s of jitter.
    assert!(next <= now + SignedDuration::from_secs(2400));
    assert!(next >= now + SignedDuration::from_secs(2370));
    assert_eq!(status.consecutive_failures, 0);
    let fp = status.token_fingerprint.unwrap();
    assert_eq!(fp.len(), 16);
    // Status names the stored token by its salted fingerprint, the one on the Secret.
    assert_eq!(fp, chain::fingerprint(&t, "token-1"));
    assert_eq!(
        secret.annotations().get(chain::TOKEN_FINGERPRINT),
        Some(&fp)
    );
    assert_eq!(
        w.ready("messaging").await,
        ("True".into(), "Refreshed".into())
    );
    assert_eq!(w.event_reasons().await, vec!["Refreshed".to_string()]);
}

#[tokio::test]
async fn nothing_due_means_no_call_and_no_write_then_refreshes_on_time() {
    let w = World::new().await;
    w.create("messaging", |s| s.refresh_before = Some("10m".into()))
        .await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();

    let writes = w.writes();
    for _ in 0..3 {
        let action = w.reconcile("messaging").await.unwrap();
        // Requeued for the refresh instant: about 50 minutes away.
        let dbg = format!("{action:?}");
        assert!(dbg.contains("requeue_after: Some("), "{dbg}");
    }
    assert_eq!(w.api.calls().len(), 1, "no call while nothing is due");
    assert_eq!(w.writes(), writes, "no API write while nothing is due");

    w.clock.advance(Duration::from_secs(3000));
    w.api.issue("token-2", 3600);
    w.reconcile("messaging").await.unwrap();
    assert_eq!(w.api.calls(), vec![SEED.to_string(), "token-1".to_string()]);
    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-2")
    );
    assert_eq!(
        w.writes(),
        writes + 2,
        "one Secret write and one status write: {:?}",
        w.server.counters().snapshot()
    );
}

#[tokio::test]
async fn a_restart_continues_from_the_target_secret_not_the_seed() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 60);
    w.reconcile("messaging").await.unwrap();

    // A new process: nothing in memory.
    let fresh = World {
        ctx: context(&w.client, &w.api, &w.clock),
        ..w
    };
    fresh.clock.advance(Duration::from_secs(50));
    fresh.api.issue("token-2", 60);
    fresh.reconcile("messaging").await.unwrap();
    assert_eq!(fresh.api.calls()[1], "token-1", "continued the chain");
    assert_eq!(
        fresh.target_token("messaging").await.as_deref(),
        Some("token-2")
    );
}

#[tokio::test]
async fn a_new_seed_starts_a_new_chain_at_once() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();

    w.put_credentials("seed-2").await;
    w.api.issue("token-from-seed-2", 3600);
    w.reconcile("messaging").await.unwrap();

    assert_eq!(w.api.calls()[1], "seed-2");
    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-from-seed-2")
    );
    assert!(w.event_reasons().await.contains(&"SeedRotated".to_string()));
}

#[tokio::test]
async fn a_deleted_target_is_recreated_without_losing_the_chain() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();

    w.secrets()
        .delete("messaging", &DeleteParams::default())
        .await
        .unwrap();
    w.reconcile("messaging").await.unwrap();

    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-1")
    );
    assert_eq!(
        w.api.calls().len(),
        1,
        "restored from memory, no refresh call"
    );
}

#[tokio::test]
async fn a_foreign_target_is_never_touched() {
    let w = World::new().await;
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("messaging".into()),
            ..Default::default()
        },
        string_data: Some([("accessToken".to_string(), "theirs".to_string())].into()),
        ..Default::default()
    };
    w.secrets()
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    w.create("messaging", |_| {}).await;

    w.reconcile("messaging").await.unwrap();

    assert!(
        w.api.calls().is_empty(),
        "no refresh into a Secret it cannot write"
    );
    assert_eq!(w.target_token("messaging").await.as_deref(), Some("theirs"));
    assert_eq!(
        w.ready("messaging").await,
        ("False".into(), "TargetConflict".into())
    );
    assert!(
        w.event_reasons()
            .await
            .contains(&"TargetConflict".to_string())
    );
}

#[tokio::test]
async fn suspended_invalid_and_missing_credentials_are_reported_without_calls() {
    let w = World::new().await;
    w.create("suspended", |s| s.suspend = true).await;
    w.create("both-margins", |s| {
        s.refresh_before = Some("1m".into());
        s.refresh_before_percentage = Some(20);
    })
    .await;
    w.create("plain-http", |s| s.endpoint = "http://scg.example/x".into())
        .await;
    w.create("no-creds", |s| {
        s.credentials_secret_ref.name = "missing".into()
    })
    .await;
    w.create("wrong-key", |s| {
        s.credentials_secret_ref.consumer_secret_key = "nope".into()
    })
    .await;

    for name in [
        "suspended",
        "both-margins",
        "plain-http",
        "no-creds",
        "wrong-key",
    ] {
        w.reconcile(name).await.unwrap();
    }
    assert!(w.api.calls().is_empty());
    for (name, want) in [
        ("suspended", "Suspended"),
        ("both-margins", "InvalidSpec"),
        ("plain-http", "InvalidSpec"),
        ("no-creds", "CredentialsNotFound"),
        ("wrong-key", "CredentialsNotFound"),
    ] {
        assert_eq!(w.ready(name).await, ("False".into(), want.into()), "{name}");
    }
    let msg = w
        .token("wrong-key")
        .await
        .ready_condition()
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("\"nope\""), "names the missing key: {msg}");
    let msg = w
        .token("plain-http")
        .await
        .ready_condition()
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("plain http"), "{msg}");
}

#[tokio::test]
async fn a_failed_write_keeps_the_token_and_makes_no_second_call() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    let faults = w.server.faults();
    faults.fail_next("create", "secrets", 100, 500);

    let err = w.reconcile("messaging").await.unwrap_err();
    assert!(err.contains("writing Secret"), "{err}");
    assert!(w.ctx.has_pending(NS, "messaging"));
    assert_eq!(w.ready("messaging").await.1, "Pending");

    // Still failing: the next pass retries the write, and calls nothing.
    w.clock.advance(Duration::from_secs(5));
    assert!(w.reconcile("messaging").await.is_err());
    assert_eq!(
        w.api.calls().len(),
        1,
        "never refresh while a token is unstored"
    );

    faults.fail_next("create", "secrets", 0, 500);
    w.reconcile("messaging").await.unwrap();
    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-1")
    );
    assert_eq!(w.api.calls().len(), 1);
    assert!(!w.ctx.has_pending(NS, "messaging"));
    assert_eq!(
        w.ready("messaging").await,
        ("True".into(), "Refreshed".into())
    );
}

#[tokio::test]
async fn rejection_backs_off_until_a_human_fixes_the_credentials() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.fail(RefreshError::Rejected { status: 401 });

    w.reconcile("messaging").await.unwrap();
    assert_eq!(
        w.ready("messaging").await,
        ("False".into(), "Rejected".into())
    );
    let status = w.token("messaging").await.status.unwrap();
    assert_eq!(status.consecutive_failures, 1);
    let retry = status.next_refresh_at.unwrap().0;
    assert!(
        retry >= w.clock.now() + SignedDuration::from_secs(30),
        "backs off hard"
    );

    w.clock.advance(Duration::from_secs(10));
    w.reconcile("messaging").await.unwrap();
    assert_eq!(w.api.calls().len(), 1, "no retry during the back-off");

    w.put_credentials("seed-fixed").await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();
    assert_eq!(w.api.calls()[1], "seed-fixed", "retried at once");
    assert_eq!(w.ready("messaging").await.1, "Refreshed");
    let reasons = w.event_reasons().await;
    assert!(reasons.contains(&"Rejected".to_string()), "{reasons:?}");
    assert!(reasons.contains(&"Recovered".to_string()), "{reasons:?}");
}

#[tokio::test]
async fn outage_backs_off_before_expiry_and_then_reports_expired() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 60);
    w.reconcile("messaging").await.unwrap();

    w.clock.advance(Duration::from_secs(45));
    w.api.fail(RefreshError::Unavailable {
        status: 503,
        retry_after: None,
    });
    w.reconcile("messaging").await.unwrap();
    let status = w.token("messaging").await.status.unwrap();
    assert_eq!(w.ready("messaging").await.1, "Unavailable");
    let expires = status.expires_at.unwrap().0;
    assert!(
        status.next_refresh_at.unwrap().0 < expires,
        "retry before expiry"
    );

    w.clock.advance(Duration::from_secs(30));
    w.api.fail(RefreshError::Timeout(Duration::from_secs(10)));
    w.reconcile("messaging").await.unwrap();
    assert_eq!(
        w.ready("messaging").await,
        ("False".into(), "Expired".into())
    );
}

#[tokio::test]
async fn a_refresh_request_annotation_is_honoured_once() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();

    w.request_refresh("messaging", "2027-01-01T00:00:00Z").await;
    w.api.issue("token-2", 3600);
    w.reconcile("messaging").await.unwrap();
    w.reconcile("messaging").await.unwrap();
    assert_eq!(w.api.calls().len(), 2, "exactly one extra refresh");
    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-2")
    );
}

#[tokio::test]
async fn delete_policy_sets_an_owner_reference_and_spec_keys_are_used() {
    let w = World::new().await;
    w.create("messaging", |s| {
        s.target.name = Some("scg-token".into());
        s.target.token_key = "token".into();
        s.target.expiry_key = Some("expiresAt".into());
        s.target.deletion_policy = DeletionPolicy::Delete;
        s.target.labels.insert("team".into(), "messaging".into());
    })
    .await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();

    let s = w.secrets().get("scg-token").await.unwrap();
    let data = s.data.clone().unwrap();
    assert_eq!(data["token"].0, b"token-1");
    let expiry = String::from_utf8(data["expiresAt"].0.clone()).unwrap();
    assert!(expiry.parse::<Timestamp>().is_ok(), "{expiry}");
    assert_eq!(s.labels()["team"], "messaging");
    let owner = &s.metadata.owner_references.unwrap()[0];
    assert_eq!(owner.kind, "ScgToken");
    assert_eq!(
        Some(&owner.uid),
        w.token("messaging").await.metadata.uid.as_ref()
    );
}

/// Every log line of this test binary, through one global subscriber. A scoped one
/// (`set_default`) can miss a line when a test on another thread registers the same
/// call site at the same moment, and a missed line would let a leak pass unseen.
fn all_logs() -> &'static LogBuffer {
    static LOGS: std::sync::OnceLock<LogBuffer> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = LogBuffer::default();
        let writer = logs.clone();
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(move || writer.clone())
                .finish(),
        )
        .expect("the only global subscriber of this binary");
        logs
    })
}

#[tokio::test]
async fn no_secret_reaches_logs_status_events_or_errors() {
    let logs = all_logs();
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.fail(RefreshError::Rejected { status: 403 });
    w.reconcile("messaging").await.unwrap();
    w.put_credentials("planted-seed-2-44ad").await;
    w.api.issue("planted-issued-token-77c1", 60);
    w.reconcile("messaging").await.unwrap();
    w.server.faults().fail_next("update", "secrets", 100, 500);
    w.clock.advance(Duration::from_secs(59));
    w.api.issue("planted-issued-token-88d2", 60);
    let err = w.reconcile("messaging").await.unwrap_err();

    let status = serde_json::to_string(&w.token("messaging").await.status).unwrap();
    let events: Api<Event> = Api::namespaced(w.client.clone(), NS);
    let events =
        serde_json::to_string(&events.list(&ListParams::default()).await.unwrap()).unwrap();
    let planted = [
        KEY,
        SECRET,
        SEED,
        "planted-seed-2-44ad",
        "planted-issued-token-77c1",
        "planted-issued-token-88d2",
    ];
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("refresh failed"), "logs were captured");
    for text in [&status, &events, &err, &logs] {
        for p in planted {
            assert!(!text.contains(p), "{p} leaked into {text}");
        }
    }
    assert!(
        events.contains("Rejected") && events.contains("Pending"),
        "{events}"
    );
}

#[tokio::test]
async fn two_scgtokens_on_one_credentials_secret_do_not_both_refresh() {
    let w = World::new().await;
    w.create("first", |_| {}).await;
    w.create("second", |s| s.target.name = Some("second-token".into()))
        .await;
    let (store, mut writer) = token_cache();
    for name in ["first", "second"] {
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(CachedScgToken::from(
            &w.token(name).await,
        )));
    }
    let w = World {
        ctx: context_with_cache(&w.client, &w.api, &w.clock, store),
        ..w
    };
    w.api.issue("token-1", 3600);

    w.reconcile("second").await.unwrap();
    w.reconcile("first").await.unwrap();

    assert_eq!(
        w.api.calls(),
        vec![SEED.to_string()],
        "only the oldest refreshes"
    );
    assert_eq!(w.ready("first").await, ("True".into(), "Refreshed".into()));
    assert_eq!(
        w.ready("second").await,
        ("False".into(), "InvalidSpec".into())
    );
    let msg = w
        .token("second")
        .await
        .ready_condition()
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("\"first\""), "{msg}");
}

#[tokio::test]
async fn a_stale_cached_object_does_not_repeat_a_refresh() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();
    w.request_refresh("messaging", "now").await;
    // What a watch cache may still hold after the next pass wrote status.
    let stale = Arc::new(w.token("messaging").await);
    w.api.issue("token-2", 3600);
    w.reconcile("messaging").await.unwrap();

    w.api.issue("token-3", 3600);
    reconcile(stale, w.ctx.clone()).await.unwrap();
    assert_eq!(w.api.calls().len(), 2, "the request was honoured once");
    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-2")
    );
}

#[tokio::test]
async fn a_token_held_in_memory_is_stored_even_after_the_spec_changes() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    w.server.faults().fail_next("create", "secrets", 100, 500);
    assert!(w.reconcile("messaging").await.is_err());

    let suspend = serde_json::json!({"spec": {"suspend": true}});
    w.tokens()
        .patch(
            "messaging",
            &PatchParams::default(),
            &Patch::Merge(&suspend),
        )
        .await
        .unwrap();
    w.server.faults().fail_next("create", "secrets", 0, 500);
    w.reconcile("messaging").await.unwrap();

    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-1")
    );
    assert_eq!(w.ready("messaging").await.1, "Suspended");
    assert_eq!(w.api.calls().len(), 1);
}

#[tokio::test]
async fn storing_a_held_token_after_a_failure_streak_reports_refreshed() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.fail(RefreshError::Unavailable {
        status: 503,
        retry_after: None,
    });
    w.reconcile("messaging").await.unwrap();
    assert_eq!(w.ready("messaging").await.1, "Unavailable");

    w.clock.advance(Duration::from_secs(5));
    w.api.issue("token-1", 3600);
    w.server.faults().fail_next("create", "secrets", 100, 500);
    assert!(w.reconcile("messaging").await.is_err());
    assert_eq!(w.ready("messaging").await.1, "Pending");

    w.server.faults().fail_next("create", "secrets", 0, 500);
    w.reconcile("messaging").await.unwrap();
    assert_eq!(
        w.ready("messaging").await,
        ("True".into(), "Refreshed".into())
    );
    let status = w.token("messaging").await.status.unwrap();
    assert_eq!(status.consecutive_failures, 0);
    assert_eq!(w.api.calls().len(), 2);
}

#[tokio::test]
async fn an_older_token_never_overwrites_a_newer_one() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();
    let owner = w.token("messaging").await;
    let stale_read = w.secrets().get("messaging").await.unwrap();

    w.clock.advance(Duration::from_secs(3000));
    w.api.issue("token-2", 3600);
    w.reconcile("messaging").await.unwrap();

    // A late writer holding a token issued before token-2, with an old resourceVersion.
    let older = chain::Chain {
        token: SecretString::new("token-late"),
        times: scg_token_operator::policy::TokenTimes {
            issued_at: Some(w.clock.now() - SignedDuration::from_secs(10)),
            expires_at: Some(w.clock.now() + SignedDuration::from_secs(60)),
        },
        seed_fingerprint: chain::fingerprint(&owner, SEED),
    };
    let result = chain::persist(&w.secrets(), &owner, Some(&stale_read), &older).await;
    assert!(
        matches!(result, Err(chain::PersistError::Superseded(_))),
        "{result:?}"
    );
    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-2")
    );
}

/// Queues a 503 without Retry-After (so the shared budget does not pause in real time).
fn unavailable(w: &World) {
    w.api.fail(RefreshError::Unavailable {
        status: 503,
        retry_after: None,
    });
}

#[tokio::test]
async fn an_outage_patches_status_on_the_turn_and_then_at_most_once_a_minute() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();
    w.request_refresh("messaging", "2027-01-01T00:00:00Z").await;
    let patches = || {
        w.server
            .counters()
            .get("patch", "scgtoken.io/scgtokens/status")
    };
    let before = patches();

    // The first failure turns Ready to Unavailable: written at once.
    unavailable(&w);
    w.reconcile("messaging").await.unwrap();
    assert_eq!(w.ready("messaging").await.1, "Unavailable");
    assert_eq!(patches(), before + 1);

    // A pass every second for three minutes, every attempt failing (an empty script
    // answers 599).
    let mut calls_at = vec![0];
    for second in 1..=180 {
        w.clock.advance(Duration::from_secs(1));
        let calls = w.api.calls().len();
        w.reconcile("messaging").await.unwrap();
        if w.api.calls().len() > calls {
            calls_at.push(second);
        }
        if second == 59 {
            assert_eq!(patches(), before + 1, "no patch while only the count moves");
        }
    }
    // The back-off lives in memory: attempts spread out although status, written once,
    // still shows the first attempt's retry.
    let gaps: Vec<i64> = calls_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 5, "attempts were made: {calls_at:?}");
    assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "back-off: {gaps:?}");
    assert!(*gaps.last().unwrap() >= 16, "back-off grew: {gaps:?}");
    // One patch for the turn, then at most one per failing minute, with the true count.
    let written = patches() - before;
    assert!(
        (2..=4).contains(&written),
        "{written} status patches in 3 minutes"
    );
    let status = w.token("messaging").await.status.unwrap();
    assert!(status.consecutive_failures > 1, "{status:?}");
    assert_eq!(w.ready("messaging").await.1, "Unavailable");

    // The recovery is a transition: written at once, and announced once.
    let patched = patches();
    w.clock.advance(Duration::from_secs(600));
    w.api.issue("token-2", 3600);
    w.reconcile("messaging").await.unwrap();
    assert_eq!(patches(), patched + 1);
    assert_eq!(w.ready("messaging").await.1, "Refreshed");
    assert_eq!(
        w.token("messaging")
            .await
            .status
            .unwrap()
            .consecutive_failures,
        0
    );
    let reasons = w.event_reasons().await;
    assert_eq!(
        reasons.iter().filter(|r| *r == "Unavailable").count(),
        1,
        "one Warning for the streak: {reasons:?}"
    );
    assert!(reasons.contains(&"Recovered".to_string()), "{reasons:?}");
}

#[tokio::test]
async fn a_new_process_resumes_a_back_off_no_sooner_than_the_last_one_would_have() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();
    w.request_refresh("messaging", "2027-01-01T00:00:00Z").await;
    // Three failures 5 s apart: status holds the first (the turn to Unavailable), memory
    // all three.
    let start = w.clock.now();
    for i in 0..3 {
        if i > 0 {
            w.clock.advance(Duration::from_secs(5));
        }
        unavailable(&w);
        w.reconcile("messaging").await.unwrap();
    }
    let token = w.token("messaging").await;
    let status = token.status.clone().unwrap();
    assert_eq!(status.consecutive_failures, 1, "only the turn was written");
    assert_eq!(w.api.calls().len(), 4);
    // When this process would call next: after the third failure, 10 s in.
    let would_have = policy::retry_at(
        start + SignedDuration::from_secs(10),
        policy::FailureKind::Unavailable { retry_after: None },
        3,
        status.expires_at.map(|t| t.0),
        policy::jitter_key(&token.metadata.uid.clone().unwrap_or_default()),
    );

    // A new process (nothing in memory) at once, 10 s in: the written retry (at most 1 s
    // in) has passed, but status does not show the two failures since, so it does not
    // call before the last process would have. Nor does it wait out the minute in which
    // failures may go unwritten: it started 10 s in, and the last process made none later.
    let restarted = context(&w.client, &w.api, &w.clock);
    let pass = || async {
        let obj = w.tokens().get("messaging").await.unwrap();
        reconcile(Arc::new(obj), restarted.clone()).await.unwrap();
    };
    let mut first_call = None;
    for _ in 0..600 {
        pass().await;
        if w.api.calls().len() > 4 {
            first_call = Some(w.clock.now());
            break;
        }
        w.clock.advance(Duration::from_secs(1));
    }
    let first_call = first_call.expect("the new process retries within 10 minutes");
    let after = |t: Timestamp| t.duration_since(start).as_secs_f64();
    assert!(
        first_call >= would_have,
        "retried {} s after the streak began, before the last process would have ({} s)",
        after(first_call),
        after(would_have)
    );
    assert!(
        first_call < start + SignedDuration::from_secs(60),
        "retried {} s after the streak began: a minute's wait for nothing",
        after(first_call)
    );
}

#[tokio::test]
async fn a_recreated_scgtoken_takes_over_a_retained_target_only_when_it_adopts_it() {
    let w = World::new().await;
    w.create("messaging", |_| {}).await;
    w.api.issue("token-1", 3600);
    w.reconcile("messaging").await.unwrap();
    let first = w.token("messaging").await;
    w.tokens()
        .delete("messaging", &DeleteParams::default())
        .await
        .unwrap();
    // The controller's pass for the deletion: the ScgToken is gone, memory forgets it.
    reconcile(Arc::new(first), w.ctx.clone()).await.unwrap();

    // Another object of the same name (a new uid) finds the retained target.
    w.create("messaging", |_| {}).await;
    w.reconcile("messaging").await.unwrap();
    assert_eq!(
        w.ready("messaging").await,
        ("False".into(), "TargetConflict".into())
    );
    assert_eq!(
        w.api.calls().len(),
        1,
        "no call for a target it does not own"
    );
    assert_eq!(
        w.target_token("messaging").await.as_deref(),
        Some("token-1")
    );

    // Its owner says it adopts the target: the chain goes on from the stored token (not
    // due yet), and the target is stamped with the new uid at once.
    w.adopt(serde_json::json!("true")).await;
    w.reconcile("messaging").await.unwrap();
    assert_eq!(w.ready("messaging").await.1, "Refreshed");
    assert_eq!(w.api.calls().len(), 1, "the stored token is not due");
    // The annotation has done its work: without it the target is still this one's.
    w.adopt(serde_json::Value::Null).await;
    w.reconcile("messaging").await.unwrap();
    assert_eq!(w.ready("messaging").await.1, "Refreshed");
    let target = w.secrets().get("messaging").await.unwrap();
    assert_eq!(
        target
            .annotations()
            .get(scg_token_operator::crd::OWNER_UID_ANNOTATION),
        w.token("messaging").await.metadata.uid.as_ref(),
        "the target now names the new object"
    );
}
