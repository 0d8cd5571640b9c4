//! The target Secret as `spec.target` describes it, checked before any refresh. The API
//! server refuses a bad name, key, label or type only when the Secret is written, and by
//! then a new token has been received and the old one may be revoked: the new token
//! would be held in memory with nowhere to go.

use super::InvalidSpec;
use crate::{
    access::{ALLOWED_SCGTOKENS_ANNOTATION, CREDENTIALS_LABEL},
    crd::TargetSpec,
};

/// Checks `spec.target` by the rules the API server applies to a Secret it is given.
pub fn check(t: &TargetSpec) -> Result<(), InvalidSpec> {
    let invalid = |message: String| Err(InvalidSpec(message));
    if let Some(name) = &t.name
        && !is_subdomain(name)
    {
        return invalid(format!(
            "target name {name:?} is not a valid Secret name: at most 253 lowercase letters, \
             digits, '-' and '.', each part between dots starting and ending with a letter or \
             digit"
        ));
    }
    for (field, key) in [
        ("tokenKey", Some(&t.token_key)),
        ("expiryKey", t.expiry_key.as_ref()),
    ] {
        if let Some(key) = key
            && !is_secret_key(key)
        {
            return invalid(format!(
                "target {field} {key:?} is not a valid Secret key: letters, digits, '-', '_' \
                 and '.', at most 253"
            ));
        }
    }
    if t.expiry_key.as_ref() == Some(&t.token_key) {
        return invalid(format!(
            "target expiryKey {:?} must differ from tokenKey: the expiry would overwrite the token",
            t.token_key
        ));
    }
    for (key, value) in &t.labels {
        if !is_qualified_name(key) {
            return invalid(format!("target label {key:?} is not a valid label key"));
        }
        if !(value.is_empty() || is_name_part(value)) {
            return invalid(format!(
                "target label {key:?} has a value that is not a valid label value: at most 63 \
                 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
            ));
        }
    }
    // The operator writes the target: it must not opt a Secret in on anyone's behalf.
    if t.labels.contains_key(CREDENTIALS_LABEL)
        || t.annotations.contains_key(ALLOWED_SCGTOKENS_ANNOTATION)
    {
        return invalid(format!(
            "target labels and annotations may not set {CREDENTIALS_LABEL} or \
             {ALLOWED_SCGTOKENS_ANNOTATION}: only someone who can write a Secret opts it in \
             as credentials"
        ));
    }
    if let Some(key) = t.annotations.keys().find(|k| !is_qualified_name(k)) {
        return invalid(format!(
            "target annotation {key:?} is not a valid annotation key"
        ));
    }
    not_squatting(t)
}

/// Domains whose Secret types, labels and annotations belong to Kubernetes, Helm or this
/// operator. Their controllers trust a Secret by its type and metadata: a ScgToken's
/// author must not be able to make the operator write a Secret that Helm takes for a
/// release, or one that carries another target's ownership marker.
const RESERVED_DOMAINS: [&str; 4] = ["kubernetes.io", "k8s.io", "helm.sh", "scgtoken.io"];

/// Name prefix of Helm's release Secrets.
const HELM_RELEASE_PREFIX: &str = "sh.helm.release.";

fn is_reserved(domain: &str) -> bool {
    RESERVED_DOMAINS
        .iter()
        .any(|d| domain == *d || domain.strip_suffix(d).is_some_and(|sub| sub.ends_with('.')))
}

/// The target stays a Secret of its own kind: no reserved type, name, label or
/// annotation. Kubernetes' recommended `app.kubernetes.io/` labels are the users', except
/// `managed-by`, which the operator sets.
fn not_squatting(t: &TargetSpec) -> Result<(), InvalidSpec> {
    if let Some(name) = t
        .name
        .as_deref()
        .filter(|n| n.starts_with(HELM_RELEASE_PREFIX))
    {
        return Err(InvalidSpec(format!(
            "target name {name:?} is reserved for Helm's release Secrets"
        )));
    }
    let keys = t.labels.keys().map(|k| ("label", k));
    let keys = keys.chain(t.annotations.keys().map(|k| ("annotation", k)));
    for (what, key) in keys {
        let Some((prefix, name)) = key.split_once('/') else {
            continue;
        };
        let recommended = prefix == "app.kubernetes.io" && name != "managed-by";
        if is_reserved(prefix) && !recommended {
            return Err(InvalidSpec(format!(
                "target {what} {key:?} has the reserved prefix {prefix}/: it belongs to \
                 Kubernetes, Helm or this operator"
            )));
        }
    }
    let Some(type_) = t.type_.as_deref() else {
        return Ok(());
    };
    if type_
        .split_once('/')
        .is_some_and(|(domain, _)| is_reserved(domain))
    {
        return Err(InvalidSpec(format!(
            "target type {type_:?} belongs to Kubernetes or Helm, whose controllers trust \
             Secrets of that type; leave it unset (Opaque) or use a type of your own such as \
             example.com/scg-token"
        )));
    }
    Ok(())
}

/// A DNS-1123 subdomain, as Secret (and pod) names must be.
pub(crate) fn is_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// A key of a Secret's data.
fn is_secret_key(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && s != "."
        && !s.starts_with("..")
}

/// A label or annotation key: an optional DNS subdomain prefix and `/`, then a name.
fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_subdomain(prefix) && is_name_part(name),
        None => is_name_part(s),
    }
}

/// The name part of a qualified name, and any non-empty label value.
fn is_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(f: impl FnOnce(&mut TargetSpec)) -> TargetSpec {
        let mut t = TargetSpec::default();
        f(&mut t);
        t
    }

    #[test]
    fn accepts_what_the_api_server_accepts() {
        let good = [
            target(|_| {}),
            target(|t| {
                t.name = Some("scg-token.messaging".into());
                t.token_key = "token".into();
                t.expiry_key = Some("expires_at".into());
                t.labels
                    .insert("app.kubernetes.io/part-of".into(), "sms".into());
                t.labels.insert("empty".into(), String::new());
                t.annotations
                    .insert("reloader.stakater.com/match".into(), "true".into());
                t.type_ = Some("example.com/scg-token".into());
            }),
            target(|t| t.type_ = Some("Opaque".into())),
            target(|t| {
                t.name = Some("sh.helm.releases-of-mine".into());
                t.labels.insert("owner".into(), "helm".into());
                t.labels
                    .insert("example.io/kubernetes.io".into(), "x".into());
                t.annotations
                    .insert("notkubernetes.io/x".into(), "y".into());
            }),
        ];
        for t in good {
            assert_eq!(check(&t), Ok(()), "{t:?}");
        }
    }

    #[test]
    fn refuses_what_the_api_server_would_refuse_at_the_write() {
        let bad = [
            ("name", target(|t| t.name = Some("Bad_Name".into()))),
            ("name", target(|t| t.name = Some("-a".into()))),
            ("name", target(|t| t.name = Some("a..b".into()))),
            ("name", target(|t| t.name = Some("a".repeat(254)))),
            ("tokenKey", target(|t| t.token_key = "a b".into())),
            ("tokenKey", target(|t| t.token_key = "..a".into())),
            ("tokenKey", target(|t| t.token_key = String::new())),
            ("expiryKey", target(|t| t.expiry_key = Some("a/b".into()))),
            (
                "must differ",
                target(|t| t.expiry_key = Some("accessToken".into())),
            ),
            (
                "label key",
                target(|t| drop(t.labels.insert("a b".into(), "v".into()))),
            ),
            (
                "label value",
                target(|t| drop(t.labels.insert("team".into(), "-x".into()))),
            ),
            (
                "label value",
                target(|t| drop(t.labels.insert("team".into(), "x".repeat(64)))),
            ),
            (
                "annotation",
                target(|t| drop(t.annotations.insert("/x".into(), "v".into()))),
            ),
        ];
        for (want, t) in bad {
            let err = check(&t).expect_err(want).0;
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn refuses_a_target_that_passes_for_another_tools_secret() {
        let type_ = |v: &str| {
            let v = v.to_string();
            target(move |t| t.type_ = Some(v))
        };
        let label = |k: &str| {
            let k = k.to_string();
            target(move |t| drop(t.labels.insert(k, "x".into())))
        };
        let annotation = |k: &str| {
            let k = k.to_string();
            target(move |t| drop(t.annotations.insert(k, "x".into())))
        };
        let bad = [
            ("belongs to Kubernetes or Helm", type_("helm.sh/release.v1")),
            ("belongs to Kubernetes or Helm", type_("kubernetes.io/tls")),
            (
                "belongs to Kubernetes or Helm",
                type_("kubernetes.io/basic-auth"),
            ),
            (
                "only someone who can write a Secret",
                target(|t| drop(t.labels.insert(CREDENTIALS_LABEL.into(), "true".into()))),
            ),
            (
                "only someone who can write a Secret",
                target(|t| {
                    let key = ALLOWED_SCGTOKENS_ANNOTATION.into();
                    drop(t.annotations.insert(key, "other".into()))
                }),
            ),
            (
                "belongs to Kubernetes or Helm",
                type_("kubernetes.io/service-account-token"),
            ),
            (
                "belongs to Kubernetes or Helm",
                type_("bootstrap.kubernetes.io/token"),
            ),
            (
                "reserved for Helm",
                target(|t| t.name = Some("sh.helm.release.v1.payments.v9".into())),
            ),
            ("reserved prefix helm.sh/", label("helm.sh/chart")),
            (
                "reserved prefix app.kubernetes.io/",
                label("app.kubernetes.io/managed-by"),
            ),
            (
                "reserved prefix kubernetes.io/",
                label("kubernetes.io/service-account.name"),
            ),
            ("reserved prefix node.k8s.io/", label("node.k8s.io/x")),
            (
                "reserved prefix meta.helm.sh/",
                annotation("meta.helm.sh/release-name"),
            ),
            (
                "reserved prefix scgtoken.io/",
                annotation("scgtoken.io/owner"),
            ),
            (
                "reserved prefix scgtoken.io/",
                annotation("scgtoken.io/owner-uid"),
            ),
        ];
        for (want, t) in bad {
            let err = check(&t).expect_err(want).0;
            assert!(err.contains(want), "{err:?} should mention {want:?}");
            assert!(!err.contains("  "), "{err:?} reads as one sentence");
        }
    }
}
