//! Turns the simulator's call log and the stored chain states into figures.
//!
//! The scheduled time of a refresh is computed with the operator's own schedule function
//! from the state that refresh replaced: the stored issue and expiry times (full precision,
//! from the target Secret's annotations) and the ScgToken's jitter key. The state is found
//! by the fingerprint of the token the call presented, so a missed watch event shows up as
//! "unmatched" rather than as a wrong lag.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::SystemTime,
};

use jiff::Timestamp;
use kube::ResourceExt;
use scg_token_operator::{
    chain,
    crd::ScgToken,
    policy::{self, Settings, TokenTimes},
};
use serde::Serialize;
use testkit::scgsim::{DeadReason, Outcome, RefreshCall};

use crate::chains::Stored;

/// Milliseconds since the epoch.
pub fn epoch_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn ts_ms(t: Timestamp) -> f64 {
    t.as_microsecond() as f64 / 1000.0
}

/// p50, p99 and max of a sample, in its unit.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Spread {
            n: v.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// What the harness knows of one ScgToken.
pub struct Known<'a> {
    pub obj: &'a ScgToken,
    pub jitter_key: u64,
    /// The seed token its chain started from.
    pub seed: &'a str,
}

/// Everything needed to judge calls.
pub struct Judge<'a> {
    pub settings: &'a Settings,
    /// By consumer key.
    pub tokens: HashMap<String, Known<'a>>,
    /// By ScgToken (= target Secret) name.
    pub states: &'a HashMap<String, Vec<Stored>>,
}

/// How one call relates to the schedule.
pub struct Judged<'a> {
    pub call: &'a RefreshCall,
    pub at_ms: f64,
    pub name: &'a str,
    /// The stored state holding the token this call issued, once the watch saw it.
    pub to: Option<&'a Stored>,
    /// Actual minus scheduled time, ms (successful calls from a known state).
    pub lag_ms: Option<f64>,
    /// The same with the operator's send time (the new token's stored issue time).
    pub send_lag_ms: Option<f64>,
    /// The token presented had expired before the call.
    pub expired: bool,
    /// The call presented the seed of a new chain.
    pub from_seed: bool,
}

impl<'a> Judge<'a> {
    /// The operator's calls (not the naive loop's) received in `[from, to)`, judged.
    pub fn calls(&self, log: &'a [RefreshCall], from: f64, to: f64) -> Vec<Judged<'a>> {
        log.iter()
            .filter_map(|c| {
                let at_ms = epoch_ms(c.at);
                if at_ms < from || at_ms >= to {
                    return None;
                }
                let known = self.tokens.get(c.consumer_key.as_deref()?)?;
                Some(self.judge(c, at_ms, known))
            })
            .collect()
    }

    fn judge(&self, call: &'a RefreshCall, at_ms: f64, known: &Known<'a>) -> Judged<'a> {
        let name = known.obj.metadata.name.as_deref().unwrap_or_default();
        let state_of = |token: Option<&str>| {
            let fp = chain::fingerprint(known.obj, token?);
            self.states.get(name)?.iter().find(|s| s.fingerprint == fp)
        };
        let from = state_of(call.old_token.as_deref());
        let to = state_of(call.issued());
        let success = matches!(call.outcome, Outcome::Refreshed { .. });
        let due = from.filter(|_| success).and_then(|s| {
            let times = TokenTimes {
                issued_at: Some(s.issued_at),
                expires_at: Some(s.expires_at),
            };
            policy::next_refresh(self.settings, times, known.jitter_key).map(ts_ms)
        });
        let lag_ms = due.map(|due| at_ms - due);
        let send_lag_ms = due.zip(to).map(|(due, to)| ts_ms(to.issued_at) - due);
        let expired = matches!(
            call.outcome,
            Outcome::RejectedToken {
                reason: Some(DeadReason::Expired)
            }
        ) || (success && from.is_some_and(|s| at_ms > ts_ms(s.expires_at)));
        Judged {
            call,
            at_ms,
            name,
            to,
            lag_ms,
            send_lag_ms,
            expired,
            from_seed: from.is_none() && call.old_token.as_deref() == Some(known.seed),
        }
    }
}

/// Figures of the calls in one window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CallFigures {
    pub calls: usize,
    pub successes: usize,
    /// Failed calls by outcome.
    pub failures: BTreeMap<String, usize>,
    /// Successful calls from a stored state: actual minus scheduled time, ms.
    pub lag_ms: Spread,
    /// The same, with the send time as the operator's clock recorded it (the new token's
    /// issue time) instead of the simulator's receive time: what remains when the test
    /// servers' delays are taken out.
    pub send_lag_ms: Spread,
    /// Calls made before their scheduled time (more than 1 ms early).
    pub early: usize,
    /// Distinct ScgTokens that presented an expired token.
    pub expired_tokens: usize,
    /// Successful calls from the seed (the first refresh of a chain).
    pub from_seed: usize,
    /// Successful calls whose old token is in no stored state seen by the watch.
    pub unmatched: usize,
    /// From the call to the new state reaching the harness's watch, ms.
    pub stored_ms: Spread,
    /// Most calls received in one wall-clock second.
    pub max_calls_per_sec: usize,
}

pub fn call_figures(judged: &[Judged<'_>]) -> CallFigures {
    let mut f = CallFigures {
        calls: judged.len(),
        ..Default::default()
    };
    let mut lags = Vec::new();
    let mut send_lags = Vec::new();
    let mut stored = Vec::new();
    let mut expired = HashSet::new();
    let mut per_sec: HashMap<i64, usize> = HashMap::new();
    for j in judged {
        *per_sec
            .entry((j.at_ms / 1000.0).floor() as i64)
            .or_default() += 1;
        if j.expired {
            expired.insert(j.name);
        }
        let Outcome::Refreshed { .. } = &j.call.outcome else {
            *f.failures
                .entry(outcome_label(&j.call.outcome))
                .or_default() += 1;
            continue;
        };
        f.successes += 1;
        match (j.lag_ms, j.from_seed) {
            (Some(lag), _) => {
                lags.push(lag);
                if lag < -1.0 {
                    f.early += 1;
                }
            }
            (None, true) => f.from_seed += 1,
            (None, false) => f.unmatched += 1,
        }
        send_lags.extend(j.send_lag_ms);
        if let Some(to) = j.to {
            stored.push(epoch_ms(to.seen) - j.at_ms);
        }
    }
    f.lag_ms = Spread::of(lags);
    f.send_lag_ms = Spread::of(send_lags);
    f.stored_ms = Spread::of(stored);
    f.expired_tokens = expired.len();
    f.max_calls_per_sec = per_sec.values().copied().max().unwrap_or(0);
    f
}

/// Tokens the simulator issued to the operator that never reached a target Secret (as
/// far as the watch saw), among calls received before `horizon_ms`: each is a chain cut.
pub fn lost_tokens(judged: &[Judged<'_>], horizon_ms: f64) -> usize {
    judged
        .iter()
        .filter(|j| j.at_ms < horizon_ms && j.call.issued().is_some() && j.to.is_none())
        .count()
}

fn outcome_label(o: &Outcome) -> String {
    match o {
        Outcome::Refreshed { .. } => "refreshed".into(),
        Outcome::BadRequest => "bad_request".into(),
        Outcome::BadCredentials => "bad_credentials".into(),
        Outcome::RejectedToken { reason } => match reason {
            Some(DeadReason::Expired) => "rejected_expired".into(),
            Some(DeadReason::Revoked) => "rejected_revoked".into(),
            None => "rejected_unknown".into(),
        },
        Outcome::Fault(f) => format!("fault_{}", fault_label(f)),
    }
}

fn fault_label(f: &testkit::scgsim::Fault) -> &'static str {
    use testkit::scgsim::Fault;
    match f {
        Fault::Status { .. } => "status",
        Fault::TooManyRequests { .. } => "429",
        Fault::Delay(_) => "delay",
        Fault::MalformedJson => "malformed",
        Fault::HtmlBadGateway => "502",
        Fault::DropConnection => "drop",
        Fault::Outage => "503",
    }
}

/// Jitter key of an ScgToken, as the operator computes it.
pub fn jitter_key(obj: &ScgToken) -> u64 {
    policy::jitter_key(&obj.uid().unwrap_or_default())
}
