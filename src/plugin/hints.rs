//! What to do about each condition reason that is not the happy one: one line each,
//! written for whoever is on call. Pure, so a test holds every reason to a hint.

use crate::report::Reason;

/// The hint for a `Ready` reason of the ScgToken `name`; `None` for `Refreshed`.
pub fn ready(reason: Reason, name: &str) -> Option<String> {
    let hint = match reason {
        Reason::Refreshed => return None,
        Reason::Pending => "a new token waits in the operator's memory because the target \
             Secret cannot be written: check the operator's log and its RBAC on Secrets; do \
             not reseed or restart the operator now (the token would be lost)"
            .to_string(),
        Reason::CredentialsNotFound => format!(
            "fix the credentials Secret the message names (a missing or empty key); for the \
             seed key: kubectl scgtoken reseed {name}"
        ),
        Reason::CredentialsNotAllowed => "whoever can write the Secret must opt it in: \
             kubectl label secret SECRET scgtoken.io/credentials=true"
            .to_string(),
        Reason::InvalidSpec => {
            format!("fix the spec as the message says: kubectl edit scgtoken {name}")
        }
        Reason::Rejected => format!(
            "the SCG API refused the call: check the consumer key and secret; if the token \
             was revoked, re-generate one in the SDC UI and run kubectl scgtoken reseed {name}"
        ),
        Reason::ChainBroken => format!(
            "the stored token was revoked (a refresh was lost): re-generate a token in the SDC \
             UI and run kubectl scgtoken reseed {name}"
        ),
        Reason::Unavailable => "the SCG API or the way to it is failing; the operator retries \
             before expiry by itself: if it lasts, check egress, proxy and CA settings"
            .to_string(),
        Reason::InvalidResponse => "the endpoint answered something that is not a token: \
             check spec.endpoint and any proxy or gateway in between"
            .to_string(),
        Reason::Expired => format!(
            "consumers now hold an expired token: fix the cause, then kubectl scgtoken renew \
             {name}; if the API refuses the chain, reseed it"
        ),
        Reason::Suspended => format!(
            "refreshes are off (spec.suspend): kubectl patch scgtoken {name} --type merge -p \
             '{{\"spec\":{{\"suspend\":false}}}}' to resume"
        ),
        Reason::TargetConflict => format!(
            "the target Secret is not this ScgToken's: choose another spec.target.name, or, if \
             a deleted ScgToken of this name left it, kubectl annotate scgtoken {name} \
             scgtoken.io/adopt-target=true"
        ),
    };
    Some(hint)
}

/// The hint for another condition (`type`, `reason`) of the ScgToken `name`; `None` for
/// a happy or unknown one.
pub fn other(type_: &str, reason: &str, name: &str) -> Option<String> {
    let hint = match (type_, reason) {
        ("ConsumersUpToDate", "StaleConsumers") => format!(
            "kubectl scgtoken consumers {name} lists them: check those pods' token agents \
             (logs, restarts) or restart the pods"
        ),
        ("ConsumersUpToDate", "RestartRefused") => "env-var consumers cannot keep up with \
             tokens this short-lived: use the token agent, or lengthen spec.validity"
            .to_string(),
        ("ConsumersUpToDate", "LostConsumers") => format!(
            "the token agents of the pods kubectl scgtoken consumers {name} shows as lost \
             stopped reporting while their pods run: check those agents (logs, restarts, \
             OOM kills); nobody knows which token those pods serve"
        ),
        ("ConsumersUpToDate", "NoReports") => "no token agent reports for this ScgToken: check \
             that the agents run and label their Lease scgtoken.io/scgtoken"
            .to_string(),
        ("ConsumersUpToDate", "ReportsDisabled") => "the operator runs without \
             --consumer-reports: add deploy/components/consumer-reports"
            .to_string(),
        ("ConsumersUpToDate", "ReportsUnavailable") => "the operator cannot watch the report \
             Leases: grant it leases list/watch (deploy/components/consumer-reports)"
            .to_string(),
        ("CredentialsAllowed", "CredentialsNotAllowed") => "the Secret is used only because \
             the operator runs in warn mode: opt it in (kubectl label secret SECRET \
             scgtoken.io/credentials=true) before switching to enforce"
            .to_string(),
        _ => return None,
    };
    Some(hint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumers::ConditionReason;

    #[test]
    fn every_unhappy_ready_reason_has_a_hint() {
        for reason in Reason::ALL {
            let hint = ready(reason, "messaging");
            assert_eq!(hint.is_none(), reason == Reason::Refreshed, "{reason:?}");
            if let Some(h) = hint {
                assert!(!h.contains('\n') && h.len() < 300, "{reason:?}: {h}");
            }
        }
        let chain = ready(Reason::ChainBroken, "messaging").unwrap();
        assert!(
            chain.contains("kubectl scgtoken reseed messaging"),
            "{chain}"
        );
    }

    #[test]
    fn consumer_reasons_have_hints_and_happy_ones_none() {
        for reason in ConditionReason::ALL {
            let reason = reason.as_str();
            let hint = other("ConsumersUpToDate", reason, "m");
            assert_eq!(hint.is_none(), reason == "UpToDate", "{reason}: {hint:?}");
        }
    }
}
