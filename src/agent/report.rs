//! Reporting the served token to the operator: one `coordination.k8s.io` Lease per pod
//! and Secret, renewed like a kubelet's node Lease.
//!
//! Why a Lease: it needs no write access to Pods or to the ScgToken, carries its own
//! heartbeat (`renewTime` + `leaseDurationSeconds`, so a dead or frozen agent's report ends
//! by itself), and is owned by the pod (deleted with it). The agent needs `create` on
//! leases and `get`/`update` on its own; it never lists or deletes.
//!
//! The Lease says, in annotations, which fingerprint the pod serves and since when; a
//! label names the ScgToken, which is how the operator finds the reports.

use std::{future::Future, sync::Arc, time::Duration};

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
};
use kube::{Api, ResourceExt, api::PostParams};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{Served, ServedRx, health::Metrics};
use crate::{
    crd::{
        AGENT_MODE_ANNOTATION, AGENT_SCGTOKEN_LABEL, AGENT_SECRET_ANNOTATION,
        SERVED_FINGERPRINT_ANNOTATION, SERVED_SINCE_ANNOTATION,
    },
    k8s::{bounded, describe},
};

/// Label marking the Leases written by token agents.
pub const COMPONENT_LABEL: (&str, &str) = ("app.kubernetes.io/component", "scg-token-agent");

/// Where and how to report.
#[derive(Debug, Clone)]
pub struct Config {
    pub namespace: String,
    pub lease_name: String,
    pub pod: String,
    pub pod_uid: Option<String>,
    pub secret: String,
    /// The ScgToken's name for the label; else taken from the Secret.
    pub scgtoken: Option<String>,
    pub mode: &'static str,
    pub duration: Duration,
}

/// The Lease name for `pod` serving `secret`: `<pod>.<secret>`, shortened with a hash
/// when longer than a name may be.
pub fn lease_name(pod: &str, secret: &str) -> String {
    let name = format!("{pod}.{secret}");
    if name.len() <= 253 {
        return name;
    }
    let hash: String = Sha256::digest(name.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keep = pod.len().min(253 - 17);
    format!("{}.{hash}", pod[..keep].trim_end_matches(['.', '-']))
}

/// The Lease as it should be at `now`, laid over `base` (the stored one, if any).
pub fn desired(
    config: &Config,
    scgtoken: &str,
    served: Option<&Served>,
    started: Timestamp,
    now: Timestamp,
    base: Option<&Lease>,
) -> Lease {
    let mut lease = base.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(config.lease_name.clone()),
            namespace: Some(config.namespace.clone()),
            ..ObjectMeta::default()
        },
        ..Lease::default()
    });
    let labels = lease.labels_mut();
    labels.insert(AGENT_SCGTOKEN_LABEL.into(), scgtoken.into());
    labels.insert(COMPONENT_LABEL.0.into(), COMPONENT_LABEL.1.into());
    let annotations = lease.annotations_mut();
    annotations.insert(AGENT_SECRET_ANNOTATION.into(), config.secret.clone());
    annotations.insert(AGENT_MODE_ANNOTATION.into(), config.mode.into());
    match served {
        Some(s) => {
            annotations.insert(
                SERVED_FINGERPRINT_ANNOTATION.into(),
                s.token.fingerprint.clone(),
            );
            annotations.insert(SERVED_SINCE_ANNOTATION.into(), s.since.to_string());
        }
        None => {
            annotations.remove(SERVED_FINGERPRINT_ANNOTATION);
            annotations.remove(SERVED_SINCE_ANNOTATION);
        }
    }
    if let Some(uid) = &config.pod_uid {
        lease.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: config.pod.clone(),
            uid: uid.clone(),
            controller: None,
            // Setting it would need permission to delete the pod.
            block_owner_deletion: None,
        }]);
    }
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(config.pod.clone()),
        lease_duration_seconds: i32::try_from(config.duration.as_secs()).ok(),
        acquire_time: Some(MicroTime(started)),
        renew_time: Some(MicroTime(now)),
        ..LeaseSpec::default()
    });
    lease
}

/// Writes `lease` over what is stored: update when `base` is known, create otherwise;
/// re-read after a conflict or a vanished Lease. Returns what is stored.
async fn write(
    api: &Api<Lease>,
    name: &str,
    mut base: Option<Lease>,
    build: impl Fn(Option<&Lease>) -> Lease,
) -> Result<Lease, kube::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        if base.is_none() {
            base = bounded(api.get_opt(name)).await?;
        }
        let lease = build(base.as_ref());
        let result = match &base {
            Some(_) => bounded(api.replace(name, &PostParams::default(), &lease)).await,
            None => bounded(api.create(&PostParams::default(), &lease)).await,
        };
        match result {
            Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) && attempt < 3 => base = None,
            other => return other,
        }
    }
}

/// Heartbeats until `shutdown` resolves, reporting a switch at once; then releases the
/// Lease (an empty holder), so the operator drops this pod at once.
pub async fn run(
    client: kube::Client,
    config: Config,
    mut served: ServedRx,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let started = Timestamp::now();
    let renew = config.duration / 3;
    let mut stored: Option<Lease> = None;
    let mut label: Option<String> = None;
    let mut announced = false;
    futures::pin_mut!(shutdown);
    loop {
        let snapshot = served.borrow_and_update().clone();
        label = config
            .scgtoken
            .clone()
            .or_else(|| snapshot.as_ref().map(|s| s.token.scgtoken.clone()))
            .or(label);
        let mut wait = renew;
        if let Some(label) = &label {
            let build = |base: Option<&Lease>| {
                desired(
                    &config,
                    label,
                    snapshot.as_ref(),
                    started,
                    Timestamp::now(),
                    base,
                )
            };
            match write(&api, &config.lease_name, stored.take(), build).await {
                Ok(lease) => {
                    if !std::mem::replace(&mut announced, true) {
                        info!(lease = %config.lease_name, "reporting the served token in a Lease");
                    }
                    stored = Some(lease);
                }
                Err(e) => {
                    warn!(lease = %config.lease_name, error = describe(&e), "reporting the served token failed; retrying");
                    metrics.report_failures.inc();
                    wait = renew.min(Duration::from_secs(1));
                }
            }
        }
        tokio::select! {
            r = served.changed() => if r.is_err() { break },
            () = tokio::time::sleep(wait) => {}
            () = &mut shutdown => break,
        }
    }
    if let Some(label) = &label {
        release(&api, &config, label, stored, started).await;
    }
}

async fn release(
    api: &Api<Lease>,
    config: &Config,
    label: &str,
    stored: Option<Lease>,
    started: Timestamp,
) {
    let build = |base: Option<&Lease>| {
        let mut lease = desired(config, label, None, started, Timestamp::now(), base);
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        lease
    };
    match write(api, &config.lease_name, stored, build).await {
        Ok(_) => info!(lease = %config.lease_name, "released the report Lease"),
        Err(e) => {
            warn!(lease = %config.lease_name, error = describe(&e), "releasing the report Lease failed; it expires by itself")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{agent::Token, consumers, scg::SecretString};

    fn config(uid: Option<&str>) -> Config {
        Config {
            namespace: "apps".into(),
            lease_name: lease_name("client-7d9f-x2", "messaging-scg-token"),
            pod: "client-7d9f-x2".into(),
            pod_uid: uid.map(str::to_string),
            secret: "messaging-scg-token".into(),
            scgtoken: None,
            mode: "proxy",
            duration: Duration::from_secs(30),
        }
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn lease_names_are_valid_and_bounded() {
        assert_eq!(lease_name("pod-1", "secret"), "pod-1.secret");
        let long = lease_name(&"p".repeat(250), "secret");
        assert!(long.len() <= 253, "{}", long.len());
        assert_ne!(long, lease_name(&"p".repeat(250), "other"));
    }

    #[test]
    fn the_lease_says_what_the_operator_reads() {
        let served = Served {
            token: Arc::new(Token {
                value: SecretString::new("the-token-itself"),
                fingerprint: "0123456789abcdef".into(),
                scgtoken: "messaging".into(),
                issued_at: None,
                expires_at: None,
            }),
            since: t("2030-01-01T00:00:01.5Z"),
        };
        let started = t("2030-01-01T00:00:00Z");
        let now = t("2030-01-01T00:00:02Z");
        let lease = desired(
            &config(Some("uid-1")),
            "messaging",
            Some(&served),
            started,
            now,
            None,
        );
        let yaml = serde_yaml::to_string(&lease).unwrap();
        assert!(!yaml.contains("the-token-itself"));
        assert_eq!(lease.labels()[AGENT_SCGTOKEN_LABEL], "messaging");
        let owner = &lease.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "uid-1"));

        let report = consumers::report_from_lease(&lease).unwrap();
        assert_eq!(report.pod, "client-7d9f-x2");
        assert_eq!(report.fingerprint.as_deref(), Some("0123456789abcdef"));
        assert_eq!(report.since, Some(served.since));
        assert_eq!(report.started, Some(started));
        assert_eq!(report.renewed, Some(now));
        assert_eq!(report.duration, Duration::from_secs(30));

        // Serving nothing any more clears the fingerprint but keeps the heartbeat.
        let lease = desired(&config(None), "messaging", None, started, now, Some(&lease));
        let report = consumers::report_from_lease(&lease).unwrap();
        assert_eq!(report.fingerprint, None);
        assert_eq!(report.renewed, Some(now));
    }
}
