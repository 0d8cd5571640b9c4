//! The figures of one run: a text table for people and one JSON line for plots.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{analysis::CallFigures, naive::NaiveFigures};

/// RBAC verbs that change state.
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// Request counters as (verb, resource) -> count.
pub type Counts = BTreeMap<(String, String), u64>;

/// `after - before`, dropping zeros.
pub fn diff(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// Total reads and writes.
pub fn reads_writes(c: &Counts) -> (u64, u64) {
    c.iter().fold((0, 0), |(r, w), ((verb, _), n)| {
        if WRITE_VERBS.contains(&verb.as_str()) {
            (r, w + n)
        } else {
            (r + n, w)
        }
    })
}

/// "verb group/resource" -> count, of writes (`writes == true`) or of reads.
pub fn by_verb(c: &Counts, writes: bool) -> BTreeMap<String, u64> {
    c.iter()
        .filter(|((verb, _), _)| WRITE_VERBS.contains(&verb.as_str()) == writes)
        .map(|((verb, res), n)| (format!("{verb} {res}"), *n))
        .collect()
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_gib: f64,
    /// Open-file limit of the harness and the operator.
    pub nofile: u64,
    pub loadavg_start: f64,
    pub loadavg_end: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Resources {
    /// utime + stime over the window.
    pub cpu_s: f64,
    pub cpu_per_rotation_ms: f64,
    /// VmRSS at the end of the window.
    pub rss_end_mib: f64,
    /// Highest VmRSS sampled (each second) in the window.
    pub rss_window_max_mib: f64,
    /// VmHWM at the end: the peak since the process started, warm-up included.
    pub hwm_mib: f64,
    pub reconciles: u64,
    /// Refresh calls and reconcile passes as the operator timed them (its histograms).
    pub refresh_call_ms: Timing,
    pub reconcile_ms: Timing,
    pub warnings: u64,
    pub errors: u64,
}

/// Mean and the upper bound of the histogram bucket holding the 99th percentile.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timing {
    pub n: u64,
    pub mean: f64,
    pub p99_at_most: f64,
}

impl Timing {
    pub fn of(h: &crate::operator::Histogram) -> Timing {
        Timing {
            n: h.count,
            mean: h.mean() * 1000.0,
            p99_at_most: h.quantile_bound(0.99) * 1000.0,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Api {
    pub reads: u64,
    pub writes: u64,
    pub writes_by_verb: BTreeMap<String, u64>,
    pub reads_by_verb: BTreeMap<String, u64>,
    pub reads_per_rotation: f64,
    pub writes_per_rotation: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Startup {
    /// Process start to the "caches synced" log line.
    pub synced_s: f64,
    /// Process start to every ScgToken reported Ready by the new process (metrics).
    pub all_ready_s: f64,
    /// How often /metrics was read while waiting (its resolution).
    pub poll_ms: f64,
    /// Refresh calls between process start and all Ready.
    pub refreshes: usize,
    /// Of those, calls before their scheduled time.
    pub not_due: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Outage {
    pub outage_s: f64,
    /// ScgTokens with at least one failed call during the outage.
    pub affected: usize,
    pub calls_during: usize,
    pub max_calls_per_sec_during: usize,
    pub max_calls_per_sec_after: usize,
    pub calls_first_10s_after: usize,
    /// From the end of the outage to the last affected ScgToken's first success.
    pub recovered_s: Option<f64>,
    pub not_recovered: usize,
    /// Chains whose token expired: whose expiry fell inside the outage (nothing could
    /// save them) and whose token was still valid when the outage ended.
    pub expired_unavoidable: usize,
    pub expired_avoidable: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub label: String,
    /// Extra environment of the operator process.
    pub operator_env: Vec<String>,
    pub scenario: String,
    pub tokens: usize,
    pub lifetime_s: u64,
    pub duration_s: f64,
    pub unrelated_secrets: usize,
    pub unrelated_bytes: usize,
    pub machine: Machine,
    /// ScgTokens created per second after the operator started; 0: all before.
    pub create_rate: usize,
    /// Creating the ScgTokens, credentials Secrets and simulator applications.
    pub setup_s: f64,
    pub unrelated_create_s: Option<f64>,
    /// Operator start to every chain's first token stored (N seeds refreshed at once).
    pub first_stored_s: f64,
    /// Refresh calls before the window (the first refresh of each chain and retries).
    pub warmup_calls: usize,
    /// Operator CPU from its start to the window (first refreshes, first lists).
    pub warmup_cpu_s: f64,
    pub warmup_failures: BTreeMap<String, usize>,
    /// Tokens issued to the operator that never reached a Secret, over the whole run.
    pub lost_tokens: usize,
    pub window_s: f64,
    pub rotations: usize,
    pub scg: CallFigures,
    pub calls_per_rotation: f64,
    /// Operator chains whose current token was dead at the end of the run.
    pub dead_at_end: usize,
    pub api: Api,
    pub operator: Resources,
    /// The harness process: in-memory API server, simulator and the bench itself.
    pub servers_cpu_s: f64,
    pub servers_cpu_cores: f64,
    pub servers_rss_mib: f64,
    pub idle_per_hour: Option<BTreeMap<String, f64>>,
    pub startup: Option<Startup>,
    pub outage: Option<Outage>,
    pub naive: Option<NaiveFigures>,
    /// Operator CPU per rotation divided by the naive loop's.
    pub cpu_ratio_vs_naive: Option<f64>,
    pub notes: Vec<String>,
}

impl Report {
    /// What went wrong that no load excuses: lost or expired tokens, early refreshes.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut check = |bad: bool, what: String| {
            if bad {
                v.push(what);
            }
        };
        check(
            self.lost_tokens > 0,
            format!("{} tokens issued but never stored", self.lost_tokens),
        );
        // An outage longer than a token's life kills chains by design; those count apart.
        let unavoidable = self.outage.as_ref().map_or(0, |o| o.expired_unavoidable);
        let expired = self.scg.expired_tokens.max(self.dead_at_end);
        check(
            expired > unavoidable,
            format!("{expired} tokens expired ({unavoidable} unavoidably)"),
        );
        check(
            self.scg.early > 0,
            format!("{} refreshes before they were due", self.scg.early),
        );
        if let Some(s) = &self.startup {
            check(
                s.not_due > 0,
                format!("{} refreshes at start-up that were not due", s.not_due),
            );
        }
        check(
            self.scenario == "steady" && self.rotations == 0,
            "no rotation in the window".into(),
        );
        check(
            self.naive.as_ref().is_some_and(|n| n.rotations == 0),
            "the naive loop rotated nothing".into(),
        );
        v
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<38} {v}");
        };
        row(
            "scenario",
            format!(
                "{} | N={} | lifetime {}s | window {:.0}s | unrelated Secrets {}",
                self.scenario, self.tokens, self.lifetime_s, self.window_s, self.unrelated_secrets
            ),
        );
        row(
            "machine",
            format!(
                "{} cores, {:.0} GiB, nofile {}, load {:.1} -> {:.1}",
                self.machine.nproc,
                self.machine.mem_total_gib,
                self.machine.nofile,
                self.machine.loadavg_start,
                self.machine.loadavg_end
            ),
        );
        row(
            "setup (objects created)",
            match self.create_rate {
                0 => format!("{:.1}s, before the operator started", self.setup_s),
                r => format!("{:.1}s, {r}/s while the operator ran", self.setup_s),
            },
        );
        if let Some(s) = self.unrelated_create_s {
            row("unrelated Secrets created in", format!("{s:.1}s"));
        }
        row(
            "first token of every chain stored",
            format!(
                "{:.1}s after operator start ({} calls; failures {:?}; {:.2}s CPU)",
                self.first_stored_s, self.warmup_calls, self.warmup_failures, self.warmup_cpu_s
            ),
        );
        row(
            "tokens issued but never stored",
            format!("{} (whole run)", self.lost_tokens),
        );
        let l = &self.scg.lag_ms;
        row(
            "refresh lag p50 / p99 / max",
            format!("{:.1} / {:.1} / {:.1} ms (n={})", l.p50, l.p99, l.max, l.n),
        );
        let l = &self.scg.send_lag_ms;
        row(
            "send lag (operator clock) p50/p99/max",
            format!("{:.1} / {:.1} / {:.1} ms", l.p50, l.p99, l.max),
        );
        let s = &self.scg.stored_ms;
        row(
            "call -> stored (watch) p50/p99/max",
            format!("{:.1} / {:.1} / {:.1} ms", s.p50, s.p99, s.max),
        );
        row(
            "tokens expired before refresh",
            format!(
                "{} (dead at end: {})",
                self.scg.expired_tokens, self.dead_at_end
            ),
        );
        row("calls before due", self.scg.early.to_string());
        row(
            "rotations / SCG calls",
            format!(
                "{} / {} ({:.2} calls per rotation; failures {:?}; max {}/s)",
                self.rotations,
                self.scg.calls,
                self.calls_per_rotation,
                self.scg.failures,
                self.scg.max_calls_per_sec
            ),
        );
        if self.scg.unmatched > 0 || self.scg.from_seed > 0 {
            row(
                "calls from seed / unmatched",
                format!("{} / {}", self.scg.from_seed, self.scg.unmatched),
            );
        }
        row(
            "API writes per rotation",
            format!(
                "{:.2} ({} total: {:?})",
                self.api.writes_per_rotation, self.api.writes, self.api.writes_by_verb
            ),
        );
        row(
            "API reads per rotation",
            format!(
                "{:.2} ({} total)",
                self.api.reads_per_rotation, self.api.reads
            ),
        );
        let o = &self.operator;
        row(
            "operator CPU",
            format!(
                "{:.2}s in window; {:.3} ms per rotation; {} reconciles ({:.2} per rotation)",
                o.cpu_s,
                o.cpu_per_rotation_ms,
                o.reconciles,
                o.reconciles as f64 / self.rotations.max(1) as f64
            ),
        );
        row(
            "operator-timed call / pass: mean, p99<=",
            format!(
                "{:.1}, {:.0} ms / {:.1}, {:.0} ms",
                o.refresh_call_ms.mean,
                o.refresh_call_ms.p99_at_most,
                o.reconcile_ms.mean,
                o.reconcile_ms.p99_at_most
            ),
        );
        row(
            "operator RSS end / window max / peak",
            format!(
                "{:.1} / {:.1} / {:.1} MiB",
                o.rss_end_mib, o.rss_window_max_mib, o.hwm_mib
            ),
        );
        row(
            "operator log warnings / errors",
            format!("{} / {}", o.warnings, o.errors),
        );
        row(
            "test servers (harness) CPU / RSS",
            format!(
                "{:.2}s = {:.2} cores; {:.0} MiB",
                self.servers_cpu_s, self.servers_cpu_cores, self.servers_rss_mib
            ),
        );
        if let Some(idle) = &self.idle_per_hour {
            row("idle, extrapolated per hour", format!("{idle:?}"));
        }
        if let Some(s) = &self.startup {
            row(
                "start-up: synced / all Ready",
                format!(
                    "{:.2}s / {:.2}s (poll {:.0} ms)",
                    s.synced_s, s.all_ready_s, s.poll_ms
                ),
            );
            row(
                "start-up: refreshes / not due",
                format!("{} / {}", s.refreshes, s.not_due),
            );
        }
        if let Some(o) = &self.outage {
            row(
                "outage: length / affected / calls",
                format!(
                    "{:.0}s / {} tokens / {} calls (max {}/s)",
                    o.outage_s, o.affected, o.calls_during, o.max_calls_per_sec_during
                ),
            );
            row(
                "recovery: max calls/s / first 10 s",
                format!(
                    "{} / {}",
                    o.max_calls_per_sec_after, o.calls_first_10s_after
                ),
            );
            row(
                "recovery: all recovered after",
                match o.recovered_s {
                    Some(s) => format!("{s:.1}s"),
                    None => format!("not within the run ({} left)", o.not_recovered),
                },
            );
            row(
                "expired: unavoidable / avoidable",
                format!("{} / {}", o.expired_unavoidable, o.expired_avoidable),
            );
        }
        if let Some(n) = &self.naive {
            row(
                "naive loop: loops / rotations / CPU",
                format!(
                    "{} / {} / {:.2}s = {:.1} ms per rotation ({} failures)",
                    n.loops, n.rotations, n.cpu_s, n.cpu_per_rotation_ms, n.failures
                ),
            );
            row(
                "naive loop: API reads / writes per rot.",
                format!(
                    "{:.1} / {:.1}",
                    n.api_reads_per_rotation, n.api_writes_per_rotation
                ),
            );
        }
        if let Some(r) = self.cpu_ratio_vs_naive {
            row(
                "operator / naive CPU per rotation",
                format!("{r:.4} (1/{:.0})", 1.0 / r),
            );
        }
        for n in &self.notes {
            row("note", n.clone());
        }
        t
    }
}
