//! Every decision of a pass, as pure functions of data and an instant: may the pass go
//! on at all ([`gates`]), which token the chain stands on ([`footing`]), is a refresh
//! due, when is the next one, how long to back off. No I/O; the clock is injected.

mod gates;
pub(crate) mod target;

pub use gates::{Blocked, CHAIN_OWNER_RECHECK, Cleared, Facts, Stop, Unloaded, gates};

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::crd::ScgTokenSpec;

/// Source of the current instant; tests replace it.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Shortest time between two refreshes of one chain, whatever the lifetimes say.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Back-off bounds after the API was unavailable (5xx, 429, timeouts, bad bodies).
pub const UNAVAILABLE_BACKOFF: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(300));
/// Back-off bounds after the API rejected the request (4xx): retrying soon cannot help.
pub const REJECTED_BACKOFF: (Duration, Duration) =
    (Duration::from_secs(60), Duration::from_secs(3600));
/// Upper bound of the jitter that spreads refreshes of tokens created together.
pub const MAX_JITTER: Duration = Duration::from_secs(30);

/// How much of a token's lifetime is left when it is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Margin {
    /// A fixed time before expiry.
    Before(Duration),
    /// A percentage (1-90) of the lifetime returned by the API.
    Percent(u8),
    /// A third of the lifetime returned by the API (the default).
    Third,
}

/// The validated, parsed time settings of one ScgToken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub validity: Duration,
    pub margin: Margin,
    pub timeout: Duration,
}

/// Why a spec cannot be acted on. The message is shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// Checks a spec: its time settings by the rules the CRD's CEL rules enforce, so a
/// cluster without CEL (or an object stored before a rule existed) gets the same answer,
/// and its target by the rules the API server applies when the Secret is written.
pub fn validate(spec: &ScgTokenSpec) -> Result<Settings, InvalidSpec> {
    let field = |name: &str, value: &str| {
        parse_duration(value).ok_or_else(|| {
            InvalidSpec(format!(
                "{name} {value:?} is not a duration such as 90s, 10m or 12h"
            ))
        })
    };
    let validity = field("validity", &spec.validity)?;
    if validity < Duration::from_secs(30) || validity > Duration::from_secs(8760 * 3600) {
        return Err(InvalidSpec(format!(
            "validity {} must be between 30s and 8760h",
            spec.validity
        )));
    }
    let timeout = field("timeout", &spec.timeout)?;
    if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(120) {
        return Err(InvalidSpec(format!(
            "timeout {} must be between 1s and 2m",
            spec.timeout
        )));
    }
    let margin = match (&spec.refresh_before, spec.refresh_before_percentage) {
        (Some(_), Some(_)) => {
            return Err(InvalidSpec(
                "set refreshBefore or refreshBeforePercentage, not both".into(),
            ));
        }
        (Some(before), None) => {
            let before_d = field("refreshBefore", before)?;
            if before_d.is_zero() || before_d >= validity {
                return Err(InvalidSpec(format!(
                    "refreshBefore {before} must be longer than 0s and shorter than validity {}",
                    spec.validity
                )));
            }
            Margin::Before(before_d)
        }
        (None, Some(p)) if (1..=90).contains(&p) => Margin::Percent(p),
        (None, Some(p)) => {
            return Err(InvalidSpec(format!(
                "refreshBeforePercentage {p} must be between 1 and 90"
            )));
        }
        (None, None) => Margin::Third,
    };
    target::check(&spec.target)?;
    Ok(Settings {
        validity,
        margin,
        timeout,
    })
}

/// Parses a Go-style duration of whole hours, minutes and seconds (`90s`, `1h30m`), by
/// the CRD's pattern ([`crate::crd::DURATION_PATTERN`]): at most
/// [`crate::crd::DURATION_MAX_LENGTH`] characters, at most 6 digits of hours, 8 of
/// minutes and 9 of seconds, so that what the API server's rules refuse is refused here too.
pub fn parse_duration(s: &str) -> Option<Duration> {
    if s.len() > crate::crd::DURATION_MAX_LENGTH {
        return None;
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        match c {
            '0'..='9' => digits.push(c),
            'h' | 'm' | 's' => {
                let (unit, most) = match c {
                    'h' => (3600, 6),
                    'm' => (60, 8),
                    _ => (1, 9),
                };
                if digits.len() > most {
                    return None;
                }
                let n: u64 = digits.parse().ok()?;
                digits.clear();
                total = total.checked_add(n.checked_mul(unit)?)?;
            }
            _ => return None,
        }
    }
    (digits.is_empty() && !s.is_empty()).then(|| Duration::from_secs(total))
}

/// What is known of the token a chain currently stands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenTimes {
    /// When the token was issued; unknown for a seed.
    pub issued_at: Option<Timestamp>,
    /// When the token expires; unknown for a seed.
    pub expires_at: Option<Timestamp>,
}

/// A chain of tokens as far as [`footing`] is concerned.
pub trait Descends {
    /// Fingerprint of the seed the chain descends from.
    fn seed_fingerprint(&self) -> &str;
}

/// Which token a chain stands on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Footing<C> {
    /// The target Secret's: it descends from the current seed.
    Stored(C),
    /// The one in memory: the target Secret lost it (deleted, or overwritten by hand),
    /// so it is written back.
    Restore(C),
    /// The seed itself: a new chain. `rotated` when the target Secret held a chain from
    /// another seed (a human put a new seed in place).
    Seed { rotated: bool },
}

/// Chooses the token a chain stands on: the target Secret's if it descends from the
/// current seed (`seed`, a fingerprint); else the one in memory if it does; else the
/// seed itself.
pub fn footing<C: Descends>(seed: &str, stored: Option<C>, remembered: Option<C>) -> Footing<C> {
    let rotated = stored.is_some();
    if let Some(c) = stored.filter(|c| c.seed_fingerprint() == seed) {
        return Footing::Stored(c);
    }
    if let Some(c) = remembered.filter(|c| c.seed_fingerprint() == seed) {
        return Footing::Restore(c);
    }
    Footing::Seed { rotated }
}

/// Whether the refresh-request annotation asks for a refresh: it has a value that is
/// neither the one recorded in status nor, in case that status write failed, the one
/// remembered as handled.
pub fn requested(annotation: Option<&str>, in_status: Option<&str>, handled: Option<&str>) -> bool {
    annotation.is_some() && annotation != in_status && annotation != handled
}

/// Everything `decide` needs, gathered by the reconciler.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub now: Timestamp,
    pub settings: &'a Settings,
    pub token: TokenTimes,
    /// Refresh attempts that failed in a row (from status).
    pub failures: u32,
    /// When the back-off of the last failure ends (from status).
    pub retry_at: Option<Timestamp>,
    /// Something a human changed since the last failure (spec, credentials, seed):
    /// the back-off no longer applies.
    pub inputs_changed: bool,
    /// A refresh was asked for with the refresh-request annotation.
    pub requested: bool,
    /// Stable per-token value that spreads refreshes (e.g. a hash of the uid).
    pub jitter_key: u64,
}

/// The verdict for one pass of the reconciler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Call the refresh API now.
    Refresh,
    /// Nothing to do until this instant (a scheduled refresh or the end of a back-off).
    Wait(Timestamp),
}

/// Decides whether to refresh now, and if not, until when to wait.
pub fn decide(i: &Inputs<'_>) -> Decision {
    if i.requested {
        return Decision::Refresh;
    }
    if i.failures > 0 && !i.inputs_changed {
        if let Some(retry_at) = i.retry_at.filter(|t| *t > i.now) {
            return Decision::Wait(retry_at);
        }
        return Decision::Refresh;
    }
    match next_refresh(i.settings, i.token, i.jitter_key) {
        Some(due) if due > i.now => Decision::Wait(due),
        // An unknown expiry (a seed) or a due token: refresh at once.
        _ => Decision::Refresh,
    }
}

/// The times of a token issued by a request sent at `sent_at` with the lifetime the API
/// returned, and the lifetime it is scheduled by. Its life starts no later than the
/// request left: counting from the answer's arrival would be late by the call's
/// duration. A lifetime of zero means a token that does not expire: it is scheduled by
/// the requested `validity` anyway, so it keeps being rotated.
pub fn issued(
    sent_at: Timestamp,
    lifetime: Duration,
    validity: Duration,
) -> (TokenTimes, Duration) {
    let lifetime = if lifetime.is_zero() {
        validity
    } else {
        lifetime
    };
    let expires_at = SignedDuration::try_from(lifetime)
        .ok()
        .and_then(|d| sent_at.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX);
    let times = TokenTimes {
        issued_at: Some(sent_at),
        expires_at: Some(expires_at),
    };
    (times, lifetime)
}

/// When a token with these times is due for refresh, or `None` when its expiry is unknown.
///
/// `expiresAt - margin - jitter`, where the margin is clamped so that at least a tenth
/// of the lifetime (and at least [`MIN_INTERVAL`]) passes between two refreshes: a
/// lifetime shorter than the configured margin must not cause a refresh loop.
pub fn next_refresh(settings: &Settings, token: TokenTimes, jitter_key: u64) -> Option<Timestamp> {
    let expires_at = token.expires_at?;
    let issued_at = token.issued_at.unwrap_or(expires_at);
    let lifetime = ms(expires_at.duration_since(issued_at)).max(0);
    let margin = match settings.margin {
        Margin::Before(d) => d.as_millis() as i64,
        Margin::Percent(p) => lifetime * i64::from(p) / 100,
        Margin::Third => lifetime / 3,
    };
    let margin = margin.min(lifetime * 9 / 10);
    let jitter_span = (margin / 10).min(MAX_JITTER.as_millis() as i64);
    let jitter = spread(jitter_key ^ expires_at.as_millisecond() as u64, jitter_span);
    let earliest = (lifetime / 10).max(MIN_INTERVAL.as_millis() as i64);
    let due = (lifetime - margin - jitter).max(earliest.min(lifetime));
    Some(add_ms(issued_at, due))
}

/// How a refresh attempt failed, as far as timing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The API said no (4xx): back off hard.
    Rejected,
    /// The API or the network failed; retry sooner, honouring `Retry-After`.
    Unavailable { retry_after: Option<Duration> },
}

/// When to try again after the `failures`-th failure in a row (`failures >= 1`).
///
/// Exponential with jitter. A retry of an unavailable API always happens before the
/// token expires: the delay is capped at half the time left (never below a second).
/// Rejections are not capped by expiry: the same request would be rejected again.
pub fn retry_at(
    now: Timestamp,
    kind: FailureKind,
    failures: u32,
    expires_at: Option<Timestamp>,
    jitter_key: u64,
) -> Timestamp {
    let exp = |(base, cap): (Duration, Duration)| {
        let shift = failures.saturating_sub(1).min(20);
        let full = (base.as_millis() as i64)
            .saturating_mul(1 << shift)
            .min(cap.as_millis() as i64);
        // "Equal jitter": half fixed, half spread, so retries never bunch up or vanish.
        full / 2 + spread(jitter_key.wrapping_add(u64::from(failures)), full / 2)
    };
    let delay = match kind {
        FailureKind::Rejected => return add_ms(now, exp(REJECTED_BACKOFF)),
        // Honoured as given, but never sooner than MIN_INTERVAL (a `Retry-After: 0` must
        // not become a tight loop).
        FailureKind::Unavailable {
            retry_after: Some(after),
        } => after.max(MIN_INTERVAL).as_millis() as i64,
        FailureKind::Unavailable { retry_after: None } => exp(UNAVAILABLE_BACKOFF),
    };
    let delay = match expires_at {
        Some(exp_at) if exp_at > now => {
            let left = ms(exp_at.duration_since(now));
            delay.min((left / 2).max(MIN_INTERVAL.as_millis() as i64))
        }
        _ => delay,
    };
    add_ms(now, delay)
}

/// While attempts keep failing for the same reason, status is rewritten at most this
/// often: every failed attempt used to patch status (attempt count, times, message), and
/// an SCG outage then loaded the API server and every watcher of ScgTokens with writes
/// that told nobody anything new. A change of reason is always written at once.
pub const STATUS_PROGRESS_INTERVAL: Duration = Duration::from_secs(60);

/// A failure streak: how many attempts failed in a row and when the next may be made.
/// The reconciler keeps it in memory, since status shows it up to
/// [`STATUS_PROGRESS_INTERVAL`] late; fewer writes must not reset or shorten a back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backoff {
    pub failures: u32,
    pub retry_at: Option<Timestamp>,
}

/// The back-off a process that does not remember one resumes from the last status
/// written (`failures`, `last_failure_at`, `written_retry`). That status may be up to
/// [`STATUS_PROGRESS_INTERVAL`] old, and attempts may have failed since without being
/// written. So it errs toward waiting longer, never retrying sooner than the last process
/// would have:
/// - unwritten failures happened no later than a minute after the last written one (a
///   later one would have been written) and no later than `now` (a process that ended
///   makes no more attempts): call that moment `latest`;
/// - if the written retry comes after `latest`, no attempt went unwritten: it stands;
/// - else as many failures as the schedule allows up to `latest` are assumed (each made
///   at its earliest retry), and it backs off from `latest` with that count (capped by
///   the expiry as always).
///
/// So an operator restarted at once to fix its configuration (a CA bundle, an allowed
/// endpoint) waits one step of the back-off, not a minute more.
pub fn resumed_backoff(
    failures: u32,
    last_failure_at: Option<Timestamp>,
    written_retry: Option<Timestamp>,
    kind: FailureKind,
    expires_at: Option<Timestamp>,
    jitter_key: u64,
    now: Timestamp,
) -> Backoff {
    let (Some(last), true) = (last_failure_at, failures > 0) else {
        return Backoff {
            failures,
            retry_at: written_retry,
        };
    };
    let latest = add_ms(last, STATUS_PROGRESS_INTERVAL.as_millis() as i64).min(now.max(last));
    let retry = |at, n| retry_at(at, kind, n, expires_at, jitter_key);
    let mut next = written_retry.unwrap_or_else(|| retry(last, failures));
    if next > latest {
        return Backoff {
            failures,
            retry_at: Some(next),
        };
    }
    // Each step at least MIN_INTERVAL / 2 apart, so a minute holds at most 120 of them.
    let mut most = failures;
    for _ in 0..128 {
        if next > latest {
            break;
        }
        most = most.saturating_add(1);
        next = retry(next, most);
    }
    Backoff {
        failures: most,
        retry_at: Some(retry(latest, most).max(next)),
    }
}

/// Deterministic value in `[0, span)` from `key`: the same inputs give the same schedule,
/// so recomputing it never changes status (and never causes a write).
fn spread(key: u64, span: i64) -> i64 {
    if span <= 0 {
        return 0;
    }
    // SplitMix64 finaliser: cheap, well mixed.
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % span as u64) as i64
}

fn ms(d: SignedDuration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn add_ms(t: Timestamp, millis: i64) -> Timestamp {
    t.saturating_add(SignedDuration::from_millis(millis))
        .unwrap_or(t)
}

/// A key for the jitter (`spread`) from any string, e.g. an object's uid.
pub fn jitter_key(s: &str) -> u64 {
    // FNV-1a: stable across processes and releases, unlike `DefaultHasher`.
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// When to try a pass again after it failed on the Kubernetes API (a read, a write): soon
/// when a received token waits to be stored; otherwise after 5 s, but never later than
/// half the time the stored token has `left` (at least 1 s), so that a short-lived token
/// gets more than one try before it expires.
pub fn requeue_after_error(pending: bool, left: Option<SignedDuration>) -> Duration {
    let usual = Duration::from_secs(if pending { 1 } else { 5 });
    let half_left = left
        .map(|l| Duration::try_from(l / 2).unwrap_or(Duration::ZERO))
        .unwrap_or(usual);
    usual.min(half_left).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }
    fn settings(margin: Margin) -> Settings {
        Settings {
            validity: Duration::from_secs(3600),
            margin,
            timeout: Duration::from_secs(10),
        }
    }
    fn times(issued: i64, expires: i64) -> TokenTimes {
        TokenTimes {
            issued_at: Some(t(issued)),
            expires_at: Some(t(expires)),
        }
    }
    fn spec(f: impl FnOnce(&mut ScgTokenSpec)) -> ScgTokenSpec {
        let mut s = ScgTokenSpec::new("creds");
        f(&mut s);
        s
    }

    #[test]
    fn a_resumed_back_off_errs_toward_waiting_longer() {
        let unavailable = FailureKind::Unavailable { retry_after: None };
        let resume_at = |now: i64, failures, last: Option<i64>, retry: Option<i64>| {
            resumed_backoff(
                failures,
                last.map(t),
                retry.map(t),
                unavailable,
                Some(t(3600)),
                7,
                t(now),
            )
        };
        let resume = |failures, last, retry| resume_at(600, failures, last, retry);
        // No streak: nothing to resume.
        assert_eq!(resume(0, None, Some(500)).failures, 0);
        // The written retry is past the last minute an attempt could go unwritten: as is.
        assert_eq!(
            resume(4, Some(0), Some(90)),
            Backoff {
                failures: 4,
                retry_at: Some(t(90)),
            }
        );
        // Otherwise as many failures as the schedule allows up to a minute after the last
        // written one are assumed, and backed off from that minute's end.
        let b = resume(2, Some(0), Some(5));
        assert!(b.failures > 3, "{b:?}");
        assert_eq!(
            b.retry_at,
            Some(retry_at(t(60), unavailable, b.failures, Some(t(3600)), 7))
        );
        // No sooner than the last process would have retried, whether its attempts went
        // at their earliest (the most failures) or one went late (the latest failure).
        let (mut n, mut next) = (2, t(5));
        while next <= t(60) {
            n += 1;
            next = retry_at(next, unavailable, n, Some(t(3600)), 7);
        }
        let late = retry_at(t(59), unavailable, 3, Some(t(3600)), 7);
        assert!(
            b.retry_at >= Some(next) && b.retry_at >= Some(late),
            "{b:?}"
        );
        // Still capped by the expiry, so a token that can be saved is.
        let near = resumed_backoff(
            9,
            Some(t(0)),
            Some(t(5)),
            unavailable,
            Some(t(100)),
            7,
            t(600),
        );
        assert!(near.retry_at.unwrap() < t(100), "{near:?}");
        // A process started 10 s after the last written failure: none failed later than
        // that start, so it backs off from then, not from a minute on.
        let soon = resume_at(10, 2, Some(0), Some(5));
        assert!(soon.failures >= 3, "{soon:?}");
        assert!(
            soon.retry_at > Some(t(10)) && soon.retry_at < b.retry_at,
            "{soon:?}"
        );
    }

    #[test]
    fn parses_go_durations() {
        let table = [
            ("90s", Some(90)),
            ("12h", Some(43_200)),
            ("1h30m", Some(5_400)),
            ("1m1s", Some(61)),
            ("0s", Some(0)),
            ("", None),
            ("10", None),
            ("1.5h", None),
            ("5d", None),
            ("-1s", None),
            ("h", None),
            ("99999999999999999999h", None),
            // The CRD pattern's limits: 6 digits of hours, 8 of minutes, 9 of seconds,
            // 15 characters.
            ("999999h", Some(999_999 * 3600)),
            ("9999999h", None),
            ("99999999m", Some(99_999_999 * 60)),
            ("999999999m", None),
            ("31536000s", Some(31_536_000)),
            ("9999999999s", None),
            ("999999h999999h", Some(2 * 999_999 * 3600)),
            ("1h1h1h1h1h1h1h1h", None),
        ];
        for (input, want) in table {
            assert_eq!(
                parse_duration(input),
                want.map(Duration::from_secs),
                "{input:?}"
            );
        }
    }

    #[test]
    fn validates_specs_like_the_cel_rules() {
        let ok = |s: ScgTokenSpec| validate(&s).map(|v| v.margin);
        assert_eq!(ok(spec(|_| {})), Ok(Margin::Third));
        assert_eq!(
            ok(spec(|s| s.refresh_before = Some("10m".into()))),
            Ok(Margin::Before(Duration::from_secs(600)))
        );
        assert_eq!(
            ok(spec(|s| s.refresh_before_percentage = Some(25))),
            Ok(Margin::Percent(25))
        );
        let bad: [(&str, ScgTokenSpec); 14] = [
            ("not a duration", spec(|s| s.validity = "9999999h".into())),
            ("not a duration", spec(|s| s.timeout = "10".into())),
            (
                "refreshBefore \"soon\" is not a duration",
                spec(|s| s.refresh_before = Some("soon".into())),
            ),
            (
                "target name \"Messaging_Token\" is not a valid Secret name",
                spec(|s| s.target.name = Some("Messaging_Token".into())),
            ),
            (
                "must differ from tokenKey",
                spec(|s| s.target.expiry_key = Some("accessToken".into())),
            ),
            ("between 30s", spec(|s| s.validity = "29s".into())),
            ("between 30s", spec(|s| s.validity = "8761h".into())),
            ("not a duration", spec(|s| s.validity = "1d".into())),
            (
                "not both",
                spec(|s| {
                    s.refresh_before = Some("1m".into());
                    s.refresh_before_percentage = Some(10);
                }),
            ),
            (
                "shorter than validity",
                spec(|s| {
                    s.validity = "1h".into();
                    s.refresh_before = Some("1h".into());
                }),
            ),
            (
                "between 1 and 90",
                spec(|s| s.refresh_before_percentage = Some(91)),
            ),
            (
                "between 1 and 90",
                spec(|s| s.refresh_before_percentage = Some(0)),
            ),
            ("timeout", spec(|s| s.timeout = "0s".into())),
            (
                "longer than 0s",
                spec(|s| s.refresh_before = Some("0s".into())),
            ),
        ];
        for (want, s) in bad {
            let err = validate(&s).expect_err(want).0;
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn schedules_refresh_by_margin_with_bounded_jitter() {
        // (margin, issued, expires, earliest due, latest due)
        let table = [
            // A third of a 1h lifetime is left: due at 40m, minus up to 30s of jitter.
            (Margin::Third, 0, 3600, 2370, 2400),
            (Margin::Percent(25), 0, 3600, 2670, 2700),
            (
                Margin::Before(Duration::from_secs(600)),
                0,
                3600,
                2970,
                3000,
            ),
            // Short lifetimes get proportionally short jitter.
            (Margin::Third, 0, 60, 38, 40),
            // A margin longer than the lifetime: at least a tenth of it passes.
            (Margin::Before(Duration::from_secs(300)), 0, 60, 6, 6),
            (Margin::Percent(90), 0, 60, 6, 6),
            // Tiny lifetimes: never more often than MIN_INTERVAL.
            (Margin::Before(Duration::from_secs(300)), 0, 3, 1, 1),
        ];
        for (margin, issued, expires, lo, hi) in table {
            for key in 0..50 {
                let due = next_refresh(&settings(margin), times(issued, expires), key).unwrap();
                assert!(
                    due >= t(lo) && due <= t(hi),
                    "{margin:?} {issued}..{expires} key {key}: {due} not in [{lo}, {hi}]"
                );
            }
        }
    }

    #[test]
    fn jitter_is_deterministic_and_spreads_tokens() {
        let s = settings(Margin::Third);
        let a = next_refresh(&s, times(0, 3600), jitter_key("uid-a")).unwrap();
        assert_eq!(
            a,
            next_refresh(&s, times(0, 3600), jitter_key("uid-a")).unwrap()
        );
        let distinct: std::collections::BTreeSet<_> = (0..20)
            .map(|i| next_refresh(&s, times(0, 3600), jitter_key(&format!("uid-{i}"))))
            .collect();
        assert!(
            distinct.len() > 10,
            "only {} distinct instants",
            distinct.len()
        );
    }

    #[test]
    fn decides() {
        let s = settings(Margin::Third);
        let base = Inputs {
            now: t(100),
            settings: &s,
            token: times(0, 3600),
            failures: 0,
            retry_at: None,
            inputs_changed: false,
            requested: false,
            jitter_key: 7,
        };
        let due = next_refresh(&s, times(0, 3600), 7).unwrap();
        let table: [(&str, Inputs, Decision); 8] = [
            ("not due yet", base, Decision::Wait(due)),
            ("due", Inputs { now: due, ..base }, Decision::Refresh),
            (
                "seed with unknown expiry",
                Inputs {
                    token: TokenTimes::default(),
                    ..base
                },
                Decision::Refresh,
            ),
            (
                "asked for",
                Inputs {
                    requested: true,
                    ..base
                },
                Decision::Refresh,
            ),
            (
                "backing off",
                Inputs {
                    failures: 2,
                    retry_at: Some(t(160)),
                    ..base
                },
                Decision::Wait(t(160)),
            ),
            (
                "back-off over",
                Inputs {
                    failures: 2,
                    retry_at: Some(t(100)),
                    ..base
                },
                Decision::Refresh,
            ),
            (
                "a human changed something during a back-off",
                Inputs {
                    failures: 2,
                    retry_at: Some(t(900)),
                    inputs_changed: true,
                    ..base
                },
                Decision::Wait(due),
            ),
            (
                "seed failing: back off rather than hammer",
                Inputs {
                    token: TokenTimes::default(),
                    failures: 1,
                    retry_at: Some(t(160)),
                    ..base
                },
                Decision::Wait(t(160)),
            ),
        ];
        for (name, inputs, want) in table {
            assert_eq!(decide(&inputs), want, "{name}");
        }
    }

    impl Descends for &str {
        fn seed_fingerprint(&self) -> &str {
            self
        }
    }

    #[test]
    fn dates_a_new_token_from_the_request() {
        let hour = Duration::from_secs(3600);
        let minute = Duration::from_secs(60);
        assert_eq!(issued(t(0), minute, hour), (times(0, 60), minute));
        // No expiry from the API: rotated by the requested validity.
        assert_eq!(issued(t(0), Duration::ZERO, hour), (times(0, 3600), hour));
        let (far, _) = issued(t(0), Duration::MAX, hour);
        assert_eq!(far.expires_at, Some(Timestamp::MAX));
    }

    #[test]
    fn chooses_the_footing() {
        // (stored chain's seed, remembered chain's seed, footing)
        let table = [
            (Some("s1"), None, Footing::Stored("s1")),
            (Some("s1"), Some("s1"), Footing::Stored("s1")),
            // The Secret was deleted: memory restores it.
            (None, Some("s1"), Footing::Restore("s1")),
            // The Secret was overwritten with something from another seed.
            (Some("s0"), Some("s1"), Footing::Restore("s1")),
            (None, None, Footing::Seed { rotated: false }),
            // A new seed: whatever is stored or remembered descends from the old one.
            (Some("s0"), None, Footing::Seed { rotated: true }),
            (None, Some("s0"), Footing::Seed { rotated: false }),
            (Some("s0"), Some("s0"), Footing::Seed { rotated: true }),
        ];
        for (stored, remembered, want) in table {
            assert_eq!(
                footing("s1", stored, remembered),
                want,
                "{stored:?} {remembered:?}"
            );
        }
    }

    #[test]
    fn a_refresh_request_is_honoured_once() {
        // (annotation, recorded in status, remembered as handled, requested)
        let table = [
            (None, None, None, false),
            (Some("a"), None, None, true),
            (Some("b"), Some("a"), Some("a"), true),
            (Some("a"), Some("a"), None, false),
            // The status write of the pass that honoured it failed.
            (Some("a"), None, Some("a"), false),
            (None, Some("a"), Some("a"), false),
        ];
        for (annotation, in_status, handled, want) in table {
            assert_eq!(
                requested(annotation, in_status, handled),
                want,
                "{annotation:?} {in_status:?} {handled:?}"
            );
        }
    }

    #[test]
    fn backs_off_by_failure_kind() {
        let now = t(0);
        let far = Some(t(100_000));
        let secs = |at: Timestamp| at.duration_since(now).as_secs_f64();
        let unavailable = FailureKind::Unavailable { retry_after: None };
        // (kind, failures, expires_at, min s, max s)
        let table = [
            (unavailable, 1, far, 0.5, 1.0),
            (unavailable, 4, far, 4.0, 8.0),
            (unavailable, 30, far, 150.0, 300.0),
            // Capped at half the time left, so a retry comes before expiry.
            (unavailable, 30, Some(t(20)), 0.0, 10.0),
            (unavailable, 30, Some(t(1)), 1.0, 1.0),
            (
                FailureKind::Unavailable {
                    retry_after: Some(Duration::from_secs(42)),
                },
                1,
                far,
                42.0,
                42.0,
            ),
            (
                FailureKind::Unavailable {
                    retry_after: Some(Duration::from_secs(42)),
                },
                1,
                Some(t(30)),
                15.0,
                15.0,
            ),
            (FailureKind::Rejected, 1, far, 30.0, 60.0),
            (FailureKind::Rejected, 3, Some(t(20)), 120.0, 240.0),
            (FailureKind::Rejected, 30, far, 1800.0, 3600.0),
            (
                FailureKind::Unavailable {
                    retry_after: Some(Duration::ZERO),
                },
                1,
                far,
                1.0,
                1.0,
            ),
            (
                FailureKind::Unavailable {
                    retry_after: Some(Duration::from_secs(900)),
                },
                1,
                far,
                900.0,
                900.0,
            ),
        ];
        for (kind, failures, expires, lo, hi) in table {
            for key in 0..20 {
                let s = secs(retry_at(now, kind, failures, expires, key));
                assert!(
                    s >= lo && s <= hi,
                    "{kind:?} #{failures}: {s}s not in [{lo}, {hi}]"
                );
            }
        }
    }

    #[test]
    fn a_failed_pass_is_retried_before_a_short_token_expires() {
        let secs = |n: i64| Some(SignedDuration::from_secs(n));
        for (pending, left, want) in [
            (false, None, 5),
            (true, None, 1),
            (false, secs(3600), 5),
            (false, secs(6), 3),
            (false, secs(1), 1),
            (false, secs(-10), 1),
            (true, secs(6), 1),
        ] {
            assert_eq!(
                requeue_after_error(pending, left),
                Duration::from_secs(want),
                "pending {pending}, left {left:?}"
            );
        }
    }
}
