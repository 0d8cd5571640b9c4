//! Proxy mode: the application sends its SCG API calls to `http://127.0.0.1:PORT` and
//! never holds a token; the agent forwards them to the configured upstream with
//! `Authorization: Bearer <current token>`.
//!
//! A 401 from upstream means the request was not processed, so it is safe to repeat: when
//! a newer token has arrived, or arrives within `--retry-wait-ms`, the request is sent
//! once more with it. That covers the window in which the API has revoked the old token
//! and the new one is on its way to the pod. Request bodies up to `--retry-buffer-bytes`
//! are buffered for that; larger ones stream and are not retried.
//!
//! Bounded: the connections held at once (`--max-connections`; more wait in the listen
//! queue), body sizes, header sizes, the time to read request headers (also of an idle
//! connection) and bodies, the upstream call. A chunked request body is read whole
//! before anything is sent, so that one over `--max-body-bytes` is refused (413) without
//! reaching the upstream; the chunked bodies held at once share a budget of four times
//! that size (beyond it: 503).
//!
//! Refused, never forwarded: `CONNECT` and `OPTIONS *` (405), and a path whose `..`
//! segments (also percent-encoded) climb above the upstream's base path (400).
//!
//! Never follows redirects (3xx is passed on). Never logs headers, paths, query strings
//! or bodies, and never prints an HTTP client error (they carry the URL).

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
    header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, EXPECT, HOST},
};
use http_body_util::{BodyExt, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::Instant,
};
use tracing::{debug, warn};

use super::{AgentError, Args, ServedRx, Token, health::Metrics};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Headers that describe one connection, not the request, and are never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The proxy's settings, checked.
pub struct Config {
    pub listen: SocketAddr,
    upstream: reqwest::Url,
    client: reqwest::Client,
    retry_wait: Duration,
    retry_buffer: usize,
    max_body: usize,
    timeout: Duration,
    max_connections: usize,
    /// Bytes of chunked request bodies held whole at one time, all requests together.
    body_budget: usize,
}

impl Config {
    /// Checks the flags: a loopback listen address, an `https://` upstream (or `http://`
    /// with `--allow-insecure-upstream`) without credentials, query or fragment.
    pub fn new(upstream: &str, args: &Args) -> Result<Config, AgentError> {
        let bad = |m: &str| AgentError::Config(format!("--upstream: {m}"));
        let url = reqwest::Url::parse(upstream).map_err(|_| bad("not a URL"))?;
        match url.scheme() {
            "https" => {}
            "http" if args.allow_insecure_upstream => {}
            "http" => return Err(bad("http:// needs --allow-insecure-upstream (tests only)")),
            _ => return Err(bad("must be an https:// URL")),
        }
        if url.host_str().is_none() || url.cannot_be_a_base() {
            return Err(bad("must name a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("must not carry credentials"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("must not have a query or fragment"));
        }
        if !args.listen.ip().is_loopback() {
            return Err(AgentError::Config(
                "--listen must be a loopback address: the proxy adds the token to whatever reaches it".into(),
            ));
        }
        let timeout = Duration::from_secs(args.upstream_timeout_seconds.max(1));
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout);
        if let Some(path) = &args.ca_bundle {
            let certs = crate::scg::read_ca_bundle(path)
                .map_err(|e| AgentError::Config(format!("--ca-bundle: {e}")))?;
            // Merged: the platform's roots stay trusted.
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|_| AgentError::Config("the HTTP client could not be built".into()))?;
        Ok(Config {
            listen: args.listen,
            upstream: url,
            client,
            retry_wait: Duration::from_millis(args.retry_wait_ms),
            retry_buffer: args.retry_buffer_bytes,
            max_body: args.max_body_bytes,
            timeout,
            max_connections: args.max_connections as usize,
            body_budget: args
                .max_body_bytes
                .saturating_mul(4)
                .min(Semaphore::MAX_PERMITS),
        })
    }
}

struct Shared {
    config: Config,
    served: ServedRx,
    metrics: Arc<Metrics>,
    /// What is left of [`Config::body_budget`], in bytes.
    budget: Arc<Semaphore>,
}

/// Serves until `shutdown` resolves, then lets requests in flight finish (up to 5 s).
/// Holds at most `--max-connections` connections: the next one is accepted when one of
/// them closes, and until then waits, unread, in the listen queue.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    served: ServedRx,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let shared = Arc::new(Shared {
        budget: Arc::new(Semaphore::new(config.body_budget)),
        config,
        served,
        metrics,
    });
    let mut conns = JoinSet::new();
    futures::pin_mut!(shutdown);
    loop {
        tokio::select! {
            accepted = accept(&listener, &permits) => {
                let Some((stream, permit)) = accepted else {
                    // Out of file descriptors, say: let some connections close first.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(connection(stream, shared.clone(), permit));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    conns.abort_all();
}

/// The next connection, once one of the `--max-connections` permits is free. Cancel-safe:
/// a permit taken for an accept that does not happen goes back.
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    let permit = permits.clone().acquire_owned().await.ok()?;
    let (stream, _) = listener.accept().await.ok()?;
    Some((stream, permit))
}

/// Serves one connection; its permit is returned when it closes. The header read
/// timeout also closes a connection that sits idle between requests.
async fn connection(stream: TcpStream, shared: Arc<Shared>, _permit: OwnedSemaphorePermit) {
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

/// The outcome of one proxied request, as a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Upstream answered something other than 401.
    Ok,
    /// Upstream answered 401 and the 401 was passed on.
    Unauthorized,
    NoToken,
    TooLarge,
    /// The upstream announced a body over the limit.
    ResponseTooLarge,
    BadRequest,
    /// `CONNECT` or `OPTIONS *`: never forwarded.
    MethodNotAllowed,
    /// The path climbs above the upstream's base path: never forwarded.
    BadPath,
    /// The request body did not arrive within the time limit.
    BodyTimeout,
    /// The chunked bodies held at once would exceed their shared budget.
    Busy,
    Timeout,
    UpstreamError,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Unauthorized => "unauthorized",
            Outcome::NoToken => "no_token",
            Outcome::TooLarge => "too_large",
            Outcome::ResponseTooLarge => "response_too_large",
            Outcome::BadRequest => "bad_request",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::BadPath => "bad_path",
            Outcome::BodyTimeout => "body_timeout",
            Outcome::Busy => "busy",
            Outcome::Timeout => "timeout",
            Outcome::UpstreamError => "upstream_error",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Outcome::NoToken | Outcome::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Outcome::BadRequest | Outcome::BadPath => StatusCode::BAD_REQUEST,
            Outcome::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Outcome::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Outcome::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Outcome::NoToken => "scg-token-agent: no unexpired token to send yet\n",
            Outcome::TooLarge => "scg-token-agent: body too large\n",
            Outcome::ResponseTooLarge => "scg-token-agent: the upstream's answer is too large\n",
            Outcome::BadRequest => "scg-token-agent: the request body could not be read\n",
            Outcome::MethodNotAllowed => {
                "scg-token-agent: CONNECT and OPTIONS * are not forwarded\n"
            }
            Outcome::BadPath => "scg-token-agent: the path leaves the upstream's base path\n",
            Outcome::BodyTimeout => "scg-token-agent: the request body did not arrive in time\n",
            Outcome::Busy => {
                "scg-token-agent: too many large chunked bodies at once; try again later\n"
            }
            Outcome::Timeout => "scg-token-agent: the upstream did not answer in time\n",
            _ => "scg-token-agent: the upstream could not be reached\n",
        }
    }
}

fn local_answer(outcome: Outcome) -> Response<Body> {
    let body = Full::new(Bytes::from_static(outcome.message().as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = outcome.status();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    resp
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let (outcome, resp) = match forward(shared, req).await {
        Ok((resp, outcome)) => (outcome, resp),
        Err(outcome) => (outcome, local_answer(outcome)),
    };
    let elapsed = started.elapsed();
    shared.metrics.proxy_duration.observe(elapsed.as_secs_f64());
    shared.metrics.proxied(outcome.label());
    debug!(%method, status = resp.status().as_u16(), result = outcome.label(), ms = elapsed.as_millis() as u64, "proxied");
    resp
}

/// The token served now, waiting up to the retry bound for a first one.
async fn current_token(shared: &Shared) -> Option<Arc<Token>> {
    let mut rx = shared.served.clone();
    let wait = rx.wait_for(|s| s.is_some());
    let served = tokio::time::timeout(shared.config.retry_wait, wait)
        .await
        .ok()?
        .ok()?;
    served.as_ref().map(|s| s.token.clone())
}

/// A newer token than `sent`, if one is served now or within the retry bound.
async fn newer_token(shared: &Shared, sent: &str) -> Option<Arc<Token>> {
    let mut rx = shared.served.clone();
    let wait = rx.wait_for(|s| s.as_ref().is_some_and(|s| s.token.fingerprint != sent));
    let served = tokio::time::timeout(shared.config.retry_wait, wait)
        .await
        .ok()?
        .ok()?;
    served.as_ref().map(|s| s.token.clone())
}

/// A request on its way upstream, sendable more than once.
struct Outgoing {
    method: http::Method,
    url: reqwest::Url,
    headers: HeaderMap,
}

impl Outgoing {
    async fn send(
        &self,
        shared: &Shared,
        token: &Token,
        body: reqwest::Body,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut headers = self.headers.clone();
        // Served tokens are visible ASCII (checked when read), always a valid header value.
        if let Ok(mut auth) = HeaderValue::from_str(&format!("Bearer {}", token.value.expose())) {
            auth.set_sensitive(true);
            headers.insert(AUTHORIZATION, auth);
        }
        shared
            .config
            .client
            .request(self.method.clone(), self.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
    }
}

async fn forward(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<(Response<Body>, Outcome), Outcome> {
    let (parts, body) = req.into_parts();
    refuse(&parts)?;
    let token = current_token(shared).await.ok_or(Outcome::NoToken)?;
    let max = shared.config.max_body;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(Outcome::TooLarge);
    }
    let prepared = tokio::time::timeout(shared.config.timeout, prepare(body, declared, shared))
        .await
        .map_err(|_| Outcome::BodyTimeout)??;
    let mut out = Outgoing {
        url: target(&shared.config.upstream, &parts.uri),
        headers: forwarded_headers(&parts.headers),
        method: parts.method,
    };
    // Holds the budget of a whole chunked body until the upstream has answered.
    let (first, replay, _held) = match prepared {
        // The client computes the length from the buffered body.
        Prepared::Buffered(bytes) => {
            out.headers.remove(CONTENT_LENGTH);
            (reqwest::Body::from(bytes.clone()), Some(bytes), None)
        }
        Prepared::Whole(bytes, held) => {
            out.headers.remove(CONTENT_LENGTH);
            (reqwest::Body::from(bytes), None, held)
        }
        Prepared::Streaming(body) => (body, None, None),
    };
    let mut resp = out.send(shared, &token, first).await.map_err(classify)?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        resp = retry(shared, &out, resp, &token, replay).await?;
    }
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(Outcome::ResponseTooLarge);
    }
    let outcome = if resp.status() == StatusCode::UNAUTHORIZED {
        Outcome::Unauthorized
    } else {
        Outcome::Ok
    };
    Ok((response(resp, max), outcome))
}

/// Requests that are never forwarded: `CONNECT` and `OPTIONS *` (a proxy's and a
/// server's own business, not the API's), and paths that leave the upstream's base path.
fn refuse(parts: &http::request::Parts) -> Result<(), Outcome> {
    let path = parts.uri.path();
    if parts.method == Method::CONNECT || (parts.method == Method::OPTIONS && path == "*") {
        return Err(Outcome::MethodNotAllowed);
    }
    if !stays_inside(path) {
        return Err(Outcome::BadPath);
    }
    Ok(())
}

/// Whether `path` (as sent) starts with `/` and never climbs above that start through
/// its `..` segments. Checked as sent and after each of up to three rounds of
/// percent-decoding (`%2e%2e` in any case, `%252e`), with `\` and a decoded `%2f` as
/// separators too and `;params` ignored (`..;`): whatever an upstream makes of it, it
/// cannot resolve above the base path. A path still encoded after that is refused.
fn stays_inside(path: &str) -> bool {
    if !path.starts_with('/') {
        return false;
    }
    let mut current = path.as_bytes().to_vec();
    for _ in 0..=3 {
        if climbs_out(&current) {
            return false;
        }
        let decoded = percent_decode(&current);
        if decoded == current {
            return true;
        }
        current = decoded;
    }
    false
}

/// Whether the `..` segments of `path` climb above its start. Empty and `.` segments do
/// not count as a level, so this errs on the side of climbing.
fn climbs_out(path: &[u8]) -> bool {
    let mut depth = 0usize;
    for segment in path.split(|b| *b == b'/' || *b == b'\\') {
        let name = segment.split(|b| *b == b';').next().unwrap_or_default();
        match name {
            b"" | b"." => {}
            b".." if depth == 0 => return true,
            b".." => depth -= 1,
            _ => depth += 1,
        }
    }
    false
}

/// `bytes` with each `%XX` (two hex digits) replaced by the byte it stands for.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// After a 401 with `sent`: the answer to the same request sent once more with a newer
/// token, if the body can be replayed and a newer token comes within the bound; else the
/// 401 itself.
async fn retry(
    shared: &Shared,
    out: &Outgoing,
    unauthorized: reqwest::Response,
    sent: &Token,
    replay: Option<Bytes>,
) -> Result<reqwest::Response, Outcome> {
    let Some(bytes) = replay else {
        shared.metrics.retried("not_replayable");
        return Ok(unauthorized);
    };
    let Some(newer) = newer_token(shared, &sent.fingerprint).await else {
        shared.metrics.retried("no_newer_token");
        return Ok(unauthorized);
    };
    drop(unauthorized);
    let retried = out.send(shared, &newer, reqwest::Body::from(bytes)).await;
    let result = match &retried {
        Ok(r) if r.status() == StatusCode::UNAUTHORIZED => "unauthorized",
        Ok(_) => "ok",
        Err(_) => "error",
    };
    shared.metrics.retried(result);
    retried.map_err(classify)
}

/// The upstream URL for a request: the upstream base's path joined with the request's
/// path, and the request's query. Scheme, host and port always come from the base, so
/// the token only ever goes to the configured upstream.
fn target(base: &reqwest::Url, uri: &Uri) -> reqwest::Url {
    let mut url = base.clone();
    let path = format!("{}{}", base.path().trim_end_matches('/'), uri.path());
    url.set_path(&path);
    url.set_query(uri.query());
    url
}

fn classify(e: reqwest::Error) -> Outcome {
    // Never print `e`: its text carries the URL, query string included.
    if e.is_timeout() {
        warn!("the upstream did not answer in time");
        Outcome::Timeout
    } else if e.is_connect() {
        warn!("the upstream could not be reached");
        Outcome::UpstreamError
    } else {
        warn!("the exchange with the upstream failed");
        Outcome::UpstreamError
    }
}

/// `headers` without hop-by-hop headers (and those the `Connection` header names) and
/// without `also`.
fn end_to_end(headers: &HeaderMap, also: &[HeaderName]) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|x| x == n) || also.contains(name) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The headers to forward upstream: end-to-end ones but `Host` (the client sets the
/// upstream's), `Expect` and the client's own `Authorization`.
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    end_to_end(headers, &[HOST, EXPECT, AUTHORIZATION])
}

/// The upstream's answer for the client: hop-by-hop headers dropped, body streamed and
/// bounded.
fn response(resp: reqwest::Response, max_body: usize) -> Response<Body> {
    let resp: Response<reqwest::Body> = resp.into();
    let (mut parts, body) = resp.into_parts();
    parts.headers = end_to_end(&parts.headers, &[]);
    Response::from_parts(parts, Limited::new(body, max_body).boxed_unsync())
}

/// A request body ready to send.
enum Prepared {
    /// Small enough to keep for a retry.
    Buffered(Bytes),
    /// A chunked body larger than the retry buffer, read whole so that its size is known
    /// before anything is sent; sent once, not retried. Its bytes beyond the retry buffer
    /// hold the shared budget while the permit lives.
    Whole(Bytes, Option<OwnedSemaphorePermit>),
    /// A body of declared length larger than the retry buffer: streamed through, cannot
    /// be sent twice.
    Streaming(reqwest::Body),
}

/// A body of declared length over the retry buffer streams (hyper holds it to that
/// length, checked against the limit before); any other is read whole, up to the limit.
async fn prepare(
    mut body: Incoming,
    declared: Option<usize>,
    shared: &Shared,
) -> Result<Prepared, Outcome> {
    let (buffer, max) = (shared.config.retry_buffer, shared.config.max_body);
    if declared.is_some_and(|n| n > buffer) {
        let limited = Limited::new(body, max);
        return Ok(Prepared::Streaming(reqwest::Body::wrap(limited)));
    }
    let (bytes, held) = read_whole(&mut body, buffer, max, &shared.budget).await?;
    Ok(if bytes.len() <= buffer {
        Prepared::Buffered(bytes)
    } else {
        Prepared::Whole(bytes, held)
    })
}

/// Reads `body` whole, up to `max` bytes (else 413). The bytes past the first `free` are
/// taken from `budget` as they arrive (else 503) and given back when the returned
/// permit is dropped.
async fn read_whole(
    body: &mut Incoming,
    free: usize,
    max: usize,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Outcome> {
    let mut read = BytesMut::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    // Ends with the body: bounded by `max` bytes, and in time by the caller.
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| Outcome::BadRequest)?.into_data() else {
            continue; // trailers
        };
        let total = read.len() + data.len();
        if total > max {
            return Err(Outcome::TooLarge);
        }
        let beyond = total.saturating_sub(free.max(read.len()));
        if beyond > 0 {
            let n = u32::try_from(beyond).map_err(|_| Outcome::Busy)?;
            let permit = budget
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| Outcome::Busy)?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
        }
        read.extend_from_slice(&data);
    }
    Ok((read.freeze(), held))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_climb_above_their_start_are_caught_in_every_spelling() {
        for path in [
            "/..",
            "/../other",
            "/%2e%2e/x",
            "/%2E%2e/x",
            "/%2e%2E/x",
            "/.%2e/x",
            "/%2E./x",
            "/a/%2e%2e/%2e%2e/x",
            "/a/..%2f..%2fx",
            "/a/..%2F..%2Fx",
            "/a\\..\\..\\x",
            "/a/b/../../../x",
            "/..;/x",
            "/%252e%252e/x",
            "/%25252e%25252e/x",
            "//../x",
            "*",
            "",
            "example.com:443",
        ] {
            assert!(!stays_inside(path), "{path:?} passed");
        }
    }

    #[test]
    fn paths_that_stay_inside_pass() {
        for path in [
            "/",
            "/v1/messages",
            "/a/../b",
            "/a/%2e%2e/b",
            "/a/./b/..",
            "/a..b/..c/...",
            "/a/x%2Fy",
            "/100%",
            "/%zz/%2",
            "/a/%25%25",
        ] {
            assert!(stays_inside(path), "{path:?} refused");
        }
    }

    #[test]
    fn percent_decoding_replaces_only_complete_escapes() {
        assert_eq!(percent_decode(b"%2e%2E%2f%41"), b"../A");
        assert_eq!(percent_decode(b"%2%zz%"), b"%2%zz%");
        assert_eq!(percent_decode(b"%252e"), b"%2e");
    }
}
