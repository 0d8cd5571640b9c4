//! Checks the Helm chart in charts/scg-token-operator against the kustomize install.
//!
//! Both are rendered (`helm template`, `kubectl kustomize`) and compared in substance: the
//! permissions granted, the pod and container security contexts, probes, ports, args,
//! resources and the CRD must be the same, whatever the object names and labels.
//!
//! The rendering tests need helm and kubectl, so they are `#[ignore]`d in a plain
//! `cargo test` and show as such in its summary. Run them with
//!
//! ```sh
//! SCG_HELM=$(testenv/helm/build) cargo test --test helm -- --ignored
//! ```
//!
//! Without SCG_HELM they run testenv/helm/build themselves; a missing tool fails them.

mod common {
    pub mod manifests;
}

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::manifests::{
    env_value as env, get, helm, of_kind, one, operator_container, parse_docs, repo, s, seq, strs,
};
use serde_yaml::Value;

const RELEASE: &str = "scg-token-operator";
const NAMESPACE: &str = "scg-token-operator";
const CHART: &str = "charts/scg-token-operator";

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `helm template` of the chart as the kustomize install names things: release and
/// namespace scg-token-operator. `args` adds values (`-f FILE`, `--set k=v`).
fn helm_template(args: &[&str]) -> Result<Vec<Value>, String> {
    let out = run(Command::new(helm())
        .current_dir(repo())
        .args(["template", RELEASE, CHART, "--namespace", NAMESPACE])
        .arg("--include-crds")
        .args(args))?;
    Ok(parse_docs(&out))
}

fn chart(args: &[&str]) -> Vec<Value> {
    helm_template(args).unwrap_or_else(|e| panic!("helm template {args:?}: {e}"))
}

fn kustomize(dir: &str) -> Vec<Value> {
    let path = repo().join("deploy").join(dir);
    let out = run(Command::new("kubectl").arg("kustomize").arg(&path))
        .unwrap_or_else(|e| panic!("kubectl kustomize {}: {e}", path.display()));
    parse_docs(&out)
}

fn container(objs: &[Value]) -> &Value {
    operator_container(one(objs, "Deployment"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let (Some(sel), Some(labels)) = (selector.as_mapping(), labels.as_mapping()) else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Where a role applies ("cluster" or its namespace) -> its (apiGroup, resource,
/// resourceName, verb) grants, for every role bound to the operator's ServiceAccount.
/// Role names may differ between the two installs; what they grant, where, may not.
type Grants = BTreeMap<String, BTreeSet<(String, String, String, String)>>;

fn grants(objs: &[Value]) -> Grants {
    let mut out = Grants::new();
    for binding in objs.iter().filter(|o| {
        matches!(
            get(o, "kind").as_str(),
            Some("RoleBinding" | "ClusterRoleBinding")
        )
    }) {
        let subjects: Vec<(&str, &str, &str)> = seq(get(binding, "subjects"))
            .iter()
            .map(|x| (s(x, "kind"), s(x, "name"), s(x, "namespace")))
            .collect();
        assert_eq!(
            subjects,
            [("ServiceAccount", RELEASE, NAMESPACE)],
            "{binding:?}"
        );
        let ns = get(binding, "metadata.namespace").as_str();
        let (kind, name) = (s(binding, "roleRef.kind"), s(binding, "roleRef.name"));
        let role = objs
            .iter()
            .find(|o| {
                get(o, "kind") == kind
                    && get(o, "metadata.name") == name
                    && get(o, "metadata.namespace").as_str() == ns.filter(|_| kind == "Role")
            })
            .unwrap_or_else(|| panic!("binding to a missing {kind} {name}"));
        let scope = ns.map_or("cluster".to_owned(), |n| format!("namespace {n}"));
        let set = out.entry(scope).or_default();
        for rule in seq(get(role, "rules")) {
            let mut names = strs(get(rule, "resourceNames"));
            if names.is_empty() {
                names.push("*");
            }
            for g in strs(get(rule, "apiGroups")) {
                for r in strs(get(rule, "resources")) {
                    for n in &names {
                        for v in strs(get(rule, "verbs")) {
                            set.insert((g.into(), r.into(), n.to_string(), v.into()));
                        }
                    }
                }
            }
        }
    }
    out
}

/// The chart's extra env entries only restate the operator's built-in defaults, so the
/// two installs configure the operator the same way.
fn assert_env_equivalent(helm: &Value, kustomize: &Value) {
    for e in seq(get(kustomize, "env")) {
        assert_eq!(
            env(helm, s(e, "name")),
            Some(e),
            "env {} differs",
            s(e, "name")
        );
    }
    let defaults = [
        ("SCG_LEASE_NAME", "scg-token-operator"),
        ("SCG_ADMIN_ADDR", "0.0.0.0:8080"),
        ("SCG_CONCURRENT_RECONCILES", "64"),
        ("SCG_MAX_REFRESH_RATE", "1000"),
        ("SCG_REFRESH_BURST", "100"),
    ];
    for e in seq(get(helm, "env")) {
        let name = s(e, "name");
        if env(kustomize, name).is_some() {
            continue;
        }
        let default = defaults
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("the chart sets {name}, the kustomize install does not"));
        assert_eq!(get(e, "value").as_str(), Some(default.1), "{name}");
    }
}

/// What both installs must agree on, object by object.
fn assert_same_substance(helm: &[Value], kustomize: &[Value]) {
    assert_eq!(grants(helm), grants(kustomize), "RBAC differs");

    let (hd, kd) = (one(helm, "Deployment"), one(kustomize, "Deployment"));
    for path in [
        "spec.replicas",
        "spec.template.spec.securityContext",
        "spec.template.spec.automountServiceAccountToken",
        "spec.template.spec.terminationGracePeriodSeconds",
        "spec.template.spec.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution.0.podAffinityTerm.topologyKey",
    ] {
        assert_eq!(
            difference(get(hd, path), get(kd, path), path),
            None,
            "Deployment"
        );
        assert!(!get(kd, path).is_null(), "{path} missing on both sides");
    }
    let (hc, kc) = (container(helm), container(kustomize));
    for path in [
        "securityContext",
        "livenessProbe",
        "readinessProbe",
        "ports",
        "args",
        "resources",
        "image",
        "imagePullPolicy",
    ] {
        assert_eq!(
            difference(get(hc, path), get(kc, path), path),
            None,
            "container"
        );
        assert!(!get(kc, path).is_null(), "{path} missing on both sides");
    }
    assert_env_equivalent(hc, kc);

    // The pods are found by the chart's own selectors.
    let pod_labels = get(hd, "spec.template.metadata.labels");
    assert!(labels_match(
        get(hd, "spec.selector.matchLabels"),
        pod_labels
    ));
    let term = get(
        hd,
        "spec.template.spec.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution.0.podAffinityTerm",
    );
    assert!(labels_match(
        get(term, "labelSelector.matchLabels"),
        pod_labels
    ));
    let (hp, kp) = (
        one(helm, "PodDisruptionBudget"),
        one(kustomize, "PodDisruptionBudget"),
    );
    assert_eq!(get(hp, "spec.minAvailable"), get(kp, "spec.minAvailable"));
    assert!(labels_match(
        get(hp, "spec.selector.matchLabels"),
        pod_labels
    ));
    let (hs, ks) = (one(helm, "Service"), one(kustomize, "Service"));
    assert_eq!(s(hs, "metadata.name"), s(ks, "metadata.name"));
    assert_eq!(get(hs, "spec.ports"), get(ks, "spec.ports"));
    assert!(labels_match(get(hs, "spec.selector"), pod_labels));
    let (ha, ka) = (
        one(helm, "ServiceAccount"),
        one(kustomize, "ServiceAccount"),
    );
    assert_eq!(
        get(ha, "automountServiceAccountToken"),
        get(ka, "automountServiceAccountToken")
    );

    // The CRD is the same (the chart's copy is also checked byte for byte); the chart's
    // carries its labels and the keep annotation besides.
    let crds = (
        one(helm, "CustomResourceDefinition"),
        one(kustomize, "CustomResourceDefinition"),
    );
    assert_eq!(
        difference(get(crds.0, "spec"), get(crds.1, "spec"), "CRD.spec"),
        None
    );
    assert_eq!(s(crds.0, "metadata.name"), s(crds.1, "metadata.name"));
    // Everything the chart creates is in the release namespace or cluster-scoped.
    for o in helm {
        let ns = get(o, "metadata.namespace").as_str();
        match get(o, "kind").as_str() {
            Some(
                "CustomResourceDefinition"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "ValidatingAdmissionPolicy"
                | "ValidatingAdmissionPolicyBinding",
            ) => assert_eq!(ns, None, "{o:?}"),
            Some("Role" | "RoleBinding") => assert!(ns.is_some(), "{o:?}"),
            _ => assert_eq!(ns, Some(NAMESPACE), "{o:?}"),
        }
    }
}

/// The first place where two values differ, as a path; numbers compare by value, since
/// kustomize writes `90.0` as `90`.
fn difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        (Value::Mapping(x), Value::Mapping(y)) => x.keys().chain(y.keys()).find_map(|k| {
            let name = k.as_str().unwrap_or("?");
            match (x.get(k), y.get(k)) {
                (Some(va), Some(vb)) => difference(va, vb, &format!("{path}.{name}")),
                _ => Some(format!("{path}.{name}: only on one side")),
            }
        }),
        (Value::Sequence(x), Value::Sequence(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| difference(va, vb, &format!("{path}.{i}"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a:?} vs {b:?}")),
    }
}

fn kinds(objs: &[Value]) -> BTreeSet<&str> {
    objs.iter()
        .filter_map(|o| get(o, "kind").as_str())
        .collect()
}

#[test]
fn chart_crd_is_a_copy_of_the_generated_crd() {
    let generated = repo().join("crds/scgtoken.yaml");
    let copy = repo().join(CHART).join("files/scgtoken-crd.yaml");
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        read(&generated) == read(&copy),
        "{} differs from {}: cp crds/scgtoken.yaml {CHART}/files/scgtoken-crd.yaml",
        copy.display(),
        generated.display()
    );
    // Helm installs a chart's crds/ once and never upgrades them: the CRD is a template.
    assert!(
        !repo().join(CHART).join("crds").exists(),
        "{CHART}/crds/ would install a CRD that helm upgrade never upgrades"
    );
}

/// The templated CRD is the generated one, with the chart's labels and, unless
/// `crds.keep` is off, `helm.sh/resource-policy: keep`; `crds.enabled=false` renders none.
#[test]
#[ignore = "needs helm: run testenv/helm/build"]
fn the_templated_crd_is_the_generated_one_and_follows_its_switches() {
    let generated = parse_docs(include_str!("../crds/scgtoken.yaml"));
    let generated = one(&generated, "CustomResourceDefinition");
    let keep = |objs: &[Value]| {
        let crd = one(objs, "CustomResourceDefinition");
        assert_eq!(
            difference(get(crd, "spec"), get(generated, "spec"), "spec"),
            None
        );
        assert_eq!(s(crd, "metadata.name"), s(generated, "metadata.name"));
        let meta = get(crd, "metadata");
        assert_eq!(
            meta["labels"]["app.kubernetes.io/managed-by"].as_str(),
            Some("Helm")
        );
        meta["annotations"]["helm.sh/resource-policy"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(keep(&chart(&[])), Some("keep".to_string()));
    assert_eq!(keep(&chart(&["--set", "crds.keep=false"])), None);
    let without = chart(&["--set", "crds.enabled=false"]);
    assert!(!kinds(&without).contains("CustomResourceDefinition"));
    assert!(kinds(&without).contains("Deployment"));
}

#[test]
#[ignore = "needs helm: run testenv/helm/build"]
fn default_rendering_matches_the_kustomize_base() {
    let helm = chart(&[]);
    let base = kustomize("base");
    assert_same_substance(&helm, &base);
    // The same kinds, but for the Namespace: Helm installs into one (--create-namespace).
    let mut expected = kinds(&base);
    expected.remove("Namespace");
    assert_eq!(kinds(&helm), expected);
    assert!(
        grants(&helm).contains_key("cluster"),
        "cluster-wide by default"
    );
    assert_eq!(aggregated_roles(&helm), aggregated_roles(&base));
}

/// The ClusterRoles aggregated into the default user-facing roles: name, aggregation
/// labels and rules. Both installs have the same two (view, edit).
fn aggregated_roles(objs: &[Value]) -> Vec<(String, Vec<String>, Value)> {
    let mut roles: Vec<_> = of_kind(objs, "ClusterRole")
        .into_iter()
        .filter_map(|r| {
            let labels = get(r, "metadata.labels").as_mapping()?;
            let mut aggregate: Vec<String> = labels
                .iter()
                .filter_map(|(k, v)| {
                    let k = k.as_str()?;
                    (k.contains("/aggregate-to-") && v.as_str() == Some("true"))
                        .then(|| k.to_string())
                })
                .collect();
            aggregate.sort();
            (!aggregate.is_empty()).then(|| {
                let name = s(r, "metadata.name").to_string();
                (name, aggregate, get(r, "rules").clone())
            })
        })
        .collect();

    roles.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = roles.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        names,
        ["scg-token-operator-edit", "scg-token-operator-view"],
        "the aggregated roles"
    );
    roles
}

#[test]
#[ignore = "needs helm: run testenv/helm/build"]
fn namespaced_values_match_the_namespaced_overlay() {
    let helm = chart(&["-f", "charts/scg-token-operator/ci/namespaced-values.yaml"]);
    let overlay = kustomize("overlays/namespaced");
    assert_same_substance(&helm, &overlay);
    // No ClusterRole for the operator, none bound: only the user-facing aggregated ones.
    assert_eq!(aggregated_roles(&helm), aggregated_roles(&overlay));
    assert_eq!(of_kind(&helm, "ClusterRole").len(), 2);
    assert!(of_kind(&helm, "ClusterRoleBinding").is_empty());
    assert_eq!(
        get(env(container(&helm), "SCG_NAMESPACE").unwrap(), "value"),
        "default"
    );
    // With no namespace given, the release's own is watched, and RBAC follows it.
    let own = chart(&["--set", "namespaced.enabled=true"]);
    assert_eq!(
        get(env(container(&own), "SCG_NAMESPACE").unwrap(), "value"),
        NAMESPACE
    );
    assert_eq!(
        grants(&own).keys().collect::<Vec<_>>(),
        [&format!("namespace {NAMESPACE}")]
    );
}

#[test]
#[ignore = "needs helm: run testenv/helm/build"]
fn service_monitor_matches_the_prometheus_overlay() {
    assert!(
        of_kind(&chart(&[]), "ServiceMonitor").is_empty(),
        "off by default"
    );
    let helm = chart(&["--set", "metrics.serviceMonitor.enabled=true"]);
    let overlay = kustomize("overlays/prometheus");
    let (hm, km) = (
        one(&helm, "ServiceMonitor"),
        one(&overlay, "ServiceMonitor"),
    );
    assert_eq!(get(hm, "apiVersion"), get(km, "apiVersion"));
    assert_eq!(get(hm, "spec.endpoints"), get(km, "spec.endpoints"));
    assert_eq!(
        get(hm, "spec.namespaceSelector"),
        get(km, "spec.namespaceSelector")
    );
    assert!(labels_match(
        get(hm, "spec.selector.matchLabels"),
        get(one(&helm, "Service"), "metadata.labels")
    ));
}

/// `kubectl kustomize` of the base with the given components, from a kustomization
/// written under the test's scratch directory (kustomize takes relative paths only).
fn kustomize_with(components: &[&str]) -> Vec<Value> {
    // One directory per call: tests run in parallel and may ask for the same components.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "helm-components-{}-{call}-{}",
        std::process::id(),
        components.join("+")
    ));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let deploy = relative(&dir, &repo().join("deploy"));
    let listed = |names: Vec<String>| {
        names
            .iter()
            .map(|n| format!("  - {n}\n"))
            .collect::<String>()
    };
    let text = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n{}components:\n{}",
        listed(vec![format!("{deploy}/base")]),
        listed(
            components
                .iter()
                .map(|c| format!("{deploy}/components/{c}"))
                .collect()
        ),
    );
    std::fs::write(dir.join("kustomization.yaml"), text).expect("write kustomization.yaml");
    let out = run(Command::new("kubectl").arg("kustomize").arg(&dir))
        .unwrap_or_else(|e| panic!("kubectl kustomize {}: {e}", dir.display()));
    let _ = std::fs::remove_dir_all(&dir);
    parse_docs(&out)
}

/// `to` as a path relative to `from` (both absolute).
fn relative(from: &Path, to: &Path) -> String {
    let (from, to) = (
        from.canonicalize().expect("canonical scratch directory"),
        to.canonicalize().expect("canonical deploy directory"),
    );
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let ups = from.components().count() - common;
    let rest: PathBuf = to.components().skip(common).collect();
    format!("{}{}", "../".repeat(ups), rest.display())
}

#[test]
#[ignore = "needs helm: run testenv/helm/build"]
fn consumer_switches_match_the_kustomize_components() {
    let all = [
        ("consumers.reports", "consumer-reports"),
        ("consumers.podNudges", "consumer-nudge"),
        ("consumers.rolloutRestarts", "rollout-restart"),
    ];
    // Each switch alone grants what its component grants, and nothing else does.
    for (value, component) in all {
        let helm = chart(&["--set", &format!("{value}=true")]);
        assert_same_substance(&helm, &kustomize_with(&[component]));
    }
    let mut set = Vec::new();
    for (value, _) in all {
        set.extend(["--set".to_string(), format!("{value}=true")]);
    }
    let set: Vec<&str> = set.iter().map(String::as_str).collect();
    let helm = chart(&set);
    let components: Vec<&str> = all.iter().map(|(_, c)| *c).collect();
    assert_same_substance(&helm, &kustomize_with(&components));
    assert_eq!(
        get(
            env(container(&helm), "SCG_CONSUMER_REPORTS").unwrap(),
            "value"
        ),
        "true"
    );
    // Namespaced: the same grants, in the watched namespace only.
    let mut namespaced = set.clone();
    namespaced.extend(["--set", "namespaced.enabled=true"]);
    let grants = grants(&chart(&namespaced));
    assert_eq!(
        grants.keys().collect::<Vec<_>>(),
        [&format!("namespace {NAMESPACE}")]
    );
    for (resource, verb) in [
        ("leases", "watch"),
        ("pods", "get"),
        ("pods", "patch"),
        ("deployments", "patch"),
    ] {
        assert!(
            grants
                .values()
                .flatten()
                .any(|(_, r, _, v)| r == resource && v == verb),
            "namespaced mode lacks {verb} on {resource}"
        );
    }
}

/// The objects of `kind` in a rendering.
fn all_of<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

#[test]
#[ignore = "needs helm: run testenv/helm/build"]
fn admission_policies_match_the_components_and_follow_their_switches() {
    assert!(
        all_of(&chart(&[]), "ValidatingAdmissionPolicy").is_empty(),
        "none with every switch off"
    );
    for (value, component) in [
        ("consumers.reports", "consumer-reports"),
        ("consumers.podNudges", "consumer-nudge"),
        ("consumers.rolloutRestarts", "rollout-restart"),
    ] {
        policy_matches(value, component);
    }
}

/// With `value` on, the chart's policy and binding are the component's, and namespaced
/// they bind the watched namespace only.
fn policy_matches(value: &str, component: &str) {
    let (policy, binding) = (
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    );
    let on = format!("{value}=true");
    let helm = chart(&["--set", &on]);
    let kust = kustomize_with(&[component]);
    let (hp, kp) = (all_of(&helm, policy), all_of(&kust, policy));
    assert_eq!((hp.len(), kp.len()), (1, 1));
    assert_eq!(
        difference(&hp[0]["spec"], &kp[0]["spec"], "spec"),
        None,
        "the chart's policy for {value} differs from deploy/components/{component}"
    );
    let (hb, kb) = (all_of(&helm, binding), all_of(&kust, binding));
    assert_eq!((hb.len(), kb.len()), (1, 1));
    assert_eq!(hb[0]["spec"]["policyName"], hp[0]["metadata"]["name"]);
    assert_eq!(
        hb[0]["spec"]["validationActions"],
        kb[0]["spec"]["validationActions"]
    );
    assert!(hb[0]["spec"]["matchResources"].is_null(), "every namespace");
    let namespaced = chart(&["--set", &on, "--set", "namespaced.enabled=true"]);
    let nb = all_of(&namespaced, binding);
    assert_eq!(
        nb[0]["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        NAMESPACE,
        "namespaced: the watched namespace only"
    );
}

#[test]
#[ignore = "needs helm: run testenv/helm/build"]
fn lease_name_and_port_values_reach_rbac_env_and_service() {
    let objs = chart(&[
        "--set",
        "leaderElection.leaseName=my-lease",
        "--set",
        "metrics.port=9090",
    ]);
    let c = container(&objs);
    assert_eq!(get(env(c, "SCG_LEASE_NAME").unwrap(), "value"), "my-lease");
    let lease_names: BTreeSet<String> = grants(&objs)
        .values()
        .flatten()
        .filter(|(_, r, _, _)| r == "leases")
        .map(|(_, _, n, _)| n.clone())
        .collect();
    assert_eq!(lease_names, BTreeSet::from(["*".into(), "my-lease".into()]));
    assert_eq!(
        get(env(c, "SCG_ADMIN_ADDR").unwrap(), "value"),
        "0.0.0.0:9090"
    );
    assert_eq!(get(c, "ports.0.containerPort").as_u64(), Some(9090));
    assert_eq!(
        get(one(&objs, "Service"), "spec.ports.0.port").as_u64(),
        Some(9090)
    );
}

#[test]
#[ignore = "needs helm: run testenv/helm/build"]
fn unsafe_or_misspelled_values_are_refused() {
    // Two replicas without leader election would revoke each other's tokens.
    let err = helm_template(&["--set", "leaderElection.enabled=false"]).unwrap_err();
    assert!(err.contains("needs leaderElection.enabled"), "{err}");
    let single = chart(&[
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "replicas=1",
    ]);
    assert!(strs(get(container(&single), "args")).contains(&"--leader-elect=false"));
    assert!(of_kind(&single, "Role").is_empty(), "no Lease, no Role");
    // One replica with a minAvailable=1 budget could never be drained.
    assert!(of_kind(&single, "PodDisruptionBudget").is_empty());
    // values.schema.json: a typo is an error, not a silently ignored value.
    let err = helm_template(&["--set", "replica=3"]).unwrap_err();
    assert!(err.contains("replica"), "{err}");
    let err = helm_template(&["--set", "image.digest=latest"]).unwrap_err();
    assert!(err.contains("digest"), "{err}");
    // Who may be called and which Secrets may be read are not to be left open by a typo.
    for (value, name) in [
        ("credentialsPolicy=off", "credentialsPolicy"),
        ("allowedEndpoints=[]", "allowedEndpoints"),
        (
            r#"allowedEndpoints=["https://api.syniverse.com"]"#,
            "allowedEndpoints",
        ),
        (r#"allowedEndpoints=["*"]"#, "allowedEndpoints"),
    ] {
        let err = helm_template(&["--set-json", value]).unwrap_err();
        assert!(err.contains(name), "{value}: {err}");
    }
    let widened = chart(&[
        "--set",
        "credentialsPolicy=warn",
        "--set-json",
        r#"allowedEndpoints=["api.syniverse.com","*.scg.example:443"]"#,
    ]);
    let args = strs(get(container(&widened), "args"));
    assert!(
        args.contains(&"--allowed-endpoints=api.syniverse.com,*.scg.example:443")
            && args.contains(&"--credentials-policy=warn"),
        "{args:?}"
    );
    let pinned = chart(&["--set", &format!("image.digest=sha256:{}", "a".repeat(64))]);
    assert_eq!(
        s(container(&pinned), "image"),
        format!(
            "ghcr.io/scgtoken/scg-token-operator@sha256:{}",
            "a".repeat(64)
        )
    );
}

#[test]
#[ignore = "needs helm: run testenv/helm/build"]
fn rendered_args_and_env_are_accepted_by_the_operator() {
    // The operator is started with the chart's arguments and plain env values, and a
    // kubeconfig that does not exist: it must get past its flags and stop at the first
    // thing that needs a cluster. (`--help` would not do: clap reads env values only
    // after the command line.)
    let missing = std::env::temp_dir().join(format!("scg-helm-test-{}/none", std::process::id()));
    for values in [
        &[][..],
        &["-f", "charts/scg-token-operator/ci/namespaced-values.yaml"],
        &["--set", "metrics.port=9090", "--set", "logLevel=debug"],
        &[
            "--set",
            "consumers.reports=true",
            "--set-json",
            "maxRefreshRate=0.5",
            "--set",
            "refreshBurst=1",
            "--set",
            "concurrentReconciles=1",
        ],
        &[
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "replicas=1",
        ],
        &[
            "--set",
            "credentialsPolicy=warn",
            "--set-json",
            r#"allowedEndpoints=["api.syniverse.com","*.scg.example:443","[::1]:8443"]"#,
        ],
    ] {
        let objs = chart(values);
        let c = container(&objs);
        let plain_env = seq(get(c, "env"))
            .iter()
            .filter_map(|e| Some((s(e, "name"), get(e, "value").as_str()?)));
        let out = Command::new(env!("CARGO_BIN_EXE_scg-token-operator"))
            .args(strs(get(c, "args")))
            .env_clear()
            .envs(plain_env)
            .env("KUBECONFIG", &missing)
            .output()
            .expect("run the operator binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && stderr.contains("no Kubernetes configuration"),
            "{values:?}: the operator rejects the chart's command line or env: {stderr}"
        );
    }
}
