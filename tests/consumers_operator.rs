//! The operator's side of the consumers, end to end: the operator binary with
//! `--consumer-reports` (or the variable the consumer-reports component sets), token
//! agent binaries reporting in Leases, the in-memory API server and the SCG simulator,
//! which revokes the old token the moment it issues a new one (no grace).
//!
//! What a user sees: `ConsumersUpToDate` naming a frozen pod and recovering when it
//! thaws, a dead agent's pod counted lost until the pod is deleted, the `CONSUMERS` column, the `scgtoken_consumers`
//! metrics, Events, and rollout restarts; never a token.

mod common {
    // Other tests use the rest of it.
    #[allow(dead_code)]
    pub mod admin;
    pub mod agent;
    pub mod harness;
    pub mod metrics;
}

use std::{process::Stdio, time::Duration};

use common::{
    admin::{admin_addr, http, metrics_text},
    agent::{Agent, SCGTOKEN, Scratch, TARGET, assert_no_leak},
    harness::{Env, PATIENCE, wait_target_change},
    metrics::{metric, parse_metrics},
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod, events::v1::Event};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use scg_token_operator::{
    chain,
    crd::{
        ConsumersSpec, ConsumersStatus, REFRESH_REQUEST_ANNOTATION, RESTART_FOR_ANNOTATION,
        RESTARTED_FOR_ANNOTATION, RestartKind, RolloutRestartTarget,
    },
};
use testkit::scgsim::SimConfig;

/// Revoke on refresh, no grace: a pod that has not switched holds a dead token.
fn revoking() -> SimConfig {
    SimConfig {
        grace: Duration::ZERO,
        ..SimConfig::default()
    }
}

/// The ScgToken the agents serve, with long-lived tokens (rotations are asked for) and
/// `consumers`.
async fn scgtoken(env: &Env, consumers: ConsumersSpec) {
    env.credentials("scg-credentials", "consumers-key").await;
    env.scgtoken(SCGTOKEN, "scg-credentials", |s| {
        s.target.name = Some(TARGET.into());
        s.validity = "1h".into();
        s.consumers = Some(consumers);
    })
    .await;
}

fn agents(stale_after: &str) -> ConsumersSpec {
    ConsumersSpec {
        agents: true,
        stale_after: stale_after.into(),
        ..ConsumersSpec::default()
    }
}

/// An agent in file mode as pod `pod`, with `extra` flags. On a real cluster the pod
/// must exist: the agent's Lease is owned by it, and the garbage collector deletes a
/// Lease whose owner does not exist. There a Pod by that name is created (it is never
/// scheduled: the test environment has no scheduler) and its UID passed on.
async fn agent(env: &Env, dir: &Scratch, pod: &str, extra: &[&str]) -> Agent {
    let mut args = vec![format!("--dir={}", dir.0.display())];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(format!("--pod-uid={}", pod_object(env, pod).await));
    Agent::spawn_in(&env.kubeconfig, &env.namespace, pod, &args)
}

/// Creates the Pod object named `pod` that the agent process stands for (on a real
/// cluster it is never scheduled; the in-memory server only stores it); its UID.
async fn pod_object(env: &Env, pod: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let obj: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": pod},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "busybox"}]
        }
    }))
    .expect("a Pod");
    // The namespace's default ServiceAccount, which admission looks up, comes shortly
    // after the namespace.
    env.eventually(&format!("Pod {pod} created"), || async {
        let created = pods.create(&PostParams::default(), &obj).await.ok()?;
        created.metadata.uid
    })
    .await
}

/// (status, reason, message) of `ConsumersUpToDate`, and `status.consumers`.
async fn consumers(env: &Env) -> (Option<(String, String, String)>, Option<ConsumersStatus>) {
    let Ok(Some(t)) = env.tokens().get_opt(SCGTOKEN).await else {
        return (None, None);
    };
    let status = t.status.unwrap_or_default();
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "ConsumersUpToDate")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
    (condition, status.consumers)
}

/// Waits until `ConsumersUpToDate` has `status` and `reason`, and `check` holds of the
/// aggregate; returns the message and the aggregate.
async fn wait_consumers(
    env: &Env,
    status: &str,
    reason: &str,
    check: impl Fn(&ConsumersStatus) -> bool,
) -> (String, ConsumersStatus) {
    let what = format!("ConsumersUpToDate {status}/{reason}");
    env.eventually(&what, || async {
        match consumers(env).await {
            (Some((s, r, m)), Some(c)) if s == status && r == reason && check(&c) => Some((m, c)),
            _ => None,
        }
    })
    .await
}

/// The notes of the ScgToken's Events with this type and reason.
async fn events(env: &Env, type_: &str, reason: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let Ok(list) = api.list(&ListParams::default()).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(SCGTOKEN))
        .filter(|e| e.type_.as_deref() == Some(type_) && e.reason.as_deref() == Some(reason))
        .map(|e| e.note.unwrap_or_default())
        .collect()
}

async fn wait_event(env: &Env, type_: &str, reason: &str) -> String {
    env.eventually(&format!("a {type_} {reason} Event"), || async {
        events(env, type_, reason).await.into_iter().next()
    })
    .await
}

/// What `kubectl annotate scgtoken ... refresh-requested-at=<value>` does.
async fn request_refresh(env: &Env, value: &str) {
    let patch =
        serde_json::json!({"metadata": {"annotations": {REFRESH_REQUEST_ANNOTATION: value}}});
    env.tokens()
        .patch(SCGTOKEN, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
}

/// Everything the operator shows users about the ScgToken: status and Events.
async fn shown(env: &Env) -> String {
    let t = env.tokens().get(SCGTOKEN).await.expect("the ScgToken");
    let api: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let events = api.list(&ListParams::default()).await.expect("Events");
    let notes: Vec<String> = events.items.into_iter().filter_map(|e| e.note).collect();
    format!(
        "{}\n{}",
        serde_json::to_string(&t.status).unwrap_or_default(),
        notes.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_is_named_stale_until_it_thaws_and_a_dead_ones_pod_is_lost_until_deleted() {
    let env = Env::start(revoking()).await;
    scgtoken(&env, agents("2s")).await;
    let operator = env.operator(&["--consumer-reports"]);
    let first = env
        .eventually("the first token stored", || async {
            env.target_token(TARGET).await
        })
        .await;
    let dirs = [
        Scratch::new("frozen"),
        Scratch::new("live"),
        Scratch::new("doomed"),
    ];
    let frozen = agent(&env, &dirs[0], "consumer-frozen", &[]).await;
    let live = agent(&env, &dirs[1], "consumer-live", &[]).await;
    let mut doomed = agent(
        &env,
        &dirs[2],
        "consumer-doomed",
        &["--report-lease-seconds=3"],
    )
    .await;
    wait_consumers(&env, "True", "UpToDate", |c| c.summary == "3/3").await;

    // A rotation with every agent running: how long the slowest took to switch.
    request_refresh(&env, "rotate-all-running").await;
    let first = wait_target_change(&env, TARGET, Some(&first), PATIENCE)
        .await
        .expect("a new token stored");
    let slowest = env
        .eventually("every agent on the new token", || async {
            let t = env.tokens().get(SCGTOKEN).await.ok()?;
            let fp = chain::fingerprint(&t, &first);
            let status = t.status?;
            let c = status.consumers?;
            (status.token_fingerprint? == fp && c.summary == "3/3").then_some(c)
        })
        .await
        .slowest_switch_seconds
        .expect("the switch measured");
    eprintln!(
        "FIGURE 3 agents: the slowest switched {slowest:.3} s after the refresh call (status.consumers.slowestSwitchSeconds)"
    );

    // Frozen, it cannot switch (nor renew its 30 s Lease): once the grace has passed, the
    // ScgToken names it.
    frozen.signal("STOP");
    request_refresh(&env, "rotate-while-frozen").await;
    let second = wait_target_change(&env, TARGET, Some(&first), PATIENCE)
        .await
        .expect("a new token stored");
    let (message, c) = wait_consumers(&env, "False", "StaleConsumers", |_| true).await;
    assert_eq!(c.stale_pods, ["consumer-frozen"]);
    assert_eq!((c.summary.as_str(), c.stale), ("2/3", 1));
    assert!(message.contains("consumer-frozen"), "{message}");
    let warning = wait_event(&env, "Warning", "StaleConsumers").await;
    assert!(warning.contains("consumer-frozen"), "{warning}");

    // Thawed, it switches and reports at once.
    frozen.signal("CONT");
    let (_, c) = wait_consumers(&env, "True", "UpToDate", |c| c.summary == "3/3").await;
    assert!(c.slowest_switch_seconds.is_some(), "{c:?}");
    assert!(c.stale_pods.is_empty());
    wait_event(&env, "Normal", "ConsumersUpToDate").await;

    // Killed without releasing its Lease: when its heartbeat expires (3 s), without any
    // other change to wake the operator, its pod, which still exists, counts as lost.
    doomed.kill().await;
    let (message, c) = wait_consumers(&env, "False", "LostConsumers", |c| c.lost == 1).await;
    assert_eq!(
        (c.summary.as_str(), c.lost_pods.clone()),
        ("2/3", vec!["consumer-doomed".to_string()])
    );
    assert!(message.contains("consumer-doomed"), "{message}");
    wait_event(&env, "Warning", "LostConsumers").await;
    // Deleted, the pod takes its Lease with it (garbage collection) and leaves the count.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    pods.delete("consumer-doomed", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the pod");
    wait_consumers(&env, "True", "UpToDate", |c| c.summary == "2/2").await;

    // The metrics count the pods by state.
    let addr = admin_addr(&operator).await;
    let text = metrics_text(&http(), addr).await.expect("/metrics");
    let samples = parse_metrics(&text);
    let count = |state| {
        metric(
            &samples,
            "scgtoken_consumers",
            &[("name", SCGTOKEN), ("state", state)],
        )
    };
    assert_eq!(
        (
            count("current"),
            count("switching"),
            count("stale"),
            count("lost")
        ),
        (Some(2.0), Some(0.0), Some(0.0), Some(0.0)),
        "{text}"
    );

    let tokens = env.sim.issued_tokens();
    assert!(tokens.contains(&second));
    let agent_logs = [&frozen, &live, &doomed].map(|a| a.logs()).join("\n");
    assert_no_leak("agent logs", &agent_logs, &tokens);
    assert_no_leak("operator metrics", &text, &tokens);
    assert_no_leak("status and Events", &shown(&env).await, &tokens);
    let logs = operator.logs();
    // Warned about the stale pod and the lost one, and nothing else (no failed watch,
    // write or Event).
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.contains("WARN")
                && !l.contains("reason=StaleConsumers")
                && !l.contains("reason=LostConsumers")
        })
        .collect();
    assert!(warnings.is_empty(), "the operator warned: {warnings:#?}");
    // One transition to StaleConsumers, one log line of it.
    let stale_lines = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("reason=StaleConsumers"))
        .count();
    assert_eq!(stale_lines, 1, "log lines of the stale pod:\n{logs}");
    drop(operator);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_need_the_flag_and_the_components_variable_turns_them_on() {
    let env = Env::start(revoking()).await;
    scgtoken(&env, agents("10s")).await;
    let dir = Scratch::new("disabled");
    let only = agent(&env, &dir, "consumer-0", &[]).await;

    // Without --consumer-reports: the token is refreshed as ever, and the condition says
    // how to turn reports on.
    let mut off = env.operator(&[]);
    let (message, _) = env
        .eventually("ConsumersUpToDate Unknown/ReportsDisabled", || async {
            match consumers(&env).await {
                (Some((s, r, m)), None) if s == "Unknown" && r == "ReportsDisabled" => {
                    Some((m, ()))
                }
                _ => None,
            }
        })
        .await;
    for needle in [
        "--consumer-reports",
        "SCG_CONSUMER_REPORTS",
        "consumer-reports",
    ] {
        assert!(message.contains(needle), "{message}");
    }
    assert_eq!(
        env.ready(SCGTOKEN).await.map(|r| r.1).as_deref(),
        Some("Refreshed")
    );
    let warning = wait_event(&env, "Warning", "ReportsDisabled").await;
    assert_eq!(warning, message);
    off.terminate(PATIENCE).await;

    // With the variable the component sets: the agent's report shows.
    let mut on = env.operator_with_env(&[], &[("SCG_CONSUMER_REPORTS", Some("true"))]);
    wait_consumers(&env, "True", "UpToDate", |c| c.summary == "1/1").await;
    wait_event(&env, "Normal", "ConsumersUpToDate").await;
    on.kill().await;

    let tokens = env.sim.issued_tokens();
    assert_no_leak("operator logs", &on.logs(), &tokens);
    assert_no_leak("agent logs", &only.logs(), &tokens);
    assert_no_leak("status and Events", &shown(&env).await, &tokens);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn kubectl_shows_the_consumers_column() {
    testkit::require_kubectl();
    let env = Env::start(revoking()).await;
    scgtoken(&env, agents("10s")).await;
    let _operator = env.operator(&["--consumer-reports"]);
    let dirs = [Scratch::new("column-0"), Scratch::new("column-1")];
    let a = agent(&env, &dirs[0], "consumer-0", &[]).await;
    let b = agent(&env, &dirs[1], "consumer-1", &[]).await;
    wait_consumers(&env, "True", "UpToDate", |c| c.summary == "2/2").await;

    let cache = Scratch::new("kubectl-cache");
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .arg("--cache-dir")
        .arg(&cache.0)
        .args(["get", "scgtokens", "-n", &env.namespace])
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(PATIENCE, out)
        .await
        .expect("kubectl hung")
        .expect("run kubectl");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let row: Vec<&str> = lines
        .find(|l| l.starts_with(SCGTOKEN))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let column = header.iter().position(|h| *h == "CONSUMERS");
    assert_eq!(column.and_then(|i| row.get(i)), Some(&"2/2"), "{table}");

    let tokens = env.sim.issued_tokens();
    assert_no_leak("agent logs", &(a.logs() + &b.logs()), &tokens);
    env.finish().await;
}

/// A Deployment that opts in to restarts for [`SCGTOKEN`].
fn deployment(name: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "annotations": {RESTART_FOR_ANNOTATION: SCGTOKEN}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        }
    }))
    .expect("a Deployment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_new_token_restarts_the_targets_and_a_failed_nudge_only_warns() {
    let env = Env::start(revoking()).await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.namespace);
    deployments
        .create(&PostParams::default(), &deployment("legacy"))
        .await
        .expect("create the Deployment");
    let restarted_for = || async {
        let d = deployments.get("legacy").await.ok()?;
        let a = d.spec?.template.metadata?.annotations?;
        a.get(RESTARTED_FOR_ANNOTATION).cloned()
    };
    let spec = ConsumersSpec {
        pod_selector: serde_json::from_value(
            serde_json::json!({"matchLabels": {"app": "volume-reader"}}),
        )
        .ok(),
        rollout_restart_targets: vec![RolloutRestartTarget {
            kind: RestartKind::Deployment,
            name: "legacy".into(),
        }],
        ..ConsumersSpec::default()
    };
    scgtoken(&env, spec).await;
    // The pods list is refused, as without the consumer-nudge permission.
    if let Some(api) = &env.api {
        api.faults().fail_next("list", "pods", 1000, 403);
    }
    let _operator = env.operator(&[]);
    let first = env
        .eventually("the first token stored", || async {
            env.target_token(TARGET).await
        })
        .await;
    let fingerprint = || async {
        let t = env.tokens().get(SCGTOKEN).await.ok()?;
        t.status?.token_fingerprint
    };
    let fp = env
        .eventually("the Deployment restarted for the stored token", || async {
            let fp = fingerprint().await?;
            (restarted_for().await? == fp).then_some(fp)
        })
        .await;
    let note = wait_event(&env, "Normal", "RolloutRestarted").await;
    assert!(note.contains("\"legacy\""), "{note}");
    assert!(!note.contains(&fp), "Events need no fingerprint: {note}");

    // The nudge fails, which is a Warning and nothing more. The token is stored and Ready.
    if env.api.is_some() {
        let warning = wait_event(&env, "Warning", "NudgeFailed").await;
        assert!(
            warning.contains("deploy/components/consumer-nudge"),
            "{warning}"
        );
    }
    assert_eq!(
        env.ready(SCGTOKEN).await,
        Some(("True".to_string(), "Refreshed".to_string()))
    );
    assert_eq!(
        env.target_token(TARGET).await.as_deref(),
        Some(first.as_str())
    );
    assert_eq!(
        consumers(&env).await,
        (None, None),
        "nothing refused, no agents"
    );
    assert_no_leak(
        "status and Events",
        &shown(&env).await,
        &env.sim.issued_tokens(),
    );
    env.finish().await;
}
