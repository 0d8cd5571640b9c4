//! End to end: one operator shared by several teams. Whoever may create an ScgToken in
//! a namespace must not be able to make the operator read a Secret that was not given
//! to it as credentials, nor send anything to a host the operator's installer did not
//! allow.
//!
//! The real binary against the in-memory API server (or the real one of the CI lane)
//! and the SCG simulator over HTTPS, which stands in for a host of the tenant's choosing
//! and counts the requests it receives.

mod common {
    pub mod harness;
}

use common::harness::Env;
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::api::PostParams;
use scg_token_operator::crd::SecretName;
use testkit::{
    scgsim::{ScgSimulator, SimConfig},
    tls::TempFile,
};

/// The database password of another workload in the tenant's namespace.
const DB_PASSWORD: &str = "planted-db-password-6d1e";
const DB_USER: &str = "planted-db-user-20aa";

fn tls() -> SimConfig {
    SimConfig {
        tls: true,
        ..SimConfig::default()
    }
}

fn ca_file(sim: &ScgSimulator) -> TempFile {
    TempFile::write("scg-e2e-ca", sim.ca_pem().expect("a TLS simulator")).expect("write CA")
}

/// A Secret that was never meant for the operator: a database's credentials.
async fn db_credentials(env: &Env) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("db-credentials".into()),
            ..Default::default()
        },
        string_data: Some(
            [("username", DB_USER), ("password", DB_PASSWORD)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    };
    env.secrets()
        .create(&PostParams::default(), &secret)
        .await
        .expect("create db-credentials");
}

/// The (status, reason, message) of an ScgToken's Ready condition.
async fn ready(env: &Env, name: &str) -> Option<(String, String, String)> {
    let t = env.tokens().get_opt(name).await.ok()??;
    let c = t.ready_condition()?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// An ScgToken that names a database's Secret as its credentials and its headers, with
/// an endpoint on a host its author controls: the operator sends nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_scgtoken_cannot_send_a_secret_not_given_as_credentials() {
    let env = Env::start(tls()).await;
    let ca = ca_file(&env.sim);
    db_credentials(&env).await;
    env.scgtoken("exfiltrate", "db-credentials", |s| {
        s.credentials_secret_ref.consumer_key_key = "username".into();
        s.credentials_secret_ref.consumer_secret_key = "password".into();
        s.credentials_secret_ref.access_token_key = "password".into();
        s.headers_from = Some(SecretName {
            name: "db-credentials".into(),
        });
    })
    .await;
    let ca_path = ca.path().display().to_string();
    let _op = env.operator(&["--ca-bundle", &ca_path]);

    let (status, reason, message) = env
        .eventually("a Ready condition on the hostile ScgToken", || {
            ready(&env, "exfiltrate")
        })
        .await;
    assert_eq!(
        env.sim.refresh_calls(),
        0,
        "the operator sent the database's credentials to the ScgToken's endpoint"
    );
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "CredentialsNotAllowed"),
        "{message}"
    );
    let status = env
        .tokens()
        .get("exfiltrate")
        .await
        .expect("get")
        .status
        .unwrap_or_default();
    assert_eq!(status.token_fingerprint, None, "a fingerprint was published");
    assert_eq!(status.credentials_fingerprint, None);
    let shown = format!("{}{message}", env.all_logs());
    for secret in [DB_PASSWORD, DB_USER] {
        assert!(!shown.contains(secret), "the database's credentials were shown");
    }
    env.finish().await;
}
