//! The operator as pods on a real node, installed as users install it: `kubectl apply
//! -k deploy/` and `helm install`, with the image built by testenv/image/build and
//! imported into the node's containerd. Run by the node lane:
//!
//! ```sh
//! testenv/image/build --out target/images
//! SCG_IMAGE_DIR=target/images testenv/run --node -- testenv/node-lane
//! ```
//!
//! Each test installs, checks and uninstalls; they run one at a time (the lane passes
//! `--test-threads=1`), since an install is cluster-wide.

mod common {
    pub mod node;
}

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::node::{
    Lane, OPERATOR_NS, OperatorInstall, container_pid, kubectl, kubectl_input, kubectl_try,
    proc_status, rollout, root_mount_options, until,
};
use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod, policy::v1::PodDisruptionBudget};
use kube::{Api, api::ListParams, runtime::watcher};
use scg_token_operator::crd::ScgToken;
use testkit::scgsim::{Endpoint, ScgSimulator};

const TENANT_NS: &str = "node-e2e";
const CONSUMER_KEY: &str = "node-consumer-key";
const CONSUMER_SECRET: &str = "node-planted-consumer-secret-77d1";
const OPERATOR_SA: &str = "system:serviceaccount:scg-token-operator:";
const PATIENCE: Duration = Duration::from_secs(180);

/// An install of tests/common/node.rs's [`OperatorInstall`] that also removes the
/// tenant's namespace on drop.
struct KustomizeInstall {
    _operator: OperatorInstall,
}

impl KustomizeInstall {
    fn apply(lane: &Lane, sim: &ScgSimulator, name: &str, resources: &str) -> KustomizeInstall {
        KustomizeInstall {
            _operator: OperatorInstall::apply(lane, sim, name, resources, &[]),
        }
    }
}

impl Drop for KustomizeInstall {
    fn drop(&mut self) {
        let args = [
            "delete",
            "namespace",
            TENANT_NS,
            "--ignore-not-found",
            "--wait=true",
        ];
        let _ = kubectl_try(&args, None);
    }
}

/// The tenant's namespace, its credentials Secret (registered with the simulator) and
/// an ScgToken against the simulator, as YAML through kubectl.
fn create_scgtoken(sim: &ScgSimulator, namespace: &str, name: &str) {
    let seed = sim.add_app(CONSUMER_KEY, CONSUMER_SECRET);
    let endpoint = sim.refresh_url();
    let yaml = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {namespace}}}
---
apiVersion: v1
kind: Secret
metadata:
  name: {name}-credentials
  namespace: {namespace}
  labels: {{scgtoken.io/credentials: "true"}}
stringData:
  consumerKey: {CONSUMER_KEY}
  consumerSecret: {CONSUMER_SECRET}
  accessToken: {seed}
---
apiVersion: scgtoken.io/v1alpha1
kind: ScgToken
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  credentialsSecretRef: {{name: {name}-credentials}}
  endpoint: {endpoint}
  validity: 30s
"#
    );
    kubectl_input(&["apply", "-f", "-"], Some(&yaml));
}

/// Waits until the ScgToken is Ready and its target holds the simulator's current token
/// of the chain; returns that token.
async fn wait_stored(
    lane: &Lane,
    sim: &ScgSimulator,
    namespace: &str,
    name: &str,
    not: &str,
) -> String {
    let tokens: Api<ScgToken> = Api::namespaced(lane.client.clone(), namespace);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(lane.client.clone(), namespace);
    until(
        &format!("{namespace}/{name} Ready with a new token stored"),
        PATIENCE,
        || async {
            let t = tokens.get_opt(name).await.ok()??;
            let ready = t
                .status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let target = secrets.get_opt(name).await.ok()??;
            let stored = target
                .data?
                .get("accessToken")
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())?;
            let current = sim.current_token(CONSUMER_KEY)?;
            (ready && stored == current && stored != not).then_some(stored)
        },
    )
    .await
}

async fn operator_pods(lane: &Lane) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(lane.client.clone(), OPERATOR_NS);
    let lp = ListParams::default().labels("app.kubernetes.io/name=scg-token-operator");
    let mut list = pods.list(&lp).await.expect("list operator pods").items;
    list.retain(|p| p.metadata.deletion_timestamp.is_none());
    list
}

async fn lease(lane: &Lane) -> Option<Lease> {
    let leases: Api<Lease> = Api::namespaced(lane.client.clone(), OPERATOR_NS);
    leases.get_opt("scg-token-operator").await.ok()?
}

fn holder(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .clone()
        .filter(|h| !h.is_empty())
}

/// Every request the operator's ServiceAccount made was allowed by the RBAC as shipped.
fn assert_no_refusal(lane: &Lane, user_prefix: &str) {
    let seen = lane.audited(user_prefix);
    let refused: Vec<_> = seen.iter().filter(|a| a.code == 403).collect();
    println!(
        "audit: {} requests by {user_prefix}*, {} refused",
        seen.len(),
        refused.len()
    );
    assert!(
        !seen.is_empty(),
        "the audit log has no request of {user_prefix}*"
    );
    assert!(
        refused.is_empty(),
        "requests refused (403) to {user_prefix}*: {refused:#?}"
    );
}

/// The operator runs as 65532, with no capability, seccomp on and a read-only root:
/// read from the running container's process, not from the manifest.
fn assert_security_context(pod: &Pod) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref().expect("pod status");
    let id = status
        .container_statuses
        .as_ref()
        .expect("container statuses")[0]
        .container_id
        .clone()
        .expect("container id");
    let pid = container_pid(&id);
    let uid = proc_status(pid, "Uid");
    let gid = proc_status(pid, "Gid");
    assert!(
        uid.split_whitespace().all(|u| u == "65532"),
        "{name}: Uid {uid}"
    );
    assert!(
        gid.split_whitespace().all(|g| g == "65532"),
        "{name}: Gid {gid}"
    );
    assert_eq!(
        proc_status(pid, "CapEff"),
        "0000000000000000",
        "{name}: capabilities"
    );
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "{name}: no_new_privs");
    assert_eq!(proc_status(pid, "Seccomp"), "2", "{name}: seccomp filter");
    let options = root_mount_options(pid);
    assert!(
        options.split(',').any(|o| o == "ro"),
        "{name}: root mounted {options}"
    );
    let probe = format!("/proc/{pid}/root/written-by-the-node-test");
    let err = std::fs::write(&probe, b"x").expect_err("the container's root is writable");
    assert_eq!(
        err.raw_os_error(),
        Some(30),
        "{name}: writing to / failed with {err}, not EROFS"
    );
    println!("{name}: uid {uid}, gid {gid}, no capabilities, seccomp, root {options}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn kustomize_install_runs_as_pods_under_its_own_rbac_and_hands_over() {
    let lane = Lane::get().await;
    let sim = lane.simulator(Duration::from_secs(30)).await;
    let install = KustomizeInstall::apply(&lane, &sim, "kustomize", "deploy");

    let pods = operator_pods(&lane).await;
    assert_eq!(pods.len(), 2, "two replicas");
    let names: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let leader = until("a Lease holder among the pods", PATIENCE, || async {
        holder(&lease(&lane).await?).filter(|h| names.contains(h))
    })
    .await;
    println!("both replicas Ready; {leader} holds the Lease");
    for pod in &pods {
        assert_security_context(pod);
    }

    create_scgtoken(&sim, TENANT_NS, "messaging");
    let first = wait_stored(&lane, &sim, TENANT_NS, "messaging", "").await;
    println!("ScgToken Ready, the target Secret holds the chain's current token");

    handover(&lane, &sim, &leader, &first).await;
    pdb_is_honoured(&lane).await;
    assert_no_refusal(&lane, OPERATOR_SA);
    drop(install);
}

/// Deletes the leader pod: the Lease changes holder once, no call presents a revoked
/// token, at most one call per chain is ever in flight, and the next rotation is stored.
async fn handover(lane: &Lane, sim: &ScgSimulator, leader: &str, stored: &str) {
    let before = lease(lane).await.expect("lease");
    let transitions = before
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0);
    let holders = Arc::new(Mutex::new(Vec::<String>::new()));
    let leases: Api<Lease> = Api::namespaced(lane.client.clone(), OPERATOR_NS);
    let seen = holders.clone();
    let watch = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher::watch_object(leases, "scg-token-operator"));
        while let Some(Ok(Some(lease))) = stream.next().await {
            if let Some(h) = holder(&lease) {
                let mut seen = seen.lock().unwrap();
                if seen.last() != Some(&h) {
                    seen.push(h);
                }
            }
        }
    });
    let started = Instant::now();
    kubectl(&["-n", OPERATOR_NS, "delete", "pod", leader, "--wait=false"]);
    let new = until("a new Lease holder", PATIENCE, || async {
        holder(&lease(lane).await?).filter(|h| h != leader)
    })
    .await;
    let handover = started.elapsed();
    let next = wait_stored(lane, sim, TENANT_NS, "messaging", stored).await;
    let rotation = started.elapsed();
    watch.abort();
    let after = lease(lane).await.expect("lease");
    let transitions_after = after
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0);
    println!(
        "handover: leader pod deleted -> {new} holds the Lease in {:.2} s; next rotation stored at {:.2} s",
        handover.as_secs_f64(),
        rotation.as_secs_f64()
    );
    let holders = holders.lock().unwrap().clone();
    assert_eq!(
        holders.iter().filter(|h| *h != leader).count(),
        1,
        "holders seen: {holders:?}"
    );
    assert_eq!(transitions_after, transitions + 1, "one Lease transition");
    let revoked: Vec<_> = sim
        .revoked_uses()
        .into_iter()
        .filter(|u| u.endpoint == Endpoint::Refresh)
        .collect();
    assert!(
        revoked.is_empty(),
        "refresh calls presented revoked tokens: {}",
        revoked.len()
    );
    assert_eq!(
        sim.max_concurrent_refreshes(),
        1,
        "calls in flight for the one chain"
    );
    assert_ne!(next, stored);
}

/// Through the Eviction API: one operator pod may go; the other is refused while the
/// first is not back and Ready, and may go once it is.
async fn pdb_is_honoured(lane: &Lane) {
    rollout(OPERATOR_NS, "scg-token-operator");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(lane.client.clone(), OPERATOR_NS);
    two_healthy(&pdbs).await;
    let list = operator_pods(lane).await;
    let [first, second] = [&list[0], &list[1]].map(|p| p.metadata.name.clone().expect("name"));
    let (allowed, answer) = evict(&first);
    assert!(allowed, "the first eviction must be allowed: {answer}");
    let (allowed, answer) = evict(&second);
    assert!(
        !allowed && answer.contains("disruption budget"),
        "the second eviction must be refused while the first pod is not back: {answer}"
    );
    println!("PDB: second eviction refused: {}", answer.trim());
    rollout(OPERATOR_NS, "scg-token-operator");
    two_healthy(&pdbs).await;
    let (allowed, answer) = evict(&second);
    assert!(
        allowed,
        "the second eviction must be allowed once the first pod is back and Ready: {answer}"
    );
    rollout(OPERATOR_NS, "scg-token-operator");
}

/// Posts an Eviction for an operator pod, as `kubectl drain` does; returns whether it
/// was allowed, and the answer.
fn evict(pod: &str) -> (bool, String) {
    let eviction = format!(
        r#"{{"apiVersion":"policy/v1","kind":"Eviction","metadata":{{"name":"{pod}","namespace":"{OPERATOR_NS}"}}}}"#
    );
    let uri = format!("/api/v1/namespaces/{OPERATOR_NS}/pods/{pod}/eviction");
    let (ok, out, err) = kubectl_try(&["create", "--raw", &uri, "-f", "-"], Some(&eviction));
    (ok, format!("{out}{err}"))
}

/// The check above can fail: with one verb taken from the ClusterRole as shipped, the
/// audit log shows the operator's requests refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn a_verb_missing_from_the_role_shows_as_refusals_in_the_audit_log() {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let lane = Lane::get().await;
    let sim = lane.simulator(Duration::from_secs(30)).await;
    let _install = KustomizeInstall::apply(&lane, &sim, "kustomize-rbac", "deploy");
    let roles: Api<ClusterRole> = Api::all(lane.client.clone());
    let mut role = roles
        .get("scg-token-operator")
        .await
        .expect("the ClusterRole");
    let rules = role.rules.as_mut().expect("rules");
    let count = rules.len();
    // The rule's one verb is `patch`, and a rule cannot be left with none.
    rules.retain(|r| {
        !r.resources
            .iter()
            .flatten()
            .any(|res| res == "scgtokens/status")
    });
    assert_eq!(rules.len(), count - 1, "one rule for scgtokens/status");
    roles
        .replace("scg-token-operator", &Default::default(), &role)
        .await
        .expect("take patch away");
    let before = lane
        .audited(OPERATOR_SA)
        .iter()
        .filter(|a| a.code == 403)
        .count();
    create_scgtoken(&sim, TENANT_NS, "messaging");
    let refused = until("a refusal in the audit log", PATIENCE, || async {
        let refused: Vec<_> = lane
            .audited(OPERATOR_SA)
            .into_iter()
            .filter(|a| a.code == 403)
            .collect();
        (refused.len() > before).then_some(refused)
    })
    .await;
    println!(
        "without scgtokens/status patch: {} refusals, e.g. {} {}",
        refused.len(),
        refused[0].verb,
        refused[0].uri
    );
    assert!(
        refused
            .iter()
            .any(|a| a.uri.contains("/scgtokens/messaging/status"))
    );
}

/// A namespaced install (the chart with `namespaced.enabled`, or the kustomize overlay)
/// refreshes in its namespace, and its ServiceAccount is refused Secrets anywhere else.
async fn namespaced_install_stays_in_its_namespace(lane: &Lane, sim: &ScgSimulator, watched: &str) {
    create_scgtoken(sim, watched, "messaging");
    wait_stored(lane, sim, watched, "messaging", "").await;
    kubectl(&["create", "namespace", "node-other"]);
    let sa = "system:serviceaccount:scg-token-operator:scg-token-operator";
    let (ok, _, err) = kubectl_try(&["-n", "node-other", "get", "secrets", "--as", sa], None);
    assert!(
        !ok && err.contains("Forbidden"),
        "reading Secrets elsewhere must be refused: {err}"
    );
    println!(
        "namespaced: {watched} Ready; Secrets of node-other refused: {}",
        err.trim()
    );
    assert_no_refusal(lane, OPERATOR_SA);
    let _ = kubectl_try(&["delete", "namespace", "node-other", "--wait=true"], None);
    let _ = kubectl_try(
        &[
            "-n",
            watched,
            "delete",
            "scgtoken,secret",
            "--all",
            "--wait=true",
        ],
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn kustomize_namespaced_overlay_stays_in_its_namespace() {
    let lane = Lane::get().await;
    let sim = lane.simulator(Duration::from_secs(30)).await;
    let _install = KustomizeInstall::apply(
        &lane,
        &sim,
        "kustomize-namespaced",
        "deploy/overlays/namespaced",
    );
    // The overlay watches "default" unless its watch-namespace.yaml is edited.
    namespaced_install_stays_in_its_namespace(&lane, &sim, "default").await;
}

/// Deletes the ScgToken CRD, and with it every ScgToken, if there is one.
fn delete_crd() {
    let _ = kubectl_try(
        &[
            "delete",
            "crd",
            "scgtokens.scgtoken.io",
            "--ignore-not-found",
        ],
        None,
    );
}

/// `helm install` of the chart, namespaced, with the lane's CA through the chart's
/// extraEnv and extraVolumes values. Uninstalled (and its CRD removed) on drop.
struct HelmInstall {
    helm: String,
    watched: String,
}

impl HelmInstall {
    fn install(lane: &Lane, sim: &ScgSimulator, watched: &str) -> HelmInstall {
        // The guard first: a failed install is removed too.
        let guard = HelmInstall {
            helm: common::node::helm(),
            watched: watched.to_string(),
        };
        let ca = lane.dir("helm", &[("ca.crt", sim.ca_pem().expect("TLS simulator"))]);
        // The chart installs the CRD as its own (crds.enabled): one left by another
        // install is not the release's, and helm would refuse to take it over.
        delete_crd();
        // Namespaced mode grants a Role in the watched namespace, which must exist.
        kubectl(&["create", "namespace", watched]);
        kubectl(&["create", "namespace", OPERATOR_NS]);
        let from_file = format!("--from-file=ca.crt={}", ca.join("ca.crt").display());
        kubectl(&[
            "-n",
            OPERATOR_NS,
            "create",
            "configmap",
            "scg-lane-ca",
            &from_file,
        ]);
        let host = sim.addr().ip();
        let values = format!(
            r#"namespaced: {{enabled: true, watchNamespace: {watched}}}
allowedEndpoints: ["{host}"]
extraEnv: [{{name: SCG_CA_BUNDLE, value: /etc/scg-lane-ca/ca.crt}}]
extraVolumes: [{{name: scg-lane-ca, configMap: {{name: scg-lane-ca}}}}]
extraVolumeMounts: [{{name: scg-lane-ca, mountPath: /etc/scg-lane-ca, readOnly: true}}]
"#
        );
        let values_file = ca.join("values.yaml");
        std::fs::write(&values_file, values).expect("values");
        let chart = lane.root.join("charts/scg-token-operator");
        let (ok, out, err) = common::node::run_try(
            &guard.helm,
            &[
                "install",
                "scg-token-operator",
                chart.to_str().unwrap(),
                "--namespace",
                OPERATOR_NS,
                "-f",
                values_file.to_str().unwrap(),
                "--wait",
                "--timeout",
                "4m",
            ],
            None,
        );
        assert!(ok, "helm install failed:\n{out}\n{err}");
        rollout(OPERATOR_NS, "scg-token-operator");
        guard
    }
}

impl Drop for HelmInstall {
    fn drop(&mut self) {
        let _ = common::node::run_try(
            &self.helm,
            &[
                "uninstall",
                "scg-token-operator",
                "--namespace",
                OPERATOR_NS,
                "--wait",
            ],
            None,
        );
        let _ = kubectl_try(
            &[
                "delete",
                "namespace",
                OPERATOR_NS,
                &self.watched,
                "--ignore-not-found",
                "--wait=true",
            ],
            None,
        );
        // helm uninstall keeps the CRD (helm.sh/resource-policy: keep); the next install
        // brings its own.
        delete_crd();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn helm_install_namespaced_runs_as_pods_and_stays_in_its_namespace() {
    let lane = Lane::get().await;
    let sim = lane.simulator(Duration::from_secs(30)).await;
    let _install = HelmInstall::install(&lane, &sim, "node-helm");
    let pods = operator_pods(&lane).await;
    assert_eq!(pods.len(), 2, "two replicas");
    for pod in &pods {
        assert_security_context(pod);
    }
    namespaced_install_stays_in_its_namespace(&lane, &sim, "node-helm").await;
}

/// Waits until the disruption controller counts exactly the two replicas, both healthy,
/// and allows one disruption (a pod of the handover still terminating is not counted).
async fn two_healthy(pdbs: &Api<PodDisruptionBudget>) {
    let status = until("the PDB to count two healthy pods", PATIENCE, || async {
        let status = pdbs.get("scg-token-operator").await.ok()?.status?;
        let settled = status.expected_pods == 2
            && status.current_healthy == 2
            && status.disruptions_allowed == 1;
        settled.then_some(status)
    })
    .await;
    println!(
        "PDB: {} expected, {} healthy, {} disruption allowed",
        status.expected_pods, status.current_healthy, status.disruptions_allowed
    );
}

/// The install's aggregated ClusterRoles: whoever is bound to `edit` in a namespace may
/// manage ScgTokens there (and nowhere else), whoever is bound to `view` may read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a node: testenv/run --node -- testenv/node-lane"]
async fn namespace_editors_manage_scgtokens_through_the_aggregated_roles() {
    let lane = Lane::get().await;
    let sim = lane.simulator(Duration::from_secs(30)).await;
    let _install = KustomizeInstall::apply(&lane, &sim, "kustomize-users", "deploy");
    kubectl(&["create", "namespace", TENANT_NS]);
    kubectl(&["create", "namespace", "node-other"]);
    for (binding, role, user) in [("dev", "edit", "alice"), ("auditor", "view", "bob")] {
        let role = format!("--clusterrole={role}");
        let user = format!("--user={user}");
        kubectl(&[
            "-n",
            TENANT_NS,
            "create",
            "rolebinding",
            binding,
            &role,
            &user,
        ]);
    }
    let can = |verb: &str, ns: &str, user: &str| {
        let args = [
            "auth",
            "can-i",
            verb,
            "scgtokens.scgtoken.io",
            "-n",
            ns,
            "--as",
            user,
        ];
        kubectl_try(&args, None).1.trim() == "yes"
    };
    // The clusterrole-aggregation controller fills `edit` and `view` in shortly.
    until("edit to include ScgTokens", PATIENCE, || async {
        (can("create", TENANT_NS, "alice") && can("list", TENANT_NS, "bob")).then_some(())
    })
    .await;
    assert!(
        can("delete", TENANT_NS, "alice"),
        "an editor deletes ScgTokens"
    );
    assert!(!can("create", "node-other", "alice"), "only where bound");
    assert!(!can("create", TENANT_NS, "bob"), "a viewer only reads");
    assert!(!can("patch", TENANT_NS, "bob"), "a viewer only reads");
    let token = format!(
        "apiVersion: scgtoken.io/v1alpha1\nkind: ScgToken\nmetadata: {{name: by-alice, namespace: {TENANT_NS}}}\nspec:\n  credentialsSecretRef: {{name: none}}\n"
    );
    kubectl_input(&["apply", "--as", "alice", "-f", "-"], Some(&token));
    let (ok, _, err) = kubectl_try(
        &[
            "-n", TENANT_NS, "delete", "scgtoken", "by-alice", "--as", "bob",
        ],
        None,
    );
    assert!(
        !ok && err.contains("Forbidden"),
        "a viewer deletes nothing: {err}"
    );
    println!("edit manages ScgTokens in its namespace only; view reads them");
    let _ = kubectl_try(&["delete", "namespace", "node-other", "--wait=true"], None);
}
