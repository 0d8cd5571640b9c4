//! The naive refresher (`curl` + `kubectl` in a shell loop per token), run beside the
//! operator against its own in-memory API server, so that neither disturbs the other's
//! request counters.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use serde::Serialize;
use testkit::{apiserver::ApiServer, scgsim::ScgSimulator};
use tokio::io::AsyncReadExt;

use crate::setup::CONSUMER_SECRET;

const SCRIPT: &str = include_str!("../naive-refresher.sh");

/// What the naive loops cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NaiveFigures {
    pub loops: usize,
    pub rotations: u64,
    /// CPU of the shells and every process they started (curl, sed, kubectl).
    pub cpu_s: f64,
    pub cpu_per_rotation_ms: f64,
    /// Requests the loops made to their API server, per rotation.
    pub api_reads_per_rotation: f64,
    pub api_writes_per_rotation: f64,
    pub failures: usize,
}

/// The loops, started. Their process groups are killed when this is dropped.
pub struct Naive {
    children: Vec<(tokio::process::Child, u32)>,
    api: ApiServer,
    _dir: TempDir,
    rotations_each: u32,
    interval: Duration,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Naive {
    fn drop(&mut self) {
        for (child, pgid) in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                // The whole group: bash and whichever curl or kubectl it is waiting for.
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pgid}")])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Checks that the tools the naive loop needs are installed.
pub fn tools_missing() -> Vec<&'static str> {
    ["bash", "curl", "kubectl", "sed"]
        .into_iter()
        .filter(|t| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

impl Naive {
    /// Starts `k` loops of `rotations` refreshes each, `interval` apart, their starts
    /// spread over one interval.
    pub async fn start(
        sim: &ScgSimulator,
        k: usize,
        rotations: u32,
        interval: Duration,
        validity: Duration,
        work: &Path,
    ) -> Result<Naive, String> {
        let api = ApiServer::start()
            .await
            .map_err(|e| format!("naive API server: {e}"))?;
        let dir = TempDir(work.join("naive"));
        std::fs::create_dir_all(&dir.0).map_err(|e| format!("{}: {e}", dir.0.display()))?;
        let script = dir.0.join("naive-refresher.sh");
        std::fs::write(&script, SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
        let cache = dir.0.join("kube-cache");
        let mut naive = Naive {
            children: Vec::new(),
            api,
            _dir: dir,
            rotations_each: rotations,
            interval,
        };
        let stagger = interval / (k.max(1) as u32);
        for i in 0..k {
            if i > 0 {
                tokio::time::sleep(stagger).await;
            }
            let key = format!("naive-{i:03}");
            let seed = sim.add_app(&key, CONSUMER_SECRET);
            let child = tokio::process::Command::new("bash")
                .arg(&script)
                .env("NAIVE_URL", sim.refresh_url())
                .env("NAIVE_KEY", &key)
                .env("NAIVE_SECRET", CONSUMER_SECRET)
                .env("NAIVE_SEED", seed)
                .env("NAIVE_NAME", &key)
                .env("NAIVE_VALIDITY", validity.as_secs().to_string())
                .env("NAIVE_INTERVAL", interval.as_secs().to_string())
                .env("NAIVE_ROTATIONS", rotations.to_string())
                .env("NAIVE_KUBECONFIG", naive.api.kubeconfig_path())
                .env("NAIVE_CACHE", &cache)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("starting bash: {e}"))?;
            let pgid = child.id().ok_or("a naive loop exited at once")?;
            naive.children.push((child, pgid));
        }
        Ok(naive)
    }

    /// Longest the loops can take from their start.
    pub fn expected_duration(&self) -> Duration {
        self.interval * (self.rotations_each + 1) + Duration::from_secs(60)
    }

    /// Waits for every loop to finish (at most `within`) and adds up their cost.
    pub async fn finish(mut self, within: Duration) -> Result<NaiveFigures, String> {
        let deadline = Instant::now() + within;
        let mut f = NaiveFigures {
            loops: self.children.len(),
            ..Default::default()
        };
        for (child, _) in &mut self.children {
            let left = deadline.saturating_duration_since(Instant::now());
            let status = tokio::time::timeout(left, child.wait())
                .await
                .map_err(|_| "the naive loops did not finish in time".to_string())?
                .map_err(|e| format!("waiting for a naive loop: {e}"))?;
            let mut out = String::new();
            if let Some(mut s) = child.stdout.take() {
                let _ = s.read_to_string(&mut out).await;
            }
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err).await;
            }
            f.failures += err.lines().filter(|l| l.ends_with("failed")).count();
            if !status.success() {
                return Err(format!("a naive loop failed ({status}): {}", err.trim()));
            }
            let (rotations, cpu) = parse_output(&out)
                .ok_or_else(|| format!("unexpected naive loop output: {out:?}"))?;
            f.rotations += rotations;
            f.cpu_s += cpu;
        }
        let per = |n: u64| n as f64 / f.rotations.max(1) as f64;
        f.cpu_per_rotation_ms = f.cpu_s * 1000.0 / f.rotations.max(1) as f64;
        let (reads, writes) = crate::report::reads_writes(&self.api.counters().snapshot());
        f.api_reads_per_rotation = per(reads);
        f.api_writes_per_rotation = per(writes);
        Ok(f)
    }
}

/// "rotations N" then bash's `times`: two lines of "XmY.YYYs XmY.YYYs".
fn parse_output(out: &str) -> Option<(u64, f64)> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with("rotations "));
    let rotations = lines
        .next()?
        .strip_prefix("rotations ")?
        .trim()
        .parse()
        .ok()?;
    let mut cpu = 0.0;
    for line in lines.take(2) {
        for t in line.split_whitespace() {
            cpu += parse_bash_time(t)?;
        }
    }
    Some((rotations, cpu))
}

fn parse_bash_time(t: &str) -> Option<f64> {
    let (m, s) = t.strip_suffix('s')?.split_once('m')?;
    Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bash_times() {
        let out = "rotations 3\n0m0.010s 0m0.020s\n1m0.500s 0m0.250s\n";
        let (r, cpu) = parse_output(out).unwrap();
        assert_eq!(r, 3);
        assert!((cpu - 60.78).abs() < 1e-9, "{cpu}");
        assert!(parse_output("garbage").is_none());
    }
}
