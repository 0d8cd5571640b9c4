//! The SCG token-refresh API: the [`TokenApi`] trait, its reqwest implementation, the
//! classification of outcomes, and credential types that cannot be printed.
//!
//! The refresh call carries the consumer secret and the current token in its query
//! string, so nothing here ever formats a request URL, a response body or a credential:
//! errors are built from static text and status codes only.

use std::{fmt, time::Duration};

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
    /// Checks a `spec.endpoint`. Plain http is accepted only with `allow_insecure`.
    pub fn parse(s: &str, allow_insecure: bool) -> Result<Endpoint, String> {
        // The input is not echoed: a malformed URL may carry credentials.
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
            other => Err(format!("endpoint scheme {other:?} is not http(s)")),
        }
    }
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

/// Why a refresh call failed. Messages hold no URL, body or credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    #[error(
        "the SCG API rejected the refresh with HTTP {status}: the consumer key, consumer secret or current token is wrong or revoked"
    )]
    Rejected { status: u16 },
    #[error("the SCG API is rate limiting refreshes (HTTP 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the SCG API answered HTTP {status}")]
    Unavailable { status: u16 },
    #[error("the refresh call got no answer within {0:?}")]
    Timeout(Duration),
    #[error("the SCG API could not be reached: {0}")]
    Transport(String),
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

/// [`TokenApi`] over HTTPS with reqwest.
#[derive(Clone)]
pub struct HttpTokenApi {
    client: reqwest::Client,
}

impl HttpTokenApi {
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A redirect would carry the query string, and so the secrets, elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("scg-token-operator/", env!("CARGO_PKG_VERSION")))
            .build()?;
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
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| RefreshError::Transport("an extra header name is invalid".into()))?;
            let mut value = reqwest::header::HeaderValue::from_str(value.expose())
                .map_err(|_| RefreshError::Transport("an extra header value is invalid".into()))?;
            value.set_sensitive(true);
            builder = builder.header(name, value);
        }
        let mut response = builder
            .send()
            .await
            .map_err(|e| transport(e, req.timeout))?;
        let status = response.status().as_u16();
        if status == 429 {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(RefreshError::RateLimited { retry_after });
        }
        if (400..500).contains(&status) {
            return Err(RefreshError::Rejected { status });
        }
        if !(200..300).contains(&status) {
            return Err(RefreshError::Unavailable { status });
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

/// Describes a reqwest error from its kind and source chain, never its URL.
fn transport(e: reqwest::Error, timeout: Duration) -> RefreshError {
    if e.is_timeout() && !e.is_connect() {
        return RefreshError::Timeout(timeout);
    }
    let e = e.without_url();
    let what = if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "the response broke off"
    } else {
        "the request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        RefreshError::Transport(what.into())
    } else {
        RefreshError::Transport(format!("{what} ({detail})"))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SuccessBody {
    access_token: Option<String>,
    validity_time: Option<serde_json::Value>,
}

/// Parses `{"accessToken":"..","validityTime":60}`. A `validityTime` of zero or less
/// means a token that does not expire: the caller schedules it by the requested validity.
fn parse_success(body: &[u8]) -> Result<Refreshed, RefreshError> {
    let parsed: SuccessBody = serde_json::from_slice(body)
        .map_err(|_| RefreshError::InvalidResponse("not a JSON object"))?;
    let token = parsed
        .access_token
        .filter(|t| !t.trim().is_empty())
        .ok_or(RefreshError::InvalidResponse("no accessToken"))?;
    let seconds = match parsed.validity_time {
        Some(serde_json::Value::Number(n)) => {
            n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)).ok_or(
                RefreshError::InvalidResponse("validityTime is not a number"),
            )?
        }
        Some(serde_json::Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| RefreshError::InvalidResponse("validityTime is not a number"))?,
        _ => return Err(RefreshError::InvalidResponse("no validityTime")),
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
        assert!(err("ftp://x/").contains("not http(s)"));
        assert!(err("https://u:p@x/").contains("credentials"));
        assert!(err("https://x/?a=b").contains("query"));
        assert_eq!(err("https://user:pw@[bad/"), "endpoint is not a valid URL");
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
        for (body, want) in [
            (&b"<html>bad gateway</html>"[..], "not a JSON object"),
            (br#"{"validityTime":60}"#, "no accessToken"),
            (br#"{"accessToken":"","validityTime":60}"#, "no accessToken"),
            (br#"{"accessToken":"abc"}"#, "no validityTime"),
            (
                br#"{"accessToken":"abc","validityTime":"soon"}"#,
                "not a number",
            ),
        ] {
            match parse_success(body) {
                Err(RefreshError::InvalidResponse(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("{want}: {other:?}"),
            }
        }
    }
}
