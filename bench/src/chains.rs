//! Every chain state the operator stores, as seen by a metadata-only watch of its target
//! Secrets: the issue and expiry times and the token fingerprint live in annotations, so
//! the harness never reads a token from the API.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};
use scg_token_operator::{
    chain::{EXPIRES_AT, ISSUED_AT, TOKEN_FINGERPRINT},
    crd::{MANAGED_BY_LABEL, MANAGED_BY_VALUE},
};
use tokio::task::JoinHandle;

/// One token as stored in a target Secret.
#[derive(Debug, Clone)]
pub struct Stored {
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub fingerprint: String,
    /// When the harness's watch delivered it.
    pub seen: SystemTime,
}

pub type States = Arc<Mutex<HashMap<String, Vec<Stored>>>>;

/// Watches the target Secrets until dropped.
pub struct ChainWatch {
    pub states: States,
    task: JoinHandle<()>,
}

impl Drop for ChainWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChainWatch {
    pub fn start(client: kube::Client, namespace: &str) -> ChainWatch {
        let api: Api<PartialObjectMeta<Secret>> = Api::namespaced(client, namespace);
        let states: States = Arc::default();
        let config =
            watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
        let sink = states.clone();
        let task = tokio::spawn(async move {
            let mut events = watcher(api, config)
                .default_backoff()
                .touched_objects()
                .boxed();
            while let Some(ev) = events.next().await {
                if let Ok(meta) = ev {
                    record(&sink, &meta);
                }
            }
        });
        ChainWatch { states, task }
    }

    /// Target Secrets that hold at least one stored token.
    pub fn stored_count(&self) -> usize {
        self.states.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn snapshot(&self) -> HashMap<String, Vec<Stored>> {
        self.states.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

fn record(states: &States, meta: &PartialObjectMeta<Secret>) {
    let Some(name) = meta.metadata.name.clone() else {
        return;
    };
    let Some(a) = meta.metadata.annotations.as_ref() else {
        return;
    };
    let time = |k: &str| a.get(k).and_then(|v| v.parse::<Timestamp>().ok());
    let (Some(issued_at), Some(expires_at), Some(fingerprint)) = (
        time(ISSUED_AT),
        time(EXPIRES_AT),
        a.get(TOKEN_FINGERPRINT).cloned(),
    ) else {
        return;
    };
    let Ok(mut m) = states.lock() else { return };
    let list = m.entry(name).or_default();
    // Other writes (metadata syncs, relists) repeat a state already recorded.
    if list.iter().any(|s| s.fingerprint == fingerprint) {
        return;
    }
    list.push(Stored {
        issued_at,
        expires_at,
        fingerprint,
        seen: SystemTime::now(),
    });
}
