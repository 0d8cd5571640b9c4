//! The shared refresh budget, as users meet it: many tokens due at once go at the
//! configured rate, earliest expiry first; a 429's `Retry-After` holds back the other
//! tokens of that endpoint only; a held token is stored without waiting; shutdown ends
//! every wait without a call.
//!
//! Reconciles run against the in-memory API server with a scripted token API. The
//! budget runs on a timer the test moves by hand, so every count below is exact at each
//! instant and nothing depends on how fast the machine is.

mod common {
    pub mod context;
}

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use jiff::SignedDuration;
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::controller::Action,
};
use prometheus_client::registry::Registry;
use scg_token_operator::{
    budget::{Budget, Rate, Timer, Turn},
    crd::{ScgToken, ScgTokenSpec},
    reconcile::{Context, reconcile},
    report::Metrics,
    scg::{Endpoint, RefreshError, RefreshRequest, Refreshed, SecretString, TokenApi},
};
use testkit::apiserver::ApiServer;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use common::context::{ManualClock, api_server, deps};

const NS: &str = "default";
const A: &str = "https://a.example/apptoken-refresh";
const B: &str = "https://b.example/apptoken-refresh";
/// Real time any one expected event may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(100);

/// A monotonic clock that moves only when the test says.
struct ManualTimer {
    base: Instant,
    offset: watch::Sender<Duration>,
}

impl ManualTimer {
    fn new() -> Arc<ManualTimer> {
        Arc::new(ManualTimer {
            base: Instant::now(),
            offset: watch::Sender::new(Duration::ZERO),
        })
    }
    fn advance(&self, d: Duration) {
        self.offset.send_modify(|o| *o += d);
    }
    fn elapsed(&self) -> Duration {
        *self.offset.borrow()
    }
}

impl Timer for ManualTimer {
    fn now(&self) -> Instant {
        self.base + self.elapsed()
    }
    fn sleep_until(&self, at: Instant) -> BoxFuture<'static, ()> {
        let mut rx = self.offset.subscribe();
        let base = self.base;
        Box::pin(async move {
            let _ = rx.wait_for(|o| base + *o >= at).await;
        })
    }
}

/// One refresh call as the token API saw it.
#[derive(Debug, Clone)]
struct Call {
    /// On the manual timer.
    at: Duration,
    old: String,
    endpoint: String,
}

/// Answers every refresh with `<old token>'`, valid for the lifetime set for its
/// chain (named by its seed); the next call to `rate_limited`'s endpoint gets its error
/// (a 429 or a 503 with `Retry-After`).
struct FakeApi {
    timer: Arc<ManualTimer>,
    lifetimes: Mutex<HashMap<String, u64>>,
    rate_limited: Mutex<Option<(Endpoint, RefreshError)>>,
    calls: Mutex<Vec<Call>>,
    count: watch::Sender<usize>,
}

impl FakeApi {
    fn new(timer: &Arc<ManualTimer>) -> Arc<FakeApi> {
        Arc::new(FakeApi {
            timer: timer.clone(),
            lifetimes: Mutex::default(),
            rate_limited: Mutex::default(),
            calls: Mutex::default(),
            count: watch::Sender::new(0),
        })
    }
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    /// Waits until at least `n` calls were made, then returns how many there are.
    async fn await_calls(&self, n: usize) -> usize {
        let mut rx = self.count.subscribe();
        let seen = tokio::time::timeout(PATIENCE, rx.wait_for(|c| *c >= n)).await;
        match seen {
            Ok(Ok(count)) => *count,
            _ => panic!("{n} refresh calls expected; got {:?}", self.calls()),
        }
    }
}

impl TokenApi for FakeApi {
    fn refresh<'a>(
        &'a self,
        req: &'a RefreshRequest<'a>,
    ) -> BoxFuture<'a, Result<Refreshed, RefreshError>> {
        let old = req.old_token.expose().to_string();
        self.calls.lock().unwrap().push(Call {
            at: self.timer.elapsed(),
            old: old.clone(),
            endpoint: format!("{:?}", req.endpoint),
        });
        let mut limited = self.rate_limited.lock().unwrap();
        let out = match limited.take() {
            Some((endpoint, error)) if endpoint == *req.endpoint => Err(error),
            other => {
                *limited = other;
                let seed = old.trim_end_matches('\'');
                let lifetime = self.lifetimes.lock().unwrap().get(seed).copied();
                Ok(Refreshed {
                    token: SecretString::new(format!("{old}'")),
                    lifetime: Duration::from_secs(lifetime.unwrap_or(3600)),
                })
            }
        };
        drop(limited);
        self.count.send_modify(|c| *c += 1);
        Box::pin(async move { out })
    }
}

struct World {
    server: ApiServer,
    client: kube::Client,
    timer: Arc<ManualTimer>,
    clock: Arc<ManualClock>,
    api: Arc<FakeApi>,
}

impl World {
    async fn new() -> World {
        let (server, client) = api_server().await;
        let timer = ManualTimer::new();
        World {
            server,
            client,
            api: FakeApi::new(&timer),
            timer,
            clock: ManualClock::new(),
        }
    }

    /// A new process's context whose refreshes share `rate` on the manual timer.
    fn context(&self, rate: Option<Rate>) -> Arc<Context> {
        let deps = deps(
            &self.client,
            self.api.clone(),
            self.clock.clone(),
            &mut Registry::default(),
        );
        let budget = Budget::new(rate, self.timer.clone(), &deps.metrics);
        Arc::new(Context::new(deps).with_budget(budget))
    }

    fn tokens(&self) -> Api<ScgToken> {
        Api::namespaced(self.client.clone(), NS)
    }
    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// An ScgToken `name` on `endpoint` with its own credentials and seed `seed-<name>`,
    /// whose chain gets tokens valid for `lifetime` seconds.
    async fn create(&self, name: &str, endpoint: &str, lifetime: u64) {
        let seed = format!("seed-{name}");
        self.api
            .lifetimes
            .lock()
            .unwrap()
            .insert(seed.clone(), lifetime);
        let creds = format!("creds-{name}");
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some(creds.clone()),
                ..Default::default()
            },
            string_data: Some(
                [
                    ("consumerKey", "planted-key"),
                    ("consumerSecret", "planted-secret"),
                    ("accessToken", seed.as_str()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        };
        scg_token_operator::access::opt_in(&mut secret.metadata);
        self.secrets()
            .create(&PostParams::default(), &secret)
            .await
            .expect("create credentials");
        let mut spec = ScgTokenSpec::new(&creds);
        spec.endpoint = endpoint.into();
        self.tokens()
            .create(&PostParams::default(), &ScgToken::new(name, spec))
            .await
            .expect("create ScgToken");
    }

    /// Starts one reconcile pass of `name`, as the controller would.
    async fn spawn(&self, ctx: &Arc<Context>, name: &str) -> JoinHandle<Result<Action, String>> {
        let obj = self.tokens().get(name).await.expect("get ScgToken");
        let ctx = ctx.clone();
        tokio::spawn(async move {
            reconcile(Arc::new(obj), ctx)
                .await
                .map_err(|e| e.to_string())
        })
    }

    async fn target_token(&self, name: &str) -> Option<String> {
        let s = self.secrets().get_opt(name).await.unwrap()?;
        let b = s.data?.get("accessToken")?.0.clone();
        Some(String::from_utf8(b).unwrap())
    }
}

/// Waits for a count only the budget's gauge shows (no event announces it), polling
/// briefly; bounded, so a bug fails the test instead of hanging it.
async fn until_waiting(metrics: &Metrics, n: i64) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while metrics.refreshes_waiting.get() != n {
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} refreshes waiting, see {}",
            metrics.refreshes_waiting.get()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The passes' results, each of which must end.
async fn join(handles: Vec<JoinHandle<Result<Action, String>>>) -> Vec<Result<Action, String>> {
    let mut out = Vec::new();
    for h in handles {
        let result = tokio::time::timeout(PATIENCE, h)
            .await
            .expect("a reconcile never finished")
            .expect("a reconcile panicked");
        out.push(result);
    }
    out
}

/// Like [`join`], for passes that must succeed.
async fn join_ok(handles: Vec<JoinHandle<Result<Action, String>>>) -> Vec<Action> {
    join(handles)
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("reconcile failed: {e}")))
        .collect()
}

#[tokio::test]
async fn fifty_due_tokens_go_at_the_rate_earliest_expiry_first() {
    let w = World::new().await;
    // Lifetimes 600..796 s, in an order unrelated to creation.
    let lifetime = |i: u64| 600 + 4 * ((i * 17) % 50);
    let names: Vec<String> = (0..50).map(|i| format!("t{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        w.create(name, A, lifetime(i as u64)).await;
    }
    // Every chain gets its first token at the same instant (no rate limit).
    let setup = w.context(None);
    for name in &names {
        join_ok(vec![w.spawn(&setup, name).await]).await;
    }
    assert_eq!(w.api.await_calls(50).await, 50);

    // 540 s later all are due (at two thirds of their lifetimes) and none has expired.
    w.clock.advance(Duration::from_secs(540));
    let ctx = w.context(Rate::new(10.0, 5).unwrap());
    let mut handles = Vec::new();
    for name in &names {
        handles.push(w.spawn(&ctx, name).await);
    }
    // The burst goes at once; the other 45 wait.
    assert_eq!(w.api.await_calls(55).await, 55);
    until_waiting(&ctx.metrics, 45).await;
    for step in 1..=45 {
        w.timer.advance(TICK);
        let want = 55 + step;
        assert_eq!(w.api.await_calls(want).await, want, "one call per 100 ms");
        let waiting = 100 - want as i64;
        assert_eq!(ctx.metrics.refreshes_waiting.get(), waiting);
    }
    join_ok(handles).await;

    let calls = &w.api.calls()[50..];
    assert_eq!(calls.len(), 50);
    let expiry = |c: &Call| {
        let i: u64 = c.old["seed-t".len()..c.old.len() - 1].parse().unwrap();
        lifetime(i)
    };
    assert!(calls.iter().take(5).all(|c| c.at.is_zero()));
    for (k, c) in calls.iter().enumerate().skip(5) {
        assert_eq!(c.at, TICK * (k as u32 - 4), "call {k} at its slot");
    }
    let waited: Vec<u64> = calls[5..].iter().map(expiry).collect();
    let mut sorted = waited.clone();
    sorted.sort();
    assert_eq!(waited, sorted, "the tokens that expire first go first");
    // Never more than the burst plus the rate in any window.
    for (i, c) in calls.iter().enumerate() {
        for window in [Duration::ZERO, TICK, TICK * 10, TICK * 30] {
            let n = calls[i..].iter().filter(|d| d.at <= c.at + window).count();
            let allowed = 5 + window.as_millis() / 100;
            assert!(n as u128 <= allowed, "{n} calls within {window:?}");
        }
    }
    for name in &names {
        assert_eq!(
            w.target_token(name).await,
            Some(format!("seed-{name}''")),
            "{name} stored its new token"
        );
    }
    assert_eq!(ctx.metrics.budget_waits.get(), 45);
}

#[tokio::test]
async fn a_429_holds_back_its_endpoint_and_not_the_others() {
    retry_after_holds_back_its_endpoint(RefreshError::RateLimited {
        retry_after: Some(Duration::from_secs(30)),
    })
    .await;
}

#[tokio::test]
async fn a_503_with_retry_after_holds_back_its_endpoint_and_not_the_others() {
    retry_after_holds_back_its_endpoint(RefreshError::Unavailable {
        status: 503,
        retry_after: Some(Duration::from_secs(30)),
    })
    .await;
}

/// `error` (with a Retry-After of 30 s) on the first call through endpoint A holds back
/// A's other refreshes for 30 s, and B's not at all.
async fn retry_after_holds_back_its_endpoint(error: RefreshError) {
    let w = World::new().await;
    let a: Vec<String> = (0..5).map(|i| format!("a{i}")).collect();
    let b: Vec<String> = (0..5).map(|i| format!("b{i}")).collect();
    for name in &a {
        w.create(name, A, 3600).await;
    }
    for name in &b {
        w.create(name, B, 3600).await;
    }
    let ctx = w.context(Rate::new(10.0, 1).unwrap());
    let endpoint_a = Endpoint::parse(A, false).unwrap();
    *w.api.rate_limited.lock().unwrap() = Some((endpoint_a, error));

    // a0 goes first and is told to come back in 30 s.
    join_ok(vec![w.spawn(&ctx, "a0").await]).await;
    assert_eq!(ctx.metrics.budget_pauses.get(), 1);
    let mut handles = Vec::new();
    for name in a[1..].iter().chain(&b) {
        handles.push(w.spawn(&ctx, name).await);
    }
    until_waiting(&ctx.metrics, 9).await;

    // The rate lets one call go every 100 ms: b's go; a's wait out the Retry-After.
    let expected = |ms: u64| {
        let b_calls = (ms / 100).min(5);
        let a_calls = if ms >= 30_000 {
            ((ms - 30_000) / 100 + 1).min(4)
        } else {
            0
        };
        (1 + b_calls + a_calls) as usize
    };
    for step in 1..=305u64 {
        w.timer.advance(TICK);
        let want = expected(step * 100);
        assert_eq!(w.api.await_calls(want).await, want);
        assert_eq!(ctx.metrics.refreshes_waiting.get(), 10 - want as i64);
    }
    join_ok(handles).await;

    let calls = w.api.calls();
    assert_eq!(calls.len(), 10);
    let on_a = |c: &&Call| c.endpoint.starts_with("https://a.example");
    let b_times: Vec<u128> = calls
        .iter()
        .filter(|c| !on_a(c))
        .map(|c| c.at.as_millis())
        .collect();
    assert_eq!(b_times, [100, 200, 300, 400, 500], "b was not held back");
    let a_times: Vec<u128> = calls
        .iter()
        .filter(on_a)
        .map(|c| c.at.as_millis())
        .collect();
    assert_eq!(
        a_times,
        [0, 30_000, 30_100, 30_200, 30_300],
        "a waited 30 s"
    );
    for name in a[1..].iter().chain(&b) {
        assert_eq!(w.target_token(name).await, Some(format!("seed-{name}'")));
    }
    assert_eq!(w.target_token("a0").await, None, "a0 got only the 429");
}

#[tokio::test]
async fn a_held_token_is_stored_without_waiting_and_shutdown_ends_the_wait() {
    let w = World::new().await;
    w.create("held", A, 3600).await;
    w.create("other", A, 3600).await;
    // One call per 1000 s: the first refresh uses the only slot for a long time.
    let ctx = w.context(Rate::new(0.001, 1).unwrap());
    let faults = w.server.faults();
    faults.fail_next("create", "secrets", 100, 500);
    let first = join(vec![w.spawn(&ctx, "held").await]).await;
    assert!(
        first[0].is_err(),
        "the pass fails while its token is not stored"
    );
    faults.fail_next("create", "secrets", 0, 500);
    assert_eq!(w.target_token("held").await, None);

    // The held token is due again: its pass stores it first, then waits for a turn.
    w.clock.advance(Duration::from_secs(3000));
    let held = w.spawn(&ctx, "held").await;
    let other = w.spawn(&ctx, "other").await;
    until_waiting(&ctx.metrics, 2).await;
    assert_eq!(w.target_token("held").await, Some("seed-held'".into()));

    ctx.budget.close();
    let actions = join_ok(vec![held, other]).await;
    assert_eq!(actions, [Action::await_change(), Action::await_change()]);
    assert_eq!(w.api.calls().len(), 1, "no call after shutdown began");
    assert_eq!(ctx.metrics.refreshes_waiting.get(), 0);
    let later = join_ok(vec![w.spawn(&ctx, "other").await]).await;
    assert_eq!(later, [Action::await_change()]);
    assert_eq!(w.api.calls().len(), 1);
    assert_eq!(w.target_token("other").await, None);
}

#[tokio::test]
async fn a_token_suspended_while_waiting_is_not_refreshed() {
    let w = World::new().await;
    w.create("first", A, 3600).await;
    w.create("second", A, 3600).await;
    let ctx = w.context(Rate::new(1.0, 1).unwrap());
    join_ok(vec![w.spawn(&ctx, "first").await]).await;
    let second = w.spawn(&ctx, "second").await;
    until_waiting(&ctx.metrics, 1).await;

    let suspend = serde_json::json!({"spec": {"suspend": true}});
    w.tokens()
        .patch("second", &PatchParams::default(), &Patch::Merge(&suspend))
        .await
        .expect("suspend");
    w.timer.advance(Duration::from_secs(1));
    let action = join_ok(vec![second]).await.remove(0);

    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(1)),
        "looks again"
    );
    assert_eq!(w.api.calls().len(), 1, "no call for the suspended token");
    assert_eq!(w.target_token("second").await, None);
}

#[tokio::test]
async fn a_dropped_wait_takes_no_turn() {
    let timer = ManualTimer::new();
    let metrics = Metrics::register(&mut Registry::default());
    let budget = Budget::new(Rate::new(1.0, 1).unwrap(), timer.clone(), &metrics);
    let a = Endpoint::parse(A, false).unwrap();
    let soon = Some(SignedDuration::from_secs(60));
    assert_eq!(budget.turn(&a, soon).await, Turn::Now);
    let spawn = |expires: i64| {
        let (budget, a) = (budget.clone(), a.clone());
        tokio::spawn(async move {
            let expires = Some(SignedDuration::from_secs(expires));
            budget.turn(&a, expires).await
        })
    };
    // The one that expires first would go first, but it is dropped.
    let dropped = spawn(100);
    let kept = spawn(200);
    until_waiting(&metrics, 2).await;
    dropped.abort();
    assert!(dropped.await.unwrap_err().is_cancelled());
    assert_eq!(metrics.refreshes_waiting.get(), 1);
    timer.advance(Duration::from_secs(1));
    let turn = tokio::time::timeout(PATIENCE, kept).await.unwrap().unwrap();
    assert_eq!(turn, Turn::Waited, "the slot went to the one still waiting");
    assert_eq!(metrics.refreshes_waiting.get(), 0);
    assert_eq!(metrics.budget_waits.get(), 2);
}
