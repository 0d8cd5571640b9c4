//! A simulator of the Syniverse SCG token-refresh API, for tests and the demo.
//!
//! It serves, on `127.0.0.1`:
//! - `GET /apptoken-refresh` and `GET /v1/apptoken-refresh` with the query parameters
//!   `consumerkey`, `consumersecret`, `oldtoken` and `validity` (seconds). Success is
//!   `200 {"accessToken":"<new>","validityTime":<secs>}`.
//! - `/scg-external-api/api/v1/messaging/message_requests` (any method), a protected
//!   endpoint that answers 200 only to `Authorization: Bearer <currently valid token>`.
//!
//! It behaves the way the reference assumes the worst case: only the application's
//! *current* token is accepted as `oldtoken`; an expired current token cannot be
//! refreshed; a successful refresh revokes the old token at once (unless
//! [`SimConfig::grace`] keeps it usable on the protected endpoint for a while); the
//! returned `validityTime` is `min(requested, SimConfig::validity_cap)`.
//!
//! Faults ([`Fault`]) can be injected at run time, for the next N refresh calls or until
//! cleared. A fault that answers never performs the refresh, so it neither consumes
//! nor revokes a token.
//!
//! Every refresh call is logged ([`ScgSimulator::refresh_log`]), and every presentation of
//! a revoked or expired token, on either endpoint, is recorded
//! ([`ScgSimulator::revoked_uses`]). Tests wait for progress with
//! [`ScgSimulator::wait_refreshes`] instead of sleeping.
//!
//! With [`SimConfig::tls`] it serves HTTPS instead, with a certificate from a CA made
//! at start ([`ScgSimulator::ca_pem`]) that nothing trusts unless told to.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Extension, Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::tls::TestCa;

/// Path of the refresh call.
pub const REFRESH_PATH: &str = "/apptoken-refresh";
/// The other refresh path seen in Syniverse's articles.
pub const REFRESH_PATH_V1: &str = "/v1/apptoken-refresh";
/// Path of the protected endpoint (an SCG API that needs a valid bearer token).
pub const PROTECTED_PATH: &str = "/scg-external-api/api/v1/messaging/message_requests";

/// Settings fixed at start.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Address to bind: 127.0.0.1 by default; the node tests bind the node's address,
    /// which pods reach (the TLS certificate then names it too).
    pub host: IpAddr,
    /// Port to bind on `host`; 0 picks a free one.
    pub port: u16,
    /// Upper bound of the returned `validityTime` (whole seconds, at least 1). Tests set a
    /// few seconds so that tokens are short-lived although clients ask for more.
    pub validity_cap: Duration,
    /// How long a token stays usable on the protected endpoint after a refresh replaced
    /// it. Zero (the default) revokes it at once. It is never accepted again as `oldtoken`.
    pub grace: Duration,
    /// Validity of seed tokens from [`ScgSimulator::add_app`] and
    /// [`ScgSimulator::regenerate`]: their real expiry is unknown, so it is long.
    pub seed_validity: Duration,
    /// Serve HTTPS with a server certificate for `127.0.0.1` and `localhost`, signed by
    /// a CA generated at start.
    pub tls: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            validity_cap: Duration::from_secs(24 * 3600),
            grace: Duration::ZERO,
            seed_validity: Duration::from_secs(365 * 24 * 3600),
            tls: false,
        }
    }
}

/// A fault injected into refresh calls with [`ScgSimulator::set_fault`].
///
/// [`Fault::Delay`] only delays; it combines with one answering fault (the others). A
/// newly set answering fault replaces the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and body (JSON content type if the body is JSON, else
    /// plain text), e.g. 500 or 504.
    Status { status: u16, body: String },
    /// 429 with `Retry-After: <secs>`.
    TooManyRequests { retry_after_secs: u64 },
    /// Wait this long before handling the call. Without an answering fault the call is
    /// then handled normally, and that happens even if the client gave up waiting: the
    /// token is rotated although nobody received the new one.
    Delay(Duration),
    /// 200 with a body that is not valid JSON.
    MalformedJson,
    /// 502 with an HTML page, as a proxy or gateway sends.
    HtmlBadGateway,
    /// Close the TCP connection without sending any HTTP response.
    DropConnection,
    /// 503 for every refresh call; set it with `times: None` and end it with
    /// [`ScgSimulator::clear_faults`].
    Outage,
}

/// Which endpoint a token was presented to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The refresh call (as `oldtoken`).
    Refresh,
    /// The protected endpoint (as a bearer token).
    Protected,
}

/// Why a token the simulator issued is no longer accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Replaced by a refresh or a re-generate (and past any grace period).
    Revoked,
    /// Its validity ran out.
    Expired,
}

/// A presentation of a token that the simulator issued but that was revoked or expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedUse {
    pub at: SystemTime,
    pub token: String,
    pub endpoint: Endpoint,
    pub reason: DeadReason,
}

/// How a refresh call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200: `new_token` was issued and the old one revoked.
    Refreshed {
        new_token: String,
        validity_secs: u64,
    },
    /// 400: a parameter is missing or malformed.
    BadRequest,
    /// 401: unknown consumer key or wrong secret.
    BadCredentials,
    /// 401: `oldtoken` is not this application's current, unexpired token. `reason` is
    /// `None` for a token the simulator never issued to this application's chain.
    RejectedToken { reason: Option<DeadReason> },
    /// An injected fault answered (or dropped the connection); nothing changed.
    Fault(Fault),
}

/// One refresh call, as logged.
#[derive(Debug, Clone)]
pub struct RefreshCall {
    pub at: SystemTime,
    /// Request path, `/apptoken-refresh` or `/v1/apptoken-refresh`.
    pub path: String,
    pub consumer_key: Option<String>,
    /// The `oldtoken` presented.
    pub old_token: Option<String>,
    /// The `validity` requested, as sent.
    pub requested_validity: Option<String>,
    /// Request headers (names lower-case), e.g. to check that extra headers are sent.
    pub headers: Vec<(String, String)>,
    pub outcome: Outcome,
}

impl RefreshCall {
    /// The token issued by this call, if it succeeded.
    pub fn issued(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Refreshed { new_token, .. } => Some(new_token),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    calls: usize,
    successes: usize,
}

#[derive(Debug)]
struct TokenInfo {
    app: String,
    expires_at: Instant,
    /// Set when replaced; the token still works on the protected endpoint until then.
    usable_until: Option<Instant>,
}

impl TokenInfo {
    /// `None` if the token is alive now, else why not.
    fn dead_reason(&self, now: Instant) -> Option<DeadReason> {
        match self.usable_until {
            Some(until) if now >= until => Some(DeadReason::Revoked),
            _ if now >= self.expires_at => Some(DeadReason::Expired),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct App {
    secret: String,
    current: String,
}

#[derive(Debug, Default)]
struct Faults {
    delay: Option<(Duration, Option<u32>)>,
    answer: Option<(Fault, Option<u32>)>,
}

/// Uses one of a fault's remaining turns; returns it if it applies to this call.
fn take<T: Clone>(slot: &mut Option<(T, Option<u32>)>) -> Option<T> {
    let (fault, times) = slot.as_mut()?;
    let fault = fault.clone();
    match times {
        None => {}
        Some(0) => {
            *slot = None;
            return None;
        }
        Some(n) => {
            *n -= 1;
            if *n == 0 {
                *slot = None;
            }
        }
    }
    Some(fault)
}

#[derive(Debug, Default)]
struct SimState {
    apps: HashMap<String, App>,
    tokens: HashMap<String, TokenInfo>,
    /// Every token ever issued, in order.
    issued: Vec<String>,
    log: Vec<RefreshCall>,
    revoked_uses: Vec<RevokedUse>,
    faults: Faults,
    /// Refresh calls being handled now, per consumer key, and the most ever seen for
    /// one key: a single-flight check (one chain, one call at a time).
    in_flight: HashMap<String, usize>,
    max_in_flight: usize,
}

impl SimState {
    fn issue(&mut self, app: &str, validity: Duration) -> String {
        let token = random_token();
        self.tokens.insert(
            token.clone(),
            TokenInfo {
                app: app.to_owned(),
                expires_at: Instant::now() + validity,
                usable_until: None,
            },
        );
        self.issued.push(token.clone());
        token
    }

    /// Marks `token` replaced: dead now, or after `grace` (never beyond its expiry).
    fn revoke(&mut self, token: &str, grace: Duration) {
        if let Some(info) = self.tokens.get_mut(token) {
            let until = (Instant::now() + grace).min(info.expires_at);
            info.usable_until = Some(info.usable_until.map_or(until, |u| u.min(until)));
        }
    }

    fn record_dead_use(&mut self, token: &str, endpoint: Endpoint, reason: DeadReason) {
        self.revoked_uses.push(RevokedUse {
            at: SystemTime::now(),
            token: token.to_owned(),
            endpoint,
            reason,
        });
    }
}

struct Shared {
    config: SimConfig,
    state: Mutex<SimState>,
    counts: watch::Sender<Counts>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panicking test thread must not hide the log from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handed to each request so a handler can close its connection without answering.
#[derive(Clone)]
struct ConnKill(mpsc::Sender<()>);

/// A running simulator. Dropping it stops the server and closes its connections.
pub struct ScgSimulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca: Option<TestCa>,
    server: JoinHandle<()>,
}

impl Drop for ScgSimulator {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.server.abort();
    }
}

impl std::fmt::Debug for ScgSimulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScgSimulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ScgSimulator {
    /// Binds `127.0.0.1:<config.port>` and starts serving.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        let ca = if config.tls {
            let extra = match config.host {
                IpAddr::V4(ip) if ip.is_loopback() => vec![],
                host => vec![host.to_string()],
            };
            Some(TestCa::generate_for(&extra).map_err(std::io::Error::other)?)
        } else {
            None
        };
        let listener = TcpListener::bind((config.host, config.port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(SimState::default()),
            counts: watch::Sender::new(Counts::default()),
        });
        let router = Router::new()
            .route(REFRESH_PATH, get(refresh))
            .route(REFRESH_PATH_V1, get(refresh))
            .route(PROTECTED_PATH, any(protected))
            .with_state(shared.clone());
        let acceptor = ca.as_ref().map(TestCa::acceptor);
        let server = tokio::spawn(accept_loop(listener, router, acceptor));
        Ok(Self {
            shared,
            addr,
            ca,
            server,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://` with [`SimConfig::tls`].
    pub fn base_url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// `http(s)://127.0.0.1:PORT/apptoken-refresh`
    pub fn refresh_url(&self) -> String {
        format!("{}{REFRESH_PATH}", self.base_url())
    }

    /// `http(s)://127.0.0.1:PORT/v1/apptoken-refresh`
    pub fn refresh_url_v1(&self) -> String {
        format!("{}{REFRESH_PATH_V1}", self.base_url())
    }

    /// URL of the protected endpoint.
    pub fn protected_url(&self) -> String {
        format!("{}{PROTECTED_PATH}", self.base_url())
    }

    /// The PEM certificate of the CA that signed the server certificate, with
    /// [`SimConfig::tls`].
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_ref().map(TestCa::ca_pem)
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// Registers an application and returns its seed token (valid for
    /// [`SimConfig::seed_validity`]). Registering a key again replaces its secret and
    /// works like [`ScgSimulator::regenerate`].
    pub fn add_app(&self, consumer_key: &str, consumer_secret: &str) -> String {
        let mut st = self.shared.lock();
        let seed = st.issue(consumer_key, self.shared.config.seed_validity);
        let old = st.apps.insert(
            consumer_key.to_owned(),
            App {
                secret: consumer_secret.to_owned(),
                current: seed.clone(),
            },
        );
        if let Some(old) = old {
            st.revoke(&old.current, Duration::ZERO);
        }
        seed
    }

    /// Like the SDC UI's *Re-Generate*: issues a new seed token and revokes the current one
    /// at once (no grace). Panics if the application is unknown.
    pub fn regenerate(&self, consumer_key: &str) -> String {
        let mut st = self.shared.lock();
        let seed = st.issue(consumer_key, self.shared.config.seed_validity);
        let app = st
            .apps
            .get_mut(consumer_key)
            .unwrap_or_else(|| panic!("regenerate: unknown consumer key {consumer_key:?}"));
        let old = std::mem::replace(&mut app.current, seed.clone());
        st.revoke(&old, Duration::ZERO);
        seed
    }

    /// The application's current token (possibly expired), if the application exists.
    pub fn current_token(&self, consumer_key: &str) -> Option<String> {
        self.shared
            .lock()
            .apps
            .get(consumer_key)
            .map(|a| a.current.clone())
    }

    /// Whether the protected endpoint accepts `token` now.
    pub fn is_valid(&self, token: &str) -> bool {
        let now = Instant::now();
        self.shared
            .lock()
            .tokens
            .get(token)
            .is_some_and(|t| t.dead_reason(now).is_none())
    }

    /// Time left before `token` expires (ignoring revocation), if it was issued here.
    pub fn remaining_validity(&self, token: &str) -> Option<Duration> {
        let now = Instant::now();
        self.shared
            .lock()
            .tokens
            .get(token)
            .map(|t| t.expires_at.saturating_duration_since(now))
    }

    /// Every token ever issued, seeds included, oldest first: scan logs, Events and
    /// metrics for these to find leaks.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().issued.clone()
    }

    /// Every presentation of a revoked or expired token, on either endpoint.
    pub fn revoked_uses(&self) -> Vec<RevokedUse> {
        self.shared.lock().revoked_uses.clone()
    }

    /// The most refresh calls ever handled at once for one consumer key (one chain).
    /// The operator's single-flight rule keeps it at 1.
    pub fn max_concurrent_refreshes(&self) -> usize {
        self.shared.lock().max_in_flight
    }

    /// Number of refresh calls received, whatever their outcome (faults included).
    pub fn refresh_calls(&self) -> usize {
        self.shared.counts.borrow().calls
    }

    /// Number of successful refreshes.
    pub fn successful_refreshes(&self) -> usize {
        self.shared.counts.borrow().successes
    }

    /// Every refresh call, oldest first.
    pub fn refresh_log(&self) -> Vec<RefreshCall> {
        self.shared.lock().log.clone()
    }

    /// Waits until at least `n` refreshes have succeeded; false on timeout.
    pub async fn wait_refreshes(&self, n: usize, timeout: Duration) -> bool {
        self.wait_counts(timeout, |c| c.successes >= n).await
    }

    /// Waits until at least `n` refresh calls (any outcome) were received; false on
    /// timeout.
    pub async fn wait_refresh_calls(&self, n: usize, timeout: Duration) -> bool {
        self.wait_counts(timeout, |c| c.calls >= n).await
    }

    async fn wait_counts(&self, timeout: Duration, done: impl FnMut(&Counts) -> bool) -> bool {
        let mut rx = self.shared.counts.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(done)).await,
            Ok(Ok(_))
        )
    }

    /// Injects `fault` into the next `times` refresh calls, or into all of them until
    /// [`ScgSimulator::clear_faults`] when `times` is `None`.
    pub fn set_fault(&self, fault: Fault, times: Option<u32>) {
        let mut st = self.shared.lock();
        match fault {
            Fault::Delay(d) => st.faults.delay = Some((d, times)),
            other => st.faults.answer = Some((other, times)),
        }
    }

    /// Removes every fault (this also ends an outage).
    pub fn clear_faults(&self) {
        self.shared.lock().faults = Faults::default();
    }
}

async fn accept_loop(listener: TcpListener, router: Router, tls: Option<TlsAcceptor>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let router = router.clone();
                match tls.clone() {
                    None => conns.spawn(serve_conn(stream, router)),
                    // The handshake runs in the connection's task, so a client that
                    // stalls or rejects the certificate holds up no one else.
                    Some(tls) => conns.spawn(async move {
                        if let Ok(stream) = tls.accept(stream).await {
                            serve_conn(stream, router).await;
                        }
                    }),
                };
            }
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn<S>(stream: S, router: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (kill_tx, mut kill_rx) = mpsc::channel(1);
    let service = TowerToHyperService::new(router.layer(Extension(ConnKill(kill_tx))));
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        // Dropping the connection future drops the socket: the client sees the
        // connection close with no response at all.
        _ = kill_rx.recv() => {}
    }
}

fn json_error(status: StatusCode, error: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": error, "message": message })),
    )
        .into_response()
}

async fn refresh(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnKill>,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let query = query.map(|q| q.0).unwrap_or_default();
    let (delay, fault) = {
        let mut st = shared.lock();
        (take(&mut st.faults.delay), take(&mut st.faults.answer))
    };
    let call = RefreshCall {
        at: SystemTime::now(),
        path: uri.path().to_owned(),
        consumer_key: query.get("consumerkey").cloned(),
        old_token: query.get("oldtoken").cloned(),
        requested_validity: query.get("validity").cloned(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect(),
        outcome: Outcome::BadRequest,
    };
    // Handled in its own task so that a delayed refresh completes even if the client
    // disconnects meanwhile (the server side of a client timeout).
    let key = call.consumer_key.clone().unwrap_or_default();
    let task = tokio::spawn(async move {
        let _flight = InFlight::enter(&shared, key);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        match fault {
            Some(fault) => answer_fault(&shared, call, fault, &kill).await,
            None => perform_refresh(&shared, call, &query),
        }
    });
    match task.await {
        Ok(resp) => resp,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// One refresh call in flight for a consumer key, counted while it lives.
struct InFlight {
    shared: Arc<Shared>,
    key: String,
}

impl InFlight {
    fn enter(shared: &Arc<Shared>, key: String) -> Self {
        let mut st = shared.lock();
        let n = st.in_flight.entry(key.clone()).or_default();
        *n += 1;
        let n = *n;
        st.max_in_flight = st.max_in_flight.max(n);
        drop(st);
        Self {
            shared: shared.clone(),
            key,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(n) = st.in_flight.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.in_flight.remove(&self.key);
            }
        }
    }
}

/// Appends to the log and bumps the counters (waking waiters).
fn finish(shared: &Shared, st: &mut SimState, mut call: RefreshCall, outcome: Outcome) {
    let success = matches!(outcome, Outcome::Refreshed { .. });
    call.outcome = outcome;
    st.log.push(call);
    shared.counts.send_modify(|c| {
        c.calls += 1;
        if success {
            c.successes += 1;
        }
    });
}

async fn answer_fault(
    shared: &Shared,
    call: RefreshCall,
    fault: Fault,
    kill: &ConnKill,
) -> Response {
    finish(
        shared,
        &mut shared.lock(),
        call,
        Outcome::Fault(fault.clone()),
    );
    match fault {
        Fault::Status { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let ctype = if serde_json::from_str::<serde_json::Value>(&body).is_ok() {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            (status, [(header::CONTENT_TYPE, ctype)], body).into_response()
        }
        Fault::TooManyRequests { retry_after_secs } => {
            let mut resp = json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            resp
        }
        Fault::MalformedJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"accessToken":"e6e9b18a-"#,
        )
            .into_response(),
        Fault::HtmlBadGateway => (
            StatusCode::BAD_GATEWAY,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<html><head><title>502 Bad Gateway</title></head>\
             <body><center><h1>502 Bad Gateway</h1></center><hr><center>gateway</center>\
             </body></html>\n",
        )
            .into_response(),
        Fault::Outage => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "the service is temporarily unavailable",
        ),
        Fault::DropConnection => {
            let _ = kill.0.send(()).await;
            // The connection task drops this handler together with the socket.
            std::future::pending().await
        }
        // Delays are kept in their own slot and never reach here.
        Fault::Delay(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn perform_refresh(shared: &Shared, call: RefreshCall, q: &HashMap<String, String>) -> Response {
    let mut st = shared.lock();
    let st = &mut *st;
    let params = (
        q.get("consumerkey"),
        q.get("consumersecret"),
        q.get("oldtoken"),
        q.get("validity").and_then(|v| v.trim().parse::<u64>().ok()),
    );
    let (Some(key), Some(secret), Some(old), Some(validity)) = params else {
        finish(shared, st, call, Outcome::BadRequest);
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "consumerkey, consumersecret, oldtoken and a numeric validity are required",
        );
    };
    let Some(app) = st.apps.get(key).filter(|a| a.secret == *secret) else {
        finish(shared, st, call, Outcome::BadCredentials);
        return json_error(
            StatusCode::UNAUTHORIZED,
            "invalid_consumer",
            "consumer key or secret is invalid",
        );
    };
    let now = Instant::now();
    let is_current = app.current == *old;
    let reason = match st.tokens.get(old.as_str()) {
        Some(t) if t.app == *key => match t.dead_reason(now) {
            // Still usable on the protected endpoint during a grace period, but replaced.
            None if !is_current => Some(DeadReason::Revoked),
            r => r,
        },
        _ => {
            finish(shared, st, call, Outcome::RejectedToken { reason: None });
            return json_error(StatusCode::UNAUTHORIZED, "invalid_token", "unknown token");
        }
    };
    if let Some(reason) = reason {
        st.record_dead_use(old, Endpoint::Refresh, reason);
        finish(
            shared,
            st,
            call,
            Outcome::RejectedToken {
                reason: Some(reason),
            },
        );
        return json_error(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "token is revoked or expired",
        );
    }
    let cap = shared.config.validity_cap.as_secs().max(1);
    let validity_secs = validity.clamp(1, cap);
    let new_token = st.issue(key, Duration::from_secs(validity_secs));
    st.revoke(old, shared.config.grace);
    if let Some(app) = st.apps.get_mut(key.as_str()) {
        app.current = new_token.clone();
    }
    finish(
        shared,
        st,
        call,
        Outcome::Refreshed {
            new_token: new_token.clone(),
            validity_secs,
        },
    );
    (
        StatusCode::OK,
        Json(serde_json::json!({ "accessToken": new_token, "validityTime": validity_secs })),
    )
        .into_response()
}

async fn protected(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "a bearer token is required",
        );
    };
    let mut st = shared.lock();
    let dead = st.tokens.get(token).map(|t| t.dead_reason(Instant::now()));
    match dead {
        Some(None) => (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "accepted" })),
        )
            .into_response(),
        Some(Some(reason)) => {
            st.record_dead_use(token, Endpoint::Protected, reason);
            json_error(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "token is revoked or expired",
            )
        }
        None => json_error(StatusCode::UNAUTHORIZED, "invalid_token", "unknown token"),
    }
}

/// A random, uuid-shaped token (version 4 layout).
fn random_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut words = [0u64; 2];
    for w in &mut words {
        // RandomState is seeded from the OS; hashing a counter and the clock with a fresh
        // one gives unpredictable, unique-enough bits for a simulator.
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        *w = h.finish();
    }
    let [a, b] = words;
    let mut s = String::with_capacity(36);
    let _ = write!(
        s,
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    );
    s
}
