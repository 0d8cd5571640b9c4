//! Watching the one Secret the agent serves, and deciding whether what it holds can be
//! served.
//!
//! The watch is a kube-runtime watcher on a field selector on the Secret's name, so the
//! agent needs `get`/`list`/`watch` on that one Secret only (a Role with
//! `resourceNames`). The watcher relists after a dropped watch or a 410 Gone, and backs
//! off while the API server is unreachable.

use std::{
    hash::{BuildHasher, Hasher},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    runtime::{WatchStreamExt, utils::Backoff, watcher},
};
use tokio::sync::watch as channel;
use tracing::{debug, info, warn};

use super::{Token, health::Metrics};
use crate::{
    chain::{self, EXPIRES_AT, ISSUED_AT, TOKEN_FINGERPRINT},
    crd::{OWNER_ANNOTATION, ScgToken, ScgTokenSpec},
    scg::SecretString,
};

/// Which Secret and key to serve.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub key: String,
    pub max_bytes: usize,
}

/// Why a Secret's content is not served. Each names what is wrong, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("has no key {0:?}")]
    MissingKey(String),
    #[error("key {0:?} is empty")]
    Empty(String),
    #[error("key {key:?} holds {size} bytes, more than the {max} allowed (--max-token-bytes)")]
    TooLarge {
        key: String,
        size: usize,
        max: usize,
    },
    #[error("key {0:?} is not UTF-8 text")]
    NotUtf8(String),
    #[error("key {0:?} holds characters a bearer token cannot have (spaces or control characters)")]
    NotAToken(String),
    #[error("its token expired at {0} (annotation scgtoken.io/expires-at)")]
    Expired(Timestamp),
}

impl Refusal {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::MissingKey(_) => "missing_key",
            Refusal::Empty(_) => "empty",
            Refusal::TooLarge { .. } => "too_large",
            Refusal::NotUtf8(_) => "not_utf8",
            Refusal::NotAToken(_) => "not_a_token",
            Refusal::Expired(_) => "expired",
        }
    }
}

/// The fingerprint the operator computes for `value` in the chain of ScgToken `owner`
/// in `namespace` ([`chain::fingerprint`]): salted with the ScgToken's namespace and name,
/// which the Secret carries, so the agent needs no extra secret to compute it.
pub fn fingerprint(namespace: &str, owner: &str, value: &str) -> String {
    let mut scgtoken = ScgToken::new(owner, ScgTokenSpec::new(""));
    scgtoken.metadata.namespace = Some(namespace.to_string());
    chain::fingerprint(&scgtoken, value)
}

/// Whether `secret` holds a token that can be served at `now`, and that token.
pub fn evaluate(secret: &Secret, source: &Source, now: Timestamp) -> Result<Token, Refusal> {
    let key = &source.key;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| Refusal::MissingKey(key.clone()))?;
    if bytes.0.len() > source.max_bytes {
        return Err(Refusal::TooLarge {
            key: key.clone(),
            size: bytes.0.len(),
            max: source.max_bytes,
        });
    }
    let text = std::str::from_utf8(&bytes.0).map_err(|_| Refusal::NotUtf8(key.clone()))?;
    // Trailing newlines from `kubectl create secret --from-file` are not part of a token.
    let value = text.trim();
    if value.is_empty() {
        return Err(Refusal::Empty(key.clone()));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Refusal::NotAToken(key.clone()));
    }
    let annotations = secret.annotations();
    let time = |k: &str| annotations.get(k).and_then(|v| v.parse::<Timestamp>().ok());
    let expires_at = time(EXPIRES_AT);
    if let Some(at) = expires_at.filter(|at| *at <= now) {
        return Err(Refusal::Expired(at));
    }
    let scgtoken = annotations
        .get(OWNER_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| secret.name_any());
    let namespace = secret.namespace().unwrap_or_default();
    Ok(Token {
        fingerprint: fingerprint(&namespace, &scgtoken, value),
        value: SecretString::new(value),
        scgtoken,
        issued_at: time(ISSUED_AT),
        expires_at,
    })
}

/// Watches the Secret until the task is dropped, sending each servable token.
pub async fn run(
    api: Api<Secret>,
    source: Source,
    candidates: channel::Sender<Option<Arc<Token>>>,
    metrics: Arc<Metrics>,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", source.name));
    let stream = watcher(api, config).backoff(WatchBackoff::default());
    futures::pin_mut!(stream);
    let mut listed = false;
    let mut last_refusal: Option<(Option<String>, Refusal)> = None;
    while let Some(event) = stream.next().await {
        let secret = match event {
            Ok(watcher::Event::Init) => {
                listed = false;
                continue;
            }
            Ok(watcher::Event::InitApply(s) | watcher::Event::Apply(s)) => {
                listed = true;
                s
            }
            Ok(watcher::Event::InitDone) => {
                if !listed {
                    warn!(secret = %source.name, "the Secret does not exist (yet); waiting for it");
                }
                continue;
            }
            Ok(watcher::Event::Delete(_)) => {
                warn!(secret = %source.name, "the Secret was deleted; still serving the last token until a new one arrives");
                continue;
            }
            Err(e) => {
                warn!(secret = %source.name, error = describe(&e), "watching the Secret failed; retrying with backoff");
                continue;
            }
        };
        match evaluate(&secret, &source, Timestamp::now()) {
            Ok(token) => {
                last_refusal = None;
                check_annotation(&secret, &token);
                let changed = candidates.borrow().as_ref().is_none_or(|c| {
                    c.fingerprint != token.fingerprint || c.expires_at != token.expires_at
                });
                if changed {
                    debug!(fingerprint = %token.fingerprint, "the Secret holds a token to serve");
                    candidates.send_replace(Some(Arc::new(token)));
                }
            }
            Err(refusal) => {
                // One line per change of the Secret, not one per relist.
                let seen = (secret.resource_version(), refusal.clone());
                if last_refusal.as_ref() != Some(&seen) {
                    warn!(secret = %source.name, reason = refusal.label(), "not serving the Secret's token: the Secret {refusal}");
                    metrics.refused(refusal.label());
                    last_refusal = Some(seen);
                }
            }
        }
    }
    info!("the Secret watch ended");
}

/// Warns when the Secret's recorded fingerprint is not the token's: someone changed the
/// data without the operator.
fn check_annotation(secret: &Secret, token: &Token) {
    if let Some(recorded) = secret.annotations().get(TOKEN_FINGERPRINT)
        && *recorded != token.fingerprint
    {
        warn!(
            recorded = %recorded,
            computed = %token.fingerprint,
            "the Secret's scgtoken.io/token-fingerprint does not match its token; reporting the token's own"
        );
    }
}

/// Back-off between watch attempts: from 100 ms (a 410 Gone or a dropped watch costs a
/// relist, not seconds of a stale token) doubling to 30 s while the API server stays
/// away, with jitter so that the agents of many pods do not come back all at once.
/// Reset by the first event that arrives.
#[derive(Debug, Clone)]
struct WatchBackoff {
    next: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: BACKOFF_MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        // Between half and all of the base delay.
        let mut h = std::hash::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let fraction = 0.5 + (h.finish() % 1000) as f64 / 2000.0;
        Some(base.mul_f64(fraction))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// A watcher error in the agent's own words: API codes and reasons, never messages.
fn describe(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => {
            let mut s = crate::k8s::describe(e);
            if matches!(e, kube::Error::Api(s) if s.code == 403) {
                s.push_str(" (the pod's ServiceAccount needs get, list and watch on this Secret)");
            }
            s
        }
        watcher::Error::WatchError(s) => {
            format!("the watch ended with {} {}", s.code, s.reason)
        }
        watcher::Error::NoResourceVersion => "the API returned no resourceVersion".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{ByteString, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;

    fn source() -> Source {
        Source {
            name: "messaging-scg-token".into(),
            key: "accessToken".into(),
            max_bytes: 64,
        }
    }

    fn secret(value: Option<&[u8]>, annotations: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("messaging-scg-token".into()),
                namespace: Some("apps".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            data: value.map(|v| BTreeMap::from([("accessToken".into(), ByteString(v.to_vec()))])),
            ..Secret::default()
        }
    }

    fn now() -> Timestamp {
        "2030-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn backoff_starts_short_grows_to_a_cap_and_resets() {
        let mut b = WatchBackoff::default();
        let first = b.next().unwrap();
        assert!(
            first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
            "{first:?}"
        );
        let later: Vec<Duration> = (&mut b).take(20).collect();
        assert!(later.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(*later.last().unwrap() >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next().unwrap() <= BACKOFF_MIN);
    }

    #[test]
    fn bad_contents_are_refused_with_a_reason() {
        type Case<'a> = (Option<&'a [u8]>, &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case; 7] = [
            (None, &[], "missing_key"),
            (Some(b"  \n"), &[], "empty"),
            (Some(&[b'a'; 65]), &[], "too_large"),
            (Some(&[0xff, 0xfe, 0x41]), &[], "not_utf8"),
            (Some(b"two words"), &[], "not_a_token"),
            (Some(b"tok\x07en"), &[], "not_a_token"),
            (
                Some(b"token"),
                &[(EXPIRES_AT, "2029-12-31T23:59:59Z")],
                "expired",
            ),
        ];
        for (value, annotations, label) in cases {
            let refusal = evaluate(&secret(value, annotations), &source(), now())
                .err()
                .unwrap_or_else(|| panic!("{label} was accepted"));
            assert_eq!(refusal.label(), label);
            // The message names the key, never the value.
            let message = refusal.to_string();
            assert!(!message.contains("token\x07") && !message.contains("two words"));
        }
    }

    #[test]
    fn a_good_token_is_served_with_its_times_and_the_operators_fingerprint() {
        let s = secret(
            Some(b"tok-123\n"),
            &[
                (EXPIRES_AT, "2030-01-01T00:01:00Z"),
                (ISSUED_AT, "2029-12-31T23:59:00Z"),
                (OWNER_ANNOTATION, "messaging"),
            ],
        );
        let token = evaluate(&s, &source(), now()).ok().unwrap();
        assert_eq!(token.value.expose(), "tok-123");
        assert_eq!(token.scgtoken, "messaging");
        assert_eq!(
            token.expires_at,
            Some("2030-01-01T00:01:00Z".parse().unwrap())
        );
        assert_eq!(
            token.issued_at,
            Some("2029-12-31T23:59:00Z".parse().unwrap())
        );
        let mut owner = ScgToken::new("messaging", ScgTokenSpec::new("creds"));
        owner.metadata.namespace = Some("apps".into());
        assert_eq!(token.fingerprint, chain::fingerprint(&owner, "tok-123"));
        // Without an expiry (a seed) the token is served too.
        assert!(evaluate(&secret(Some(b"seed"), &[]), &source(), now()).is_ok());
    }
}
