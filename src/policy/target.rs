//! The target Secret as `spec.target` describes it, checked before any refresh. The API
//! server refuses a bad name, key, label or type only when the Secret is written, and by
//! then a new token has been received and the old one may be revoked: the new token
//! would be held in memory with nowhere to go.

use super::InvalidSpec;
use crate::crd::TargetSpec;

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
    if let Some(key) = t.annotations.keys().find(|k| !is_qualified_name(k)) {
        return invalid(format!(
            "target annotation {key:?} is not a valid annotation key"
        ));
    }
    fits_type(t)
}

/// The built-in Secret types require keys of their own; the operator writes only the
/// token key and the expiry key.
fn fits_type(t: &TargetSpec) -> Result<(), InvalidSpec> {
    let Some(type_) = t.type_.as_deref() else {
        return Ok(());
    };
    let written = |k: &str| t.token_key == k || t.expiry_key.as_deref() == Some(k);
    let fits = match type_ {
        "kubernetes.io/basic-auth" => written("username") || written("password"),
        "kubernetes.io/ssh-auth" => written("ssh-privatekey"),
        "kubernetes.io/tls" => written("tls.crt") && written("tls.key"),
        "kubernetes.io/service-account-token"
        | "kubernetes.io/dockercfg"
        | "kubernetes.io/dockerconfigjson"
        | "bootstrap.kubernetes.io/token" => false,
        _ => true,
    };
    if fits {
        return Ok(());
    }
    Err(InvalidSpec(format!(
        "target type {type_:?} needs data the operator does not write; leave it unset \
         (Opaque) or use a type of your own such as example.com/scg-token"
    )))
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
                t.type_ = Some("kubernetes.io/basic-auth".into());
                t.token_key = "password".into();
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
            (
                "needs data",
                target(|t| t.type_ = Some("kubernetes.io/tls".into())),
            ),
            (
                "needs data",
                target(|t| t.type_ = Some("kubernetes.io/dockerconfigjson".into())),
            ),
            (
                "needs data",
                target(|t| t.type_ = Some("kubernetes.io/basic-auth".into())),
            ),
        ];
        for (want, t) in bad {
            let err = check(&t).expect_err(want).0;
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
