//! The one place a pass's outcome leaves the process: metrics, the status write and the
//! Events.

use std::time::Duration;

use jiff::SignedDuration;
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
};
use tracing::warn;

use super::{
    Pass,
    consumers::earliest,
    outcome::{self, Happened, Outcome, Prior},
};
use crate::{
    crd::{ScgToken, ScgTokenStatus},
    k8s,
    policy::Backoff,
    report::TokenLabels,
};

/// Field manager of the operator's status writes.
pub const FIELD_MANAGER: &str = "scg-token-operator";

impl Pass<'_> {
    /// Reports what happened and says when to look again.
    pub(super) async fn report(&self, happened: Happened) -> Action {
        self.publish(self.outcome(happened)).await
    }

    /// The outcome of what happened, from the ScgToken as this pass read it. Memory
    /// keeps the failure streak it leaves (a gate's stop leaves the streak as it was).
    pub(super) fn outcome(&self, happened: Happened) -> Outcome {
        let target_name = self.obj.target_name();
        let prior = Prior {
            status: &self.prev,
            ready: self.obj.ready_condition(),
            generation: self.obj.metadata.generation,
            target_name: &target_name,
            failures: self.backoff.failures,
            refreshed_event_at: self.ctx.memory.refreshed_event_at(&self.key),
        };
        let blocked = matches!(happened, Happened::Blocked(_));
        let out = outcome::outcome(&prior, happened, self.now);
        if !blocked {
            let failures = out.status.consecutive_failures;
            let retry_at = out.status.next_refresh_at.as_ref().map(|t| t.0);
            let backoff = Backoff {
                failures,
                retry_at: retry_at.filter(|_| failures > 0),
            };
            self.ctx.memory.set_backoff(&self.key, backoff);
        }
        out
    }

    /// Updates the metrics, adds the consumers' part (after the writes it asks for),
    /// writes status if its serialized form changed, publishes the Events, and turns the
    /// wake-up into the controller's Action.
    pub(super) async fn publish(&self, mut out: Outcome) -> Action {
        if out.refreshed_event {
            self.ctx.memory.set_refreshed_event_at(&self.key, self.now);
        }
        let labels = TokenLabels {
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
        };
        self.ctx.metrics.set_token(
            &labels,
            out.status.expires_at.as_ref().map(|t| t.0),
            out.status.next_refresh_at.as_ref().map(|t| t.0),
            out.reason.is_ready(),
            out.status.consecutive_failures,
        );
        let consumers = self.consumers(&out).await;
        out.status.consumers = consumers.status;
        out.status.conditions.extend(consumers.condition);
        self.add_credentials_allowed(&mut out);
        let mut wake = earliest(out.wake, consumers.wake);
        if !self.write_status(&out.status).await {
            // The schedule computed here still holds (a back-off is not cut short);
            // without one, try again soon so the status catches up.
            wake = wake.or(Some(self.now + SignedDuration::from_secs(5)));
        }
        let events = out.events.into_iter().map(|notice| Event {
            type_: notice.type_,
            reason: notice.reason.into(),
            note: Some(notice.note),
            action: "Refresh".into(),
            secondary: None,
        });
        self.publish_events(events.chain(consumers.events)).await;
        match wake {
            Some(at) => Action::requeue(
                self.ctx
                    .clock
                    .now()
                    .duration_until(at)
                    .try_into()
                    .unwrap_or(Duration::ZERO),
            ),
            None => Action::await_change(),
        }
    }

    /// Writes `status` unless its serialized form is what the pass read, or it only
    /// advances a failure streak that status shows and was written less than a minute
    /// ago ([`outcome::progress_only`]). Whether status is as wanted.
    async fn write_status(&self, status: &ScgTokenStatus) -> bool {
        // Compare as serialized: Kubernetes times have whole-second precision, so an
        // instant computed to the millisecond equals its stored form only this way.
        if serde_json::to_value(status).ok() == serde_json::to_value(&self.prev).ok()
            || outcome::progress_only(&self.prev, status, self.now)
        {
            return true;
        }
        let api: Api<ScgToken> = Api::namespaced(self.ctx.client.clone(), &self.key.namespace);
        let patch = serde_json::json!({
            "apiVersion": ScgToken::api_version(&()),
            "kind": ScgToken::kind(&()),
            "status": status,
        });
        let written = k8s::bounded(api.patch_status(
            &self.key.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        ))
        .await;
        if let Err(e) = &written {
            warn!(error = %k8s::describe(e), "could not write status");
        }
        written.is_ok()
    }

    async fn publish_events(&self, events: impl Iterator<Item = Event>) {
        let reference = self.obj.object_ref(&());
        for event in events {
            // A Warning marks a turn for the worse: the log says so too, once, in the
            // same words (they name Secrets and keys, never values).
            if event.type_ == EventType::Warning {
                // `note`, as the Event calls it: a field named `message` would be the
                // log line's own key a second time.
                let note = event.note.as_deref().unwrap_or_default();
                warn!(reason = %event.reason, note, "warning");
            }
            if let Err(e) = self.ctx.events.publish(&event, &reference).await {
                warn!(error = %e, reason = %event.reason, "could not publish an Event");
            }
        }
    }
}
