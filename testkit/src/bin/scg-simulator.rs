//! Runs the SCG token-refresh simulator on 127.0.0.1 for manual tries and the demo.
//!
//! Usage: `scg-simulator [--port N] [--validity-cap-secs N]`. It registers one demo
//! application with fake credentials and prints them with the URLs; Ctrl-C stops it.

use std::time::Duration;

use testkit::scgsim::{ScgSimulator, SimConfig};

const USAGE: &str = "usage: scg-simulator [--port N] [--validity-cap-secs N]";

fn parse_args() -> Result<SimConfig, String> {
    let mut config = SimConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value"))?
                .parse::<u64>()
                .map_err(|e| format!("{name}: {e}"))
        };
        match flag.as_str() {
            "--port" => {
                config.port = u16::try_from(value("--port")?).map_err(|e| format!("--port: {e}"))?
            }
            "--validity-cap-secs" => {
                config.validity_cap = Duration::from_secs(value("--validity-cap-secs")?)
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(config)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let config = match parse_args() {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let cap = config.validity_cap;
    let sim = ScgSimulator::start(config).await?;
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
