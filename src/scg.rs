//! The SCG token-refresh API: the [`TokenApi`] trait, its reqwest implementation, the
//! classification of outcomes, and credential types that cannot be printed.
//!
//! The refresh call carries the consumer secret and the current token in its query
//! string, so nothing here ever formats a request URL, a response body or a credential:
//! errors are built from static text and status codes only.
//!
//! The client trusts the platform's root certificates plus, optionally, a CA bundle
//! ([`HttpTokenApi::with_ca_bundle`]), and takes its egress proxy from the usual
//! environment variables (`HTTPS_PROXY`, `NO_PROXY`, …) when it is built.

use std::{fmt, path::Path, time::Duration};

use futures::future::BoxFuture;
use reqwest::{Url, header::HeaderName};
use serde::Deserialize;

/// A credential or token. `Debug` prints `[redacted]`; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: impl Into<String>) -> Self {
        SecretString(s.into())
    }
    /// The secret itself, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Why an endpoint that is not an http(s) URL is refused; the CRD's rule says the same.
const ENDPOINT_PREFIX: &str =
    "endpoint must be an http(s) URL, starting with https:// (or http://) in lower case";

/// A validated refresh endpoint. Its `Debug` shows only scheme, host and path.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Endpoint(Url);

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.0.scheme(),
            self.0.host_str().unwrap_or(""),
            self.0.path()
        )
    }
}

impl Endpoint {
    /// The host as the URL spells it (lower case, IPv6 in brackets) and the port the
    /// call goes to (the scheme's default when none is given).
    pub fn host_port(&self) -> (&str, u16) {
        (
            self.0.host_str().unwrap_or(""),
            self.0.port_or_known_default().unwrap_or(0),
        )
    }

    /// Checks a `spec.endpoint`. Plain http is accepted only with `allow_insecure`.
    pub fn parse(s: &str, allow_insecure: bool) -> Result<Endpoint, String> {
        // The input is not echoed: a malformed URL may carry credentials.
        // The CRD's rule checks the same prefix: both refuse `HTTPS://`, though a URL
        // parser would take it, so that no object is refused by one and not the other.
        if !(s.starts_with("https://") || s.starts_with("http://")) {
            return Err(ENDPOINT_PREFIX.into());
        }
        let url = Url::parse(s).map_err(|_| "endpoint is not a valid URL".to_string())?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("endpoint must not carry credentials".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("endpoint must not have a query or fragment".into());
        }
        match url.scheme() {
            "https" => Ok(Endpoint(url)),
            "http" if allow_insecure => Ok(Endpoint(url)),
            "http" => Err(
                "endpoint uses plain http, which would send the consumer secret unencrypted; \
                 use https (or run the operator with --allow-insecure-endpoints for tests)"
                    .into(),
            ),
            _ => Err(ENDPOINT_PREFIX.into()),
        }
    }
}

/// Headers an extra header may not set: they frame the request or choose the host it
/// goes to (a `Host` of the user's choosing sends the credentials to another virtual
/// host; a `Content-Length` on a bodiless GET stalls the server or splits the request).
const RESERVED_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

/// Why `name: value` cannot be an extra header of the refresh call, if it cannot. The
/// answer never quotes the value.
pub fn header_problem(name: &str, value: &str) -> Option<&'static str> {
    let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
        return Some("is not a valid HTTP header name");
    };
    if RESERVED_HEADERS.contains(&header.as_str()) {
        return Some("names a header the operator sets itself (it frames or routes the request)");
    }
    if reqwest::header::HeaderValue::from_str(value).is_err() {
        return Some("is not a valid HTTP header value");
    }
    None
}

/// One refresh call's inputs.
#[derive(Debug)]
pub struct RefreshRequest<'a> {
    pub endpoint: &'a Endpoint,
    pub consumer_key: &'a SecretString,
    pub consumer_secret: &'a SecretString,
    pub old_token: &'a SecretString,
    pub validity: Duration,
    /// Extra headers (e.g. a cookie); values are secret.
    pub headers: &'a [(String, SecretString)],
    pub timeout: Duration,
}

/// A new token and the lifetime the API gave it.
#[derive(Debug, Clone)]
pub struct Refreshed {
    pub token: SecretString,
    pub lifetime: Duration,
}

/// Why a refresh call got no answer, as status and Events tell it: a class, never the
/// remote side's words. The endpoint is chosen by whoever writes the ScgToken, so what a
/// failed call shows must not make the operator a probe of hosts and ports (which
/// certificate, which socket error, which bytes came back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// The TLS handshake failed (an untrusted or wrong certificate, a TLS alert).
    Tls,
    /// The endpoint's host name did not resolve.
    Dns,
    /// No connection could be opened (refused, unreachable, connect timeout).
    Connect,
    /// The egress proxy (`HTTPS_PROXY`) asked for credentials it did not get.
    ProxyAuth,
    /// The egress proxy did not open a tunnel for another reason.
    Proxy,
    /// The connection broke before the whole response arrived.
    BrokeOff,
    /// An extra header from `headersFrom` could not be sent.
    Header,
    /// Anything else on the way.
    Other,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unreachable::Tls => {
                "TLS handshake failed (if the endpoint, or an egress proxy that inspects \
                 TLS, uses a private CA, the operator needs it in --ca-bundle; its log \
                 says which check failed)"
            }
            Unreachable::Dns => "the endpoint's host name could not be resolved",
            Unreachable::Connect => "connection failed",
            Unreachable::ProxyAuth => {
                "the egress proxy did not open a tunnel: proxy authorization required \
                 (check the user and password in HTTPS_PROXY)"
            }
            Unreachable::Proxy => "the egress proxy did not open a tunnel",
            Unreachable::BrokeOff => "the response broke off",
            Unreachable::Header => "an extra header from headersFrom is invalid",
            Unreachable::Other => "the request failed",
        })
    }
}

/// A call that got no answer: its class, and the HTTP client's words for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportFailure {
    pub class: Unreachable,
    /// What the HTTP client said, for the operator's log only ([`RefreshError::detail`]):
    /// never a URL, but possibly the remote side's words.
    pub detail: Option<String>,
}

/// Why a refresh call failed. Messages hold no URL, body or credential, and what they
/// say of the remote side is a class: the HTTP status, [`Unreachable`], a timeout, or
/// which part of a 2xx body is not a token response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    #[error(
        "the SCG API rejected the refresh with HTTP {status}: the consumer key, consumer secret or current token is wrong or revoked"
    )]
    Rejected { status: u16 },
    #[error("the SCG API is rate limiting refreshes (HTTP 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the SCG API answered HTTP {status}")]
    Unavailable {
        status: u16,
        /// A 503's `Retry-After`, in seconds.
        retry_after: Option<Duration>,
    },
    #[error("the refresh call got no answer within {0:?}")]
    Timeout(Duration),
    #[error("the SCG API could not be reached: {}", .0.class)]
    Transport(TransportFailure),
    #[error("the SCG API answered with a body that is not a token response: {0}")]
    InvalidResponse(&'static str),
}

impl RefreshError {
    /// Bounded label for metrics and Event reasons.
    pub fn label(&self) -> &'static str {
        match self {
            RefreshError::Rejected { .. } => "rejected",
            RefreshError::RateLimited { .. } => "rate_limited",
            RefreshError::Unavailable { .. } => "unavailable",
            RefreshError::Timeout(_) => "timeout",
            RefreshError::Transport(_) => "transport",
            RefreshError::InvalidResponse(_) => "invalid_response",
        }
    }

    /// The message with the HTTP client's detail, for the operator's own log line.
    pub fn detail(&self) -> String {
        match self {
            RefreshError::Transport(TransportFailure {
                detail: Some(d), ..
            }) => format!("{self} ({d})"),
            other => other.to_string(),
        }
    }

    fn transport(class: Unreachable, detail: Option<String>) -> Self {
        RefreshError::Transport(TransportFailure { class, detail })
    }
}

/// The token API. Tests replace it with a fake.
pub trait TokenApi: Send + Sync {
    fn refresh<'a>(
        &'a self,
        req: &'a RefreshRequest<'a>,
    ) -> BoxFuture<'a, Result<Refreshed, RefreshError>>;
}

/// Longest lifetime taken from a response (ten years).
const MAX_LIFETIME_SECS: i64 = 10 * 366 * 24 * 3600;

/// Largest response body read; anything bigger is not a token response.
const MAX_BODY: usize = 64 * 1024;

/// Why the HTTP client could not be set up. Raised at start-up only.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("CA bundle {path} (--ca-bundle, SCG_CA_BUNDLE): {problem}")]
    CaBundle { path: String, problem: String },
    #[error("the HTTP client could not be built: {0}")]
    Build(String),
}

/// Reads a PEM file of one or more CA certificates.
pub(crate) fn read_ca_bundle(path: &Path) -> Result<Vec<reqwest::Certificate>, ClientError> {
    let fail = |problem: String| ClientError::CaBundle {
        path: path.display().to_string(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|e| fail(format!("cannot be read: {e}")))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|_| fail("a certificate in it is not valid PEM".into()))?;
    if certs.is_empty() {
        return Err(fail(
            "holds no certificate (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")".into(),
        ));
    }
    Ok(certs)
}

/// [`TokenApi`] over HTTPS with reqwest.
#[derive(Clone)]
pub struct HttpTokenApi {
    client: reqwest::Client,
}

impl HttpTokenApi {
    /// A client that trusts the platform's root certificates only.
    pub fn new() -> Result<Self, ClientError> {
        Self::with_ca_bundle(None)
    }

    /// A client that trusts the certificates in the PEM file `ca_bundle` in addition to
    /// the platform's roots (a private CA, or the CA of a TLS-inspecting proxy).
    pub fn with_ca_bundle(ca_bundle: Option<&Path>) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            // A redirect would carry the query string, and so the secrets, elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("scg-token-operator/", env!("CARGO_PKG_VERSION")));
        let mut count = 0;
        if let Some(path) = ca_bundle {
            let certs = read_ca_bundle(path)?;
            count = certs.len();
            // Merged: the platform's roots stay trusted.
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().map_err(|e| {
            let detail = innermost(&e).unwrap_or_else(|| e.to_string());
            match ca_bundle {
                Some(path) => ClientError::CaBundle {
                    path: path.display().to_string(),
                    problem: format!("cannot be used as trust anchors ({detail})"),
                },
                None => ClientError::Build(detail),
            }
        })?;
        if let Some(path) = ca_bundle {
            tracing::info!(
                path = %path.display(),
                certificates = count,
                "trusting the CA bundle in addition to the platform's root certificates"
            );
        }
        Ok(HttpTokenApi { client })
    }

    async fn call(&self, req: &RefreshRequest<'_>) -> Result<Refreshed, RefreshError> {
        let mut url = req.endpoint.0.clone();
        url.query_pairs_mut()
            .append_pair("consumerkey", req.consumer_key.expose())
            .append_pair("consumersecret", req.consumer_secret.expose())
            .append_pair("oldtoken", req.old_token.expose())
            .append_pair("validity", &req.validity.as_secs().to_string());
        let mut builder = self
            .client
            .get(url)
            .timeout(req.timeout)
            .header(reqwest::header::ACCEPT, "application/json");
        for (name, value) in req.headers {
            let invalid =
                |what: &str| RefreshError::transport(Unreachable::Header, Some(what.into()));
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid("a header name is invalid"))?;
            let mut value = reqwest::header::HeaderValue::from_str(value.expose())
                .map_err(|_| invalid("a header value is invalid"))?;
            value.set_sensitive(true);
            builder = builder.header(name, value);
        }
        let mut response = builder
            .send()
            .await
            .map_err(|e| transport(e, req.timeout))?;
        let status = response.status().as_u16();
        // Retry-After in seconds (the HTTP-date form is not used by rate limiters).
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if status == 429 {
            return Err(RefreshError::RateLimited { retry_after });
        }
        if (400..500).contains(&status) {
            return Err(RefreshError::Rejected { status });
        }
        if !(200..300).contains(&status) {
            let retry_after = retry_after.filter(|_| status == 503);
            return Err(RefreshError::Unavailable {
                status,
                retry_after,
            });
        }
        // Nothing but identity was asked for (no Accept-Encoding): a compressed body would
        // otherwise be reported as one that is not JSON.
        if response
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return Err(RefreshError::InvalidResponse(
                "the body is compressed (Content-Encoding), which was not asked for",
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport(e, req.timeout))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(RefreshError::InvalidResponse("the body is too large"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_success(&body)
    }
}

impl TokenApi for HttpTokenApi {
    fn refresh<'a>(
        &'a self,
        req: &'a RefreshRequest<'a>,
    ) -> BoxFuture<'a, Result<Refreshed, RefreshError>> {
        Box::pin(self.call(req))
    }
}

/// The message of the last error in `e`'s source chain, if it has one.
fn innermost(e: &dyn std::error::Error) -> Option<String> {
    let mut detail = None;
    let mut source = e.source();
    while let Some(s) = source {
        detail = Some(s.to_string());
        source = s.source();
    }
    detail
}

/// The rustls error behind a failed handshake, if that is what `e` is. rustls errors
/// travel inside `io::Error`s (sometimes one inside another), whose `source()` skips
/// what they wrap, so each link is opened by hand.
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut link = Some(e);
    // Bounded: a chain is a handful of links.
    for _ in 0..32 {
        let err = link?;
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        link = match err.downcast_ref::<std::io::Error>() {
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => err.source(),
            },
            None => err.source(),
        };
    }
    None
}

/// Says what went wrong in a TLS handshake, and what would fix it (for the log).
fn describe_tls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => "certificate not trusted \
             (issued by an unknown CA; if the endpoint or an inspecting proxy uses a \
             private CA, pass it with --ca-bundle)"
            .to_string(),
        // A trusted CA's name on a certificate that CA did not sign.
        rustls::Error::InvalidCertificate(C::BadSignature) => "certificate not trusted \
             (its signature does not match the trusted CA of that name; check the CA \
             passed with --ca-bundle)"
            .to_string(),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => "the certificate is not valid for the endpoint's host name".into(),
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => "the certificate has expired or is not yet valid".into(),
        rustls::Error::InvalidCertificate(C::Revoked) => "the certificate is revoked".into(),
        other => other.to_string(),
    }
}

/// Says why an egress proxy did not open a tunnel, if that is what `e` is. The tunnel's
/// error type is private to hyper-util; its messages are fixed texts, with no address or
/// credential in them.
fn proxy_error(e: &(dyn std::error::Error + 'static)) -> Option<RefreshError> {
    let mut link = Some(e);
    for _ in 0..32 {
        let err = link?;
        if let Some(what) = err.to_string().strip_prefix("tunnel error: ") {
            if what == "proxy authorization required" {
                return Some(RefreshError::transport(Unreachable::ProxyAuth, None));
            }
            let detail = match innermost(err) {
                Some(d) => format!("{what} ({d})"),
                None => what.to_string(),
            };
            return Some(RefreshError::transport(Unreachable::Proxy, Some(detail)));
        }
        link = err.source();
    }
    None
}

/// Whether the resolver failed: hyper-util's connector names that link "dns error".
fn is_dns(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut link = Some(e);
    for _ in 0..32 {
        let Some(err) = link else {
            return false;
        };
        if err.to_string() == "dns error" {
            return true;
        }
        link = err.source();
    }
    false
}

/// Describes a reqwest error from its kind and source chain, never its URL.
fn transport(e: reqwest::Error, timeout: Duration) -> RefreshError {
    if e.is_timeout() && !e.is_connect() {
        return RefreshError::Timeout(timeout);
    }
    let e = e.without_url();
    if let Some(tls) = tls_error(&e) {
        return RefreshError::transport(Unreachable::Tls, Some(describe_tls(tls)));
    }
    if let Some(proxy) = proxy_error(&e) {
        return proxy;
    }
    let class = if is_dns(&e) {
        Unreachable::Dns
    } else if e.is_connect() {
        Unreachable::Connect
    } else if e.is_body() || e.is_decode() {
        Unreachable::BrokeOff
    } else {
        Unreachable::Other
    };
    RefreshError::transport(class, innermost(&e))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SuccessBody {
    // Kept loose so that a field of the wrong type is named as such, not reported as a
    // body that is not JSON.
    access_token: Option<serde_json::Value>,
    validity_time: Option<serde_json::Value>,
}

/// Parses a token response, `{"accessToken":"..","validityTime":60}`. A `validityTime`
/// of zero or less means a token that does not expire: the caller schedules it by the
/// requested validity. A fraction of a second counts as a second, not as "never".
/// Public for the property tests; errors never quote the body.
pub fn parse_success(body: &[u8]) -> Result<Refreshed, RefreshError> {
    let parsed: SuccessBody = serde_json::from_slice(body)
        .map_err(|_| RefreshError::InvalidResponse("not a JSON object"))?;
    let token = match parsed.access_token {
        Some(serde_json::Value::String(t)) if !t.trim().is_empty() => t,
        None | Some(serde_json::Value::Null | serde_json::Value::String(_)) => {
            return Err(RefreshError::InvalidResponse("no accessToken"));
        }
        Some(_) => return Err(RefreshError::InvalidResponse("accessToken is not a string")),
    };
    let not_a_number = RefreshError::InvalidResponse("validityTime is not a number");
    let seconds = match parsed.validity_time {
        Some(serde_json::Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i,
            (None, Some(f)) if f > 0.0 && f < 1.0 => 1,
            // `as` saturates: beyond the range of i64 is clamped below.
            (None, Some(f)) => f as i64,
            (None, None) => return Err(not_a_number),
        },
        Some(serde_json::Value::String(s)) => s.trim().parse().map_err(|_| not_a_number)?,
        None | Some(serde_json::Value::Null) => {
            return Err(RefreshError::InvalidResponse("no validityTime"));
        }
        Some(_) => return Err(not_a_number),
    };
    Ok(Refreshed {
        token: SecretString::new(token.trim()),
        // Beyond ten years a schedule means nothing, and time arithmetic could overflow.
        lifetime: Duration::from_secs(seconds.clamp(0, MAX_LIFETIME_SECS) as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = SecretString::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        let e = Endpoint::parse("https://api.example.com/apptoken-refresh", false).unwrap();
        let req = RefreshRequest {
            endpoint: &e,
            consumer_key: &s,
            consumer_secret: &s,
            old_token: &s,
            validity: Duration::from_secs(60),
            headers: &[("Cookie".into(), s.clone())],
            timeout: Duration::from_secs(1),
        };
        assert!(!format!("{req:?}").contains("hunter2"));
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(Endpoint::parse("https://api.syniverse.com/apptoken-refresh", false).is_ok());
        assert!(Endpoint::parse("http://127.0.0.1:9/x", true).is_ok());
        let err = |s: &str| Endpoint::parse(s, false).unwrap_err();
        assert!(err("http://127.0.0.1:9/x").contains("plain http"));
        assert!(err("ftp://x/").contains("must be an http(s) URL"));
        assert!(err("HTTPS://x/").contains("must be an http(s) URL"));
        assert!(err(" https://x/").contains("must be an http(s) URL"));
        assert!(err("https://u:p@x/").contains("credentials"));
        assert!(err("https://x/?a=b").contains("query"));
        assert_eq!(err("https://user:pw@[bad/"), "endpoint is not a valid URL");
    }

    #[test]
    fn a_failure_shows_its_class_and_logs_its_detail() {
        let planted = "received fatal alert: planted-remote-words";
        for class in [
            Unreachable::Tls,
            Unreachable::Dns,
            Unreachable::Connect,
            Unreachable::Proxy,
            Unreachable::BrokeOff,
            Unreachable::Other,
        ] {
            let e = RefreshError::transport(class, Some(planted.into()));
            let shown = e.to_string();
            assert!(!shown.contains("planted"), "{shown}");
            assert!(
                shown.starts_with("the SCG API could not be reached: "),
                "{shown}"
            );
            assert!(
                e.detail().ends_with(&format!("({planted})")),
                "{}",
                e.detail()
            );
        }
        let tls = RefreshError::transport(Unreachable::Tls, None).to_string();
        assert!(
            tls.contains("TLS handshake failed") && tls.contains("--ca-bundle"),
            "{tls}"
        );
    }

    #[test]
    fn extra_headers_are_checked() {
        assert_eq!(header_problem("Cookie", "a=b; c=d"), None);
        assert_eq!(header_problem("X-Trace", ""), None);
        for (name, value, want) in [
            ("Bad Name", "v", "name"),
            ("Cookie", "a\r\nX-Injected: yes", "value"),
            ("Cookie", "a\u{1}", "value"),
            ("Host", "elsewhere.example", "operator sets itself"),
            ("content-length", "5", "operator sets itself"),
            ("Transfer-Encoding", "chunked", "operator sets itself"),
        ] {
            let problem = header_problem(name, value).unwrap_or("none");
            assert!(problem.contains(want), "{name}: {problem}");
        }
    }

    #[test]
    fn parses_token_responses() {
        let ok = parse_success(br#"{"accessToken":"abc","validityTime":60}"#).unwrap();
        assert_eq!((ok.token.expose(), ok.lifetime.as_secs()), ("abc", 60));
        let s = parse_success(br#"{"accessToken":"abc","validityTime":"90"}"#).unwrap();
        assert_eq!(s.lifetime.as_secs(), 90);
        let never = parse_success(br#"{"accessToken":"abc","validityTime":-1}"#).unwrap();
        assert_eq!(never.lifetime.as_secs(), 0);
        let huge = parse_success(br#"{"accessToken":"abc","validityTime":1e300}"#).unwrap();
        assert_eq!(huge.lifetime.as_secs(), MAX_LIFETIME_SECS as u64);
        let brief = parse_success(br#"{"accessToken":"abc","validityTime":0.4}"#).unwrap();
        assert_eq!(
            brief.lifetime.as_secs(),
            1,
            "a short life is not an endless one"
        );
        for (body, want) in [
            (&b"<html>bad gateway</html>"[..], "not a JSON object"),
            (br#"{"validityTime":60}"#, "no accessToken"),
            (br#"{"accessToken":"","validityTime":60}"#, "no accessToken"),
            (br#"{"accessToken":"abc"}"#, "no validityTime"),
            (
                br#"{"accessToken":"abc","validityTime":"soon"}"#,
                "not a number",
            ),
            (
                br#"{"accessToken":"abc","validityTime":true}"#,
                "validityTime is not a number",
            ),
            (
                br#"{"accessToken":42,"validityTime":60}"#,
                "accessToken is not a string",
            ),
            (
                br#"{"accessToken":null,"validityTime":60}"#,
                "no accessToken",
            ),
        ] {
            match parse_success(body) {
                Err(RefreshError::InvalidResponse(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("{want}: {other:?}"),
            }
        }
    }
}
