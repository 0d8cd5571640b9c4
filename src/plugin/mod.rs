//! `kubectl scgtoken`: the on-call engineer's view of an ScgToken, as cert-manager's
//! `cmctl` is for Certificates. The binary (`src/bin/kubectl-scgtoken.rs`) only parses
//! flags and calls [`run`]; everything else is here so that it can be tested.
//!
//! Verbs: `status` (conditions, countdowns, consumers, Events, each with what to do),
//! `renew` (a refresh now, through the refresh-request annotation), `reseed` (a new seed
//! token into the credentials Secret), `consumers` (which pod serves which token),
//! `inspect` (what a support ticket needs, with no secret value).
//!
//! The plugin never prints a token, a Secret value or a Kubernetes API error's message
//! (an admission webhook's message may quote the object written, here a seed): errors
//! are one line in its own words, naming the object and the HTTP status.

pub mod client;
pub mod consumers;
pub mod hints;
pub mod inspect;
pub mod renew;
pub mod reseed;
pub mod status;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

pub use client::Target;

/// Field manager of every write the plugin makes (the annotation of `renew`, the seed
/// of `reseed`): `kubectl get --show-managed-fields` tells who wrote what.
pub const FIELD_MANAGER: &str = "kubectl-scgtoken";

/// Inspect and operate ScgTokens (scg-token-operator) from kubectl.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl scgtoken",
    bin_name = "kubectl scgtoken",
    version,
    about
)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub command: Command,
}

/// The flags kubectl users expect to pass to every verb.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Globals {
    /// Path of the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace of the ScgToken (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Conditions, expiry countdown, next refresh, consumers and recent Events, with what
    /// to do about each problem.
    Status {
        name: String,
        /// Print again whenever the ScgToken changes, until Ctrl-C.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Ask for a refresh now (annotation scgtoken.io/refresh-requested-at) and wait for
    /// the new token's fingerprint.
    Renew {
        name: String,
        /// How long to wait for the new token, e.g. 60s, 2m.
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// Write a new seed token (generated in the SDC UI) into the credentials Secret and
    /// wait for the chain to start from it. The token is read from a hidden prompt, or
    /// from standard input when it is not a terminal; never from an argument.
    Reseed {
        name: String,
        /// Write the seed of the standby chain (spec.standby.credentialsSecretRef).
        #[arg(long)]
        standby: bool,
        /// How long to wait for the operator to use the new seed, e.g. 60s, 2m.
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// The pods reporting through token agents: which token each serves, current or stale.
    Consumers { name: String },
    /// What a support ticket needs, with every secret value left out: the ScgToken, the
    /// target and credentials Secrets' metadata and keys, Events, the operator's version.
    Inspect { name: String },
}

/// `--timeout`: a Go-style duration (`90s`, `2m`, `1m30s`), at least a second.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    crate::policy::parse_duration(s)
        .filter(|d| *d >= Duration::from_secs(1))
        .ok_or_else(|| format!("{s:?} is not a duration of at least 1s (e.g. 60s, 2m)"))
}

/// A failure of the plugin: one line for the user, never a secret, never an API
/// server's own words.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure(s)
    }
}

/// Runs one verb, writing its report to `out`.
pub async fn run(cli: Cli, out: &mut (dyn std::io::Write + Send)) -> Result<(), Failure> {
    let target = client::connect(&cli.globals).await?;
    match cli.command {
        Command::Status { name, watch } => status::run(&target, &name, watch, out).await,
        Command::Renew { name, timeout } => renew::run(&target, &name, timeout, out).await,
        Command::Reseed {
            name,
            standby,
            timeout,
        } => {
            let seed = reseed::SeedSource::detect();
            reseed::run(&target, &name, standby, timeout, seed, out).await
        }
        Command::Consumers { name } => consumers::run(&target, &name, out).await,
        Command::Inspect { name } => inspect::run(&target, &name, out).await,
    }
}

/// Writes `text` to `out`; a closed pipe (`| head`) is not an error worth a message.
fn emit(out: &mut (dyn std::io::Write + Send), text: &str) {
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_like_kubectl_in_any_position() {
        let cli = Cli::try_parse_from([
            "kubectl-scgtoken",
            "status",
            "messaging",
            "-n",
            "team-a",
            "--context",
            "prod",
            "--kubeconfig",
            "/tmp/kc",
        ])
        .unwrap();
        assert_eq!(cli.globals.namespace.as_deref(), Some("team-a"));
        assert_eq!(cli.globals.context.as_deref(), Some("prod"));
        assert_eq!(cli.globals.kubeconfig, Some(PathBuf::from("/tmp/kc")));
        assert!(matches!(cli.command, Command::Status { watch: false, .. }));
    }

    #[test]
    fn timeouts_are_go_durations_of_at_least_a_second() {
        let cli = Cli::try_parse_from(["k", "renew", "x"]).unwrap();
        assert!(
            matches!(cli.command, Command::Renew { timeout, .. } if timeout == Duration::from_secs(60))
        );
        let cli = Cli::try_parse_from(["k", "renew", "x", "--timeout", "1m30s"]).unwrap();
        assert!(
            matches!(cli.command, Command::Renew { timeout, .. } if timeout == Duration::from_secs(90))
        );
        assert!(Cli::try_parse_from(["k", "renew", "x", "--timeout", "0s"]).is_err());
        assert!(Cli::try_parse_from(["k", "renew", "x", "--timeout", "soon"]).is_err());
    }

    /// The krew manifest: what `kubectl krew install` reads. `plugin-package` writes its
    /// sha256 and version; this holds the rest to what krew and this crate expect.
    #[test]
    fn the_krew_manifest_installs_this_binary_for_linux_amd64() {
        let m: serde_yaml::Value = serde_yaml::from_str(include_str!("../../plugin.yaml")).unwrap();
        assert_eq!(
            m["apiVersion"].as_str(),
            Some("krew.googlecontainertools.github.com/v1alpha2")
        );
        assert_eq!(m["kind"].as_str(), Some("Plugin"));
        assert_eq!(m["metadata"]["name"].as_str(), Some("scgtoken"));
        let version = format!("v{}", env!("CARGO_PKG_VERSION"));
        assert_eq!(m["spec"]["version"].as_str(), Some(version.as_str()));
        assert!(
            m["spec"]["shortDescription"]
                .as_str()
                .is_some_and(|d| d.len() <= 60)
        );
        let platforms = m["spec"]["platforms"].as_sequence().unwrap();
        let linux = platforms
            .iter()
            .find(|p| {
                let labels = &p["selector"]["matchLabels"];
                labels["os"].as_str() == Some("linux") && labels["arch"].as_str() == Some("amd64")
            })
            .expect("a linux/amd64 platform");
        let uri = linux["uri"].as_str().unwrap();
        assert_eq!(
            uri,
            format!(
                "https://github.com/scgtoken/scg-token-operator/releases/download/{version}/\
                 kubectl-scgtoken-{version}-linux-amd64.tar.gz"
            )
        );
        let sha = linux["sha256"].as_str().unwrap();
        assert!(
            sha.len() == 64
                && sha
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "sha256 is not 64 lower-case hex digits: {sha:?} (run ./plugin-package)"
        );
        assert_eq!(linux["bin"].as_str(), Some("kubectl-scgtoken"));
        let files = linux["files"].as_sequence().unwrap();
        assert!(
            files
                .iter()
                .any(|f| f["from"].as_str() == Some("kubectl-scgtoken"))
        );
    }

    #[test]
    fn a_seed_is_never_an_argument() {
        assert!(Cli::try_parse_from(["k", "reseed", "x", "the-token"]).is_err());
        assert!(Cli::try_parse_from(["k", "reseed", "x", "--token", "t"]).is_err());
    }
}
