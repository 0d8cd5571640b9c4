//! The ValidatingAdmissionPolicies that ship in deploy/ and the chart, against a real
//! kube-apiserver: only the policies' CEL, evaluated by the server with real pod-bound
//! ServiceAccount tokens, says whether a forged request is refused.
//!
//! Needs a real API server, so it is ignored by a plain `cargo test`. It runs when the
//! tests are built with `SCG_E2E_KUBECONFIG` set (`cfg(real_cluster)`), as in the CI lane:
//!
//! ```text
//! testenv/run -- cargo test --test admission_policies
//! ```
//!
//! Every write is a server-side dry run (admission runs, nothing is stored), and the
//! policy is bound to the test's own namespace, so the other tests of the lane never
//! meet it. The namespace and the binding are deleted when the test ends, also on panic.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{Value, json};

const IGNORE_REASON: &str =
    "needs a real API server: testenv/run -- cargo test --test admission_policies";
/// Upper bound of any wait; generous for a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kubeconfig() -> String {
    match std::env::var("SCG_E2E_KUBECONFIG") {
        Ok(path) if !path.is_empty() => path,
        _ => panic!("SCG_E2E_KUBECONFIG is not set: {IGNORE_REASON}"),
    }
}

/// Who a request is made as.
#[derive(Clone)]
enum As {
    Admin,
    /// Impersonated by the admin (a person with a RoleBinding).
    User(&'static str),
    /// A bearer token, and nothing else (no client certificate).
    Token(String),
}

/// The output of one kubectl run: whether it succeeded, and what it printed.
struct Run {
    ok: bool,
    out: String,
}

fn kubectl(who: &As, args: &[&str], stdin: Option<&Value>) -> Run {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--request-timeout=30s");
    match who {
        As::Admin => {
            cmd.args(["--kubeconfig", &kubeconfig()]);
        }
        As::User(name) => {
            cmd.args(["--kubeconfig", &kubeconfig(), "--as", name]);
        }
        As::Token(token) => {
            let (server, ca) = server_and_ca();
            cmd.args(["--kubeconfig", "/dev/null", "--server", &server]);
            cmd.args(["--certificate-authority", &ca, "--token", token]);
        }
    }
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl on PATH");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(v) = stdin {
        input
            .write_all(v.to_string().as_bytes())
            .expect("write stdin");
    }
    drop(input);
    let out = child.wait_with_output().expect("kubectl ran");
    Run {
        ok: out.status.success(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn admin(args: &[&str]) -> String {
    let run = kubectl(&As::Admin, args, None);
    assert!(run.ok, "kubectl {args:?}: {}", run.out);
    run.out
}

/// The API server's address, and its CA in a file, from the admin kubeconfig.
fn server_and_ca() -> (String, String) {
    let view = |path: &str| {
        admin(&[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            &format!("jsonpath={{{path}}}"),
        ])
    };
    let server = view(".clusters[0].cluster.server");
    let ca = std::env::temp_dir().join(format!("admission-policies-ca-{}.crt", std::process::id()));
    if !ca.exists() {
        let file = view(".clusters[0].cluster.certificate-authority");
        let pem = if file.is_empty() {
            let data = view(".clusters[0].cluster.certificate-authority-data");
            let decoded = Command::new("base64")
                .args(["-d"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().expect("stdin").write_all(data.as_bytes())?;
                    c.wait_with_output()
                })
                .expect("base64 -d");
            decoded.stdout
        } else {
            std::fs::read(file).expect("read the CA file")
        };
        std::fs::write(&ca, pem).expect("write the CA");
    }
    (server, ca.display().to_string())
}

/// The test's namespace and policy binding, deleted when dropped (also on panic).
struct Scope {
    namespace: String,
    binding: String,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let _ = kubectl(
            &As::Admin,
            &["delete", "namespace", &self.namespace, "--wait=false"],
            None,
        );
        let _ = kubectl(
            &As::Admin,
            &[
                "delete",
                "validatingadmissionpolicybinding",
                &self.binding,
                "--ignore-not-found",
            ],
            None,
        );
    }
}

/// The documents of a YAML file of deploy/, as JSON.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(path)).expect("read manifest");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(d).unwrap()))
        .collect::<Result<_, _>>()
        .expect("manifest is YAML")
}

/// Installs `file`'s policy, and its binding restricted to `namespace`.
fn install_policy(file: &str, namespace: &str) -> Scope {
    let docs = documents(file);
    let policy = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .expect("a policy");
    let shipped = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
        .expect("a binding");
    let run = kubectl(&As::Admin, &["apply", "-f", "-"], Some(policy));
    assert!(run.ok, "the API server refused the policy: {}", run.out);
    let binding = format!(
        "{}-{namespace}",
        shipped["metadata"]["name"].as_str().unwrap()
    );
    let mut spec = shipped["spec"].clone();
    spec["matchResources"] = json!({"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": namespace}}});
    let object = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": binding},
        "spec": spec,
    });
    let scope = Scope {
        namespace: namespace.to_string(),
        binding,
    };
    let run = kubectl(&As::Admin, &["apply", "-f", "-"], Some(&object));
    assert!(run.ok, "binding: {}", run.out);
    scope
}

fn lease(
    namespace: &str,
    name: &str,
    holder: &str,
    owner: Option<(&str, &str)>,
    secs: i64,
) -> Value {
    let mut lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"scgtoken.io/scgtoken": "messaging"},
        },
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": secs},
    });
    if let Some((pod, uid)) = owner {
        lease["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}]);
    }
    lease
}

/// A dry-run create of `object` as `who`: `Ok` when admitted, else the refusal.
fn try_create(who: &As, object: &Value) -> Result<(), String> {
    let run = kubectl(
        who,
        &["create", "--dry-run=server", "-f", "-"],
        Some(object),
    );
    if run.ok { Ok(()) } else { Err(run.out) }
}

/// Waits until the server enforces the new binding: a policy reaches the admission
/// plugin through an informer, a moment after it is created.
fn until_enforced(who: &As, forged: &Value) {
    let deadline = Instant::now() + PATIENCE;
    while try_create(who, forged).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the report policy is not enforced after {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn pod(namespace: &str, name: &str) -> String {
    let object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "serviceAccountName": "agent",
            "containers": [{"name": "agent", "image": "scg-token-operator:never-pulled"}],
        },
    });
    let run = kubectl(
        &As::Admin,
        &["create", "-f", "-", "-o", "jsonpath={.metadata.uid}"],
        Some(&object),
    );
    assert!(run.ok, "pod: {}", run.out);
    run.out
}

#[test]
#[cfg_attr(
    not(real_cluster),
    ignore = "needs a real API server: testenv/run -- cargo test --test admission_policies"
)]
fn only_a_token_agent_writes_its_own_pods_report() {
    let ns = format!("reports-{}", std::process::id());
    admin(&["create", "namespace", &ns]);
    let _scope = install_policy("deploy/components/consumer-reports/report-policy.yaml", &ns);
    // The agent's ServiceAccount and Role (as deploy/components/token-agent grants), and
    // a tenant who may write Leases too (say, for an application's leader election).
    admin(&["-n", &ns, "create", "serviceaccount", "agent"]);
    admin(&[
        "-n",
        &ns,
        "create",
        "role",
        "agent",
        "--verb=create,get,update",
        "--resource=leases.coordination.k8s.io",
    ]);
    admin(&[
        "-n",
        &ns,
        "create",
        "rolebinding",
        "agent",
        "--role=agent",
        &format!("--serviceaccount={ns}:agent"),
    ]);
    admin(&[
        "-n",
        &ns,
        "create",
        "rolebinding",
        "tenant",
        "--role=agent",
        "--user=tenant",
    ]);
    let uid = pod(&ns, "consumer-1");
    let other_uid = pod(&ns, "consumer-2");
    let bound = As::Token(
        admin(&[
            "-n",
            &ns,
            "create",
            "token",
            "agent",
            "--bound-object-kind=Pod",
            "--bound-object-name=consumer-1",
            "--bound-object-uid",
            &uid,
        ])
        .trim()
        .to_string(),
    );
    let unbound = As::Token(
        admin(&["-n", &ns, "create", "token", "agent"])
            .trim()
            .to_string(),
    );
    let tenant = As::User("tenant");

    // The finding: a tenant forges a report that counts as an up-to-date consumer.
    let forged = lease(
        &ns,
        "forged",
        "consumer-1",
        Some(("consumer-1", &uid)),
        2_147_483_647,
    );
    until_enforced(&tenant, &forged);
    let refusal = try_create(
        &tenant,
        &lease(&ns, "forged", "consumer-1", Some(("consumer-1", &uid)), 30),
    )
    .expect_err("a tenant's report");
    assert!(
        refusal.contains("written only by a token agent"),
        "{refusal}"
    );

    // The agent, with its pod-bound token, writes its own pod's report.
    let own = lease(
        &ns,
        "consumer-1-report",
        "consumer-1",
        Some(("consumer-1", &uid)),
        30,
    );
    try_create(&bound, &own).expect("the agent's own report is admitted");

    // ...and nothing else.
    let cases = [
        (
            "another pod as holder",
            lease(&ns, "r", "consumer-2", Some(("consumer-1", &uid)), 30),
            "holderIdentity",
        ),
        (
            "another pod as owner",
            lease(&ns, "r", "consumer-1", Some(("consumer-2", &other_uid)), 30),
            "own pod as its owner",
        ),
        (
            "no owner",
            lease(&ns, "r", "consumer-1", None, 30),
            "own pod as its owner",
        ),
        (
            "a text as holder",
            lease(
                &ns,
                "r",
                "ACTION REQUIRED: paste consumerSecret at https://evil.example/",
                Some(("consumer-1", &uid)),
                30,
            ),
            "holderIdentity",
        ),
        (
            "a heartbeat of 68 years",
            lease(
                &ns,
                "r",
                "consumer-1",
                Some(("consumer-1", &uid)),
                2_147_483_647,
            ),
            "leaseDurationSeconds",
        ),
    ];
    for (what, object, want) in cases {
        let refusal = try_create(&bound, &object).expect_err(what);
        assert!(refusal.contains(want), "{what}: {refusal}");
    }
    let refusal = try_create(&unbound, &own).expect_err("a token bound to no pod");
    assert!(
        refusal.contains("written only by a token agent"),
        "{refusal}"
    );

    // Leases that are not reports are none of the policy's business.
    let mut election = lease(&ns, "leader", "anyone", None, 2_147_483_647);
    election["metadata"]["labels"] = json!({"app": "payments"});
    try_create(&tenant, &election).expect("a Lease without the report label");
}

/// The operator's ServiceAccount as deploy/ names it, created if this server lacks it.
/// Left in place: other tests of the lane may use the same namespace.
fn operator_account() {
    for args in [
        &["create", "namespace", "scg-token-operator"][..],
        &[
            "-n",
            "scg-token-operator",
            "create",
            "serviceaccount",
            "scg-token-operator",
        ][..],
    ] {
        let run = kubectl(&As::Admin, args, None);
        assert!(
            run.ok || run.out.contains("AlreadyExists"),
            "{args:?}: {}",
            run.out
        );
    }
}

/// A dry-run merge patch of `kind/name` as `who`: `Ok` when admitted, else the refusal.
fn try_patch(who: &As, namespace: &str, target: &str, patch: Value) -> Result<(), String> {
    let patch = patch.to_string();
    let args = [
        "-n",
        namespace,
        "patch",
        target,
        "--dry-run=server",
        "--type=merge",
        "-p",
        &patch,
    ];
    let run = kubectl(who, &args, None);
    if run.ok { Ok(()) } else { Err(run.out) }
}

#[test]
#[cfg_attr(
    not(real_cluster),
    ignore = "needs a real API server: testenv/run -- cargo test --test admission_policies"
)]
fn the_operators_account_changes_only_scgtoken_annotations_of_workloads_and_pods() {
    let ns = format!("workloads-{}", std::process::id());
    admin(&["create", "namespace", &ns]);
    let _restarts = install_policy("deploy/components/rollout-restart/restart-policy.yaml", &ns);
    let _nudges = install_policy("deploy/components/consumer-nudge/nudge-policy.yaml", &ns);
    operator_account();
    // The grants of the two components, here in the test's namespace.
    admin(&[
        "-n",
        &ns,
        "create",
        "role",
        "operator",
        "--verb=get,patch",
        "--resource=pods,deployments.apps,statefulsets.apps,daemonsets.apps",
    ]);
    admin(&[
        "-n",
        &ns,
        "create",
        "rolebinding",
        "operator",
        "--role=operator",
        "--serviceaccount=scg-token-operator:scg-token-operator",
    ]);
    admin(&[
        "-n",
        &ns,
        "create",
        "deployment",
        "payments",
        "--image=payments:1",
    ]);
    admin(&["-n", &ns, "create", "serviceaccount", "agent"]);
    pod(&ns, "consumer-1");
    let operator = As::Token(
        admin(&[
            "-n",
            "scg-token-operator",
            "create",
            "token",
            "scg-token-operator",
        ])
        .trim()
        .to_string(),
    );
    let template = |annotations: Value| json!({"spec": {"template": {"metadata": {"annotations": annotations}}}});
    let image = json!({"spec": {"template": {"spec": {"containers": [{"name": "payments", "image": "evil:1"}]}}}});
    let restart = template(
        json!({"scgtoken.io/restarted-for": "3f2a", "scgtoken.io/restarted-at": "2026-12-07T00:00:00Z"}),
    );

    // The finding: the operator's account changed a workload's image.
    let deadline = Instant::now() + PATIENCE;
    while try_patch(&operator, &ns, "deployment/payments", image.clone()).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the restart policy is not enforced after {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let refusal = try_patch(&operator, &ns, "deployment/payments", image.clone()).unwrap_err();
    assert!(
        refusal.contains("only scgtoken.io/ annotations of a pod template"),
        "{refusal}"
    );
    // What a rollout restart is: admitted.
    try_patch(&operator, &ns, "deployment/payments", restart).expect("a rollout restart");
    let refused = [
        ("replicas", json!({"spec": {"replicas": 0}})),
        (
            "another template annotation",
            template(json!({"kubectl.kubernetes.io/restartedAt": "now"})),
        ),
        (
            "a template label",
            json!({"spec": {"template": {"metadata": {"labels": {"app": "evil"}}}}}),
        ),
        (
            "the workload's labels",
            json!({"metadata": {"labels": {"team": "evil"}}}),
        ),
    ];
    for (what, patch) in refused {
        try_patch(&operator, &ns, "deployment/payments", patch).expect_err(what);
    }

    // Pods: the nudge annotation only.
    try_patch(
        &operator,
        &ns,
        "pod/consumer-1",
        json!({"metadata": {"annotations": {"scgtoken.io/nudged-for": "3f2a"}}}),
    )
    .expect("a nudge");
    for (what, patch) in [
        ("a label", json!({"metadata": {"labels": {"app": "evil"}}})),
        (
            "another annotation",
            json!({"metadata": {"annotations": {"prometheus.io/scrape": "false"}}}),
        ),
        (
            "the image",
            json!({"spec": {"containers": [{"name": "agent", "image": "evil:1"}]}}),
        ),
    ] {
        let refusal = try_patch(&operator, &ns, "pod/consumer-1", patch).expect_err(what);
        assert!(
            refusal.contains("only scgtoken.io/ annotations of a pod")
                || refusal.contains("Forbidden"),
            "{what}: {refusal}"
        );
    }

    // Anybody else is none of these policies' business.
    try_patch(&As::Admin, &ns, "deployment/payments", image).expect("the admin changes the image");
}
