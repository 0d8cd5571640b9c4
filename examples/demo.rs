//! The no-cluster demo: an in-memory Kubernetes API server, an SCG simulator handing out
//! 12-second tokens, and the real controller, refreshing two ScgTokens live.
//!
//! ```text
//! cargo run --example demo                       # until Ctrl-C
//! DEMO_SECONDS=20 cargo run --example demo       # stop by itself
//! ```
//! While it runs, `kubectl --kubeconfig <printed path> get scgtokens` works too.

use std::{
    collections::BTreeSet,
    io::Write,
    sync::Arc,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_openapi::{
    api::{core::v1::Secret, events::v1::Event},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, CustomResourceExt,
    api::{ListParams, PostParams},
};
use scg_token_operator::{
    Config,
    access::{self, AllowedEndpoints, CredentialsPolicy},
    crd::{ScgToken, ScgTokenSpec},
    policy::SystemClock,
    scg::HttpTokenApi,
};
use testkit::{
    apiserver::ApiServer,
    scgsim::{ScgSimulator, SimConfig},
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The operator's own log lines would scroll the live view away: warnings only.
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    let stop_after = std::env::var("DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);

    let api = ApiServer::start().await?;
    let sim = ScgSimulator::start(SimConfig {
        validity_cap: Duration::from_secs(12),
        ..SimConfig::default()
    })
    .await?;
    let client = api.client();
    println!("scg-token-operator demo");
    println!("  Kubernetes API (in memory): {}", api.url());
    println!(
        "  kubeconfig:                 {}",
        api.kubeconfig_path().display()
    );
    println!("  SCG simulator:              {}", sim.refresh_url());
    println!(
        "  try: kubectl --kubeconfig {} get scgtokens",
        api.kubeconfig_path().display()
    );
    println!();

    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ScgToken::crd())
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let tokens: Api<ScgToken> = Api::namespaced(client.clone(), "default");
    for (name, key, tune) in [
        ("messaging", "demo-messaging-app", None),
        ("voice", "demo-voice-app", Some("4s")),
    ] {
        let seed = sim.add_app(key, "demo-consumer-secret");
        let mut credentials = Secret {
            metadata: ObjectMeta {
                name: Some(format!("{name}-credentials")),
                ..Default::default()
            },
            string_data: Some(
                [
                    ("consumerKey", key),
                    ("consumerSecret", "demo-consumer-secret"),
                    ("accessToken", seed.as_str()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        };
        // The label that lets the operator read the Secret as credentials.
        access::opt_in(&mut credentials.metadata);
        secrets.create(&PostParams::default(), &credentials).await?;
        let mut spec = ScgTokenSpec::new(&format!("{name}-credentials"));
        spec.endpoint = sim.refresh_url();
        spec.validity = "1h".into();
        spec.refresh_before = tune.map(String::from);
        spec.target.name = Some(format!("{name}-scg-token"));
        tokens
            .create(&PostParams::default(), &ScgToken::new(name, spec))
            .await?;
    }

    let operator = tokio::spawn(scg_token_operator::run(
        client.clone(),
        Config {
            namespace: None,
            allow_insecure: true,
            allowed_endpoints: AllowedEndpoints::parse("127.0.0.1")?,
            credentials_policy: CredentialsPolicy::Enforce,
            admin_addr: None,
            election: None,
            identity: "demo".into(),
            token_api: Arc::new(HttpTokenApi::new()?),
            clock: Arc::new(SystemClock),
            max_refresh_rate: None,
            concurrent_reconciles: 8,
            consumer_reports: false,
        },
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    ));

    let started = Instant::now();
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let mut shown = BTreeSet::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        if stop_after.is_some_and(|d| started.elapsed() >= d) || operator.is_finished() {
            break;
        }
        let now = Timestamp::now();
        let mut out = String::new();
        out.push_str(&format!(
            "\n[{:>3}s] {:<10} {:<6} {:<18} {:>11} {:>14} {:>9}\n",
            started.elapsed().as_secs(),
            "SCGTOKEN",
            "READY",
            "TOKEN FINGERPRINT",
            "EXPIRES IN",
            "NEXT REFRESH",
            "VALID NOW"
        ));
        for t in tokens.list(&ListParams::default()).await?.items {
            let status = t.status.clone().unwrap_or_default();
            let ready = t.ready_condition().map_or("-".into(), |c| c.status.clone());
            let until = |at: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
                at.map_or("-".into(), |at| {
                    format!("{:.1}s", at.0.duration_since(now).as_secs_f64())
                })
            };
            let target = secrets.get_opt(&t.target_name()).await?;
            // The demo asks the simulator whether the stored token works right now; it
            // never prints the token itself.
            let valid = target
                .and_then(|s| s.data?.get("accessToken").cloned())
                .and_then(|b| String::from_utf8(b.0).ok())
                .is_some_and(|tok| sim.is_valid(&tok));
            out.push_str(&format!(
                "       {:<10} {:<6} {:<18} {:>11} {:>14} {:>9}\n",
                kube::ResourceExt::name_any(&t),
                ready,
                status.token_fingerprint.unwrap_or_else(|| "-".into()),
                until(status.expires_at.as_ref()),
                until(status.next_refresh_at.as_ref()),
                if valid { "yes" } else { "NO" },
            ));
        }
        for e in events.list(&ListParams::default()).await?.items {
            let id = e.metadata.name.clone().unwrap_or_default();
            if shown.insert(id) {
                out.push_str(&format!(
                    "       event: {} {} {}: {}\n",
                    e.type_.unwrap_or_default(),
                    e.regarding.and_then(|r| r.name).unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default()
                ));
            }
        }
        out.push_str(&format!(
            "       simulator: {} tokens issued, {} revoked tokens presented\n",
            sim.successful_refreshes(),
            sim.revoked_uses().len()
        ));
        print!("{out}");
        std::io::stdout().flush()?;
    }
    operator.abort();
    println!(
        "\ndemo finished: {} refreshes, {} uses of a revoked token",
        sim.successful_refreshes(),
        sim.revoked_uses().len()
    );
    Ok(())
}
