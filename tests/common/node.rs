//! The node lane's side of the tests: a real node (kubelet, containerd, runc) started by
//! `testenv/run --node`, what the run tells the command about it, and the few things a
//! test does there as a user would (kubectl apply, rollout status) or as an operator of
//! the node would (read a container's process, the API server's audit log).
#![allow(dead_code)] // Each test binary uses a different part.

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use testkit::scgsim::{ScgSimulator, SimConfig};

/// Why a node test is ignored in a plain `cargo test`.
pub const NEEDS_NODE: &str = "needs a node: testenv/run --node -- testenv/node-lane";

/// The operator's namespace in every install mode (deploy/, the chart as installed here).
pub const OPERATOR_NS: &str = "scg-token-operator";

/// What `testenv/run --node` hands the command.
pub struct Lane {
    pub client: kube::Client,
    pub node_ip: IpAddr,
    pub audit_log: PathBuf,
    pub kubeconfig: PathBuf,
    /// The repository root, where deploy/ and charts/ are.
    pub root: PathBuf,
    /// A scratch directory of this test binary, removed on drop.
    pub scratch: PathBuf,
    /// Lines of the audit log written before this test: another test's install (and its
    /// teardown, when RBAC goes before the pods) is not this test's to count.
    audit_from: usize,
}

fn required(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{name} is not set: {NEEDS_NODE}"))
}

impl Lane {
    pub async fn get() -> Lane {
        let node_ip = required("SCG_TESTENV_NODE_IP").parse().expect("node IP");
        let kubeconfig = PathBuf::from(required("KUBECONFIG"));
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("read kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kubeconfig");
        let client = kube::Client::try_from(config).expect("client");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let scratch = root
            .join("target/node-lane")
            .join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).expect("scratch directory");
        let audit_log = PathBuf::from(required("SCG_TESTENV_AUDIT_LOG"));
        let audit_from = std::fs::read_to_string(&audit_log).map_or(0, |t| t.lines().count());
        Lane {
            client,
            node_ip,
            audit_log,
            audit_from,
            kubeconfig,
            root,
            scratch,
        }
    }

    /// An HTTPS SCG simulator on the node's address, which pods reach; its certificate
    /// names that address.
    pub async fn simulator(&self, validity_cap: Duration) -> ScgSimulator {
        ScgSimulator::start(SimConfig {
            host: self.node_ip,
            tls: true,
            validity_cap,
            ..SimConfig::default()
        })
        .await
        .expect("start the simulator on the node's address")
    }

    /// The requests audited since this test began, of users whose name starts with
    /// `user_prefix`.
    pub fn audited(&self, user_prefix: &str) -> Vec<Audited> {
        audited(&self.audit_log, user_prefix, self.audit_from)
    }

    /// Writes `files` into a new directory of the scratch space and returns its path.
    pub fn dir(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.scratch.join(name);
        std::fs::create_dir_all(&dir).expect("create directory");
        for (file, body) in files {
            std::fs::write(dir.join(file), body).expect("write file");
        }
        dir
    }

    /// The path of `rel` (in the repository) as seen from `from`, for a kustomization's
    /// `resources` (kustomize accepts relative paths only).
    pub fn relative(&self, from: &Path, rel: &str) -> String {
        let depth = from
            .strip_prefix(&self.root)
            .expect("under the root")
            .components()
            .count();
        format!("{}{rel}", "../".repeat(depth))
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Runs kubectl (the lane's, first on PATH) and returns its stdout; panics with its
/// output on failure.
pub fn kubectl(args: &[&str]) -> String {
    kubectl_input(args, None)
}

/// As [`kubectl`], with `input` on stdin (`-f -`).
pub fn kubectl_input(args: &[&str], input: Option<&str>) -> String {
    let (ok, out, err) = kubectl_try(args, input);
    assert!(ok, "kubectl {} failed:\n{out}\n{err}", args.join(" "));
    out
}

/// Runs kubectl; returns (success, stdout, stderr).
pub fn kubectl_try(args: &[&str], input: Option<&str>) -> (bool, String, String) {
    run_try("kubectl", args, input)
}

/// Runs a command with a bounded life (5 minutes); returns (success, stdout, stderr).
pub fn run_try(program: &str, args: &[&str], input: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new("timeout")
        .arg("300")
        .arg(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits for a Deployment's rollout (all replicas updated and available).
pub fn rollout(namespace: &str, deployment: &str) {
    let (ok, out, err) = kubectl_try(
        &[
            "-n",
            namespace,
            "rollout",
            "status",
            &format!("deployment/{deployment}"),
            "--timeout=240s",
        ],
        None,
    );
    if !ok {
        let pods = kubectl_try(&["-n", namespace, "get", "pods", "-o", "wide"], None).1;
        let events = kubectl_try(
            &["-n", namespace, "get", "events", "--sort-by=.lastTimestamp"],
            None,
        )
        .1;
        panic!(
            "rollout of {namespace}/{deployment} failed:\n{out}\n{err}\npods:\n{pods}\nevents:\n{events}"
        );
    }
}

/// Polls `check` every 250 ms until it returns `Some`, for at most `within`.
pub async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One request of the API server's audit log, as far as these tests read it.
#[derive(Debug, Clone)]
pub struct Audited {
    pub user: String,
    pub verb: String,
    pub uri: String,
    pub code: u16,
}

/// The audited requests (stage ResponseComplete) of users whose name starts with
/// `user_prefix`, from line `from` of the log on.
pub fn audited(audit_log: &Path, user_prefix: &str, from: usize) -> Vec<Audited> {
    let text = std::fs::read_to_string(audit_log).expect("read the audit log");
    text.lines()
        .skip(from)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter_map(|e| {
            let user = e["user"]["username"].as_str()?;
            user.starts_with(user_prefix).then(|| Audited {
                user: user.to_string(),
                verb: e["verb"].as_str().unwrap_or_default().to_string(),
                uri: e["requestURI"].as_str().unwrap_or_default().to_string(),
                code: e["responseStatus"]["code"].as_u64().unwrap_or_default() as u16,
            })
        })
        .collect()
}

/// The host PID of a running container, from the node's containerd.
pub fn container_pid(container_id: &str) -> u32 {
    let id = container_id.trim_start_matches("containerd://");
    let (ok, out, err) = run_try("ctr", &["task", "ls"], None);
    assert!(ok, "ctr task ls: {err}");
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == id).then(|| f.next()?.parse().ok())?
        })
        .next()
        .unwrap_or_else(|| panic!("no running task {id} in:\n{out}"))
}

/// A field of /proc/PID/status, e.g. `Uid`.
pub fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The mount options of the container's root filesystem, from its mountinfo.
pub fn root_mount_options(pid: u32) -> String {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("read mountinfo");
    info.lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some("/"))
        .and_then(|l| l.split_whitespace().nth(5))
        .unwrap_or_else(|| panic!("no root mount in /proc/{pid}/mountinfo"))
        .to_string()
}

/// The helm binary: $SCG_HELM, else the one testenv/helm/build keeps in its cache.
pub fn helm() -> String {
    if let Some(h) = std::env::var("SCG_HELM").ok().filter(|h| !h.is_empty()) {
        return h;
    }
    let build = concat!(env!("CARGO_MANIFEST_DIR"), "/testenv/helm/build");
    let (ok, out, err) = run_try(build, &[], None);
    assert!(ok, "testenv/helm/build: {err}");
    out.trim().to_string()
}

/// The operator installed as `kubectl apply -k` installs it: `resources` (deploy/ or an
/// overlay) plus `components` (deploy/components/...), with only what points it at the
/// lane's simulator changed: its CA in a ConfigMap, mounted, and named by SCG_CA_BUNDLE,
/// and its host in `--allowed-endpoints` (the fourth argument of deploy/base).
/// The image is the one deploy/ names, imported into the node (IfNotPresent). Waits for
/// the rollout; deleted (and waited for) on drop.
pub struct OperatorInstall {
    dir: PathBuf,
}

impl OperatorInstall {
    pub fn apply(
        lane: &Lane,
        sim: &ScgSimulator,
        name: &str,
        resources: &str,
        components: &[&str],
    ) -> OperatorInstall {
        let dir = lane.dir(name, &[("ca.crt", sim.ca_pem().expect("TLS simulator"))]);
        let mut kustomization = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\n",
            lane.relative(&dir, resources)
        );
        if !components.is_empty() {
            kustomization.push_str("components:\n");
            for c in components {
                kustomization.push_str(&format!("  - {}\n", lane.relative(&dir, c)));
            }
        }
        kustomization.push_str(&format!(
            r#"configMapGenerator:
  - name: scg-lane-ca
    namespace: {OPERATOR_NS}
    files: [ca.crt]
    options: {{disableNameSuffixHash: true}}
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata: {{name: scg-token-operator, namespace: {OPERATOR_NS}}}
      spec:
        template:
          spec:
            volumes: [{{name: scg-lane-ca, configMap: {{name: scg-lane-ca}}}}]
            containers:
              - name: operator
                env: [{{name: SCG_CA_BUNDLE, value: /etc/scg-lane-ca/ca.crt}}]
                volumeMounts: [{{name: scg-lane-ca, mountPath: /etc/scg-lane-ca, readOnly: true}}]
  - target: {{kind: Deployment, name: scg-token-operator}}
    patch: |-
      - {{op: test, path: {ARG}, value: "--allowed-endpoints=api.syniverse.com"}}
      - {{op: replace, path: {ARG}, value: "--allowed-endpoints={host}"}}
"#,
            ARG = "/spec/template/spec/containers/0/args/3",
            host = sim.addr().ip(),
        ));
        std::fs::write(dir.join("kustomization.yaml"), kustomization).expect("kustomization");
        // The guard first: a failed apply or rollout is removed too.
        let install = OperatorInstall { dir };
        kubectl(&["apply", "-k", install.dir.to_str().expect("utf-8 path")]);
        rollout(OPERATOR_NS, "scg-token-operator");
        install
    }
}

impl Drop for OperatorInstall {
    fn drop(&mut self) {
        let dir = self.dir.to_str().unwrap_or_default();
        let args = [
            "delete",
            "-k",
            dir,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ];
        let _ = kubectl_try(&args, None);
    }
}
