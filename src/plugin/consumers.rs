//! `kubectl scgtoken consumers NAME`: the pods whose token agents report for the ScgToken,
//! which token (by fingerprint) each serves, and whether that is the current one.
//!
//! `status.consumers` holds the counts and the stale and lost pods' names only; the
//! per-pod detail is in the agents' report Leases, read here with the operator's own rules
//! ([`crate::consumers`]). A pod that status names as stale or lost is shown so: the
//! operator remembers since when each pod is behind, across rotations, which one look at
//! the Leases cannot tell.

use std::{collections::BTreeSet, fmt::Write as _, time::Duration};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, ResourceExt, api::ListParams};

use super::{Failure, Target, emit, status::when};
use crate::{
    consumers::{
        AgentReport, BehindPods, CurrentToken, aggregate, is_alive, report_from_lease, track_behind,
    },
    crd::{AGENT_MODE_ANNOTATION, AGENT_SCGTOKEN_LABEL, ScgToken},
    k8s::bounded,
    policy::parse_duration,
};

/// One reporting pod as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLine {
    pub pod: String,
    pub fingerprint: String,
    /// `current`, `switching`, `stale`, `lost` (its heartbeat expired, its pod still runs,
    /// as status says) or `gone` (its heartbeat expired).
    pub state: &'static str,
    pub since: String,
    pub mode: String,
}

/// Each report's state at `now`, as [`aggregate`] counts it.
pub fn classify(
    token: &ScgToken,
    reports: &[(AgentReport, String)],
    now: Timestamp,
) -> Vec<PodLine> {
    let status = token.status.clone().unwrap_or_default();
    let current = CurrentToken {
        fingerprint: status.token_fingerprint.as_deref(),
        stored_at: status.last_refresh_at.as_ref().map(|t| t.0),
    };
    let stale_after = token
        .spec
        .consumers
        .as_ref()
        .and_then(|c| parse_duration(&c.stale_after))
        .unwrap_or(Duration::from_secs(10));
    let consumers = status.consumers.clone().unwrap_or_default();
    let (stale, lost) = (consumers.stale_pods, consumers.lost_pods);
    let mut lines: Vec<PodLine> = reports
        .iter()
        .map(|(r, mode)| {
            let one = std::slice::from_ref(r);
            let behind = track_behind(&BehindPods::new(), one, current);
            let one = aggregate(one, current, &behind, &BTreeSet::new(), stale_after, now);
            let state = match (is_alive(r, now), one.current, one.stale) {
                (false, _, _) if lost.contains(&r.pod) => "lost",
                (false, _, _) => "gone",
                (true, 1, _) => "current",
                (true, _, 1) => "stale",
                _ if stale.contains(&r.pod) => "stale",
                _ => "switching",
            };
            PodLine {
                pod: r.pod.clone(),
                fingerprint: r.fingerprint.clone().unwrap_or_else(|| "none".into()),
                state,
                since: r.since.map(|t| when(t, now)).unwrap_or_else(|| "-".into()),
                mode: mode.clone(),
            }
        })
        .collect();
    lines.sort_by(|a, b| a.pod.cmp(&b.pod));
    lines
}

/// The report of `consumers`.
pub fn render(token: &ScgToken, pods: &Result<Vec<PodLine>, String>) -> String {
    let status = token.status.clone().unwrap_or_default();
    let current = status.token_fingerprint.as_deref().unwrap_or("none yet");
    let mut out = format!(
        "ScgToken {}/{}: current token fingerprint {current}\n",
        token.namespace().unwrap_or_default(),
        token.name_any()
    );
    match &status.consumers {
        Some(c) => {
            let _ = writeln!(
                out,
                "status.consumers: {} current of {} reporting, {} stale, {} lost",
                c.current, c.total, c.stale, c.lost
            );
        }
        None if token.spec.consumers.as_ref().is_some_and(|c| c.agents) => {
            out.push_str("status.consumers: none yet (see kubectl scgtoken status)\n");
        }
        None => out.push_str(
            "status.consumers: not tracked: spec.consumers.agents is off, so the operator \
             reads no agent reports\n",
        ),
    }
    match pods {
        Err(why) => {
            let _ = writeln!(out, "pods: not shown: {why}");
            for c in status.consumers.iter() {
                for pod in &c.stale_pods {
                    let _ = writeln!(out, "  {pod}  stale");
                }
                for pod in &c.lost_pods {
                    let _ = writeln!(out, "  {pod}  lost");
                }
            }
        }
        Ok(list) if list.is_empty() => out.push_str("pods: no token agent reports\n"),
        Ok(list) => {
            let _ = writeln!(
                out,
                "{:<32} {:<17} {:<10} {:<8} SERVING SINCE",
                "POD", "FINGERPRINT", "STATE", "MODE"
            );
            for p in list {
                let _ = writeln!(
                    out,
                    "{:<32} {:<17} {:<10} {:<8} {}",
                    p.pod, p.fingerprint, p.state, p.mode, p.since
                );
            }
        }
    }
    out
}

pub async fn run(
    target: &Target,
    name: &str,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), Failure> {
    let (token, _) = target.scgtoken(name).await?;
    let leases: Api<Lease> = Api::namespaced(target.client.clone(), &target.namespace);
    let selector = format!("{AGENT_SCGTOKEN_LABEL}={name}");
    let listed = bounded(leases.list(&ListParams::default().labels(&selector)))
        .await
        .map_err(|e| target.explain(&e, "list", "Leases (the agents' reports)").0);
    let pods = listed.map(|list| {
        let reports: Vec<(AgentReport, String)> = list
            .items
            .iter()
            .filter_map(|l| {
                let mode = l.annotations().get(AGENT_MODE_ANNOTATION).cloned();
                Some((report_from_lease(l)?, mode.unwrap_or_else(|| "-".into())))
            })
            .collect();
        classify(&token, &reports, Timestamp::now())
    });
    emit(out, &render(&token, &pods));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConsumersSpec, ConsumersStatus, ScgTokenSpec, ScgTokenStatus};
    use jiff::SignedDuration;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn each_pod_is_current_switching_stale_or_gone() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let stored = now - SignedDuration::from_secs(30);
        let mut t = ScgToken::new("m", ScgTokenSpec::new("c"));
        t.spec.consumers = Some(ConsumersSpec {
            agents: true,
            stale_after: "10s".into(),
            ..ConsumersSpec::default()
        });
        t.status = Some(ScgTokenStatus {
            token_fingerprint: Some("new".into()),
            last_refresh_at: Some(Time(stored)),
            consumers: Some(ConsumersStatus {
                stale_pods: vec!["e".into()],
                lost_pods: vec!["f".into()],
                ..ConsumersStatus::default()
            }),
            ..Default::default()
        });
        let report = |pod: &str, fp: &str, started: Timestamp, renewed: Timestamp| AgentReport {
            pod: pod.into(),
            pod_uid: None,
            fingerprint: Some(fp.into()),
            since: Some(started),
            started: Some(started),
            renewed: Some(renewed),
            duration: Duration::from_secs(10),
        };
        let early = now - SignedDuration::from_secs(50);
        let reports = [
            (report("a", "new", early, now), "file".to_string()),
            (report("b", "old", early, now), "proxy".to_string()),
            (
                report("c", "old", now - SignedDuration::from_secs(2), now),
                "-".to_string(),
            ),
            (
                report("d", "new", early, now - SignedDuration::from_secs(30)),
                "-".to_string(),
            ),
            // Behind for 2 s by its Lease, stale by the operator's memory of it.
            (
                report("e", "old", now - SignedDuration::from_secs(2), now),
                "-".to_string(),
            ),
            // Silent, and its pod still runs, as status says.
            (
                report("f", "new", early, now - SignedDuration::from_secs(30)),
                "-".to_string(),
            ),
        ];
        let states: Vec<_> = classify(&t, &reports, now)
            .into_iter()
            .map(|p| (p.pod, p.state))
            .collect();
        assert_eq!(
            states,
            [
                ("a".to_string(), "current"),
                ("b".to_string(), "stale"),
                ("c".to_string(), "switching"),
                ("d".to_string(), "gone"),
                ("e".to_string(), "stale"),
                ("f".to_string(), "lost")
            ]
        );
        let text = render(&t, &Ok(classify(&t, &reports, now)));
        assert!(text.contains("current token fingerprint new"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with('b') && l.contains("old") && l.contains("stale")),
            "{text}"
        );
    }
}
