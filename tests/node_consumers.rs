//! Every way of consuming the token (README "Consuming the token") as real workloads on a
//! real node: the manifests of examples/ and the operator's optional components from
//! deploy/components/, adapted with kustomize only, with the test consumer
//! (testenv/image/cmd/consumer) in place of the examples' curl loop, against the HTTPS SCG
//! simulator, which revokes the old token the moment it issues a new one (no grace).
//!
//! | test | pattern | token lifetime |
//! |---|---|---|
//! | `consumers_proxy_*` | token agent, proxy mode (examples/agent-proxy-deployment.yaml) | 20 s |
//! | `consumers_file_*` | token agent, file mode (examples/agent-file-deployment.yaml) | 20 s |
//! | `long_volume_nudge_*` | Secret volume + `podSelector` nudge (examples/consumer-deployment.yaml) | 150 s |
//! | `long_volume_no_nudge_*` | Secret volume alone | 300 s |
//! | `long_env_restart_*` | env var + `rolloutRestartTargets` | 660 s |
//!
//! Each test prints one `pattern=...` line of figures (calls, failed calls in all and per
//! rotation, and, for consumers that hold the token, the delay from the target Secret
//! being written to the consumer holding the new token), a human line, and a
//! `pattern=... status_...` line comparing `status.consumers` with what the pods show.
//! Tokens never appear: only the first 16 hex digits of their SHA-256 (what the consumer
//! serves) and the operator's salted fingerprints.
//!
//! ```sh
//! testenv/image/build --out target/images
//! # the short ones, as CI runs them:
//! SCG_IMAGE_DIR=target/images testenv/run --node -- testenv/node-lane consumers_
//! # the long ones (about 25 minutes; CI skips them with --skip long_):
//! SCG_IMAGE_DIR=target/images testenv/run --node -- testenv/node-lane long_
//! ```
//!
//! (The lane passes its extra arguments to `cargo test` after `--`; it must list
//! `--test node_consumers`. Without the lane script, the same inside the node:
//! `testenv/run --node -- bash -c 'for i in scg-token-operator consumer; do ctr images
//! import target/images/$i.tar; done; cargo test --offline --test node_consumers --
//! --ignored --test-threads=1 --nocapture long_'`.)
//!
//! Each test installs the operator (`deploy` plus the components consumer-reports,
//! consumer-nudge and rollout-restart) and its workload in a namespace of its own, and
//! removes both when it ends or fails. One at a time: an install is cluster-wide.
//!
//! How the figures are taken. "Written": the local time at which this test's watch on
//! the target Secret first sees a token (a few milliseconds after the write, so the delays
//! are slightly understated). "Held": the consumer's `first_held_unix_ms` for that token
//! (same machine, same clock). Calls and failures: the consumers' `/stats`, sampled every
//! 250 ms from the start of the measured window (every pod running and holding the stored
//! token) to its end (every pod calling successfully with the newest token); failures are
//! attributed to the rotation in whose interval the sample that counted them fell. A
//! replaced pod (env pattern) counts up to its last sample: the calls of its last 250 ms
//! may be missing.

mod common {
    pub mod node;
}

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::node::{Lane, OperatorInstall, kubectl, kubectl_try, rollout, until};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    Api,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};
use scg_token_operator::crd::{
    NUDGED_FOR_ANNOTATION, RESTARTED_FOR_ANNOTATION, ScgToken, ScgTokenStatus,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use testkit::scgsim::{Endpoint, PROTECTED_PATH, ScgSimulator};

const CONSUMER_KEY: &str = "node-consumers-key";
const CONSUMER_SECRET: &str = "node-consumers-planted-secret-5b3e";
/// Names as examples/ spells them: the ScgToken, its target Secret and key.
const SCGTOKEN: &str = "messaging";
const TARGET: &str = "messaging-scg-token";
const TOKEN_KEY: &str = "accessToken";
const CONSUMER_IMAGE: &str = "scg-testenv/consumer:dev";
/// Where the simulator's CA is mounted in the workloads.
const CA_DIR: &str = "/etc/scg-sim-ca";
const STATS_PORT: u16 = 9090;
const AGENT_ADMIN_PORT: u16 = 8081;
const PATIENCE: Duration = Duration::from_secs(240);
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Bounds of the background loops (they are also aborted when the test ends).
const MAX_RUN: Duration = Duration::from_secs(45 * 60);
const MAX_SAMPLES: usize = 20_000;
const MAX_EVENTS: usize = 100_000;
/// How long `status.consumers` and the pods may take to agree after the last rotation.
const AGREE_WITHIN: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    Proxy,
    File,
    VolumeNudge,
    VolumeNoNudge,
    EnvRestart,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Proxy => "proxy",
            Pattern::File => "file",
            Pattern::VolumeNudge => "volume-nudge",
            Pattern::VolumeNoNudge => "volume-no-nudge",
            Pattern::EnvRestart => "env-restart",
        }
    }

    /// The example the workload is made from.
    fn example(self) -> &'static str {
        match self {
            Pattern::Proxy => "agent-proxy-deployment.yaml",
            Pattern::File => "agent-file-deployment.yaml",
            _ => "consumer-deployment.yaml",
        }
    }

    /// The workload's Deployment once adapted.
    fn deployment(self) -> &'static str {
        match self {
            Pattern::Proxy => "messaging-client-proxy",
            Pattern::File => "messaging-client-file",
            Pattern::VolumeNudge | Pattern::VolumeNoNudge => "messaging-client",
            // The name examples/scgtoken-consumers.yaml restarts.
            Pattern::EnvRestart => "messaging-batch",
        }
    }

    /// `app.kubernetes.io/name` of its pods.
    fn pod_label(self) -> &'static str {
        match self {
            Pattern::Proxy => "messaging-client-proxy",
            Pattern::File => "messaging-client-file",
            _ => "messaging-client",
        }
    }

    /// Whether the consumer itself holds the token (all but proxy).
    fn holds_token(self) -> bool {
        self != Pattern::Proxy
    }

    /// Whether its pods run the token agent, which reports what it serves.
    fn has_agent(self) -> bool {
        matches!(self, Pattern::Proxy | Pattern::File)
    }
}

/// One pattern's run: the simulator caps every token at `lifetime` seconds.
struct Plan {
    pattern: Pattern,
    lifetime: u64,
    refresh_before: Option<&'static str>,
    rotations: usize,
}

impl Plan {
    fn namespace(&self) -> String {
        format!("node-consumers-{}", self.pattern.name())
    }

    /// `spec.validity`: at least the CRD's 30 s; the simulator grants `lifetime`.
    fn validity(&self) -> String {
        format!("{}s", self.lifetime.max(30))
    }

    /// Time for the first token plus `rotations` more, with room for slow starts.
    fn patience(&self) -> Duration {
        Duration::from_secs(self.lifetime * (self.rotations as u64 + 1) + 180)
    }
}

fn unix_ms() -> i64 {
    ms(SystemTime::now())
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// First 16 hex digits of the SHA-256 of a token, as the consumer reports it.
fn sha16(token: &str) -> String {
    Sha256::digest(token.trim().as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A background task of the test, aborted when dropped (also on panic).
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The pattern's namespace with the credentials, the ScgToken and the workload of
/// examples/, adapted by a kustomization. Kustomize refuses resource files outside the
/// kustomization's directory (examples/ is not a kustomization), so the example files
/// are copied, unchanged, next to it. The namespace is deleted on drop.
struct Workload {
    namespace: String,
}

impl Workload {
    fn apply(lane: &Lane, sim: &ScgSimulator, plan: &Plan) -> Workload {
        let seed = sim.add_app(CONSUMER_KEY, CONSUMER_SECRET);
        let example = |file: &str| {
            std::fs::read_to_string(lane.root.join("examples").join(file)).expect("read example")
        };
        let credentials = example("credentials-secret.yaml");
        let scgtoken = example("scgtoken-consumers.yaml");
        let deployment = example(plan.pattern.example());
        let kustomization = kustomization(plan, sim, &seed);
        let dir = lane.dir(
            &format!("workload-{}", plan.pattern.name()),
            &[
                ("credentials-secret.yaml", &credentials),
                ("scgtoken-consumers.yaml", &scgtoken),
                (plan.pattern.example(), &deployment),
                ("ca.crt", sim.ca_pem().expect("TLS simulator")),
                ("kustomization.yaml", &kustomization),
            ],
        );
        let workload = Workload {
            namespace: plan.namespace(),
        };
        kubectl(&["create", "namespace", &workload.namespace]);
        kubectl(&["apply", "-k", dir.to_str().expect("utf-8 path")]);
        workload
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = kubectl_try(
            &[
                "delete",
                "namespace",
                &self.namespace,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=180s",
            ],
            None,
        );
    }
}

/// The workload's kustomization: the namespace, the simulator's CA as a ConfigMap, and
/// patches that change only what points the examples at the simulator and the consumer.
fn kustomization(plan: &Plan, sim: &ScgSimulator, seed: &str) -> String {
    let namespace = plan.namespace();
    let example = plan.pattern.example();
    let mut k = format!(
        r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: {namespace}
# Copies of the files of examples/ (see the test).
resources: [credentials-secret.yaml, scgtoken-consumers.yaml, {example}]
configMapGenerator:
  - name: scg-sim-ca
    files: [ca.crt]
    options: {{disableNameSuffixHash: true}}
patches:
  - patch: |-
      apiVersion: v1
      kind: Secret
      metadata: {{name: scg-credentials}}
      stringData: {{consumerKey: {CONSUMER_KEY}, consumerSecret: {CONSUMER_SECRET}, accessToken: "{seed}"}}
"#
    );
    k.push_str(&scgtoken_patch(plan, sim));
    k.push_str(&match plan.pattern {
        Pattern::Proxy => proxy_patches(sim),
        Pattern::File => file_patches(sim),
        Pattern::VolumeNudge | Pattern::VolumeNoNudge => volume_patches(sim),
        Pattern::EnvRestart => env_patches(sim),
    });
    k
}

/// examples/scgtoken-consumers.yaml against the simulator, with the lifetime of the plan
/// and only the consumer settings of the pattern (`agents: true` always, `podSelector`
/// for the nudged volume, `rolloutRestartTargets` for env; null removes a field).
fn scgtoken_patch(plan: &Plan, sim: &ScgSimulator) -> String {
    let selector = if plan.pattern == Pattern::VolumeNudge {
        ""
    } else {
        "podSelector: null, "
    };
    let restart = if plan.pattern == Pattern::EnvRestart {
        ""
    } else {
        "rolloutRestartTargets: null, "
    };
    format!(
        r#"  - patch: |-
      apiVersion: scgtoken.io/v1alpha1
      kind: ScgToken
      metadata: {{name: {SCGTOKEN}}}
      spec:
        endpoint: {endpoint}
        validity: {validity}
        refreshBefore: {refresh_before}
        consumers: {{{selector}{restart}agents: true}}
"#,
        endpoint = sim.refresh_url(),
        validity = plan.validity(),
        refresh_before = plan.refresh_before.unwrap_or("null"),
    )
}

/// The `client` container replaced by the consumer, with the simulator's CA mounted.
fn client_patch(deployment: &str, args: &[String], ca_in_client: bool) -> String {
    let args = args
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mount = if ca_in_client {
        format!(
            "\n                volumeMounts: [{{name: scg-sim-ca, mountPath: {CA_DIR}, readOnly: true}}]"
        )
    } else {
        String::new()
    };
    format!(
        r#"  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata: {{name: {deployment}}}
      spec:
        template:
          spec:
            volumes: [{{name: scg-sim-ca, configMap: {{name: scg-sim-ca}}}}]
            containers:
              - name: client
                image: {CONSUMER_IMAGE}
                imagePullPolicy: IfNotPresent
                command: ["/consumer"]
                args: [{args}]{mount}
"#
    )
}

/// Proxy: the agent's `--upstream` (checked to be where the example has it) pointed at
/// the simulator, plus `--ca-bundle` with the CA mounted into the agent.
fn proxy_patches(sim: &ScgSimulator) -> String {
    let deployment = Pattern::Proxy.deployment();
    let args = "/spec/template/spec/initContainers/0/args";
    let mut p = format!(
        r#"  - target: {{kind: Deployment, name: {deployment}}}
    patch: |-
      - {{op: test, path: {args}/3, value: "--upstream=https://api.syniverse.com"}}
      - {{op: replace, path: {args}/3, value: "--upstream={base}"}}
      - {{op: add, path: {args}/-, value: "--ca-bundle={CA_DIR}/ca.crt"}}
  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata: {{name: {deployment}}}
      spec:
        template:
          spec:
            initContainers:
              - name: scg-token-agent
                volumeMounts: [{{name: scg-sim-ca, mountPath: {CA_DIR}, readOnly: true}}]
"#,
        base = sim.base_url(),
    );
    let url = format!("http://127.0.0.1:8181{PROTECTED_PATH}");
    p.push_str(&client_patch(
        deployment,
        &["--mode=proxy".into(), format!("--url={url}")],
        false,
    ));
    p
}

fn file_mode_args(sim: &ScgSimulator, token_file: &str) -> Vec<String> {
    vec![
        "--mode=file".into(),
        format!("--token-file={token_file}"),
        format!("--url={}", sim.protected_url()),
        format!("--ca-file={CA_DIR}/ca.crt"),
    ]
}

/// File: the consumer reads the agent's token file and calls the simulator itself.
fn file_patches(sim: &ScgSimulator) -> String {
    client_patch(
        Pattern::File.deployment(),
        &file_mode_args(sim, "/var/run/scg/token"),
        true,
    )
}

/// Volume: the consumer reads the Secret volume's file and calls the simulator.
fn volume_patches(sim: &ScgSimulator) -> String {
    let args = file_mode_args(sim, &format!("/var/run/scg/{TOKEN_KEY}"));
    client_patch("messaging-client", &args, true)
}

/// Env: examples/consumer-deployment.yaml renamed to the Deployment the example ScgToken
/// restarts, its Secret volume replaced by an environment variable from the Secret.
fn env_patches(sim: &ScgSimulator) -> String {
    let args = vec![
        "--mode=env".into(),
        "--token-env=SCG_ACCESS_TOKEN".into(),
        format!("--url={}", sim.protected_url()),
        format!("--ca-file={CA_DIR}/ca.crt"),
    ];
    let mut p = format!(
        r#"  - target: {{kind: Deployment, name: messaging-client}}
    patch: |-
      - {{op: replace, path: /metadata/name, value: {name}}}
  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata: {{name: messaging-client}}
      spec:
        template:
          spec:
            volumes: [{{name: scg-token, $patch: delete}}]
            containers:
              - name: client
                volumeMounts: [{{mountPath: /var/run/scg, $patch: delete}}]
                env: [{{name: SCG_ACCESS_TOKEN, valueFrom: {{secretKeyRef: {{name: {TARGET}, key: {TOKEN_KEY}}}}}}}]
"#,
        name = Pattern::EnvRestart.deployment(),
    );
    p.push_str(&client_patch("messaging-client", &args, true));
    p
}

/// The consumer's `GET /stats` (testenv/image/cmd/consumer).
#[derive(Debug, Clone, Default, Deserialize)]
struct ConsumerStats {
    ok: u64,
    failed: u64,
    #[serde(default)]
    failed_by_status: BTreeMap<String, u64>,
    #[serde(default)]
    failed_transport: u64,
    #[serde(default)]
    failed_no_token: u64,
    #[serde(default)]
    tokens: Vec<HeldToken>,
}

#[derive(Debug, Clone, Deserialize)]
struct HeldToken {
    sha256_16: String,
    first_held_unix_ms: i64,
}

impl ConsumerStats {
    fn newest(&self) -> Option<&str> {
        self.tokens.last().map(|t| t.sha256_16.as_str())
    }

    fn held(&self, sha: &str) -> Option<i64> {
        self.tokens
            .iter()
            .find(|t| t.sha256_16 == sha)
            .map(|t| t.first_held_unix_ms)
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("HTTP client")
}

async fn get_text(http: &reqwest::Client, url: &str) -> Option<String> {
    let resp = http.get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

async fn consumer_stats(http: &reqwest::Client, ip: &str) -> Option<ConsumerStats> {
    let body = get_text(http, &format!("http://{ip}:{STATS_PORT}/stats")).await?;
    serde_json::from_str(&body).ok()
}

async fn agent_metrics(http: &reqwest::Client, ip: &str) -> Option<String> {
    get_text(http, &format!("http://{ip}:{AGENT_ADMIN_PORT}/metrics")).await
}

/// The salted fingerprint an agent serves, from its `scgtoken_agent_token_info`.
fn served_fingerprint(metrics: &str) -> Option<String> {
    metrics
        .lines()
        .filter(|l| l.ends_with(" 1"))
        .find_map(|l| l.strip_prefix("scgtoken_agent_token_info{fingerprint=\""))
        .and_then(|rest| rest.split('"').next())
        .map(str::to_string)
}

fn metric_value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Running pods of the pattern with an address, as (name, IP, pod); terminating ones
/// only with `terminating`.
async fn pods_of(api: &Api<Pod>, label: &str, terminating: bool) -> Vec<(String, String, Pod)> {
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/name={label}"));
    let Ok(list) = api.list(&lp).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter(|p| terminating || p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| {
            let name = p.metadata.name.clone()?;
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((name, ip, p))
        })
        .collect()
}

/// Each token the target Secret held, by its SHA-256 prefix, with the local time (unix
/// ms) this test's watch first saw it.
#[derive(Clone, Default)]
struct Writes(Arc<Mutex<Vec<(String, i64)>>>);

impl Writes {
    fn watch(client: kube::Client, namespace: &str) -> (Writes, Task) {
        let writes = Writes::default();
        let seen = writes.clone();
        let secrets: Api<Secret> = Api::namespaced(client, namespace);
        let task = tokio::spawn(async move {
            let config = watcher::Config::default().fields(&format!("metadata.name={TARGET}"));
            let mut stream =
                std::pin::pin!(watcher(secrets, config).default_backoff().applied_objects());
            let deadline = tokio::time::Instant::now() + MAX_RUN;
            for _ in 0..MAX_EVENTS {
                let Ok(Some(next)) = tokio::time::timeout_at(deadline, stream.next()).await else {
                    return;
                };
                let token = next.ok().and_then(|s| s.data?.remove(TOKEN_KEY));
                if let Some(token) = token {
                    seen.record(sha16(&String::from_utf8_lossy(&token.0)));
                }
            }
        });
        (writes, Task(task))
    }

    fn record(&self, sha: String) {
        let now = unix_ms();
        let mut w = self.0.lock().unwrap();
        if !w.iter().any(|(s, _)| *s == sha) {
            w.push((sha, now));
        }
    }

    fn newest(&self) -> Option<String> {
        self.0.lock().unwrap().last().map(|(s, _)| s.clone())
    }

    /// Tokens first seen after `t` (unix ms), oldest first.
    fn after(&self, t: i64) -> Vec<(String, i64)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, at)| *at > t)
            .cloned()
            .collect()
    }
}

/// The consumers' counters: the latest of each pod, and every sample of `failed`.
#[derive(Default)]
struct Sampled {
    latest: BTreeMap<String, ConsumerStats>,
    history: Vec<(i64, String, u64)>,
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Sampled>>);

impl Seen {
    fn record(&self, pod: &str, stats: ConsumerStats) {
        let mut s = self.0.lock().unwrap();
        s.history.push((unix_ms(), pod.to_string(), stats.failed));
        s.latest.insert(pod.to_string(), stats);
    }

    fn latest(&self) -> BTreeMap<String, ConsumerStats> {
        self.0.lock().unwrap().latest.clone()
    }

    fn history(&self) -> Vec<(i64, String, u64)> {
        self.0.lock().unwrap().history.clone()
    }

    /// One round over the pattern's pods, terminating ones included: a replaced env
    /// consumer counts until it is gone.
    async fn poll(&self, pods: &Api<Pod>, label: &str, http: &reqwest::Client) {
        for (name, ip, _) in pods_of(pods, label, true).await {
            if let Some(stats) = consumer_stats(http, &ip).await {
                self.record(&name, stats);
            }
        }
    }

    fn sample(&self, pods: Api<Pod>, label: &'static str) -> Task {
        let seen = self.clone();
        Task(tokio::spawn(async move {
            let http = http();
            let deadline = Instant::now() + MAX_RUN;
            for _ in 0..MAX_SAMPLES {
                if Instant::now() > deadline {
                    return;
                }
                seen.poll(&pods, label, &http).await;
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        }))
    }
}

/// What a run measured, between `t0` (every consumer running with the stored token) and
/// `end` (every consumer calling successfully with the newest one).
struct Measured {
    base: BTreeMap<String, ConsumerStats>,
    last: BTreeMap<String, ConsumerStats>,
    history: Vec<(i64, String, u64)>,
    /// Tokens written in the window: the rotations.
    writes: Vec<(String, i64)>,
    end: i64,
    /// From the simulator: when each token was issued, its predecessor revoked (unix
    /// ms, by SHA-256 prefix), and how often the protected endpoint was shown a revoked
    /// token in the window (the failed calls as the API saw them, before any retry).
    issued_at: BTreeMap<String, i64>,
    revoked_uses: usize,
}

impl Measured {
    fn from_simulator(sim: &ScgSimulator, t0: i64, end: i64) -> (BTreeMap<String, i64>, usize) {
        let issued_at = sim
            .refresh_log()
            .iter()
            .filter_map(|call| Some((sha16(call.issued()?), ms(call.at))))
            .collect();
        let revoked_uses = sim
            .revoked_uses()
            .iter()
            .filter(|u| u.endpoint == Endpoint::Protected && (t0..=end).contains(&ms(u.at)))
            .count();
        (issued_at, revoked_uses)
    }
}

struct Figures {
    rotations: usize,
    pods: usize,
    calls: u64,
    failed: u64,
    failed_by_rotation: Vec<u64>,
    failed_by_status: BTreeMap<String, u64>,
    failed_transport: u64,
    failed_no_token: u64,
    /// Rotations some consumer held (for those that hold the token).
    held_rotations: usize,
    /// From the target Secret written to a consumer holding the token.
    delays: Vec<i64>,
    /// From the refresh call (the old token revoked) to a consumer holding the new one:
    /// the window in which its calls fail.
    gaps: Vec<i64>,
    revoked_uses: usize,
}

/// `failed` of `pod` as last sampled at or before `t`.
fn failed_at(history: &[(i64, String, u64)], pod: &str, t: i64) -> u64 {
    history
        .iter()
        .filter(|(at, p, _)| p == pod && *at <= t)
        .map(|(_, _, f)| *f)
        .next_back()
        .unwrap_or(0)
}

fn figures(m: &Measured) -> Figures {
    let zero = ConsumerStats::default();
    let mut f = Figures {
        rotations: m.writes.len(),
        pods: m.last.len(),
        calls: 0,
        failed: 0,
        failed_by_rotation: Vec::new(),
        failed_by_status: BTreeMap::new(),
        failed_transport: 0,
        failed_no_token: 0,
        held_rotations: 0,
        delays: Vec::new(),
        gaps: Vec::new(),
        revoked_uses: m.revoked_uses,
    };
    for (pod, last) in &m.last {
        let base = m.base.get(pod).unwrap_or(&zero);
        f.calls += (last.ok + last.failed) - (base.ok + base.failed);
        f.failed += last.failed - base.failed;
        f.failed_transport += last.failed_transport - base.failed_transport;
        f.failed_no_token += last.failed_no_token - base.failed_no_token;
        for (code, n) in &last.failed_by_status {
            let before = base.failed_by_status.get(code).copied().unwrap_or(0);
            *f.failed_by_status.entry(code.clone()).or_default() += n - before;
        }
    }
    let mut bounds: Vec<i64> = m.writes.iter().map(|(_, at)| *at).collect();
    bounds.push(m.end);
    for pair in bounds.windows(2) {
        let n = m.last.keys().map(|p| {
            failed_at(&m.history, p, pair[1]).saturating_sub(failed_at(&m.history, p, pair[0]))
        });
        f.failed_by_rotation.push(n.sum());
    }
    for (sha, written) in &m.writes {
        let held: Vec<i64> = m.last.values().filter_map(|s| s.held(sha)).collect();
        f.held_rotations += usize::from(!held.is_empty());
        f.delays.extend(held.iter().map(|h| h - written));
        if let Some(issued) = m.issued_at.get(sha) {
            f.gaps.extend(held.iter().map(|h| h - issued));
        }
    }
    f.delays.sort_unstable();
    f.gaps.sort_unstable();
    f
}

/// Nearest-rank percentile.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

fn print_figures(plan: &Plan, f: &Figures, extra: &str) {
    let show = |v: Option<i64>| v.map_or("na".to_string(), |v| v.to_string());
    let (p50, max) = (percentile(&f.delays, 0.5), f.delays.last().copied());
    let (gap50, gap_max) = (percentile(&f.gaps, 0.5), f.gaps.last().copied());
    let per_rotation = f.failed as f64 / f.rotations.max(1) as f64;
    let by_rotation = f
        .failed_by_rotation
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let by_status = f
        .failed_by_status
        .iter()
        .map(|(c, n)| format!("{c}:{n}"))
        .collect::<Vec<_>>();
    println!(
        "pattern={} lifetime={}s rotations={} pods={} calls={} failed={} failed_per_rotation={per_rotation:.1} \
         failed_by_rotation={by_rotation} failed_by_status={} failed_transport={} failed_no_token={} \
         held_rotations={} delays={} delay_p50_ms={} delay_max_ms={} revoked_to_held_p50_ms={} \
         revoked_to_held_max_ms={} sim_revoked_uses={}{extra}",
        plan.pattern.name(),
        plan.lifetime,
        f.rotations,
        f.pods,
        f.calls,
        f.failed,
        by_status.join(","),
        f.failed_transport,
        f.failed_no_token,
        f.held_rotations,
        f.delays.len(),
        show(p50),
        show(max),
        show(gap50),
        show(gap_max),
        f.revoked_uses,
    );
    let delay = match (p50, max, gap50, gap_max) {
        (Some(p50), Some(max), Some(gap50), Some(gap_max)) => format!(
            "each consumer held each new token {p50} ms (p50), {max} ms (max) after this test saw it \
             written, {gap50} ms (p50), {gap_max} ms (max) after the refresh call revoked the old one"
        ),
        _ => "the consumers never hold the token (the agent adds it)".to_string(),
    };
    println!(
        "{}: {} pod(s) made {} calls across {} rotations of {} s tokens revoked on refresh; {} failed \
         ({per_rotation:.1} per rotation; the API saw {} revoked tokens); {delay}",
        plan.pattern.name(),
        f.pods,
        f.calls,
        f.rotations,
        plan.lifetime,
        f.failed,
        f.revoked_uses,
    );
}

/// Waits until every live pod's consumer answers and, if it holds the token, holds the
/// newest one stored: the start of the measured window. Returns it (unix ms) and the
/// counters then.
async fn consumers_running(
    pods: &Api<Pod>,
    plan: &Plan,
    seen: &Seen,
    writes: &Writes,
) -> (i64, BTreeMap<String, ConsumerStats>) {
    let label = plan.pattern.pod_label();
    until(
        "every consumer running with the stored token",
        PATIENCE,
        || async {
            let live = pods_of(pods, label, false).await;
            let newest = writes.newest()?;
            let snap = seen.latest();
            let running = !live.is_empty()
                && live.iter().all(|(name, _, _)| {
                    snap.get(name).is_some_and(|s| {
                        s.ok > 0
                            && (!plan.pattern.holds_token() || s.newest() == Some(newest.as_str()))
                    })
                });
            running.then(|| (unix_ms(), snap))
        },
    )
    .await
}

/// After the last rotation: waits until every live pod holds the newest token stored (if
/// it holds one) and has made successful calls since: the end of the measured window.
/// Returns that token and the counters then.
async fn consumers_caught_up(
    pods: &Api<Pod>,
    plan: &Plan,
    seen: &Seen,
    writes: &Writes,
) -> (String, BTreeMap<String, ConsumerStats>) {
    let label = plan.pattern.pod_label();
    let ok_then: BTreeMap<String, u64> =
        seen.latest().into_iter().map(|(p, s)| (p, s.ok)).collect();
    let what = "every consumer calling with the newest token";
    until(what, Duration::from_secs(300), || async {
        let live = pods_of(pods, label, false).await;
        let newest = writes.newest()?;
        let snap = seen.latest();
        let done = !live.is_empty()
            && live.iter().all(|(name, _, _)| {
                snap.get(name).is_some_and(|s| {
                    let holds = !plan.pattern.holds_token() || s.newest() == Some(newest.as_str());
                    holds && s.ok >= ok_then.get(name).copied().unwrap_or(0) + 10
                })
            });
        done.then_some((newest, snap))
    })
    .await
}

/// Runs one pattern: install, workload, the measured window, figures and the status
/// check. Everything started is removed when it returns or panics.
async fn run(plan: &Plan) -> (Figures, BTreeMap<String, ConsumerStats>) {
    let lane = Lane::get().await;
    let sim = lane.simulator(Duration::from_secs(plan.lifetime)).await;
    let _operator = OperatorInstall::apply(
        &lane,
        &sim,
        "operator",
        "deploy",
        &[
            "deploy/components/consumer-reports",
            "deploy/components/consumer-nudge",
            "deploy/components/rollout-restart",
        ],
    );
    let namespace = plan.namespace();
    let (writes, _watch) = Writes::watch(lane.client.clone(), &namespace);
    let _workload = Workload::apply(&lane, &sim, plan);
    rollout(&namespace, plan.pattern.deployment());
    let pods: Api<Pod> = Api::namespaced(lane.client.clone(), &namespace);
    let seen = Seen::default();
    let sampler = seen.sample(pods.clone(), plan.pattern.pod_label());

    let (t0, base) = consumers_running(&pods, plan, &seen, &writes).await;
    let what = format!(
        "{} rotations stored while the consumers run",
        plan.rotations
    );
    until(&what, plan.patience(), || async {
        (writes.after(t0).len() >= plan.rotations).then_some(())
    })
    .await;
    let (newest, last) = consumers_caught_up(&pods, plan, &seen, &writes).await;
    let end = unix_ms();
    drop(sampler);
    let mut window = writes.after(t0);
    let upto = window
        .iter()
        .position(|(sha, _)| *sha == newest)
        .expect("newest written");
    window.truncate(upto + 1);
    let (issued_at, revoked_uses) = Measured::from_simulator(&sim, t0, end);
    let measured = Measured {
        base,
        last,
        history: seen.history(),
        writes: window,
        end,
        issued_at,
        revoked_uses,
    };
    let figures = figures(&measured);
    let extra = if plan.pattern == Pattern::Proxy {
        format!(" agent_retries_ok={}", proxy_retries(&pods).await)
    } else {
        String::new()
    };
    print_figures(plan, &figures, &extra);
    let agreement = if plan.pattern.has_agent() {
        agents_agree(&lane, plan).await
    } else {
        no_agents_agree(&lane, plan).await
    };
    println!("{agreement}");
    (figures, measured.last)
}

/// Retries with a newer token that the proxy agents made (401s the apps never saw).
async fn proxy_retries(pods: &Api<Pod>) -> u64 {
    let http = http();
    let mut sum = 0;
    for (_, ip, _) in pods_of(pods, Pattern::Proxy.pod_label(), false).await {
        let metrics = agent_metrics(&http, &ip).await.unwrap_or_default();
        sum += metric_value(
            &metrics,
            "scgtoken_agent_proxy_retries_total{result=\"ok\"}",
        );
    }
    sum
}

async fn status_of(tokens: &Api<ScgToken>) -> Option<ScgTokenStatus> {
    tokens.get(SCGTOKEN).await.ok()?.status
}

/// `status/reason` of the ConsumersUpToDate condition.
fn consumers_condition(status: &ScgTokenStatus) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "ConsumersUpToDate")
        .map_or("absent".to_string(), |c| {
            format!("{}/{}", c.status, c.reason)
        })
}

/// Agent patterns: `status.consumers` counts every pod current, and every pod's agent
/// serves `status.tokenFingerprint` (read from the agent's own metrics, not its Lease).
/// Rotations go on meanwhile: a reading counts only if the fingerprint did not change
/// while the pods were read.
async fn agents_agree(lane: &Lane, plan: &Plan) -> String {
    let tokens: Api<ScgToken> = Api::namespaced(lane.client.clone(), &plan.namespace());
    let pods: Api<Pod> = Api::namespaced(lane.client.clone(), &plan.namespace());
    let http = http();
    let deadline = Instant::now() + AGREE_WITHIN;
    let mut last = String::from("no status read");
    for _ in 0..(AGREE_WITHIN.as_millis() / SAMPLE_EVERY.as_millis()) {
        let before = status_of(&tokens).await;
        let mut served = BTreeMap::new();
        for (name, ip, _) in pods_of(&pods, plan.pattern.pod_label(), false).await {
            let metrics = agent_metrics(&http, &ip).await.unwrap_or_default();
            served.insert(name, served_fingerprint(&metrics));
        }
        let after = status_of(&tokens).await.and_then(|s| s.token_fingerprint);
        if let Some(status) = before {
            let fp = status.token_fingerprint.clone();
            let n = served.len() as u32;
            let serving = served.values().filter(|s| s.is_some() && **s == fp).count() as u32;
            let c = status.consumers.clone().unwrap_or_default();
            let condition = consumers_condition(&status);
            last = format!(
                "pattern={} status_consumers={} total={} current={} stale={} stale_pods={:?} condition={condition} \
                 slowest_switch_s={:?} pods={n} pods_serving_status_fingerprint={serving} served={served:?} fingerprint={fp:?}",
                plan.pattern.name(),
                c.summary,
                c.total,
                c.current,
                c.stale,
                c.stale_pods,
                c.slowest_switch_seconds,
            );
            let agreed = after == fp && n > 0 && serving == n && c.total == n && c.current == n;
            if agreed && c.stale == 0 && condition.starts_with("True/") {
                return last;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    panic!("status.consumers and the pods' agents did not agree within {AGREE_WITHIN:?}: {last}");
}

/// Volume and env patterns: no agent runs, so no report: ConsumersUpToDate says
/// NoReports and counts nobody. What the pods show instead: the nudged pods carry
/// `scgtoken.io/nudged-for` = the current fingerprint (none without a podSelector); the
/// restarted env pods carry `scgtoken.io/restarted-for` = it in their template.
async fn no_agents_agree(lane: &Lane, plan: &Plan) -> String {
    let tokens: Api<ScgToken> = Api::namespaced(lane.client.clone(), &plan.namespace());
    let pods: Api<Pod> = Api::namespaced(lane.client.clone(), &plan.namespace());
    let annotation = match plan.pattern {
        Pattern::EnvRestart => RESTARTED_FOR_ANNOTATION,
        _ => NUDGED_FOR_ANNOTATION,
    };
    let deadline = Instant::now() + AGREE_WITHIN;
    let mut last = String::from("no status read");
    for _ in 0..(AGREE_WITHIN.as_millis() / SAMPLE_EVERY.as_millis()) {
        let before = status_of(&tokens).await;
        let marks: BTreeMap<String, Option<String>> =
            pods_of(&pods, plan.pattern.pod_label(), false)
                .await
                .into_iter()
                .map(|(name, _, pod)| {
                    (
                        name,
                        pod.metadata
                            .annotations
                            .and_then(|a| a.get(annotation).cloned()),
                    )
                })
                .collect();
        let after = status_of(&tokens).await.and_then(|s| s.token_fingerprint);
        if let Some(status) = before {
            let fp = status.token_fingerprint.clone();
            let total = status.consumers.as_ref().map_or(0, |c| c.total);
            let condition = consumers_condition(&status);
            let marked = marks.values().filter(|m| m.is_some() && **m == fp).count();
            let unmarked = marks.values().filter(|m| m.is_none()).count();
            last = format!(
                "pattern={} status_consumers={:?} total={total} condition={condition} pods={} \
                 pods_marked_with_status_fingerprint={marked} pods_unmarked={unmarked} annotation={annotation} \
                 marks={marks:?} fingerprint={fp:?}",
                plan.pattern.name(),
                status.consumers.as_ref().map(|c| c.summary.clone()),
                marks.len(),
            );
            let expected = if plan.pattern == Pattern::VolumeNoNudge {
                unmarked
            } else {
                marked
            };
            let agreed = after == fp && !marks.is_empty() && expected == marks.len();
            if agreed && total == 0 && condition == "Unknown/NoReports" {
                return last;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    panic!("the ScgToken's status and the pods did not agree within {AGREE_WITHIN:?}: {last}");
}

/// What every pattern must show: the rotations happened while the consumers ran, and a
/// consumer that holds the token held every one of them and never found its file
/// missing or empty (the agent and the kubelet both replace it atomically).
fn assert_common(plan: &Plan, f: &Figures, last: &BTreeMap<String, ConsumerStats>) {
    let name = plan.pattern.name();
    assert!(
        f.rotations >= plan.rotations,
        "{name}: {} rotations",
        f.rotations
    );
    assert!(
        last.values().all(|s| s.ok > 0),
        "{name}: a consumer made no successful call: {last:?}"
    );
    if plan.pattern.holds_token() {
        assert_eq!(
            f.held_rotations, f.rotations,
            "{name}: rotations no consumer held"
        );
        assert_eq!(f.failed_no_token, 0, "{name}: token file missing or empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn consumers_proxy_agent_sidecar_fails_no_call_across_rotations() {
    // 20 s tokens, refreshed when a third is left: a rotation every ~13 s.
    let plan = Plan {
        pattern: Pattern::Proxy,
        lifetime: 20,
        refresh_before: None,
        rotations: 3,
    };
    let (f, last) = run(&plan).await;
    assert_common(&plan, &f, &last);
    for (pod, s) in &last {
        assert_eq!(
            s.failed, 0,
            "proxy: failed calls on {pod} (whole life): {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn consumers_file_agent_sidecar_holds_every_token() {
    // The consumer reads the agent's file before every call and does not retry a 401:
    // the calls between the revocation (the refresh call) and the file's swap fail, and
    // are counted, not asserted.
    let plan = Plan {
        pattern: Pattern::File,
        lifetime: 20,
        refresh_before: None,
        rotations: 3,
    };
    let (f, last) = run(&plan).await;
    assert_common(&plan, &f, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn long_volume_nudge_secret_volume_follows_each_token() {
    // 150 s tokens: a refresh every ~100 s, longer than the kubelet's periodic sync
    // (60-90 s), so a nudge that did not work shows as a delay of tens of seconds, not as
    // a token the consumer never held; a working nudge should take seconds.
    let plan = Plan {
        pattern: Pattern::VolumeNudge,
        lifetime: 150,
        refresh_before: None,
        rotations: 2,
    };
    let (f, last) = run(&plan).await;
    assert_common(&plan, &f, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn long_volume_no_nudge_secret_volume_waits_for_the_kubelet() {
    // 300 s tokens: a refresh every ~200 s, well above the kubelet's 60-90 s periodic
    // sync (default syncFrequency 1 m plus jitter, watch-based Secret cache), so each
    // token reaches the volume before the next one. The delay is wherever the write
    // falls in the pod's sync cycle: anything from ~0 to ~90 s, so two rotations say
    // little about its spread.
    let plan = Plan {
        pattern: Pattern::VolumeNoNudge,
        lifetime: 300,
        refresh_before: None,
        rotations: 2,
    };
    let (f, last) = run(&plan).await;
    assert_common(&plan, &f, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn long_env_restart_rollout_brings_each_token() {
    // Restarts are refused for tokens living less than 600 s or refreshed more often than
    // every 300 s (src/consumers.rs, restart_refusal). 660 s tokens refreshed 5 m before
    // expiry: a refresh every 330-360 s (jitter up to 30 s), clear of both bounds.
    let plan = Plan {
        pattern: Pattern::EnvRestart,
        lifetime: 660,
        refresh_before: Some("5m"),
        rotations: 2,
    };
    let (f, last) = run(&plan).await;
    assert_common(&plan, &f, &last);
    assert!(
        last.len() > plan.rotations,
        "env: one pod per token at least: {} pods",
        last.len()
    );
}
