//! The operator's admin server: its address, health, readiness and metrics endpoints.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::harness::{Operator, PATIENCE};

/// A plain-http client for the admin server (never through a proxy).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
}

/// The admin server's address, from the `admin server listening addr=...` log line.
pub async fn admin_addr(op: &Operator) -> SocketAddr {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = op.logs().lines().find_map(|line| {
            let (_, rest) = line.split_once("admin server listening")?;
            let (_, addr) = rest.split_once("addr=")?;
            addr.split_whitespace().next()?.parse().ok()
        });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "the operator never logged its admin address:\n{}",
            op.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET `path` on the admin server: (status, body), or `None` if it did not answer.
pub async fn get_path(
    http: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
) -> Option<(u16, String)> {
    let resp = http.get(format!("http://{addr}{path}")).send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// Whether `/readyz` answers 200 within `within` (polled).
pub async fn readyz_ok(http: &reqwest::Client, addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if get_path(http, addr, "/readyz").await.map(|r| r.0) == Some(200) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Why a replica's `/readyz` is wrong, for the failure message: kube-runtime logs at
/// debug level when the controller's store became ready.
pub fn not_ready_message(op: &Operator) -> String {
    let logs = op.logs();
    format!(
        "/readyz is not 200 although the ScgToken cache synced: kube-runtime logged 'store is \
         ready, starting runner' {} time(s), the operator logged 'caches synced; ready' {} \
         time(s)",
        logs.matches("store is ready, starting runner").count(),
        logs.matches("caches synced; ready").count()
    )
}

/// The `/metrics` text, if the admin server answers 200.
pub async fn metrics_text(http: &reqwest::Client, addr: SocketAddr) -> Option<String> {
    get_path(http, addr, "/metrics")
        .await
        .filter(|(code, _)| *code == 200)
        .map(|(_, body)| body)
}
