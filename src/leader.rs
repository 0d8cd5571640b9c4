//! Leader election on a `coordination.k8s.io/v1` Lease, with kube-lease-manager.
//!
//! Every replica runs the controller (so standbys have warm caches and are ready), but
//! only the leader reconciles. Before each refresh call the leader also reads the Lease
//! and checks that it still holds it for at least [`SAFETY_MARGIN`]: a leader cut off from
//! the API server stops refreshing at once instead of trusting its last renewal.

use std::{future::Future, sync::Arc, time::Duration};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// How long the Lease must still be held, when checked before a refresh call; a third
/// of the lease duration for leases shorter than 15 s.
pub const SAFETY_MARGIN: Duration = Duration::from_secs(5);

/// Whether this replica may refresh tokens.
#[derive(Clone)]
pub struct Leadership(Option<Arc<Elected>>);

/// The state of an election; absent when election is off and this replica always leads.
struct Elected {
    rx: watch::Receiver<bool>,
    margin: SignedDuration,
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl Leadership {
    /// No election: for a single replica, tests and the demo.
    pub fn always() -> Self {
        Leadership(None)
    }

    /// Whether this replica currently believes it leads.
    pub fn is_leader(&self) -> bool {
        self.0.as_ref().is_none_or(|e| *e.rx.borrow())
    }

    /// Reads the Lease and checks that this replica holds it for at least
    /// [`SAFETY_MARGIN`] from `now`. Any doubt (an API error included) is a no.
    pub async fn confirm(&self, now: Timestamp) -> bool {
        let Some(Elected {
            rx,
            margin,
            api,
            name,
            identity,
        }) = self.0.as_deref()
        else {
            return true;
        };
        if !*rx.borrow() {
            return false;
        }
        let Ok(lease) = crate::k8s::bounded(api.get(name)).await else {
            return false;
        };
        let Some(spec) = lease.spec else {
            return false;
        };
        let (Some(holder), Some(renewed), Some(secs)) = (
            spec.holder_identity,
            spec.renew_time,
            spec.lease_duration_seconds,
        ) else {
            return false;
        };
        let held_until = renewed.0 + SignedDuration::from_secs(i64::from(secs));
        holder == *identity && held_until > now + *margin
    }

    /// A receiver that changes whenever leadership does (for re-reconciling everything on
    /// becoming leader). `None` without election.
    pub fn changes(&self) -> Option<watch::Receiver<bool>> {
        self.0.as_ref().map(|e| e.rx.clone())
    }
}

/// Lease settings.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a Lease stays valid after its last renewal; a standby takes over at most
    /// this long after the leader dies.
    pub duration: Duration,
}

/// Starts the election. Returns the [`Leadership`] handle and a task that keeps the
/// Lease renewed until `shutdown` resolves, then releases it. A standby notices the
/// release when it looks again, at the expiry of the Lease as it last saw it (it does not
/// watch the Lease), or a new replica takes it at its first look.
pub async fn elect(
    client: kube::Client,
    config: ElectionConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_change: impl Fn(bool) + Send + 'static,
) -> Result<(Leadership, tokio::task::JoinHandle<()>), kube_lease_manager::LeaseManagerError> {
    let duration = config.duration.as_secs().max(3);
    // Renew when two thirds of the lease are left, so a healthy leader always holds it
    // for more than SAFETY_MARGIN.
    let grace = (duration * 2 / 3).max(1);
    let manager = LeaseManagerBuilder::new(client.clone(), &config.name)
        .with_namespace(&config.namespace)
        .with_parameters(
            LeaseParams::new(&config.identity, duration, grace)
                .with_field_manager(format!("scg-token-operator-{}", config.identity)),
        )
        .build()
        .await?;
    let (tx, rx) = watch::channel(false);
    let identity = config.identity.clone();
    let task = tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                changed = manager.changed() => match changed {
                    Ok(leading) => {
                        info!(identity, leading, "leadership changed");
                        on_change(leading);
                        tx.send_replace(leading);
                    }
                    Err(e) => {
                        warn!(error = %e, "lease renewal failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
            }
        }
        tx.send_replace(false);
        on_change(false);
        match manager.release().await {
            Ok(()) => info!(identity, "released the leader lease"),
            Err(e) => warn!(error = %e, "could not release the leader lease"),
        }
    });
    let margin = SAFETY_MARGIN.min(Duration::from_secs(duration) / 3);
    let leadership = Leadership(Some(Arc::new(Elected {
        rx,
        margin: SignedDuration::try_from(margin).unwrap_or_default(),
        api: Api::namespaced(client, &config.namespace),
        name: config.name,
        identity: config.identity,
    })));
    Ok((leadership, task))
}
