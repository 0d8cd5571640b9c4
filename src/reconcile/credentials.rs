//! The `CredentialsAllowed` condition of `--credentials-policy=warn`: a ScgToken whose
//! credentials or headers Secret is not opted in keeps being refreshed, and says so
//! until the Secret is opted in or the operator enforces the opt-in. Under `enforce`
//! such a ScgToken stops before any call and `Ready` says why, so the condition is never
//! shown then.

use std::sync::Mutex;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;

use super::{
    Pass,
    outcome::{Notice, Outcome},
};
use crate::report::Reason;

/// Type of the condition.
pub const CREDENTIALS_ALLOWED: &str = "CredentialsAllowed";

/// What a pass found of its Secrets' opt-in: `None` until it read them, then the
/// Secrets used although not opted in (described for users).
#[derive(Debug, Default)]
pub(super) struct Noted(Mutex<Option<Vec<String>>>);

impl Noted {
    pub(super) fn set(&self, not_opted_in: Vec<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(not_opted_in);
    }

    fn get(&self) -> Option<Vec<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The condition after a pass, and the Event of its turn to `False`. `not_opted_in`:
/// `None` when the pass did not read the Secrets (the condition stays as it was),
/// else the Secrets used although not opted in (none: no condition).
pub(super) fn condition(
    previous: Option<&Condition>,
    not_opted_in: Option<&[String]>,
    generation: Option<i64>,
    now: Timestamp,
) -> (Option<Condition>, Option<Notice>) {
    let Some(secrets) = not_opted_in else {
        return (previous.cloned(), None);
    };
    if secrets.is_empty() {
        return (None, None);
    }
    let message = format!(
        "{}; used anyway because the operator runs with --credentials-policy=warn, and \
         refused once it runs with enforce",
        secrets.join("; ")
    );
    let turned = previous.is_none_or(|p| p.status != "False");
    let last_transition_time = previous
        .filter(|_| !turned)
        .map_or(Time(now), |p| p.last_transition_time.clone());
    let notice = turned.then(|| Notice {
        type_: EventType::Warning,
        reason: Reason::CredentialsNotAllowed.as_str(),
        note: message.clone(),
    });
    let condition = Condition {
        type_: CREDENTIALS_ALLOWED.into(),
        status: "False".into(),
        reason: Reason::CredentialsNotAllowed.as_str().into(),
        message,
        last_transition_time,
        observed_generation: generation,
    };
    (Some(condition), notice)
}

impl Pass<'_> {
    /// Adds the condition to `out`, and its Event when it turns `False`.
    pub(super) fn add_credentials_allowed(&self, out: &mut Outcome) {
        let previous = self
            .obj
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == CREDENTIALS_ALLOWED));
        let noted = self.noted.get();
        let generation = self.obj.metadata.generation;
        let (condition, notice) = condition(previous, noted.as_deref(), generation, self.now);
        out.status.conditions.extend(condition);
        out.events.extend(notice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn the_condition_warns_once_and_goes_when_the_secret_is_opted_in() {
        let unlabelled = vec!["credentials Secret \"creds\" is not opted in".to_string()];
        let (first, notice) = condition(None, Some(&unlabelled), Some(3), t(0));
        let first = first.expect("a condition");
        assert_eq!(
            (first.status.as_str(), first.reason.as_str()),
            ("False", "CredentialsNotAllowed")
        );
        assert!(first.message.contains("\"creds\"") && first.message.contains("warn"));
        assert_eq!(first.observed_generation, Some(3));
        let notice = notice.expect("an Event on the transition");
        assert_eq!(notice.type_, EventType::Warning);
        assert_eq!(notice.reason, "CredentialsNotAllowed");

        // The next pass: the same condition, no second Event.
        let (again, notice) = condition(Some(&first), Some(&unlabelled), Some(3), t(60));
        assert_eq!(again.as_ref(), Some(&first));
        assert_eq!(notice, None);

        // A pass that did not read the Secrets keeps it as it was.
        let (kept, notice) = condition(Some(&first), None, Some(3), t(60));
        assert_eq!((kept.as_ref(), notice), (Some(&first), None));

        // Opted in (or enforced: the Secrets are then never used unopted).
        assert_eq!(
            condition(Some(&first), Some(&[]), Some(3), t(60)),
            (None, None)
        );
        assert_eq!(condition(None, Some(&[]), Some(3), t(60)), (None, None));
    }
}
