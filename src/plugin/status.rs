//! `kubectl scgtoken status NAME [--watch]`: what state the token chain is in and what
//! to do about it. [`render`] is pure (the object, its Events and the time in, text out).

use std::fmt::Write as _;

use futures::{StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Event;
use kube::{
    Api, ResourceExt,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};

use super::{Failure, Target, emit, hints};
use crate::{
    crd::{REFRESH_REQUEST_ANNOTATION, ScgToken},
    k8s::bounded,
    report::Reason,
};

/// Events shown by `status` (the newest); `inspect` shows more.
const STATUS_EVENTS: usize = 8;

/// One Event about the ScgToken, as shown.
#[derive(Debug, Clone, PartialEq)]
pub struct EventLine {
    pub at: Option<Timestamp>,
    pub type_: String,
    pub reason: String,
    pub message: String,
    /// The operator replica that published it.
    pub reporter: String,
}

/// The Events of the ScgToken `name`, oldest first, at most `limit` (the newest). An error
/// (say Events may not be listed) is told in place of the list, not as a failure.
pub async fn events(target: &Target, name: &str, limit: usize) -> Result<Vec<EventLine>, String> {
    let api: Api<Event> = Api::namespaced(target.client.clone(), &target.namespace);
    let selector = format!("involvedObject.kind=ScgToken,involvedObject.name={name}");
    let list = bounded(api.list(&ListParams::default().fields(&selector)))
        .await
        .map_err(|e| target.explain(&e, "list", "Events").0)?;
    let mut lines: Vec<EventLine> = list
        .items
        .into_iter()
        .map(|e| EventLine {
            at: e
                .event_time
                .map(|t| t.0)
                .or(e.last_timestamp.map(|t| t.0))
                .or(e.first_timestamp.map(|t| t.0))
                .or(e.metadata.creation_timestamp.map(|t| t.0)),
            type_: e.type_.unwrap_or_default(),
            reason: e.reason.unwrap_or_default(),
            message: e.message.unwrap_or_default(),
            reporter: e
                .reporting_instance
                .or(e.reporting_component)
                .unwrap_or_default(),
        })
        .collect();
    lines.sort_by_key(|l| l.at);
    let skip = lines.len().saturating_sub(limit);
    Ok(lines.split_off(skip))
}

/// `12m5s`, `3h0m`, `2d4h`: a duration as a person reads it, seconds dropped past an hour.
pub fn human(d: SignedDuration) -> String {
    let s = d.as_secs().unsigned_abs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// `2026-11-27T06:30:46Z (in 3m12s)` or `(... ago)`.
pub fn when(t: Timestamp, now: Timestamp) -> String {
    let d = t.duration_since(now);
    if d.is_negative() {
        format!("{} ({} ago)", t.strftime("%Y-%m-%dT%H:%M:%SZ"), human(d))
    } else {
        format!("{} (in {})", t.strftime("%Y-%m-%dT%H:%M:%SZ"), human(d))
    }
}

/// The report of `status`.
pub fn render(token: &ScgToken, events: &Result<Vec<EventLine>, String>, now: Timestamp) -> String {
    let name = token.name_any();
    let mut out = format!(
        "ScgToken {}/{name}\n",
        token.namespace().unwrap_or_default()
    );
    render_ready(&mut out, token, &name);
    render_times(&mut out, token, now);
    render_request(&mut out, token);
    render_consumers(&mut out, token);
    render_other_conditions(&mut out, token, &name);
    render_events(&mut out, events, now);
    out
}

fn render_ready(out: &mut String, token: &ScgToken, name: &str) {
    let Some(c) = token.ready_condition() else {
        let _ = writeln!(
            out,
            "Ready:         unknown (no status yet)\n  hint: the operator has not handled this \
             ScgToken: check that it runs and watches namespace {:?}",
            token.namespace().unwrap_or_default()
        );
        return;
    };
    let _ = writeln!(out, "Ready:         {} ({})", c.status, c.reason);
    if !c.message.is_empty() {
        let _ = writeln!(out, "  message: {}", c.message);
    }
    if let Some(hint) = c
        .reason
        .parse::<Reason>()
        .ok()
        .and_then(|r| hints::ready(r, name))
    {
        let _ = writeln!(out, "  hint: {hint}");
    }
    if token.spec.suspend && c.reason != Reason::Suspended.as_str() {
        let _ = writeln!(out, "  note: spec.suspend is true");
    }
}

fn render_times(out: &mut String, token: &ScgToken, now: Timestamp) {
    let s = token.status.clone().unwrap_or_default();
    let fingerprint = s.token_fingerprint.as_deref().unwrap_or("none yet");
    let _ = writeln!(out, "Token:         fingerprint {fingerprint}");
    let expires = match &s.expires_at {
        Some(t) => when(t.0, now),
        None => "unknown (the chain runs on its seed, whose expiry is unknown)".into(),
    };
    let _ = writeln!(out, "Expires:       {expires}");
    if let Some(t) = &s.last_refresh_at {
        let _ = writeln!(out, "Last refresh:  {}", when(t.0, now));
    }
    let next = match &s.next_refresh_at {
        Some(t) => when(t.0, now),
        None => "none scheduled".into(),
    };
    let _ = writeln!(out, "Next refresh:  {next}");
    if s.consecutive_failures > 0 {
        let last = s
            .last_failure_at
            .as_ref()
            .map(|t| format!(", the last at {}", when(t.0, now)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "Failures:      {} in a row{last}",
            s.consecutive_failures
        );
    }
}

/// Whether a refresh asked for with the annotation has been acted on.
fn render_request(out: &mut String, token: &ScgToken) {
    let Some(asked) = token.annotations().get(REFRESH_REQUEST_ANNOTATION) else {
        return;
    };
    let done = token
        .status
        .as_ref()
        .and_then(|s| s.last_refresh_request.as_deref())
        == Some(asked.as_str());
    let state = if done { "acted on" } else { "not acted on yet" };
    let _ = writeln!(out, "Refresh asked: {asked} ({state})");
}

fn render_consumers(out: &mut String, token: &ScgToken) {
    let agents = token.spec.consumers.as_ref().is_some_and(|c| c.agents);
    match token.status.as_ref().and_then(|s| s.consumers.as_ref()) {
        Some(c) => {
            let _ = write!(
                out,
                "Consumers:     {} serve the current token ({} stale)",
                c.summary, c.stale
            );
            if !c.stale_pods.is_empty() {
                let _ = write!(out, ": {}", c.stale_pods.join(", "));
            }
            if c.lost > 0 {
                let _ = write!(out, "; {} lost: {}", c.lost, c.lost_pods.join(", "));
            }
            out.push('\n');
        }
        None if agents => {
            let _ = writeln!(out, "Consumers:     no reports yet (see ConsumersUpToDate)");
        }
        None => {
            let _ = writeln!(
                out,
                "Consumers:     not tracked (spec.consumers.agents is off)"
            );
        }
    }
}

fn render_other_conditions(out: &mut String, token: &ScgToken, name: &str) {
    let conditions = token.status.iter().flat_map(|s| &s.conditions);
    for c in conditions.filter(|c| c.type_ != "Ready") {
        let _ = writeln!(out, "{}: {} ({})", c.type_, c.status, c.reason);
        if !c.message.is_empty() {
            let _ = writeln!(out, "  message: {}", c.message);
        }
        if let Some(hint) = hints::other(&c.type_, &c.reason, name) {
            let _ = writeln!(out, "  hint: {hint}");
        }
    }
}

fn render_events(out: &mut String, events: &Result<Vec<EventLine>, String>, now: Timestamp) {
    match events {
        Err(why) => {
            let _ = writeln!(out, "Events:        not shown: {why}");
        }
        Ok(list) if list.is_empty() => {
            let _ = writeln!(out, "Events:        none");
        }
        Ok(list) => {
            let _ = writeln!(out, "Events (newest last):");
            for e in list {
                let age =
                    e.at.map(|t| format!("{} ago", human(now.duration_since(t))))
                        .unwrap_or_else(|| "?".into());
                let _ = writeln!(
                    out,
                    "  {age:>9}  {:<7}  {:<20}  {}",
                    e.type_, e.reason, e.message
                );
            }
        }
    }
}

/// Prints the status once, or, with `watch`, again on every change of the ScgToken until
/// Ctrl-C (or the watch ends for good).
pub async fn run(
    target: &Target,
    name: &str,
    watch: bool,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), Failure> {
    let (token, _) = target.scgtoken(name).await?;
    let shown = events(target, name, STATUS_EVENTS).await;
    emit(out, &render(&token, &shown, Timestamp::now()));
    if !watch {
        return Ok(());
    }
    let fields = format!("metadata.name={name}");
    let config = watcher::Config::default().fields(&fields);
    let mut changes = watcher(target.tokens(), config)
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut last_version = token.resource_version();
    loop {
        let next = tokio::select! {
            next = changes.try_next() => next,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let token = match next {
            Ok(Some(token)) => token,
            Ok(None) => return Ok(()),
            Err(_) => return Err(Failure(format!("the watch of ScgToken {name:?} failed"))),
        };
        if token.resource_version() == last_version {
            continue;
        }
        last_version = token.resource_version();
        let shown = events(target, name, STATUS_EVENTS).await;
        emit(
            out,
            &format!("\n{}", render(&token, &shown, Timestamp::now())),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConsumersStatus, ScgTokenSpec, ScgTokenStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn token(reason: &str, status: &str) -> ScgToken {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut t = ScgToken::new("messaging", ScgTokenSpec::new("creds"));
        t.metadata.namespace = Some("team".into());
        t.status = Some(ScgTokenStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: reason.into(),
                message: "the words of the operator".into(),
                last_transition_time: Time(now),
                observed_generation: None,
            }],
            expires_at: Some(Time(now + SignedDuration::from_secs(192))),
            next_refresh_at: Some(Time(now + SignedDuration::from_secs(60))),
            token_fingerprint: Some("0123456789abcdef".into()),
            consumers: Some(ConsumersStatus {
                summary: "2/3".into(),
                total: 3,
                current: 2,
                stale: 1,
                stale_pods: vec!["web-1".into()],
                ..ConsumersStatus::default()
            }),
            ..Default::default()
        });
        t
    }

    #[test]
    fn shows_countdowns_fingerprint_consumers_and_the_hint() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let text = render(&token("ChainBroken", "False"), &Ok(vec![]), now);
        assert!(
            text.contains("Ready:         False (ChainBroken)"),
            "{text}"
        );
        assert!(text.contains("kubectl scgtoken reseed messaging"), "{text}");
        assert!(text.contains("(in 3m12s)"), "{text}");
        assert!(text.contains("(in 1m0s)"), "{text}");
        assert!(text.contains("fingerprint 0123456789abcdef"), "{text}");
        assert!(
            text.contains("2/3 serve the current token (1 stale): web-1"),
            "{text}"
        );
        assert!(text.contains("Events:        none"), "{text}");
    }

    #[test]
    fn a_happy_token_has_no_hint_and_past_times_say_ago() {
        let now: Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        let text = render(&token("Refreshed", "True"), &Err("forbidden".into()), now);
        assert!(!text.contains("hint:"), "{text}");
        assert!(text.contains("(56m48s ago)"), "{text}");
        assert!(text.contains("not shown: forbidden"), "{text}");
    }
}
