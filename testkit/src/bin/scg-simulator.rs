//! Runs the SCG token-refresh simulator on 127.0.0.1 for manual tries and the demo.
//!
//! Usage: `scg-simulator [--port N] [--validity-cap-secs N] [--tls] [--ca-out FILE]`. It
//! registers one demo application with fake credentials and prints them with the URLs;
//! Ctrl-C stops it. `--tls` serves HTTPS with a certificate from a CA made at start;
//! `--ca-out FILE` (which implies `--tls`) writes that CA in PEM to FILE, for the
//! operator's `--ca-bundle`.

use std::{path::PathBuf, time::Duration};

use testkit::scgsim::{ScgSimulator, SimConfig};

const USAGE: &str =
    "usage: scg-simulator [--port N] [--validity-cap-secs N] [--tls] [--ca-out FILE]";

fn parse_args() -> Result<(SimConfig, Option<PathBuf>), String> {
    let mut config = SimConfig::default();
    let mut ca_out = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        let number = |name: &str, v: String| v.parse::<u64>().map_err(|e| format!("{name}: {e}"));
        match flag.as_str() {
            "--port" => {
                let port = number("--port", value("--port")?)?;
                config.port = u16::try_from(port).map_err(|e| format!("--port: {e}"))?
            }
            "--validity-cap-secs" => {
                let secs = number("--validity-cap-secs", value("--validity-cap-secs")?)?;
                config.validity_cap = Duration::from_secs(secs)
            }
            "--tls" => config.tls = true,
            "--ca-out" => {
                ca_out = Some(PathBuf::from(value("--ca-out")?));
                config.tls = true;
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok((config, ca_out))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let (config, ca_out) = match parse_args() {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let cap = config.validity_cap;
    let sim = ScgSimulator::start(config).await?;
    if let (Some(path), Some(pem)) = (&ca_out, sim.ca_pem()) {
        std::fs::write(path, pem).map_err(|e| {
            std::io::Error::new(e.kind(), format!("--ca-out {}: {e}", path.display()))
        })?;
        println!("CA (PEM):      {}", path.display());
    }
    // Fake demo values: this simulator never talks to Syniverse.
    let (key, secret) = ("demo-consumer-key", "demo-consumer-secret");
    let seed = sim.add_app(key, secret);
    println!("refresh URL:   {}", sim.refresh_url());
    println!("protected URL: {}", sim.protected_url());
    println!("validity cap:  {}s", cap.as_secs());
    println!("demo app:      consumerKey={key} consumerSecret={secret}");
    println!("seed token:    {seed}");
    tokio::signal::ctrl_c().await?;
    println!(
        "stopping after {} refresh calls ({} successful)",
        sim.refresh_calls(),
        sim.successful_refreshes()
    );
    Ok(())
}
