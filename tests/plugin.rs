//! `kubectl scgtoken`, run as users run it: kubectl finds `kubectl-scgtoken` on PATH (the
//! directory of the built binary goes first) and hands it the arguments, against the
//! in-memory API server (or the cluster of `SCG_E2E_KUBECONFIG`), the SCG simulator and
//! the operator binary.
//!
//! Every verb, bad input (a missing ScgToken, a wrong kubeconfig or context, a 403, a
//! token with a line break or a space inside), and the promise that no output of the
//! plugin holds a secret: the consumer secret, every token the simulator issued, the new
//! seeds and their base64 are planted and looked for in everything it printed.

mod common {
    pub mod harness;
}

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use common::harness::{
    CONSUMER_KEY, CONSUMER_SECRET, Env, PATIENCE, UNKNOWN_CONSUMER, UNKNOWN_SEED, capture_output,
    poll_until,
};
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        coordination::v1::{Lease, LeaseSpec},
        core::v1::ServiceAccount,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use scg_token_operator::{
    chain,
    crd::{
        AGENT_MODE_ANNOTATION, AGENT_SCGTOKEN_LABEL, ConsumersSpec, REFRESH_REQUEST_ANNOTATION,
        SERVED_FINGERPRINT_ANNOTATION, SERVED_SINCE_ANNOTATION,
    },
};
use testkit::scgsim::SimConfig;
use tokio::io::AsyncWriteExt;

/// What one run of the plugin did.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Succeeded, or fails the test showing what it printed.
    fn ok(self) -> Ran {
        assert_eq!(self.code, Some(0), "the plugin failed:\n{}", self.all());
        self
    }

    /// Failed with exactly one line on stderr that contains `fragment`, and no panic.
    fn one_line_error(&self, fragment: &str) {
        assert_ne!(self.code, Some(0), "expected a failure:\n{}", self.all());
        assert!(self.code.is_some(), "killed by a signal:\n{}", self.all());
        let lines: Vec<&str> = self.stderr.trim().lines().collect();
        assert_eq!(lines.len(), 1, "not one line on stderr:\n{}", self.stderr);
        assert!(lines[0].starts_with("error: "), "{}", lines[0]);
        assert!(
            lines[0].contains(fragment),
            "{:?} lacks {fragment:?}",
            lines[0]
        );
        assert!(!self.all().contains("panicked"), "{}", self.all());
    }
}

/// PATH with the directory of the built plugin first, as a user installs it.
fn plugin_path() -> std::ffi::OsString {
    let bin = Path::new(env!("CARGO_BIN_EXE_kubectl-scgtoken"));
    let dir = bin.parent().expect("the plugin's directory").to_path_buf();
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(&rest))).expect("PATH")
}

/// `kubectl scgtoken ARGS --kubeconfig KUBECONFIG -n NAMESPACE`, with `stdin` piped in.
fn command(kubeconfig: &Path, namespace: &str, args: &[&str]) -> tokio::process::Command {
    testkit::require_kubectl();
    let mut command = tokio::process::Command::new("kubectl");
    command
        .arg("scgtoken")
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["-n", namespace])
        .env("PATH", plugin_path())
        .env_remove("KUBECONFIG")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn run_with(kubeconfig: &Path, namespace: &str, args: &[&str], stdin: &[u8]) -> Ran {
    let mut child = command(kubeconfig, namespace, args)
        .spawn()
        .expect("start kubectl");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).await.expect("write stdin");
    drop(input);
    let out = tokio::time::timeout(PATIENCE + Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("kubectl scgtoken did not end in time")
        .expect("kubectl scgtoken output");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn plugin(env: &Env, args: &[&str]) -> Ran {
    run_with(&env.kubeconfig, &env.namespace, args, b"").await
}

async fn plugin_stdin(env: &Env, args: &[&str], stdin: &[u8]) -> Ran {
    run_with(&env.kubeconfig, &env.namespace, args, stdin).await
}

/// Fails if `text` holds any of `secrets`, as text or as base64.
fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        let b64 = serde_json::to_string(&ByteString(secret.as_bytes().to_vec())).unwrap();
        let b64 = b64.trim_matches('"');
        assert!(
            !text.contains(secret.as_str()) && !text.contains(b64),
            "{what} printed a secret: {}",
            text.replace(secret.as_str(), "<SECRET>")
                .replace(b64, "<BASE64>")
        );
    }
}

/// Everything that must never be printed: the consumer secret and every token issued.
fn planted(env: &Env, extra: &[&str]) -> Vec<String> {
    let mut all = env.sim.issued_tokens();
    all.push(CONSUMER_SECRET.to_string());
    all.push(UNKNOWN_SEED.to_string());
    all.extend(extra.iter().map(|s| s.to_string()));
    all
}

/// Whether one line of `out` holds every one of `parts`.
fn has_line(out: &str, parts: &[&str]) -> bool {
    out.lines().any(|l| parts.iter().all(|p| l.contains(p)))
}

/// An ScgToken "broken" whose credentials SCG does not know, the operator, and its
/// `Rejected`. Returns the operator.
async fn rejected_token(env: &Env) -> common::harness::Operator {
    env.put_credentials("bad-creds", UNKNOWN_CONSUMER, UNKNOWN_SEED)
        .await;
    env.scgtoken("broken", "bad-creds", |_| {}).await;
    let op = env.operator(&[]);
    env.eventually("Rejected", || async {
        env.ready("broken").await.filter(|(_, r)| r == "Rejected")
    })
    .await;
    op
}

/// Credentials, an ScgToken "messaging" with long-lived tokens (refreshes happen when a
/// test asks), the operator, and the first token stored. Returns the operator.
async fn ready_token(env: &Env, extra: &[&str]) -> common::harness::Operator {
    env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |s| s.validity = "1h".into())
        .await;
    let op = env.operator(extra);
    wait_ready(env, "messaging").await;
    op
}

async fn wait_ready(env: &Env, name: &str) {
    env.eventually("Ready=True", || async {
        env.ready(name).await.filter(|(s, _)| s == "True")
    })
    .await;
}

async fn fingerprint(env: &Env, name: &str) -> String {
    let t = env.tokens().get(name).await.expect("ScgToken");
    t.status
        .and_then(|s| s.token_fingerprint)
        .expect("a fingerprint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn status_shows_ready_the_countdowns_and_the_events() {
    let env = Env::start(SimConfig::default()).await;
    let _op = ready_token(&env, &[]).await;
    let fp = fingerprint(&env, "messaging").await;
    let ran = plugin(&env, &["status", "messaging"]).await.ok();
    let out = &ran.stdout;
    assert!(out.contains("Ready:         True (Refreshed)"), "{out}");
    assert!(out.contains(&format!("fingerprint {fp}")), "{out}");
    assert!(has_line(out, &["Expires:", "(in 59m"]), "{out}");
    assert!(has_line(out, &["Next refresh:", "(in "]), "{out}");
    assert!(out.contains("Consumers:     not tracked"), "{out}");
    assert!(!out.contains("hint:"), "a happy token needs no hint: {out}");
    // The operator announces the first token of the chain.
    assert!(has_line(out, &["Normal", "Refreshed"]), "{out}");
    assert_no_secret("status", &ran.all(), &planted(&env, &[]));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn status_tells_what_to_do_about_a_refused_chain() {
    let env = Env::start(SimConfig::default()).await;
    let _op = rejected_token(&env).await;
    let ran = plugin(&env, &["status", "broken"]).await.ok();
    let out = &ran.stdout;
    assert!(out.contains("Ready:         False (Rejected)"), "{out}");
    assert!(
        has_line(out, &["hint:", "kubectl scgtoken reseed broken"]),
        "{out}"
    );
    assert!(out.contains("Failures:      1 in a row"), "{out}");
    assert!(has_line(out, &["Warning", "Rejected"]), "{out}");
    assert_no_secret("status", &ran.all(), &planted(&env, &[]));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn status_watch_prints_again_on_change_and_ends_on_ctrl_c() {
    let env = Env::start(SimConfig::default()).await;
    let _op = ready_token(&env, &[]).await;
    let before = fingerprint(&env, "messaging").await;
    let mut child = command(
        &env.kubeconfig,
        &env.namespace,
        &["status", "messaging", "--watch"],
    )
    .spawn()
    .expect("start kubectl");
    let output = capture_output(&mut child);
    let printed = |needle: String| {
        let output = output.clone();
        async move { output.lock().unwrap().contains(&needle).then_some(()) }
    };
    poll_until("the first report", Duration::from_millis(50), || {
        printed(format!("fingerprint {before}"))
    })
    .await;

    let asked = jiff::Timestamp::now().to_string();
    let patch =
        serde_json::json!({"metadata": {"annotations": {REFRESH_REQUEST_ANNOTATION: asked}}});
    env.tokens()
        .patch("messaging", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("ask for a refresh");
    let after = env
        .eventually("a new token", || async {
            let fp = fingerprint(&env, "messaging").await;
            (fp != before).then_some(fp)
        })
        .await;
    poll_until(
        "a report with the new token",
        Duration::from_millis(50),
        || printed(format!("fingerprint {after}")),
    )
    .await;

    let pid = child.id().expect("the plugin runs").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status();
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("the watch ended on Ctrl-C")
        .expect("exit status");
    assert!(
        status.success(),
        "Ctrl-C ends the watch cleanly: {status:?}"
    );
    let text = output.lock().unwrap().clone();
    assert!(text.matches("ScgToken ").count() >= 2, "{text}");
    assert_no_secret("status --watch", &text, &planted(&env, &[]));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn renew_refreshes_now_and_prints_the_new_fingerprint() {
    let env = Env::start(SimConfig::default()).await;
    let _op = ready_token(&env, &[]).await;
    let before = fingerprint(&env, "messaging").await;
    let calls = env.sim.refresh_calls();
    let ran = plugin(&env, &["renew", "messaging"]).await.ok();
    let after = fingerprint(&env, "messaging").await;
    assert_ne!(after, before);
    assert!(
        ran.stdout
            .contains(&format!("renewed: token fingerprint {after}")),
        "{}",
        ran.stdout
    );
    assert_eq!(env.sim.refresh_calls(), calls + 1, "one refresh call");
    let t = env.tokens().get("messaging").await.unwrap();
    let asked = t.annotations().get(REFRESH_REQUEST_ANNOTATION).cloned();
    assert!(
        asked
            .as_deref()
            .is_some_and(|a| a.parse::<jiff::Timestamp>().is_ok()),
        "the annotation holds an RFC 3339 time: {asked:?}"
    );
    assert_no_secret("renew", &ran.all(), &planted(&env, &[]));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn renew_says_why_when_the_refresh_fails_or_nothing_answers() {
    let env = Env::start(SimConfig::default()).await;
    let mut op = rejected_token(&env).await;
    // The operator acts on the request at once, back-off or not, and is refused again.
    let ran = plugin(&env, &["renew", "broken"]).await;
    ran.one_line_error("the refresh failed: Ready is Rejected");

    // With no operator, nothing answers: the wait ends at --timeout with what Ready says.
    op.terminate(PATIENCE).await;
    let ran = plugin(&env, &["renew", "broken", "--timeout", "2s"]).await;
    ran.one_line_error("no new token within 2s; Ready is False (Rejected)");
    assert_no_secret("renew", &ran.all(), &planted(&env, &[]));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn reseed_starts_a_new_chain_from_stdin_and_never_prints_the_token() {
    let env = Env::start(SimConfig::default()).await;
    let _op = ready_token(&env, &[]).await;
    let first = env.target_token("messaging").await.expect("a token");
    // A human re-generates the token in the SDC UI: the chain is revoked.
    let seed = env.sim.regenerate(CONSUMER_KEY);
    let ran = plugin_stdin(
        &env,
        &["reseed", "messaging"],
        format!("{seed}\n").as_bytes(),
    )
    .await
    .ok();
    assert!(
        ran.stdout.contains("a new chain runs from the new seed"),
        "{}",
        ran.stdout
    );
    let target = env.secrets().get("messaging").await.unwrap();
    let t = env.tokens().get("messaging").await.unwrap();
    assert_eq!(
        target.annotations().get(chain::SEED_FINGERPRINT),
        Some(&chain::fingerprint(&t, &seed)),
        "the stored chain descends from the new seed"
    );
    let stored = env.target_token("messaging").await.unwrap();
    assert!(stored != first && env.sim.is_valid(&stored));
    // Only the seed key changed.
    let creds = env.secrets().get("creds").await.unwrap();
    let data = creds.data.unwrap();
    assert_eq!(data["accessToken"].0, seed.as_bytes());
    assert_eq!(data["consumerSecret"].0, CONSUMER_SECRET.as_bytes());
    assert_eq!(data["consumerKey"].0, CONSUMER_KEY.as_bytes());
    assert_no_secret("reseed", &ran.all(), &planted(&env, &[&seed]));

    // The same seed again would start nothing: refused before anything is written.
    let version = creds.metadata.resource_version;
    let ran = plugin_stdin(&env, &["reseed", "messaging"], seed.as_bytes()).await;
    ran.one_line_error("this is the seed the current chain of messaging started from");
    let creds = env.secrets().get("creds").await.unwrap();
    assert_eq!(
        creds.metadata.resource_version, version,
        "nothing was written"
    );
    assert_no_secret("reseed", &ran.all(), &planted(&env, &[&seed]));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn reseed_reports_a_refused_seed_and_refuses_bad_ones() {
    let env = Env::start(SimConfig::default()).await;
    let _op = ready_token(&env, &[]).await;
    let version = || async {
        let s = env.secrets().get("creds").await.unwrap();
        s.metadata.resource_version
    };
    let unchanged = version().await;
    let made_up = "plugin-made-up-seed-5d1e0c";
    for (input, why) in [
        (format!("{made_up}\nsecond-line"), "line break"),
        (format!("{made_up} {made_up}"), "space"),
        (format!(" {made_up}"), "space"),
        (String::new(), "the token is empty"),
        ("\u{e9}t\u{e9}-token-long".to_string(), "printable ASCII"),
    ] {
        let ran = plugin_stdin(&env, &["reseed", "messaging"], input.as_bytes()).await;
        ran.one_line_error(why);
        assert!(ran.stderr.contains("nothing was written"), "{}", ran.stderr);
        assert_no_secret(
            "reseed",
            &ran.all(),
            &planted(&env, &[made_up, "second-line"]),
        );
    }
    assert_eq!(version().await, unchanged, "no bad seed was written");

    let ran = plugin_stdin(
        &env,
        &["reseed", "messaging", "--standby"],
        made_up.as_bytes(),
    )
    .await;
    ran.one_line_error("standby is not configured");

    // A seed of the right shape that the API does not know: the operator tries it, and
    // the plugin says how it ended.
    let ran = plugin_stdin(&env, &["reseed", "messaging"], made_up.as_bytes()).await;
    ran.one_line_error("it was refused: Ready is Rejected");
    assert_no_secret("reseed", &ran.all(), &planted(&env, &[made_up]));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn reseed_waits_for_no_refresh_in_flight() {
    let env = Env::start(SimConfig::default()).await;
    // No operator: a refresh asked for stays unanswered.
    env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let patch = serde_json::json!({"metadata": {"annotations": {REFRESH_REQUEST_ANNOTATION: "2026-01-01T00:00:00Z"}}});
    env.tokens()
        .patch("messaging", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let before = env
        .secrets()
        .get("creds")
        .await
        .unwrap()
        .metadata
        .resource_version;
    let ran = plugin_stdin(
        &env,
        &["reseed", "messaging"],
        b"plugin-seed-in-flight-77aa",
    )
    .await;
    ran.one_line_error("has not been acted on yet");
    let after = env
        .secrets()
        .get("creds")
        .await
        .unwrap()
        .metadata
        .resource_version;
    assert_eq!(before, after, "nothing was written");
    env.close().await;
}

/// A token agent's report, as the agent writes it: pod `pod` serves the token with
/// fingerprint `fingerprint`, since its start `started`.
fn report(pod: &str, fingerprint: &str, started: jiff::Timestamp) -> Lease {
    let now = jiff::Timestamp::now();
    Lease {
        metadata: ObjectMeta {
            name: Some(format!("scgtoken-agent-{pod}")),
            labels: Some([(AGENT_SCGTOKEN_LABEL.to_string(), "messaging".to_string())].into()),
            annotations: Some(
                [
                    (SERVED_FINGERPRINT_ANNOTATION, fingerprint.to_string()),
                    (SERVED_SINCE_ANNOTATION, started.to_string()),
                    (AGENT_MODE_ANNOTATION, "file".to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(pod.into()),
            lease_duration_seconds: Some(3600),
            acquire_time: Some(MicroTime(started)),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn consumers_lists_each_pod_its_fingerprint_and_whether_it_is_stale() {
    let env = Env::start(SimConfig::default()).await;
    env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |s| {
        s.validity = "1h".into();
        s.consumers = Some(ConsumersSpec {
            agents: true,
            stale_after: "1s".into(),
            ..ConsumersSpec::default()
        });
    })
    .await;
    let _op = env.operator(&["--consumer-reports"]);
    wait_ready(&env, "messaging").await;
    let current = fingerprint(&env, "messaging").await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let long_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    for lease in [
        report("web-0", &current, long_ago),
        report("web-1", "00000000000000aa", long_ago),
    ] {
        leases.create(&PostParams::default(), &lease).await.unwrap();
    }
    env.eventually("the operator counts both reports", || async {
        let t = env.tokens().get("messaging").await.ok()?;
        let c = t.status?.consumers?;
        (c.total == 2 && c.stale == 1).then_some(())
    })
    .await;
    let ran = plugin(&env, &["consumers", "messaging"]).await.ok();
    let out = &ran.stdout;
    assert!(
        out.contains(&format!("current token fingerprint {current}")),
        "{out}"
    );
    assert!(out.contains("1 current of 2 reporting, 1 stale"), "{out}");
    let row = |pod: &str| {
        out.lines()
            .find(|l| l.starts_with(pod))
            .unwrap_or_else(|| panic!("no row for {pod}: {out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("web-0")[1..3], [current.clone(), "current".into()]);
    assert_eq!(
        row("web-1")[1..3],
        ["00000000000000aa".to_string(), "stale".into()]
    );
    assert_no_secret("consumers", &ran.all(), &planted(&env, &[]));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn inspect_gives_a_ticket_everything_but_the_secrets() {
    let env = Env::start(SimConfig::default()).await;
    let _op = ready_token(&env, &[]).await;
    // As `kubectl apply` leaves it: the whole Secret, data included, in an annotation.
    let seed_now = env.sim.current_token(CONSUMER_KEY).unwrap_or_default();
    let applied =
        serde_json::json!({"stringData": {"consumerSecret": CONSUMER_SECRET}}).to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": applied,
        "team": "messaging-oncall"
    }}});
    env.secrets()
        .patch("creds", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let ran = plugin(&env, &["inspect", "messaging"]).await.ok();
    assert_no_secret("inspect", &ran.all(), &planted(&env, &[&seed_now]));
    let doc: serde_json::Value = serde_yaml::from_str(&ran.stdout).expect("YAML");
    assert_eq!(
        doc["scgtoken"]["spec"]["credentialsSecretRef"]["name"],
        "creds"
    );
    assert_eq!(
        doc["scgtoken"]["status"]["conditions"][0]["reason"],
        "Refreshed"
    );
    assert_eq!(
        doc["targetSecret"]["keys"],
        serde_json::json!(["accessToken"])
    );
    assert_eq!(
        doc["credentialsSecret"]["keys"],
        serde_json::json!(["accessToken", "consumerKey", "consumerSecret"])
    );
    assert_eq!(
        doc["credentialsSecret"]["annotations"]["team"],
        "messaging-oncall"
    );
    assert!(doc["targetSecret"]["annotations"][chain::SEED_FINGERPRINT].is_string());
    assert!(
        doc["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["reason"] == "Refreshed")),
        "{}",
        ran.stdout
    );
    // Not installed as a Deployment here: the document says so rather than guessing.
    assert!(doc["operator"]["notFound"].is_string(), "{}", ran.stdout);
    assert!(
        doc["generatedBy"]
            .as_str()
            .unwrap()
            .starts_with("kubectl-scgtoken ")
    );
    env.finish().await;
}

/// A kubeconfig whose user may do nothing with ScgTokens. A real cluster enforces RBAC:
/// a ServiceAccount without bindings and a token of its own. The in-memory server
/// authorizes everything, so its next ScgToken read is made to answer 403.
async fn forbidden_kubeconfig(env: &Env) -> PathBuf {
    if let Some(api) = &env.api {
        api.faults().fail_next("get", "scgtokens", 1, 403);
        return env.kubeconfig.clone();
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.namespace);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("plugin-nobody".into());
    accounts.create(&PostParams::default(), &sa).await.unwrap();
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let token = accounts
        .create_token_request("plugin-nobody", &PostParams::default(), &request)
        .await
        .expect("a token")
        .status
        .expect("token status")
        .token;
    let mut kc = kube::config::Kubeconfig::read_from(&env.kubeconfig).unwrap();
    let user: kube::config::AuthInfo =
        serde_json::from_value(serde_json::json!({"token": token})).unwrap();
    for a in &mut kc.auth_infos {
        a.auth_info = Some(user.clone());
    }
    let path = std::env::temp_dir().join(format!("plugin-nobody-{}.kubeconfig", env.namespace));
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn bad_input_gets_one_line_and_a_non_zero_exit() {
    let env = Env::start(SimConfig::default()).await;
    env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let ns = env.namespace.clone();

    for verb in ["status", "renew", "reseed", "consumers", "inspect"] {
        let ran = plugin_stdin(&env, &[verb, "nope"], b"plugin-unused-seed-1").await;
        ran.one_line_error(&format!(
            "ScgToken \"nope\" not found in namespace \"{ns}\""
        ));
    }

    let missing = Path::new("/nonexistent/kubeconfig");
    let ran = run_with(missing, &ns, &["status", "messaging"], b"").await;
    ran.one_line_error("cannot read the kubeconfig /nonexistent/kubeconfig");

    // A kubeconfig that is not YAML, with a token-looking value in it: not quoted back.
    let dir = std::env::temp_dir().join(format!("plugin-bad-{}-{}", std::process::id(), ns));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("kubeconfig");
    std::fs::write(
        &garbage,
        "users: [{token: plugin-kubeconfig-secret-91ab\n  - : ][",
    )
    .unwrap();
    let ran = run_with(&garbage, &ns, &["status", "messaging"], b"").await;
    ran.one_line_error("not a valid kubeconfig");
    assert_no_secret(
        "a bad kubeconfig",
        &ran.all(),
        &["plugin-kubeconfig-secret-91ab".into()],
    );

    let ran = plugin(
        &env,
        &["status", "messaging", "--context", "no-such-context"],
    )
    .await;
    ran.one_line_error("cannot use the kubeconfig");

    let nobody = forbidden_kubeconfig(&env).await;
    let ran = run_with(&nobody, &ns, &["status", "messaging"], b"").await;
    ran.one_line_error("forbidden: your credentials may not get ScgToken \"messaging\"");
    assert_no_secret("forbidden", &ran.all(), &planted(&env, &[]));

    // clap's own usage errors exit non-zero too; a seed is never an argument.
    let ran = plugin(&env, &["reseed", "messaging", "plugin-seed-as-argument-1"]).await;
    assert_eq!(ran.code, Some(2), "{}", ran.all());
    assert_no_secret("usage", &ran.all(), &["plugin-seed-as-argument-1".into()]);
    let _ = std::fs::remove_dir_all(&dir);
    env.close().await;
}
