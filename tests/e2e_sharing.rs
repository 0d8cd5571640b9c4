//! End to end: one operator shared by several teams. Whoever may create an ScgToken in
//! a namespace must not be able to make the operator read a Secret that was not given
//! to it as credentials, nor send anything to a host the operator's installer did not
//! allow.
//!
//! The real binary against the in-memory API server (or the real one of the CI lane)
//! and the SCG simulator over HTTPS, which stands in for a host of the tenant's choosing
//! and counts the requests it receives.

mod common {
    #[allow(dead_code)] // Readiness helpers this file does not need.
    pub mod admin;
    pub mod harness;
    pub mod metrics;
}

use common::{
    admin::{admin_addr, http, metrics_text},
    harness::{CONSUMER_KEY, Env, descendants},
    metrics::{metric, parse_metrics},
};
use k8s_openapi::{
    api::{core::v1::Secret, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use scg_token_operator::{
    access::CREDENTIALS_LABEL,
    crd::{REFRESH_REQUEST_ANNOTATION, ScgToken, SecretName},
};
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
    assert_eq!(
        status.token_fingerprint, None,
        "a fingerprint was published"
    );
    assert_eq!(status.credentials_fingerprint, None);
    let shown = format!("{}{message}", env.all_logs());
    for secret in [DB_PASSWORD, DB_USER] {
        assert!(
            !shown.contains(secret),
            "the database's credentials were shown"
        );
    }
    env.finish().await;
}

/// An endpoint on a host outside `--allowed-endpoints`: InvalidSpec naming the flag, and
/// no request, although the credentials are opted in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_outside_the_allowed_hosts_gets_no_request() {
    let env = Env::start(tls()).await;
    let ca = ca_file(&env.sim);
    env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let ca_path = ca.path().display().to_string();
    let _op = env.operator(&[
        "--ca-bundle",
        &ca_path,
        "--allowed-endpoints=api.syniverse.com",
    ]);

    let (status, reason, message) = env
        .eventually("a Ready condition", || ready(&env, "messaging"))
        .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidSpec"),
        "{message}"
    );
    assert!(
        message.contains(&format!("127.0.0.1:{}", env.sim.addr().port()))
            && message.contains("--allowed-endpoints (api.syniverse.com)"),
        "{message}"
    );
    env.eventually("a Warning Event InvalidSpec", || async {
        has_event(&env, "messaging", "Warning", "InvalidSpec")
            .await
            .then_some(())
    })
    .await;
    assert_eq!(
        env.sim.refresh_calls(),
        0,
        "a request went to a host not allowed"
    );
    assert_eq!(env.target_token("messaging").await, None);
    env.finish().await;
}

/// Whether an Event of `type_` and `reason` about the ScgToken `name` exists.
async fn has_event(env: &Env, name: &str, type_: &str, reason: &str) -> bool {
    let api: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let Ok(list) = api.list(&ListParams::default()).await else {
        return false;
    };
    list.items.iter().any(|e| {
        e.reason.as_deref() == Some(reason)
            && e.type_.as_deref() == Some(type_)
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
    })
}

/// The `CredentialsAllowed` condition's (status, reason, message), if there is one.
async fn credentials_allowed(env: &Env, name: &str) -> Option<(String, String, String)> {
    let t: ScgToken = env.tokens().get_opt(name).await.ok()??;
    let c = t
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "CredentialsAllowed")?;
    Some((c.status, c.reason, c.message))
}

/// Labels a Secret `scgtoken.io/credentials=true`, as its owner would.
async fn opt_in(env: &Env, secret: &str) {
    let patch = serde_json::json!({"metadata": {"labels": {CREDENTIALS_LABEL: "true"}}});
    env.secrets()
        .patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label the Secret");
}

/// The token in the target once it differs from `from` and Ready is True.
async fn refreshed(env: &Env, name: &str, from: &str) -> String {
    env.eventually(&format!("{name} refreshed past {from:.8}"), || async {
        let (status, _, _) = ready(env, name).await?;
        let token = env.target_token(name).await.filter(|t| t != from)?;
        (status == "True").then_some(token)
    })
    .await
}

/// A ScgToken refused for a Secret that is not opted in starts as soon as the Secret's
/// owner opts it in: the label is a change the operator watches, no restart needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opting_a_secret_in_starts_its_scgtoken() {
    let env = Env::start(tls()).await;
    let ca = ca_file(&env.sim);
    let seed = env
        .sim
        .add_app(CONSUMER_KEY, common::harness::CONSUMER_SECRET);
    env.put_credentials_opted("creds", CONSUMER_KEY, &seed, false)
        .await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let ca_path = ca.path().display().to_string();
    let _op = env.operator(&["--ca-bundle", &ca_path]);

    let (_, reason, message) = env
        .eventually("a Ready condition", || ready(&env, "messaging"))
        .await;
    assert_eq!(reason, "CredentialsNotAllowed", "{message}");
    assert!(
        message.contains("label it scgtoken.io/credentials=true")
            && message.contains("scgtoken.io/allowed-scgtokens=\"messaging\""),
        "{message}"
    );
    assert_eq!(env.sim.refresh_calls(), 0);

    opt_in(&env, "creds").await;
    let token = refreshed(&env, "messaging", &seed).await;
    assert!(env.sim.is_valid(&token));
    env.finish().await;
}

/// Under `--credentials-policy=warn` a Secret that is not opted in is still used, and
/// the ScgToken says so: a condition, a Warning Event, a metric. Opting the Secret in
/// clears the condition and the metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_warn_a_secret_not_opted_in_is_used_and_reported() {
    let env = Env::start(tls()).await;
    let ca = ca_file(&env.sim);
    let seed = env
        .sim
        .add_app(CONSUMER_KEY, common::harness::CONSUMER_SECRET);
    env.put_credentials_opted("creds", CONSUMER_KEY, &seed, false)
        .await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let ca_path = ca.path().display().to_string();
    let op = env.operator(&["--ca-bundle", &ca_path, "--credentials-policy=warn"]);

    let first = refreshed(&env, "messaging", &seed).await;
    // And it goes on: the next refresh, asked for now.
    let patch = serde_json::json!({"metadata": {"annotations": {
        REFRESH_REQUEST_ANNOTATION: "under-warn"}}});
    env.tokens()
        .patch("messaging", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("ask for a refresh");
    let token = refreshed(&env, "messaging", &first).await;
    assert!(env.sim.is_valid(&token));
    let (status, reason, message) = env
        .eventually("the CredentialsAllowed condition", || {
            credentials_allowed(&env, "messaging")
        })
        .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "CredentialsNotAllowed")
    );
    assert!(
        message.contains("credentials Secret \"creds\" is not opted in"),
        "{message}"
    );
    assert!(message.contains("--credentials-policy=warn"), "{message}");
    env.eventually("a Warning Event CredentialsNotAllowed", || async {
        has_event(&env, "messaging", "Warning", "CredentialsNotAllowed")
            .await
            .then_some(())
    })
    .await;
    let addr = admin_addr(&op).await;
    let client = http();
    let labels = [("namespace", env.namespace.as_str()), ("name", "messaging")];
    let flagged = |text: Option<String>| {
        metric(
            &parse_metrics(&text?),
            "scgtoken_credentials_not_allowed",
            &labels,
        )
    };
    assert_eq!(flagged(metrics_text(&client, addr).await), Some(1.0));

    opt_in(&env, "creds").await;
    env.eventually("the condition to go", || async {
        credentials_allowed(&env, "messaging")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        flagged(metrics_text(&client, addr).await),
        None,
        "the metric still flags an opted-in Secret"
    );
    env.finish().await;
}

/// The upgrade path: a chain made under warn mode with a Secret not opted in continues,
/// once the Secret is labelled, under an operator restarted with the default enforce
/// mode. The next token descends from the stored one: no new chain from the seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_from_warn_mode_continues_under_enforce_after_opting_in() {
    let env = Env::start(tls()).await;
    let ca = ca_file(&env.sim);
    let ca_path = ca.path().display().to_string();
    let seed = env
        .sim
        .add_app(CONSUMER_KEY, common::harness::CONSUMER_SECRET);
    env.put_credentials_opted("creds", CONSUMER_KEY, &seed, false)
        .await;
    env.scgtoken("messaging", "creds", |_| {}).await;

    let mut warn = env.operator(&["--ca-bundle", &ca_path, "--credentials-policy=warn"]);
    let first = refreshed(&env, "messaging", &seed).await;
    env.eventually("the CredentialsAllowed condition", || {
        credentials_allowed(&env, "messaging")
    })
    .await;
    warn.terminate(common::harness::PATIENCE)
        .await
        .expect("the warn-mode operator exits");

    opt_in(&env, "creds").await;
    let _enforce = env.operator(&["--ca-bundle", &ca_path]);
    let patch = serde_json::json!({"metadata": {"annotations": {
        REFRESH_REQUEST_ANNOTATION: "after-the-upgrade"}}});
    env.tokens()
        .patch("messaging", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("ask for a refresh");
    let second = refreshed(&env, "messaging", &first).await;

    // The scheduled refresh may come too: the new token descends from the old one,
    // the old one from the seed, in one chain.
    let chain = descendants(&env.sim.refresh_log(), &seed);
    let at = |t: &str| chain.iter().position(|c| c == t);
    assert_eq!(
        at(&first),
        Some(1),
        "the first token is not the seed's successor"
    );
    assert!(
        at(&second) > at(&first),
        "the token after the upgrade does not descend from the one before it"
    );
    assert!(
        !has_event(&env, "messaging", "Normal", "SeedRotated").await,
        "the upgrade started a new chain from the seed"
    );
    assert!(
        env.sim.revoked_uses().is_empty(),
        "{} revoked tokens were presented",
        env.sim.revoked_uses().len()
    );
    env.eventually("the condition to go under enforce", || async {
        credentials_allowed(&env, "messaging")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    env.finish().await;
}

/// A list the operator cannot use stops it at start, naming the flag and the entry.
#[test]
fn a_bad_allowed_endpoints_list_stops_the_operator_at_start() {
    for (list, why) in [
        ("https://api.syniverse.com", "not the URL"),
        ("*", "wildcard"),
        ("", "no host given"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_scg-token-operator"))
            .args(["run", &format!("--allowed-endpoints={list}")])
            .env_clear()
            .output()
            .expect("run the operator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{list:?} was accepted");
        assert!(
            stderr.contains("--allowed-endpoints") && stderr.contains(why),
            "{list:?}: {stderr}"
        );
    }
}
