//! What the operator remembers between passes, one entry per ScgToken. Lost on restart
//! by design: the target Secret is the chain's durable home; memory only bridges the
//! moments when it cannot be written.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
};

use jiff::Timestamp;
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use crate::{
    chain::{Chain, TOKEN_FINGERPRINT},
    policy::Backoff,
};

/// An ScgToken's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Key {
        Key {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// The newest token of a chain. `persisted == false` means it was received but not yet
/// stored: no refresh call happens until it is.
#[derive(Clone)]
struct Held {
    chain: Chain,
    persisted: bool,
}

/// Everything remembered of one ScgToken.
#[derive(Default)]
struct Entry {
    held: Option<Held>,
    /// The last refresh-request annotation value acted on, in case its status write did
    /// not land: a request is honoured once.
    handled_request: Option<String>,
    /// When the last `Refreshed` Event was published.
    refreshed_event_at: Option<Timestamp>,
    /// Fingerprint of the token the consumers were last nudged for.
    nudged_for: Option<String>,
    /// Fingerprint of the token every rollout-restart target was last handled for.
    restarted_for: Option<String>,
    /// The target Secret (name, resourceVersion) as this process last wrote it.
    wrote: Option<(String, String)>,
    /// Fingerprint of the token this process is writing into the target Secret now.
    writing: Option<String>,
    /// The failure streak as this process counts it; status shows it up to a minute late.
    backoff: Option<Backoff>,
}

/// One entry per ScgToken, behind one lock. Boxed: most fields are empty most of the
/// time, and the table's slots stay small.
#[derive(Default)]
pub struct Memory(Mutex<HashMap<Key, Box<Entry>>>);

impl Memory {
    fn entries(&self) -> MutexGuard<'_, HashMap<Key, Box<Entry>>> {
        // Nothing panics while holding the lock; if something ever did, a held token
        // is still better kept than dropped.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The newest token known for `key`, stored or not.
    pub fn chain(&self, key: &Key) -> Option<Chain> {
        let entries = self.entries();
        Some(entries.get(key)?.held.as_ref()?.chain.clone())
    }

    /// The token received for `key` and not yet stored, if any.
    pub fn pending(&self, key: &Key) -> Option<Chain> {
        let entries = self.entries();
        let held = entries.get(key)?.held.as_ref()?;
        (!held.persisted).then(|| held.chain.clone())
    }

    /// Every token received and not yet stored.
    pub fn all_pending(&self) -> Vec<(Key, Chain)> {
        self.entries()
            .iter()
            .filter_map(|(key, e)| {
                let held = e.held.as_ref().filter(|h| !h.persisted)?;
                Some((key.clone(), held.chain.clone()))
            })
            .collect()
    }

    /// Remembers a token just received, before it is stored.
    pub fn hold(&self, key: &Key, chain: Chain) {
        self.set_held(key, chain, false);
    }

    /// Remembers that `chain` is in the target Secret (or something newer is).
    pub fn stored(&self, key: &Key, chain: Chain) {
        self.set_held(key, chain, true);
    }

    fn set_held(&self, key: &Key, chain: Chain, persisted: bool) {
        self.entries().entry(key.clone()).or_default().held = Some(Held { chain, persisted });
    }

    /// Notes that the token with `fingerprint` is being written into the target Secret.
    pub fn writing(&self, key: &Key, fingerprint: String) {
        self.entries().entry(key.clone()).or_default().writing = Some(fingerprint);
    }

    /// Notes the target Secret as this process just wrote it (`None`: the write failed).
    pub fn wrote(&self, key: &Key, written: Option<&Secret>) {
        let mut entries = self.entries();
        let entry = entries.entry(key.clone()).or_default();
        entry.writing = None;
        let Some(meta) = written.map(|s| &s.metadata) else {
            return;
        };
        if let (Some(name), Some(version)) = (&meta.name, &meta.resource_version) {
            entry.wrote = Some((name.clone(), version.clone()));
        }
    }

    /// Whether `secret` (a watch event's copy of `key`'s target) is this process's own
    /// write: the version it last wrote, or, while a write is on its way (its watch event
    /// can come before the answer), the token it is writing. Its event tells the pass
    /// that wrote it nothing new.
    pub fn is_own_write(&self, key: &Key, secret: &ObjectMeta) -> bool {
        let entries = self.entries();
        let Some(entry) = entries.get(key) else {
            return false;
        };
        let same_version = entry.wrote.as_ref().is_some_and(|(name, version)| {
            secret.name.as_ref() == Some(name) && secret.resource_version.as_ref() == Some(version)
        });
        let in_flight = entry.writing.as_ref().is_some_and(|f| {
            secret
                .annotations
                .as_ref()
                .and_then(|a| a.get(TOKEN_FINGERPRINT))
                == Some(f)
        });
        same_version || in_flight
    }

    pub fn handled_request(&self, key: &Key) -> Option<String> {
        self.entries().get(key)?.handled_request.clone()
    }

    pub fn set_handled_request(&self, key: &Key, value: Option<String>) {
        self.entries()
            .entry(key.clone())
            .or_default()
            .handled_request = value;
    }

    pub fn refreshed_event_at(&self, key: &Key) -> Option<Timestamp> {
        self.entries().get(key)?.refreshed_event_at
    }

    pub fn set_refreshed_event_at(&self, key: &Key, at: Timestamp) {
        self.entries()
            .entry(key.clone())
            .or_default()
            .refreshed_event_at = Some(at);
    }

    /// The failure streak this process counted, if it made an attempt since it started
    /// leading.
    pub fn backoff(&self, key: &Key) -> Option<Backoff> {
        self.entries().get(key)?.backoff
    }

    pub fn set_backoff(&self, key: &Key, backoff: Backoff) {
        self.entries().entry(key.clone()).or_default().backoff = Some(backoff);
    }

    /// Fingerprint of the token the pods were last nudged for (attempted: a nudge is
    /// tried once per token, since the kubelet's periodic sync follows anyway).
    pub fn nudged_for(&self, key: &Key) -> Option<String> {
        self.entries().get(key)?.nudged_for.clone()
    }

    pub fn set_nudged_for(&self, key: &Key, fingerprint: &str) {
        self.entries().entry(key.clone()).or_default().nudged_for = Some(fingerprint.into());
    }

    /// Fingerprint of the token every rollout-restart target was handled for (restarted,
    /// already restarted, or absent).
    pub fn restarted_for(&self, key: &Key) -> Option<String> {
        self.entries().get(key)?.restarted_for.clone()
    }

    pub fn set_restarted_for(&self, key: &Key, fingerprint: &str) {
        self.entries().entry(key.clone()).or_default().restarted_for = Some(fingerprint.into());
    }

    /// Forgets an ScgToken that is gone or no longer ours, except a token it still has
    /// to store: that one is never dropped.
    pub fn forget(&self, key: &Key) {
        let mut entries = self.entries();
        match entries.get_mut(key) {
            Some(e) if e.held.as_ref().is_some_and(|h| !h.persisted) => {
                e.handled_request = None;
                e.refreshed_event_at = None;
                e.backoff = None;
            }
            _ => {
                entries.remove(key);
            }
        }
    }
}
