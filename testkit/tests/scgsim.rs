//! Tests of the SCG simulator, driven over HTTP like the operator drives it.

use std::time::Duration;

use reqwest::StatusCode;
use testkit::scgsim::{
    DeadReason, Endpoint, Fault, Outcome, REFRESH_PATH, ScgSimulator, SimConfig,
};

const KEY: &str = "demo-key";
const SECRET: &str = "demo-secret";
/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap()
}

/// A client that trusts only `ca_pem`.
fn client_trusting(ca_pem: &str) -> reqwest::Client {
    let certs = reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .tls_certs_only(certs)
        .build()
        .unwrap()
}

fn tls() -> SimConfig {
    SimConfig {
        tls: true,
        ..short_lived()
    }
}

async fn start(config: SimConfig) -> ScgSimulator {
    ScgSimulator::start(config).await.unwrap()
}

fn short_lived() -> SimConfig {
    SimConfig {
        validity_cap: Duration::from_secs(3),
        ..SimConfig::default()
    }
}

async fn refresh_at(
    c: &reqwest::Client,
    url: &str,
    secret: &str,
    old: &str,
    validity: u64,
) -> reqwest::Result<reqwest::Response> {
    c.get(url)
        .header("Accept", "application/json")
        .query(&[
            ("consumerkey", KEY),
            ("consumersecret", secret),
            ("oldtoken", old),
            ("validity", &validity.to_string()),
        ])
        .send()
        .await
}

async fn refresh(sim: &ScgSimulator, old: &str) -> reqwest::Response {
    refresh_at(&client(), &sim.refresh_url(), SECRET, old, 3600)
        .await
        .unwrap()
}

async fn call_protected(sim: &ScgSimulator, token: &str) -> StatusCode {
    client()
        .post(sim.protected_url())
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

/// Reads a success body: (accessToken, validityTime).
async fn new_token(resp: reqwest::Response) -> (String, u64) {
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    (
        body["accessToken"].as_str().unwrap().to_owned(),
        body["validityTime"].as_u64().unwrap(),
    )
}

/// The fault answered, and nothing about the token chain changed.
async fn assert_untouched(sim: &ScgSimulator, seed: &str) {
    assert_eq!(sim.current_token(KEY).as_deref(), Some(seed));
    assert!(sim.is_valid(seed));
    assert_eq!(sim.successful_refreshes(), 0);
    assert_eq!(sim.issued_tokens(), vec![seed.to_owned()]);
    assert_eq!(call_protected(sim, seed).await, StatusCode::OK);
}

#[tokio::test]
async fn success_chain_revokes_old_token_and_records_its_use() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    assert!(sim.is_valid(&seed));
    assert_eq!(call_protected(&sim, &seed).await, StatusCode::OK);

    let (t1, _) = new_token(refresh(&sim, &seed).await).await;
    assert_ne!(t1, seed);
    assert_eq!(t1.len(), 36, "uuid-shaped: {t1}");
    assert!(!sim.is_valid(&seed));
    assert!(sim.is_valid(&t1));
    assert_eq!(sim.current_token(KEY).as_deref(), Some(t1.as_str()));
    assert_eq!(call_protected(&sim, &t1).await, StatusCode::OK);
    assert_eq!(call_protected(&sim, &seed).await, StatusCode::UNAUTHORIZED);

    let (t2, _) = new_token(refresh(&sim, &t1).await).await;
    assert_eq!(call_protected(&sim, &t2).await, StatusCode::OK);
    // The revoked seed is refused as oldtoken too.
    assert_eq!(
        refresh(&sim, &seed).await.status(),
        StatusCode::UNAUTHORIZED
    );

    let uses = sim.revoked_uses();
    assert_eq!(uses.len(), 2, "{uses:?}");
    assert_eq!(
        (uses[0].token.as_str(), uses[0].endpoint, uses[0].reason),
        (seed.as_str(), Endpoint::Protected, DeadReason::Revoked)
    );
    assert_eq!(
        (uses[1].token.as_str(), uses[1].endpoint, uses[1].reason),
        (seed.as_str(), Endpoint::Refresh, DeadReason::Revoked)
    );

    assert_eq!(
        sim.issued_tokens(),
        vec![seed.clone(), t1.clone(), t2.clone()]
    );
    assert_eq!(sim.refresh_calls(), 3);
    assert_eq!(sim.successful_refreshes(), 2);
    assert!(sim.wait_refreshes(2, WAIT).await);
    let log = sim.refresh_log();
    assert_eq!(log[0].old_token.as_deref(), Some(seed.as_str()));
    assert_eq!(log[0].issued(), Some(t1.as_str()));
    assert_eq!(log[1].issued(), Some(t2.as_str()));
    assert_eq!(
        log[2].outcome,
        Outcome::RejectedToken {
            reason: Some(DeadReason::Revoked)
        }
    );
    assert!(
        log[0]
            .headers
            .iter()
            .any(|(k, v)| k == "accept" && v == "application/json")
    );
}

#[tokio::test]
async fn v1_path_also_refreshes() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    let resp = refresh_at(&client(), &sim.refresh_url_v1(), SECRET, &seed, 60)
        .await
        .unwrap();
    let (t1, _) = new_token(resp).await;
    assert!(sim.is_valid(&t1));
    assert_eq!(sim.refresh_log()[0].path, "/v1/apptoken-refresh");
}

#[tokio::test]
async fn wrong_secret_or_unknown_token_is_401_json_and_changes_nothing() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    let c = client();

    let resp = refresh_at(&c, &sim.refresh_url(), "wrong", &seed, 60)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    assert!(!body.to_string().contains(SECRET));

    let resp = refresh_at(&c, &sim.refresh_url(), SECRET, "not-a-token", 60)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        call_protected(&sim, "not-a-token").await,
        StatusCode::UNAUTHORIZED
    );

    let resp = c.get(sim.refresh_url()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    let outcomes: Vec<_> = sim.refresh_log().into_iter().map(|c| c.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::BadCredentials,
            Outcome::RejectedToken { reason: None },
            Outcome::BadRequest
        ]
    );
    // Unknown tokens were never issued, so they are not "revoked uses".
    assert!(sim.revoked_uses().is_empty());
    assert_untouched(&sim, &seed).await;
}

#[tokio::test]
async fn validity_is_capped_and_tokens_expire() {
    let sim = start(SimConfig {
        validity_cap: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    let seed = sim.add_app(KEY, SECRET);
    assert!(sim.remaining_validity(&seed).unwrap() > Duration::from_secs(30 * 24 * 3600));

    let (t1, validity) = new_token(refresh(&sim, &seed).await).await;
    assert_eq!(validity, 2);
    assert!(sim.is_valid(&t1));
    // Real time is what expires tokens: let the two seconds pass.
    tokio::time::sleep(sim.remaining_validity(&t1).unwrap() + Duration::from_millis(50)).await;
    assert!(!sim.is_valid(&t1));
    assert_eq!(call_protected(&sim, &t1).await, StatusCode::UNAUTHORIZED);
    // An expired current token cannot be refreshed either.
    assert_eq!(refresh(&sim, &t1).await.status(), StatusCode::UNAUTHORIZED);
    let reasons: Vec<_> = sim
        .revoked_uses()
        .into_iter()
        .map(|u| (u.endpoint, u.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            (Endpoint::Protected, DeadReason::Expired),
            (Endpoint::Refresh, DeadReason::Expired)
        ]
    );

    // A request below the cap is honoured.
    let sim = start(SimConfig::default()).await;
    let seed = sim.add_app(KEY, SECRET);
    let (_, validity) = new_token(refresh(&sim, &seed).await).await;
    assert_eq!(validity, 3600);
}

#[tokio::test]
async fn grace_period_keeps_old_token_usable_but_not_refreshable() {
    let grace = Duration::from_secs(2);
    let sim = start(SimConfig {
        grace,
        validity_cap: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await;
    let seed = sim.add_app(KEY, SECRET);
    let (t1, _) = new_token(refresh(&sim, &seed).await).await;
    // The grace period started at the latest now.
    let grace_over = tokio::time::Instant::now() + grace;
    assert!(sim.is_valid(&seed), "still valid during the grace period");
    assert_eq!(call_protected(&sim, &seed).await, StatusCode::OK);
    // Only the current token is accepted as oldtoken.
    assert_eq!(
        refresh(&sim, &seed).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(sim.current_token(KEY).as_deref(), Some(t1.as_str()));

    // Real time ends the grace period: let it pass.
    tokio::time::sleep_until(grace_over + Duration::from_millis(50)).await;
    assert!(!sim.is_valid(&seed));
    assert_eq!(call_protected(&sim, &seed).await, StatusCode::UNAUTHORIZED);
    assert!(sim.is_valid(&t1));
    let uses: Vec<_> = sim
        .revoked_uses()
        .into_iter()
        .map(|u| (u.endpoint, u.reason))
        .collect();
    assert_eq!(
        uses,
        [
            (Endpoint::Refresh, DeadReason::Revoked),
            (Endpoint::Protected, DeadReason::Revoked)
        ]
    );
}

#[tokio::test]
async fn regenerate_replaces_and_revokes() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    let seed2 = sim.regenerate(KEY);
    assert_ne!(seed, seed2);
    assert!(!sim.is_valid(&seed));
    assert_eq!(sim.current_token(KEY).as_deref(), Some(seed2.as_str()));
    assert_eq!(
        refresh(&sim, &seed).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (t1, _) = new_token(refresh(&sim, &seed2).await).await;
    assert!(sim.is_valid(&t1));
    assert_eq!(sim.issued_tokens(), vec![seed, seed2, t1]);
}

#[tokio::test]
async fn status_fault_answers_with_body_for_n_calls_then_clears() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    sim.set_fault(
        Fault::Status {
            status: 500,
            body: r#"{"error":"internal"}"#.into(),
        },
        Some(2),
    );
    for _ in 0..2 {
        let resp = refresh(&sim, &seed).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.text().await.unwrap(), r#"{"error":"internal"}"#);
    }
    assert_untouched(&sim, &seed).await;
    assert!(matches!(
        sim.refresh_log()[0].outcome,
        Outcome::Fault(Fault::Status { status: 500, .. })
    ));
    // Two calls used it up.
    new_token(refresh(&sim, &seed).await).await;
    assert_eq!(sim.refresh_calls(), 3);
}

#[tokio::test]
async fn too_many_requests_has_retry_after() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    sim.set_fault(
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
        Some(1),
    );
    let resp = refresh(&sim, &seed).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_untouched(&sim, &seed).await;
}

#[tokio::test]
async fn malformed_json_and_html_gateway_page() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);

    sim.set_fault(Fault::MalformedJson, Some(1));
    let resp = refresh(&sim, &seed).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.json::<serde_json::Value>().await.is_err());

    sim.set_fault(Fault::HtmlBadGateway, Some(1));
    let resp = refresh(&sim, &seed).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(resp.text().await.unwrap().contains("<html>"));
    assert_untouched(&sim, &seed).await;
}

#[tokio::test]
async fn dropped_connection_is_a_transport_error() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    sim.set_fault(Fault::DropConnection, Some(1));
    let err = refresh_at(&client(), &sim.refresh_url(), SECRET, &seed, 60)
        .await
        .expect_err("no HTTP response expected");
    assert!(err.status().is_none(), "{err:?}");
    assert!(!err.is_timeout(), "closed, not timed out: {err:?}");
    assert_eq!(sim.refresh_calls(), 1, "the client did not retry");
    assert_untouched(&sim, &seed).await;
    assert_eq!(
        sim.refresh_log()[0].outcome,
        Outcome::Fault(Fault::DropConnection)
    );
}

#[tokio::test]
async fn outage_lasts_until_cleared() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    sim.set_fault(Fault::Outage, None);
    for _ in 0..3 {
        assert_eq!(
            refresh(&sim, &seed).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert!(sim.wait_refresh_calls(3, WAIT).await);
    assert_untouched(&sim, &seed).await;
    sim.clear_faults();
    new_token(refresh(&sim, &seed).await).await;
}

#[tokio::test]
async fn slow_response_then_success() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    let delay = Duration::from_millis(300);
    sim.set_fault(Fault::Delay(delay), Some(1));
    let started = std::time::Instant::now();
    let (t1, _) = new_token(refresh(&sim, &seed).await).await;
    assert!(started.elapsed() >= delay);
    assert!(sim.is_valid(&t1));
}

#[tokio::test]
async fn delay_combines_with_an_answering_fault() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    let delay = Duration::from_millis(200);
    sim.set_fault(Fault::Delay(delay), Some(1));
    sim.set_fault(Fault::Outage, Some(1));
    let started = std::time::Instant::now();
    assert_eq!(
        refresh(&sim, &seed).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(started.elapsed() >= delay);
    assert_untouched(&sim, &seed).await;
}

#[tokio::test]
async fn client_timeout_during_delay_still_rotates_the_token() {
    let sim = start(short_lived()).await;
    let seed = sim.add_app(KEY, SECRET);
    sim.set_fault(Fault::Delay(Duration::from_millis(400)), Some(1));
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = refresh_at(&c, &sim.refresh_url(), SECRET, &seed, 60)
        .await
        .expect_err("client gives up first");
    assert!(err.is_timeout(), "{err:?}");
    // The worst case of the reference: the server rotated, the client never saw it.
    assert!(sim.wait_refreshes(1, WAIT).await);
    assert!(!sim.is_valid(&seed));
    assert_eq!(
        refresh(&sim, &seed).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn wait_refreshes_times_out_without_progress() {
    let sim = start(short_lived()).await;
    sim.add_app(KEY, SECRET);
    assert!(!sim.wait_refreshes(1, Duration::from_millis(50)).await);
    assert!(sim.wait_refreshes(0, Duration::from_millis(50)).await);
}

#[tokio::test]
async fn dropping_the_simulator_stops_it() {
    let sim = start(short_lived()).await;
    let url = sim.refresh_url();
    drop(sim);
    // The listener is closed once the aborted accept task is dropped; allow it a moment.
    let c = client();
    let mut refused = false;
    for _ in 0..100 {
        if c.get(&url).send().await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "server still answering after drop");
}

#[tokio::test]
async fn tls_mode_serves_https_to_clients_that_trust_its_ca() {
    let sim = start(tls()).await;
    assert!(sim.refresh_url().starts_with("https://127.0.0.1:"));
    let c = client_trusting(sim.ca_pem().expect("a CA in TLS mode"));
    let seed = sim.add_app(KEY, SECRET);
    let resp = refresh_at(&c, &sim.refresh_url(), SECRET, &seed, 60).await;
    let (token, _) = new_token(resp.unwrap()).await;
    // The certificate names localhost too.
    let url = format!("https://localhost:{}{REFRESH_PATH}", sim.addr().port());
    let (next, _) = new_token(refresh_at(&c, &url, SECRET, &token, 60).await.unwrap()).await;
    assert!(sim.is_valid(&next));
    assert_eq!(sim.successful_refreshes(), 2);
    // Plain http to the TLS port gets no HTTP answer.
    let plain = format!("http://{}{REFRESH_PATH}", sim.addr());
    assert!(client().get(plain).send().await.is_err());
    assert_eq!(sim.refresh_calls(), 2);
}

#[tokio::test]
async fn each_tls_simulator_has_a_ca_of_its_own() {
    let (a, b) = (start(tls()).await, start(tls()).await);
    let (ca_a, ca_b) = (a.ca_pem().unwrap(), b.ca_pem().unwrap());
    assert!(ca_a.starts_with("-----BEGIN CERTIFICATE-----"), "{ca_a}");
    assert_ne!(ca_a, ca_b);
    let seed = b.add_app(KEY, SECRET);
    let err = refresh_at(&client_trusting(ca_a), &b.refresh_url(), SECRET, &seed, 60)
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(b.refresh_calls(), 0);
    assert!(start(short_lived()).await.ca_pem().is_none());
}

/// The binary's `--ca-out` writes the CA that its HTTPS certificate chains to.
#[tokio::test]
async fn the_binary_writes_its_ca_for_clients_to_trust() {
    use tokio::io::AsyncBufReadExt;
    let ca_file = testkit::tls::TempFile::write("scgsim-ca-out-test", "").unwrap();
    // The simulator creates the file itself; the placeholder only reserved the name.
    std::fs::remove_file(ca_file.path()).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_scg-simulator"))
        .arg("--ca-out")
        .arg(ca_file.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut seed) = (None, None);
    while seed.is_none() {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the simulator printed nothing in time")
            .unwrap()
            .expect("the simulator exited early");
        if let Some(u) = line.strip_prefix("refresh URL:") {
            url = Some(u.trim().to_owned());
        }
        if let Some(s) = line.strip_prefix("seed token:") {
            seed = Some(s.trim().to_owned());
        }
    }
    let url = url.expect("no refresh URL printed");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let ca = std::fs::read_to_string(ca_file.path()).unwrap();
    let resp = client_trusting(&ca)
        .get(&url)
        .query(&[
            ("consumerkey", "demo-consumer-key"),
            ("consumersecret", "demo-consumer-secret"),
            ("oldtoken", seed.as_deref().unwrap_or_default()),
            ("validity", "60"),
        ])
        .send()
        .await
        .unwrap();
    new_token(resp).await;
}
