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
//! Bounded: body sizes, header sizes, the time to read request headers, the upstream
//! call. Never follows redirects (3xx is passed on). Never logs headers, paths, query
//! strings or bodies, and never prints an HTTP client error (they carry the URL).

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri,
    header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, EXPECT, HOST},
};
use http_body_util::{BodyExt, BodyStream, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{task::JoinSet, time::Instant};
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
        })
    }
}

struct Shared {
    config: Config,
    served: ServedRx,
    metrics: Arc<Metrics>,
}

/// Serves until `shutdown` resolves, then lets requests in flight finish (up to 5 s).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    served: ServedRx,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let shared = Arc::new(Shared {
        config,
        served,
        metrics,
    });
    let mut conns = JoinSet::new();
    futures::pin_mut!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(connection(stream, shared.clone()));
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

async fn connection(stream: tokio::net::TcpStream, shared: Arc<Shared>) {
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
            Outcome::Timeout => "timeout",
            Outcome::UpstreamError => "upstream_error",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Outcome::NoToken => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Outcome::BadRequest => StatusCode::BAD_REQUEST,
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
    let token = current_token(shared).await.ok_or(Outcome::NoToken)?;
    let (parts, body) = req.into_parts();
    let max = shared.config.max_body;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(Outcome::TooLarge);
    }
    let prepared = tokio::time::timeout(
        shared.config.timeout,
        prepare(body, declared, shared.config.retry_buffer, max),
    )
    .await
    .map_err(|_| Outcome::Timeout)??;
    let mut out = Outgoing {
        url: target(&shared.config.upstream, &parts.uri),
        headers: forwarded_headers(&parts.headers),
        method: parts.method,
    };
    let (first, replay) = match prepared {
        Prepared::Buffered(bytes) => {
            // The client computes it from the buffered body.
            out.headers.remove(CONTENT_LENGTH);
            (reqwest::Body::from(bytes.clone()), Some(bytes))
        }
        Prepared::Streaming(body) => (body, None),
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
    /// Streamed through; cannot be sent twice.
    Streaming(reqwest::Body),
}

/// Buffers the body if it fits in `buffer` bytes, else streams it (what was read so far
/// first), bounded to `max` bytes in all.
async fn prepare(
    mut body: Incoming,
    declared: Option<usize>,
    buffer: usize,
    max: usize,
) -> Result<Prepared, Outcome> {
    let mut read = BytesMut::new();
    if declared.is_none_or(|n| n <= buffer) {
        loop {
            match body.frame().await {
                None => return Ok(Prepared::Buffered(read.freeze())),
                Some(Err(_)) => return Err(Outcome::BadRequest),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        read.extend_from_slice(&data);
                    }
                    if read.len() > max {
                        return Err(Outcome::TooLarge);
                    }
                    if read.len() > buffer {
                        break;
                    }
                }
            }
        }
    }
    let rest = max.saturating_sub(read.len());
    let head = futures::stream::once(futures::future::ready(Ok::<_, BoxError>(Frame::data(
        read.freeze(),
    ))));
    let tail = BodyStream::new(Limited::new(body, rest));
    Ok(Prepared::Streaming(reqwest::Body::wrap(StreamBody::new(
        head.chain(tail),
    ))))
}
