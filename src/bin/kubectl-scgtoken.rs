//! `kubectl scgtoken`: the kubectl plugin of scg-token-operator. kubectl runs any
//! `kubectl-scgtoken` found on PATH for `kubectl scgtoken ...`. The logic lives in
//! `scg_token_operator::plugin`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use scg_token_operator::plugin::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout();
    match run(cli, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
