//! Checks the kustomize manifests under deploy/ (base and overlays) and the examples.
//!
//! Renders each setup with `kubectl kustomize` and asserts on the objects. It uses none of
//! the operator's code: the manifests must stand on their own. Without kubectl the
//! rendering tests are ignored (under `CI` they fail instead).

mod common {
    pub mod manifests;
}

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::manifests::{
    OPERATOR_NS, Permission, SERVICE_ACCOUNT, assert_fields_in_schema, env_value, example, get,
    granted, grants, kustomize, name_of, of_kind, one, operator_container, operator_roles,
    parse_docs, permissions, repo, s, seq, strs,
};
use serde_yaml::Value;

/// Every permission the operator needs, as (apiGroup, resource, verbs). The manifests must
/// grant exactly these, no more and no less.
const REQUIRED_PERMISSIONS: &[(&str, &str, &[&str])] = &[
    ("scgtoken.io", "scgtokens", &["get", "list", "watch"]),
    ("scgtoken.io", "scgtokens/status", &["patch"]),
    ("", "secrets", &["get", "list", "watch", "create", "update"]),
    ("events.k8s.io", "events", &["create"]),
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
];

const ADMIN_PORT: u64 = 8080;

/// Directories under deploy/ that `kubectl apply -k` may be given ("" is deploy/ itself).
const SETUPS: &[&str] = &["", "base", "overlays/namespaced", "overlays/prometheus"];

fn labels(v: &Value, path: &str) -> BTreeMap<String, String> {
    get(v, path)
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_owned(),
                        v.as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn required() -> BTreeSet<Permission> {
    REQUIRED_PERMISSIONS
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(|v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

/// The union of everything granted equals the required list; leases only in the operator's
/// namespace.
fn assert_exact_rbac(objs: &[Value], setup: &str) {
    for grant in grants(objs) {
        if permissions(grant.role)
            .iter()
            .any(|(g, r, _)| g == "coordination.k8s.io" && r == "leases")
        {
            assert_eq!(
                grant.namespace.as_deref(),
                Some(OPERATOR_NS),
                "{setup}: leases must be granted by a Role in the operator's namespace"
            );
            assert_eq!(get(grant.role, "kind"), "Role", "{setup}");
        }
    }
    let union = granted(objs);
    let required = required();
    let extra: Vec<_> = union.difference(&required).collect();
    let missing: Vec<_> = required.difference(&union).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{setup}: RBAC differs from REQUIRED_PERMISSIONS\n  extra: {extra:?}\n  missing: {missing:?}"
    );
}

#[test]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
fn every_setup_renders_and_grants_exactly_the_required_rbac() {
    for setup in SETUPS {
        let objs = kustomize(setup);
        let kinds: BTreeSet<&str> = objs
            .iter()
            .filter_map(|o| get(o, "kind").as_str())
            .collect();
        for kind in [
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
        ] {
            assert!(kinds.contains(kind), "deploy/{setup} has no {kind}");
        }
        assert!(
            !kinds.contains("ConfigMap"),
            "deploy/{setup}: kustomize inputs must not reach the cluster"
        );
        assert_exact_rbac(&objs, setup);

        // Everything namespaced outside RBAC for the watched namespace is in the operator's.
        for o in &objs {
            let ns = get(o, "metadata.namespace").as_str();
            match get(o, "kind").as_str().unwrap() {
                "Namespace" | "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding" => {
                    assert_eq!(ns, None, "{} is cluster-scoped", name_of(o))
                }
                "Role" | "RoleBinding" => assert!(ns.is_some(), "{}", name_of(o)),
                _ => assert_eq!(ns, Some(OPERATOR_NS), "{}", name_of(o)),
            }
        }
        assert_eq!(s(one(&objs, "Namespace"), "metadata.name"), OPERATOR_NS);
        let crd = one(&objs, "CustomResourceDefinition");
        assert_eq!(s(crd, "metadata.name"), "scgtokens.scgtoken.io");
        assert_eq!(s(crd, "spec.group"), "scgtoken.io");
        assert_eq!(s(crd, "spec.names.kind"), "ScgToken");
        assert_eq!(s(crd, "spec.names.plural"), "scgtokens");
        assert_eq!(strs(get(crd, "spec.names.shortNames")), ["scgt"]);
        assert!(
            seq(get(crd, "spec.versions"))
                .iter()
                .any(|v| get(v, "name") == "v1alpha1")
        );
    }
}

#[test]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
fn cluster_wide_setups_bind_the_cluster_role() {
    for setup in ["", "base", "overlays/prometheus"] {
        let objs = kustomize(setup);
        let crb = one(&objs, "ClusterRoleBinding");
        assert_eq!(s(crb, "roleRef.kind"), "ClusterRole");
        let roles = operator_roles(&objs, "ClusterRole");
        assert_eq!(roles.len(), 1, "the operator's ClusterRole");
        assert!(permissions(roles[0]).contains(&(String::new(), "secrets".into(), "get".into())));
        let container = operator_container(one(&objs, "Deployment"));
        assert!(
            env_value(container, "SCG_NAMESPACE").is_none()
                && !strs(get(container, "args"))
                    .iter()
                    .any(|a| a.starts_with("--namespace")),
            "deploy/{setup}: a cluster-wide install must not restrict the namespace"
        );
    }
}

#[test]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
fn deployment_is_hardened_and_probed_on_the_admin_port() {
    for setup in SETUPS {
        let objs = kustomize(setup);
        let deploy = one(&objs, "Deployment");
        assert_eq!(get(deploy, "spec.replicas").as_u64(), Some(2), "{setup}");
        let pod = get(deploy, "spec.template.spec");
        assert_eq!(s(pod, "serviceAccountName"), SERVICE_ACCOUNT);
        assert_eq!(
            get(pod, "automountServiceAccountToken").as_bool(),
            Some(true)
        );
        assert_eq!(get(pod, "terminationGracePeriodSeconds").as_u64(), Some(30));
        assert_eq!(
            get(pod, "securityContext.runAsNonRoot").as_bool(),
            Some(true)
        );
        assert_eq!(get(pod, "securityContext.runAsUser").as_u64(), Some(65532));
        assert_eq!(
            s(pod, "securityContext.seccompProfile.type"),
            "RuntimeDefault"
        );
        let term = get(
            pod,
            "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution.0.podAffinityTerm",
        );
        assert_eq!(s(term, "topologyKey"), "kubernetes.io/hostname");
        let pod_labels = labels(deploy, "spec.template.metadata.labels");
        assert!(selects(
            &labels(term, "labelSelector.matchLabels"),
            &pod_labels
        ));
        assert!(selects(
            &labels(deploy, "spec.selector.matchLabels"),
            &pod_labels
        ));

        let c = operator_container(deploy);
        assert_eq!(s(c, "image"), "ghcr.io/scgtoken/scg-token-operator:0.1.0");
        let args = strs(get(c, "args"));
        assert_eq!(args.first(), Some(&"run"), "{setup}: {args:?}");
        assert!(
            args.contains(&"--leader-elect=true"),
            "{setup}: leader election must be on with 2 replicas: {args:?}"
        );
        for (var, field) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ] {
            let e = env_value(c, var).unwrap_or_else(|| panic!("{setup}: no {var}"));
            assert_eq!(s(e, "valueFrom.fieldRef.fieldPath"), field);
        }
        let sc = get(c, "securityContext");
        assert_eq!(get(sc, "allowPrivilegeEscalation").as_bool(), Some(false));
        assert_eq!(get(sc, "readOnlyRootFilesystem").as_bool(), Some(true));
        assert_eq!(strs(get(sc, "capabilities.drop")), ["ALL"]);
        assert!(strs(get(sc, "capabilities.add")).is_empty());
        assert_ne!(get(sc, "privileged").as_bool(), Some(true));
        assert_ne!(get(sc, "runAsNonRoot").as_bool(), Some(false));
        assert_eq!(s(c, "resources.requests.cpu"), "10m");
        assert_eq!(s(c, "resources.requests.memory"), "32Mi");
        assert_eq!(s(c, "resources.limits.memory"), "128Mi");

        let ports = seq(get(c, "ports"));
        let admin = ports
            .iter()
            .find(|p| get(p, "name") == "admin")
            .expect("a port named admin");
        assert_eq!(get(admin, "containerPort").as_u64(), Some(ADMIN_PORT));
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let p = get(c, probe);
            assert_eq!(s(p, "httpGet.path"), path, "{setup} {probe}");
            let port = get(p, "httpGet.port");
            assert!(
                port == "admin" || port.as_u64() == Some(ADMIN_PORT),
                "{setup} {probe} port {port:?}"
            );
        }

        // The metrics Service and the PDB find the operator pods.
        let svc = objs
            .iter()
            .find(|o| {
                get(o, "kind") == "Service"
                    && get(o, "metadata.name") == "scg-token-operator-metrics"
            })
            .expect("the metrics Service");
        assert!(selects(&labels(svc, "spec.selector"), &pod_labels));
        let sp = &seq(get(svc, "spec.ports"))[0];
        assert_eq!(get(sp, "port").as_u64(), Some(ADMIN_PORT));
        assert!(
            get(sp, "targetPort") == "admin" || get(sp, "targetPort").as_u64() == Some(ADMIN_PORT)
        );
        let pdb = one(&objs, "PodDisruptionBudget");
        assert_eq!(get(pdb, "spec.minAvailable").as_u64(), Some(1));
        assert!(selects(
            &labels(pdb, "spec.selector.matchLabels"),
            &pod_labels
        ));
    }
}

#[test]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
fn namespaced_overlay_grants_nothing_cluster_wide() {
    let objs = kustomize("overlays/namespaced");
    assert!(
        operator_roles(&objs, "ClusterRole").is_empty(),
        "no ClusterRole for the operator"
    );
    assert!(
        of_kind(&objs, "ClusterRoleBinding").is_empty(),
        "no ClusterRoleBinding"
    );

    let container = operator_container(one(&objs, "Deployment"));
    let watched = env_value(container, "SCG_NAMESPACE")
        .and_then(|e| get(e, "value").as_str())
        .expect("SCG_NAMESPACE is set");
    assert!(
        !watched.is_empty() && watched != "WATCH-NAMESPACE",
        "{watched:?}"
    );

    // Secrets and ScgTokens are granted by a Role in the watched namespace, bound there.
    let secrets_get = (String::new(), "secrets".to_owned(), "get".to_owned());
    let scgtokens_watch = (
        "scgtoken.io".to_owned(),
        "scgtokens".to_owned(),
        "watch".to_owned(),
    );
    for grant in grants(&objs) {
        let perms = permissions(grant.role);
        if perms.contains(&secrets_get) || perms.contains(&scgtokens_watch) {
            assert_eq!(get(grant.role, "kind"), "Role");
            assert_eq!(grant.namespace.as_deref(), Some(watched));
        }
    }
    assert!(
        grants(&objs)
            .iter()
            .any(|g| g.namespace.as_deref() == Some(watched)
                && permissions(g.role).contains(&secrets_get)),
        "no Role grants secrets in {watched}"
    );
}

#[test]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
fn prometheus_overlay_monitors_the_metrics_service() {
    let objs = kustomize("overlays/prometheus");
    let sm = one(&objs, "ServiceMonitor");
    assert_eq!(s(sm, "apiVersion"), "monitoring.coreos.com/v1");
    let svc = objs
        .iter()
        .find(|o| {
            get(o, "kind") == "Service" && get(o, "metadata.name") == "scg-token-operator-metrics"
        })
        .expect("the metrics Service");
    assert!(
        selects(
            &labels(sm, "spec.selector.matchLabels"),
            &labels(svc, "metadata.labels")
        ),
        "the ServiceMonitor does not select the metrics Service"
    );
    let svc_ns = s(svc, "metadata.namespace");
    let sm_ns_ok = strs(get(sm, "spec.namespaceSelector.matchNames")).contains(&svc_ns)
        || (get(sm, "spec.namespaceSelector").is_null() && s(sm, "metadata.namespace") == svc_ns);
    assert!(sm_ns_ok, "the ServiceMonitor does not look in {svc_ns}");
    let port_names: Vec<&str> = seq(get(svc, "spec.ports"))
        .iter()
        .filter_map(|p| get(p, "name").as_str())
        .collect();
    let endpoint = &seq(get(sm, "spec.endpoints"))[0];
    assert!(port_names.contains(&s(endpoint, "port")));
    assert_eq!(s(endpoint, "path"), "/metrics");
    // Other setups do not need the Prometheus Operator's CRDs.
    for setup in ["base", "overlays/namespaced"] {
        let objs = kustomize(setup);
        assert!(of_kind(&objs, "ServiceMonitor").is_empty(), "{setup}");
    }
}

#[test]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
fn deployment_args_are_accepted_by_the_operator() {
    // Only the command line is checked: with --help last, clap parses and validates the
    // arguments before it, prints the help and exits 0 without starting anything.
    for setup in SETUPS {
        let objs = kustomize(setup);
        let args = strs(get(operator_container(one(&objs, "Deployment")), "args"));
        let out = Command::new(env!("CARGO_BIN_EXE_scg-token-operator"))
            .args(&args)
            .arg("--help")
            .env_clear()
            .output()
            .expect("run the operator binary");
        assert!(
            out.status.success(),
            "deploy/{setup}: the operator rejects {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn examples_fit_together() {
    let secret = &example("credentials-secret.yaml")[0];
    assert_eq!(name_of(secret), "Secret/scg-credentials");
    assert_eq!(s(secret, "metadata.namespace"), "default");
    // Without it the operator refuses the Secret (CredentialsNotAllowed).
    let labels = common::manifests::get(secret, "metadata.labels");
    assert_eq!(
        labels
            .get(scg_token_operator::access::CREDENTIALS_LABEL)
            .and_then(Value::as_str),
        Some("true"),
        "the example credentials are not opted in"
    );
    for key in ["consumerKey", "consumerSecret", "accessToken"] {
        let value = s(secret, &format!("stringData.{key}"));
        assert!(
            value.contains("EXAMPLE"),
            "{key} must be an obvious placeholder"
        );
    }

    let token = &example("scgtoken.yaml")[0];
    assert_eq!(s(token, "apiVersion"), "scgtoken.io/v1alpha1");
    assert_eq!(name_of(token), "ScgToken/messaging");
    assert_eq!(s(token, "metadata.namespace"), "default");
    assert_eq!(
        s(token, "spec.credentialsSecretRef.name"),
        "scg-credentials"
    );
    let target = s(token, "spec.target.name");
    assert_eq!(target, "messaging-scg-token");

    // Every field the example sets exists in the committed CRD's schema.
    let crd_path = repo().join("crds/scgtoken.yaml");
    match std::fs::read_to_string(&crd_path) {
        Ok(text) => {
            let crd = &parse_docs(&text)[0];
            let version = seq(get(crd, "spec.versions"))
                .iter()
                .find(|v| get(v, "name") == "v1alpha1")
                .expect("CRD version v1alpha1");
            let schema = get(version, "schema.openAPIV3Schema.properties.spec");
            assert_fields_in_schema(get(token, "spec"), schema, "spec");
        }
        Err(_) => {
            eprintln!("*** WARNING: crds/scgtoken.yaml missing; example spec not checked ***")
        }
    }

    let deploy = &example("consumer-deployment.yaml")[0];
    assert_eq!(name_of(deploy), "Deployment/messaging-client");
    let pod = get(deploy, "spec.template.spec");
    let volume = seq(get(pod, "volumes"))
        .iter()
        .find(|v| get(v, "secret.secretName") == target)
        .expect("a volume of the target Secret");
    let mount = seq(get(pod, "containers.0.volumeMounts"))
        .iter()
        .find(|m| get(m, "name") == get(volume, "name"))
        .expect("the target Secret is mounted");
    assert_eq!(s(mount, "mountPath"), "/var/run/scg");
    // subPath mounts are never updated by kubelet: the token would go stale.
    assert!(get(mount, "subPath").is_null());
    let script = strs(get(pod, "containers.0.args")).join("\n");
    assert!(script.contains("/var/run/scg/accessToken"), "{script}");
    // The token must not come from an env var, which never changes after start.
    for e in seq(get(pod, "containers.0.env")) {
        assert!(
            get(e, "valueFrom.secretKeyRef").is_null(),
            "token in env: {e:?}"
        );
    }
}
