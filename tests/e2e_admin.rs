//! End to end: what the people who run the operator rely on. Its admin endpoints report
//! health, readiness and metrics without a secret in them, and a SIGTERM (a rolling
//! update, a drained node) lets the refresh in flight store its token and hands the Lease
//! back.

mod common {
    pub mod admin;
    pub mod harness;
    pub mod metrics;
    pub mod proxy;
}

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::admin::{admin_addr, get_path, http, metrics_text, not_ready_message, readyz_ok};
use common::harness::{
    CONSUMER_KEY, CONSUMER_SECRET, Env, Operator, PATIENCE, UNKNOWN_CONSUMER, UNKNOWN_SEED, lease,
    lease_holder, poll_until, short, wait_target_change,
};
use common::metrics::{metric, parse_metrics};
use common::proxy::CallTap;
use scg_token_operator::chain::TOKEN_FINGERPRINT;
use testkit::scgsim::{Fault, SimConfig};

// ---------------------------------------------------------------------------------------
// Admin endpoints and metrics
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_readiness_and_metrics_without_secrets() {
    let env = Env::start(SimConfig {
        validity_cap: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    env.put_credentials("bad-creds", UNKNOWN_CONSUMER, UNKNOWN_SEED)
        .await;
    env.scgtoken("metered", "creds", |_| {}).await;
    env.scgtoken("broken", "bad-creds", |_| {}).await;
    let ns = env.namespace.clone();

    // Against the in-memory server, first keep the caches from syncing: alive, not ready.
    let faults = env.api.as_ref().map(|a| a.faults());
    if let Some(f) = &faults {
        f.fail_next("list", "scgtokens", 1_000_000, 500);
    }
    let op = env.operator(&[]);
    let addr = admin_addr(&op).await;
    let http = http();
    let (code, body) = env
        .eventually("/healthz to answer", || get_path(&http, addr, "/healthz"))
        .await;
    assert_eq!(code, 200, "/healthz: {body}");
    match &faults {
        Some(f) => {
            for _ in 0..5 {
                let (code, _) = get_path(&http, addr, "/readyz").await.expect("/readyz");
                assert_eq!(code, 503, "/readyz before the caches synced");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            f.fail_next("list", "scgtokens", 0, 500);
        }
        None => eprintln!("note: /readyz before sync is only checked on the in-memory server"),
    }

    // Two refreshes of the good token; the bad one is rejected.
    let first = wait_target_change(&env, "metered", Some(&seed), PATIENCE)
        .await
        .expect("a first token");
    wait_target_change(&env, "metered", Some(&first), PATIENCE)
        .await
        .expect("a second token");
    env.eventually("broken: Ready=False Rejected", || async {
        env.ready("broken")
            .await
            .filter(|(s, r)| s == "False" && r == "Rejected")
    })
    .await;

    // A consistent sample: the simulator's count and the target did not move meanwhile.
    let (text, secret) = env
        .eventually("a consistent metrics sample", || async {
            let n = env.sim.successful_refreshes();
            let secret = env.secrets().get_opt("metered").await.ok()??;
            let text = metrics_text(&http, addr).await?;
            let again = env.secrets().get_opt("metered").await.ok()??;
            let m = parse_metrics(&text);
            let good = [("namespace", ns.as_str()), ("name", "metered")];
            let counted = metric(&m, "scgtoken_refreshes_total", &good);
            (n == env.sim.successful_refreshes()
                && secret.metadata.resource_version == again.metadata.resource_version
                && counted == Some(n as f64)
                && metric(&m, "scgtoken_ready", &good) == Some(1.0))
            .then_some((text, secret))
        })
        .await;

    // No secret in the metrics.
    let mut planted = env.sim.issued_tokens();
    planted.push(CONSUMER_SECRET.to_string());
    planted.push(UNKNOWN_SEED.to_string());
    for s in &planted {
        assert!(
            !text.contains(s.as_str()),
            "/metrics contains a secret ({})",
            short(s)
        );
    }

    let m = parse_metrics(&text);
    let good = [("namespace", ns.as_str()), ("name", "metered")];
    let bad = [("namespace", ns.as_str()), ("name", "broken")];
    let annotation = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("scgtoken.io/expires-at"))
        .and_then(|v| v.parse::<jiff::Timestamp>().ok())
        .expect("the target's expiry annotation");
    let expiry = metric(&m, "scgtoken_token_expiry_timestamp_seconds", &good)
        .expect("scgtoken_token_expiry_timestamp_seconds");
    let annotated = annotation.as_millisecond() as f64 / 1000.0;
    assert!(
        (expiry - annotated).abs() < 1.0,
        "expiry metric {expiry} vs the Secret's {annotated}"
    );
    let next = metric(&m, "scgtoken_next_refresh_timestamp_seconds", &good)
        .expect("scgtoken_next_refresh_timestamp_seconds");
    assert!(
        next < expiry && next > expiry - 3.0,
        "next refresh {next} vs expiry {expiry}"
    );
    assert_eq!(metric(&m, "scgtoken_ready", &good), Some(1.0));
    assert_eq!(metric(&m, "scgtoken_ready", &bad), Some(0.0));
    assert_eq!(
        metric(&m, "scgtoken_consecutive_failures", &good),
        Some(0.0)
    );
    assert!(metric(&m, "scgtoken_consecutive_failures", &bad).is_some_and(|v| v >= 1.0));
    assert!(
        metric(
            &m,
            "scgtoken_refreshes_total",
            &[("name", "broken"), ("result", "rejected")]
        )
        .is_some_and(|v| v >= 1.0),
        "no rejected refresh counted"
    );
    let calls = metric(&m, "scgtoken_refresh_duration_seconds_count", &[]).unwrap_or(0.0);
    assert!(calls >= 3.0, "refresh_duration count {calls}");
    assert!(metric(&m, "scgtoken_refresh_duration_seconds_sum", &[]).is_some());
    // Passes are counted as they end: the pass of the second token may still be
    // publishing, so at least the first one's and the broken token's.
    assert!(
        metric(&m, "scgtoken_reconciles_total", &[]).is_some_and(|v| v >= 2.0),
        "scgtoken_reconciles_total"
    );
    assert!(metric(&m, "scgtoken_reconcile_duration_seconds_count", &[]).is_some_and(|v| v >= 2.0));
    assert_eq!(metric(&m, "scgtoken_leader", &[]), Some(1.0));

    // Labels: ScgToken namespace and name (and fixed words), nothing else.
    for s in &m {
        assert!(s.name.starts_with("scgtoken_"), "foreign metric {}", s.name);
        let keys: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
        let allowed: &[&str] = if s.name.ends_with("_bucket") {
            &["le"]
        } else if s.name.starts_with("scgtoken_refreshes") {
            &["namespace", "name", "result"]
        } else if s.name.starts_with("scgtoken_reconcile_errors") {
            &["error"]
        } else {
            &["namespace", "name"]
        };
        assert!(
            keys.iter().all(|k| allowed.contains(k)),
            "{} has labels {keys:?}",
            s.name
        );
        if let Some(n) = s.labels.get("namespace") {
            assert_eq!(n, &ns);
            let name = s.labels.get("name").map(String::as_str);
            assert!(
                matches!(name, Some("metered" | "broken")),
                "{} has name {name:?}",
                s.name
            );
        }
    }
    for family in [
        "scgtoken_token_expiry_timestamp_seconds",
        "scgtoken_next_refresh_timestamp_seconds",
        "scgtoken_ready",
        "scgtoken_consecutive_failures",
    ] {
        let keys: BTreeSet<_> = m
            .iter()
            .filter(|s| s.name == family)
            .map(|s| s.labels.keys().cloned().collect::<Vec<_>>())
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from([vec!["name".to_string(), "namespace".to_string()]]),
            "{family} must be labelled by namespace and name only"
        );
    }
    for needle in [
        "# TYPE scgtoken_refresh_duration_seconds histogram",
        "# TYPE scgtoken_reconcile_duration_seconds histogram",
        "scgtoken_refreshes_total{",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }

    // Readiness last: the caches have long synced (tokens were refreshed).
    assert!(
        readyz_ok(&http, addr, Duration::from_secs(15)).await,
        "{}",
        not_ready_message(&op)
    );
    env.finish().await;
}

// ---------------------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------------------

/// `--concurrent-reconciles` bounds the passes, and so the refresh calls, in flight: with
/// 2, six ScgTokens due together are refreshed two at a time while the simulator holds
/// each call 600 ms, so no three calls fall within one call's length (a third can only
/// start once one of the first two has ended). Unbounded, all six arrive at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reconciles_bounds_the_refreshes_in_flight() {
    let env = Env::start(SimConfig::default()).await;
    for i in 0..6 {
        let creds = format!("creds-{i}");
        env.credentials(&creds, &format!("app-{i}")).await;
        env.scgtoken(&format!("bounded-{i}"), &creds, |_| {}).await;
    }
    let hold = Duration::from_millis(600);
    env.sim.set_fault(Fault::Delay(hold), Some(6));
    let _op = env.operator(&["--concurrent-reconciles=2"]);
    assert!(
        env.sim.wait_refreshes(6, PATIENCE).await,
        "six first refreshes"
    );
    let mut arrivals: Vec<_> = env.sim.refresh_log().iter().map(|c| c.at).collect();
    arrivals.sort();
    for three in arrivals.windows(3) {
        let span = three[2].duration_since(three[0]).unwrap_or_default();
        assert!(
            span >= hold,
            "three refresh calls within {span:?}: more than 2 in flight"
        );
    }
    env.finish().await;
}

/// SIGTERM ends the operator even when it never reached the Kubernetes API (its caches
/// never synced): nothing was started, so nothing is left to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_an_operator_that_never_reached_the_api_server() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let kubeconfig = std::env::temp_dir().join(format!(
        "scg-unreachable-{}-{closed_port}.kubeconfig",
        std::process::id()
    ));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"http://127.0.0.1:{closed_port}\"}}\n\
             users:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\n\
             current-context: c\n"
        ),
    )
    .expect("write kubeconfig");
    let args: Vec<String> = [
        "run",
        "--admin-addr=127.0.0.1:0",
        "--leader-elect=false",
        "--namespace=default",
    ]
    .map(String::from)
    .into();
    let mut op = Operator::spawn(&kubeconfig, &args, &[]);
    poll_until("a failed first list", Duration::from_millis(50), || async {
        op.logs().contains("initial object list").then_some(())
    })
    .await;
    let status = op.terminate(PATIENCE).await;
    let _ = std::fs::remove_file(&kubeconfig);
    let logs = op.logs();
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit after SIGTERM: {status:?}\n{logs}"
    );
    assert!(logs.contains("stopping before the caches synced"), "{logs}");
}

/// A rotation costs the API server one pass: the operator's own Secret write and status
/// write start no further pass (on either server, counted by the operator's own metric).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_is_one_pass_its_own_writes_start_no_other() {
    let env = Env::start(SimConfig {
        validity_cap: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("counted", "creds", |_| {}).await;
    let op = env.operator(&[]);
    let addr = admin_addr(&op).await;
    let http = http();
    let first = wait_target_change(&env, "counted", Some(&seed), PATIENCE)
        .await
        .expect("a first token");
    let passes = || async {
        let text = metrics_text(&http, addr).await?;
        metric(&parse_metrics(&text), "scgtoken_reconciles_total", &[])
    };
    // A pass is over when status shows the token the target holds.
    let reported = || async {
        let secret = env.secrets().get_opt("counted").await.ok()??;
        let stored = secret.metadata.annotations?.get(TOKEN_FINGERPRINT)?.clone();
        let status = env.tokens().get("counted").await.ok()?.status?;
        let token = secret.data?.get("accessToken")?.0.clone();
        (status.token_fingerprint? == stored).then(|| String::from_utf8(token).ok())
    };
    env.eventually("the first pass to finish", reported).await;
    let (before, refreshed) = (
        passes().await.expect("/metrics"),
        env.sim.successful_refreshes(),
    );

    const ROTATIONS: usize = 4;
    assert!(
        env.sim
            .wait_refreshes(refreshed + ROTATIONS, PATIENCE)
            .await,
        "{ROTATIONS} rotations after {first:?}"
    );
    // The last rotation's pass ends with its status write.
    let newest = env
        .sim
        .current_token(CONSUMER_KEY)
        .expect("a current token");
    env.eventually("the last token stored and reported", || async {
        (reported().await? == Some(newest.clone())).then_some(())
    })
    .await;
    let after = passes().await.expect("/metrics");
    let per_rotation = (after - before) / ROTATIONS as f64;
    assert!(
        per_rotation <= 1.25,
        "{} passes for {ROTATIONS} rotations ({per_rotation:.2} per rotation); operator log:\n{}",
        after - before,
        op.logs()
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refresh_stores_its_token_and_releases_the_lease() {
    const TARGET: &str = "graceful";
    let env = Env::start(SimConfig {
        validity_cap: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let tap = CallTap::start(env.sim.addr()).await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    let url = tap.refresh_url();
    env.scgtoken(TARGET, "creds", |s| s.endpoint = url).await;

    // The first refresh (of the seed, which lives long) is slow: the simulator holds it.
    let delay = Duration::from_secs(3);
    env.sim.set_fault(Fault::Delay(delay), Some(1));
    let mut op = env.operator(&["--leader-elect=true", "--identity=graceful"]);
    assert!(tap.wait_requests(1, PATIENCE).await, "no call");
    assert_eq!(
        lease_holder(&env).await.as_deref(),
        Some("graceful"),
        "the refreshing replica holds the Lease"
    );
    // SIGTERM while the simulator holds the call.
    let before = 0;
    assert_eq!(
        env.sim.refresh_calls(),
        before,
        "the slow call was answered before SIGTERM"
    );
    let sent = Instant::now();
    let status = op.terminate(Duration::from_secs(25)).await;
    let exited_after = sent.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?} (None: still running after 25 s)\n{}",
        op.logs()
    );

    // The slow call finished, its token is stored, and nothing was started after it.
    assert_eq!(
        env.sim.refresh_calls(),
        before + 1,
        "a refresh was started after SIGTERM"
    );
    let call = env
        .sim
        .refresh_log()
        .last()
        .cloned()
        .expect("the slow call");
    assert_eq!(call.old_token.as_deref(), Some(seed.as_str()));
    let issued = call
        .issued()
        .unwrap_or_else(|| panic!("the slow call failed: {:?}", call.outcome))
        .to_string();
    let target = env.target_token(TARGET).await.expect("a target Secret");
    assert_eq!(
        target,
        issued,
        "the token of the call in flight at SIGTERM is not in the target (lost: {})",
        short(&issued)
    );
    assert!(env.sim.is_valid(&target));
    let lease = lease(&env).await.expect("the Lease exists");
    assert!(
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            .is_none_or(str::is_empty),
        "the Lease is still held after a graceful exit: {:?}",
        lease.spec
    );
    assert!(env.sim.revoked_uses().is_empty());
    eprintln!(
        "graceful shutdown: exit 0 {exited_after:?} after SIGTERM (the call was held {delay:?})"
    );
    env.finish().await;
}

// ---------------------------------------------------------------------------------------
// JSON logs
// ---------------------------------------------------------------------------------------

/// Parses one JSON value and refuses an object that names a key twice: serde_json, like
/// many log processors, would keep one of the two silently.
struct UniqueKeys;

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(UniqueKeys)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("key {key:?} twice")));
            }
            map.next_value_seed(UniqueKeys)?;
        }
        Ok(())
    }
}

#[test]
fn the_duplicate_key_check_can_fail() {
    let parse = |s: &str| {
        serde::de::DeserializeSeed::deserialize(
            UniqueKeys,
            &mut serde_json::Deserializer::from_str(s),
        )
    };
    assert!(parse(r#"{"a":1,"b":{"c":[1,{"d":2}]}}"#).is_ok());
    assert!(parse(r#"{"fields":{"message":"warning","message":"x"}}"#).is_err());
}

/// Every line of the operator's JSON log is one object with each key once, a Warning
/// (logged with its Event's note) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_name_each_key_once() {
    let env = Env::start(SimConfig::default()).await;
    env.credentials("creds", CONSUMER_KEY).await;
    env.put_credentials("bad-creds", UNKNOWN_CONSUMER, UNKNOWN_SEED)
        .await;
    env.scgtoken("good", "creds", |_| {}).await;
    env.scgtoken("broken", "bad-creds", |_| {}).await;
    let mut op = env.operator(&["--log-format=json"]);
    env.eventually("broken: Ready=False Rejected, good: Ready", || async {
        let broken = env
            .ready("broken")
            .await
            .filter(|(s, r)| s == "False" && r == "Rejected");
        let good = env.ready("good").await.filter(|(s, _)| s == "True");
        broken.and(good)
    })
    .await;
    op.terminate(PATIENCE)
        .await
        .expect("the operator exits on SIGTERM");
    let logs = op.logs();
    let mut warnings = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let mut de = serde_json::Deserializer::from_str(line);
        if let Err(e) = serde::de::DeserializeSeed::deserialize(UniqueKeys, &mut de) {
            panic!("log line with {e}: {line}");
        }
        warnings += usize::from(line.contains("\"WARN\"") && line.contains("Rejected"));
    }
    assert!(
        warnings > 0,
        "no Warning logged for the rejected token:\n{logs}"
    );
    env.finish().await;
}
