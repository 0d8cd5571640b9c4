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
    ) -> Result<Operator, String> {
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
            .env_remove("RUST_LOG")
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

/// Figures read from one scrape of `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scraped {
    /// ScgTokens whose `scgtoken_ready` gauge is 1.
    pub ready: usize,
    pub reconciles: u64,
}

pub fn parse_metrics(text: &str) -> Scraped {
    let mut s = Scraped::default();
    for line in text.lines() {
        if line.starts_with("scgtoken_ready{") && line.ends_with(" 1") {
            s.ready += 1;
        } else if let Some(v) = line.strip_prefix("scgtoken_reconciles_total ") {
            s.reconciles = v.trim().parse::<f64>().map_or(0, |f| f as u64);
        }
    }
    s
}
