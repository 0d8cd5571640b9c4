//! Tests of the CONNECT proxy: it carries HTTPS to the simulator, counts its tunnels,
//! checks credentials and refuses what it must not carry.

use std::time::Duration;

use testkit::connect_proxy::{ConnectProxy, Refusal};
use testkit::scgsim::{ScgSimulator, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "demo-key";
const SECRET: &str = "demo-secret";
const USER: &str = "egress";
const PASSWORD: &str = "proxy-pw-5d1e";
/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

async fn tls_sim() -> ScgSimulator {
    ScgSimulator::start(SimConfig {
        tls: true,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// A fresh client (so a fresh tunnel) that trusts the simulator's CA and uses `proxy`.
fn client_via(sim: &ScgSimulator, proxy: &str) -> reqwest::Client {
    let ca = sim.ca_pem().unwrap().as_bytes();
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(proxy).unwrap())
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca).unwrap())
        .timeout(WAIT)
        .build()
        .unwrap()
}

async fn refresh(c: &reqwest::Client, sim: &ScgSimulator, old: &str) -> reqwest::Result<String> {
    let resp = c
        .get(sim.refresh_url())
        .query(&[
            ("consumerkey", KEY),
            ("consumersecret", SECRET),
            ("oldtoken", old),
            ("validity", "60"),
        ])
        .send()
        .await?
        .error_for_status()?;
    let body: serde_json::Value = resp.json().await?;
    Ok(body["accessToken"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn tunnels_are_carried_and_counted_by_target() {
    let sim = tls_sim().await;
    let proxy = ConnectProxy::start(None).await.unwrap();
    let mut token = sim.add_app(KEY, SECRET);
    for _ in 0..2 {
        token = refresh(&client_via(&sim, &proxy.url()), &sim, &token)
            .await
            .unwrap();
    }
    assert!(sim.is_valid(&token));
    let target = format!("127.0.0.1:{}", sim.addr().port());
    assert_eq!(proxy.tunnels(), [target.clone(), target]);
    assert_eq!(proxy.tunnels_to_port(sim.addr().port()), 2);
    assert_eq!(proxy.tunnels_to_port(sim.addr().port() ^ 1), 0);
    assert!(proxy.refusals().is_empty());
}

#[tokio::test]
async fn credentials_are_required_when_set() {
    let sim = tls_sim().await;
    let proxy = ConnectProxy::start(Some((USER, PASSWORD))).await.unwrap();
    let seed = sim.add_app(KEY, SECRET);

    for url in [proxy.url(), proxy.url_with_credentials(USER, "wrong")] {
        let err = refresh(&client_via(&sim, &url), &sim, &seed)
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");
    }
    let target = format!("127.0.0.1:{}", sim.addr().port());
    let refused = Refusal {
        target: target.clone(),
        status: 407,
    };
    assert_eq!(proxy.refusals(), [refused.clone(), refused]);
    assert_eq!(sim.refresh_calls(), 0);

    let with_credentials = proxy.url_with_credentials(USER, PASSWORD);
    refresh(&client_via(&sim, &with_credentials), &sim, &seed)
        .await
        .unwrap();
    assert_eq!(proxy.tunnels(), [target]);
    assert_eq!(sim.successful_refreshes(), 1);
}

/// Sends `request` to the proxy and returns its status line.
async fn raw(proxy: &ConnectProxy, request: &str) -> String {
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, conn.read_to_string(&mut answer))
        .await
        .expect("the proxy did not close the connection")
        .unwrap();
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn only_connect_to_loopback_is_carried() {
    let proxy = ConnectProxy::start(None).await.unwrap();
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cases = [
        ("GET http://127.0.0.1:1/ HTTP/1.1\r\n\r\n", 405),
        ("CONNECT example.com:443 HTTP/1.1\r\n\r\n", 403),
        ("CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n", 403),
        ("CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n", 400),
        (
            &format!("CONNECT 127.0.0.1:{closed_port} HTTP/1.1\r\n\r\n"),
            502,
        ),
    ];
    for (request, status) in cases {
        let line = raw(&proxy, request).await;
        assert!(
            line.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request:?}: {line}"
        );
    }
    let statuses: Vec<u16> = proxy.refusals().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [405, 403, 403, 400, 502]);
    assert!(proxy.tunnels().is_empty());
}
