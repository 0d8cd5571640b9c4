//! Harness for the token agent's tests: the real `scg-token-operator agent` binary
//! against the in-memory API server, with the target Secret written the way the operator
//! writes it ([`chain::desired_secret`]).
#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use scg_token_operator::{
    chain::{self, Chain},
    consumers::{self, AgentReport},
    crd::{AGENT_SCGTOKEN_LABEL, ScgToken, ScgTokenSpec},
    policy::TokenTimes,
    scg::SecretString,
};

pub use super::harness::PATIENCE;
use super::harness::capture_output;

pub const NAMESPACE: &str = "default";
pub const SCGTOKEN: &str = "messaging";
pub const TARGET: &str = "messaging-scg-token";

/// The ScgToken whose chain the test plays: the owner of the target Secret.
pub fn owner() -> ScgToken {
    let mut spec = ScgTokenSpec::new("scg-credentials");
    spec.target.name = Some(TARGET.into());
    let mut t = ScgToken::new(SCGTOKEN, spec);
    t.metadata.namespace = Some(NAMESPACE.into());
    t
}

/// The fingerprint the operator reports for `token` (its `status.tokenFingerprint`).
pub fn fingerprint(token: &str) -> String {
    chain::fingerprint(&owner(), token)
}

/// Writes `token`, valid for `lifetime` from now, into the target Secret exactly as the
/// operator does. Returns when the API server has accepted it.
pub async fn put_token(secrets: &Api<Secret>, token: &str, lifetime: Duration) -> Timestamp {
    let now = Timestamp::now();
    let expires = now + SignedDuration::try_from(lifetime).unwrap();
    put_chain(secrets, token, now, expires, |_| {}).await
}

/// Writes a chain the way the operator does, then lets `tamper` change the Secret.
pub async fn put_chain(
    secrets: &Api<Secret>,
    token: &str,
    issued_at: Timestamp,
    expires_at: Timestamp,
    tamper: impl Fn(&mut Secret),
) -> Timestamp {
    let chain = Chain {
        token: SecretString::new(token),
        times: TokenTimes {
            issued_at: Some(issued_at),
            expires_at: Some(expires_at),
        },
        seed_fingerprint: "seed".into(),
    };
    for _ in 0..5 {
        // A read can meet a pooled connection the test server has just closed (tests
        // drop its watches on purpose): try again, as the write does.
        let Ok(base) = secrets.get_opt(TARGET).await else {
            continue;
        };
        let mut desired = chain::desired_secret(&owner(), base.as_ref(), &chain);
        tamper(&mut desired);
        let written = match base {
            Some(_) => {
                secrets
                    .replace(TARGET, &PostParams::default(), &desired)
                    .await
            }
            None => secrets.create(&PostParams::default(), &desired).await,
        };
        if written.is_ok() {
            return Timestamp::now();
        }
    }
    panic!("could not read and write the target Secret in 5 attempts");
}

/// A running agent. Killed when dropped (also when a test panics).
pub struct Agent {
    child: tokio::process::Child,
    pub logs: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `scg-token-operator agent` for the target Secret with `extra` flags, as pod
    /// `pod` in [`NAMESPACE`].
    pub fn spawn(kubeconfig: &Path, pod: &str, extra: &[String]) -> Agent {
        Agent::spawn_in(kubeconfig, NAMESPACE, pod, extra)
    }

    /// Like [`Agent::spawn`], in `namespace`.
    pub fn spawn_in(kubeconfig: &Path, namespace: &str, pod: &str, extra: &[String]) -> Agent {
        let mut args: Vec<String> = [
            "agent",
            "--secret",
            TARGET,
            "--admin-addr=127.0.0.1:0",
            "--log-level=debug",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_scg-token-operator"))
            .args(&args)
            .env("KUBECONFIG", kubeconfig)
            .env("NO_COLOR", "1")
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", namespace)
            .env("POD_UID", format!("uid-{pod}"))
            .env_remove("RUST_LOG")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("all_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the agent");
        let logs = capture_output(&mut child);
        Agent { child, logs }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the agent is running")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM and the exit status, waited for at most `within`.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()?
            .ok()
    }

    /// The address logged as `<what> listening addr=...`.
    pub async fn addr(&self, what: &str) -> SocketAddr {
        let needle = format!("{what} listening");
        eventually(&format!("the agent's {what} address"), || async {
            self.logs().lines().find_map(|line| {
                let (_, rest) = line.split_once(&needle)?;
                let (_, addr) = rest.split_once("addr=")?;
                addr.split_whitespace().next()?.parse().ok()
            })
        })
        .await
    }

    /// Waits until the process has logged a line containing `needle`.
    pub async fn wait_log(&self, needle: &str) {
        let found = wait_until(PATIENCE, || async { self.logs().contains(needle) }).await;
        assert!(found, "the agent never logged {needle:?}:\n{}", self.logs());
    }
}

/// A plain-http client that never uses a proxy.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("HTTP client")
}

/// GET `path` on `addr`: (status, body), or `None` if nothing answered.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let resp = http()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// Polls `check` every 20 ms until it returns `Some`, for at most [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    super::harness::poll_until(what, Duration::from_millis(20), check).await
}

/// Looks every 20 ms until `done` holds for what `look` saw, for at most
/// [`super::harness::PATIENCE`]; a timeout shows the last thing seen.
pub async fn eventually_seen<T, F, Fut>(what: &str, mut look: F, done: impl Fn(&T) -> bool) -> T
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + super::harness::PATIENCE;
    loop {
        let seen = look().await;
        if done(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last seen: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes; whether it held.
pub async fn wait_until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for `/readyz` to answer `status`.
pub async fn wait_ready(admin: SocketAddr, status: u16) {
    eventually(&format!("/readyz {status}"), || async {
        (get(admin, "/readyz").await?.0 == status).then_some(())
    })
    .await;
}

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("scg-agent-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A unique, token-shaped value. Long, so that a torn read would show.
pub fn new_token(n: usize) -> String {
    let nanos = std::time::UNIX_EPOCH
        .elapsed()
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("tok-{n:03}-{nanos:x}-{}", "x".repeat(2000))
}

/// The agents' reports for the ScgToken, read from their Leases.
pub async fn reports(client: &kube::Client) -> Vec<AgentReport> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let list = leases
        .list(&ListParams::default().labels(&format!("{AGENT_SCGTOKEN_LABEL}={SCGTOKEN}")))
        .await
        .expect("list leases");
    list.items
        .iter()
        .filter_map(consumers::report_from_lease)
        .collect()
}

/// Fails if any of `secrets` appears in `text` (logs or metrics), showing the line with
/// the secret masked.
pub fn assert_no_leak(what: &str, text: &str, secrets: &[String]) {
    assert!(!text.is_empty(), "no {what} captured");
    for s in secrets {
        // Long tokens: a prefix is enough to catch a leak, also a truncated one.
        let probe = &s[..s.len().min(24)];
        if let Some(line) = text.lines().find(|l| l.contains(probe)) {
            panic!(
                "a token leaked into the {what}: {}",
                line.replace(probe, "<TOKEN>")
            );
        }
    }
}
