//! End to end: the RBAC rules of deploy/ compared with the requests the operator really
//! makes. A request the ServiceAccount may not make is a 403 in a cluster; a grant the
//! operator never uses is a permission too many.

mod common {
    pub mod harness;
    pub mod manifests;
}

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use common::harness::{CONSUMER_KEY, Env, UNKNOWN_CONSUMER, UNKNOWN_SEED, token_in};
use common::manifests::{granted, kustomize};
use kube::api::DeleteParams;
use testkit::scgsim::SimConfig;

/// The Ready reason of an ScgToken stored in the in-memory server.
fn reason_in(obj: Option<&serde_json::Value>) -> Option<String> {
    obj?.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?["reason"]
        .as_str()
        .map(str::to_string)
}

/// Every (apiGroup, resource, verb) the operator uses is granted, and every grant is
/// used, over a workload that touches each kind of request.
///
/// Stays on the in-memory server: it counts every request the operator makes, which a
/// real API server does not tell a test (its audit log would, but needs a policy file
/// and a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(all(not(kubectl), not(real_cluster)), ignore = "needs kubectl on PATH")]
#[cfg_attr(
    real_cluster,
    ignore = "needs the in-memory test server: fault injection / request counters"
)]
async fn rbac_grants_exactly_the_requests_the_operator_makes() {
    // (apiGroup, resource, verb) granted to the operator's ServiceAccount by deploy/.
    let grants = granted(&kustomize(""));
    assert!(!grants.is_empty(), "no rules bound to the ServiceAccount");
    let env = Env::start(SimConfig {
        validity_cap: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let api = env.test_server();
    let ns = env.namespace.clone();
    env.credentials("good-creds", CONSUMER_KEY).await;
    env.put_credentials("bad-creds", UNKNOWN_CONSUMER, UNKNOWN_SEED)
        .await;
    env.scgtoken("good", "good-creds", |_| {}).await;
    env.scgtoken("bad", "bad-creds", |_| {}).await;

    // From here on the test reads the server's store directly (not counted) and notes
    // each request it makes itself.
    let counters = api.counters();
    counters.reset();
    let mut own: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut note = |verb: &str, res: &str| {
        *own.entry((verb.to_string(), res.to_string())).or_default() += 1;
    };
    let _op = env.operator(&["--leader-elect=true", "--identity=rbac"]);
    let wait = Duration::from_secs(60);
    let reason = |name: &'static str, want: &'static str| {
        api.wait_for("scgtoken.io", "scgtokens", &ns, name, wait, move |o| {
            reason_in(o).as_deref() == Some(want)
        })
    };
    let stored = || {
        api.wait_for("", "secrets", &ns, "good", wait, |o| {
            token_in(o).is_some() && token_in(o) == env.sim.current_token(CONSUMER_KEY)
        })
    };

    // The good token rotates a few times (create, then updates of the target).
    assert!(env.sim.wait_refreshes(3, wait).await, "no rotation");
    stored().await.expect("the third token stored");
    // The bad one fails: a Warning Event.
    reason("bad", "Rejected").await.expect("bad: Rejected");
    // The target is deleted by someone; the operator recreates it.
    env.secrets()
        .delete("good", &DeleteParams::default())
        .await
        .expect("delete the target");
    note("delete", "core/secrets");
    stored().await.expect("the target recreated");
    // The bad credentials vanish and come back, still wrong: CredentialsNotFound, then
    // Rejected again, each a Warning Event of its own (created, never patched).
    env.secrets()
        .delete("bad-creds", &DeleteParams::default())
        .await
        .expect("delete bad-creds");
    note("delete", "core/secrets");
    reason("bad", "CredentialsNotFound")
        .await
        .expect("bad: CredentialsNotFound");
    env.put_credentials("bad-creds", UNKNOWN_CONSUMER, UNKNOWN_SEED)
        .await;
    note("patch", "core/secrets");
    reason("bad", "Rejected")
        .await
        .expect("bad: Rejected again");
    env.eventually("the repeated Warning Event", || async {
        (counters.get("create", "events.k8s.io/events") >= 4).then_some(())
    })
    .await;
    // One more rotation after all that.
    let n = env.sim.successful_refreshes();
    assert!(env.sim.wait_refreshes(n + 1, wait).await, "no rotation");
    stored().await.expect("the last token stored");

    let snapshot = counters.snapshot();
    let mut used: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for ((verb, key), count) in &snapshot {
        let mine = own.get(&(verb.clone(), key.clone())).copied().unwrap_or(0);
        assert!(
            *count >= mine,
            "the counters missed the test's own {verb} {key}"
        );
        if *count == mine {
            continue;
        }
        let (group, resource) = key.split_once('/').expect("group/resource");
        let group = if group == "core" { "" } else { group };
        used.insert(
            (group.to_string(), resource.to_string(), verb.clone()),
            count - mine,
        );
    }
    eprintln!("requests made by the operator (apiGroup, resource, verb): count");
    for ((g, r, v), n) in &used {
        eprintln!("  ({g:?}, {r}, {v}): {n}");
    }
    let used_set: BTreeSet<_> = used.keys().cloned().collect();
    let forbidden: Vec<_> = used_set.difference(&grants).collect();
    assert!(
        forbidden.is_empty(),
        "the operator made requests its RBAC does not grant (403 in a cluster): {forbidden:?}"
    );
    let unused: Vec<_> = grants.difference(&used_set).collect();
    assert!(
        unused.is_empty(),
        "granted but never used by this workload: {unused:?}"
    );
    env.finish().await;
}
