//! Checks the token agent's example manifests and the kustomize components for consumers:
//! least-privilege RBAC, a native sidecar whose arguments the binary accepts, and
//! components that grant only what their feature needs.

mod common {
    pub mod manifests;
}

use std::{collections::BTreeSet, process::Command};

use common::manifests::{
    Scratch, assert_fields_in_schema, copy_dir, example, get, one, parse_docs as docs, repo, s,
    seq, strs,
};
use serde_yaml::Value;

/// (apiGroup, resource, verb, resourceNames) of every rule; no wildcards allowed.
fn rules(role: &Value) -> BTreeSet<(String, String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for rule in seq(get(role, "rules")) {
        let names: Vec<String> = strs(get(rule, "resourceNames"))
            .into_iter()
            .map(str::to_string)
            .collect();
        for g in strs(get(rule, "apiGroups")) {
            for r in strs(get(rule, "resources")) {
                for v in strs(get(rule, "verbs")) {
                    assert!(![g, r, v].iter().any(|x| x.contains('*')), "wildcard");
                    out.insert((g.into(), r.into(), v.into(), names.clone()));
                }
            }
        }
    }
    out
}

fn agent_rules(secret: &str) -> BTreeSet<(String, String, String, Vec<String>)> {
    let mut want = BTreeSet::new();
    for verb in ["get", "list", "watch"] {
        want.insert((
            "".into(),
            "secrets".into(),
            verb.into(),
            vec![secret.into()],
        ));
    }
    for verb in ["create", "get", "update"] {
        want.insert((
            "coordination.k8s.io".into(),
            "leases".into(),
            verb.into(),
            vec![],
        ));
    }
    want
}

fn env_field<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    seq(get(container, "env"))
        .iter()
        .find(|e| get(e, "name") == name)
        .and_then(|e| get(e, "valueFrom.fieldRef.fieldPath").as_str())
}

/// The binary parses `args` (with `--help` last it validates them and exits 0).
fn assert_binary_accepts(args: &[&str], env: &[(&str, &str)]) {
    let out = Command::new(env!("CARGO_BIN_EXE_scg-token-operator"))
        .args(args)
        .arg("--help")
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run the binary");
    assert!(
        out.status.success(),
        "the binary rejects {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks the sidecar and returns its arguments.
fn check_sidecar<'a>(pod: &'a Value, secret: &str) -> Vec<&'a str> {
    let sidecars: Vec<&Value> = seq(get(pod, "initContainers"))
        .iter()
        .filter(|c| get(c, "name") == "scg-token-agent")
        .collect();
    assert_eq!(sidecars.len(), 1, "one agent sidecar");
    let c = sidecars[0];
    assert_eq!(s(c, "restartPolicy"), "Always", "a native sidecar");
    let args = strs(get(c, "args"));
    assert_eq!(args.first(), Some(&"agent"));
    if !args.iter().any(|a| a.starts_with("--secret=")) {
        // Set from the component's ConfigMap instead.
        assert!(
            !seq(get(c, "envFrom")).is_empty(),
            "no --secret and no envFrom"
        );
    } else {
        assert!(
            args.contains(&format!("--secret={secret}").as_str()),
            "{args:?}"
        );
    }
    for (var, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
    ] {
        assert_eq!(env_field(c, var), Some(field), "{var}");
    }
    assert_eq!(s(c, "startupProbe.httpGet.path"), "/readyz");
    assert_eq!(s(c, "livenessProbe.httpGet.path"), "/healthz");
    let port = get(c, "startupProbe.httpGet.port");
    assert!(
        seq(get(c, "ports")).iter().any(|p| get(p, "name") == port),
        "the probe port is declared"
    );
    let sc = get(c, "securityContext");
    assert_eq!(get(sc, "allowPrivilegeEscalation").as_bool(), Some(false));
    assert_eq!(get(sc, "readOnlyRootFilesystem").as_bool(), Some(true));
    assert_eq!(strs(get(sc, "capabilities.drop")), ["ALL"]);
    check_agent_only_credentials(pod);
    args
}

/// Where a container would find the pod's ServiceAccount token.
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Only the agent holds Kubernetes credentials: the pod mounts no token, and a projected
/// one (a pod-bound token, the cluster CA, the namespace) is mounted in the agent's
/// container alone. The application can neither read the target Secret nor write a
/// report Lease.
fn check_agent_only_credentials(pod: &Value) {
    assert_eq!(
        get(pod, "automountServiceAccountToken").as_bool(),
        Some(false),
        "the pod mounts no ServiceAccount token into every container"
    );
    let volume = seq(get(pod, "volumes"))
        .iter()
        .find(|v| !get(v, "projected").is_null())
        .expect("a projected token volume");
    let sources = seq(get(volume, "projected.sources"));
    assert!(
        sources
            .iter()
            .any(|s| !get(s, "serviceAccountToken").is_null()),
        "a projected ServiceAccount token"
    );
    let name = get(volume, "name");
    let containers = seq(get(pod, "initContainers"))
        .iter()
        .chain(seq(get(pod, "containers")).iter());
    for c in containers {
        let mounts = seq(get(c, "volumeMounts"));
        let mounted = mounts.iter().any(|m| get(m, "name") == name);
        let is_agent = get(c, "name") == "scg-token-agent";
        assert_eq!(mounted, is_agent, "{}: token mounted", s(c, "name"));
        if is_agent {
            let m = mounts.iter().find(|m| get(m, "name") == name).unwrap();
            assert_eq!(s(m, "mountPath"), TOKEN_DIR);
        }
    }
}

fn target_secret() -> String {
    s(&example("scgtoken.yaml")[0], "spec.target.name").to_string()
}

fn check_agent_example(file: &str) -> (Vec<Value>, Vec<String>) {
    let objs = example(file);
    let secret = target_secret();
    let sa = s(one(&objs, "ServiceAccount"), "metadata.name").to_string();
    let role = one(&objs, "Role");
    assert_eq!(rules(role), agent_rules(&secret), "{file}: the Role");
    let binding = one(&objs, "RoleBinding");
    assert_eq!(s(binding, "roleRef.name"), s(role, "metadata.name"));
    assert_eq!(s(binding, "subjects.0.name"), sa);
    let deploy = one(&objs, "Deployment");
    let pod = get(deploy, "spec.template.spec");
    assert_eq!(s(pod, "serviceAccountName"), sa);
    let args: Vec<String> = check_sidecar(pod, &secret)
        .into_iter()
        .map(str::to_string)
        .collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_binary_accepts(&argv, &[]);
    // The application never gets the token from the Secret itself.
    for c in seq(get(pod, "containers")) {
        for e in seq(get(c, "env")) {
            assert!(
                get(e, "valueFrom.secretKeyRef").is_null(),
                "{file}: token in env"
            );
        }
    }
    assert!(
        !seq(get(pod, "volumes"))
            .iter()
            .any(|v| !get(v, "secret").is_null()),
        "{file}: the Secret is mounted"
    );
    (objs, args)
}

#[test]
fn the_proxy_example_runs_a_least_privileged_native_sidecar_on_loopback() {
    let (_, args) = check_agent_example("agent-proxy-deployment.yaml");
    assert!(
        args.iter().any(|a| a.starts_with("--upstream=https://")),
        "{args:?}"
    );
    assert!(
        args.contains(&"--listen=127.0.0.1:8181".to_string()),
        "{args:?}"
    );
}

#[test]
fn the_file_example_shares_a_memory_volume_with_group_readable_files() {
    let (objs, args) = check_agent_example("agent-file-deployment.yaml");
    let pod = get(one(&objs, "Deployment"), "spec.template.spec");
    let dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--dir="))
        .expect("--dir");
    let volume = seq(get(pod, "volumes"))
        .iter()
        .find(|v| get(v, "emptyDir.medium") == "Memory")
        .expect("a memory emptyDir");
    let name = get(volume, "name");
    let mount = |c: &Value| {
        seq(get(c, "volumeMounts"))
            .iter()
            .find(|m| get(m, "name") == name)
            .cloned()
    };
    let agent = &seq(get(pod, "initContainers"))[0];
    assert_eq!(s(&mount(agent).expect("agent mount"), "mountPath"), dir);
    let app = &seq(get(pod, "containers"))[0];
    let app_mount = mount(app).expect("app mount");
    assert_eq!(s(&app_mount, "mountPath"), dir);
    assert_eq!(get(&app_mount, "readOnly").as_bool(), Some(true));
    let group = args
        .iter()
        .find_map(|a| a.strip_prefix("--file-group="))
        .expect("--file-group");
    assert!(args.contains(&"--file-mode=0440".to_string()));
    assert_eq!(
        get(pod, "securityContext.fsGroup")
            .as_u64()
            .map(|g| g.to_string()),
        Some(group.to_string()),
        "the files' group is the pod's fsGroup"
    );
}

#[test]
fn the_consumers_example_fits_the_crd_and_the_other_examples() {
    let token = &example("scgtoken-consumers.yaml")[0];
    let crd = &docs(&std::fs::read_to_string(repo().join("crds/scgtoken.yaml")).unwrap())[0];
    let schema = get(
        &seq(get(crd, "spec.versions"))[0],
        "schema.openAPIV3Schema.properties.spec",
    );
    assert_fields_in_schema(get(token, "spec"), schema, "spec");
    assert_eq!(s(token, "spec.target.name"), target_secret());
    assert_eq!(get(token, "spec.consumers.agents").as_bool(), Some(true));
    // The nudged pods are those of the plain-volume example.
    let plain = &example("consumer-deployment.yaml")[0];
    let labels = get(plain, "spec.template.metadata.labels");
    for (k, v) in get(token, "spec.consumers.podSelector.matchLabels")
        .as_mapping()
        .expect("matchLabels")
    {
        assert_eq!(labels.get(k.as_str().unwrap()), Some(v));
    }
}

/// Whether kubectl can be used; without it the test is skipped visibly, and fails in CI.
fn require_kubectl(test: &str) -> bool {
    let ok = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "{test} needs kubectl");
        eprintln!("\n*** SKIPPED {test}: kubectl not found ***\n");
    }
    ok
}

/// Renders `kustomization` (with `files`) in a directory beside copies of deploy/ and
/// crds/.
fn render(name: &str, kustomization: &str, files: &[(&str, &str)]) -> Vec<Value> {
    let root =
        std::env::temp_dir().join(format!("scg-agent-manifests-{}-{name}", std::process::id()));
    let _scratch = Scratch(root.clone());
    copy_dir(&repo().join("deploy"), &root.join("deploy"));
    copy_dir(&repo().join("crds"), &root.join("crds"));
    let dir = root.join("overlay");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kustomization.yaml"), kustomization).unwrap();
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    docs(&String::from_utf8(out.stdout).unwrap())
}

const APP: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: billing
  labels: {scgtoken.io/token-agent: proxy}
spec:
  selector: {matchLabels: {app: billing}}
  template:
    metadata: {labels: {app: billing}}
    spec:
      containers: [{name: app, image: busybox}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: unlabelled
spec:
  selector: {matchLabels: {app: unlabelled}}
  template:
    metadata: {labels: {app: unlabelled}}
    spec:
      containers: [{name: app, image: busybox}]
";

#[test]
fn the_token_agent_component_adds_the_sidecar_to_labelled_deployments_only() {
    if !require_kubectl("the_token_agent_component_adds_the_sidecar_to_labelled_deployments_only") {
        return;
    }
    let kustomization = "\
resources: [app.yaml]
components: [../deploy/components/token-agent]
configMapGenerator:
  - name: scg-token-agent
    literals:
      - SCG_AGENT_SECRET=billing-scg-token
      - SCG_AGENT_SCGTOKEN=billing
      - SCG_AGENT_UPSTREAM=https://api.syniverse.com
";
    let objs = render("component", kustomization, &[("app.yaml", APP)]);
    assert_eq!(rules(one(&objs, "Role")), agent_rules("billing-scg-token"));
    let sa = s(one(&objs, "ServiceAccount"), "metadata.name");
    assert_eq!(s(one(&objs, "RoleBinding"), "subjects.0.name"), sa);
    let cm = one(&objs, "ConfigMap");
    let deploys: Vec<&Value> = objs
        .iter()
        .filter(|o| get(o, "kind") == "Deployment")
        .collect();
    for d in deploys {
        let pod = get(d, "spec.template.spec");
        if get(d, "metadata.name") == "unlabelled" {
            assert!(
                get(pod, "initContainers").is_null(),
                "an unlabelled Deployment was changed"
            );
            continue;
        }
        assert_eq!(s(pod, "serviceAccountName"), sa);
        let args = check_sidecar(pod, "billing-scg-token");
        let sidecar = &seq(get(pod, "initContainers"))[0];
        assert_eq!(
            s(sidecar, "envFrom.0.configMapRef.name"),
            s(cm, "metadata.name"),
            "the sidecar reads the generated ConfigMap"
        );
        let env: Vec<(String, String)> = get(cm, "data")
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_binary_accepts(&args, &env);
    }
}

/// The permissions a component adds to the operator, beyond the base.
fn added_operator_rules(component: &str) -> BTreeSet<(String, String, String, Vec<String>)> {
    let kustomization =
        format!("resources: [../deploy/base]\ncomponents: [../deploy/components/{component}]\n");
    let objs = render(component, &kustomization, &[]);
    let base = render(
        &format!("{component}-base"),
        "resources: [../deploy/base]\n",
        &[],
    );
    let role = objs
        .iter()
        .find(|o| {
            get(o, "kind") == "ClusterRole"
                && !base
                    .iter()
                    .any(|b| get(b, "metadata.name") == get(o, "metadata.name"))
        })
        .expect("the component's ClusterRole");
    let binding = objs
        .iter()
        .find(|o| {
            get(o, "kind") == "ClusterRoleBinding"
                && get(o, "roleRef.name") == get(role, "metadata.name")
        })
        .expect("its binding");
    assert_eq!(s(binding, "subjects.0.name"), "scg-token-operator");
    assert_eq!(s(binding, "subjects.0.namespace"), "scg-token-operator");
    rules(role)
}

#[test]
fn consumer_components_grant_the_operator_only_what_their_feature_needs() {
    if !require_kubectl("consumer_components_grant_the_operator_only_what_their_feature_needs") {
        return;
    }
    let set = |g: &str, resources: &[&str], verbs: &[&str]| {
        let mut out = BTreeSet::new();
        for r in resources {
            for v in verbs {
                out.insert((g.to_string(), r.to_string(), v.to_string(), vec![]));
            }
        }
        out
    };
    assert_eq!(
        added_operator_rules("consumer-nudge"),
        set("", &["pods"], &["list", "patch"])
    );
    assert_eq!(
        added_operator_rules("rollout-restart"),
        set(
            "apps",
            &["deployments", "statefulsets", "daemonsets"],
            &["get", "patch"]
        )
    );
    let mut reports = set("coordination.k8s.io", &["leases"], &["list", "watch"]);
    reports.extend(set("", &["pods"], &["get"]));
    assert_eq!(added_operator_rules("consumer-reports"), reports);
    // None of it is in the base.
    let base = render("base-only", "resources: [../deploy/base]\n", &[]);
    let all: BTreeSet<_> = base
        .iter()
        .filter(|o| matches!(get(o, "kind").as_str(), Some("ClusterRole" | "Role")))
        .flat_map(rules)
        .collect();
    assert!(
        !all.iter()
            .any(|(_, r, _, _)| r == "pods" || r == "deployments")
    );
}

/// The operator container's environment in a rendered install, as (name, value).
fn operator_env(objs: &[Value]) -> Vec<(String, String)> {
    let deploy = objs
        .iter()
        .find(|o| get(o, "kind") == "Deployment" && get(o, "metadata.name") == "scg-token-operator")
        .expect("the operator's Deployment");
    let container = seq(get(deploy, "spec.template.spec.containers"))
        .iter()
        .find(|c| get(c, "name") == "operator")
        .expect("the operator container");
    seq(get(container, "env"))
        .iter()
        .map(|e| {
            (
                s(e, "name").to_string(),
                get(e, "value").as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn the_consumer_reports_component_turns_the_lease_watch_on() {
    if !require_kubectl("the_consumer_reports_component_turns_the_lease_watch_on") {
        return;
    }
    let on = ("SCG_CONSUMER_REPORTS".to_string(), "true".to_string());
    let with = render(
        "reports-on",
        "resources: [../deploy/base]\ncomponents: [../deploy/components/consumer-reports]\n",
        &[],
    );
    let env = operator_env(&with);
    assert!(env.contains(&on), "{env:?}");
    assert!(
        env.iter().any(|(n, _)| n == "POD_NAME"),
        "the patch replaced the base's environment: {env:?}"
    );
    let base = render("reports-off", "resources: [../deploy/base]\n", &[]);
    assert!(!operator_env(&base).iter().any(|(n, _)| n == &on.0));
    // The variable is the one the binary reads.
    let out = Command::new(env!("CARGO_BIN_EXE_scg-token-operator"))
        .args(["run", "--help"])
        .output()
        .expect("run the binary");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--consumer-reports"), "{help}");
    assert!(help.contains("env: SCG_CONSUMER_REPORTS="), "{help}");
}
