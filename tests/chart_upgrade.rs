//! The chart's CRD through `helm install`, `helm upgrade` and `helm uninstall`, against a
//! real kube-apiserver: a CRD in a chart's crds/ is installed once and never upgraded, so
//! the chart templates it (`crds.enabled`) with `helm.sh/resource-policy: keep`.
//!
//! Needs a real API server and helm, so it is ignored by a plain `cargo test`. It runs
//! when the tests are built with `SCG_E2E_KUBECONFIG` set (`cfg(real_cluster)`), as in
//! the CI lane:
//!
//! ```text
//! SCG_HELM=$(testenv/helm/build) testenv/run -- cargo test --test chart_upgrade
//! ```
//!
//! It starts where an existing user is: a CRD installed before (by kubectl, or by the
//! chart's former crds/), taken over as docs/upgrading.md says. It ends by putting the
//! committed CRD back, so the lane's other tests find what they expect; the release and
//! its namespace are removed also on panic.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_yaml::Value;

mod common {
    pub mod manifests;
}

use common::manifests::{helm, repo};

const IGNORE_REASON: &str = "needs a real API server and helm: \
     SCG_HELM=$(testenv/helm/build) testenv/run -- cargo test --test chart_upgrade";
const CRD: &str = "scgtokens.scgtoken.io";
const RELEASE: &str = "scg-upgrade";
const NAMESPACE: &str = "scg-upgrade";
/// Upper bound of any wait; generous for a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

fn kubeconfig() -> String {
    match std::env::var("SCG_E2E_KUBECONFIG") {
        Ok(path) if !path.is_empty() => path,
        _ => panic!("SCG_E2E_KUBECONFIG is not set: {IGNORE_REASON}"),
    }
}

/// Runs `program` with the lane's kubeconfig; whether it succeeded, and what it printed.
fn try_run(program: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn run(program: &Path, args: &[&str]) -> String {
    let (ok, out) = try_run(program, args);
    assert!(ok, "{} {args:?}: {out}", program.display());
    out
}

fn kubectl(args: &[&str]) -> String {
    run(Path::new("kubectl"), args)
}

/// Polls `check` every 200 ms until it returns `Some`, for at most [`PATIENCE`].
fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The committed CRD, applied as a user who manages it with kubectl does.
fn apply_committed_crd() {
    let crd = repo().join("crds/scgtoken.yaml");
    let crd = crd.to_str().unwrap();
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", crd]);
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        &format!("crd/{CRD}"),
    ]);
}

/// Removes the release and its namespace, and puts the committed CRD back (the test
/// added a field to it), also on panic.
struct Cleanup {
    helm: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = try_run(
            &self.helm,
            &["uninstall", RELEASE, "-n", NAMESPACE, "--wait"],
        );
        let _ = try_run(
            Path::new("kubectl"),
            &["delete", "namespace", NAMESPACE, "--wait=false"],
        );
        let _ = try_run(Path::new("kubectl"), &["delete", "crd", CRD, "--wait=true"]);
        apply_committed_crd();
    }
}

/// A copy of the chart whose CRD has one more optional field, `spec.upgradeProbe`: the
/// next release's chart, as far as the CRD goes.
fn next_chart(dir: &Path) -> PathBuf {
    let chart = dir.join("scg-token-operator");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(repo().join("charts/scg-token-operator"))
        .arg(&chart)
        .status()
        .expect("cp");
    assert!(copied.success());
    let file = chart.join("files/scgtoken-crd.yaml");
    let mut crd: Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let spec = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let field: Value =
        serde_yaml::from_str("{type: string, description: added by the next chart}").unwrap();
    spec.as_mapping_mut()
        .expect("spec.properties")
        .insert("upgradeProbe".into(), field);
    std::fs::write(&file, serde_yaml::to_string(&crd).unwrap()).unwrap();
    chart
}

/// `spec.upgradeProbe` of the test's ScgToken after trying to set it: empty while the
/// served CRD does not know the field (the API server prunes it).
fn set_probe(value: &str) -> String {
    let patch = format!(r#"{{"spec":{{"upgradeProbe":"{value}"}}}}"#);
    kubectl(&[
        "-n",
        NAMESPACE,
        "patch",
        "scgtoken",
        "probe",
        "--type=merge",
        "-p",
        &patch,
    ]);
    served_probe()
}

/// `spec.upgradeProbe` of the test's ScgToken, as the API server serves it.
fn served_probe() -> String {
    kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "scgtoken",
        "probe",
        "-o",
        "jsonpath={.spec.upgradeProbe}",
    ])
}

#[test]
#[cfg_attr(
    not(real_cluster),
    ignore = "needs a real API server and helm: SCG_HELM=$(testenv/helm/build) testenv/run -- cargo test --test chart_upgrade"
)]
fn helm_upgrade_serves_the_new_crd_and_uninstall_keeps_it_and_the_scgtokens() {
    let helm = helm();
    let _cleanup = Cleanup {
        helm: helm.to_path_buf(),
    };
    // A CRD from before: installed with kubectl, or by the chart's former crds/. Helm takes
    // over an object only when it carries the release's ownership metadata.
    apply_committed_crd();
    kubectl(&[
        "label",
        "crd",
        CRD,
        "app.kubernetes.io/managed-by=Helm",
        "--overwrite",
    ]);
    kubectl(&[
        "annotate",
        "crd",
        CRD,
        &format!("meta.helm.sh/release-name={RELEASE}"),
        &format!("meta.helm.sh/release-namespace={NAMESPACE}"),
        "--overwrite",
    ]);

    let chart = repo().join("charts/scg-token-operator");
    let chart = chart.to_str().unwrap();
    run(
        helm,
        &[
            "install",
            RELEASE,
            chart,
            "-n",
            NAMESPACE,
            "--create-namespace",
        ],
    );
    let annotations = kubectl(&["get", "crd", CRD, "-o", "jsonpath={.metadata.annotations}"]);
    assert!(
        annotations.contains(r#""helm.sh/resource-policy":"keep""#),
        "{annotations}"
    );
    let probe = r#"{"apiVersion":"scgtoken.io/v1alpha1","kind":"ScgToken","metadata":{"name":"probe"},"spec":{"credentialsSecretRef":{"name":"creds"}}}"#;
    let file = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("chart-upgrade-{}.json", std::process::id()));
    std::fs::write(&file, probe).unwrap();
    kubectl(&["-n", NAMESPACE, "create", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(
        set_probe("before"),
        "",
        "the field exists before the upgrade"
    );

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("chart-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let next = next_chart(&dir);
    run(
        helm,
        &["upgrade", RELEASE, next.to_str().unwrap(), "-n", NAMESPACE],
    );
    until("the upgraded CRD to serve spec.upgradeProbe", || {
        (set_probe("after") == "after").then_some(())
    });

    run(helm, &["uninstall", RELEASE, "-n", NAMESPACE, "--wait"]);
    let (kept, out) = try_run(Path::new("kubectl"), &["get", "crd", CRD]);
    assert!(kept, "helm uninstall removed the CRD: {out}");
    assert_eq!(
        served_probe(),
        "after",
        "the ScgToken did not survive helm uninstall"
    );
}
