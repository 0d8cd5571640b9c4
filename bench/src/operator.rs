//! The operator under test: built in release mode, run as its own process, watched through
//! /proc, its log and its /metrics.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::procfs;

/// Builds the operator binary in release mode and returns its path.
pub fn build_release() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace directory")?;
    let started = Instant::now();
    let out = std::process::Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            "scg-token-operator",
            "--bin",
            "scg-token-operator",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build failed: {}", out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let exe = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact" && m["target"]["name"] == "scg-token-operator"
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or("cargo did not report the operator executable")?;
    eprintln!(
        "operator binary: {} (cargo build took {:.1}s)",
        exe.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(exe)
}

/// What the harness learned from the operator's log.
#[derive(Default)]
struct LogState {
    admin: Option<SocketAddr>,
    synced_at: Option<Instant>,
    warnings: u64,
    errors: u64,
}

/// A running operator. Killed when dropped, also when the harness panics.
pub struct Operator {
    child: tokio::process::Child,
    pid: u32,
    pub started: Instant,
    log: Arc<Mutex<LogState>>,
    ticks: u64,
}

impl Operator {
    /// Starts `exe run` against `kubeconfig`, watching `namespace`, leader election off.
    /// Its log goes to `log_path`.
    pub fn spawn(
        exe: &Path,
        kubeconfig: &Path,
        namespace: &str,
        log_path: &Path,
        ticks: u64,
        env: &[String],
    ) -> Result<Operator, String> {
        let env = env
            .iter()
            .map(|kv| kv.split_once('=').ok_or(format!("{kv:?} is not KEY=VALUE")))
            .collect::<Result<Vec<_>, _>>()?;
        let started = Instant::now();
        let mut child = tokio::process::Command::new(exe)
            .args([
                "run",
                "--allow-insecure-endpoints",
                "--admin-addr=127.0.0.1:0",
                "--leader-elect=false",
                "--log-format=json",
                "--log-level=info",
            ])
            .arg(format!("--namespace={namespace}"))
            .env("KUBECONFIG", kubeconfig)
            .env("NO_COLOR", "1")
            // The simulator listens on loopback. Set through the environment, which a
            // build from before --allowed-endpoints ignores, so --operator-bin can run
            // such a build side by side with this one.
            .env("SCG_ALLOWED_ENDPOINTS", "127.0.0.1")
            .env_remove("RUST_LOG")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", exe.display()))?;
        let pid = child.id().ok_or("the operator exited at once")?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let file = Arc::new(Mutex::new(std::io::BufWriter::new(file)));
        let log = Arc::new(Mutex::new(LogState::default()));
        let stdout = child.stdout.take().map(|s| Box::new(s) as Reader);
        let stderr = child.stderr.take().map(|s| Box::new(s) as Reader);
        for out in [stdout, stderr].into_iter().flatten() {
            tokio::spawn(follow_log(out, file.clone(), log.clone()));
        }
        Ok(Operator {
            child,
            pid,
            started,
            log,
            ticks,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn sample(&self) -> Option<procfs::Sample> {
        procfs::sample(self.pid, self.ticks)
    }

    /// When the log said the caches were synced.
    pub fn synced_at(&self) -> Option<Instant> {
        self.log.lock().ok()?.synced_at
    }

    /// Warning and error lines logged so far.
    pub fn warnings_errors(&self) -> (u64, u64) {
        self.log
            .lock()
            .map(|l| (l.warnings, l.errors))
            .unwrap_or_default()
    }

    /// Waits (bounded) until the admin server's address was logged.
    pub async fn admin_addr(&self, within: Duration) -> Option<SocketAddr> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(a) = self.log.lock().ok()?.admin {
                return Some(a);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> Option<String> {
        let addr = self.admin_addr(Duration::from_secs(5)).await?;
        http_get(addr, "/metrics", Duration::from_secs(10)).await
    }

    /// SIGTERM, then waits at most `within` for the exit; SIGKILL after that.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

async fn follow_log(
    out: Reader,
    file: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
    state: Arc<Mutex<LogState>>,
) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(mut f) = file.lock() {
            let _ = writeln!(f, "{line}");
            let _ = f.flush();
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let Ok(mut s) = state.lock() else { return };
        match v["level"].as_str() {
            Some("WARN") => s.warnings += 1,
            Some("ERROR") => s.errors += 1,
            _ => {}
        }
        match v["message"].as_str() {
            Some("admin server listening") => {
                s.admin = v["addr"].as_str().and_then(|a| a.parse().ok());
            }
            Some(m) if m.starts_with("caches synced") => {
                s.synced_at.get_or_insert_with(Instant::now);
            }
            _ => {}
        }
    }
}

/// A minimal HTTP/1.0 GET on loopback; the body, or `None` on any failure.
pub async fn http_get(addr: SocketAddr, path: &str, within: Duration) -> Option<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8(buf).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.")
            .then_some(())
            .filter(|_| head.split_whitespace().nth(1) == Some("200"))?;
        Some(body.to_string())
    };
    tokio::time::timeout(within, fetch).await.ok().flatten()
}

/// A Prometheus histogram: cumulative bucket counts by upper bound, sum and count.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// `self - before` (counters only grow within one process).
    pub fn since(&self, before: &Histogram) -> Histogram {
        let old = |le: f64| {
            before
                .buckets
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0, |(_, n)| *n)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| (*le, n.saturating_sub(old(*le))))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count.saturating_sub(before.count),
        }
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }

    /// The upper bound of the bucket holding quantile `q` (infinite past the last).
    pub fn quantile_bound(&self, q: f64) -> f64 {
        let want = (q * self.count as f64).ceil() as u64;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= want.max(1))
            .map_or(f64::INFINITY, |(le, _)| *le)
    }
}

/// Figures read from one scrape of `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Scraped {
    /// ScgTokens whose `scgtoken_ready` gauge is 1.
    pub ready: usize,
    pub reconciles: u64,
    /// Duration of refresh calls as the operator timed them.
    pub refresh: Histogram,
    pub reconcile: Histogram,
}

pub fn parse_metrics(text: &str) -> Scraped {
    let mut s = Scraped::default();
    for line in text.lines() {
        if line.starts_with("scgtoken_ready{") && line.ends_with(" 1") {
            s.ready += 1;
        } else if let Some(v) = line.strip_prefix("scgtoken_reconciles_total ") {
            s.reconciles = v.trim().parse::<f64>().map_or(0, |f| f as u64);
        } else if let Some(rest) = line.strip_prefix("scgtoken_refresh_duration_seconds") {
            histogram_line(&mut s.refresh, rest);
        } else if let Some(rest) = line.strip_prefix("scgtoken_reconcile_duration_seconds") {
            histogram_line(&mut s.reconcile, rest);
        }
    }
    s
}

fn histogram_line(h: &mut Histogram, rest: &str) {
    let Some((key, value)) = rest.rsplit_once(' ') else {
        return;
    };
    let Ok(value) = value.parse::<f64>() else {
        return;
    };
    if key == "_sum" {
        h.sum = value;
    } else if key == "_count" {
        h.count = value as u64;
    } else if let Some(le) = key
        .strip_prefix("_bucket{le=\"")
        .and_then(|k| k.strip_suffix("\"}"))
    {
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        h.buckets.push((le, value as u64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_operator_metrics() {
        let text = "scgtoken_ready{namespace=\"d\",name=\"a\"} 1\n\
                    scgtoken_ready{namespace=\"d\",name=\"b\"} 0\n\
                    scgtoken_reconciles_total 7\n\
                    scgtoken_refresh_duration_seconds_sum 0.5\n\
                    scgtoken_refresh_duration_seconds_count 4\n\
                    scgtoken_refresh_duration_seconds_bucket{le=\"0.01\"} 3\n\
                    scgtoken_refresh_duration_seconds_bucket{le=\"0.25\"} 4\n\
                    scgtoken_refresh_duration_seconds_bucket{le=\"+Inf\"} 4\n";
        let s = parse_metrics(text);
        assert_eq!((s.ready, s.reconciles), (1, 7));
        assert_eq!(s.refresh.count, 4);
        assert_eq!(s.refresh.quantile_bound(0.5), 0.01);
        assert_eq!(s.refresh.quantile_bound(0.99), 0.25);
        let d = s.refresh.since(&Histogram {
            buckets: vec![(0.01, 3)],
            sum: 0.1,
            count: 3,
        });
        assert_eq!((d.count, d.quantile_bound(0.99)), (1, 0.25));
    }
}
