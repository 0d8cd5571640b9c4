//! The token agent: `scg-token-operator agent`, a sidecar that serves the current token
//! of one target Secret to the application in its pod.
//!
//! The road a token travels in the pod:
//! ```text
//! watch (one Secret, by name) -> evaluate (key, size, UTF-8, expiry) -> candidate
//!   -> file mode: atomic ..data swap, then served      -> proxy: bearer header
//!   -> served -> health (/readyz, /metrics) and report (a Lease per pod)
//! ```
//! The agent never refreshes a token (only the operator refreshes a chain) and never
//! writes the Secret. It serves only tokens it has read from the Secret, and never one
//! whose recorded expiry has passed.

pub mod files;
pub mod health;
pub mod proxy;
pub mod report;
pub mod watch;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use prometheus_client::registry::Registry;
use tokio::sync::watch as channel;
use tracing::{info, warn};

use crate::scg::SecretString;

/// A token read from the Secret and accepted for serving. Not `Debug`: it holds the token.
pub struct Token {
    pub value: SecretString,
    /// The same salted fingerprint the operator puts in `status.tokenFingerprint`.
    pub fingerprint: String,
    /// The ScgToken the Secret belongs to (its owner annotation, else the Secret's name).
    pub scgtoken: String,
    pub issued_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
}

/// The token the pod can use now, and since when.
#[derive(Clone)]
pub struct Served {
    pub token: Arc<Token>,
    pub since: Timestamp,
}

impl Served {
    /// Whether the token's recorded expiry has not passed (an unknown expiry counts as
    /// unexpired: seeds carry none).
    pub fn is_fresh(&self, now: Timestamp) -> bool {
        self.token.expires_at.is_none_or(|at| at > now)
    }
}

/// The candidate channel: what the Secret holds, once accepted.
pub type Candidates = channel::Receiver<Option<Arc<Token>>>;
/// The served channel: what the pod can use.
pub type ServedRx = channel::Receiver<Option<Served>>;

/// Log format of the agent.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `scg-token-operator agent` flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Name of the Secret to serve the token of (the ScgToken's target Secret), in the
    /// pod's own namespace.
    #[arg(long, env = "SCG_AGENT_SECRET")]
    pub secret: String,
    /// Namespace of the Secret and of the report Lease (default: the pod's, from the
    /// downward API; else the kubeconfig's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Data key holding the token.
    #[arg(long, env = "SCG_AGENT_TOKEN_KEY", default_value = "accessToken")]
    pub token_key: String,
    /// Largest token accepted, in bytes; a larger value is refused, not served.
    #[arg(long, default_value_t = 8192)]
    pub max_token_bytes: usize,

    /// File mode: the directory (an emptyDir with `medium: Memory`) to write the token
    /// into, atomically: files are symlinks into `..data`, which is swapped by a rename.
    #[arg(long, env = "SCG_AGENT_DIR")]
    pub dir: Option<PathBuf>,
    /// Files to write: `token` (the raw token), `authorization` (an `Authorization:
    /// Bearer …` line), `env` (`token.env`, a `NAME=token` line).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "token")]
    pub formats: Vec<files::Format>,
    /// Also write `expires-at` (RFC 3339) when the expiry is known.
    #[arg(long)]
    pub expiry_file: bool,
    /// Mode of the files: `0400` (the agent's user only) or `0440` (and its group).
    #[arg(long, default_value = "0400", value_parser = files::parse_mode)]
    pub file_mode: u32,
    /// Group (gid) of the files and their directory, e.g. the pod's `fsGroup`. The agent
    /// must be a member of it (fsGroup and supplementalGroups make it one).
    #[arg(long)]
    pub file_group: Option<u32>,
    /// Variable name in the `env` file.
    #[arg(long, default_value = "SCG_ACCESS_TOKEN")]
    pub env_name: String,

    /// Proxy mode: the base URL requests are forwarded to, e.g.
    /// `https://api.syniverse.com`. Only `https://` unless `--allow-insecure-upstream`.
    #[arg(long, env = "SCG_AGENT_UPSTREAM")]
    pub upstream: Option<String>,
    /// Where the proxy listens. Loopback addresses only: the proxy adds the token to
    /// whatever reaches it.
    #[arg(long, default_value = "127.0.0.1:8181")]
    pub listen: SocketAddr,
    /// Accept an `http://` upstream (tests only: the token would cross the network in
    /// clear text).
    #[arg(long)]
    pub allow_insecure_upstream: bool,
    /// Proxy mode: PEM file of CA certificates trusted for the upstream, in addition to
    /// the platform's roots (a private CA, or an egress proxy that inspects TLS); the
    /// operator's flag of the same name.
    #[arg(long, env = "SCG_CA_BUNDLE", value_name = "FILE")]
    pub ca_bundle: Option<std::path::PathBuf>,
    /// How long a request answered 401 waits for a newer token before the 401 is passed
    /// on, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub retry_wait_ms: u64,
    /// Request bodies up to this size are buffered so that a 401 can be retried; larger
    /// ones are not retried (one of declared length streams through).
    #[arg(long, default_value_t = 65536)]
    pub retry_buffer_bytes: usize,
    /// Largest request or response body passed through, in bytes. A chunked request
    /// body (no Content-Length) is read whole before anything is sent, so one over this
    /// limit gets 413 and nothing of it reaches the upstream; the chunked bodies held at
    /// one time share four times this size, and one that would exceed that gets 503.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Time limit of one upstream request, bodies included, in seconds; also how long a
    /// request body read before sending (a chunked one, or one within the retry buffer)
    /// may take to arrive (else 408).
    #[arg(long, default_value_t = 60)]
    pub upstream_timeout_seconds: u64,
    /// Most client connections the proxy holds at once, idle keep-alive ones included
    /// (an idle one is closed after 10 s without a request). Connections beyond it are
    /// not refused: they wait in the listen queue, unaccepted and unread, until a held
    /// one closes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Address of the admin server (/healthz, /readyz, /metrics).
    #[arg(long, env = "SCG_AGENT_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
    pub admin_addr: SocketAddr,

    /// Report the served token in a Lease of this pod's own. Needs POD_NAME.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub report: bool,
    /// Name of this pod (downward API `metadata.name`).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// UID of this pod (downward API `metadata.uid`): makes the pod own its Lease, so the
    /// Lease is deleted with it.
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// Name of the ScgToken, for the report's label (default: the Secret's owner
    /// annotation, else the Secret's name). Given, the pod reports from its start, also
    /// while it serves nothing yet.
    #[arg(long, env = "SCG_AGENT_SCGTOKEN")]
    pub scgtoken: Option<String>,
    /// How long a heartbeat counts; renewed every third of it.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(3..=3600))]
    pub report_lease_seconds: u32,

    /// Log format.
    #[arg(long, env = "SCG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or tracing filter.
    #[arg(long, env = "SCG_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Why the agent could not start or stopped. Messages carry no secret.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How the agent serves the token: at least one of file and proxy.
fn mode_name(args: &Args) -> &'static str {
    match (args.dir.is_some(), args.upstream.is_some()) {
        (true, true) => "file+proxy",
        (true, false) => "file",
        _ => "proxy",
    }
}

/// Runs the agent until `shutdown` resolves, then releases its report and returns.
pub async fn run(
    client: kube::Client,
    args: Args,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    if args.dir.is_none() && args.upstream.is_none() {
        return Err(AgentError::Config(
            "nothing to serve: give --dir (file mode), --upstream (proxy mode) or both".into(),
        ));
    }
    let namespace = args
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string());
    // Everything that can be refused is checked before anything starts.
    let writer = match &args.dir {
        Some(dir) => Some(files::Publisher::new(dir.clone(), &args)?),
        None => None,
    };
    let proxy = match &args.upstream {
        Some(upstream) => Some(proxy::Config::new(upstream, &args)?),
        None => None,
    };
    let mut registry = Registry::default();
    let metrics = Arc::new(health::Metrics::register(&mut registry));
    let (stop_tx, stop_rx) = channel::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let (candidate_tx, candidate_rx) = channel::channel(None);
    let (served_tx, served_rx) = channel::channel(None);
    let mut servers = serve_http(&args, registry, proxy, &served_rx, &metrics, &stopped).await?;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let source = watch::Source {
        name: args.secret.clone(),
        key: args.token_key.clone(),
        max_bytes: args.max_token_bytes,
    };
    let watch_task = tokio::spawn(watch::run(secrets, source, candidate_tx, metrics.clone()));
    let publish_task = tokio::spawn(publish(writer, candidate_rx, served_tx, metrics.clone()));
    if let Some(config) = report_config(&args, &namespace) {
        let report = report::run(client, config, served_rx, metrics, stopped());
        servers.push(tokio::spawn(async move {
            report.await;
            Ok(())
        }));
    }

    shutdown.await;
    info!("shutting down");
    stop_tx.send_replace(true);
    watch_task.abort();
    publish_task.abort();
    for task in servers {
        let _ = task.await;
    }
    info!("stopped");
    Ok(())
}

/// Starts the admin server and, if configured, the proxy; both stop with `stopped()`.
async fn serve_http<F, Fut>(
    args: &Args,
    registry: Registry,
    proxy: Option<proxy::Config>,
    served: &ServedRx,
    metrics: &Arc<health::Metrics>,
    stopped: &F,
) -> Result<Vec<tokio::task::JoinHandle<std::io::Result<()>>>, AgentError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin = tokio::net::TcpListener::bind(args.admin_addr).await?;
    info!(addr = %admin.local_addr()?, "admin server listening");
    let readiness = health::Readiness::new(served.clone(), metrics.clone());
    let state = crate::admin::State::with_probe(registry, readiness);
    let mut tasks = vec![tokio::spawn(crate::admin::serve(admin, state, stopped()))];
    if let Some(config) = proxy {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        info!(addr = %listener.local_addr()?, "proxy listening");
        let serve = proxy::serve(listener, config, served.clone(), metrics.clone(), stopped());
        tasks.push(tokio::spawn(async move {
            serve.await;
            Ok(())
        }));
    }
    Ok(tasks)
}

fn report_config(args: &Args, namespace: &str) -> Option<report::Config> {
    if !args.report {
        return None;
    }
    let Some(pod) = args.pod_name.clone().filter(|p| !p.is_empty()) else {
        warn!("POD_NAME is not set: the served token is not reported to the operator");
        return None;
    };
    Some(report::Config {
        namespace: namespace.to_string(),
        lease_name: report::lease_name(&pod, &args.secret),
        pod,
        pod_uid: args.pod_uid.clone().filter(|u| !u.is_empty()),
        secret: args.secret.clone(),
        scgtoken: args.scgtoken.clone(),
        mode: mode_name(args),
        duration: Duration::from_secs(u64::from(args.report_lease_seconds)),
    })
}

/// Turns candidates into served tokens: in file mode once the files are in place, else
/// at once.
async fn publish(
    writer: Option<files::Publisher>,
    candidates: Candidates,
    served: channel::Sender<Option<Served>>,
    metrics: Arc<health::Metrics>,
) {
    match writer {
        Some(writer) => writer.run(candidates, served, metrics).await,
        None => {
            let mut candidates = candidates;
            loop {
                let token = candidates.borrow_and_update().clone();
                if let Some(token) = token {
                    serve(&served, &metrics, token, Timestamp::now());
                }
                if candidates.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Publishes `token` as served (unless it already is) and counts the switch.
pub(crate) fn serve(
    served: &channel::Sender<Option<Served>>,
    metrics: &health::Metrics,
    token: Arc<Token>,
    since: Timestamp,
) {
    let previous = served
        .borrow()
        .as_ref()
        .map(|s| s.token.fingerprint.clone());
    if previous.as_deref() == Some(token.fingerprint.as_str()) {
        // Same token (the Secret changed elsewhere, or a relist): keep its since.
        served.send_modify(|s| {
            if let Some(s) = s {
                s.token = token;
            }
        });
        return;
    }
    let expires_at = token
        .expires_at
        .map_or_else(|| "unknown".to_string(), |t| t.to_string());
    info!(fingerprint = %token.fingerprint, %expires_at, "serving the token");
    metrics.switched(previous.as_deref(), &token.fingerprint);
    served.send_replace(Some(Served { token, since }));
}
