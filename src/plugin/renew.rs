//! `kubectl scgtoken renew NAME`: one refresh now, through the annotation the operator
//! already honours ([`REFRESH_REQUEST_ANNOTATION`]), then the new token's fingerprint.

use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};

use super::{FIELD_MANAGER, Failure, Target, emit};
use crate::{
    crd::{REFRESH_REQUEST_ANNOTATION, ScgToken},
    k8s::bounded,
    report::Reason,
};

/// How a refresh asked for at `asked` ended, seen in one version of the ScgToken.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    /// A token other than `before` is current: its fingerprint.
    Renewed(String),
    /// The operator acted on the request and the call failed: reason and message.
    Failed(String, String),
}

/// Reads the outcome of a request from `token`, or `None` while it is not decided.
pub fn renewal(token: &ScgToken, before: Option<&str>, asked: &str) -> Option<Renewal> {
    let status = token.status.as_ref()?;
    let ready = token.ready_condition();
    match status.token_fingerprint.as_deref() {
        Some(now) if Some(now) != before && ready.is_some_and(|c| c.status == "True") => {
            return Some(Renewal::Renewed(now.to_string()));
        }
        _ => {}
    }
    let acted_on = status.last_refresh_request.as_deref() == Some(asked);
    match ready {
        Some(c) if acted_on && c.status != "True" => {
            Some(Renewal::Failed(c.reason.clone(), c.message.clone()))
        }
        _ => None,
    }
}

/// Why a refresh cannot be asked for now, if it cannot.
pub fn refusal(token: &ScgToken, name: &str) -> Option<String> {
    if token.spec.suspend {
        return Some(format!(
            "ScgToken {name:?} is suspended (spec.suspend): the operator would not act on the \
             request; resume it first"
        ));
    }
    let reason = token.ready_condition().map(|c| c.reason.as_str());
    (reason == Some(Reason::Pending.as_str())).then(|| {
        format!(
            "ScgToken {name:?} is Pending: a new token waits in the operator's memory to be \
             stored, and no refresh happens before it is; see kubectl scgtoken status {name}"
        )
    })
}

pub async fn run(
    target: &Target,
    name: &str,
    timeout: Duration,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), Failure> {
    let (token, _) = target.scgtoken(name).await?;
    if let Some(why) = refusal(&token, name) {
        return Err(Failure(why));
    }
    let before = token
        .status
        .as_ref()
        .and_then(|s| s.token_fingerprint.clone());
    // Nanoseconds keep two requests within one second apart: any new value is a request.
    let asked = Timestamp::now().to_string();
    let patch = serde_json::json!({
        "metadata": {"annotations": {REFRESH_REQUEST_ANNOTATION: asked}}
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    bounded(target.tokens().patch(name, &params, &Patch::Merge(&patch)))
        .await
        .map_err(|e| target.explain(&e, "annotate", &format!("ScgToken {name:?}")))?;
    emit(
        out,
        &format!(
            "asked for a refresh of {name} ({REFRESH_REQUEST_ANNOTATION}={asked}); waiting up to \
             {}s\n",
            timeout.as_secs()
        ),
    );
    let outcome = target
        .wait_for(name, timeout, |t| renewal(t, before.as_deref(), &asked))
        .await;
    match outcome {
        Ok(Renewal::Renewed(fingerprint)) => {
            emit(out, &format!("renewed: token fingerprint {fingerprint}\n"));
            Ok(())
        }
        Ok(Renewal::Failed(reason, message)) => Err(Failure(format!(
            "the refresh failed: Ready is {reason}: {message}"
        ))),
        Err(last) => Err(Failure(timed_out(last.as_ref(), timeout))),
    }
}

/// The message of a wait that ended without an answer: what `Ready` says.
pub fn timed_out(last: Option<&ScgToken>, timeout: Duration) -> String {
    let ready = last
        .and_then(ScgToken::ready_condition)
        .map(|c| format!("Ready is {} ({}): {}", c.status, c.reason, c.message))
        .unwrap_or_else(|| "the ScgToken has no Ready condition".into());
    format!(
        "no new token within {}s; {ready} (is the operator running?)",
        timeout.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ScgTokenSpec, ScgTokenStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn token(status: &str, reason: &str, fp: &str, request: Option<&str>) -> ScgToken {
        let mut t = ScgToken::new("m", ScgTokenSpec::new("c"));
        t.status = Some(ScgTokenStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: reason.into(),
                message: "msg".into(),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            token_fingerprint: Some(fp.into()),
            last_refresh_request: request.map(Into::into),
            ..Default::default()
        });
        t
    }

    #[test]
    fn a_new_fingerprint_renews_and_an_acted_on_failure_fails() {
        let same = token("True", "Refreshed", "a", None);
        assert_eq!(renewal(&same, Some("a"), "r1"), None);
        let new = token("True", "Refreshed", "b", Some("r1"));
        assert_eq!(
            renewal(&new, Some("a"), "r1"),
            Some(Renewal::Renewed("b".into()))
        );
        let refused = token("False", "Rejected", "a", Some("r1"));
        assert_eq!(
            renewal(&refused, Some("a"), "r1"),
            Some(Renewal::Failed("Rejected".into(), "msg".into()))
        );
        // An older request's failure is not this one's.
        let older = token("False", "Rejected", "a", Some("r0"));
        assert_eq!(renewal(&older, Some("a"), "r1"), None);
    }

    #[test]
    fn suspended_and_pending_tokens_are_not_renewed() {
        let mut t = token("True", "Refreshed", "a", None);
        assert_eq!(refusal(&t, "m"), None);
        t.spec.suspend = true;
        assert!(refusal(&t, "m").unwrap().contains("suspended"));
        let p = token("False", "Pending", "a", None);
        assert!(refusal(&p, "m").unwrap().contains("Pending"));
    }
}
