//! Kubernetes Events (`events.k8s.io/v1`), each created as it is.
//!
//! kube's `Recorder` keeps every Event it published for six minutes, to turn a repeat
//! into a series. The operator publishes an Event only when a token's `Ready` reason
//! changes, and `Refreshed` at most every ten minutes, so repeats within six minutes are
//! rare; but that cache held about 25 MiB after one round of `Refreshed` Events at
//! 10,000 ScgTokens (an Event is 1 KiB before its strings), and its table never shrinks.
//! So this publisher keeps nothing.

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api,
    api::PostParams,
    runtime::events::{Event, EventType, Reporter},
};

use crate::{consumers::ConditionReason, k8s, report::Reason};

/// The Event reasons that are neither a `Ready` reason nor a `ConsumersUpToDate` one.
const OTHER_REASONS: [&str; 10] = [
    // The refresh: a new chain from a new seed, the end of a failure streak, the end of
    // a suspension.
    "SeedRotated",
    "Recovered",
    "Resumed",
    // The consumers: back to up to date, and the nudges and restarts.
    "ConsumersUpToDate",
    "RolloutRestarted",
    "NudgeFailed",
    "RestartTargetNotFound",
    "RestartFailed",
    // A workload or pod that does not opt in, left unchanged.
    "RestartNotAllowed",
    "NudgeNotAllowed",
];

/// Every reason an Event of the operator may carry: each `Ready` reason (a change of it
/// is announced), each `ConsumersUpToDate` reason but `UpToDate` (announced as
/// `ConsumersUpToDate`), and [`OTHER_REASONS`]. [`Publisher::publish`] refuses any other,
/// and docs/troubleshooting.md has a section for each (a test holds them together).
pub fn reasons() -> impl Iterator<Item = &'static str> {
    let ready = Reason::ALL.into_iter().map(Reason::as_str);
    let consumers = ConditionReason::ALL
        .into_iter()
        .filter(|r| *r != ConditionReason::UpToDate)
        .map(ConditionReason::as_str);
    ready.chain(consumers).chain(OTHER_REASONS)
}

fn registered(reason: &str) -> Result<(), PublishError> {
    match reasons().any(|r| r == reason) {
        true => Ok(()),
        false => Err(PublishError::Unregistered(reason.to_string())),
    }
}

/// An Event whose reason is not in [`reasons`]: a reason added without its place in the
/// registry and the troubleshooting page.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Event reason {0:?} is not registered in events::reasons()")]
    Unregistered(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Publishes Events as `reporter`.
#[derive(Clone)]
pub struct Publisher {
    client: kube::Client,
    reporter: Reporter,
}

impl Publisher {
    pub fn new(client: kube::Client, reporter: Reporter) -> Self {
        Publisher { client, reporter }
    }

    /// Creates `event` about `regarding`, in its namespace.
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), PublishError> {
        if let Err(e) = registered(&event.reason) {
            debug_assert!(false, "{e}");
            return Err(e);
        }
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let created = self.build(event, regarding, Timestamp::now());
        k8s::bounded(api.create(&PostParams::default(), &created)).await?;
        Ok(())
    }

    fn build(&self, event: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let controller = &self.reporter.controller;
        let object = regarding.name.as_ref().unwrap_or(controller);
        K8sEvent {
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                // As kube's Recorder names them: unique per object and nanosecond.
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                ..ObjectMeta::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..K8sEvent::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = include_str!("../docs/troubleshooting.md");

    fn section(reason: &str) -> bool {
        PAGE.lines()
            .any(|l| l.starts_with("### ") && l.contains(&format!("`{reason}`")))
    }

    #[test]
    fn every_event_and_condition_reason_has_a_troubleshooting_section() {
        let conditions = Reason::ALL
            .map(Reason::as_str)
            .into_iter()
            .chain(ConditionReason::ALL.map(ConditionReason::as_str));
        let missing: Vec<&str> = reasons()
            .chain(conditions)
            .filter(|r| !section(r))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/troubleshooting.md has no `### ` section naming {missing:?}"
        );
        assert!(!section("NoSuchReason"), "the check can fail");
    }

    #[test]
    fn only_registered_reasons_are_published() {
        for reason in reasons() {
            assert!(registered(reason).is_ok(), "{reason}");
        }
        assert!(matches!(
            registered("SomethingNew"),
            Err(PublishError::Unregistered(r)) if r == "SomethingNew"
        ));
        assert!(registered("").is_err());
    }
}
