//! A catalogue of bad input, one row per case: a spec the CEL rules (or the runtime
//! checks) refuse, a broken credentials, headers or target Secret, a malformed answer of
//! the SCG API. Each row names the `Ready` reason and a fragment of the message a user
//! must see, and every row also checks what must hold whatever the input:
//!
//! - no panic, and every pass returns;
//! - a Warning Event and a log line with that reason (for the rows that are not fine);
//! - a good ScgToken next to the bad one keeps being refreshed;
//! - no credential or token reaches a condition, an Event, a log line, an error or a
//!   metric.
//!
//! Runs `reconcile()` against the in-memory API server with a hand-moved clock, as
//! tests/reconcile.rs does. The good ScgToken (and the rows that are about Kubernetes
//! input) talk to a scripted token API; the rows about SCG answers go through the real
//! `HttpTokenApi` to a raw HTTP server on 127.0.0.1 that writes each answer byte by byte.
//! The in-memory server evaluates no CEL rule, so the spec rows exercise the runtime
//! mirror of those rules, which must give the same verdict.

mod common {
    pub mod context;
}

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::{core::v1::Secret, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use prometheus_client::registry::Registry;
use scg_token_operator::{
    access,
    crd::{
        MANAGED_BY_LABEL, MANAGED_BY_VALUE, OWNER_ANNOTATION, OWNER_UID_ANNOTATION, ScgToken,
        ScgTokenSpec, SecretName,
    },
    reconcile::{Context, Deps, reconcile},
    scg::{HttpTokenApi, RefreshError, RefreshRequest, Refreshed, SecretString, TokenApi},
};
use testkit::apiserver::ApiServer;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use common::context::{LogBuffer, ManualClock, api_server, deps};

const NS: &str = "default";
/// Every credential and token in this file contains this word; no text a user or an
/// operator can see may.
const PLANTED: &str = "planted";
const KEY: &str = "planted-key-3e1a";
const SECRET: &str = "planted-secret-77b0";
const SEED: &str = "planted-seed-c4d2";
const COOKIE: &str = "session=planted-cookie-0f9e";
const GOOD_KEY: &str = "planted-good-key-51aa";
const GOOD_SECRET: &str = "planted-good-secret-8c3d";
const GOOD_SEED: &str = "planted-good-seed-e02b";
/// Where the scripted token API answers; anything else goes over HTTP.
const FAKE_ENDPOINT: &str = "https://scg.example/apptoken-refresh";
/// Lifetime of the tokens the scripted API issues: the good token is due after 40 s.
const FAKE_LIFETIME: Duration = Duration::from_secs(60);
/// Upper bound of one row, passes and checks included.
const ROW_BOUND: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The world of one row: an API server, a clock, the token APIs and the operator context.

/// What one refresh call carried.
#[derive(Clone)]
struct Sent {
    key: String,
    secret: String,
    old_token: String,
    headers: Vec<(String, String)>,
}

/// The token APIs of a row: a scripted one at [`FAKE_ENDPOINT`] that issues a new token
/// to every call, and the real HTTP client for every other endpoint.
struct Apis {
    http: HttpTokenApi,
    sent: Mutex<Vec<Sent>>,
    issued: Mutex<u32>,
}

impl TokenApi for Apis {
    fn refresh<'a>(
        &'a self,
        req: &'a RefreshRequest<'a>,
    ) -> BoxFuture<'a, Result<Refreshed, RefreshError>> {
        // The Debug form of an endpoint is scheme, host and path: nothing secret.
        if format!("{:?}", req.endpoint) != FAKE_ENDPOINT {
            return self.http.refresh(req);
        }
        self.sent.lock().unwrap().push(Sent {
            key: req.consumer_key.expose().into(),
            secret: req.consumer_secret.expose().into(),
            old_token: req.old_token.expose().into(),
            headers: req
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), v.expose().into()))
                .collect(),
        });
        let mut n = self.issued.lock().unwrap();
        *n += 1;
        let token = SecretString::new(format!("planted-issued-{n}"));
        Box::pin(async move {
            Ok(Refreshed {
                token,
                lifetime: FAKE_LIFETIME,
            })
        })
    }
}

struct World {
    server: ApiServer,
    client: kube::Client,
    apis: Arc<Apis>,
    clock: Arc<ManualClock>,
    ctx: Arc<Context>,
    registry: Registry,
}

impl World {
    async fn new(allow_insecure: bool) -> World {
        let (server, client) = api_server().await;
        let apis = Arc::new(Apis {
            http: HttpTokenApi::new().expect("HTTP client"),
            sent: Mutex::default(),
            issued: Mutex::default(),
        });
        let clock = ManualClock::new();
        let mut registry = Registry::default();
        let deps = deps(&client, apis.clone(), clock.clone(), &mut registry);
        let ctx = Arc::new(Context::new(Deps {
            allow_insecure,
            ..deps
        }));
        World {
            server,
            client,
            apis,
            clock,
            ctx,
            registry,
        }
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), NS)
    }
    fn tokens(&self) -> Api<ScgToken> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Creates Secret `name` holding `data`, its metadata set by `optin` (which opts it
    /// in for the operator or not).
    async fn put_secret(&self, name: &str, data: &Data, optin: OptIn) {
        let mut secret = Secret {
            metadata: meta(name),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                    .collect(),
            ),
            ..Default::default()
        };
        optin(name, &mut secret.metadata);
        self.secrets()
            .create(&PostParams::default(), &secret)
            .await
            .expect("create Secret");
    }

    async fn create(&self, name: &str, spec: ScgTokenSpec) {
        self.tokens()
            .create(&PostParams::default(), &ScgToken::new(name, spec))
            .await
            .expect("create ScgToken");
    }

    /// One pass, as the controller would run it; a failed pass is its error text.
    async fn reconcile(&self, name: &str) -> Result<(), String> {
        let obj = self.tokens().get(name).await.expect("get ScgToken");
        reconcile(Arc::new(obj), self.ctx.clone())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    async fn token(&self, name: &str) -> ScgToken {
        self.tokens().get(name).await.expect("get ScgToken")
    }

    /// (reason, message) of the `Ready` condition.
    async fn ready(&self, name: &str) -> Option<(String, String)> {
        let t = self.token(name).await;
        let c = t.ready_condition()?;
        Some((c.reason.clone(), c.message.clone()))
    }

    async fn stored_token(&self, secret: &str) -> Option<Vec<u8>> {
        let s = self.secrets().get_opt(secret).await.ok()??;
        Some(s.data?.get("accessToken")?.0.clone())
    }

    async fn events(&self) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), NS)
            .list(&ListParams::default())
            .await
            .expect("list Events")
            .items
    }

    fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode");
        out
    }
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        ..Default::default()
    }
}

/// The data of a Secret, as bytes: a row may put anything in it.
type Data = BTreeMap<String, Vec<u8>>;

/// Sets the opt-in metadata of the Secret named by the first argument.
type OptIn = fn(&str, &mut ObjectMeta);

fn opt_in_all(_: &str, meta: &mut ObjectMeta) {
    access::opt_in(meta);
}

fn annotate_allowed(meta: &mut ObjectMeta, names: &str) {
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert(access::ALLOWED_SCGTOKENS_ANNOTATION.into(), names.into());
}

fn data(pairs: &[(&str, &str)]) -> Data {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn set(d: &mut Data, key: &str, value: impl Into<Vec<u8>>) {
    d.insert(key.into(), value.into());
}

// ---------------------------------------------------------------------------------------
// A row of the catalogue.

/// Where the bad ScgToken's refresh calls go.
#[derive(Clone, Copy)]
enum Scg {
    /// The scripted API, which issues a token to every call.
    Fake,
    /// A path of the raw HTTP server (see [`answer`]).
    Http(&'static str),
}

/// What the checks of a row can look at.
struct Probe {
    /// Calls to the scripted API, the good token's included.
    sent: Vec<Sent>,
    /// Request heads the HTTP server received for this row's path.
    heads: Vec<String>,
    status: scg_token_operator::crd::ScgTokenStatus,
}

/// An extra check of a row; `Err` says what is wrong.
type Check = fn(&Probe) -> Result<(), String>;

struct Case {
    name: &'static str,
    spec: fn(&mut ScgTokenSpec),
    /// The credentials Secret; `None`: it does not exist.
    creds: Option<fn(&mut Data)>,
    /// The `headersFrom` Secret: `Some(None)` names one that does not exist.
    headers: Option<Option<fn(&mut Data)>>,
    /// A Secret already standing at the target's name.
    target: Option<fn() -> Secret>,
    /// The opt-in of the credentials and headers Secrets (default: labelled).
    optin: OptIn,
    /// A failure the real API server would answer while the bad token's passes run,
    /// where the in-memory one does not check (immutability, Secret types).
    mimic: Option<(&'static str, &'static str, u16)>,
    scg: Scg,
    allow_insecure: bool,
    reason: &'static str,
    fragment: &'static str,
    check: Option<Check>,
}

impl Case {
    fn new(name: &'static str) -> Case {
        Case {
            name,
            spec: |_| {},
            creds: Some(|_| {}),
            headers: None,
            target: None,
            optin: opt_in_all,
            mimic: None,
            scg: Scg::Fake,
            allow_insecure: true,
            reason: "",
            fragment: "",
            check: None,
        }
    }
    fn spec(self, spec: fn(&mut ScgTokenSpec)) -> Case {
        Case { spec, ..self }
    }
    fn creds(self, creds: fn(&mut Data)) -> Case {
        Case {
            creds: Some(creds),
            ..self
        }
    }
    fn no_creds(self) -> Case {
        Case {
            creds: None,
            ..self
        }
    }
    fn headers(self, headers: fn(&mut Data)) -> Case {
        Case {
            headers: Some(Some(headers)),
            ..self
        }
    }
    fn no_headers_secret(self) -> Case {
        Case {
            headers: Some(None),
            ..self
        }
    }
    fn optin(self, optin: OptIn) -> Case {
        Case { optin, ..self }
    }
    fn target(self, target: fn() -> Secret) -> Case {
        Case {
            target: Some(target),
            ..self
        }
    }
    fn mimic(self, verb: &'static str, resource: &'static str, code: u16) -> Case {
        Case {
            mimic: Some((verb, resource, code)),
            ..self
        }
    }
    fn http(self, path: &'static str) -> Case {
        Case {
            scg: Scg::Http(path),
            ..self
        }
    }
    fn secure_only(self) -> Case {
        Case {
            allow_insecure: false,
            ..self
        }
    }
    fn check(self, check: Check) -> Case {
        Case {
            check: Some(check),
            ..self
        }
    }
    fn expect(self, reason: &'static str, fragment: &'static str) -> Case {
        Case {
            reason,
            fragment,
            ..self
        }
    }
}

// ---------------------------------------------------------------------------------------
// Target Secrets a row may find in place.

fn foreign() -> Secret {
    Secret {
        metadata: meta("bad"),
        string_data: Some([("accessToken".into(), "theirs".into())].into()),
        ..Default::default()
    }
}

/// Managed by the operator, for another ScgToken.
fn owned_by(owner: &str) -> Secret {
    let mut metadata = meta("bad");
    metadata.labels = Some([(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into())].into());
    metadata.annotations = Some([(OWNER_ANNOTATION.into(), owner.into())].into());
    Secret {
        metadata,
        ..Default::default()
    }
}

fn owned_by_another() -> Secret {
    owned_by("another")
}

/// The target a deleted ScgToken named "bad" left behind (`deletionPolicy: Retain`).
fn left_by_a_deleted_namesake() -> Secret {
    let mut s = owned_by("bad");
    s.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            OWNER_UID_ANNOTATION.into(),
            "uid-of-a-deleted-scgtoken".into(),
        );
    s
}

fn owned_immutable() -> Secret {
    Secret {
        immutable: Some(true),
        ..owned_by("bad")
    }
}

// ---------------------------------------------------------------------------------------
// Checks some rows add.

fn sent_trimmed(p: &Probe) -> Result<(), String> {
    let bad: Vec<_> = p.sent.iter().filter(|s| s.key != GOOD_KEY).collect();
    match bad.first() {
        Some(s) if s.key == KEY && s.secret == SECRET && s.old_token == SEED => Ok(()),
        Some(_) => Err("the call carried untrimmed credentials".into()),
        None => Err("no call was made".into()),
    }
}

fn no_call(p: &Probe) -> Result<(), String> {
    match p.sent.iter().filter(|s| s.key != GOOD_KEY).count() + p.heads.len() {
        0 => Ok(()),
        n => Err(format!("{n} refresh calls were made for the bad ScgToken")),
    }
}

/// The token lives for `secs` from the refresh (the clock stood still during the call).
fn lifetime(p: &Probe, secs: i64) -> Result<(), String> {
    let status = &p.status;
    let (Some(issued), Some(expires)) = (&status.last_refresh_at, &status.expires_at) else {
        return Err("status shows no token times".into());
    };
    let got = expires.0.duration_since(issued.0).as_secs();
    if got != secs {
        return Err(format!("lifetime {got}s, want {secs}s"));
    }
    // The next refresh comes after the last and before expiry (at expiry for a
    // lifetime too short to leave room: the floor between refreshes is a second).
    let before_expiry = |next: Timestamp| next < expires.0 || (got <= 1 && next == expires.0);
    match &status.next_refresh_at {
        Some(next) if next.0 > issued.0 && before_expiry(next.0) => Ok(()),
        _ => Err("the next refresh is not scheduled within the token's life".into()),
    }
}

/// A token that does not expire is scheduled by the requested validity (24 h).
fn lifetime_is_validity(p: &Probe) -> Result<(), String> {
    lifetime(p, 24 * 3600)
}

fn lifetime_ten_years(p: &Probe) -> Result<(), String> {
    lifetime(p, 10 * 366 * 24 * 3600)
}

fn lifetime_59(p: &Probe) -> Result<(), String> {
    lifetime(p, 59)
}

fn lifetime_60(p: &Probe) -> Result<(), String> {
    lifetime(p, 60)
}

fn lifetime_1(p: &Probe) -> Result<(), String> {
    lifetime(p, 1)
}

fn sent_one_cookie(p: &Probe) -> Result<(), String> {
    let bad: Vec<_> = p.sent.iter().filter(|s| s.key == KEY).collect();
    match bad.first() {
        Some(s) if s.headers == [("Cookie".to_string(), COOKIE.to_string())] => Ok(()),
        Some(s) => Err(format!(
            "the call carried headers {:?}",
            s.headers.iter().map(|(n, _)| n).collect::<Vec<_>>()
        )),
        None => Err("no call was made".into()),
    }
}

// ---------------------------------------------------------------------------------------
// The catalogue.

fn catalogue() -> Vec<Case> {
    let ok = "Refreshed";
    let spec = "InvalidSpec";
    let creds = "CredentialsNotFound";
    let conflict = "TargetConflict";
    let not_allowed = "CredentialsNotAllowed";
    let invalid = "InvalidResponse";
    let unavailable = "Unavailable";
    vec![
        // Specs: every CEL rule and runtime check.
        Case::new("validity below 30s")
            .spec(|s| s.validity = "29s".into())
            .expect(spec, "validity 29s must be between 30s and 8760h"),
        Case::new("validity above 8760h")
            .spec(|s| s.validity = "8761h".into())
            .expect(spec, "validity 8761h must be between 30s and 8760h"),
        Case::new("validity in days")
            .spec(|s| s.validity = "1d".into())
            .expect(spec, "validity \"1d\" is not a duration"),
        Case::new("validity with a fraction")
            .spec(|s| s.validity = "1.5h".into())
            .expect(spec, "validity \"1.5h\" is not a duration"),
        Case::new("validity negative")
            .spec(|s| s.validity = "-1h".into())
            .expect(spec, "validity \"-1h\" is not a duration"),
        Case::new("validity empty")
            .spec(|s| s.validity = String::new())
            .expect(spec, "validity \"\" is not a duration"),
        Case::new("validity overflowing")
            .spec(|s| s.validity = "99999999999999999999h".into())
            .expect(spec, "is not a duration"),
        Case::new("timeout zero")
            .spec(|s| s.timeout = "0s".into())
            .expect(spec, "timeout 0s must be between 1s and 2m"),
        Case::new("timeout above 2m")
            .spec(|s| s.timeout = "2m1s".into())
            .expect(spec, "timeout 2m1s must be between 1s and 2m"),
        Case::new("timeout without unit")
            .spec(|s| s.timeout = "10".into())
            .expect(spec, "timeout \"10\" is not a duration"),
        Case::new("refreshBefore equal to validity")
            .spec(|s| {
                s.validity = "1h".into();
                s.refresh_before = Some("60m".into());
            })
            .expect(spec, "shorter than validity 1h"),
        Case::new("refreshBefore longer than validity")
            .spec(|s| {
                s.validity = "1h".into();
                s.refresh_before = Some("2h".into());
            })
            .expect(spec, "shorter than validity 1h"),
        Case::new("refreshBefore zero")
            .spec(|s| s.refresh_before = Some("0s".into()))
            .expect(spec, "must be longer than 0s"),
        Case::new("refreshBefore not a duration")
            .spec(|s| s.refresh_before = Some("soon".into()))
            .expect(spec, "refreshBefore \"soon\" is not a duration"),
        Case::new("both margins set")
            .spec(|s| {
                s.refresh_before = Some("10m".into());
                s.refresh_before_percentage = Some(20);
            })
            .expect(
                spec,
                "set refreshBefore or refreshBeforePercentage, not both",
            ),
        Case::new("percentage zero")
            .spec(|s| s.refresh_before_percentage = Some(0))
            .expect(spec, "refreshBeforePercentage 0 must be between 1 and 90"),
        Case::new("percentage above 90")
            .spec(|s| s.refresh_before_percentage = Some(91))
            .expect(spec, "refreshBeforePercentage 91 must be between 1 and 90"),
        Case::new("endpoint scheme ftp")
            .spec(|s| s.endpoint = "ftp://scg.example/apptoken-refresh".into())
            .expect(spec, "endpoint must be an http(s) URL"),
        Case::new("endpoint scheme in upper case")
            .spec(|s| s.endpoint = "HTTPS://scg.example/apptoken-refresh".into())
            .expect(spec, "endpoint must be an http(s) URL"),
        Case::new("endpoint without scheme")
            .spec(|s| s.endpoint = "scg.example/apptoken-refresh".into())
            .expect(spec, "endpoint must be an http(s) URL"),
        Case::new("endpoint not a URL")
            .spec(|s| s.endpoint = "https://[scg.example/apptoken-refresh".into())
            .expect(spec, "endpoint is not a valid URL"),
        Case::new("endpoint http without --allow-insecure-endpoints")
            .spec(|s| s.endpoint = "http://scg.example/apptoken-refresh".into())
            .secure_only()
            .expect(spec, "endpoint uses plain http"),
        Case::new("endpoint with credentials")
            .spec(|s| s.endpoint = "https://planted-user:planted-pw@scg.example/x".into())
            .expect(spec, "endpoint must not carry credentials"),
        Case::new("endpoint with a query")
            .spec(|s| s.endpoint = "https://scg.example/x?consumersecret=planted-q".into())
            .expect(spec, "endpoint must not have a query or fragment"),
        Case::new("endpoint host outside --allowed-endpoints")
            .spec(|s| s.endpoint = "https://elsewhere.example/apptoken-refresh".into())
            .check(no_call)
            .expect(spec, "endpoint host elsewhere.example:443 is not allowed by the operator's --allowed-endpoints"),
        Case::new("endpoint on an allowed host's other name")
            .spec(|s| s.endpoint = "https://scg.example.elsewhere.example/x".into())
            .check(no_call)
            .expect(spec, "--allowed-endpoints"),
        // Opt-in of the Secrets the operator reads.
        Case::new("credentials Secret not opted in")
            .optin(|name, m| {
                if name != "creds" {
                    access::opt_in(m)
                }
            })
            .http("/token")
            .check(no_call)
            .expect(
                not_allowed,
                "credentials Secret \"creds\" is not opted in for use by the operator: label it scgtoken.io/credentials=true",
            ),
        Case::new("credentials Secret opted in for other ScgTokens")
            .optin(|_, m| annotate_allowed(m, "good,bad-2"))
            .http("/token")
            .check(no_call)
            .expect(not_allowed, "scgtoken.io/allowed-scgtokens=\"bad\""),
        Case::new("credentials Secret opted in by name")
            .optin(|_, m| annotate_allowed(m, "good, bad"))
            .expect(ok, "token valid until"),
        Case::new("credentials Secret without data, not opted in, says only that")
            .creds(|d| d.clear())
            .optin(|_, _| {})
            .check(no_call)
            .expect(not_allowed, "credentials Secret \"creds\" is not opted in"),
        Case::new("headers Secret not opted in")
            .headers(|_| {})
            .optin(|name, m| {
                if name != "hdrs" {
                    access::opt_in(m)
                }
            })
            .http("/token")
            .check(no_call)
            .expect(not_allowed, "headers Secret \"hdrs\" is not opted in"),
        Case::new("target labels opting the target in")
            .spec(|s| {
                let key = access::CREDENTIALS_LABEL.into();
                s.target.labels.insert(key, "true".into());
            })
            .check(no_call)
            .expect(spec, "only someone who can write a Secret opts it in"),
        // Credentials Secret.
        Case::new("credentials Secret missing")
            .no_creds()
            .expect(creds, "credentials Secret \"creds\" not found"),
        Case::new("consumer key missing")
            .creds(|d| drop(d.remove("consumerKey")))
            .expect(creds, "has no key \"consumerKey\""),
        Case::new("spec names a key the Secret lacks")
            .spec(|s| s.credentials_secret_ref.consumer_secret_key = "secret".into())
            .expect(creds, "has no key \"secret\""),
        Case::new("consumer secret empty")
            .creds(|d| set(d, "consumerSecret", ""))
            .expect(creds, "key \"consumerSecret\" is empty"),
        Case::new("seed only whitespace")
            .creds(|d| set(d, "accessToken", " \n\t"))
            .expect(creds, "key \"accessToken\" is empty"),
        Case::new("consumer secret not UTF-8")
            .creds(|d| set(d, "consumerSecret", b"planted-\xff\xfe".to_vec()))
            .expect(creds, "key \"consumerSecret\" is not UTF-8 text"),
        Case::new("surrounding whitespace is trimmed")
            .creds(|d| {
                set(d, "consumerKey", format!("  {KEY}\n"));
                set(d, "consumerSecret", format!("\t{SECRET} "));
                set(d, "accessToken", format!("{SEED}\r\n"));
            })
            .check(sent_trimmed)
            .expect(ok, "token valid until"),
        Case::new("consumer secret of 1 MiB")
            .creds(|d| set(d, "consumerSecret", "planted".repeat(150_000)))
            .http("/token")
            .check(no_call)
            .expect(creds, "key \"consumerSecret\" holds 1050000 bytes"),
        // Target.
        Case::new("target Secret not created by the operator")
            .target(foreign)
            .check(no_call)
            .expect(
                conflict,
                "Secret \"bad\" exists and was not created for this ScgToken",
            ),
        Case::new("target Secret of another ScgToken")
            .target(owned_by_another)
            .check(no_call)
            .expect(conflict, "was not created for this ScgToken"),
        Case::new("target left by a deleted ScgToken of the same name")
            .target(left_by_a_deleted_namesake)
            .check(no_call)
            .expect(conflict, "annotate this one scgtoken.io/adopt-target=true"),
        Case::new("target passing for a Helm release")
            .spec(|s| {
                s.target.name = Some("sh.helm.release.v1.payments.v9".into());
                s.target.labels.insert("owner".into(), "helm".into());
            })
            .check(no_call)
            .expect(spec, "reserved for Helm's release Secrets"),
        Case::new("target type of Helm's")
            .spec(|s| s.target.type_ = Some("helm.sh/release.v1".into()))
            .check(no_call)
            .expect(spec, "target type \"helm.sh/release.v1\" belongs to"),
        Case::new("target annotation forging the ownership marker")
            .spec(|s| {
                s.target
                    .annotations
                    .insert("scgtoken.io/owner".into(), "another".into());
            })
            .check(no_call)
            .expect(spec, "reserved prefix scgtoken.io/"),
        Case::new("target is the credentials Secret")
            .spec(|s| s.target.name = Some("creds".into()))
            .check(no_call)
            .expect(conflict, "Secret \"creds\" exists and was not created"),
        Case::new("target type kubernetes.io/tls")
            .spec(|s| s.target.type_ = Some("kubernetes.io/tls".into()))
            .mimic("create", "secrets", 422)
            .check(no_call)
            .expect(spec, "target type \"kubernetes.io/tls\""),
        Case::new("target Secret immutable")
            .target(owned_immutable)
            .mimic("update", "secrets", 422)
            .check(no_call)
            .expect(conflict, "Secret \"bad\" is immutable"),
        Case::new("expiry key equal to token key")
            .spec(|s| s.target.expiry_key = Some("accessToken".into()))
            .check(no_call)
            .expect(spec, "expiryKey \"accessToken\" must differ from"),
        Case::new("token key not a Secret key")
            .spec(|s| s.target.token_key = "access token".into())
            .mimic("create", "secrets", 422)
            .check(no_call)
            .expect(spec, "tokenKey \"access token\" is not a valid Secret key"),
        Case::new("target name not a Secret name")
            .spec(|s| s.target.name = Some("Bad_Name".into()))
            .mimic("create", "secrets", 422)
            .check(no_call)
            .expect(spec, "target name \"Bad_Name\" is not a valid Secret name"),
        Case::new("target label value not a label value")
            .spec(|s| {
                s.target
                    .labels
                    .insert("team".into(), "messaging team".into());
            })
            .mimic("create", "secrets", 422)
            .check(no_call)
            .expect(spec, "label \"team\""),
        // SCG answers, through the real HTTP client.
        Case::new("a plain token answer (control row)")
            .http("/token")
            .check(lifetime_60)
            .expect(ok, "token valid until"),
        Case::new("validityTime huge")
            .http("/validity-huge")
            .check(lifetime_ten_years)
            .expect(ok, "token valid until"),
        Case::new("validityTime beyond 64 bits")
            .http("/validity-beyond-u64")
            .check(lifetime_ten_years)
            .expect(ok, "token valid until"),
        Case::new("validityTime negative (does not expire)")
            .http("/validity-negative")
            .check(lifetime_is_validity)
            .expect(ok, "token valid until"),
        Case::new("validityTime float")
            .http("/validity-float")
            .check(lifetime_59)
            .expect(ok, "token valid until"),
        Case::new("validityTime below a second")
            .http("/validity-subsecond")
            .check(lifetime_1)
            .expect(ok, "token valid until"),
        Case::new("validityTime a numeric string")
            .http("/validity-string")
            .check(lifetime_60)
            .expect(ok, "token valid until"),
        Case::new("validityTime a word")
            .http("/validity-word")
            .expect(invalid, "validityTime is not a number"),
        Case::new("validityTime a boolean")
            .http("/validity-bool")
            .expect(invalid, "validityTime is not a number"),
        Case::new("validityTime missing")
            .http("/validity-missing")
            .expect(invalid, "no validityTime"),
        Case::new("validityTime null")
            .http("/validity-null")
            .expect(invalid, "no validityTime"),
        Case::new("accessToken missing")
            .http("/token-missing")
            .expect(invalid, "no accessToken"),
        Case::new("accessToken blank")
            .http("/token-blank")
            .expect(invalid, "no accessToken"),
        Case::new("accessToken a number")
            .http("/token-number")
            .expect(invalid, "accessToken is not a string"),
        Case::new("extra fields")
            .http("/extra-fields")
            .check(lifetime_60)
            .expect(ok, "token valid until"),
        Case::new("HTML with 200")
            .http("/html")
            .expect(invalid, "not a JSON object"),
        Case::new("empty body with 200")
            .http("/empty")
            .expect(invalid, "not a JSON object"),
        Case::new("a JSON array")
            .http("/array")
            .expect(invalid, "not a JSON object"),
        Case::new("gzip body not asked for")
            .http("/gzip")
            .expect(invalid, "compressed"),
        Case::new("chunked in small pieces")
            .http("/chunked")
            .check(lifetime_60)
            .expect(ok, "token valid until"),
        Case::new("chunked past 64 KiB")
            .http("/chunked-huge")
            .expect(invalid, "the body is too large"),
        Case::new("Content-Length longer than the body")
            .http("/short-body")
            .expect(unavailable, "the response broke off"),
        Case::new("a slow trickle past the timeout")
            .spec(|s| s.timeout = "1s".into())
            .http("/trickle")
            .expect(unavailable, "no answer within 1s"),
        // Headers Secret.
        Case::new("headers Secret missing")
            .no_headers_secret()
            .check(no_call)
            .expect(creds, "headers Secret \"hdrs\" not found"),
        Case::new("headers: a good Cookie (control row)")
            .headers(|_| {})
            .check(sent_one_cookie)
            .expect(ok, "token valid until"),
        Case::new("header name with a space")
            .headers(|d| set(d, "Bad Name", "planted-v"))
            .http("/token")
            .check(no_call)
            .expect(creds, "key \"Bad Name\" is not a valid HTTP header name"),
        Case::new("header value with CR LF")
            .headers(|d| set(d, "Cookie", "planted-a\r\nX-Injected: planted-b"))
            .http("/token")
            .check(no_call)
            .expect(creds, "key \"Cookie\" is not a valid HTTP header value"),
        Case::new("header value with a control character")
            .headers(|d| set(d, "Cookie", "planted\x01"))
            .http("/token")
            .check(no_call)
            .expect(creds, "key \"Cookie\" is not a valid HTTP header value"),
        Case::new("header value not UTF-8")
            .headers(|d| set(d, "X-Extra", b"planted-\xff".to_vec()))
            .http("/token")
            .check(no_call)
            .expect(creds, "key \"X-Extra\" is not UTF-8 text"),
        Case::new("header value empty")
            .headers(|d| set(d, "X-Extra", ""))
            .http("/token")
            .check(no_call)
            .expect(creds, "key \"X-Extra\" is empty"),
        Case::new("header that frames the request (Content-Length)")
            .headers(|d| set(d, "Content-Length", "5"))
            .http("/token")
            .check(no_call)
            .expect(creds, "key \"Content-Length\" names a header the operator"),
        Case::new("header that reroutes the request (Host)")
            .headers(|d| set(d, "Host", "elsewhere.example"))
            .http("/token")
            .check(no_call)
            .expect(creds, "key \"Host\" names a header the operator"),
    ]
}

// ---------------------------------------------------------------------------------------
// Running a row.

/// One pass of the bad ScgToken, with the failure the real API server would answer.
async fn bad_pass(w: &World, case: &Case) -> Result<(), String> {
    let faults = w.server.faults();
    if let Some((verb, resource, code)) = case.mimic {
        faults.fail_next(verb, resource, 100, code);
    }
    let result = w.reconcile("bad").await;
    if let Some((verb, resource, _)) = case.mimic {
        faults.fail_next(verb, resource, 0, 0);
    }
    result
}

/// The good ScgToken: its own credentials, the scripted API, refreshed once.
async fn plant_good(w: &World) -> Result<(), String> {
    let creds = data(&[
        ("consumerKey", GOOD_KEY),
        ("consumerSecret", GOOD_SECRET),
        ("accessToken", GOOD_SEED),
    ]);
    w.put_secret("good-creds", &creds, opt_in_all).await;
    let mut good = ScgTokenSpec::new("good-creds");
    good.endpoint = FAKE_ENDPOINT.into();
    w.create("good", good).await;
    w.reconcile("good").await.map_err(|e| format!("good: {e}"))
}

/// The bad ScgToken of `case` and the Secrets around it.
async fn plant_bad(w: &World, case: &Case, scg: &RawScg) {
    if let Some(edit) = case.creds {
        let mut d = data(&[
            ("consumerKey", KEY),
            ("consumerSecret", SECRET),
            ("accessToken", SEED),
        ]);
        edit(&mut d);
        w.put_secret("creds", &d, case.optin).await;
    }
    if let Some(Some(edit)) = case.headers {
        let mut d = data(&[("Cookie", COOKIE)]);
        edit(&mut d);
        w.put_secret("hdrs", &d, case.optin).await;
    }
    if let Some(target) = case.target {
        w.secrets()
            .create(&PostParams::default(), &target())
            .await
            .expect("create target Secret");
    }
    let mut spec = ScgTokenSpec::new("creds");
    spec.endpoint = match case.scg {
        Scg::Fake => FAKE_ENDPOINT.into(),
        Scg::Http(path) => format!("{}{path}", scg.url),
    };
    if case.headers.is_some() {
        spec.headers_from = Some(SecretName {
            name: "hdrs".into(),
        });
    }
    (case.spec)(&mut spec);
    w.create("bad", spec).await;
}

/// Runs one row; `Err` says what went wrong.
async fn run_case(case: &Case, scg: &RawScg, logs: &LogBuffer) -> Result<(), String> {
    let w = World::new(case.allow_insecure).await;
    plant_good(&w).await?;
    let first = w.stored_token("good").await;
    plant_bad(&w, case, scg).await;

    let mut errors = Vec::new();
    let mut seen = Vec::new();
    errors.extend(bad_pass(&w, case).await.err());
    seen.push(w.ready("bad").await);
    // Time passes: the good token is due, the bad one goes on failing (or not).
    w.clock.advance(Duration::from_secs(45));
    w.reconcile("good")
        .await
        .map_err(|e| format!("good: {e}"))?;
    errors.extend(bad_pass(&w, case).await.err());
    seen.push(w.ready("bad").await);

    let mut problems = Vec::new();
    let second = w.stored_token("good").await;
    if first.is_none() || second.is_none() || first == second {
        problems.push("the good ScgToken was not refreshed".to_string());
    }
    match w.ready("good").await {
        Some((reason, _)) if reason == "Refreshed" => {}
        other => problems.push(format!("good: Ready is {other:?}")),
    }
    for (pass, ready) in seen.iter().enumerate() {
        match ready {
            Some((reason, message)) if reason == case.reason && message.contains(case.fragment) => {
            }
            Some((reason, message)) => problems.push(format!(
                "pass {}: {reason}: {message:?}; want {} with {:?}",
                pass + 1,
                case.reason,
                case.fragment
            )),
            None => problems.push(format!("pass {}: no Ready condition", pass + 1)),
        }
    }
    problems.extend(told(&w, case, logs, &errors).await);
    if let Some(check) = case.check {
        let status = w.token("bad").await.status.unwrap_or_default();
        let sent = w.apis.sent.lock().unwrap().clone();
        let heads = match case.scg {
            Scg::Http(path) => scg.heads(path),
            Scg::Fake => Vec::new(),
        };
        problems.extend(
            check(&Probe {
                sent,
                heads,
                status,
            })
            .err(),
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// What is wrong with what people were told: a Warning Event and a log line with the
/// reason (unless all is well), and no secret in status, Events, logs, errors or metrics.
async fn told(w: &World, case: &Case, logs: &LogBuffer, errors: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let events = w.events().await;
    let log_text = logs.text();
    if case.reason != "Refreshed" {
        let announced = events.iter().any(|e| {
            e.reason.as_deref() == Some(case.reason)
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad")
        });
        if !announced {
            problems.push(format!("no Warning Event {}", case.reason));
        }
        let logged = log_text
            .lines()
            .any(|l| l.contains("scgtoken=bad") && l.contains(case.reason));
        if !logged {
            problems.push(format!("no log line with {}", case.reason));
        }
    }
    let status = |t: ScgToken| serde_json::to_string(&t.status).unwrap_or_default();
    let visible = [
        ("good status", status(w.token("good").await)),
        ("bad status", status(w.token("bad").await)),
        ("Events", serde_json::to_string(&events).unwrap_or_default()),
        ("logs", log_text),
        ("errors", errors.join("\n")),
        ("metrics", w.metrics_text()),
    ];
    for (what, text) in visible {
        if text.contains(PLANTED) {
            problems.push(format!("a secret leaked into the {what}"));
        }
    }
    problems
}

#[tokio::test]
async fn every_bad_input_gets_a_clear_condition_and_harms_no_other_token() {
    let scg = RawScg::start().await;
    let cases = catalogue();
    assert!(cases.len() >= 25, "the catalogue shrank to {}", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        scg.reset();
        let logs = LogBuffer::default();
        let writer = logs.clone();
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish(),
        );
        let name = case.name;
        let scg_for_row = scg.clone();
        // A task of its own, so that a panic is one failed row and not the end of the run.
        let row =
            tokio::spawn(
                async move { timeout(ROW_BOUND, run_case(&case, &scg_for_row, &logs)).await },
            );
        match row.await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(problem))) => failures.push(format!("{name}: {problem}")),
            Ok(Err(_)) => failures.push(format!("{name}: did not finish within {ROW_BOUND:?}")),
            Err(e) if e.is_panic() => failures.push(format!("{name}: panicked")),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// The SCG API, misbehaving: a raw HTTP/1.1 server on 127.0.0.1 that writes each answer
// byte by byte, so that framing (chunks, Content-Length, encodings) is exactly as given.

/// One answer: the head lines after the status line, and the body in pieces written
/// `gap` apart.
struct Answer {
    head: Vec<String>,
    pieces: Vec<Vec<u8>>,
    gap: Duration,
}

fn json(body: &str) -> Answer {
    Answer {
        head: vec![
            "Content-Type: application/json".into(),
            format!("Content-Length: {}", body.len()),
        ],
        pieces: vec![body.as_bytes().to_vec()],
        gap: Duration::ZERO,
    }
}

fn chunked(pieces: Vec<Vec<u8>>) -> Answer {
    let mut framed: Vec<Vec<u8>> = pieces
        .into_iter()
        .map(|p| {
            let mut c = format!("{:x}\r\n", p.len()).into_bytes();
            c.extend_from_slice(&p);
            c.extend_from_slice(b"\r\n");
            c
        })
        .collect();
    framed.push(b"0\r\n\r\n".to_vec());
    Answer {
        head: vec![
            "Content-Type: application/json".into(),
            "Transfer-Encoding: chunked".into(),
        ],
        pieces: framed,
        gap: Duration::ZERO,
    }
}

const TOKEN_BODY: &str = r#"{"accessToken":"planted-http-token","validityTime":60}"#;

/// The answer at `path` (the path of the endpoint of a row) to a request with `query`.
fn answer(path: &str, query: &str) -> Answer {
    let token = |validity: &str| {
        json(&format!(
            r#"{{"accessToken":"planted-http-token","validityTime":{validity}}}"#
        ))
    };
    match path {
        "/token" => json(TOKEN_BODY),
        "/validity-huge" => token("1e300"),
        "/validity-beyond-u64" => token("18446744073709551616"),
        "/validity-negative" => token("-60"),
        "/validity-float" => token("59.9"),
        "/validity-subsecond" => token("0.4"),
        "/validity-string" => token(r#""60""#),
        "/validity-word" => token(r#""soon""#),
        "/validity-bool" => token("true"),
        "/validity-null" => token("null"),
        "/validity-missing" => json(r#"{"accessToken":"planted-http-token"}"#),
        "/token-missing" => json(r#"{"validityTime":60}"#),
        "/token-blank" => json(r#"{"accessToken":"  ","validityTime":60}"#),
        "/token-number" => json(r#"{"accessToken":12345,"validityTime":60}"#),
        "/extra-fields" => json(
            r#"{"tokenType":"bearer","accessToken":"planted-http-token","scope":["a"],"validityTime":60,"refresh":{"x":null}}"#,
        ),
        "/html" => Answer {
            head: vec!["Content-Type: text/html".into()],
            // A gateway's error page quoting the request: the credentials are in it, so
            // an error that quoted the body would leak them.
            pieces: vec![format!("<html><body>No route for ?{query}</body></html>").into_bytes()],
            gap: Duration::ZERO,
        },
        "/empty" => json(""),
        "/array" => json(r#"[{"accessToken":"planted-http-token","validityTime":60}]"#),
        "/gzip" => {
            let body = gzip(TOKEN_BODY.as_bytes());
            Answer {
                head: vec![
                    "Content-Type: application/json".into(),
                    "Content-Encoding: gzip".into(),
                    format!("Content-Length: {}", body.len()),
                ],
                pieces: vec![body],
                gap: Duration::ZERO,
            }
        }
        "/chunked" => chunked(
            TOKEN_BODY
                .as_bytes()
                .chunks(5)
                .map(<[u8]>::to_vec)
                .collect(),
        ),
        "/chunked-huge" => {
            let mut pieces = vec![br#"{"accessToken":"planted-http-token","pad":""#.to_vec()];
            pieces.extend(std::iter::repeat_n(vec![b'x'; 8192], 9));
            pieces.push(br#"","validityTime":60}"#.to_vec());
            chunked(pieces)
        }
        "/short-body" => Answer {
            head: vec![
                "Content-Type: application/json".into(),
                format!("Content-Length: {}", TOKEN_BODY.len() + 100),
            ],
            pieces: vec![TOKEN_BODY.as_bytes().to_vec()],
            gap: Duration::ZERO,
        },
        "/trickle" => Answer {
            head: vec![
                "Content-Type: application/json".into(),
                format!("Content-Length: {}", TOKEN_BODY.len()),
            ],
            pieces: TOKEN_BODY.bytes().map(|b| vec![b]).collect(),
            gap: Duration::from_millis(100),
        },
        _ => Answer {
            head: vec!["Content-Length: 0".into()],
            pieces: Vec::new(),
            gap: Duration::ZERO,
        },
    }
}

/// A gzip member holding `data` in one stored (uncompressed) deflate block.
fn gzip(data: &[u8]) -> Vec<u8> {
    let crc = !data.iter().fold(!0u32, |mut c, &b| {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
        c
    });
    let len = u16::try_from(data.len()).expect("one stored block");
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// The raw server and the request heads it received, by path.
#[derive(Clone)]
struct RawScg {
    url: String,
    heads: Arc<Mutex<Vec<(String, String)>>>,
}

/// Longest request head read; a longer one is answered 414, as gateways do.
const MAX_HEAD: usize = 16 * 1024;

impl RawScg {
    async fn start() -> RawScg {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve_one(conn, seen.clone()));
            }
        });
        RawScg { url, heads }
    }

    fn reset(&self) {
        self.heads.lock().unwrap().clear();
    }

    fn heads(&self, path: &str) -> Vec<String> {
        let heads = self.heads.lock().unwrap();
        heads
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, h)| h.clone())
            .collect()
    }
}

/// Reads one request head (bounded in size and time), then writes the answer for its path
/// and closes the connection.
async fn serve_one(mut conn: TcpStream, heads: Arc<Mutex<Vec<(String, String)>>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read = timeout(Duration::from_secs(10), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() <= MAX_HEAD {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if read != Ok(true) {
        return;
    }
    if head.len() > MAX_HEAD {
        let _ = conn
            .write_all(
                b"HTTP/1.1 414 URI Too Long\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_string(), query.to_string());
    heads.lock().unwrap().push((path.clone(), head));
    let a = answer(&path, &query);
    let mut out = b"HTTP/1.1 200 OK\r\nConnection: close\r\n".to_vec();
    for line in &a.head {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if conn.write_all(&out).await.is_err() {
        return;
    }
    for piece in &a.pieces {
        if !a.gap.is_zero() {
            tokio::time::sleep(a.gap).await;
        }
        if conn.write_all(piece).await.is_err() {
            return;
        }
    }
    let _ = conn.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// What a failed call shows of the remote side: its class, never its words. The endpoint
// is chosen by whoever writes the ScgToken; status and Events must not make the operator
// a probe of what answers there. The operator's own log keeps the detail.

/// A server that answers every connection with `reply` (then holds it open briefly).
async fn replying(reply: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = conn.write_all(reply).await;
                let mut buf = [0u8; 1024];
                let _ = timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
            });
        }
    });
    addr.to_string()
}

#[tokio::test]
async fn a_failed_call_shows_its_class_and_not_the_remote_words() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    // A TLS alert (fatal, decrypt_error) instead of a ServerHello.
    let alert = replying(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x33]).await;
    // Something that is not HTTP.
    let banner = replying(b"SSH-2.0-planted_banner\r\n\r\n").await;
    // A port where nothing listens (bound, then closed).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("address").to_string()
    };
    // (endpoint, what status says, words of the remote side or the socket it must not)
    let rows = [
        (
            format!("https://{alert}/apptoken-refresh"),
            "the SCG API could not be reached: TLS handshake failed",
            &["alert", "DecryptError"][..],
        ),
        (
            format!("http://{banner}/apptoken-refresh"),
            "the SCG API could not be reached: ",
            &["planted", "SSH", "HTTP version", "invalid"][..],
        ),
        (
            format!("http://{closed}/apptoken-refresh"),
            "the SCG API could not be reached: connection failed",
            &["os error", "refused"][..],
        ),
    ];
    let w = World::new(true).await;
    let creds = data(&[
        ("consumerKey", KEY),
        ("consumerSecret", SECRET),
        ("accessToken", SEED),
    ]);
    w.put_secret("creds", &creds, opt_in_all).await;
    for (i, (endpoint, says, hidden)) in rows.iter().enumerate() {
        let name = format!("remote-{i}");
        let mut spec = ScgTokenSpec::new("creds");
        spec.endpoint = endpoint.clone();
        spec.timeout = "5s".into();
        w.create(&name, spec).await;
        w.reconcile(&name).await.expect("a pass");
        let (reason, message) = w.ready(&name).await.expect("Ready");
        assert_eq!(reason, "Unavailable", "{endpoint}: {message}");
        assert!(message.starts_with(says), "{endpoint}: {message}");
        let events = serde_json::to_string(&w.events().await).expect("Events");
        for word in *hidden {
            assert!(
                !message.contains(word),
                "{endpoint}: status shows {word:?}: {message}"
            );
            assert!(
                !events.contains(word),
                "{endpoint}: an Event shows {word:?}"
            );
        }
    }
    // The operator's log keeps what its operators need to find the cause.
    let logged = logs.text();
    assert!(logged.contains("alert"), "the TLS alert is not in the log");
    assert!(
        logged.contains("os error") || logged.contains("refused"),
        "the socket error is not in the log"
    );
}
