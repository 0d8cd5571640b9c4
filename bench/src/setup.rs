//! The objects a run needs: the CRD, N applications in the simulator with their
//! credentials Secrets and ScgTokens, and the unrelated Secrets.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    ByteString, api::core::v1::Secret,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, CustomResourceExt, api::PostParams};
use scg_token_operator::crd::{ScgToken, ScgTokenSpec};
use testkit::scgsim::ScgSimulator;

/// Namespace of everything the bench creates, and the one the operator watches.
pub const NAMESPACE: &str = "default";
/// Consumer secret of every bench application (a made-up value).
pub const CONSUMER_SECRET: &str = "bench-consumer-secret";
/// Requests in flight while creating objects.
const CONCURRENCY: usize = 64;

/// One ScgToken of the run.
pub struct TokenSetup {
    pub name: String,
    pub consumer_key: String,
    /// The seed token of its chain (a simulator value, never printed).
    pub seed: String,
    /// As created (uid set): for fingerprints and the schedule's jitter key.
    pub obj: ScgToken,
}

pub fn token_name(i: usize) -> String {
    format!("t{i:05}")
}

pub fn consumer_key(name: &str) -> String {
    format!("key-{name}")
}

/// A Go duration of whole seconds, as the CRD accepts it.
pub fn go_duration(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

pub async fn install_crd(client: &kube::Client) -> Result<(), kube::Error> {
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ScgToken::crd())
        .await
        .map(|_| ())
}

/// Registers applications `range` with the simulator and creates their credentials Secrets
/// and ScgTokens, `CONCURRENCY` requests at a time.
pub async fn create_tokens(
    client: &kube::Client,
    sim: &ScgSimulator,
    range: std::ops::Range<usize>,
    spec: &ScgTokenSpec,
) -> Result<Vec<TokenSetup>, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let tokens: Api<ScgToken> = Api::namespaced(client.clone(), NAMESPACE);
    let made = futures::stream::iter(range)
        .map(|i| {
            let (secrets, tokens) = (secrets.clone(), tokens.clone());
            let name = token_name(i);
            let key = consumer_key(&name);
            let seed = sim.add_app(&key, CONSUMER_SECRET);
            let seed_kept = seed.clone();
            let mut spec = spec.clone();
            spec.credentials_secret_ref.name = format!("{name}-creds");
            async move {
                let mut creds = Secret {
                    metadata: ObjectMeta {
                        name: Some(spec.credentials_secret_ref.name.clone()),
                        ..Default::default()
                    },
                    string_data: Some(BTreeMap::from([
                        ("consumerKey".to_string(), key.clone()),
                        ("consumerSecret".to_string(), CONSUMER_SECRET.to_string()),
                        ("accessToken".to_string(), seed),
                    ])),
                    ..Default::default()
                };
                scg_token_operator::access::opt_in(&mut creds.metadata);
                secrets.create(&PostParams::default(), &creds).await?;
                let mut obj = ScgToken::new(&name, spec);
                obj.metadata.namespace = Some(NAMESPACE.into());
                let obj = tokens.create(&PostParams::default(), &obj).await?;
                Ok::<_, kube::Error>(TokenSetup {
                    name,
                    consumer_key: key,
                    seed: seed_kept,
                    obj,
                })
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(made)
}

/// Creates `m` Secrets that no ScgToken refers to, each with `bytes` of data in two keys
/// and a few labels, like the TLS and Helm release Secrets of a busy cluster. Returns
/// how long it took.
pub async fn create_unrelated(
    client: &kube::Client,
    m: usize,
    bytes: usize,
) -> Result<Duration, kube::Error> {
    let started = Instant::now();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let mut done = 0usize;
    let mut created = futures::stream::iter(0..m)
        .map(|i| {
            let secrets = secrets.clone();
            async move {
                let s = unrelated_secret(i, bytes);
                secrets.create(&PostParams::default(), &s).await.map(|_| ())
            }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(r) = created.next().await {
        r?;
        done += 1;
        if done.is_multiple_of(20_000) {
            eprintln!(
                "  {done} unrelated Secrets created ({:.0}/s)",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(started.elapsed())
}

fn unrelated_secret(i: usize, bytes: usize) -> Secret {
    // Varied bytes, so nothing downstream can share or compress them.
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(bytes);
    for _ in 0..bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.push(x as u8);
    }
    let (cert, key) = data.split_at(bytes * 2 / 3);
    Secret {
        metadata: ObjectMeta {
            name: Some(format!("unrelated-{i:06}")),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/name".to_string(),
                    format!("app-{}", i % 500),
                ),
                ("owner".to_string(), "helm".to_string()),
            ])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), ByteString(cert.to_vec())),
            ("tls.key".to_string(), ByteString(key.to_vec())),
        ])),
        ..Default::default()
    }
}
