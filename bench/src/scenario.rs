//! One run: set up, start the operator, wait for every chain's first token, then measure
//! the chosen scenario and report.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use scg_token_operator::{
    crd::ScgTokenSpec,
    policy::{self, Settings, TokenTimes},
};
use testkit::{
    apiserver::ApiServer,
    scgsim::{Fault, Outcome, ScgSimulator, SimConfig},
};

use crate::{
    Args, Scenario,
    analysis::{self, Judge, Known, epoch_ms},
    chains::{ChainWatch, Stored},
    naive::{self, Naive, NaiveFigures},
    operator::{self, Operator},
    procfs,
    report::{self, Api, Counts, Machine, Report, Resources, Timing},
    setup::{self, NAMESPACE, TokenSetup},
};

type Result<T> = std::result::Result<T, String>;

/// Everything a run holds; dropping it stops the operator and the servers.
struct Run {
    args: Args,
    scenario: Scenario,
    work: PathBuf,
    ticks: u64,
    api: ApiServer,
    sim: ScgSimulator,
    settings: Settings,
    spec: ScgTokenSpec,
    tokens: Vec<TokenSetup>,
    watch: ChainWatch,
    exe: PathBuf,
    report: Report,
}

/// The state of the world at one instant.
struct Mark {
    sys: SystemTime,
    at: Instant,
    counts: Counts,
    op: procfs::Sample,
    harness: procfs::Sample,
    /// The operator's counters and histograms.
    scraped: operator::Scraped,
}

pub async fn run(args: Args) -> Result<()> {
    let scenario = match (args.scenario, args.outage) {
        (Scenario::Steady, Some(_)) => Scenario::Outage,
        (s, _) => s,
    };
    let mut notes = Vec::new();
    let naive_k = match (scenario, args.naive) {
        (Scenario::Steady, k) if k > 0 => {
            let missing = naive::tools_missing();
            if missing.is_empty() {
                k
            } else if std::env::var_os("CI").is_some() {
                return Err(format!(
                    "the naive loop needs {missing:?}, which are missing"
                ));
            } else {
                eprintln!("SKIPPED the naive loop: {missing:?} not installed");
                notes.push(format!("naive loop skipped: {missing:?} not installed"));
                0
            }
        }
        _ => 0,
    };
    let exe = match &args.operator_bin {
        Some(p) => p.clone(),
        None => operator::build_release()?,
    };
    if let Some(n) = args.nofile {
        procfs::raise_nofile(n)?;
    }
    let work = work_dir(scenario, args.tokens)?;
    eprintln!("logs: {}", work.display());
    let loadavg_start = procfs::loadavg();

    let api = ApiServer::start()
        .await
        .map_err(|e| format!("API server: {e}"))?;
    let sim = ScgSimulator::start(SimConfig {
        validity_cap: args.lifetime,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| format!("simulator: {e}"))?;
    let client = api.client();
    setup::install_crd(&client)
        .await
        .map_err(|e| format!("installing the CRD: {e}"))?;
    let unrelated_create_s = if args.unrelated_secrets > 0 {
        eprintln!("creating {} unrelated Secrets", args.unrelated_secrets);
        let took = setup::create_unrelated(&client, args.unrelated_secrets, args.unrelated_bytes)
            .await
            .map_err(|e| format!("creating unrelated Secrets: {e}"))?;
        Some(took.as_secs_f64())
    } else {
        None
    };
    let mut spec = ScgTokenSpec::new("");
    spec.endpoint = sim.refresh_url();
    spec.validity = setup::go_duration(args.lifetime);
    spec.refresh_before_percentage = args.refresh_before_percentage;
    let settings = policy::validate(&spec).map_err(|e| e.0)?;
    let watch = ChainWatch::start(client, NAMESPACE);
    let report = Report {
        bench: "scg-token-operator",
        scenario: format!("{scenario:?}").to_lowercase(),
        tokens: args.tokens,
        lifetime_s: args.lifetime.as_secs(),
        unrelated_secrets: args.unrelated_secrets,
        unrelated_bytes: if args.unrelated_secrets > 0 {
            args.unrelated_bytes
        } else {
            0
        },
        machine: Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_total_gib: procfs::mem_total() as f64 / (1u64 << 30) as f64,
            nofile: procfs::nofile(),
            loadavg_start,
            loadavg_end: 0.0,
        },
        unrelated_create_s,
        notes,
        label: args.label.clone(),
        operator_env: args.operator_env.clone(),
        ..Report::default()
    };
    let mut run = Run {
        args,
        scenario,
        work,
        ticks: procfs::clock_ticks(),
        api,
        sim,
        settings,
        spec,
        tokens: Vec::new(),
        watch,
        exe,
        report,
    };
    run.measure(naive_k).await?;
    run.report.machine.loadavg_end = procfs::loadavg();
    run.publish()
}

fn work_dir(scenario: Scenario, n: usize) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = target
        .join("bench")
        .join(format!("{stamp}-{scenario:?}-n{n}").to_lowercase());
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

impl Run {
    fn spawn_operator(&self, nth: u32) -> Result<Operator> {
        Operator::spawn(
            &self.exe,
            self.api.kubeconfig_path(),
            NAMESPACE,
            &self.work.join(format!("operator-{nth}.log")),
            self.ticks,
            &self.args.operator_env,
        )
    }

    /// The state now; `fresh` for a process just started (its counters are zero and its
    /// admin server is not up yet).
    async fn mark(&self, op: &Operator, fresh: bool) -> Mark {
        let scraped = match fresh {
            true => operator::Scraped::default(),
            false => op
                .metrics()
                .await
                .map(|t| operator::parse_metrics(&t))
                .unwrap_or_default(),
        };
        Mark {
            scraped,
            sys: SystemTime::now(),
            at: Instant::now(),
            counts: self.api.counters().snapshot(),
            op: op.sample().unwrap_or_default(),
            harness: procfs::sample(std::process::id(), self.ticks).unwrap_or_default(),
        }
    }

    /// Creates the ScgTokens: all at once, or `--create-rate` per second.
    async fn create_tokens(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        let client = self.api.client();
        let made = setup::create_tokens(&client, &self.sim, range, &self.spec)
            .await
            .map_err(|e| format!("creating ScgTokens: {e}"))?;
        self.tokens.extend(made);
        Ok(())
    }

    /// Creates the ScgTokens, starts the operator and waits for every chain's first token.
    async fn warm_up(&mut self) -> Result<Operator> {
        let n = self.args.tokens;
        let t = Instant::now();
        let op = if self.args.create_rate == 0 {
            eprintln!("creating {n} ScgTokens");
            self.create_tokens(0..n).await?;
            self.report.setup_s = t.elapsed().as_secs_f64();
            self.spawn_operator(1)?
        } else {
            let op = self.spawn_operator(1)?;
            let rate = self.args.create_rate;
            eprintln!("creating {n} ScgTokens, {rate} per second");
            // In tenths of a second, so the load is smooth.
            let batch = rate.div_ceil(10).max(1);
            let mut next = Instant::now();
            for from in (0..n).step_by(batch) {
                tokio::time::sleep_until(next.into()).await;
                next += Duration::from_secs_f64(batch as f64 / rate as f64);
                self.create_tokens(from..(from + batch).min(n)).await?;
            }
            self.report.setup_s = t.elapsed().as_secs_f64();
            op
        };
        eprintln!(
            "operator started (pid {}); waiting for the first token of {n} chains",
            op.pid()
        );
        let mut op = op;
        self.report.first_stored_s = self.wait_stored(&mut op).await?;
        Ok(op)
    }

    async fn measure(&mut self, naive_k: usize) -> Result<()> {
        let mut op = self.warm_up().await?;
        self.settle().await;
        match self.scenario {
            Scenario::Steady | Scenario::Idle => {
                let start = self.mark(&op, false).await;
                let (end, naive) = tokio::join!(
                    self.window(&mut op, start.at + self.args.duration),
                    self.naive(naive_k),
                );
                let (end, rss_max) = end?;
                self.assemble(&op, &start, &end, rss_max);
                if let Some(n) = naive {
                    let n = n?;
                    let ours = self.report.operator.cpu_per_rotation_ms;
                    if n.cpu_per_rotation_ms > 0.0 && ours.is_finite() && ours > 0.0 {
                        self.report.cpu_ratio_vs_naive = Some(ours / n.cpu_per_rotation_ms);
                    }
                    self.report.naive = Some(n);
                }
                if self.scenario == Scenario::Idle {
                    self.idle_extrapolation();
                }
            }
            Scenario::Startup => {
                eprintln!("stopping the operator; starting it again");
                op.terminate(Duration::from_secs(30)).await;
                op = self.spawn_operator(2)?;
                let start = self.mark(&op, true).await;
                let ready = self.wait_all_ready(&mut op).await?;
                let until = (start.at + self.args.duration).max(Instant::now());
                let (end, rss_max) = self.window(&mut op, until).await?;
                self.assemble(&op, &start, &end, rss_max);
                self.startup_figures(&op, &start, ready);
            }
            Scenario::Outage => self.outage(&mut op).await?,
        }
        op.terminate(Duration::from_secs(30)).await;
        Ok(())
    }

    /// Seconds from the operator's start until every chain has a stored token. Chains
    /// that make no progress for a minute are given up on (and reported): a chain whose
    /// new token never reached the Secret cannot be refreshed again.
    async fn wait_stored(&mut self, op: &mut Operator) -> Result<f64> {
        const STALL: Duration = Duration::from_secs(60);
        let deadline = Instant::now() + self.args.warmup_timeout;
        let mut last_print = Instant::now();
        let (mut best, mut progress_at) = (0, Instant::now());
        loop {
            let stored = self.watch.stored_count();
            if stored >= self.args.tokens {
                return Ok(op.started.elapsed().as_secs_f64());
            }
            if stored > best {
                (best, progress_at) = (stored, Instant::now());
            }
            if !op.alive() {
                return Err(format!("the operator exited; see {}", self.work.display()));
            }
            if Instant::now() >= deadline || progress_at.elapsed() >= STALL {
                let missing = self.args.tokens - stored;
                let msg = format!(
                    "{missing} of {} chains stored no token: no progress for {:.0}s after {:.0}s",
                    self.args.tokens,
                    progress_at.elapsed().as_secs_f64(),
                    op.started.elapsed().as_secs_f64()
                );
                eprintln!("{msg}");
                self.report.notes.push(msg);
                return Ok(f64::NAN);
            }
            if last_print.elapsed() > Duration::from_secs(10) {
                eprintln!("  {stored} chains stored");
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the first refreshes' status writes and follow-up passes are over:
    /// two seconds without an API write (at most 15 s, as rotations may start soon).
    /// Where nothing is due later (idle, start-up, outage), it waits for three seconds
    /// without any request (at most five minutes), so that the operator's first list of
    /// a crowded namespace is over before anything is measured.
    async fn settle(&mut self) {
        let (quiet, bound, all) = match self.scenario {
            Scenario::Steady => (Duration::from_secs(2), Duration::from_secs(15), false),
            _ => (Duration::from_secs(3), Duration::from_secs(300), true),
        };
        let count = || {
            let (reads, writes) = report::reads_writes(&self.api.counters().snapshot());
            writes + if all { reads } else { 0 }
        };
        let started = Instant::now();
        let mut last = count();
        while started.elapsed() < bound {
            tokio::time::sleep(quiet).await;
            let now = count();
            if now == last {
                return;
            }
            last = now;
        }
        let msg = format!("the API was still busy after {bound:?} of settling");
        eprintln!("{msg}");
        self.report.notes.push(msg);
    }

    /// Samples the operator each second until `until`; returns the end mark and the
    /// highest RSS seen.
    async fn window(&self, op: &mut Operator, until: Instant) -> Result<(Mark, u64)> {
        let mut rss_max = 0;
        loop {
            if let Some(s) = op.sample() {
                rss_max = rss_max.max(s.rss);
            }
            if !op.alive() {
                return Err(format!("the operator exited; see {}", self.work.display()));
            }
            let now = Instant::now();
            if now >= until {
                return Ok((self.mark(op, false).await, rss_max));
            }
            tokio::time::sleep((until - now).min(Duration::from_secs(1))).await;
        }
    }

    async fn naive(&self, k: usize) -> Option<Result<NaiveFigures>> {
        if k == 0 {
            return None;
        }
        let rotations = self.args.naive_rotations.max(1);
        let per = self.args.duration / rotations;
        let interval = (self.args.lifetime * 2 / 3).min(per.max(Duration::from_secs(5)));
        let started = Naive::start(
            &self.sim,
            k,
            rotations,
            interval,
            self.args.lifetime,
            &self.work,
        )
        .await;
        Some(match started {
            Ok(n) => {
                let within = n.expected_duration();
                n.finish(within).await
            }
            Err(e) => Err(e),
        })
    }

    fn judge<'a>(&'a self, states: &'a HashMap<String, Vec<Stored>>) -> Judge<'a> {
        Judge {
            settings: &self.settings,
            tokens: self
                .tokens
                .iter()
                .map(|t| {
                    let known = Known {
                        obj: &t.obj,
                        jitter_key: analysis::jitter_key(&t.obj),
                        seed: &t.seed,
                    };
                    (t.consumer_key.clone(), known)
                })
                .collect(),
            states,
        }
    }

    /// Fills the common figures of the window `[start, end]`.
    fn assemble(&mut self, op: &Operator, start: &Mark, end: &Mark, rss_max: u64) {
        let log = self.sim.refresh_log();
        let states = self.watch.snapshot();
        let judge = self.judge(&states);
        let judged = judge.calls(&log, epoch_ms(start.sys), epoch_ms(end.sys));
        let scg = analysis::call_figures(&judged);
        let before = judge.calls(&log, 0.0, epoch_ms(start.sys));
        let warmup = analysis::call_figures(&before);
        let all = judge.calls(&log, 0.0, f64::INFINITY);
        // A token issued in the last seconds may still be on its way to the Secret.
        let lost = analysis::lost_tokens(&all, epoch_ms(end.sys) - 5000.0);
        let window = end.at - start.at;
        let rotations = scg.successes;
        // Nothing per rotation without a rotation (idle, start-up): NaN, null in JSON.
        let per = |x: f64| match rotations {
            0 => f64::NAN,
            n => x / n as f64,
        };
        let counts = report::diff(&start.counts, &end.counts);
        let (reads, writes) = report::reads_writes(&counts);
        let cpu = (end.op.cpu.saturating_sub(start.op.cpu)).as_secs_f64();
        let harness_cpu = (end.harness.cpu.saturating_sub(start.harness.cpu)).as_secs_f64();
        let (warnings, errors) = op.warnings_errors();
        let dead_at_end = self.dead_chains().len();
        let r = &mut self.report;
        r.duration_s = self.args.duration.as_secs_f64();
        r.window_s = window.as_secs_f64();
        r.rotations = rotations;
        r.calls_per_rotation = per(scg.calls as f64);
        r.scg = scg;
        r.api = Api {
            reads,
            writes,
            writes_by_verb: report::by_verb(&counts, true),
            reads_by_verb: report::by_verb(&counts, false),
            reads_per_rotation: per(reads as f64),
            writes_per_rotation: per(writes as f64),
        };
        r.operator = Resources {
            cpu_s: cpu,
            cpu_per_rotation_ms: per(cpu * 1000.0),
            rss_end_mib: procfs::mib(end.op.rss),
            rss_window_max_mib: procfs::mib(rss_max),
            hwm_mib: procfs::mib(end.op.hwm),
            reconciles: end
                .scraped
                .reconciles
                .saturating_sub(start.scraped.reconciles),
            refresh_call_ms: Timing::of(&end.scraped.refresh.since(&start.scraped.refresh)),
            reconcile_ms: Timing::of(&end.scraped.reconcile.since(&start.scraped.reconcile)),
            warnings,
            errors,
        };
        r.servers_cpu_s = harness_cpu;
        r.servers_cpu_cores = harness_cpu / window.as_secs_f64().max(1e-9);
        r.servers_rss_mib = procfs::mib(end.harness.rss);
        r.dead_at_end = dead_at_end;
        r.lost_tokens = lost;
        r.warmup_cpu_s = start.op.cpu.as_secs_f64();
        r.warmup_calls = warmup.calls;
        r.warmup_failures = warmup.failures;
        r.create_rate = self.args.create_rate;
    }

    /// Operator chains whose current token has expired.
    fn dead_chains(&self) -> HashSet<String> {
        self.tokens
            .iter()
            .filter(|t| {
                self.sim
                    .current_token(&t.consumer_key)
                    .and_then(|tok| self.sim.remaining_validity(&tok))
                    .is_some_and(|left| left.is_zero())
            })
            .map(|t| t.name.clone())
            .collect()
    }

    fn idle_extrapolation(&mut self) {
        let r = &mut self.report;
        let per_hour = 3600.0 / r.window_s.max(1e-9);
        r.idle_per_hour = Some(BTreeMap::from([
            ("scg_calls".to_string(), r.scg.calls as f64 * per_hour),
            ("api_writes".to_string(), r.api.writes as f64 * per_hour),
            ("api_reads".to_string(), r.api.reads as f64 * per_hour),
            ("operator_cpu_s".to_string(), r.operator.cpu_s * per_hour),
        ]));
    }

    /// Polls the new process's /metrics until it reports every ScgToken Ready; returns
    /// when that was first seen and the polling interval.
    async fn wait_all_ready(&self, op: &mut Operator) -> Result<(Instant, Duration)> {
        let deadline = Instant::now() + self.args.warmup_timeout;
        let mut poll = Duration::from_millis(250);
        loop {
            if !op.alive() {
                return Err(format!("the operator exited; see {}", self.work.display()));
            }
            let asked = Instant::now();
            if let Some(text) = op.metrics().await {
                // Reading /metrics costs the operator CPU; never spend more than a fifth
                // of the time doing it.
                poll = poll.max(asked.elapsed() * 4);
                if operator::parse_metrics(&text).ready >= self.args.tokens {
                    return Ok((Instant::now(), poll));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not every ScgToken was Ready within {:?} of the restart",
                    self.args.warmup_timeout
                ));
            }
            tokio::time::sleep(poll).await;
        }
    }

    fn startup_figures(&mut self, op: &Operator, start: &Mark, (ready, poll): (Instant, Duration)) {
        let log = self.sim.refresh_log();
        let states = self.watch.snapshot();
        let judge = self.judge(&states);
        let ready_sys = start.sys + (ready - start.at);
        let judged = judge.calls(&log, epoch_ms(start.sys), epoch_ms(ready_sys));
        let not_due = judged
            .iter()
            .filter(|j| j.lag_ms.is_some_and(|l| l < -1.0))
            .count();
        self.report.startup = Some(report::Startup {
            synced_s: op
                .synced_at()
                .map_or(f64::NAN, |s| (s - op.started).as_secs_f64()),
            all_ready_s: (ready - op.started).as_secs_f64(),
            poll_ms: poll.as_secs_f64() * 1000.0,
            refreshes: judged.len(),
            not_due,
        });
    }

    /// The next scheduled refresh of every chain, from the stored states.
    fn earliest_due(&self) -> Option<SystemTime> {
        let states = self.watch.snapshot();
        self.tokens
            .iter()
            .filter_map(|t| {
                let last = states.get(&t.name)?.iter().max_by_key(|s| s.issued_at)?;
                let times = TokenTimes {
                    issued_at: Some(last.issued_at),
                    expires_at: Some(last.expires_at),
                };
                policy::next_refresh(&self.settings, times, analysis::jitter_key(&t.obj))
            })
            .min()
            .map(|due| {
                SystemTime::UNIX_EPOCH
                    + Duration::from_micros(u64::try_from(due.as_microsecond()).unwrap_or(0))
            })
    }

    async fn outage(&mut self, op: &mut Operator) -> Result<()> {
        let length = self.args.outage.unwrap_or(Duration::from_secs(300));
        // Start just before the first refresh falls due, so that the outage hits the
        // chains when they need the API.
        let due = self
            .earliest_due()
            .ok_or("no chain has a scheduled refresh")?;
        let lead = due
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .saturating_sub(Duration::from_secs(5));
        if lead > self.args.lifetime {
            return Err(format!("the first refresh is {lead:?} away"));
        }
        eprintln!("outage of {length:?} starts in {lead:?}");
        tokio::time::sleep(lead).await;
        let start = self.mark(op, false).await;
        self.sim.set_fault(Fault::Outage, None);
        let outage_result = self.window(op, start.at + length).await;
        self.sim.clear_faults();
        let (_, mut rss_max) = outage_result?;
        let ended = SystemTime::now();
        let alive_at_end: HashSet<String> = {
            let dead = self.dead_chains();
            self.tokens
                .iter()
                .map(|t| t.name.clone())
                .filter(|n| !dead.contains(n))
                .collect()
        };
        eprintln!("outage over; watching the recovery");
        let deadline = Instant::now() + self.args.duration;
        let mut last = report::Outage::default();
        while Instant::now() < deadline {
            let (_, r) = self
                .window(op, Instant::now() + Duration::from_secs(2))
                .await?;
            rss_max = rss_max.max(r);
            last = self.outage_figures(start.sys, ended, &alive_at_end);
            if last.not_recovered == 0 {
                break;
            }
        }
        let end = self.mark(op, false).await;
        self.assemble(op, &start, &end, rss_max);
        let mut figures = last;
        figures.outage_s = length.as_secs_f64();
        self.report.outage = Some(figures);
        Ok(())
    }

    fn outage_figures(
        &self,
        started: SystemTime,
        ended: SystemTime,
        alive_at_end: &HashSet<String>,
    ) -> report::Outage {
        let log = self.sim.refresh_log();
        let states = self.watch.snapshot();
        let judge = self.judge(&states);
        let (from, to) = (epoch_ms(started), epoch_ms(ended));
        let judged = judge.calls(&log, from, f64::INFINITY);
        let mut o = report::Outage::default();
        let mut affected = HashSet::new();
        let mut first_success: HashMap<&str, f64> = HashMap::new();
        let mut per_sec_during: HashMap<i64, usize> = HashMap::new();
        let mut per_sec_after: HashMap<i64, usize> = HashMap::new();
        let mut expired = HashSet::new();
        for j in &judged {
            let sec = (j.at_ms / 1000.0).floor() as i64;
            if j.expired {
                expired.insert(j.name.to_string());
            }
            if j.at_ms < to {
                o.calls_during += 1;
                *per_sec_during.entry(sec).or_default() += 1;
                if !matches!(j.call.outcome, Outcome::Refreshed { .. }) {
                    affected.insert(j.name);
                }
            } else {
                *per_sec_after.entry(sec).or_default() += 1;
                if j.at_ms < to + 10_000.0 {
                    o.calls_first_10s_after += 1;
                }
                if matches!(j.call.outcome, Outcome::Refreshed { .. }) {
                    first_success.entry(j.name).or_insert(j.at_ms);
                }
            }
        }
        expired.extend(self.dead_chains());
        o.affected = affected.len();
        o.max_calls_per_sec_during = per_sec_during.values().copied().max().unwrap_or(0);
        o.max_calls_per_sec_after = per_sec_after.values().copied().max().unwrap_or(0);
        o.not_recovered = affected
            .iter()
            .filter(|n| !first_success.contains_key(*n))
            .count();
        if o.not_recovered == 0 {
            o.recovered_s = Some(
                affected
                    .iter()
                    .filter_map(|n| first_success.get(n))
                    .fold(0.0f64, |m, at| m.max((at - to) / 1000.0)),
            );
        }
        o.expired_avoidable = expired.iter().filter(|n| alive_at_end.contains(*n)).count();
        o.expired_unavoidable = expired.len() - o.expired_avoidable;
        o
    }

    fn publish(&self) -> Result<()> {
        println!("\n{}", self.report.table());
        let line = serde_json::to_string(&self.report).map_err(|e| e.to_string())?;
        println!("{line}");
        if let Some(path) = &self.args.json_out {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            writeln!(f, "{line}").map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let violations = self.report.violations();
        for v in &violations {
            eprintln!("CHECK: {v}");
        }
        if self.args.check && !violations.is_empty() {
            return Err(format!("{} check(s) failed", violations.len()));
        }
        Ok(())
    }
}
