//! End to end: what happens to a running token chain when people and infrastructure do
//! things to it. A human rotates the seed, deletes the target Secret or the ScgToken,
//! feeds the operator bad input, the SCG API or the Kubernetes API goes away for a
//! while, and a user drives the product with kubectl and the README's example manifests.
//!
//! Every sampled "valid" check runs against a simulator with a grace period of a second:
//! between the moment a refresh revokes the old token and the moment the new one lands in
//! the Secret there is always a short window, and a consumer needs time to re-read the
//! Secret anyway. The grace never extends a token past its expiry.

mod common {
    pub mod harness;
}

use std::time::{Duration, Instant};

use common::harness::{CONSUMER_KEY, CONSUMER_SECRET, Env, Operator, PATIENCE, descendants};
use k8s_openapi::{
    ByteString,
    api::{core::v1::Secret, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use scg_token_operator::crd::{
    DeletionPolicy, MANAGED_BY_LABEL, MANAGED_BY_VALUE, OWNER_ANNOTATION,
    REFRESH_REQUEST_ANNOTATION, ScgToken, ScgTokenSpec,
};
use testkit::scgsim::{Fault, Outcome, SimConfig};

/// Grace of a replaced token on the protected endpoint; see the module docs.
const GRACE: Duration = Duration::from_secs(1);

fn sim_config(validity_cap_secs: u64) -> SimConfig {
    SimConfig {
        validity_cap: Duration::from_secs(validity_cap_secs),
        grace: GRACE,
        ..SimConfig::default()
    }
}

/// A spec as [`Env::scgtoken`] makes it, for objects whose creation may fail.
fn spec(env: &Env, credentials: &str) -> ScgTokenSpec {
    let mut spec = ScgTokenSpec::new(credentials);
    spec.endpoint = env.sim.refresh_url();
    spec.validity = "30s".into();
    spec
}

async fn create_token(env: &Env, name: &str, spec: ScgTokenSpec) -> Result<ScgToken, kube::Error> {
    let mut obj = ScgToken::new(name, spec);
    obj.metadata.namespace = Some(env.namespace.clone());
    env.tokens().create(&PostParams::default(), &obj).await
}

/// Whether an events.k8s.io/v1 Event of `type_` and `reason` about the ScgToken `name`
/// exists in the test's namespace.
async fn has_event(env: &Env, name: &str, type_: &str, reason: &str) -> bool {
    let api: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let Ok(list) = api.list(&ListParams::default()).await else {
        return false;
    };
    list.items.iter().any(|e| {
        e.reason.as_deref() == Some(reason)
            && e.type_.as_deref() == Some(type_)
            && e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("ScgToken") && r.name.as_deref() == Some(name)
            })
    })
}

async fn wait_event(env: &Env, name: &str, type_: &str, reason: &str) {
    env.eventually(
        &format!("a {type_} Event {reason} about {name}"),
        || async { has_event(env, name, type_, reason).await.then_some(()) },
    )
    .await;
}

async fn wait_ready(env: &Env, name: &str, status: &str, reason: &str) {
    env.eventually(&format!("{name} Ready={status} ({reason})"), || async {
        env.ready(name)
            .await
            .filter(|(s, r)| s == status && r == reason)
            .map(|_| ())
    })
    .await;
}

/// Waits for the first token of a chain (anything but the seed) in `target`.
async fn first_token(env: &Env, target: &str, seed: &str) -> String {
    env.eventually(&format!("the first token in {target}"), || async {
        env.target_token(target).await.filter(|t| t != seed)
    })
    .await
}

fn to_timestamp(t: std::time::SystemTime) -> jiff::Timestamp {
    jiff::Timestamp::try_from(t).expect("a time after 1970")
}

/// Scenario 1: a human re-generates the token in the SDC UI (which revokes the running
/// chain) and puts the new seed into the credentials Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_seed_starts_a_new_chain_at_once() {
    // 15 s tokens: the next scheduled refresh is ~10 s away, so a new chain that starts
    // before then was started by the Secret change, not by the schedule.
    let env = Env::start(sim_config(15)).await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let _op = env.operator(&[]);

    let first = first_token(&env, "messaging", &seed).await;
    wait_ready(&env, "messaging", "True", "Refreshed").await;
    let before = env.tokens().get("messaging").await.unwrap().status.unwrap();
    let scheduled = before.next_refresh_at.clone().expect("nextRefreshAt").0;

    let new_seed = env.sim.regenerate(CONSUMER_KEY);
    assert!(!env.sim.is_valid(&first), "regenerate revokes the chain");
    env.put_credentials("creds", CONSUMER_KEY, &new_seed).await;

    let token = env
        .eventually(
            "a token descended from the new seed in the target",
            || async {
                let t = env.target_token("messaging").await?;
                let chain = descendants(&env.sim.refresh_log(), &new_seed);
                (chain.len() > 1 && chain[1..].contains(&t)).then_some(t)
            },
        )
        .await;
    assert!(env.sim.is_valid(&token), "the new chain's token is dead");
    let started = env
        .sim
        .refresh_log()
        .into_iter()
        .find(|c| c.old_token.as_deref() == Some(new_seed.as_str()) && c.issued().is_some())
        .expect("a refresh of the new seed");
    assert!(
        to_timestamp(started.at) < scheduled,
        "the new chain started only at {} although the old one was scheduled for {scheduled}: \
         the credentials change did not trigger it",
        to_timestamp(started.at)
    );

    wait_event(&env, "messaging", "Normal", "SeedRotated").await;
    env.eventually("Ready True on the new chain", || async {
        let s = env.tokens().get("messaging").await.ok()?.status?;
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "True"
            && ready.reason == "Refreshed"
            && s.token_fingerprint != before.token_fingerprint)
            .then_some(())
    })
    .await;
    // The revoked chain was never presented again.
    assert!(
        env.sim.revoked_uses().is_empty(),
        "{:?}",
        env.sim.revoked_uses()
    );
    env.finish().await;
}

/// Scenario 2: a user deletes the target Secret; the operator puts the same token back
/// without a refresh call and the chain goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_target_secret_comes_back_with_the_same_token() {
    // 8 s tokens: the next refresh is ~5 s after the first token.
    let env = Env::start(sim_config(8)).await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let _op = env.operator(&[]);

    let token = first_token(&env, "messaging", &seed).await;
    let calls = env.sim.refresh_calls();
    let successes = env.sim.successful_refreshes();
    env.secrets()
        .delete("messaging", &DeleteParams::default())
        .await
        .expect("delete the target Secret");

    let back = env
        .eventually("the target Secret to come back", || async {
            env.secrets().get_opt("messaging").await.ok()?
        })
        .await;
    let restored = back
        .data
        .as_ref()
        .and_then(|d| d.get("accessToken"))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned());
    assert_eq!(
        restored.as_deref(),
        Some(token.as_str()),
        "the Secret came back with another token"
    );
    assert_eq!(
        env.sim.refresh_calls(),
        calls,
        "restoring the Secret needed a refresh call"
    );
    assert!(env.sim.is_valid(&token), "the restored token is dead");
    let labels = back.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get(MANAGED_BY_LABEL).map(String::as_str),
        Some(MANAGED_BY_VALUE)
    );

    // The chain was not lost: two more rotations, and no dead token ever presented.
    assert!(
        env.sim.wait_refreshes(successes + 2, PATIENCE).await,
        "rotations stopped after the Secret was restored"
    );
    let current = env
        .eventually("the newest token in the target", || async {
            let current = env.sim.current_token(CONSUMER_KEY)?;
            (env.target_token("messaging").await? == current).then_some(current)
        })
        .await;
    assert!(env.sim.is_valid(&current));
    assert!(
        env.sim.revoked_uses().is_empty(),
        "{:?}",
        env.sim.revoked_uses()
    );
    wait_ready(&env, "messaging", "True", "Refreshed").await;
    env.finish().await;
}

/// Scenario 3: deleting an ScgToken keeps its target Secret (Retain, the default) or
/// has it garbage-collected (Delete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_scgtoken_retains_or_deletes_its_target_by_policy() {
    let env = Env::start(sim_config(20)).await;
    let keep_seed = env.credentials("creds-keep", "key-keep").await;
    let drop_seed = env.credentials("creds-drop", "key-drop").await;
    env.scgtoken("keep", "creds-keep", |_| {}).await;
    env.scgtoken("drop", "creds-drop", |s| {
        s.target.deletion_policy = DeletionPolicy::Delete;
    })
    .await;
    let _op = env.operator(&[]);

    let keep_token = first_token(&env, "keep", &keep_seed).await;
    first_token(&env, "drop", &drop_seed).await;
    let refs = |s: Secret| s.metadata.owner_references.unwrap_or_default();
    let drop_refs = refs(env.secrets().get("drop").await.unwrap());
    assert!(
        drop_refs
            .iter()
            .any(|r| r.kind == "ScgToken" && r.name == "drop" && r.controller == Some(true)),
        "deletionPolicy Delete but no owner reference: {drop_refs:?}"
    );
    let keep_refs = refs(env.secrets().get("keep").await.unwrap());
    assert!(
        keep_refs.is_empty(),
        "deletionPolicy Retain but owned: {keep_refs:?}"
    );

    for name in ["keep", "drop"] {
        env.tokens()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete ScgToken");
    }
    env.eventually("both ScgTokens gone", || async {
        let keep = env.tokens().get_opt("keep").await.ok()?;
        let drop = env.tokens().get_opt("drop").await.ok()?;
        (keep.is_none() && drop.is_none()).then_some(())
    })
    .await;
    env.eventually("the Delete target Secret garbage-collected", || async {
        env.secrets()
            .get_opt("drop")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    // For a while after: the Delete one stays gone (the operator does not recreate it),
    // the Retain one stays with its still-valid token.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(
            env.secrets().get_opt("drop").await.unwrap().is_none(),
            "the deleted target Secret came back"
        );
        assert_eq!(
            env.target_token("keep").await.as_deref(),
            Some(keep_token.as_str()),
            "the retained Secret lost its token"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(env.sim.is_valid(&keep_token), "the retained token is dead");
    env.finish().await;
}

/// Scenario 4: four broken ScgTokens next to a good one. Each says what is wrong, none
/// disturbs the good one or someone else's Secret, and fixing one needs no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_reported_while_a_good_token_keeps_rotating() {
    let env = Env::start(sim_config(4)).await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("good", "creds", |_| {}).await;

    // (a) Both margins set: a real cluster's CEL rule refuses it at create.
    env.credentials("creds-a", "key-a").await;
    let mut invalid = spec(&env, "creds-a");
    invalid.refresh_before = Some("10s".into());
    invalid.refresh_before_percentage = Some(20);
    let invalid_stored = match create_token(&env, "invalid", invalid).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 422 => {
            eprintln!("the API server refused the invalid spec at create (CEL): {s:?}");
            false
        }
        Err(e) => panic!("create the invalid ScgToken: {e}"),
    };
    // (b) The credentials Secret does not exist (yet).
    create_token(&env, "nocreds", spec(&env, "creds-b"))
        .await
        .expect("create nocreds");
    // (c) A key name that the credentials Secret does not have.
    env.credentials("creds-c", "key-c").await;
    let mut wrong_key = spec(&env, "creds-c");
    wrong_key.credentials_secret_ref.consumer_key_key = "consumer-key".into();
    create_token(&env, "wrongkey", wrong_key)
        .await
        .expect("create wrongkey");
    // (d) The target name is taken by somebody else's Secret.
    env.credentials("creds-d", "key-d").await;
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("foreign".into()),
            labels: Some([("app".to_string(), "someone-else".to_string())].into()),
            ..ObjectMeta::default()
        },
        data: Some([("accessToken".to_string(), ByteString(b"not-yours".to_vec()))].into()),
        ..Secret::default()
    };
    let foreign = env
        .secrets()
        .create(&PostParams::default(), &foreign)
        .await
        .expect("create the foreign Secret");
    create_token(&env, "foreign", spec(&env, "creds-d"))
        .await
        .expect("create foreign");

    let _op = env.operator(&[]);

    let mut expected = vec![
        ("nocreds", "CredentialsNotFound"),
        ("wrongkey", "CredentialsNotFound"),
        ("foreign", "TargetConflict"),
    ];
    if invalid_stored {
        expected.push(("invalid", "InvalidSpec"));
    }
    // Sample the good target until it has rotated twice and every broken one says why.
    let mut seen: Vec<String> = Vec::new();
    let mut reported: Vec<&str> = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while seen.len() < 3 || reported.len() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "only {} good tokens seen; reported: {reported:?} of {expected:?}",
            seen.len()
        );
        if let Some(token) = env.target_token("good").await.filter(|t| *t != seed) {
            assert!(
                env.sim.is_valid(&token),
                "the good target held a dead token"
            );
            if seen.last() != Some(&token) {
                seen.push(token);
            }
        }
        for (name, reason) in &expected {
            if !reported.contains(name)
                && env.ready(name).await == Some(("False".into(), reason.to_string()))
            {
                reported.push(name);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, reason) in &expected {
        wait_event(&env, name, "Warning", reason).await;
        assert_eq!(
            env.ready(name).await,
            Some(("False".into(), reason.to_string())),
            "{name} changed its mind"
        );
    }
    let after = env.secrets().get("foreign").await.unwrap();
    assert_eq!(
        after.data, foreign.data,
        "the foreign Secret's data changed"
    );
    assert_eq!(after.metadata.labels, foreign.metadata.labels);
    assert_eq!(after.metadata.annotations, foreign.metadata.annotations);
    assert_eq!(
        after.metadata.resource_version, foreign.metadata.resource_version,
        "the foreign Secret was written"
    );
    for (key, name) in [
        ("key-a", "invalid"),
        ("key-c", "wrongkey"),
        ("key-d", "foreign"),
    ] {
        assert!(
            env.sim
                .refresh_log()
                .iter()
                .all(|c| c.consumer_key.as_deref() != Some(key)),
            "{name} called the refresh API"
        );
    }

    // Fix (b): the Secret watch alone must wake it up (it has nothing scheduled).
    let seed_b = env.credentials("creds-b", "key-b").await;
    wait_ready(&env, "nocreds", "True", "Refreshed").await;
    let token_b = first_token(&env, "nocreds", &seed_b).await;
    assert!(env.sim.is_valid(&token_b));
    wait_ready(&env, "good", "True", "Refreshed").await;
    assert!(
        env.sim.revoked_uses().is_empty(),
        "{:?}",
        env.sim.revoked_uses()
    );
    env.finish().await;
}

/// Scenario 5: the SCG API is down for 1.5 s exactly when a refresh is due, with 4 s of
/// margin left: consumers never see a dead token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_scg_outage_never_leaves_a_dead_token_in_the_target() {
    // 12 s tokens, default margin a third: due when 4 s are left (jitter up to 0.4 s).
    let env = Env::start(sim_config(12)).await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let _op = env.operator(&[]);
    first_token(&env, "messaging", &seed).await;
    wait_ready(&env, "messaging", "True", "Refreshed").await;

    enum Phase {
        Before,
        Outage { since: Instant },
        After { refreshed_at: Option<Instant> },
    }
    let mut phase = Phase::Before;
    let mut calls_at_outage = 0;
    let mut successes_at_outage = 0;
    let mut samples = 0;
    let mut saw_unavailable = false;
    let started = Instant::now();
    let deadline = started + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "the outage scenario did not end");
        let token = env.target_token("messaging").await.expect("target token");
        assert!(
            env.sim.is_valid(&token),
            "the target held a dead token {:?} into the scenario",
            started.elapsed()
        );
        samples += 1;
        if env
            .ready("messaging")
            .await
            .is_some_and(|(_, r)| r == "Unavailable")
        {
            saw_unavailable = true;
        }
        match phase {
            Phase::Before => {
                let current = env.sim.current_token(CONSUMER_KEY).unwrap();
                let left = env.sim.remaining_validity(&current).unwrap_or_default();
                if left <= Duration::from_millis(4800) {
                    env.sim.set_fault(Fault::Outage, None);
                    calls_at_outage = env.sim.refresh_calls();
                    successes_at_outage = env.sim.successful_refreshes();
                    phase = Phase::Outage {
                        since: Instant::now(),
                    };
                }
            }
            Phase::Outage { since } => {
                if since.elapsed() >= Duration::from_millis(1500) {
                    env.sim.clear_faults();
                    phase = Phase::After { refreshed_at: None };
                }
            }
            Phase::After { refreshed_at: None } => {
                if env.sim.successful_refreshes() > successes_at_outage
                    && env.sim.current_token(CONSUMER_KEY).as_ref() == Some(&token)
                {
                    phase = Phase::After {
                        refreshed_at: Some(Instant::now()),
                    };
                }
            }
            Phase::After {
                refreshed_at: Some(at),
            } => {
                if at.elapsed() >= Duration::from_secs(1) {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during: Vec<Outcome> = env.sim.refresh_log()[calls_at_outage..]
        .iter()
        .map(|c| c.outcome.clone())
        .collect();
    assert!(
        matches!(during.first(), Some(Outcome::Fault(Fault::Outage))),
        "the outage was not hit by the due refresh: {during:?}"
    );
    eprintln!(
        "{samples} samples, calls since the outage: {}, status said Unavailable: {saw_unavailable}",
        during.len()
    );
    wait_ready(&env, "messaging", "True", "Refreshed").await;
    let status = env.tokens().get("messaging").await.unwrap().status.unwrap();
    assert_eq!(status.consecutive_failures, 0);
    assert!(
        env.sim.revoked_uses().is_empty(),
        "{:?}",
        env.sim.revoked_uses()
    );
    env.finish().await;
}

/// Asks for one refresh now, as `kubectl annotate ... refresh-requested-at=...` does.
async fn request_refresh(env: &Env, name: &str) -> String {
    let at = jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({
        "metadata": {"annotations": {REFRESH_REQUEST_ANNOTATION: at}}
    });
    env.tokens()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate the ScgToken");
    at
}

/// Fails every Secret write (`times` > 0) or lets them through again (`times` == 0).
fn fail_secret_writes(env: &Env, times: u32) {
    let faults = env.test_server().faults();
    faults.fail_next("update", "secrets", times, 503);
    faults.fail_next("create", "secrets", times, 503);
}

/// Starts an operator on a 30 s chain and waits until it has settled on its first
/// token: refreshes after that happen only when asked for (the next is due after 20 s).
async fn settled_chain(env: &Env) -> (Operator, String) {
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let op = env.operator(&[]);
    let first = first_token(env, "messaging", &seed).await;
    wait_ready(env, "messaging", "True", "Refreshed").await;
    (op, first)
}

/// Waits until the target Secret "messaging" holds `held`, the token received while the
/// Secret could not be written, or a token refreshed from it (the chain went on from
/// `held`, which the operator does only once `held` is stored); returns it.
async fn stored_from(env: &Env, held: &str) -> String {
    env.eventually(
        "the held token (or its successor) in the target",
        || async {
            let token = env.target_token("messaging").await?;
            descendants(&env.sim.refresh_log(), held)
                .contains(&token)
                .then_some(token)
        },
    )
    .await
}

/// Scenario 6: the Kubernetes API fails the Secret write of a refresh. The new token is
/// held in memory, nothing refreshes it meanwhile, and it lands in the Secret once the
/// API takes writes again.
///
/// Stays on the in-memory server: only its fault injection can fail the Secret writes
/// of one namespace, for as long as the test wants, while everything else works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    real_cluster,
    ignore = "needs the in-memory test server: fault injection / request counters"
)]
async fn failing_secret_writes_hold_the_new_token_in_memory() {
    let env = Env::start(sim_config(30)).await;
    let (_op, first) = settled_chain(&env).await;

    fail_secret_writes(&env, 1000);
    let n = env.sim.successful_refreshes();
    request_refresh(&env, "messaging").await;
    assert!(env.sim.wait_refreshes(n + 1, PATIENCE).await, "no refresh");
    let held = env.sim.current_token(CONSUMER_KEY).unwrap();
    let calls = env.sim.refresh_calls();
    // A couple of seconds of the new token's life: it is the only valid one, and no
    // refresh may happen before it is stored.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert_eq!(
            env.sim.refresh_calls(),
            calls,
            "a refresh call while the new token was not stored"
        );
        assert_eq!(
            env.target_token("messaging").await.as_deref(),
            Some(first.as_str()),
            "a Secret write got through"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fail_secret_writes(&env, 0);
    let stored = stored_from(&env, &held).await;
    assert!(env.sim.is_valid(&stored), "the stored token is dead");
    wait_ready(&env, "messaging", "True", "Refreshed").await;
    assert!(
        env.sim.revoked_uses().is_empty(),
        "{:?}",
        env.sim.revoked_uses()
    );
    env.finish().await;
}

/// Scenario 6, whole-server variant: the API server answers nothing but 503 (and drops
/// its watches) from while the refresh call is in flight until 2 s after the new token
/// was issued.
///
/// Stays on the in-memory server: the outage is timed by its request counters (it starts
/// once the refresh pass has read its Secrets) and made by its fault injection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    real_cluster,
    ignore = "needs the in-memory test server: fault injection / request counters"
)]
async fn an_api_server_outage_during_a_refresh_holds_the_new_token_in_memory() {
    let env = Env::start(sim_config(30)).await;
    let faults = env.test_server().faults();
    let counters = env.test_server().counters();
    let (_op, first) = settled_chain(&env).await;

    // The refresh call takes 2 s; the outage starts once the pass has read the target
    // and the credentials Secrets, i.e. while the call is in flight.
    env.sim
        .set_fault(Fault::Delay(Duration::from_secs(2)), Some(1));
    let n = env.sim.successful_refreshes();
    let gets = || counters.get("get", "core/secrets");
    let baseline = gets();
    request_refresh(&env, "messaging").await;
    env.eventually("the refresh pass to read its Secrets", || async {
        (gets() >= baseline + 2).then_some(())
    })
    .await;
    faults.set_outage(true);
    let landed = env.sim.wait_refreshes(n + 1, Duration::from_secs(10)).await;
    if !landed {
        faults.set_outage(false);
        panic!(
            "the delayed refresh did not complete: {:?}",
            env.sim.refresh_log().last()
        );
    }
    let held = env.sim.current_token(CONSUMER_KEY).unwrap();
    let calls = env.sim.refresh_calls();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(
            env.sim.refresh_calls(),
            calls,
            "a refresh call during the API outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    faults.set_outage(false);
    assert_eq!(
        env.target_token("messaging").await.as_deref(),
        Some(first.as_str()),
        "a Secret write got through the outage"
    );
    let stored = stored_from(&env, &held).await;
    assert!(env.sim.is_valid(&stored), "the stored token is dead");
    wait_ready(&env, "messaging", "True", "Refreshed").await;
    assert!(
        env.sim.revoked_uses().is_empty(),
        "{:?}",
        env.sim.revoked_uses()
    );
    env.finish().await;
}

/// While a new token cannot be stored, status must not keep saying Refreshed: the target
/// Secret holds a token that the refresh just revoked. The operator reports this state
/// as Ready False, reason Pending.
///
/// Stays on the in-memory server: only its fault injection can keep the Secret writes
/// failing while status writes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    real_cluster,
    ignore = "needs the in-memory test server: fault injection / request counters"
)]
async fn a_new_token_that_cannot_be_stored_is_reported_as_pending() {
    let env = Env::start(sim_config(30)).await;
    let (_op, first) = settled_chain(&env).await;

    fail_secret_writes(&env, 100_000);
    let n = env.sim.successful_refreshes();
    request_refresh(&env, "messaging").await;
    assert!(env.sim.wait_refreshes(n + 1, PATIENCE).await, "no refresh");
    let held = env.sim.current_token(CONSUMER_KEY).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut reported = false;
    let mut last = None;
    while !reported && Instant::now() < deadline {
        last = env.ready("messaging").await;
        reported = last == Some(("False".into(), "Pending".into()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let target_held_first = env.target_token("messaging").await.as_deref() == Some(first.as_str());
    fail_secret_writes(&env, 0);
    stored_from(&env, &held).await;
    assert!(
        reported,
        "for {PATIENCE:?} the new token could not be stored (the target still held the \
         replaced token: {target_held_first}), and status kept saying {last:?}"
    );
    env.finish().await;
}

/// Runs kubectl against the test's cluster; panics with its stderr when it fails.
async fn kubectl(env: &Env, args: &[&str], stdin: Option<&str>) -> String {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["--namespace", &env.namespace])
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("run kubectl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("kubectl hung")
        .expect("kubectl output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The rows of the Events table in `kubectl describe` output (none for `Events: <none>`).
fn described_events(out: &str) -> Vec<&str> {
    out.lines()
        .skip_while(|l| !l.starts_with("Events:"))
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .filter(|l| !l.trim_start().starts_with("Type") && !l.trim_start().starts_with("----"))
        .collect()
}

fn example(file: &str) -> String {
    let path = format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// `s` with `from` replaced by `to`; fails when `from` is not there (the example changed).
fn replaced(s: &str, from: &str, to: &str) -> String {
    assert!(s.contains(from), "the example no longer contains {from:?}");
    s.replace(from, to)
}

/// Scenario 7: the README's flow with kubectl and the example manifests, pointed at the
/// simulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn kubectl_drives_the_examples_end_to_end() {
    testkit::require_kubectl();
    // Hour-long tokens and the example's 1h margin: the only refreshes in this test are
    // the seed's and the one asked for with the annotation.
    let env = Env::start(sim_config(3600)).await;
    let seed = env.sim.add_app(CONSUMER_KEY, CONSUMER_SECRET);
    let ns_line = format!("namespace: {}", env.namespace);

    let crd = format!("{}/crds/scgtoken.yaml", env!("CARGO_MANIFEST_DIR"));
    kubectl(&env, &["apply", "-f", &crd], None).await;

    let credentials = example("credentials-secret.yaml");
    let credentials = replaced(
        &credentials,
        "EXAMPLE-consumer-key-replace-me",
        CONSUMER_KEY,
    );
    let credentials = replaced(
        &credentials,
        "EXAMPLE-consumer-secret-replace-me",
        CONSUMER_SECRET,
    );
    let credentials = replaced(
        &credentials,
        "EXAMPLE-00000000-0000-0000-0000-000000000000",
        &seed,
    );
    let credentials = replaced(&credentials, "namespace: default", &ns_line);
    kubectl(&env, &["apply", "-f", "-"], Some(&credentials)).await;

    let mut scgtoken: serde_yaml::Value =
        serde_yaml::from_str(&example("scgtoken.yaml")).expect("parse the example ScgToken");
    assert_eq!(scgtoken["metadata"]["name"].as_str(), Some("messaging"));
    assert_eq!(
        scgtoken["spec"]["target"]["name"].as_str(),
        Some("messaging-scg-token")
    );
    scgtoken["metadata"]["namespace"] = env.namespace.clone().into();
    scgtoken["spec"]["endpoint"] = env.sim.refresh_url().into();
    let scgtoken = serde_yaml::to_string(&scgtoken).unwrap();
    kubectl(&env, &["apply", "-f", "-"], Some(&scgtoken)).await;

    let deployment = replaced(
        &example("consumer-deployment.yaml"),
        "namespace: default",
        &ns_line,
    );
    kubectl(&env, &["apply", "-f", "-"], Some(&deployment)).await;

    let _op = env.operator(&[]);
    kubectl(
        &env,
        &[
            "wait",
            "--for=condition=Ready",
            "scgtoken/messaging",
            "--timeout=60s",
        ],
        None,
    )
    .await;

    let table = kubectl(&env, &["get", "scgtokens"], None).await;
    let mut lines = table.lines();
    let header_line = lines.next().unwrap_or_default();
    let header: Vec<&str> = header_line.split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "REASON",
            "CONSUMERS",
            "EXPIRES",
            "NEXT",
            "REFRESH",
            "AGE"
        ],
        "{table}"
    );
    let row_line = lines.next().unwrap_or_default();
    // No spec.consumers: the CONSUMERS cell is blank.
    let consumers_at = header_line.find("CONSUMERS").unwrap_or_default();
    assert!(
        row_line
            .get(consumers_at..consumers_at + "CONSUMERS".len())
            .is_some_and(|cell| cell.trim().is_empty()),
        "{table}"
    );
    let row: Vec<&str> = row_line.split_whitespace().collect();
    assert_eq!(row.len(), 6, "{table}");
    assert_eq!(row[..3], ["messaging", "True", "Refreshed"], "{table}");
    let expires: jiff::Timestamp = row[3].parse().expect("EXPIRES is a time");
    let next: jiff::Timestamp = row[4].parse().expect("NEXT REFRESH is a time");
    assert!(next < expires, "{table}");

    // The operator's Events (events.k8s.io/v1) under the ScgToken, as a user looks for
    // them: kubectl describe finds them through core/v1 by their `involvedObject`.
    let described = env
        .eventually("kubectl describe to list the Refreshed Event", || async {
            let out = kubectl(&env, &["describe", "scgtoken", "messaging"], None).await;
            let events = described_events(&out);
            events
                .iter()
                .any(|l| {
                    l.split_whitespace().take(2).eq(["Normal", "Refreshed"])
                        && l.contains("scg-token-operator")
                })
                .then_some(out)
        })
        .await;
    let mut planted = env.sim.issued_tokens();
    planted.extend([seed.clone(), CONSUMER_SECRET.to_string()]);
    assert!(
        planted.iter().all(|s| !described.contains(s.as_str())),
        "kubectl describe shows a secret"
    );

    let yaml = kubectl(
        &env,
        &["get", "secret", "messaging-scg-token", "-o", "yaml"],
        None,
    )
    .await;
    let secret: Secret = serde_yaml::from_str(&yaml).expect("parse the target Secret");
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get("accessToken"))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .expect("accessToken in the target Secret");
    assert_ne!(token, seed);
    assert!(env.sim.is_valid(&token), "the target holds a dead token");
    assert_eq!(
        secret
            .metadata
            .annotations
            .unwrap_or_default()
            .get(OWNER_ANNOTATION),
        Some(&"messaging".to_string())
    );

    assert_eq!(
        env.sim.successful_refreshes(),
        1,
        "{:?}",
        env.sim.refresh_log()
    );
    // Three requests, one after the other: each causes exactly one refresh.
    let mut newest = token;
    for round in 0..3 {
        let calls = env.sim.refresh_calls();
        // Whole seconds as in the README's `date -u +%FT%TZ`; a new second each round.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let requested_at = jiff::Timestamp::now().strftime("%FT%TZ").to_string();
        kubectl(
            &env,
            &[
                "annotate",
                "scgtoken",
                "messaging",
                &format!("scgtoken.io/refresh-requested-at={requested_at}"),
                "--overwrite",
            ],
            None,
        )
        .await;
        assert!(
            env.sim.wait_refresh_calls(calls + 1, PATIENCE).await,
            "request {round} caused no refresh"
        );
        env.eventually("the request acknowledged in status", || async {
            let s = env.tokens().get("messaging").await.ok()?.status?;
            (s.last_refresh_request.as_deref() == Some(requested_at.as_str())).then_some(())
        })
        .await;
        newest = env.sim.current_token(CONSUMER_KEY).unwrap();
        env.eventually("the requested token in the target", || async {
            (env.target_token("messaging-scg-token").await? == newest).then_some(())
        })
        .await;
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(
                env.sim.refresh_calls(),
                calls + 1,
                "request {round} caused more than one refresh: {:?}",
                env.sim
                    .refresh_log()
                    .iter()
                    .map(|c| (to_timestamp(c.at), c.issued().is_some()))
                    .collect::<Vec<_>>()
            );
        }
    }
    assert!(env.sim.is_valid(&newest), "the target holds a dead token");

    kubectl(&env, &["delete", "scgtoken", "messaging"], None).await;
    env.eventually("the ScgToken gone", || async {
        env.tokens()
            .get_opt("messaging")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    // deletionPolicy defaults to Retain: the workload keeps its token.
    assert_eq!(
        env.target_token("messaging-scg-token").await.as_deref(),
        Some(newest.as_str())
    );
    env.finish().await;
}
