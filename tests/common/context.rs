//! The operator's context for tests that call `reconcile()` directly: the in-memory API
//! server with the ScgToken CRD, a wall clock the test moves by hand, and the `Deps` of a
//! newly started process (nothing in memory).
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, CustomResourceExt, api::PostParams, runtime::events::Reporter};
use prometheus_client::registry::Registry;
use scg_token_operator::{
    access::{AllowedEndpoints, CredentialsPolicy},
    crd::ScgToken,
    events::Publisher,
    leader::Leadership,
    policy::Clock,
    reconcile::Deps,
    report::Metrics,
    scg::TokenApi,
};
use testkit::apiserver::ApiServer;

/// A wall clock the test moves by hand; it starts at the same instant in every test.
pub struct ManualClock(Mutex<Timestamp>);

impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock(Mutex::new(
            Timestamp::from_second(1_800_000_000).unwrap(),
        )))
    }

    pub fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += SignedDuration::try_from(d).unwrap();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap()
    }
}

/// Creates the ScgToken CRD through `client`.
pub async fn install_crd(client: &kube::Client) {
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ScgToken::crd())
        .await
        .expect("create CRD");
}

/// An in-memory API server that serves ScgTokens, and a client of it.
pub async fn api_server() -> (ApiServer, kube::Client) {
    let server = ApiServer::start().await.expect("start API server");
    let client = server.client();
    install_crd(&client).await;
    (server, client)
}

/// The endpoint hosts the tests' ScgTokens use: scripted token APIs answer for the
/// `.example` names, real servers listen on loopback.
pub const TEST_ENDPOINTS: &str = "scg.example,a.example,b.example,127.0.0.1,localhost";

/// What a newly started operator has: an empty ScgToken cache, leadership, https only,
/// [`TEST_ENDPOINTS`] allowed, credentials opt-in enforced, and its metrics registered
/// in `registry`. Tests change fields with `..deps(...)`.
pub fn deps(
    client: &kube::Client,
    token_api: Arc<dyn TokenApi>,
    clock: Arc<dyn Clock>,
    registry: &mut Registry,
) -> Deps {
    let reporter = Reporter {
        controller: "scg-token-operator".into(),
        instance: Some("test".into()),
    };
    Deps {
        client: client.clone(),
        token_api,
        clock,
        events: Publisher::new(client.clone(), reporter),
        metrics: Arc::new(Metrics::register(registry)),
        leadership: Leadership::always(),
        allow_insecure: false,
        allowed_endpoints: AllowedEndpoints::parse(TEST_ENDPOINTS).expect("test endpoints"),
        credentials_policy: CredentialsPolicy::Enforce,
        tokens: scg_token_operator::reconcile::token_cache().0,
    }
}

/// Collects every log line written while it is the default subscriber.
#[derive(Clone, Default)]
pub struct LogBuffer(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
