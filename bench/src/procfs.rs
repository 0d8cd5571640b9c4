//! CPU and memory of one process, read from /proc (Linux only).

use std::time::Duration;

/// CPU time and memory of a process at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// utime + stime.
    pub cpu: Duration,
    /// Resident set size now (VmRSS), bytes.
    pub rss: u64,
    /// Peak resident set size so far (VmHWM), bytes.
    pub hwm: u64,
}

/// Clock ticks per second of /proc/<pid>/stat times.
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Reads /proc/<pid>/stat and /proc/<pid>/status; `None` once the process is gone.
pub fn sample(pid: u32, ticks: u64) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after its closing paren are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14, stime 15.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let to_duration = |t: u64| Duration::from_millis(t * 1000 / ticks);
    let cpu = to_duration(field(14)? + field(15)?);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    Some(Sample {
        cpu,
        rss: kib("VmRSS:").unwrap_or(0),
        hwm: kib("VmHWM:").unwrap_or(0),
    })
}

/// The 1-minute load average, for the record: other work on the machine skews timings.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Total memory of the machine in bytes.
pub fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |k| k * 1024)
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The soft limit on open files of this process (inherited by the operator).
pub fn nofile() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Raises this process's open-file limit (soft and hard) with `prlimit`; needs the
/// privilege to raise a hard limit.
pub fn raise_nofile(n: u64) -> Result<(), String> {
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={n}:{n}"))
        .status()
        .map_err(|e| format!("prlimit: {e}"))?;
    match status.success() {
        true => Ok(()),
        false => Err(format!("prlimit --nofile={n} failed: {status}")),
    }
}
