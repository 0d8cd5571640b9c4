//! Consumers across many rotations: the operator binary refreshes short-lived tokens
//! against the simulator, which revokes the old token the moment it issues a new one (no
//! grace); the agent serves each token in files and through its proxy; two consumer
//! loops call the simulator's protected endpoint several times a second and count
//! failed calls.

mod common {
    pub mod agent;
    pub mod harness;
}

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::agent::{Agent, Scratch, TARGET, get, http, wait_ready};
use common::harness::{Env, PATIENCE};
use testkit::scgsim::{PROTECTED_PATH, SimConfig};

const ROTATIONS: usize = 10;
/// Between calls of each consumer.
const PACE: Duration = Duration::from_millis(150);

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    failures: AtomicU64,
    /// 401s that succeeded when repeated with a newer token.
    recovered: AtomicU64,
}

/// Calls through the proxy, never touching a token.
async fn proxy_consumer(proxy: std::net::SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let client = http();
    while !stop.load(Ordering::Relaxed) {
        let ok = client
            .post(format!("http://{proxy}{PROTECTED_PATH}"))
            .body("{}")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        tally.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            tally.failures.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(PACE).await;
    }
}

/// Reads the token file on every call; on a 401 waits (up to 2 s) for the file to
/// change and calls once more.
async fn file_consumer(
    url: String,
    file: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let client = http();
    let call = |token: String| client.post(&url).bearer_auth(token).body("{}").send();
    while !stop.load(Ordering::Relaxed) {
        let token = std::fs::read_to_string(&file).unwrap_or_default();
        let mut status = call(token.clone())
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 401 {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut newer = token.clone();
            while newer == token && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
                newer = std::fs::read_to_string(&file).unwrap_or_default();
            }
            status = call(newer).await.map(|r| r.status().as_u16()).unwrap_or(0);
            if status == 200 {
                tally.recovered.fetch_add(1, Ordering::Relaxed);
            }
        }
        tally.calls.fetch_add(1, Ordering::Relaxed);
        if status != 200 {
            tally.failures.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(PACE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_make_no_failed_call_across_rotations_with_revoke_on_refresh() {
    let env = Env::start(SimConfig {
        validity_cap: Duration::from_secs(4),
        grace: Duration::ZERO,
        ..SimConfig::default()
    })
    .await;
    env.credentials("scg-credentials", "rotation-key").await;
    env.scgtoken(common::agent::SCGTOKEN, "scg-credentials", |s| {
        s.target.name = Some(TARGET.into());
    })
    .await;
    let _operator = env.operator(&[]);
    env.eventually("the first token in the target Secret", || async {
        env.target_token(TARGET).await
    })
    .await;

    let dir = Scratch::new("rotation");
    let args = vec![
        format!("--dir={}", dir.0.display()),
        format!("--upstream={}", env.sim.base_url()),
        "--allow-insecure-upstream".into(),
        "--listen=127.0.0.1:0".into(),
    ];
    let agent = Agent::spawn_in(&env.kubeconfig, &env.namespace, "consumer-0", &args);
    let (admin, proxy) = (agent.addr("admin server").await, agent.addr("proxy").await);
    wait_ready(admin, 200).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (via_proxy, via_file) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let tasks = [
        tokio::spawn(proxy_consumer(proxy, stop.clone(), via_proxy.clone())),
        tokio::spawn(file_consumer(
            env.sim.protected_url(),
            dir.0.join("token"),
            stop.clone(),
            via_file.clone(),
        )),
    ];
    let start = env.sim.successful_refreshes();
    let rotated = env
        .sim
        .wait_refreshes(start + ROTATIONS, PATIENCE * 2)
        .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("consumer");
    }
    assert!(rotated, "the operator did not rotate {ROTATIONS} times");

    let (_, metrics) = get(admin, "/metrics").await.expect("metrics");
    let retried_ok = metrics
        .lines()
        .find_map(|l| l.strip_prefix("scgtoken_agent_proxy_retries_total{result=\"ok\"} "))
        .unwrap_or("0")
        .to_string();
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "FIGURE {ROTATIONS} rotations, revoke on refresh, no grace: proxy {} calls, {} failed, {retried_ok} retried with the newer token; file {} calls, {} failed, {} recovered after a 401",
        n(&via_proxy.calls),
        n(&via_proxy.failures),
        n(&via_file.calls),
        n(&via_file.failures),
        n(&via_file.recovered),
    );
    assert!(n(&via_proxy.calls) >= 2 * ROTATIONS as u64);
    assert!(n(&via_file.calls) >= 2 * ROTATIONS as u64);
    assert_eq!(n(&via_proxy.failures), 0, "calls through the proxy failed");
    assert_eq!(n(&via_file.failures), 0, "calls with the token file failed");

    let tokens = env.sim.issued_tokens();
    common::agent::assert_no_leak("agent logs", &agent.logs(), &tokens);
    common::agent::assert_no_leak("agent metrics", &metrics, &tokens);
    env.finish().await;
}
