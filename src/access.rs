//! What one team's ScgToken may make the operator use. The operator reads Secrets and
//! makes HTTPS calls with more power than the people who create ScgTokens: a ScgToken's
//! author must not be able to make it read a Secret that was not given to it, or send
//! anything to a host its installer did not allow. Pure rules; the reconciler applies
//! them.
//!
//! - Credentials are opted in by whoever can write the Secret: the label
//!   [`CREDENTIALS_LABEL`]` = "true"` (any ScgToken of the namespace may use it), or the
//!   annotation [`ALLOWED_SCGTOKENS_ANNOTATION`] naming the ScgTokens that may.
//! - Endpoints: the host (and port) of `spec.endpoint` must be in the operator's
//!   `--allowed-endpoints`.

use std::fmt;

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::ResourceExt;

use crate::scg::Endpoint;

/// Label that opts a Secret in as credentials (`credentialsSecretRef`) or extra headers
/// (`headersFrom`) for every ScgToken of its namespace, with the value `"true"`.
pub const CREDENTIALS_LABEL: &str = "scgtoken.io/credentials";
/// Annotation that opts a Secret in for the ScgTokens it names (comma-separated names
/// of ScgTokens in the Secret's namespace), e.g. `"messaging,voice"`.
pub const ALLOWED_SCGTOKENS_ANNOTATION: &str = "scgtoken.io/allowed-scgtokens";
/// The host of the Syniverse SCG API, the one `--allowed-endpoints` allows by default.
pub const DEFAULT_ALLOWED_ENDPOINTS: &str = "api.syniverse.com";

/// Whether `secret` was opted in for the ScgToken named `scgtoken` (in its namespace).
/// Neither the label nor the annotation can be set by the operator on anyone's behalf:
/// only someone who can write the Secret opts it in.
pub fn opted_in(secret: &Secret, scgtoken: &str) -> bool {
    if secret.labels().get(CREDENTIALS_LABEL).map(String::as_str) == Some("true") {
        return true;
    }
    secret
        .annotations()
        .get(ALLOWED_SCGTOKENS_ANNOTATION)
        .is_some_and(|names| names.split(',').any(|n| n.trim() == scgtoken))
}

/// Opts a Secret in for every ScgToken of its namespace: sets [`CREDENTIALS_LABEL`].
/// For the code that creates credentials Secrets (tests, the demo, benchmarks).
pub fn opt_in(meta: &mut ObjectMeta) {
    meta.labels
        .get_or_insert_with(Default::default)
        .insert(CREDENTIALS_LABEL.into(), "true".into());
}

/// What a user reads when a Secret is not opted in: which Secret, why, how to fix it.
pub fn not_opted_in_message(what: &str, scgtoken: &str) -> String {
    format!(
        "{what} is not opted in for use by the operator: label it \
         {CREDENTIALS_LABEL}=true, or annotate it {ALLOWED_SCGTOKENS_ANNOTATION}={scgtoken:?} \
         (only someone who can write the Secret can)"
    )
}

/// What the operator does with a Secret that is not opted in (`--credentials-policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CredentialsPolicy {
    /// Refuse it: `Ready` is `False` with reason `CredentialsNotAllowed`, no call is made.
    #[default]
    Enforce,
    /// Use it, and say so: condition `CredentialsAllowed` `False`, a Warning Event, and
    /// the `scgtoken_credentials_not_allowed` metric. For upgrades from a version that
    /// had no opt-in, until every credentials Secret is labelled.
    Warn,
}

/// One entry of `--allowed-endpoints`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// This host exactly (a DNS name in lower case, an IPv4 address, or an IPv6 address
    /// in brackets, as a URL spells them).
    Exact(String),
    /// Any host whose name ends in `.` and this (from `*.example.com`); never the name
    /// itself, never an IP address.
    Below(String),
}

/// A host pattern and, optionally, the one port it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    host: HostPattern,
    /// `None`: any port.
    port: Option<u16>,
}

/// The hosts refresh calls may go to: the operator's `--allowed-endpoints`, a
/// comma-separated list of `host` or `host:port` entries.
///
/// - A host alone allows every port of it (as `NO_PROXY` entries do); `host:port` only
///   that port. A URL's default port is explicit here: `api.example.com:443` allows
///   `https://api.example.com/...` but not `https://api.example.com:8443/...`.
/// - A leading `*.` allows every name below a domain, at any depth: `*.example.com`
///   allows `a.example.com` and `a.b.example.com`, not `example.com` itself. No other
///   wildcard exists; `*` alone is refused (it would allow every host).
/// - Names compare as URLs spell them: in lower case, IDNA-encoded. IP addresses compare
///   by value (`127.0.0.1`, `[::1]`). A name never matches the address it resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedEndpoints(Vec<Allowed>);

impl Default for AllowedEndpoints {
    /// The Syniverse SCG API host, any port.
    fn default() -> Self {
        AllowedEndpoints(vec![Allowed {
            host: HostPattern::Exact(DEFAULT_ALLOWED_ENDPOINTS.into()),
            port: None,
        }])
    }
}

impl AllowedEndpoints {
    /// Parses `--allowed-endpoints`. The error names the entry and what is wrong with it.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            entries.push(parse_entry(entry).map_err(|why| {
                format!("--allowed-endpoints: {entry:?} {why}; expected host or host:port")
            })?);
        }
        if entries.is_empty() {
            return Err("--allowed-endpoints: no host given".into());
        }
        Ok(AllowedEndpoints(entries))
    }

    /// Whether a refresh call may go to `endpoint`; the error says why not, naming the
    /// flag that would allow it.
    pub fn check(&self, endpoint: &Endpoint) -> Result<(), String> {
        let (host, port) = endpoint.host_port();
        if self.0.iter().any(|a| a.allows(host, port)) {
            return Ok(());
        }
        Err(format!(
            "endpoint host {host}:{port} is not allowed by the operator's \
             --allowed-endpoints ({self}); whoever runs the operator can add it"
        ))
    }
}

impl fmt::Display for AllowedEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match &a.host {
                HostPattern::Exact(h) => f.write_str(h)?,
                HostPattern::Below(d) => write!(f, "*.{d}")?,
            }
            if let Some(p) = a.port {
                write!(f, ":{p}")?;
            }
        }
        Ok(())
    }
}

impl Allowed {
    fn allows(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match &self.host {
            HostPattern::Exact(h) => h == host,
            HostPattern::Below(domain) => {
                // An IP address is never "below" a domain.
                let is_ip = host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok();
                !is_ip
                    && host
                        .strip_suffix(domain.as_str())
                        .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.'))
            }
        }
    }
}

/// One `host` or `host:port` entry, with an optional leading `*.`.
fn parse_entry(entry: &str) -> Result<Allowed, &'static str> {
    if entry.contains("://") || entry.contains(['/', '?', '#', '@']) {
        return Err("is not a host (give the host of the URL, not the URL)");
    }
    let (wildcard, rest) = match entry.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, entry),
    };
    if rest.contains('*') {
        return Err("has a wildcard other than a leading \"*.\"");
    }
    let (host, port) = split_port(rest)?;
    // The URL parser spells the host as endpoints are spelled: lower case, IDNA,
    // canonical addresses.
    let url = reqwest::Url::parse(&format!("https://{host}/")).map_err(|_| "is not a host")?;
    let host = url.host_str().ok_or("is not a host")?.to_string();
    let is_ip = host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok();
    let host = match (wildcard, is_ip) {
        (true, true) => return Err("puts a wildcard before an IP address"),
        (true, false) => HostPattern::Below(host),
        (false, _) => HostPattern::Exact(host),
    };
    Ok(Allowed { host, port })
}

/// Splits `host:port`; a bare IPv6 address has colons but no port (`[::1]:443` has one).
fn split_port(s: &str) -> Result<(&str, Option<u16>), &'static str> {
    let candidate = match s.rsplit_once(':') {
        Some((h, p)) if s.starts_with('[') && h.ends_with(']') => Some((h, p)),
        Some((h, p)) if !h.contains(':') => Some((h, p)),
        _ => None,
    };
    match candidate {
        Some((host, port)) => {
            let port = port
                .parse::<u16>()
                .map_err(|_| "has a port that is not a number")?;
            if port == 0 {
                return Err("has port 0");
            }
            Ok((host, Some(port)))
        }
        // A bare IPv6 address: which colon would start a port?
        None if s.contains(':') && !s.starts_with('[') => {
            Err("is an IPv6 address without brackets (write [::1] or [::1]:443)")
        }
        None => Ok((s, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Endpoint {
        Endpoint::parse(url, true).unwrap()
    }

    #[test]
    fn allowed_endpoints_match_hosts_ports_and_wildcards() {
        // (list, endpoint, allowed)
        #[rustfmt::skip]
        let table = [
            ("api.syniverse.com", "https://api.syniverse.com/apptoken-refresh", true),
            ("api.syniverse.com", "https://api.syniverse.com:8443/x", true),
            ("API.Syniverse.com", "https://api.syniverse.com/x", true),
            ("api.syniverse.com", "https://api.syniverse.com.evil.example/x", false),
            ("api.syniverse.com", "https://evil.example/api.syniverse.com", false),
            ("api.syniverse.com", "https://xapi.syniverse.com/x", false),
            ("api.syniverse.com:443", "https://api.syniverse.com/x", true),
            ("api.syniverse.com:443", "https://api.syniverse.com:8443/x", false),
            ("api.syniverse.com:80", "http://api.syniverse.com/x", true),
            ("*.syniverse.com", "https://api.syniverse.com/x", true),
            ("*.syniverse.com", "https://a.b.syniverse.com/x", true),
            ("*.syniverse.com", "https://syniverse.com/x", false),
            ("*.syniverse.com", "https://evilsyniverse.com/x", false),
            ("*.syniverse.com:443", "https://api.syniverse.com:444/x", false),
            ("127.0.0.1", "https://127.0.0.1:9443/x", true),
            ("127.0.0.1", "https://localhost:9443/x", false),
            ("localhost", "https://127.0.0.1:9443/x", false),
            ("127.0.0.1:9443", "https://127.0.0.1:9444/x", false),
            ("[::1]", "https://[::1]:9443/x", true),
            ("[::1]:9443", "https://[0:0::1]:9443/x", true),
            ("[::1]:9443", "https://127.0.0.1:9443/x", false),
            (" a.example , b.example ", "https://b.example/x", true),
            ("a.example", "https://b.example/x", false),
        ];
        for (list, url, want) in table {
            let allowed = AllowedEndpoints::parse(list).unwrap();
            assert_eq!(
                allowed.check(&endpoint(url)).is_ok(),
                want,
                "{list} / {url}"
            );
        }
        assert!(
            AllowedEndpoints::default()
                .check(&endpoint("https://api.syniverse.com/v1/apptoken-refresh"))
                .is_ok()
        );
        assert!(
            AllowedEndpoints::default()
                .check(&endpoint("https://127.0.0.1/x"))
                .is_err()
        );
    }

    #[test]
    fn a_refusal_names_the_host_and_the_flag() {
        let allowed = AllowedEndpoints::parse("api.syniverse.com,*.scg.example:443").unwrap();
        let err = allowed
            .check(&endpoint("https://10.0.0.5:8443/x"))
            .unwrap_err();
        assert!(err.contains("10.0.0.5:8443"), "{err}");
        assert!(
            err.contains("--allowed-endpoints (api.syniverse.com,*.scg.example:443)"),
            "{err}"
        );
    }

    #[test]
    fn bad_lists_are_refused_with_the_entry_named() {
        for (list, why) in [
            ("", "no host given"),
            (" , ", "no host given"),
            ("*", "wildcard other than"),
            ("*.", "is not a host"),
            ("a.*.example", "wildcard other than"),
            ("*.127.0.0.1", "wildcard before an IP address"),
            ("https://api.syniverse.com", "not the URL"),
            ("api.syniverse.com/x", "not the URL"),
            ("user@api.syniverse.com", "not the URL"),
            ("api.syniverse.com:https", "port that is not a number"),
            ("api.syniverse.com:0", "port 0"),
            ("api.syniverse.com:70000", "port that is not a number"),
            ("::1", "without brackets"),
            ("bad host", "is not a host"),
        ] {
            let err = AllowedEndpoints::parse(list).unwrap_err();
            assert!(err.contains(why), "{list:?}: {err}");
            assert!(err.starts_with("--allowed-endpoints"), "{err}");
        }
    }

    #[test]
    fn a_secret_is_opted_in_by_its_label_or_by_name() {
        let secret = |labels: &[(&str, &str)], annotations: &[(&str, &str)]| {
            let map = |kv: &[(&str, &str)]| {
                Some(
                    kv.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            };
            Secret {
                metadata: ObjectMeta {
                    labels: map(labels),
                    annotations: map(annotations),
                    ..Default::default()
                },
                ..Default::default()
            }
        };
        let a = ALLOWED_SCGTOKENS_ANNOTATION;
        #[rustfmt::skip]
        let table = [
            (secret(&[], &[]), false),
            (secret(&[(CREDENTIALS_LABEL, "true")], &[]), true),
            (secret(&[(CREDENTIALS_LABEL, "True")], &[]), false),
            (secret(&[(CREDENTIALS_LABEL, "yes")], &[]), false),
            // A label of that name is no annotation, and the other way round.
            (secret(&[], &[(CREDENTIALS_LABEL, "true")]), false),
            (secret(&[(a, "messaging")], &[]), false),
            (secret(&[], &[(a, "messaging")]), true),
            (secret(&[], &[(a, "voice, messaging")]), true),
            (secret(&[], &[(a, "voice,messaging-2")]), false),
            (secret(&[], &[(a, "*")]), false),
            (secret(&[], &[(a, "")]), false),
        ];
        for (i, (s, want)) in table.into_iter().enumerate() {
            assert_eq!(opted_in(&s, "messaging"), want, "row {i}");
        }
        let mut meta = ObjectMeta::default();
        opt_in(&mut meta);
        let s = Secret {
            metadata: meta,
            ..Default::default()
        };
        assert!(opted_in(&s, "anything"));
    }
}
