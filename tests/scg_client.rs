//! Drives `scg::HttpTokenApi` against small HTTP servers started on 127.0.0.1 inside each
//! test: the request it sends, how every kind of answer (or non-answer) is classified, and
//! that no error ever shows a credential or the query string that carries them. Over
//! HTTPS it talks to the SCG simulator, whose CA is trusted only when handed over.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Query},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use scg_token_operator::scg::{
    ClientError, Endpoint, HttpTokenApi, RefreshError, RefreshRequest, Refreshed, SecretString,
    TokenApi, Unreachable,
};
use testkit::{
    scgsim::{ScgSimulator, SimConfig},
    tls::TempFile,
};
use tokio::{io::AsyncReadExt, net::TcpListener, sync::mpsc, time::timeout};

// Distinctive credentials: none of them may ever show up in an error.
const KEY: &str = "planted-key-51c9";
// `+`, `&`, `=` and a space must survive query encoding.
const SECRET: &str = "planted-secret-7f3a+/&= x";
const OLD_TOKEN: &str = "planted-oldtoken-c02e";
const COOKIE: &str = "session=planted-cookie-9b1d";
const PLANTED: &[&str] = &[
    "planted-key-51c9",
    "planted-secret-7f3a",
    "planted-oldtoken-c02e",
    "planted-cookie-9b1d",
    "consumersecret=",
    "consumerkey=",
    "oldtoken=",
];

const PATH: &str = "/apptoken-refresh";
const TOKEN_BODY: &str = r#"{"accessToken":"new-token","validityTime":60}"#;
/// Upper bound on any single refresh call or server-side wait in these tests.
const BOUND: Duration = Duration::from_secs(10);

/// Serves `router` on 127.0.0.1 (any free port) for the rest of the test and returns its
/// base URL, without a trailing slash.
async fn serve(router: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// The inputs of one refresh call, owned so that a `RefreshRequest` can borrow them.
struct Call {
    endpoint: Endpoint,
    key: SecretString,
    secret: SecretString,
    old_token: SecretString,
    headers: Vec<(String, SecretString)>,
    validity: Duration,
    timeout: Duration,
}

impl Call {
    /// A call to `url` with the planted credentials and a `Cookie` header, asking for a
    /// validity of 60s with a 5s timeout.
    fn to(url: &str) -> Call {
        Call {
            endpoint: Endpoint::parse(url, true).unwrap(),
            key: SecretString::new(KEY),
            secret: SecretString::new(SECRET),
            old_token: SecretString::new(OLD_TOKEN),
            headers: vec![("Cookie".into(), SecretString::new(COOKIE))],
            validity: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        }
    }

    fn request(&self) -> RefreshRequest<'_> {
        RefreshRequest {
            endpoint: &self.endpoint,
            consumer_key: &self.key,
            consumer_secret: &self.secret,
            old_token: &self.old_token,
            validity: self.validity,
            headers: &self.headers,
            timeout: self.timeout,
        }
    }

    /// Runs the call (bounded by [`BOUND`]); any error it returns is first checked for
    /// leaked credentials.
    async fn run(&self) -> Result<Refreshed, RefreshError> {
        self.run_with(&HttpTokenApi::new().unwrap()).await
    }

    /// Like [`Call::run`], with the given client.
    async fn run_with(&self, api: &HttpTokenApi) -> Result<Refreshed, RefreshError> {
        let req = self.request();
        let result = timeout(BOUND, api.refresh(&req))
            .await
            .expect("the refresh call did not return within the bound");
        if let Err(err) = &result {
            assert_no_leak(err);
        }
        result
    }
}

fn assert_no_leak(err: &RefreshError) {
    for shown in [format!("{err}"), format!("{err:?}")] {
        for planted in PLANTED {
            assert!(
                !shown.contains(planted),
                "error {shown:?} reveals {planted:?}"
            );
        }
    }
}

async fn run(url: &str) -> Result<Refreshed, RefreshError> {
    Call::to(url).run().await
}

/// What the token server saw of a request.
#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
}

impl Seen {
    fn param(&self, name: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A server that records every request on any path and answers with `body`.
async fn recording_server(body: &'static str) -> (String, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new().fallback(
        move |method: Method,
              uri: Uri,
              Query(query): Query<Vec<(String, String)>>,
              headers: HeaderMap| {
            let tx = tx.clone();
            async move {
                let path = uri.path().to_owned();
                let _ = tx.send(Seen {
                    method,
                    path,
                    query,
                    headers,
                });
                ([(header::CONTENT_TYPE, "application/json")], body)
            }
        },
    );
    (serve(router).await, rx)
}

#[tokio::test]
async fn refresh_sends_credentials_and_returns_the_new_token() {
    let (url, mut seen) = recording_server(TOKEN_BODY).await;
    let refreshed = run(&format!("{url}{PATH}")).await.expect("refresh failed");
    assert_eq!(refreshed.token.expose(), "new-token");
    assert_eq!(refreshed.lifetime, Duration::from_secs(60));

    let req = timeout(BOUND, seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.method, Method::GET);
    assert_eq!(req.path, PATH);
    assert_eq!(req.param("consumerkey"), [KEY]);
    assert_eq!(req.param("consumersecret"), [SECRET]);
    assert_eq!(req.param("oldtoken"), [OLD_TOKEN]);
    assert_eq!(req.param("validity"), ["60"]);
    assert_eq!(
        req.query.len(),
        4,
        "unexpected query parameters: {:?}",
        req.query
    );
    assert_eq!(req.headers[header::ACCEPT], "application/json");
    assert_eq!(req.headers[header::COOKIE], COOKIE);
    assert!(
        seen.try_recv().is_err(),
        "the client sent more than one request"
    );
}

#[tokio::test]
async fn the_returned_lifetime_counts_not_the_requested_one() {
    let body = r#"{"accessToken":"new-token","validityTime":120}"#;
    let (url, mut seen) = recording_server(body).await;
    let mut call = Call::to(&format!("{url}{PATH}"));
    call.validity = Duration::from_secs(3600);
    let refreshed = call.run().await.expect("refresh failed");
    assert_eq!(refreshed.token.expose(), "new-token");
    assert_eq!(refreshed.lifetime, Duration::from_secs(120));
    let req = timeout(BOUND, seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.param("validity"), ["3600"]);
}

/// A server whose `/status/{code}` answers with that status and an error page echoing the
/// request's query string (so an error quoting the body would leak the credentials).
async fn status_server() -> String {
    async fn status(Path(code): Path<u16>, uri: Uri) -> Response {
        let page = format!("<html>error for {}</html>", uri.query().unwrap_or(""));
        (StatusCode::from_u16(code).unwrap(), page).into_response()
    }
    let router = Router::new()
        .route("/status/{code}", get(status))
        .route(
            "/limited-with-retry-after",
            get(|| async { (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "7")]) }),
        )
        .route(
            "/unavailable-with-retry-after",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "9")],
                )
            }),
        )
        .route(
            "/failing-with-retry-after",
            get(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::RETRY_AFTER, "9")],
                )
            }),
        );
    serve(router).await
}

#[tokio::test]
async fn client_errors_are_rejections() {
    let url = status_server().await;
    for status in [401, 403, 404, 400] {
        let err = run(&format!("{url}/status/{status}")).await.unwrap_err();
        assert_eq!(err, RefreshError::Rejected { status }, "HTTP {status}");
    }
}

#[tokio::test]
async fn rate_limiting_carries_retry_after() {
    let url = status_server().await;
    let err = run(&format!("{url}/limited-with-retry-after"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        RefreshError::RateLimited {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    let err = run(&format!("{url}/status/429")).await.unwrap_err();
    assert_eq!(err, RefreshError::RateLimited { retry_after: None });
}

/// A 503's Retry-After is kept (every refresh through the endpoint waits it out); other
/// server errors say nothing about when to come back.
#[tokio::test]
async fn a_503_carries_retry_after() {
    let url = status_server().await;
    let err = run(&format!("{url}/unavailable-with-retry-after"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        RefreshError::Unavailable {
            status: 503,
            retry_after: Some(Duration::from_secs(9))
        }
    );
    let err = run(&format!("{url}/failing-with-retry-after"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        RefreshError::Unavailable {
            status: 500,
            retry_after: None
        }
    );
}

#[tokio::test]
async fn server_errors_are_unavailability() {
    let url = status_server().await;
    for status in [500, 502, 503] {
        let err = run(&format!("{url}/status/{status}")).await.unwrap_err();
        assert_eq!(
            err,
            RefreshError::Unavailable {
                status,
                retry_after: None
            },
            "HTTP {status}"
        );
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let elsewhere = serve(Router::new().fallback({
        let hits = hits.clone();
        move || async move {
            hits.fetch_add(1, Ordering::SeqCst);
            TOKEN_BODY
        }
    }))
    .await;
    let redirecting = serve(Router::new().fallback(move |uri: Uri| async move {
        // Where a redirect-following client would carry the credentials.
        let to = format!("{elsewhere}/steal?{}", uri.query().unwrap_or(""));
        (StatusCode::FOUND, [(header::LOCATION, to)])
    }))
    .await;
    let err = run(&format!("{redirecting}{PATH}")).await.unwrap_err();
    assert_eq!(
        err,
        RefreshError::Unavailable {
            status: 302,
            retry_after: None
        }
    );
    // Had the client followed, the call would only have returned after this server
    // answered, so the count is final.
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
}

#[tokio::test]
async fn a_slow_answer_times_out_promptly() {
    let url = serve(Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        TOKEN_BODY
    }))
    .await;
    let mut call = Call::to(&format!("{url}{PATH}"));
    call.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = call.run().await.unwrap_err();
    assert_eq!(err, RefreshError::Timeout(Duration::from_millis(300)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_body_that_stalls_times_out_promptly() {
    let url = serve(Router::new().fallback(|| async {
        let first = futures::stream::once(async {
            Ok::<_, Infallible>(Bytes::from_static(br#"{"accessToken":"#))
        });
        let stall = futures::stream::once(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(Bytes::from_static(br#""new-token","validityTime":60}"#))
        });
        Body::from_stream(futures::StreamExt::chain(first, stall))
    }))
    .await;
    let mut call = Call::to(&format!("{url}{PATH}"));
    call.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = call.run().await.unwrap_err();
    assert_eq!(err, RefreshError::Timeout(Duration::from_millis(300)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bodies_that_are_not_token_responses_are_invalid() {
    fn padded(len: usize) -> String {
        let head = r#"{"accessToken":"new-token","validityTime":60,"pad":""#;
        let tail = r#""}"#;
        format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
    }
    let router = Router::new()
        .route("/malformed", get(|| async { r#"{"accessToken":"new-tok"# }))
        .route(
            "/html-200",
            get(|uri: Uri| async move {
                let page = format!("<html>gateway {}</html>", uri.query().unwrap_or(""));
                ([(header::CONTENT_TYPE, "text/html")], page)
            }),
        )
        .route(
            "/html-502",
            get(|| async { (StatusCode::BAD_GATEWAY, "<html>bad gateway</html>") }),
        )
        .route("/huge", get(|| async { padded(64 * 1024 + 1) }))
        .route("/exactly-64k", get(|| async { padded(64 * 1024) }));
    let url = serve(router).await;

    for path in ["/malformed", "/html-200", "/huge"] {
        let err = run(&format!("{url}{path}")).await.unwrap_err();
        assert!(
            matches!(err, RefreshError::InvalidResponse(_)),
            "{path}: {err:?}"
        );
    }
    let err = run(&format!("{url}/html-502")).await.unwrap_err();
    assert_eq!(
        err,
        RefreshError::Unavailable {
            status: 502,
            retry_after: None
        }
    );
    let ok = run(&format!("{url}/exactly-64k"))
        .await
        .expect("a 64 KiB token response is within the limit");
    assert_eq!(ok.token.expose(), "new-token");
}

#[tokio::test]
async fn a_refused_connection_is_a_transport_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let err = run(&format!("http://127.0.0.1:{port}{PATH}"))
        .await
        .unwrap_err();
    assert!(matches!(err, RefreshError::Transport(_)), "{err:?}");
}

#[tokio::test]
async fn a_connection_closed_without_an_answer_fails_cleanly() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            // Read the request head, then hang up without a word.
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            let _ = timeout(BOUND, async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
        }
    });
    let mut call = Call::to(&format!("http://{addr}{PATH}"));
    call.timeout = Duration::from_secs(2);
    let err = call.run().await.unwrap_err();
    assert!(
        matches!(err, RefreshError::Transport(_) | RefreshError::Timeout(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_unsendable_extra_header_is_an_error_not_a_panic() {
    let (url, mut seen) = recording_server(TOKEN_BODY).await;
    let mut call = Call::to(&format!("{url}{PATH}"));
    call.headers = vec![(
        "Cookie".into(),
        SecretString::new("planted-cookie-9b1d\r\nX-Injected: yes"),
    )];
    let err = call.run().await.unwrap_err();
    assert!(matches!(err, RefreshError::Transport(_)), "{err:?}");
    call.headers = vec![("Bad Name".into(), SecretString::new(COOKIE))];
    let err = call.run().await.unwrap_err();
    assert!(matches!(err, RefreshError::Transport(_)), "{err:?}");
    assert!(seen.try_recv().is_err(), "a request went out anyway");
}

/// An HTTPS simulator with the planted application registered; the call carries its seed.
async fn tls_simulator() -> (ScgSimulator, Call) {
    let sim = ScgSimulator::start(SimConfig {
        tls: true,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut call = Call::to(&sim.refresh_url());
    call.old_token = SecretString::new(sim.add_app(KEY, SECRET));
    (sim, call)
}

fn ca_file(sim: &ScgSimulator) -> TempFile {
    TempFile::write("scg-client-ca", sim.ca_pem().unwrap()).unwrap()
}

#[tokio::test]
async fn https_works_with_the_ca_bundle() {
    let (sim, call) = tls_simulator().await;
    let ca = ca_file(&sim);
    let api = HttpTokenApi::with_ca_bundle(Some(ca.path())).unwrap();
    let refreshed = call
        .run_with(&api)
        .await
        .expect("refresh over https failed");
    assert!(sim.is_valid(refreshed.token.expose()));
    assert_eq!(sim.successful_refreshes(), 1);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_clear_tls_failure() {
    let (sim, call) = tls_simulator().await;
    let (other, _) = tls_simulator().await;
    let other_ca = ca_file(&other);
    for api in [
        HttpTokenApi::new().unwrap(),
        // A bundle adds trust in its own CA, not in every certificate.
        HttpTokenApi::with_ca_bundle(Some(other_ca.path())).unwrap(),
    ] {
        let err = call.run_with(&api).await.unwrap_err();
        let RefreshError::Transport(failure) = &err else {
            panic!("not a transport failure: {err:?}");
        };
        assert_eq!(failure.class, Unreachable::Tls, "{err:?}");
        // Status shows the class, with the fix; the log says which check failed.
        assert!(err.to_string().contains("--ca-bundle"), "{err}");
        let logged = err.detail();
        assert!(
            logged.contains("(certificate not trusted (issued by an unknown CA"),
            "{logged}"
        );
        assert!(!err.to_string().contains(&sim.addr().port().to_string()));
    }
    assert_eq!(sim.refresh_calls(), 0, "a request went out over TLS");
}

fn bundle_error(contents: &[u8]) -> String {
    let file = TempFile::write("scg-client-bad-ca", contents).unwrap();
    let err = match HttpTokenApi::with_ca_bundle(Some(file.path())) {
        Err(e @ ClientError::CaBundle { .. }) => e.to_string(),
        Err(other) => panic!("not a CA bundle error: {other:?}"),
        Ok(_) => panic!("a bad CA bundle was accepted"),
    };
    assert!(err.contains(&file.path().display().to_string()), "{err}");
    err
}

#[tokio::test]
async fn a_bad_ca_bundle_is_a_clear_error() {
    let missing =
        HttpTokenApi::with_ca_bundle(Some(std::path::Path::new("/nonexistent/scg-ca-bundle.pem")));
    let Err(err) = missing else {
        panic!("a missing CA bundle was accepted")
    };
    assert!(err.to_string().contains("cannot be read"), "{err}");

    for contents in [
        &b""[..],
        b"not a certificate\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ] {
        let err = bundle_error(contents);
        assert!(err.contains("holds no certificate"), "{err}");
    }
    let err = bundle_error(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
    assert!(err.contains("not valid PEM"), "{err}");
    // Well-formed PEM around bytes that are no certificate.
    let err = bundle_error(b"-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n");
    assert!(err.contains("cannot be used as trust anchors"), "{err}");
}
