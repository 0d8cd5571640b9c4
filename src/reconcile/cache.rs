//! The ScgToken cache: the reflector's store of [`CachedScgToken`]s, plus an index from
//! each Secret to the ScgTokens that name it (as credentials, headers or target).
//!
//! A Secret event and the one-refresher-per-chain check look the Secret up instead of
//! scanning every ScgToken: with N ScgTokens and M Secrets in a namespace, the first
//! list of the Secrets would otherwise cost N × M comparisons, and every pass N.
//!
//! The cache keeps only what those need, since a pass reads its ScgToken afresh: at
//! 10,000 ScgTokens whole objects cost about 10 MiB more.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{
    Resource, ResourceExt,
    runtime::{
        reflector::{self, ObjectRef, Store, store::Writer},
        watcher,
    },
};
use serde::Deserialize;

use crate::crd::{ScgToken, SecretName};

/// What the cache keeps of an ScgToken: its metadata (without managedFields), the
/// Secrets it names, and when its stored token expires (for the retry after a failed
/// pass). Read from the same list and watch as the whole object; unknown fields are
/// skipped.
#[derive(Resource, Deserialize, Clone, Debug)]
#[resource(inherit = "ScgToken")]
pub struct CachedScgToken {
    pub metadata: ObjectMeta,
    pub spec: CachedSpec,
    #[serde(default)]
    pub status: Option<CachedStatus>,
}

/// The Secret names of an ScgToken's spec.
#[derive(Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct CachedSpec {
    pub credentials_secret_ref: SecretName,
    #[serde(default)]
    pub headers_from: Option<SecretName>,
    #[serde(default)]
    pub target: CachedTarget,
}

#[derive(Deserialize, Clone, Debug, Default)]
pub struct CachedTarget {
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct CachedStatus {
    #[serde(default)]
    pub expires_at: Option<Time>,
}

impl CachedScgToken {
    /// As [`ScgToken::target_name`].
    pub fn target_name(&self) -> String {
        self.spec
            .target
            .name
            .clone()
            .unwrap_or_else(|| self.name_any())
    }
}

impl From<&ScgToken> for CachedScgToken {
    fn from(t: &ScgToken) -> Self {
        CachedScgToken {
            metadata: ObjectMeta {
                managed_fields: None,
                ..t.metadata.clone()
            },
            spec: CachedSpec {
                credentials_secret_ref: SecretName {
                    name: t.spec.credentials_secret_ref.name.clone(),
                },
                headers_from: t.spec.headers_from.clone(),
                target: CachedTarget {
                    name: t.spec.target.name.clone(),
                },
            },
            status: t.status.as_ref().map(|s| CachedStatus {
                expires_at: s.expires_at.clone(),
            }),
        }
    }
}

/// (namespace, Secret name).
type SecretKey = (String, String);

/// The read side: the store and the index.
#[derive(Clone)]
pub struct TokenCache {
    store: Store<CachedScgToken>,
    index: Arc<Mutex<Index>>,
}

/// The write side, fed every event of the ScgToken watch.
pub struct TokenCacheWriter {
    writer: Writer<CachedScgToken>,
    index: Arc<Mutex<Index>>,
}

/// An empty cache and its writer.
pub fn token_cache() -> (TokenCache, TokenCacheWriter) {
    let (store, writer) = reflector::store();
    let index = Arc::new(Mutex::new(Index::default()));
    (
        TokenCache {
            store,
            index: index.clone(),
        },
        TokenCacheWriter { writer, index },
    )
}

impl TokenCache {
    /// The reflector's store.
    pub fn store(&self) -> &Store<CachedScgToken> {
        &self.store
    }

    /// The ScgTokens in `namespace` that name the Secret `name`.
    pub fn referencing(&self, namespace: &str, name: &str) -> Vec<ObjectRef<CachedScgToken>> {
        lock(&self.index)
            .live
            .by_secret
            .get(&(namespace.to_string(), name.to_string()))
            .map(|names| {
                names
                    .iter()
                    .map(|n| ObjectRef::new(n).within(namespace))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The ScgTokens in the cache that name `name` as their credentials Secret, in
    /// `namespace`.
    pub fn sharing_credentials(&self, namespace: &str, name: &str) -> Vec<Arc<CachedScgToken>> {
        self.referencing(namespace, name)
            .iter()
            .filter_map(|r| self.store.get(r))
            .filter(|t| t.spec.credentials_secret_ref.name == name)
            .collect()
    }
}

impl TokenCacheWriter {
    /// Applies one watch event to the store and the index.
    pub fn apply_watcher_event(&mut self, event: &watcher::Event<CachedScgToken>) {
        lock(&self.index).apply(event);
        self.writer.apply_watcher_event(event);
    }

    /// Splits the writer for a watch stream: the reflector's writer (for
    /// [`reflect`](kube::runtime::WatchStreamExt::reflect)) and the index's own part.
    pub(super) fn split(self) -> (Writer<CachedScgToken>, IndexWriter) {
        (self.writer, IndexWriter(self.index))
    }
}

/// The index's share of a [`TokenCacheWriter`].
pub(super) struct IndexWriter(Arc<Mutex<Index>>);

impl IndexWriter {
    pub(super) fn apply(&self, event: &watcher::Event<CachedScgToken>) {
        lock(&self.0).apply(event);
    }
}

/// The live index and, during a relist, the one being built (swapped in at its end,
/// as the reflector swaps its store).
#[derive(Default)]
struct Index {
    live: Entries,
    relist: Option<Entries>,
}

/// Both keyed within a namespace: a Secret's entry holds the names of ScgTokens, sorted
/// (nearly always one; a Vec is a tenth of a BTreeSet's size for that).
#[derive(Default)]
struct Entries {
    by_secret: HashMap<SecretKey, Vec<String>>,
    by_token: HashMap<(String, String), Vec<SecretKey>>,
}

impl Index {
    fn apply(&mut self, event: &watcher::Event<CachedScgToken>) {
        match event {
            watcher::Event::Apply(t) => self.live.insert(t),
            watcher::Event::Delete(t) => {
                if let Some(key) = key(t) {
                    self.live.remove(&key);
                }
            }
            watcher::Event::Init => self.relist = Some(Entries::default()),
            watcher::Event::InitApply(t) => self.relist.get_or_insert_default().insert(t),
            watcher::Event::InitDone => {
                if let Some(entries) = self.relist.take() {
                    self.live = entries;
                }
            }
        }
    }
}

impl Entries {
    fn insert(&mut self, token: &CachedScgToken) {
        let Some(key) = key(token) else {
            return;
        };
        self.remove(&key);
        let namespace = &key.0;
        let spec = &token.spec;
        let mut names = vec![
            spec.credentials_secret_ref.name.clone(),
            token.target_name(),
        ];
        names.extend(spec.headers_from.as_ref().map(|h| h.name.clone()));
        names.sort();
        names.dedup();
        let secrets: Vec<SecretKey> = names.into_iter().map(|n| (namespace.clone(), n)).collect();
        for secret in &secrets {
            let names = self.by_secret.entry(secret.clone()).or_default();
            if let Err(at) = names.binary_search(&key.1) {
                names.insert(at, key.1.clone());
            }
        }
        self.by_token.insert(key, secrets);
    }

    fn remove(&mut self, key: &(String, String)) {
        for secret in self.by_token.remove(key).unwrap_or_default() {
            if let Some(names) = self.by_secret.get_mut(&secret) {
                names.retain(|n| *n != key.1);
                if names.is_empty() {
                    self.by_secret.remove(&secret);
                }
            }
        }
    }
}

/// An ScgToken's (namespace, name).
fn key(token: &CachedScgToken) -> Option<(String, String)> {
    Some((
        token.metadata.namespace.clone()?,
        token.metadata.name.clone()?,
    ))
}

/// The index holds no invariant a panic elsewhere could break halfway.
fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ScgTokenSpec;

    fn token(name: &str, credentials: &str, target: Option<&str>) -> CachedScgToken {
        let mut t = ScgToken::new(name, ScgTokenSpec::new(credentials));
        t.metadata.namespace = Some("ns".into());
        t.spec.target.name = target.map(Into::into);
        CachedScgToken::from(&t)
    }

    fn names(refs: Vec<ObjectRef<CachedScgToken>>) -> Vec<String> {
        refs.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn looks_up_every_role_and_follows_changes_deletes_and_relists() {
        let (cache, mut w) = token_cache();
        w.apply_watcher_event(&watcher::Event::Apply(token("a", "creds", Some("out-a"))));
        w.apply_watcher_event(&watcher::Event::Apply(token("b", "creds", None)));
        let mut with_headers = token("c", "other", Some("out-c"));
        with_headers.spec.headers_from = Some(SecretName {
            name: "hdrs".into(),
        });
        w.apply_watcher_event(&watcher::Event::Apply(with_headers));

        assert_eq!(names(cache.referencing("ns", "creds")), ["a", "b"]);
        assert_eq!(names(cache.referencing("ns", "out-a")), ["a"]);
        assert_eq!(names(cache.referencing("ns", "hdrs")), ["c"]);
        assert!(cache.referencing("elsewhere", "creds").is_empty());
        assert_eq!(cache.sharing_credentials("ns", "creds").len(), 2);
        assert!(cache.sharing_credentials("ns", "out-a").is_empty());

        // A spec change moves the entries; a delete drops them.
        w.apply_watcher_event(&watcher::Event::Apply(token(
            "a",
            "new-creds",
            Some("out-a"),
        )));
        assert_eq!(names(cache.referencing("ns", "creds")), ["b"]);
        assert_eq!(names(cache.referencing("ns", "new-creds")), ["a"]);
        w.apply_watcher_event(&watcher::Event::Delete(token("b", "creds", None)));
        assert!(cache.referencing("ns", "creds").is_empty());

        // A relist keeps answering from the old index until it is complete.
        w.apply_watcher_event(&watcher::Event::Init);
        w.apply_watcher_event(&watcher::Event::InitApply(token("d", "creds", None)));
        assert_eq!(names(cache.referencing("ns", "new-creds")), ["a"]);
        w.apply_watcher_event(&watcher::Event::InitDone);
        assert!(cache.referencing("ns", "new-creds").is_empty());
        assert_eq!(names(cache.referencing("ns", "creds")), ["d"]);
    }
}
