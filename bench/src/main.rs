//! Scale and cost benchmark of scg-token-operator: the release binary in its own process,
//! against the in-memory API server and the SCG simulator running in this one, with the
//! naive `curl` + `kubectl` loop beside it. Method and figures: BENCHMARKS.md.
#![forbid(unsafe_code)]

mod analysis;
mod chains;
mod naive;
mod operator;
mod procfs;
mod report;
mod scenario;
mod setup;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, ValueEnum};
use scg_token_operator::policy;

/// What a run measures after every chain has its first token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Rotations at the given lifetime: lag, calls, writes, CPU, memory; the naive loop
    /// runs beside the operator.
    Steady,
    /// Nothing due (use a long --lifetime): what the operator costs while it waits.
    Idle,
    /// Restart with every chain stored: time to all Ready, refreshes that were not due.
    Startup,
    /// The simulator answers 503 for --outage, starting just before the first refresh
    /// falls due; then the recovery storm.
    Outage,
}

/// Benchmark of scg-token-operator (see BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(about)]
pub struct Args {
    /// Number of ScgTokens (each with its own simulator application).
    #[arg(long, default_value_t = 100)]
    pub tokens: usize,
    /// Token lifetime: the ScgTokens' `validity` and the simulator's cap.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub lifetime: Duration,
    /// Length of the measurement window.
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub duration: Duration,
    #[arg(long, value_enum, default_value_t = Scenario::Steady)]
    pub scenario: Scenario,
    /// Create the ScgTokens at this rate (per second) after the operator started, like a
    /// cluster that grows, instead of all before it starts (0).
    #[arg(long, default_value_t = 0)]
    pub create_rate: usize,
    /// Secrets no ScgToken refers to, created before the operator starts.
    #[arg(long, default_value_t = 0)]
    pub unrelated_secrets: usize,
    /// Data bytes of each unrelated Secret.
    #[arg(long, default_value_t = 3072)]
    pub unrelated_bytes: usize,
    /// Tokens refreshed by the naive loop beside the operator (steady scenario; 0: none).
    #[arg(long, default_value_t = 10)]
    pub naive: usize,
    /// Refreshes per naive loop.
    #[arg(long, default_value_t = 3)]
    pub naive_rotations: u32,
    /// Length of the simulated SCG outage; implies --scenario outage.
    #[arg(long, value_parser = duration)]
    pub outage: Option<Duration>,
    /// `refreshBeforePercentage` of the ScgTokens (default: the operator's, a third).
    #[arg(long)]
    pub refresh_before_percentage: Option<u8>,
    /// Longest wait for every chain's first token, and for start-up.
    #[arg(long, default_value = "900s", value_parser = duration)]
    pub warmup_timeout: Duration,
    /// Raise the open-file limit of the harness and the operator to this (with prlimit).
    #[arg(long)]
    pub nofile: Option<u64>,
    /// Extra environment of the operator process, e.g. MALLOC_ARENA_MAX=1 (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub operator_env: Vec<String>,
    /// Use this operator binary instead of building it with `cargo build --release`.
    #[arg(long)]
    pub operator_bin: Option<PathBuf>,
    /// Append the run's JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Fail (exit 1) when a token was lost or expired, a refresh came before it was due,
    /// or a steady run rotated nothing. Timings are never checked.
    #[arg(long)]
    pub check: bool,
    /// Free text stored with the JSON line, e.g. to group runs in a plot.
    #[arg(long, default_value = "")]
    pub label: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    policy::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration such as 60s, 5m or 24h"))
}

async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Returning drops every guard: the operator, the naive loops and the servers stop.
    let result = tokio::select! {
        r = scenario::run(args) => r,
        s = stop_signal() => Err(format!("interrupted by {s}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
