//! The token chain's durable state: reading the credentials and target Secrets, and the
//! compare-and-swap write of a new token into the target Secret.
//!
//! The target Secret is the home of the chain. Besides the token it carries, in
//! annotations, the token's issue and expiry times and a fingerprint of the seed the
//! chain descends from, so that after a restart the operator continues from it rather
//! than from the (revoked) seed, and notices when a human puts a new seed in place.

use std::{collections::BTreeMap, time::Duration};

use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Api, Resource, ResourceExt, api::PostParams};
use sha2::{Digest, Sha256};

use crate::{
    access::{self, CredentialsPolicy},
    crd::{
        ADOPT_TARGET_ANNOTATION, DeletionPolicy, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
        OWNER_ANNOTATION, OWNER_UID_ANNOTATION, ScgToken,
    },
    k8s::{bounded, describe},
    policy::{Descends, TokenTimes},
    scg::{self, SecretString},
};

/// Annotations of the target Secret that hold the chain's state.
pub const EXPIRES_AT: &str = "scgtoken.io/expires-at";
pub const ISSUED_AT: &str = "scgtoken.io/issued-at";
pub const SEED_FINGERPRINT: &str = "scgtoken.io/seed-fingerprint";
pub const TOKEN_FINGERPRINT: &str = "scgtoken.io/token-fingerprint";
/// The data key the token was written under, so that changing `target.tokenKey` moves
/// the token instead of losing it.
pub const TOKEN_KEY: &str = "scgtoken.io/token-key";

/// The consumer key, consumer secret and seed token of one SCG application.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub consumer_key: SecretString,
    pub consumer_secret: SecretString,
    pub seed: SecretString,
    /// Extra request headers from `headersFrom`.
    pub headers: Vec<(String, SecretString)>,
    /// The Secrets read although they are not opted in (`--credentials-policy=warn`),
    /// each described for users: what it is and how to opt it in.
    pub not_opted_in: Vec<String>,
}

/// A token and what is known of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub token: SecretString,
    pub times: TokenTimes,
    /// Fingerprint of the seed the chain descends from.
    pub seed_fingerprint: String,
}

impl Descends for Chain {
    fn seed_fingerprint(&self) -> &str {
        &self.seed_fingerprint
    }
}

/// What stands at the target Secret's name. Not `Debug`: it holds a Secret's data.
#[derive(Clone)]
pub enum Target {
    Absent,
    /// A Secret without the ownership marker: never touched.
    Foreign,
    Owned(Box<Secret>),
}

impl Target {
    /// The Secret, when it is this ScgToken's.
    pub fn owned(&self) -> Option<&Secret> {
        match self {
            Target::Owned(s) => Some(s),
            Target::Absent | Target::Foreign => None,
        }
    }

    /// The Secret, when it is this ScgToken's.
    pub fn into_owned(self) -> Option<Secret> {
        match self {
            Target::Owned(s) => Some(*s),
            Target::Absent | Target::Foreign => None,
        }
    }
}

/// Why the inputs of a chain cannot be read. Messages name Secrets and keys, never values.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Missing(String),
    /// The Secret exists and is not opted in for this ScgToken
    /// ([`access::opted_in`]); nothing of its data was looked at.
    #[error("{0}")]
    NotAllowed(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// A short salted SHA-256 fingerprint (16 hex digits) of `value`, salted with the
/// ScgToken's namespace and name: stable across restarts and re-creation of the
/// ScgToken, different for the same token in another chain, and useless for guessing
/// the token (tokens are long random strings).
pub fn fingerprint(owner: &ScgToken, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"scgtoken.io/fingerprint/v1\0");
    h.update(owner.namespace().unwrap_or_default().as_bytes());
    h.update(b"/");
    h.update(owner.name_any().as_bytes());
    h.update(b"\0");
    h.update(value.as_bytes());
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a key of a Secret gives no usable value.
enum Unusable {
    Absent,
    NotText,
    /// Empty, or only whitespace.
    Empty,
    /// Longer than [`MAX_CREDENTIAL`] bytes (the length).
    TooLarge(usize),
}

/// Longest credential or header value taken from a Secret. Credentials travel in the
/// refresh call's URL; a value this long is a file put in by mistake, and sending it
/// would fail with an error that points at the network or the API, not at the Secret.
pub const MAX_CREDENTIAL: usize = 8 * 1024;

/// The value at `key`, trimmed: trailing newlines from `kubectl create secret
/// --from-file` are not part of a token.
fn text(secret: &Secret, key: &str) -> Result<String, Unusable> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or(Unusable::Absent)?;
    let s = std::str::from_utf8(&bytes.0).map_err(|_| Unusable::NotText)?;
    let s = s.trim();
    if s.is_empty() {
        return Err(Unusable::Empty);
    }
    Ok(s.to_string())
}

fn value(secret: &Secret, key: &str) -> Option<String> {
    text(secret, key).ok()
}

/// A credential at `key` of `secret` (described by `what`), or why it cannot be used, in
/// words that name the Secret and the key, never the value.
fn credential(secret: &Secret, what: &str, key: &str) -> Result<SecretString, LoadError> {
    let len = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map_or(0, |b| b.0.len());
    let value = if len > MAX_CREDENTIAL {
        Err(Unusable::TooLarge(len))
    } else {
        text(secret, key)
    };
    value.map(SecretString::new).map_err(|why| {
        LoadError::Missing(match why {
            Unusable::Absent => format!("{what} has no key {key:?}"),
            Unusable::NotText => format!("{what} key {key:?} is not UTF-8 text"),
            Unusable::Empty => format!("{what} key {key:?} is empty"),
            Unusable::TooLarge(n) => format!(
                "{what} key {key:?} holds {n} bytes, more than a credential can \
                 (at most {MAX_CREDENTIAL})"
            ),
        })
    })
}

/// Whether `secret` (described by `what`) may be read for `owner`: opted in, or
/// `policy` is `warn` (then it is noted in `not_opted_in`). Checked before any key is
/// looked at, so that a refusal says nothing about what the Secret holds.
fn admit(
    secret: &Secret,
    what: &str,
    owner: &ScgToken,
    policy: CredentialsPolicy,
    not_opted_in: &mut Vec<String>,
) -> Result<(), LoadError> {
    let name = owner.name_any();
    if access::opted_in(secret, &name) {
        return Ok(());
    }
    let message = access::not_opted_in_message(what, &name);
    match policy {
        CredentialsPolicy::Enforce => Err(LoadError::NotAllowed(message)),
        CredentialsPolicy::Warn => {
            if !not_opted_in.contains(&message) {
                not_opted_in.push(message);
            }
            Ok(())
        }
    }
}

/// Reads the credentials Secret (and the `headersFrom` Secret, if any), each only if it
/// is opted in for `owner` or `policy` says to use it anyway.
pub async fn load_credentials(
    api: &Api<Secret>,
    owner: &ScgToken,
    policy: CredentialsPolicy,
) -> Result<Credentials, LoadError> {
    let r = &owner.spec.credentials_secret_ref;
    let secret = bounded(api.get_opt(&r.name))
        .await?
        .ok_or_else(|| LoadError::Missing(format!("credentials Secret {:?} not found", r.name)))?;
    let what = format!("credentials Secret {:?}", r.name);
    let mut not_opted_in = Vec::new();
    admit(&secret, &what, owner, policy, &mut not_opted_in)?;
    let mut credentials = Credentials {
        consumer_key: credential(&secret, &what, &r.consumer_key_key)?,
        consumer_secret: credential(&secret, &what, &r.consumer_secret_key)?,
        seed: credential(&secret, &what, &r.access_token_key)?,
        headers: Vec::new(),
        not_opted_in,
    };
    if let Some(h) = &owner.spec.headers_from {
        let secret = bounded(api.get_opt(&h.name))
            .await?
            .ok_or_else(|| LoadError::Missing(format!("headers Secret {:?} not found", h.name)))?;
        let what = format!("headers Secret {:?}", h.name);
        admit(&secret, &what, owner, policy, &mut credentials.not_opted_in)?;
        // Every key is a header: one left out silently would fail the call later with an
        // error about the credentials.
        for key in secret.data.iter().flat_map(|d| d.keys()) {
            let value = credential(&secret, &what, key)?;
            if let Some(problem) = scg::header_problem(key, value.expose()) {
                return Err(LoadError::Missing(format!("{what} key {key:?} {problem}")));
            }
            credentials.headers.push((key.clone(), value));
        }
    }
    Ok(credentials)
}

/// Reads the target Secret.
pub async fn load_target(api: &Api<Secret>, owner: &ScgToken) -> Result<Target, kube::Error> {
    Ok(match bounded(api.get_opt(&owner.target_name())).await? {
        None => Target::Absent,
        Some(s) if is_owned_by(&s, owner) => Target::Owned(Box::new(s)),
        Some(_) => Target::Foreign,
    })
}

/// Whether a Secret carries the ownership marker of this ScgToken: the operator's label,
/// the ScgToken's name, and its uid unless the Secret predates uids or the ScgToken asks
/// to adopt it ([`OWNER_UID_ANNOTATION`]).
pub fn is_owned_by(secret: &Secret, owner: &ScgToken) -> bool {
    let a = secret.annotations();
    let same_object = match (a.get(OWNER_UID_ANNOTATION), owner.uid()) {
        (Some(written), Some(uid)) => *written == uid || adopts(owner),
        _ => true,
    };
    secret.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_VALUE)
        && a.get(OWNER_ANNOTATION) == Some(&owner.name_any())
        && same_object
}

fn adopts(owner: &ScgToken) -> bool {
    owner
        .annotations()
        .get(ADOPT_TARGET_ANNOTATION)
        .map(String::as_str)
        == Some("true")
}

/// The chain stored in an owned target Secret, if it holds one.
pub fn stored_chain(secret: &Secret, owner: &ScgToken) -> Option<Chain> {
    let a = secret.annotations();
    let key = a
        .get(TOKEN_KEY)
        .cloned()
        .unwrap_or_else(|| owner.spec.target.token_key.clone());
    let time = |k: &str| a.get(k).and_then(|v| v.parse::<Timestamp>().ok());
    Some(Chain {
        token: SecretString::new(value(secret, &key)?),
        times: TokenTimes {
            issued_at: time(ISSUED_AT),
            expires_at: time(EXPIRES_AT),
        },
        seed_fingerprint: a.get(SEED_FINGERPRINT)?.clone(),
    })
}

/// The target Secret as it should be: `base` (the stored one, if any) with the chain's
/// token and state and the spec's metadata laid over it. Keys and metadata it does not
/// manage are kept.
pub fn desired_secret(owner: &ScgToken, base: Option<&Secret>, chain: &Chain) -> Secret {
    let t = &owner.spec.target;
    let mut s = base.cloned().unwrap_or_else(|| Secret {
        metadata: ObjectMeta {
            name: Some(owner.target_name()),
            namespace: owner.namespace(),
            ..ObjectMeta::default()
        },
        type_: Some(t.type_.clone().unwrap_or_else(|| "Opaque".into())),
        ..Secret::default()
    });
    let labels = s.labels_mut();
    labels.extend(t.labels.clone());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());

    let old_key = s.annotations().get(TOKEN_KEY).cloned();
    let annotations = s.annotations_mut();
    annotations.extend(t.annotations.clone());
    let mut state = BTreeMap::from([
        (OWNER_ANNOTATION, owner.name_any()),
        (SEED_FINGERPRINT, chain.seed_fingerprint.clone()),
        (TOKEN_FINGERPRINT, fingerprint(owner, chain.token.expose())),
        (TOKEN_KEY, t.token_key.clone()),
    ]);
    if let Some(uid) = owner.uid() {
        state.insert(OWNER_UID_ANNOTATION, uid);
    }
    if let Some(at) = chain.times.issued_at {
        state.insert(ISSUED_AT, at.to_string());
    }
    if let Some(at) = chain.times.expires_at {
        state.insert(EXPIRES_AT, at.to_string());
    }
    annotations.extend(state.into_iter().map(|(k, v)| (k.to_string(), v)));

    let data = s.data.get_or_insert_with(BTreeMap::new);
    if let Some(old) = old_key.filter(|k| *k != t.token_key) {
        data.remove(&old);
    }
    data.insert(
        t.token_key.clone(),
        ByteString(chain.token.expose().as_bytes().to_vec()),
    );
    if let (Some(key), Some(at)) = (&t.expiry_key, chain.times.expires_at) {
        data.insert(key.clone(), ByteString(at.to_string().into_bytes()));
    }

    let owner_ref = owner.controller_owner_ref(&()).map(|mut r| {
        // Deleting the ScgToken must not wait for the Secret.
        r.block_owner_deletion = None;
        r
    });
    let refs = s.metadata.owner_references.get_or_insert_with(Vec::new);
    let uid = owner.uid();
    refs.retain(|r: &OwnerReference| Some(&r.uid) != uid.as_ref());
    if let (DeletionPolicy::Delete, Some(r)) = (t.deletion_policy, owner_ref) {
        refs.push(r);
    }
    if refs.is_empty() {
        s.metadata.owner_references = None;
    }
    s
}

/// Why a write of the target Secret did not land.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("Secret {0:?} exists and is not managed by this ScgToken")]
    Foreign(String),
    /// A token issued after this one is already stored: this one is obsolete.
    #[error("Secret {0:?} already holds a newer token")]
    Superseded(String),
    #[error("writing Secret {name:?} failed: {}", describe(source))]
    Kube {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Attempts of one [`persist`] call; the caller keeps the token and retries later.
const WRITE_ATTEMPTS: u32 = 4;

/// Writes `chain` into the target Secret with compare-and-swap on the resourceVersion
/// of `read` (the Secret as read before the refresh call). A conflict means someone else
/// changed the Secret; since the token just received is the only valid one, it is laid
/// over the fresh copy and written again. Retried quickly a few times.
pub async fn persist(
    api: &Api<Secret>,
    owner: &ScgToken,
    read: Option<&Secret>,
    chain: &Chain,
) -> Result<Secret, PersistError> {
    let name = owner.target_name();
    let mut current = read.cloned();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let desired = desired_secret(owner, current.as_ref(), chain);
        let result = match &current {
            Some(_) => bounded(api.replace(&name, &PostParams::default(), &desired)).await,
            None => bounded(api.create(&PostParams::default(), &desired)).await,
        };
        let err = match result {
            Ok(written) => return Ok(written),
            Err(e) => e,
        };
        if attempt >= WRITE_ATTEMPTS {
            return Err(PersistError::Kube { name, source: err });
        }
        let code = match &err {
            kube::Error::Api(s) => Some(s.code),
            _ => None,
        };
        if !matches!(code, Some(404 | 409)) {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        // Re-read: a conflict, a vanished Secret or a failed write all want a fresh copy.
        current = match bounded(api.get_opt(&name)).await {
            Ok(Some(s)) if is_owned_by(&s, owner) => {
                // Never lay an older token over a newer one (an old leader finishing late).
                let stored = stored_chain(&s, owner).and_then(|c| c.times.issued_at);
                if stored.is_some()
                    && chain.times.issued_at.is_some()
                    && stored > chain.times.issued_at
                {
                    return Err(PersistError::Superseded(name));
                }
                Some(s)
            }
            Ok(Some(_)) => return Err(PersistError::Foreign(name)),
            Ok(None) => None,
            Err(_) => current,
        };
    }
}

/// Brings an existing target Secret's metadata (labels, annotations, owner reference)
/// in line with the spec. Writes only when something differs; returns what it wrote.
pub async fn sync_metadata(
    api: &Api<Secret>,
    owner: &ScgToken,
    secret: &Secret,
    chain: &Chain,
) -> Result<Option<Secret>, PersistError> {
    if desired_secret(owner, Some(secret), chain) == *secret {
        return Ok(None);
    }
    persist(api, owner, Some(secret), chain).await.map(Some)
}
