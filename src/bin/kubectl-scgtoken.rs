//! `kubectl scgtoken`: the kubectl plugin of scg-token-operator. kubectl runs any
//! `kubectl-scgtoken` found on PATH for `kubectl scgtoken ...`. The logic lives in
//! `scg_token_operator::plugin`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, error::ErrorKind};
use scg_token_operator::plugin::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let mut out = std::io::stdout();
    match run(cli, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// clap quotes the argument it could not place. For `reseed` that may be a token pasted
/// as an argument by mistake: it is not echoed back, and the user learns where a token
/// goes instead.
fn usage_error(e: clap::Error) -> ExitCode {
    let reseed = std::env::args().any(|a| a == "reseed");
    let quoting = !matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::MissingRequiredArgument
    );
    if reseed && quoting {
        eprintln!(
            "error: kubectl scgtoken reseed NAME [--standby] [--timeout DURATION] takes the \
             token from a prompt, or from standard input, never as an argument"
        );
        return ExitCode::from(2);
    }
    e.exit()
}
