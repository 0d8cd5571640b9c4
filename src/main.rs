//! The `scg-token-operator` binary: flags, telemetry, start-up.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use scg_token_operator::{
    Config,
    access::{self, AllowedEndpoints, CredentialsPolicy},
    agent, crd,
    leader::ElectionConfig,
    policy,
    scg::HttpTokenApi,
};
use tracing_subscriber::EnvFilter;

/// Keeps Syniverse SCG access tokens fresh in Kubernetes Secrets.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Print the ScgToken CustomResourceDefinition as YAML.
    Crd,
    /// Run the token agent: a sidecar serving one target Secret's token to its pod, in
    /// files (--dir) or through a localhost proxy that adds the bearer header (--upstream).
    Agent(Box<agent::Args>),
}

#[derive(Parser)]
struct RunArgs {
    /// Watch ScgTokens and Secrets in this namespace only (default: all namespaces).
    #[arg(long, env = "SCG_NAMESPACE")]
    namespace: Option<String>,
    /// Accept plain http:// endpoints. For tests and local trials only: the refresh call
    /// carries the consumer secret.
    #[arg(long, env = "SCG_ALLOW_INSECURE_ENDPOINTS")]
    allow_insecure_endpoints: bool,
    /// Hosts refresh calls may go to, comma-separated: `host` (any port) or `host:port`;
    /// a leading `*.` allows every name below a domain (`*.example.com`, not
    /// `example.com`). A ScgToken whose endpoint names another host is refused
    /// (InvalidSpec) and sends nothing.
    #[arg(long, env = "SCG_ALLOWED_ENDPOINTS", value_name = "HOSTS", default_value = access::DEFAULT_ALLOWED_ENDPOINTS, value_parser = AllowedEndpoints::parse)]
    allowed_endpoints: AllowedEndpoints,
    /// What to do with a credentials or headers Secret that is not opted in (label
    /// scgtoken.io/credentials=true, or annotation scgtoken.io/allowed-scgtokens naming
    /// the ScgToken): `enforce` refuses it; `warn` uses it and reports it (for upgrades).
    #[arg(long, env = "SCG_CREDENTIALS_POLICY", value_enum, default_value_t = CredentialsPolicy::Enforce)]
    credentials_policy: CredentialsPolicy,
    /// PEM file of CA certificates to trust for the SCG API, in addition to the
    /// platform's root certificates (a private CA, or a TLS-inspecting proxy's CA).
    #[arg(long, env = "SCG_CA_BUNDLE", value_name = "FILE")]
    ca_bundle: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "SCG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or tracing filter, e.g. `info` or `debug`.
    #[arg(long, env = "SCG_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "SCG_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Elect a leader among replicas with a Lease; only the leader refreshes.
    #[arg(long, env = "SCG_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "SCG_LEASE_NAME", default_value = "scg-token-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Lease duration in seconds: a standby takes over at most this long after the
    /// leader dies.
    #[arg(long, env = "SCG_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Name of this replica (default: the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Most refresh calls per second across all ScgTokens (0: no limit). Calls beyond it
    /// wait, the token that expires first going first.
    #[arg(long, env = "SCG_MAX_REFRESH_RATE", default_value_t = 1000.0)]
    max_refresh_rate: f64,
    /// Refresh calls that may go at once within --max-refresh-rate.
    #[arg(long, env = "SCG_REFRESH_BURST", default_value_t = 100)]
    refresh_burst: u32,
    /// Most reconcile passes at once. Each holds at most one connection to the
    /// Kubernetes API and one to SCG; due ScgTokens beyond it wait their turn in the
    /// order they fell due.
    #[arg(long, env = "SCG_CONCURRENT_RECONCILES", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    concurrent_reconciles: u16,
    /// Read the token agents' report Leases for ScgTokens with `spec.consumers.agents`
    /// (needs leases list/watch, and pods get to tell a lost agent from a deleted pod:
    /// deploy/components/consumer-reports).
    #[arg(long, env = "SCG_CONSUMER_REPORTS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    consumer_reports: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    let mut filter = EnvFilter::try_new(level).map_err(|e| format!("--log-level: {e}"))?;
    // HTTP client internals may log request URLs, and refresh URLs carry secrets:
    // keep them quiet whatever level was asked for.
    for quiet in [
        "reqwest=warn",
        "hyper=warn",
        "hyper_util=warn",
        "rustls=warn",
    ] {
        filter = filter.add_directive(quiet.parse().map_err(|e| format!("{e}"))?);
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// kube's proxy errors quote the proxy URL, and with it any password in HTTPS_PROXY.
fn kube_client_error(e: kube::Error) -> String {
    match e {
        kube::Error::ProxyProtocolUnsupported { .. }
        | kube::Error::ProxyProtocolDisabled { .. } => {
            "the proxy (kubeconfig proxy-url, else HTTPS_PROXY) uses a scheme this build \
             does not support; use http:// or https://"
                .into()
        }
        other => other.to_string(),
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    init_logging(args.log_format, &args.log_level)?;
    let max_refresh_rate =
        scg_token_operator::budget::Rate::new(args.max_refresh_rate, args.refresh_burst)?;
    let mut kube_config = kube::Config::infer()
        .await
        .map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    // The client's built-in retry of 429/503 backs off for up to minutes inside one
    // call; the reconciler retries on its own schedule (a token waiting to be stored:
    // every second), and a call that hangs would also outlast the shutdown grace period.
    kube_config.default_retry = false;
    let client = kube::Client::try_from(kube_config)
        .map_err(|e| format!("Kubernetes client: {}", kube_client_error(e)))?;
    let identity = args
        .identity
        // Two processes on one host (or hostNetwork pods) must not share an identity,
        // or both would believe they hold the Lease.
        .unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "scg-token-operator".into());
            format!("{host}-{}", std::process::id())
        });
    let election = args.leader_elect.then(|| ElectionConfig {
        namespace: args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string()),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        duration: Duration::from_secs(args.lease_duration_seconds),
    });
    let token_api =
        HttpTokenApi::with_ca_bundle(args.ca_bundle.as_deref()).map_err(|e| e.to_string())?;
    tracing::info!(allowed_endpoints = %args.allowed_endpoints, "refresh calls may go to these hosts only");
    if args.credentials_policy == CredentialsPolicy::Warn {
        tracing::warn!(
            "--credentials-policy=warn: Secrets that are not opted in are used as credentials \
             (condition CredentialsAllowed, metric scgtoken_credentials_not_allowed)"
        );
    }
    let config = Config {
        namespace: args.namespace.filter(|n| !n.is_empty()),
        allow_insecure: args.allow_insecure_endpoints,
        allowed_endpoints: args.allowed_endpoints,
        credentials_policy: args.credentials_policy,
        admin_addr: Some(args.admin_addr),
        election,
        identity,
        token_api: Arc::new(token_api),
        clock: Arc::new(policy::SystemClock),
        max_refresh_rate,
        concurrent_reconciles: args.concurrent_reconciles,
        consumer_reports: args.consumer_reports,
    };
    scg_token_operator::run(client, config, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

async fn run_agent(args: agent::Args) -> Result<(), String> {
    let format = match args.log_format {
        agent::LogFormat::Text => LogFormat::Text,
        agent::LogFormat::Json => LogFormat::Json,
    };
    init_logging(format, &args.log_level)?;
    let mut kube_config = kube::Config::infer()
        .await
        .map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    // The watcher backs off on its own; a report that hangs in retries is only late.
    kube_config.default_retry = false;
    let client = kube::Client::try_from(kube_config)
        .map_err(|e| format!("Kubernetes client: {}", kube_client_error(e)))?;
    agent::run(client, args, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            Ok(())
        }
        Command::Run(args) => run(*args).await,
        Command::Agent(args) => run_agent(*args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scg-token-operator: {e}");
            ExitCode::FAILURE
        }
    }
}
