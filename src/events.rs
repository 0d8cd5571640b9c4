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

use crate::k8s;

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
    ) -> Result<(), kube::Error> {
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
