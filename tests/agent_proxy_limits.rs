//! The agent's proxy at its limits: how many connections it holds, how long a request
//! body may take, which requests it refuses to forward (CONNECT, `OPTIONS *`, paths that
//! climb out of the upstream's base path, chunked bodies over the limit), and that a
//! proxy password never shows in what the agent prints.
//!
//! Requests are written on raw TCP connections: an HTTP client library would resolve
//! `..` segments itself, or refuse CONNECT and `OPTIONS *`, before the agent saw them.

mod common {
    pub mod agent;
    pub mod harness;
}

use std::{
    convert::Infallible,
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::{agent::*, harness::capture_output};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use testkit::apiserver::ApiServer;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HOUR: Duration = Duration::from_secs(3600);
/// How long a connection beyond the cap is watched for an answer it must not get.
const QUIET: Duration = Duration::from_millis(700);

/// One request as the upstream saw it: recorded when its head arrived, so a request
/// whose body never completed counts too (`body` stays `None`).
#[derive(Debug, Clone)]
struct Hit {
    method: String,
    target: String,
    body: Option<usize>,
}

/// A counting upstream on 127.0.0.1 that answers every request 200 `ok`.
struct Upstream {
    base: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Dropping the accept loop drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let log = hits.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        conns.spawn(upstream_connection(stream, log.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Upstream { base, hits, task }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

async fn upstream_connection(stream: TcpStream, hits: Arc<Mutex<Vec<Hit>>>) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let hits = hits.clone();
        async move {
            let at = {
                let mut h = hits.lock().unwrap();
                h.push(Hit {
                    method: req.method().to_string(),
                    target: req.uri().to_string(),
                    body: None,
                });
                h.len() - 1
            };
            let body = req.into_body().collect().await.ok();
            hits.lock().unwrap()[at].body = body.map(|b| b.to_bytes().len());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

/// An agent in proxy mode in front of `upstream` (plus `extra` flags), serving a fresh
/// token. Returns the agent and its proxy address, once it is ready.
async fn proxy_agent(
    api: &ApiServer,
    upstream: &str,
    extra: &[&str],
) -> (Agent, SocketAddr, String) {
    let secrets: Api<Secret> = Api::namespaced(api.client(), NAMESPACE);
    let token = new_token(0);
    put_token(&secrets, &token, HOUR).await;
    let mut args = vec![
        format!("--upstream={upstream}"),
        "--allow-insecure-upstream".into(),
        "--listen=127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let agent = Agent::spawn(api.kubeconfig_path(), "client-0", &args);
    let (admin, proxy) = (agent.addr("admin server").await, agent.addr("proxy").await);
    wait_ready(admin, 200).await;
    (agent, proxy, token)
}

/// The status code of an HTTP/1.1 answer's text, or 0.
fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Reads one answer from `stream`: its head and, if it declares one, its
/// `Content-Length` body; or whatever came before the end of the stream or an error.
async fn read_answer(stream: &mut tokio::net::tcp::OwnedReadHalf) -> String {
    let mut got: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    // Bounded by size; the caller bounds the time.
    while got.len() < 1 << 20 {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        if length.is_some_and(|n| body.len() >= n) {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Writes `request` on a new connection to `addr` (from a task of its own, so an answer
/// given before the body is read still arrives) and reads the answer.
async fn exchange(addr: SocketAddr, request: Vec<u8>) -> String {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let (mut rx, mut tx) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = tx.write_all(&request).await;
        tx
    });
    let answer = tokio::time::timeout(PATIENCE, read_answer(&mut rx))
        .await
        .expect("the proxy answered in time");
    writer.abort();
    answer
}

/// A GET of `target` that closes the connection after the answer.
fn get_request(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A chunked POST of `chunks` chunks of `size` bytes each.
fn chunked_post(target: &str, chunks: usize, size: usize) -> Vec<u8> {
    let mut req = format!(
        "POST {target} HTTP/1.1\r\nHost: app\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..chunks {
        req.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        req.extend(std::iter::repeat_n(b'c', size));
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

/// Item 1: connections beyond `--max-connections` are not served until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_until_one_of_the_held_ones_closes() {
    let api = ApiServer::start().await.expect("API server");
    let upstream = Upstream::start().await;
    let (agent, proxy, token) = proxy_agent(&api, &upstream.base, &["--max-connections=4"]).await;

    // Four connections the proxy holds: idle, a head that never ends, a body that
    // never ends, idle again.
    let mut held = Vec::new();
    for opening in [
        &b""[..],
        b"GET /slow-head HTTP/1.1\r\nHost: app\r\n",
        b"POST /slow-body HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\n0123456789",
        b"",
    ] {
        let mut conn = TcpStream::connect(proxy).await.expect("connect");
        conn.write_all(opening).await.expect("write");
        held.push(conn);
    }
    // The fifth asks in full, and gets nothing while the four are open.
    let fifth = TcpStream::connect(proxy).await.expect("connect");
    let (mut rx, mut tx) = fifth.into_split();
    tx.write_all(&get_request("/fifth")).await.expect("write");
    let early = tokio::time::timeout(QUIET, read_answer(&mut rx)).await;
    assert!(
        early.is_err(),
        "a fifth connection was served while --max-connections=4 were open: {early:?}"
    );
    assert!(
        !upstream.hits().iter().any(|h| h.target == "/fifth"),
        "the fifth request reached the upstream while four connections were open"
    );

    // One closes: the fifth is served.
    drop(held.remove(0));
    let answer = tokio::time::timeout(PATIENCE, read_answer(&mut rx))
        .await
        .expect("the fifth connection was served once one closed");
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(upstream.hits().iter().any(|h| h.target == "/fifth"));
    drop(held);
    assert_no_leak("agent logs", &agent.logs(), &[token]);
}

/// Item 1, the default: 256 connections are held, the 257th waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_proxy_holds_at_most_256_connections() {
    let api = ApiServer::start().await.expect("API server");
    let upstream = Upstream::start().await;
    let (_agent, proxy, _) = proxy_agent(&api, &upstream.base, &[]).await;
    let mut held = Vec::new();
    for _ in 0..256 {
        held.push(TcpStream::connect(proxy).await.expect("connect"));
    }
    let extra = TcpStream::connect(proxy).await.expect("connect");
    let (mut rx, mut tx) = extra.into_split();
    tx.write_all(&get_request("/extra")).await.expect("write");
    let early = tokio::time::timeout(QUIET, read_answer(&mut rx)).await;
    assert!(
        early.is_err(),
        "connection 257 was served while 256 were open: {early:?}"
    );
    held.truncate(255);
    let answer = tokio::time::timeout(PATIENCE, read_answer(&mut rx))
        .await
        .expect("served once one closed");
    assert_eq!(status_of(&answer), 200, "{answer}");
}

/// Item 1: a request body that stops arriving is answered 408 within the time limit
/// (`--upstream-timeout-seconds`), and nothing of it is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_arriving_is_answered_408_in_time_and_not_forwarded() {
    let api = ApiServer::start().await.expect("API server");
    let upstream = Upstream::start().await;
    let args = ["--upstream-timeout-seconds=1"];
    let (_agent, proxy, _) = proxy_agent(&api, &upstream.base, &args).await;
    for request in [
        &b"POST /stalled HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\n0123456789"[..],
        b"POST /stalled HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
    ] {
        let started = std::time::Instant::now();
        let stream = TcpStream::connect(proxy).await.expect("connect");
        let (mut rx, mut tx) = stream.into_split();
        tx.write_all(request).await.expect("write");
        let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut rx))
            .await
            .expect("a stalled body was not cut off within 10 s");
        assert_eq!(status_of(&answer), 408, "{answer}");
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(tx);
    }
    assert!(upstream.hits().is_empty(), "{:?}", upstream.hits());
}

/// Item 2: CONNECT and `OPTIONS *` are answered 405 and never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_options_asterisk_are_refused_with_405_and_never_forwarded() {
    let api = ApiServer::start().await.expect("API server");
    let upstream = Upstream::start().await;
    let (agent, proxy, token) = proxy_agent(&api, &upstream.base, &[]).await;
    let host = upstream.base.trim_start_matches("http://");
    let connect = format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let answer = exchange(proxy, connect.into_bytes()).await;
    let hits = upstream.hits();
    assert_eq!(
        status_of(&answer),
        405,
        "CONNECT: {answer}\nupstream saw: {hits:?}"
    );
    let options = b"OPTIONS * HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".to_vec();
    let answer = exchange(proxy, options).await;
    let hits = upstream.hits();
    assert_eq!(
        status_of(&answer),
        405,
        "OPTIONS *: {answer}\nupstream saw: {hits:?}"
    );
    assert!(
        upstream.hits().is_empty(),
        "the upstream received {:?}",
        upstream.hits()
    );

    // OPTIONS on a path is an ordinary request, forwarded.
    let options = b"OPTIONS /v1/x HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".to_vec();
    let answer = exchange(proxy, options).await;
    assert_eq!(status_of(&answer), 200, "OPTIONS /v1/x: {answer}");
    let hits = upstream.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(
        (hits[0].method.as_str(), hits[0].target.as_str()),
        ("OPTIONS", "/v1/x")
    );
    assert_no_leak("agent logs", &agent.logs(), &[token]);
}

/// Item 3: a path whose `..` segments (also percent-encoded, in any case) climb out of
/// the upstream's base path is answered 400 and never forwarded; others are forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_climb_out_of_the_upstream_base_path_are_refused_with_400() {
    let api = ApiServer::start().await.expect("API server");
    let upstream = Upstream::start().await;
    let base = format!("{}/base", upstream.base);
    let (_agent, proxy, _) = proxy_agent(&api, &base, &[]).await;
    for path in [
        "/../other",
        "/..",
        "/%2e%2e/other",
        "/%2E%2e/other",
        "/.%2E/other",
        "/%2e./other",
        "/a/%2e%2e/%2e%2e/x",
        "/a/..%2f..%2fx",
        "/a/..%2F..%2Fx?q=1",
        "/a/b/../../../x",
    ] {
        let answer = exchange(proxy, get_request(path)).await;
        let hits = upstream.hits();
        assert_eq!(
            status_of(&answer),
            400,
            "{path}: {answer}\nupstream saw: {hits:?}"
        );
        assert!(
            upstream.hits().is_empty(),
            "{path} reached the upstream as {:?}",
            upstream.hits()
        );
    }
    // Inside the base path: forwarded.
    for (path, seen) in [
        ("/v1/messages?x=1", "/base/v1/messages?x=1"),
        ("/a/../b", "/base/b"),
        ("/a/%2e%2e/b", "/base/b"),
        ("/a/x%2Fy", "/base/a/x%2Fy"),
        ("/a..b/c", "/base/a..b/c"),
    ] {
        let answer = exchange(proxy, get_request(path)).await;
        assert_eq!(status_of(&answer), 200, "{path}: {answer}");
        let last = upstream.hits().last().cloned().expect("a request upstream");
        assert_eq!(last.target, seen, "{path}");
    }
}

/// Item 4: a chunked body over `--max-body-bytes` is answered 413 and nothing of it
/// reaches the upstream; one within the limit (and over the retry buffer) passes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_chunked_body_gets_413_and_nothing_reaches_the_upstream() {
    let api = ApiServer::start().await.expect("API server");
    let upstream = Upstream::start().await;
    let args = ["--retry-buffer-bytes=1024", "--max-body-bytes=65536"];
    let (_agent, proxy, _) = proxy_agent(&api, &upstream.base, &args).await;

    let answer = exchange(proxy, chunked_post("/big", 100, 1024)).await;
    let hits = upstream.hits();
    assert_eq!(status_of(&answer), 413, "{answer}\nupstream saw: {hits:?}");
    assert!(
        upstream.hits().is_empty(),
        "the upstream received {:?}",
        upstream.hits()
    );

    let answer = exchange(proxy, chunked_post("/fits", 10, 1000)).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let hits = upstream.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].body, Some(10_000));
}

/// Item 4's cost bounded: chunked bodies held whole at one time share four times
/// `--max-body-bytes`; one that would go over it gets 503 and is not forwarded, while
/// the others, once finished, pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_held_at_once_share_a_bounded_budget() {
    let api = ApiServer::start().await.expect("API server");
    let upstream = Upstream::start().await;
    let args = ["--retry-buffer-bytes=1024", "--max-body-bytes=65536"];
    let (agent, proxy, _) = proxy_agent(&api, &upstream.base, &args).await;
    let admin = agent.addr("admin server").await;

    // Five unfinished chunked bodies of 60 KiB each: 5 x 59 KiB past the retry buffer
    // is more than the 256 KiB budget, 4 x 59 KiB is not. Whichever comes last is
    // refused, in whatever order the agent reads them.
    let mut answers = tokio::task::JoinSet::new();
    let mut writers = Vec::new();
    for n in 0..5 {
        let mut req = chunked_post(&format!("/held-{n}"), 60, 1024);
        req.truncate(req.len() - 5); // without the last chunk: not finished
        let (mut rx, mut tx) = TcpStream::connect(proxy)
            .await
            .expect("connect")
            .into_split();
        tx.write_all(&req).await.expect("write");
        writers.push(tx);
        answers.spawn(async move { (n, read_answer(&mut rx).await) });
    }
    let (refused, answer) = tokio::time::timeout(PATIENCE, answers.join_next())
        .await
        .expect("one of five held bodies was refused")
        .expect("an answer")
        .expect("the reader");
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(answer.contains("too many"), "{answer}");
    assert!(upstream.hits().is_empty(), "{:?}", upstream.hits());

    // The others finish their bodies and pass whole.
    for (n, tx) in writers.iter_mut().enumerate() {
        if n != refused {
            let _ = tx.write_all(b"0\r\n\r\n").await;
        }
    }
    let mut passed = Vec::new();
    while let Ok(Some(done)) = tokio::time::timeout(PATIENCE, answers.join_next()).await {
        let (n, answer) = done.expect("the reader");
        match status_of(&answer) {
            200 => passed.push(format!("/held-{n}")),
            503 => {} // refused at the same moment as the first (rare)
            _ => panic!("/held-{n}: {answer}"),
        }
    }
    assert!(passed.len() >= 3, "{passed:?}");
    let mut seen: Vec<String> = upstream.hits().iter().map(|h| h.target.clone()).collect();
    seen.sort();
    passed.sort();
    assert_eq!(
        seen, passed,
        "only the bodies that were not refused reached the upstream"
    );
    assert!(upstream.hits().iter().all(|h| h.body == Some(60 * 1024)));
    let (_, m) = get(admin, "/metrics").await.expect("metrics");
    assert!(
        m.contains("scgtoken_agent_proxy_requests_total{result=\"busy\"}"),
        "{m}"
    );
}

/// Starts the agent binary with `proxy` as HTTPS_PROXY (and no NO_PROXY), proxy mode,
/// output captured. Killed on drop.
fn spawn_behind_proxy(api: &ApiServer, proxy: &str) -> (tokio::process::Child, Arc<Mutex<String>>) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_scg-token-operator"))
        .args([
            "agent",
            "--secret",
            TARGET,
            "--admin-addr=127.0.0.1:0",
            "--listen=127.0.0.1:0",
            "--upstream=https://api.example",
            "--log-level=debug",
        ])
        .env("KUBECONFIG", api.kubeconfig_path())
        .env("NO_COLOR", "1")
        .env("POD_NAME", "client-0")
        .env("POD_NAMESPACE", NAMESPACE)
        .env_remove("RUST_LOG")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("https_proxy")
        .env("HTTPS_PROXY", proxy)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the agent");
    let logs = capture_output(&mut child);
    (child, logs)
}

const PLANTED: &str = "s3cret-planted";

/// Item 5: a proxy password in HTTPS_PROXY never appears in what the agent prints,
/// whether the client cannot be built (socks5) or its requests fail (http).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_password_never_appears_in_what_the_agent_prints() {
    let api = ApiServer::start().await.expect("API server");

    // socks5: this build has no socks5 support, so creating the client fails.
    let (mut child, logs) =
        spawn_behind_proxy(&api, &format!("socks5://user:{PLANTED}@127.0.0.1:1"));
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("the agent exits")
        .expect("exit status");
    assert!(!status.success());
    let said = eventually_seen(
        "the agent's error",
        || async { logs.lock().unwrap().clone() },
        |l| l.contains("Kubernetes client"),
    )
    .await;
    assert!(
        !said.contains(PLANTED),
        "the proxy password leaked:\n{}",
        said.replace(PLANTED, "<PLANTED>")
    );
    assert!(
        said.contains("proxy"),
        "the error is not explained:\n{said}"
    );

    // http: the client is built; its requests through the proxy fail.
    let (mut child, logs) = spawn_behind_proxy(&api, &format!("http://user:{PLANTED}@127.0.0.1:1"));
    let said = eventually_seen(
        "the agent's watch failure",
        || async { logs.lock().unwrap().clone() },
        |l| l.contains("watching the Secret failed"),
    )
    .await;
    let _ = child.kill().await;
    assert!(
        !said.contains(PLANTED),
        "the proxy password leaked:\n{}",
        said.replace(PLANTED, "<PLANTED>")
    );
    assert!(
        said.contains("could not be reached"),
        "the error is not explained:\n{said}"
    );
}
