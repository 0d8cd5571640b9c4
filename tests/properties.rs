//! Property tests of the schedule and the parsers, over the public API: whatever the
//! spec, the lifetimes the API returns and the failures in between,
//!
//! - a refresh is scheduled before expiry whenever the lifetime leaves room for one;
//! - two refreshes of a chain are never closer than the floor: a tenth of the lifetime,
//!   and at least `MIN_INTERVAL`;
//! - a back-off after an unavailable API never runs past half the time the token has
//!   left (a second at the least);
//! - the duration parser and the token-response parser never panic, and agree with
//!   what they are given.
//!
//! 256 cases per property keep the file at a few seconds; `PROPTEST_CASES=100000 cargo
//! test --test properties` searches harder.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use proptest::{collection::vec, prelude::*};
use scg_token_operator::{
    crd::ScgTokenSpec,
    policy::{
        self, Decision, FailureKind, Inputs, MIN_INTERVAL, REJECTED_BACKOFF, Settings, TokenTimes,
        UNAVAILABLE_BACKOFF,
    },
    scg::{RefreshError, parse_success},
};

/// Longest lifetime the response parser passes on (ten years).
const MAX_LIFETIME: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// 256 cases, or `PROPTEST_CASES`.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Milliseconds from `a` to `b`.
fn ms(a: Timestamp, b: Timestamp) -> i128 {
    b.duration_since(a).as_millis()
}

fn millis(d: Duration) -> i128 {
    d.as_millis() as i128
}

/// Instants between 2020 and 2051.
fn instant() -> impl Strategy<Value = Timestamp> {
    (0i64..1_000_000_000, 0i64..1000).prop_map(|(s, m)| {
        Timestamp::from_millisecond((1_600_000_000 + s) * 1000 + m).expect("in range")
    })
}

/// Settings as the operator derives them from a spec that passes validation: every
/// margin kind, validities over their whole range.
fn settings() -> impl Strategy<Value = Settings> {
    let validity = 30u64..=8760 * 3600;
    (validity, 1u64..=120, 0u8..3, any::<u64>()).prop_map(|(validity, timeout, kind, pick)| {
        let mut spec = ScgTokenSpec::new("creds");
        spec.validity = format!("{validity}s");
        spec.timeout = format!("{timeout}s");
        match kind {
            0 => spec.refresh_before = Some(format!("{}s", 1 + pick % (validity - 1))),
            1 => spec.refresh_before_percentage = Some(1 + (pick % 90) as u8),
            _ => {}
        }
        policy::validate(&spec).expect("a spec within every bound is valid")
    })
}

/// Lifetimes the API may return, in whole seconds (zero: a token that does not expire),
/// weighted towards the short ones where the floors matter.
fn returned_lifetime() -> impl Strategy<Value = Duration> {
    prop_oneof![
        0u64..=5,
        0u64..=600,
        0u64..=30 * 24 * 3600,
        0u64..=MAX_LIFETIME.as_secs(),
    ]
    .prop_map(Duration::from_secs)
}

/// The floor between a refresh at `issued_at` and the next one: a tenth of the
/// lifetime, at least `MIN_INTERVAL`, at most the lifetime itself.
fn floor(lifetime_ms: i128) -> i128 {
    (lifetime_ms / 10)
        .max(millis(MIN_INTERVAL))
        .min(lifetime_ms)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_refresh_is_scheduled_before_expiry_and_after_the_floor(
        settings in settings(),
        sent_at in instant(),
        returned in returned_lifetime(),
        key in any::<u64>(),
    ) {
        let (times, lifetime) = policy::issued(sent_at, returned, settings.validity);
        let (issued, expires) = (times.issued_at.unwrap(), times.expires_at.unwrap());
        let due = policy::next_refresh(&settings, times, key).expect("known expiry");
        let life = ms(issued, expires);
        prop_assert_eq!(life, millis(lifetime));
        if lifetime > MIN_INTERVAL {
            prop_assert!(due < expires, "due {} at or after expiry {}", due, expires);
        } else {
            prop_assert!(due <= expires);
        }
        prop_assert!(
            ms(issued, due) >= floor(life),
            "due {}ms after the refresh, floor {}ms", ms(issued, due), floor(life)
        );
    }

    #[test]
    fn decide_refreshes_exactly_when_due(
        settings in settings(),
        sent_at in instant(),
        returned in returned_lifetime(),
        key in any::<u64>(),
        offset_ms in 0i64..=40 * 24 * 3600 * 1000,
    ) {
        let (times, _) = policy::issued(sent_at, returned, settings.validity);
        let due = policy::next_refresh(&settings, times, key).expect("known expiry");
        let now = sent_at + SignedDuration::from_millis(offset_ms);
        let decision = policy::decide(&Inputs {
            now,
            settings: &settings,
            token: times,
            failures: 0,
            retry_at: None,
            inputs_changed: false,
            requested: false,
            jitter_key: key,
        });
        let want = if now >= due { Decision::Refresh } else { Decision::Wait(due) };
        prop_assert_eq!(decision, want);
    }

    #[test]
    fn a_back_off_never_passes_half_the_time_left(
        now in instant(),
        left_ms in 0i64..=30 * 24 * 3600 * 1000,
        failures in 1u32..=64,
        retry_after in proptest::option::of(0u64..=7200),
        key in any::<u64>(),
    ) {
        let expires = now + SignedDuration::from_millis(left_ms);
        let kind = FailureKind::Unavailable { retry_after: retry_after.map(Duration::from_secs) };
        let retry = policy::retry_at(now, kind, failures, Some(expires), key);
        let delay = ms(now, retry);
        let cap = (i128::from(left_ms) / 2).max(millis(MIN_INTERVAL));
        prop_assert!(delay <= cap, "retry after {}ms with {}ms left", delay, left_ms);
        // Equal jitter: at least half the exponential delay; a Retry-After never below the floor.
        let least = match retry_after {
            Some(_) => millis(MIN_INTERVAL).min(cap),
            None => (millis(UNAVAILABLE_BACKOFF.0) / 2).min(cap),
        };
        prop_assert!(delay >= least, "retry after {}ms, less than {}ms", delay, least);
        prop_assert!(delay <= millis(UNAVAILABLE_BACKOFF.1).max(retry_after.map_or(0, |s| i128::from(s) * 1000)));
        if left_ms >= 2 * 1000 {
            prop_assert!(retry < expires, "the retry comes after expiry");
        }
    }

    #[test]
    fn a_rejection_backs_off_hard_whatever_the_expiry(
        now in instant(),
        expires in proptest::option::of(instant()),
        failures in 1u32..=64,
        key in any::<u64>(),
    ) {
        let delay = ms(now, policy::retry_at(now, FailureKind::Rejected, failures, expires, key));
        let (base, cap) = REJECTED_BACKOFF;
        prop_assert!(delay >= millis(base) / 2 && delay <= millis(cap), "{}ms", delay);
    }

    /// A chain lives through a script of outcomes, timed by the policy as the reconciler
    /// times it: each call happens when `decide` says so.
    #[test]
    fn a_chain_through_failures_keeps_its_floors(
        settings in settings(),
        start in instant(),
        key in any::<u64>(),
        script in vec(outcome(), 1..40),
    ) {
        let mut now = start;
        let mut token = TokenTimes::default();
        let (mut failures, mut retry) = (0u32, None);
        let mut last_call: Option<Timestamp> = None;
        let mut last_success: Option<(Timestamp, i128)> = None;
        for step in script {
            let inputs = |now| Inputs {
                now,
                settings: &settings,
                token,
                failures,
                retry_at: retry,
                inputs_changed: false,
                requested: false,
                jitter_key: key,
            };
            if let Decision::Wait(until) = policy::decide(&inputs(now)) {
                prop_assert!(until > now, "waits for a past instant");
                now = until;
                prop_assert_eq!(policy::decide(&inputs(now)), Decision::Refresh);
            }
            if let Some(prev) = last_call {
                prop_assert!(now > prev, "two calls at {}", now);
            }
            last_call = Some(now);
            match step {
                Outcome::Success(lifetime) => {
                    if let Some((prev, floor)) = last_success {
                        prop_assert!(ms(prev, now) >= floor, "refreshes {}ms apart, floor {}ms", ms(prev, now), floor);
                    }
                    let (times, scheduled) = policy::issued(now, lifetime, settings.validity);
                    last_success = Some((now, floor(millis(scheduled))));
                    token = times;
                    (failures, retry) = (0, None);
                }
                Outcome::Failure(kind) => {
                    failures += 1;
                    let at = policy::retry_at(now, kind, failures, token.expires_at, key);
                    if let (FailureKind::Unavailable { .. }, Some(expires)) = (kind, token.expires_at)
                        && ms(now, expires) >= 2000
                    {
                        prop_assert!(at < expires, "a retry after expiry");
                    }
                    retry = Some(at);
                }
            }
        }
    }

    #[test]
    fn parse_duration_never_panics(s in any::<String>()) {
        let _ = policy::parse_duration(&s);
    }

    #[test]
    fn parse_duration_reads_what_it_accepts(s in "[0-9hms]{0,40}") {
        if let Some(d) = policy::parse_duration(&s) {
            prop_assert!(s.ends_with(['h', 'm', 's']), "{:?} accepted", s);
            // Summing the parts by hand, in 128 bits, gives the same.
            let (mut total, mut n) = (0u128, 0u128);
            for c in s.chars() {
                match c {
                    'h' => { total += n * 3600; n = 0 }
                    'm' => { total += n * 60; n = 0 }
                    's' => { total += n; n = 0 }
                    digit => n = n * 10 + u128::from(digit.to_digit(10).unwrap()),
                }
            }
            prop_assert_eq!(u128::from(d.as_secs()), total);
        }
    }

    #[test]
    fn parse_duration_round_trips(h in 0u64..100_000, m in 0u64..10_000, s in 0u64..10_000) {
        let text = format!("{h}h{m}m{s}s");
        // Longer than the CRD's maxLength: refused, as the API server would.
        let want = (text.len() <= scg_token_operator::crd::DURATION_MAX_LENGTH)
            .then(|| Duration::from_secs(h * 3600 + m * 60 + s));
        prop_assert_eq!(policy::parse_duration(&text), want);
    }

    #[test]
    fn validate_never_panics(
        validity in "[0-9hms.d-]{0,12}",
        timeout in "[0-9hms]{0,6}",
        before in proptest::option::of("[0-9hms]{0,8}"),
        percentage in proptest::option::of(any::<u8>()),
    ) {
        let mut spec = ScgTokenSpec::new("creds");
        (spec.validity, spec.timeout) = (validity, timeout);
        (spec.refresh_before, spec.refresh_before_percentage) = (before, percentage);
        if let Ok(s) = policy::validate(&spec) {
            prop_assert!(s.validity >= Duration::from_secs(30));
            prop_assert!(s.timeout >= Duration::from_secs(1) && s.timeout <= Duration::from_secs(120));
        }
    }

    #[test]
    fn the_response_parser_never_panics_on_bytes(body in vec(any::<u8>(), 0..512)) {
        check_response(&body)?;
    }

    #[test]
    fn the_response_parser_never_panics_on_json(
        token in json_value(),
        validity in json_value(),
        extra in json_value(),
    ) {
        let body = serde_json::json!({"accessToken": token, "validityTime": validity, "x": extra});
        check_response(body.to_string().as_bytes())?;
        check_response(token.to_string().as_bytes())?;
    }

    #[test]
    fn the_response_parser_reads_integers(token in "\\PC{1,40}", seconds in any::<i64>()) {
        prop_assume!(!token.trim().is_empty());
        let body = serde_json::json!({"accessToken": token, "validityTime": seconds});
        let parsed = parse_success(body.to_string().as_bytes()).expect("a token response");
        prop_assert_eq!(parsed.token.expose(), token.trim());
        let want = seconds.clamp(0, MAX_LIFETIME.as_secs() as i64) as u64;
        prop_assert_eq!(parsed.lifetime, Duration::from_secs(want));
    }

    #[test]
    fn the_response_parser_reads_fractions(
        seconds in prop_oneof![-1e12f64..1e12, -2.0f64..2.0, 0.0f64..1.0],
    ) {
        let body = serde_json::json!({"accessToken": "t", "validityTime": seconds});
        let parsed = parse_success(body.to_string().as_bytes()).expect("a token response");
        let lifetime = parsed.lifetime.as_secs_f64();
        if seconds > 0.0 {
            // Never longer than given, and a positive lifetime never reads as "never expires".
            prop_assert!(lifetime >= 1.0 && (lifetime <= seconds.max(1.0)), "{} -> {}", seconds, lifetime);
        } else {
            prop_assert_eq!(lifetime, 0.0);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Success(Duration),
    Failure(FailureKind),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        3 => returned_lifetime().prop_map(Outcome::Success),
        2 => proptest::option::of(0u64..=600).prop_map(|after| Outcome::Failure(
            FailureKind::Unavailable { retry_after: after.map(Duration::from_secs) }
        )),
        1 => Just(Outcome::Failure(FailureKind::Rejected)),
    ]
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec(("[a-zA-Z]{1,12}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// What holds of any parse: a token that is not blank and a bounded lifetime, or an
/// error of the response's shape.
fn check_response(body: &[u8]) -> Result<(), TestCaseError> {
    match parse_success(body) {
        Ok(r) => {
            let token = r.token.expose();
            prop_assert!(!token.is_empty() && token.trim() == token);
            prop_assert!(r.lifetime <= MAX_LIFETIME);
        }
        Err(e) => prop_assert!(matches!(e, RefreshError::InvalidResponse(_)), "{e:?}"),
    }
    Ok(())
}
