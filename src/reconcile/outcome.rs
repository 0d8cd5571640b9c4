//! The pure end of a pass: from the ScgToken as it was and what the pass did, the new
//! status, the Events to publish and the next wake-up. No I/O; `publish` writes it.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;

use crate::{
    crd::ScgTokenStatus,
    policy::{self, Blocked, FailureKind, TokenTimes},
    report::{self, Reason},
    scg::RefreshError,
};

/// At most one `Refreshed` Event per token in this interval; short lifetimes must not
/// flood the API with Events. Failures and recoveries are always reported.
pub const REFRESHED_EVENT_INTERVAL: Duration = Duration::from_secs(600);

/// The ScgToken as the pass found it.
pub struct Prior<'a> {
    pub status: &'a ScgTokenStatus,
    pub ready: Option<&'a Condition>,
    pub generation: Option<i64>,
    pub target_name: &'a str,
    /// Attempts that failed in a row before this pass (from memory: status may show
    /// fewer, see [`policy::STATUS_PROGRESS_INTERVAL`]).
    pub failures: u32,
    /// When the last `Refreshed` Event was published (from memory).
    pub refreshed_event_at: Option<Timestamp>,
}

/// What the status shows of the chain a pass stood on.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    pub times: TokenTimes,
    pub token_fingerprint: String,
    /// Fingerprint of what a refresh attempt sends: when it changes, a back-off ends.
    pub credentials_fingerprint: String,
}

/// A refresh call that was made: what status shows after it, and the refresh-request
/// annotation value it honoured, if one asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub shown: Shown,
    pub request: Option<String>,
}

/// What a pass did.
#[derive(Debug, Clone, PartialEq)]
pub enum Happened {
    /// A gate stopped it.
    Blocked(Blocked),
    /// Nothing is due before `until`.
    Waiting { shown: Shown, until: Timestamp },
    /// The refresh call failed; it ended at `at`. `first_call`: the first call this
    /// process made for this ScgToken.
    Failed {
        attempt: Attempt,
        error: RefreshError,
        at: Timestamp,
        jitter_key: u64,
        first_call: bool,
    },
    /// A token is held in memory because the target Secret could not be written.
    /// `received` is set when it is the token this pass just received.
    Pending {
        error: String,
        received: Option<Attempt>,
    },
    /// A new token was received and stored; `lifetime` as scheduled, next refresh `due`.
    Refreshed {
        attempt: Attempt,
        lifetime: Duration,
        due: Option<Timestamp>,
        /// The chain started from a new seed.
        rotated: bool,
    },
}

/// An Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

/// Where a pass leaves the ScgToken.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: ScgTokenStatus,
    /// The `Ready` reason in `status`.
    pub reason: Reason,
    /// In publishing order.
    pub events: Vec<Notice>,
    /// `true` when `events` holds a `Refreshed` Event (memory notes when).
    pub refreshed_event: bool,
    /// When to look again; `None`: on the next change.
    pub wake: Option<Timestamp>,
}

/// The outcome of a pass that started at `now`.
pub fn outcome(prior: &Prior<'_>, happened: Happened, now: Timestamp) -> Outcome {
    let mut status = prior.status.clone();
    status.consecutive_failures = prior.failures;
    status.observed_generation = prior.generation;
    status.target_secret = Some(prior.target_name.to_string());
    let mut events = Vec::new();
    let (reason, message, wake) = match happened {
        Happened::Blocked(b) => {
            status.next_refresh_at = None;
            (b.reason, b.message, b.recheck)
        }
        Happened::Waiting { shown, until } => waiting(prior, &mut status, shown, until, now),
        Happened::Failed {
            attempt,
            error,
            at,
            jitter_key,
            first_call,
        } => {
            let broken = chain_broken(&error, attempt.shown.times, first_call, at);
            let failure = failed(prior, &mut status, attempt, &error, at, jitter_key);
            match failure {
                (Reason::Rejected, message, wake) if broken => (
                    Reason::ChainBroken,
                    format!("{CHAIN_BROKEN} ({message})"),
                    wake,
                ),
                other => other,
            }
        }
        Happened::Pending { error, received } => {
            if let Some(attempt) = received {
                // The call succeeded: whatever happens to the write, the streak is over.
                status.consecutive_failures = 0;
                show(&mut status, attempt);
            }
            let message = format!(
                "a new token was received and is held in memory until it can be stored: {error}"
            );
            (Reason::Pending, message, None)
        }
        Happened::Refreshed {
            attempt,
            lifetime,
            due,
            rotated,
        } => {
            events = refreshed_events(prior, lifetime, rotated, now);
            let expires_at = attempt.shown.times.expires_at;
            status.consecutive_failures = 0;
            status.next_refresh_at = due.map(Time);
            show(&mut status, attempt);
            (Reason::Refreshed, valid_message(expires_at, due), due)
        }
    };
    let refreshed_event = events.iter().any(|e| e.reason == REFRESHED);
    events.extend(transition(prior.ready, reason, &message));
    status.conditions = vec![report::ready_condition(
        prior.ready,
        reason,
        message,
        prior.generation,
        now,
    )];
    Outcome {
        status,
        reason,
        events,
        refreshed_event,
        wake,
    }
}

/// The rate-limited Event of a successful refresh. Never a condition reason's Event:
/// `transition` announces no change to `Refreshed` by name.
const REFRESHED: &str = "Refreshed";

fn show(status: &mut ScgTokenStatus, attempt: Attempt) {
    if let Some(request) = attempt.request {
        status.last_refresh_request = Some(request);
    }
    show_chain(status, attempt.shown);
}

fn show_chain(status: &mut ScgTokenStatus, shown: Shown) {
    status.expires_at = shown.times.expires_at.map(Time);
    status.last_refresh_at = shown.times.issued_at.map(Time);
    status.token_fingerprint = Some(shown.token_fingerprint);
    status.credentials_fingerprint = Some(shown.credentials_fingerprint);
}

/// Nothing due: status shows the chain; `Ready` keeps a failure's reason while its
/// back-off runs, and says `Expired` once the token has.
fn waiting(
    prior: &Prior<'_>,
    status: &mut ScgTokenStatus,
    shown: Shown,
    until: Timestamp,
    now: Timestamp,
) -> (Reason, String, Option<Timestamp>) {
    let expires_at = shown.times.expires_at;
    show_chain(status, shown);
    status.next_refresh_at = Some(Time(until));
    let expired = expires_at.is_some_and(|e| e <= now);
    let failing = prior.failures > 0;
    let previous = prior
        .ready
        .and_then(|c| Some((c.reason.parse::<Reason>().ok()?, c.message.clone())));
    let (reason, message) = match previous {
        _ if expired => (
            Reason::Expired,
            format!(
                "the token expired at {}; next attempt at {until}",
                expires_at.unwrap_or(now)
            ),
        ),
        Some((reason, message)) if failing && reason != Reason::Expired => (reason, message),
        _ => (Reason::Refreshed, valid_message(expires_at, Some(until))),
    };
    // Wake up at expiry too, so the condition says Expired on time.
    let wake = expires_at
        .filter(|e| *e > now && *e < until)
        .unwrap_or(until);
    (reason, message, Some(wake))
}

/// The refresh call failed at `at`: back off by kind, capped by the expiry.
fn failed(
    prior: &Prior<'_>,
    status: &mut ScgTokenStatus,
    attempt: Attempt,
    error: &RefreshError,
    at: Timestamp,
    jitter_key: u64,
) -> (Reason, String, Option<Timestamp>) {
    let (kind, reason) = classify(error);
    let failures = prior.failures.saturating_add(1);
    let expires_at = attempt.shown.times.expires_at;
    // Back off from the failure's end, not the pass's start (a timeout takes a while).
    let retry = policy::retry_at(at, kind, failures, expires_at, jitter_key);
    let expired = expires_at.is_some_and(|t| t <= at);
    let validity = match expires_at {
        Some(t) if expired => format!("the token expired at {t}"),
        Some(t) => format!("the current token stays valid until {t}"),
        None => "the seed token's expiry is unknown".into(),
    };
    let message = format!("{error}; attempt {failures} failed, next at {retry}; {validity}");
    show(status, attempt);
    status.consecutive_failures = failures;
    status.last_failure_at = Some(Time(at));
    status.next_refresh_at = Some(Time(retry));
    let reason = if expired { Reason::Expired } else { reason };
    (reason, message, Some(retry))
}

/// What a user reads when [`chain_broken`] holds: what probably happened and what to do.
const CHAIN_BROKEN: &str = "the token chain is probably broken: the API refused the stored, \
    unexpired token on the first refresh after the operator started, which is what happens \
    when a refresh was interrupted (the operator stopped between the API's answer and storing \
    the new token) or when the token was regenerated elsewhere. To recover, generate a new \
    token in the SDC UI and put it in the accessToken key of the credentials Secret";

/// A refusal of a token the API issued (not a seed), before its expiry, on the first call
/// after a start: the API most likely issued a successor that a stopped process never
/// stored. Later refusals in the same process cannot be that: it stores before it calls.
fn chain_broken(error: &RefreshError, times: TokenTimes, first_call: bool, at: Timestamp) -> bool {
    matches!(error, RefreshError::Rejected { .. })
        && first_call
        && times.issued_at.is_some()
        && times.expires_at.is_some_and(|e| e > at)
}

/// How a failed call is timed and reported.
fn classify(error: &RefreshError) -> (FailureKind, Reason) {
    let unavailable = FailureKind::Unavailable { retry_after: None };
    match error {
        RefreshError::Rejected { .. } => (FailureKind::Rejected, Reason::Rejected),
        RefreshError::RateLimited { retry_after }
        | RefreshError::Unavailable { retry_after, .. } => (
            FailureKind::Unavailable {
                retry_after: *retry_after,
            },
            Reason::Unavailable,
        ),
        RefreshError::InvalidResponse(_) => (unavailable, Reason::InvalidResponse),
        RefreshError::Timeout(_) | RefreshError::Transport(_) => (unavailable, Reason::Unavailable),
    }
}

/// The Events that announce a stored token: a new chain, the end of a failure streak,
/// and `Refreshed` at most once per [`REFRESHED_EVENT_INTERVAL`].
fn refreshed_events(
    prior: &Prior<'_>,
    lifetime: Duration,
    rotated: bool,
    now: Timestamp,
) -> Vec<Notice> {
    let normal = |reason, note| Notice {
        type_: EventType::Normal,
        reason,
        note,
    };
    let mut events = Vec::new();
    if rotated {
        events.push(normal(
            "SeedRotated",
            "a new seed token was found in the credentials Secret; started a new token chain \
             from it"
                .into(),
        ));
    }
    let failures = prior.failures;
    if failures > 0 {
        events.push(normal(
            "Recovered",
            format!("token refreshed after {failures} failed attempts"),
        ));
    }
    let interval = SignedDuration::try_from(REFRESHED_EVENT_INTERVAL).unwrap_or_default();
    if prior
        .refreshed_event_at
        .is_none_or(|last| last + interval <= now)
    {
        let note = format!(
            "token refreshed into Secret {:?}; valid for {}s",
            prior.target_name,
            lifetime.as_secs()
        );
        events.push(normal(REFRESHED, note));
    }
    events
}

/// The Event of a change of the `Ready` reason: a Warning for every failure; successes
/// are announced by `refreshed_events`, except a return from suspension.
fn transition(previous: Option<&Condition>, reason: Reason, message: &str) -> Option<Notice> {
    if previous.map(|c| c.reason.as_str()) == Some(reason.as_str()) {
        return None;
    }
    let type_ = match reason {
        Reason::Refreshed | Reason::Suspended => EventType::Normal,
        _ => EventType::Warning,
    };
    if reason != Reason::Refreshed {
        return Some(Notice {
            type_,
            reason: reason.as_str(),
            note: message.into(),
        });
    }
    previous
        .filter(|c| c.reason == Reason::Suspended.as_str())
        .map(|_| Notice {
            type_,
            reason: "Resumed",
            note: "refreshing resumed".into(),
        })
}

fn valid_message(expires_at: Option<Timestamp>, next: Option<Timestamp>) -> String {
    match (expires_at, next) {
        (Some(e), Some(n)) => format!("token valid until {e}; next refresh at {n}"),
        (Some(e), None) => format!("token valid until {e}"),
        _ => "the seed token is being refreshed".into(),
    }
}

/// Whether writing `next` over `prev` (the status the pass read) would only advance a
/// failure streak that status already shows: the attempt count, its times and the
/// message that states them, with the reason unchanged, within
/// [`policy::STATUS_PROGRESS_INTERVAL`] of the last failure written. Such a write waits;
/// any other change (a new reason, the chain, the spec's generation, the consumers) is
/// written at once.
pub fn progress_only(prev: &ScgTokenStatus, next: &ScgTokenStatus, now: Timestamp) -> bool {
    let interval = SignedDuration::try_from(policy::STATUS_PROGRESS_INTERVAL).unwrap_or_default();
    let recent = prev
        .last_failure_at
        .as_ref()
        .is_some_and(|last| now < last.0 + interval);
    if !recent || prev.consecutive_failures == 0 || next.consecutive_failures == 0 {
        return false;
    }
    let without_progress = |s: &ScgTokenStatus| {
        let mut s = s.clone();
        s.consecutive_failures = 0;
        s.last_failure_at = None;
        s.next_refresh_at = None;
        for c in s.conditions.iter_mut().filter(|c| c.type_ == "Ready") {
            c.message.clear();
        }
        serde_json::to_value(s).ok()
    };
    without_progress(prev) == without_progress(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn condition(reason: Reason) -> Condition {
        report::ready_condition(
            None,
            reason,
            format!("was {}", reason.as_str()),
            Some(1),
            t(-100),
        )
    }

    /// The chain status shows: issued at `issued`, expiring at `expires` (seconds).
    fn shown(issued: i64, expires: i64) -> Shown {
        Shown {
            times: TokenTimes {
                issued_at: Some(t(issued)),
                expires_at: Some(t(expires)),
            },
            token_fingerprint: "tfp".into(),
            credentials_fingerprint: "cfp".into(),
        }
    }

    fn attempt(issued: i64, expires: i64) -> Attempt {
        Attempt {
            shown: shown(issued, expires),
            request: None,
        }
    }

    /// A row: the previous reason and failure count, the last Refreshed Event (seconds),
    /// what happened; the reason, Event reasons and wake-up wanted.
    struct Row {
        name: &'static str,
        before: Option<Reason>,
        failures: u32,
        refreshed_event_at: Option<i64>,
        happened: Happened,
        reason: Reason,
        events: &'static [&'static str],
        wake: Option<Timestamp>,
    }

    fn run(row: &Row) -> Outcome {
        let status = ScgTokenStatus {
            consecutive_failures: row.failures,
            next_refresh_at: Some(Time(t(50))),
            ..ScgTokenStatus::default()
        };
        let ready = row.before.map(condition);
        let prior = Prior {
            status: &status,
            failures: status.consecutive_failures,
            ready: ready.as_ref(),
            generation: Some(2),
            target_name: "messaging",
            refreshed_event_at: row.refreshed_event_at.map(t),
        };
        outcome(&prior, row.happened.clone(), t(0))
    }

    fn refreshed(rotated: bool) -> Happened {
        Happened::Refreshed {
            attempt: attempt(0, 3600),
            lifetime: Duration::from_secs(3600),
            due: Some(t(2400)),
            rotated,
        }
    }

    fn blocked(reason: Reason, recheck: Option<Timestamp>) -> Happened {
        Happened::Blocked(Blocked {
            reason,
            message: "stopped".into(),
            recheck,
        })
    }

    fn failed(error: RefreshError, expires: i64) -> Happened {
        Happened::Failed {
            attempt: attempt(-10, expires),
            error,
            at: t(2),
            jitter_key: 7,
            first_call: false,
        }
    }

    /// The outcome of a call that ended at t(2) with `error`, from a `Refreshed` token
    /// with `times`.
    fn failed_while_refreshed(
        error: &RefreshError,
        times: TokenTimes,
        first_call: bool,
    ) -> Outcome {
        let status = ScgTokenStatus::default();
        let ready = condition(Reason::Refreshed);
        let prior = Prior {
            status: &status,
            failures: status.consecutive_failures,
            ready: Some(&ready),
            generation: Some(1),
            target_name: "messaging",
            refreshed_event_at: None,
        };
        let happened = Happened::Failed {
            attempt: Attempt {
                shown: Shown {
                    times,
                    token_fingerprint: "tfp".into(),
                    credentials_fingerprint: "cfp".into(),
                },
                request: None,
            },
            error: error.clone(),
            at: t(2),
            jitter_key: 7,
            first_call,
        };
        outcome(&prior, happened, t(0))
    }

    #[test]
    fn a_refused_stored_token_on_the_first_call_says_the_chain_broke() {
        let rejected = RefreshError::Rejected { status: 401 };
        let unavailable = RefreshError::Unavailable {
            status: 503,
            retry_after: None,
        };
        let seed = TokenTimes::default();
        let issued = |expires| TokenTimes {
            issued_at: Some(t(-10)),
            expires_at: Some(t(expires)),
        };
        // (case, error, token presented, first call, reason wanted); the call ends at t(2).
        let rows = [
            (
                "stored token refused after a start",
                &rejected,
                issued(60),
                true,
                Reason::ChainBroken,
            ),
            (
                "later in the same process",
                &rejected,
                issued(60),
                false,
                Reason::Rejected,
            ),
            ("a seed refused", &rejected, seed, true, Reason::Rejected),
            (
                "an expired token refused",
                &rejected,
                issued(1),
                true,
                Reason::Expired,
            ),
            (
                "the API failed",
                &unavailable,
                issued(60),
                true,
                Reason::Unavailable,
            ),
        ];
        for (case, error, times, first_call, want) in rows {
            let out = failed_while_refreshed(error, times, first_call);
            assert_eq!(out.reason, want, "{case}");
            assert_eq!(out.events.len(), 1, "{case}: one Event");
            assert_eq!(out.events[0].reason, want.as_str(), "{case}");
            assert_eq!(out.events[0].type_, EventType::Warning, "{case}");
            let message = &out.status.conditions[0].message;
            let says_reseed = message.contains("SDC UI") && message.contains("accessToken");
            assert_eq!(
                says_reseed,
                want == Reason::ChainBroken,
                "{case}: {message}"
            );
            assert_eq!(out.status.consecutive_failures, 1, "{case}");
        }
    }

    fn check(rows: &[Row]) {
        for row in rows {
            let out = run(row);
            let events: Vec<_> = out.events.iter().map(|e| e.reason).collect();
            assert_eq!(out.reason, row.reason, "{}", row.name);
            assert_eq!(events, row.events, "{}", row.name);
            assert_eq!(
                out.refreshed_event,
                row.events.contains(&"Refreshed"),
                "{}",
                row.name
            );
            assert_eq!(out.wake, row.wake, "{}", row.name);
            let ready = &out.status.conditions[0];
            assert_eq!(ready.reason, row.reason.as_str(), "{}", row.name);
            assert_eq!(out.status.observed_generation, Some(2), "{}", row.name);
            assert_eq!(out.status.target_secret.as_deref(), Some("messaging"));
            if matches!(row.happened, Happened::Blocked(_)) {
                assert_eq!(out.status.next_refresh_at, None, "{}", row.name);
            }
        }
    }

    #[test]
    fn refreshes_are_announced_sparingly() {
        use Reason::*;
        check(&[
            Row {
                name: "first refresh",
                before: None,
                failures: 0,
                refreshed_event_at: None,
                happened: refreshed(false),
                reason: Refreshed,
                events: &["Refreshed"],
                wake: Some(t(2400)),
            },
            Row {
                name: "Refreshed Event held back within the interval",
                before: Some(Refreshed),
                failures: 0,
                refreshed_event_at: Some(-599),
                happened: refreshed(false),
                reason: Refreshed,
                events: &[],
                wake: Some(t(2400)),
            },
            Row {
                name: "Refreshed Event again after the interval",
                before: Some(Refreshed),
                failures: 0,
                refreshed_event_at: Some(-600),
                happened: refreshed(false),
                reason: Refreshed,
                events: &["Refreshed"],
                wake: Some(t(2400)),
            },
            Row {
                name: "new seed after a failure",
                before: Some(Rejected),
                failures: 1,
                refreshed_event_at: Some(-1),
                happened: refreshed(true),
                reason: Refreshed,
                events: &["SeedRotated", "Recovered"],
                wake: Some(t(2400)),
            },
            Row {
                name: "resumed",
                before: Some(Suspended),
                failures: 0,
                refreshed_event_at: None,
                happened: refreshed(false),
                reason: Refreshed,
                events: &["Refreshed", "Resumed"],
                wake: Some(t(2400)),
            },
        ]);
    }

    #[test]
    fn waiting_keeps_a_failure_until_the_token_expires() {
        use Reason::*;
        check(&[
            Row {
                name: "nothing due: wake at the refresh",
                before: Some(Refreshed),
                failures: 0,
                refreshed_event_at: None,
                happened: Happened::Waiting {
                    shown: shown(-100, 3500),
                    until: t(2300),
                },
                reason: Refreshed,
                events: &[],
                wake: Some(t(2300)),
            },
            Row {
                name: "backing off: keeps the failure, wakes at expiry first",
                before: Some(Unavailable),
                failures: 2,
                refreshed_event_at: None,
                happened: Happened::Waiting {
                    shown: shown(-100, 10),
                    until: t(20),
                },
                reason: Unavailable,
                events: &[],
                wake: Some(t(10)),
            },
            Row {
                name: "a held token stored: Refreshed again, quietly",
                before: Some(Pending),
                failures: 0,
                refreshed_event_at: None,
                happened: Happened::Waiting {
                    shown: shown(-100, 3500),
                    until: t(2300),
                },
                reason: Refreshed,
                events: &[],
                wake: Some(t(2300)),
            },
            Row {
                name: "expired while waiting",
                before: Some(Unavailable),
                failures: 2,
                refreshed_event_at: None,
                happened: Happened::Waiting {
                    shown: shown(-100, 0),
                    until: t(20),
                },
                reason: Expired,
                events: &["Expired"],
                wake: Some(t(20)),
            },
        ]);
    }

    #[test]
    fn stops_failures_and_held_tokens_are_warned_about() {
        use Reason::*;
        let unavailable = FailureKind::Unavailable { retry_after: None };
        check(&[
            Row {
                name: "suspended",
                before: Some(Refreshed),
                failures: 0,
                refreshed_event_at: None,
                happened: blocked(Suspended, None),
                reason: Suspended,
                events: &["Suspended"],
                wake: None,
            },
            Row {
                name: "another owner: look again later, announced once",
                before: Some(InvalidSpec),
                failures: 0,
                refreshed_event_at: None,
                happened: blocked(InvalidSpec, Some(t(60))),
                reason: InvalidSpec,
                events: &[],
                wake: Some(t(60)),
            },
            Row {
                name: "rejected",
                before: Some(Refreshed),
                failures: 0,
                refreshed_event_at: None,
                happened: failed(RefreshError::Rejected { status: 401 }, 3600),
                reason: Rejected,
                events: &["Rejected"],
                wake: Some(policy::retry_at(
                    t(2),
                    FailureKind::Rejected,
                    1,
                    Some(t(3600)),
                    7,
                )),
            },
            Row {
                name: "a failure as the token expires says Expired",
                before: Some(Unavailable),
                failures: 4,
                refreshed_event_at: None,
                happened: failed(
                    RefreshError::Unavailable {
                        status: 503,
                        retry_after: None,
                    },
                    2,
                ),
                reason: Expired,
                events: &["Expired"],
                wake: Some(policy::retry_at(t(2), unavailable, 5, Some(t(2)), 7)),
            },
            Row {
                name: "held in memory",
                before: Some(Refreshed),
                failures: 0,
                refreshed_event_at: None,
                happened: Happened::Pending {
                    error: "writing failed".into(),
                    received: None,
                },
                reason: Pending,
                events: &["Pending"],
                wake: None,
            },
        ]);
    }

    #[test]
    fn only_a_failure_streak_advancing_within_a_minute_waits_to_be_written() {
        let failing = |failures: u32, last: i64, reason: Reason, message: &str| ScgTokenStatus {
            consecutive_failures: failures,
            last_failure_at: Some(Time(t(last))),
            next_refresh_at: Some(Time(t(last + 5))),
            conditions: vec![report::ready_condition(
                None,
                reason,
                message.into(),
                Some(1),
                t(-100),
            )],
            ..ScgTokenStatus::default()
        };
        let prev = failing(1, 0, Reason::Unavailable, "attempt 1 failed");
        let more = failing(4, 20, Reason::Unavailable, "attempt 4 failed");
        assert!(progress_only(&prev, &more, t(20)), "the count only moved");
        assert!(
            !progress_only(&prev, &more, t(60)),
            "a minute since the last write"
        );
        let turned = failing(4, 20, Reason::Rejected, "attempt 4 failed");
        assert!(!progress_only(&prev, &turned, t(20)), "the reason changed");
        let mut moved = more.clone();
        moved.token_fingerprint = Some("other".into());
        assert!(!progress_only(&prev, &moved, t(20)), "the chain changed");
        let mut recovered = more.clone();
        recovered.consecutive_failures = 0;
        assert!(!progress_only(&prev, &recovered, t(20)), "the streak ended");
        let healthy = ScgTokenStatus::default();
        assert!(!progress_only(&healthy, &more, t(20)), "the streak began");
    }

    #[test]
    fn a_failure_counts_backs_off_and_keeps_the_chain_shown() {
        let status = ScgTokenStatus {
            consecutive_failures: 1,
            ..ScgTokenStatus::default()
        };
        let prior = Prior {
            status: &status,
            failures: status.consecutive_failures,
            ready: None,
            generation: Some(1),
            target_name: "messaging",
            refreshed_event_at: None,
        };
        let happened = Happened::Failed {
            attempt: Attempt {
                shown: shown(-10, 3590),
                request: Some("now".into()),
            },
            error: RefreshError::Rejected { status: 403 },
            at: t(2),
            jitter_key: 7,
            first_call: false,
        };
        let out = outcome(&prior, happened, t(0));
        let retry = policy::retry_at(t(2), FailureKind::Rejected, 2, Some(t(3590)), 7);
        assert_eq!(out.wake, Some(retry));
        assert_eq!(out.status.next_refresh_at, Some(Time(retry)));
        assert_eq!(out.status.consecutive_failures, 2);
        assert_eq!(out.status.last_failure_at, Some(Time(t(2))));
        assert_eq!(out.status.last_refresh_request.as_deref(), Some("now"));
        assert_eq!(out.status.expires_at, Some(Time(t(3590))));
        let message = &out.status.conditions[0].message;
        assert!(message.contains("attempt 2 failed"), "{message}");
        assert_eq!(out.events[0].type_, EventType::Warning);
    }

    #[test]
    fn a_token_received_but_not_stored_ends_the_failure_streak() {
        let status = ScgTokenStatus {
            consecutive_failures: 3,
            ..ScgTokenStatus::default()
        };
        let prior = Prior {
            status: &status,
            failures: status.consecutive_failures,
            ready: None,
            generation: Some(1),
            target_name: "messaging",
            refreshed_event_at: None,
        };
        let happened = Happened::Pending {
            error: "Secret \"messaging\" could not be written".into(),
            received: Some(attempt(0, 60)),
        };
        let out = outcome(&prior, happened, t(0));
        assert_eq!(out.reason, Reason::Pending);
        assert_eq!(out.status.consecutive_failures, 0);
        assert_eq!(out.status.expires_at, Some(Time(t(60))));
        assert_eq!(out.status.token_fingerprint.as_deref(), Some("tfp"));
        assert_eq!(out.wake, None);
    }
}
