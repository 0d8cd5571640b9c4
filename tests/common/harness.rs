//! End-to-end harness: the real `scg-token-operator` binary against the in-memory API
//! server (or a real cluster) and the SCG simulator.
//!
//! Set `SCG_E2E_KUBECONFIG=/path/to/kubeconfig` to run the same tests against a real
//! cluster (kind, k3d, ...): each test then works in a namespace of its own, created and
//! deleted by the test, and the operator runs on this machine with that kubeconfig (so
//! it reaches the simulator on 127.0.0.1). Tests that need fault injection or request
//! counters of the in-memory server are ignored there (`cfg(real_cluster)`, set by
//! build.rs from the same variable) and say why.
#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Namespace, Secret},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, CustomResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use scg_token_operator::{
    access,
    crd::{ScgToken, ScgTokenSpec},
};
use testkit::{
    apiserver::ApiServer,
    scgsim::{RefreshCall, ScgSimulator, SimConfig},
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The consumer secret planted in every test; no log line may ever contain it.
pub const CONSUMER_SECRET: &str = "e2e-planted-consumer-secret-3b9f";
pub const CONSUMER_KEY: &str = "e2e-consumer-key";

/// A consumer key the simulator does not know: its refreshes are rejected (401).
pub const UNKNOWN_CONSUMER: &str = "e2e-unknown-consumer";
/// The seed planted next to [`UNKNOWN_CONSUMER`]; it must not leak either.
pub const UNKNOWN_SEED: &str = "e2e-made-up-seed-token-71c2";

/// Name of the Lease (the operator's default `--lease-name`).
pub const LEASE_NAME: &str = "scg-token-operator";

/// The CRD the operator's ScgTokens are declared by.
pub const CRD_NAME: &str = "scgtokens.scgtoken.io";

/// Upper bound of any wait in these tests; generous for a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Env {
    /// The in-memory API server; `None` against a real cluster.
    pub api: Option<ApiServer>,
    pub kubeconfig: PathBuf,
    pub client: kube::Client,
    pub sim: ScgSimulator,
    pub namespace: String,
    logs: Mutex<Vec<Arc<Mutex<String>>>>,
}

impl Env {
    /// Starts the servers (or connects to the real cluster), installs the CRD and
    /// prepares a namespace.
    pub async fn start(sim: SimConfig) -> Env {
        let sim = ScgSimulator::start(sim).await.expect("start simulator");
        let cluster = std::env::var_os("SCG_E2E_KUBECONFIG").filter(|v| !v.is_empty());
        let real_cluster = cluster.is_some();
        assert_eq!(
            real_cluster,
            cfg!(real_cluster),
            "SCG_E2E_KUBECONFIG is {} now but was {} when these tests were built (build.rs \
             decides which tests need the in-memory server from it): run them through \
             cargo test",
            if real_cluster { "set" } else { "unset" },
            if cfg!(real_cluster) { "set" } else { "unset" },
        );
        let (api, kubeconfig, client, namespace) = match cluster {
            Some(path) => {
                let path = PathBuf::from(path);
                let kc = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
                let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .expect("kubeconfig");
                let client = kube::Client::try_from(config).expect("client");
                let ns = format!("scg-e2e-{}", std::process::id() ^ rand_u32());
                let nss: Api<Namespace> = Api::all(client.clone());
                let obj = Namespace {
                    metadata: ObjectMeta {
                        name: Some(ns.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                nss.create(&PostParams::default(), &obj)
                    .await
                    .expect("namespace");
                (None, path, client, ns)
            }
            None => {
                let api = ApiServer::start().await.expect("start API server");
                let path = api.kubeconfig_path().to_path_buf();
                let client = api.client();
                (Some(api), path, client, "default".to_string())
            }
        };
        install_crd(&client, &namespace).await;
        Env {
            api,
            kubeconfig,
            client,
            sim,
            namespace,
            logs: Mutex::new(Vec::new()),
        }
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn tokens(&self) -> Api<ScgToken> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Registers an app with the simulator and writes its credentials Secret. Returns
    /// the seed token.
    pub async fn credentials(&self, secret_name: &str, consumer_key: &str) -> String {
        let seed = self.sim.add_app(consumer_key, CONSUMER_SECRET);
        self.put_credentials(secret_name, consumer_key, &seed).await;
        seed
    }

    /// Writes (or overwrites) a credentials Secret, opted in for the operator.
    pub async fn put_credentials(&self, secret_name: &str, consumer_key: &str, seed: &str) {
        self.put_credentials_opted(secret_name, consumer_key, seed, true)
            .await;
    }

    /// Writes (or overwrites) a credentials Secret, with the opt-in label or without it
    /// (as a release without the opt-in found them).
    pub async fn put_credentials_opted(
        &self,
        secret_name: &str,
        consumer_key: &str,
        seed: &str,
        opted_in: bool,
    ) {
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.into()),
                ..Default::default()
            },
            string_data: Some(
                [
                    ("consumerKey", consumer_key),
                    ("consumerSecret", CONSUMER_SECRET),
                    ("accessToken", seed),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        };
        if opted_in {
            access::opt_in(&mut secret.metadata);
        }
        self.secrets()
            .patch(
                secret_name,
                &PatchParams::apply("scg-e2e").force(),
                &Patch::Apply(&secret),
            )
            .await
            .expect("write credentials");
    }

    /// Creates an ScgToken pointing at the simulator.
    pub async fn scgtoken(&self, name: &str, credentials: &str, f: impl FnOnce(&mut ScgTokenSpec)) {
        let mut spec = ScgTokenSpec::new(credentials);
        spec.endpoint = self.sim.refresh_url();
        spec.validity = "30s".into();
        f(&mut spec);
        let mut obj = ScgToken::new(name, spec);
        obj.metadata.namespace = Some(self.namespace.clone());
        self.tokens()
            .create(&PostParams::default(), &obj)
            .await
            .expect("create ScgToken");
    }

    /// The endpoint hosts the operator allows unless a test says otherwise: the
    /// simulators listen on loopback (by address, or by name).
    pub const ENDPOINTS: &'static str = "127.0.0.1,localhost";

    /// Starts the operator binary with leader election off, [`Env::ENDPOINTS`] allowed,
    /// and `extra` flags.
    pub fn operator(&self, extra: &[&str]) -> Operator {
        self.operator_with_env(extra, &[])
    }

    /// Like [`Env::operator`], with environment variables set (`Some`) or removed
    /// (`None`) for the operator only: the test process's own environment is shared by
    /// every test thread and stays untouched.
    pub fn operator_with_env(&self, extra: &[&str], envs: &[(&str, Option<&str>)]) -> Operator {
        let mut args = vec![
            "run".to_string(),
            "--allow-insecure-endpoints".into(),
            "--admin-addr=127.0.0.1:0".into(),
            format!("--namespace={}", self.namespace),
            format!("--lease-namespace={}", self.namespace),
            "--log-level=debug".into(),
        ];
        if !extra.iter().any(|a| a.starts_with("--leader-elect")) {
            args.push("--leader-elect=false".into());
        }
        if !extra.iter().any(|a| a.starts_with("--allowed-endpoints")) {
            args.push(format!("--allowed-endpoints={}", Env::ENDPOINTS));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let op = Operator::spawn(&self.kubeconfig, &args, envs);
        self.logs.lock().unwrap().push(op.logs.clone());
        op
    }

    /// The token currently in a target Secret.
    pub async fn target_token(&self, secret: &str) -> Option<String> {
        let s = self.secrets().get_opt(secret).await.ok()??;
        let b = s.data?.get("accessToken")?.0.clone();
        String::from_utf8(b).ok()
    }

    /// The Ready condition's (status, reason) of an ScgToken.
    pub async fn ready(&self, name: &str) -> Option<(String, String)> {
        let t = self.tokens().get_opt(name).await.ok()??;
        let c = t.ready_condition()?;
        Some((c.status.clone(), c.reason.clone()))
    }

    /// Polls `check` (every 50 ms) until it returns `Some`, for at most [`PATIENCE`].
    pub async fn eventually<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        poll_until(what, Duration::from_millis(50), check).await
    }

    /// Every log line of every operator this test started, so far.
    pub fn all_logs(&self) -> String {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.lock().unwrap().clone())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Fails if any log line holds the consumer secret or any token the simulator
    /// issued; then cleans up. Call at the end of every test.
    pub async fn finish(self) {
        let logs = self.all_logs();
        assert!(!logs.is_empty(), "no operator logs were captured");
        let mut planted = self.sim.issued_tokens();
        planted.push(CONSUMER_SECRET.to_string());
        for secret in &planted {
            assert!(
                !logs.contains(secret.as_str()),
                "a secret leaked into the logs: {}",
                logs.lines()
                    .find(|l| l.contains(secret.as_str()))
                    .unwrap_or_default()
                    .replace(secret.as_str(), "<SECRET>")
            );
        }
        self.close().await;
    }

    /// Ends a test that started no operator through [`Env::operator`] (so there are no
    /// logs to check): removes the namespace a real-cluster run created.
    pub async fn close(self) {
        if self.api.is_none() {
            let nss: Api<Namespace> = Api::all(self.client.clone());
            let _ = nss.delete(&self.namespace, &DeleteParams::default()).await;
        }
    }

    /// The in-memory API server, for a test that needs its fault injection or request
    /// counters. Such a test is marked
    /// `#[cfg_attr(real_cluster, ignore = "needs the in-memory test server: ...")]`, so
    /// against a real cluster it runs only when asked for with `--ignored`, and then
    /// fails here.
    pub fn test_server(&self) -> &ApiServer {
        self.api.as_ref().unwrap_or_else(|| {
            panic!(
                "this test needs the in-memory API server (fault injection, request \
                 counters) and cannot run against the cluster in SCG_E2E_KUBECONFIG"
            )
        })
    }
}

/// Applies the CRD and returns once ScgTokens can be created. A real API server sets the
/// CRD's Established condition a moment after the apply, and serves the new resource
/// (404 "page not found" until then) a moment after that; the in-memory one does both
/// at once.
async fn install_crd(client: &kube::Client, namespace: &str) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        CRD_NAME,
        &PatchParams::apply("scg-e2e").force(),
        &Patch::Apply(ScgToken::crd()),
    )
    .await
    .expect("install CRD");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let established = crds
            .get_opt(CRD_NAME)
            .await
            .ok()
            .flatten()
            .and_then(|c| c.status?.conditions)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "CRD {CRD_NAME} not Established after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tokens: Api<ScgToken> = Api::namespaced(client.clone(), namespace);
    loop {
        match tokens.list(&ListParams::default().limit(1)).await {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.code == 404 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("ScgTokens not served after the CRD was Established: {e}"),
        }
    }
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// Collects the piped stdout and stderr of `child`, line by line, as they come.
pub fn capture_output(child: &mut tokio::process::Child) -> Arc<Mutex<String>> {
    let logs = Arc::new(Mutex::new(String::new()));
    let outs: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
        child.stdout.take().map(|s| Box::new(s) as _),
        child.stderr.take().map(|s| Box::new(s) as _),
    ];
    for out in outs.into_iter().flatten() {
        let logs = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut l = logs.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
    }
    logs
}

/// A running operator process. Killed when dropped (also when a test panics).
pub struct Operator {
    child: tokio::process::Child,
    pub logs: Arc<Mutex<String>>,
}

impl Operator {
    /// Starts `scg-token-operator ARGS` with `kubeconfig` (tests use [`Env::operator`]).
    pub fn spawn(
        kubeconfig: &std::path::Path,
        args: &[String],
        envs: &[(&str, Option<&str>)],
    ) -> Operator {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_scg-token-operator"));
        for (name, value) in envs {
            match value {
                Some(v) => command.env(name, v),
                None => command.env_remove(name),
            };
        }
        let mut child = command
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start scg-token-operator");
        let logs = capture_output(&mut child);
        Operator { child, logs }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: the process gets no chance to finish anything.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()?
            .ok()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }
}

/// The first characters of a token, enough to tell tokens apart in a failure message.
pub fn short(token: &str) -> String {
    format!("{}…", token.chars().take(8).collect::<String>())
}

/// The token in a Secret given as stored JSON.
pub fn token_in(obj: Option<&serde_json::Value>) -> Option<String> {
    let secret: Secret = serde_json::from_value(obj?.clone()).ok()?;
    String::from_utf8(secret.data?.get("accessToken")?.0.clone()).ok()
}

/// Waits until the target Secret `name` holds a token other than `from` and returns it;
/// `None` after `timeout`. Against the in-memory server it wakes on the write itself.
pub async fn wait_target_change(
    env: &Env,
    name: &str,
    from: Option<&str>,
    timeout: Duration,
) -> Option<String> {
    match &env.api {
        Some(api) => {
            let obj = api
                .wait_for("", "secrets", &env.namespace, name, timeout, |o| {
                    token_in(o).is_some_and(|t| Some(t.as_str()) != from)
                })
                .await?;
            token_in(obj.as_ref())
        }
        None => {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(t) = env.target_token(name).await
                    && Some(t.as_str()) != from
                {
                    return Some(t);
                }
                if Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The tokens of the chain that starts at `root`, in order (`root` first), as the
/// simulator's refresh log tells.
pub fn descendants(log: &[RefreshCall], root: &str) -> Vec<String> {
    let mut chain = vec![root.to_string()];
    while let Some(next) = log.iter().find_map(|c| {
        (c.old_token.as_deref() == chain.last().map(String::as_str))
            .then(|| c.issued())
            .flatten()
    }) {
        chain.push(next.to_string());
    }
    chain
}

/// The holder of the leader Lease, if anyone holds it.
pub async fn lease_holder(env: &Env) -> Option<String> {
    lease(env)
        .await?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

pub async fn lease(env: &Env) -> Option<Lease> {
    let api: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    api.get_opt(LEASE_NAME).await.ok()?
}

/// Polls `check` every `every` until it returns `Some`, for at most [`PATIENCE`].
pub async fn poll_until<T, F, Fut>(what: &str, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(every).await;
    }
}
