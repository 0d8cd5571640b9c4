//! The gates a pass goes through before anything is decided, in order. Each is a pure
//! check that passes or says why the pass stops; the first that stops it wins (the
//! shape of cert-manager's trigger-policy chain). Storing a token held in memory comes
//! before all of them and is not a gate: nothing may stop it.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::{Settings, validate};
use crate::{crd::ScgTokenSpec, report::Reason};

/// How often a pass stopped by another ScgToken owning the chain looks again: the
/// other one may be deleted.
pub const CHAIN_OWNER_RECHECK: Duration = Duration::from_secs(60);

/// What the gates look at, gathered by the reconciler. The parsed endpoint (`E`) and the
/// credentials (`C`) come out again only when every gate passed, so nothing can use them
/// unchecked; `K` is the error of an unreadable credentials Secret.
pub struct Facts<'a, E, C, K> {
    pub now: Timestamp,
    /// The ScgToken is being deleted.
    pub deleting: bool,
    /// This replica leads.
    pub leader: bool,
    pub spec: &'a ScgTokenSpec,
    /// `spec.endpoint` parsed, or why it cannot be used.
    pub endpoint: Result<E, String>,
    /// The oldest other ScgToken in the namespace that uses the same credentials Secret.
    pub chain_owner: Option<String>,
    pub target_name: String,
    /// A Secret stands at the target's name and was not created for this ScgToken.
    pub target_foreign: bool,
    /// The target Secret is this ScgToken's and is immutable: no token can be written.
    pub target_immutable: bool,
    pub credentials: Result<C, Unloaded<K>>,
}

/// Why the credentials are not at hand.
#[derive(Debug)]
pub enum Unloaded<K> {
    /// The Secret or one of its keys is missing; the message names them, never a value.
    Missing(String),
    /// The Secret is not opted in for this ScgToken; the message says how to opt it in.
    NotAllowed(String),
    /// The API did not answer the read.
    Unreadable(K),
}

/// What a pass goes on with when every gate passed.
#[derive(Debug, PartialEq)]
pub struct Cleared<E, C> {
    pub settings: Settings,
    pub endpoint: E,
    pub credentials: C,
}

/// A pass stopped: report `reason` and do nothing else until something changes, or
/// until `recheck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub reason: Reason,
    /// Shown to users as is.
    pub message: String,
    pub recheck: Option<Timestamp>,
}

/// Why a pass goes no further.
#[derive(Debug, PartialEq)]
pub enum Stop<K> {
    /// Being deleted, or this replica is a standby: nothing to do and nothing to report.
    Idle,
    Blocked(Blocked),
    /// The credentials Secret could not be read: the pass fails and is retried.
    Unreadable(K),
}

/// Runs the gates in order.
pub fn gates<E, C, K>(f: Facts<'_, E, C, K>) -> Result<Cleared<E, C>, Stop<K>> {
    active(f.deleting, f.leader)?;
    let (settings, endpoint) = valid_spec(f.spec, f.endpoint)?;
    sole_refresher(f.chain_owner.as_deref(), f.spec, f.now)?;
    not_suspended(f.spec)?;
    own_target(f.target_foreign, f.target_immutable, &f.target_name)?;
    let credentials = credentials_found(f.credentials)?;
    Ok(Cleared {
        settings,
        endpoint,
        credentials,
    })
}

fn blocked<K>(reason: Reason, message: String, recheck: Option<Timestamp>) -> Stop<K> {
    Stop::Blocked(Blocked {
        reason,
        message,
        recheck,
    })
}

/// A deleted ScgToken and a standby replica do nothing (becoming leader re-reconciles
/// every ScgToken).
fn active<K>(deleting: bool, leader: bool) -> Result<(), Stop<K>> {
    if deleting || !leader {
        return Err(Stop::Idle);
    }
    Ok(())
}

/// The time settings and the endpoint can be used; the settings' rules are reported
/// first.
fn valid_spec<E, K>(
    spec: &ScgTokenSpec,
    endpoint: Result<E, String>,
) -> Result<(Settings, E), Stop<K>> {
    let invalid = |message| blocked(Reason::InvalidSpec, message, None);
    let settings = validate(spec).map_err(|e| invalid(e.0))?;
    let endpoint = endpoint.map_err(invalid)?;
    Ok((settings, endpoint))
}

/// Two refreshers of one chain would revoke each other's tokens: only the oldest
/// ScgToken on a credentials Secret refreshes.
fn sole_refresher<K>(
    owner: Option<&str>,
    spec: &ScgTokenSpec,
    now: Timestamp,
) -> Result<(), Stop<K>> {
    let Some(other) = owner else {
        return Ok(());
    };
    let message = format!(
        "ScgToken {other:?} already refreshes the token of credentials Secret {:?}; \
         two refreshers of one token would revoke each other's tokens",
        spec.credentials_secret_ref.name
    );
    let recheck = SignedDuration::try_from(CHAIN_OWNER_RECHECK)
        .ok()
        .and_then(|d| now.checked_add(d).ok());
    Err(blocked(Reason::InvalidSpec, message, recheck))
}

fn not_suspended<K>(spec: &ScgTokenSpec) -> Result<(), Stop<K>> {
    if spec.suspend {
        let message = "refreshing is suspended; the target Secret keeps its last token".into();
        return Err(blocked(Reason::Suspended, message, None));
    }
    Ok(())
}

/// A Secret the operator did not create is never written; an immutable one cannot be,
/// and a refresh would receive a token with nowhere to go.
fn own_target<K>(foreign: bool, immutable: bool, name: &str) -> Result<(), Stop<K>> {
    if foreign {
        let message = format!(
            "Secret {name:?} exists and was not created for this ScgToken; delete it, \
             set spec.target.name to another name, or, if a deleted ScgToken of this name \
             left it, annotate this one scgtoken.io/adopt-target=true"
        );
        return Err(blocked(Reason::TargetConflict, message, None));
    }
    if immutable {
        let message = format!(
            "Secret {name:?} is immutable, so no new token can be written into it; its \
             token stays until it expires. Delete the Secret and the operator writes a \
             mutable one"
        );
        return Err(blocked(Reason::TargetConflict, message, None));
    }
    Ok(())
}

fn credentials_found<C, K>(credentials: Result<C, Unloaded<K>>) -> Result<C, Stop<K>> {
    credentials.map_err(|e| match e {
        Unloaded::Missing(message) => blocked(Reason::CredentialsNotFound, message, None),
        Unloaded::NotAllowed(message) => blocked(Reason::CredentialsNotAllowed, message, None),
        Unloaded::Unreadable(e) => Stop::Unreadable(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    /// Facts on which every gate passes; the endpoint and credentials are stand-ins.
    fn passing(spec: &ScgTokenSpec) -> Facts<'_, &'static str, &'static str, &'static str> {
        Facts {
            now: now(),
            deleting: false,
            leader: true,
            spec,
            endpoint: Ok("endpoint"),
            chain_owner: None,
            target_name: "messaging-token".into(),
            target_foreign: false,
            target_immutable: false,
            credentials: Ok("credentials"),
        }
    }

    /// The reason a pass stops with, or "idle", "unreadable", "passes".
    fn verdict(f: Facts<'_, &str, &str, &str>) -> String {
        match gates(f) {
            Ok(_) => "passes".into(),
            Err(Stop::Idle) => "idle".into(),
            Err(Stop::Unreadable(_)) => "unreadable".into(),
            Err(Stop::Blocked(b)) => b.reason.as_str().into(),
        }
    }

    #[test]
    fn gates_stop_in_order() {
        let good = ScgTokenSpec::new("creds");
        let suspended = ScgTokenSpec {
            suspend: true,
            ..good.clone()
        };
        let bad = ScgTokenSpec {
            validity: "1d".into(),
            ..suspended.clone()
        };
        type Edit = fn(&mut Facts<'_, &str, &str, &str>);
        // One row per line: the order of the rows is the order of the gates.
        #[rustfmt::skip]
        let table: [(&str, &ScgTokenSpec, Edit, &str); 16] = [
            ("all clear", &good, |_| {}, "passes"),
            ("deleting", &bad, |f| f.deleting = true, "idle"),
            ("standby", &bad, |f| f.leader = false, "idle"),
            ("invalid settings", &bad, |_| {}, "InvalidSpec"),
            ("invalid endpoint", &good, |f| f.endpoint = Err("no".into()), "InvalidSpec"),
            ("another owner", &suspended, |f| f.chain_owner = Some("a".into()), "InvalidSpec"),
            ("suspended", &suspended, |f| f.target_foreign = true, "Suspended"),
            ("foreign target", &good, |f| f.target_foreign = true, "TargetConflict"),
            ("immutable target", &good, |f| f.target_immutable = true, "TargetConflict"),
            ("suspended before an immutable target", &suspended, |f| f.target_immutable = true, "Suspended"),
            ("foreign target before credentials", &good, |f| {
                f.target_foreign = true;
                f.credentials = Err(Unloaded::Unreadable("down"));
            }, "TargetConflict"),
            ("missing credentials", &good, |f| f.credentials = Err(Unloaded::Missing("gone".into())), "CredentialsNotFound"),
            ("credentials not opted in", &good, |f| f.credentials = Err(Unloaded::NotAllowed("no".into())), "CredentialsNotAllowed"),
            ("suspended before credentials not opted in", &suspended, |f| f.credentials = Err(Unloaded::NotAllowed("no".into())), "Suspended"),
            ("suspended hides unreadable credentials", &suspended, |f| f.credentials = Err(Unloaded::Unreadable("down")), "Suspended"),
            ("unreadable credentials", &good, |f| f.credentials = Err(Unloaded::Unreadable("down")), "unreadable"),
        ];
        for (name, spec, edit, want) in table {
            let mut f = passing(spec);
            edit(&mut f);
            assert_eq!(verdict(f), want, "{name}");
        }
    }

    #[test]
    fn gates_hand_on_what_the_pass_needs_and_say_why_they_stop() {
        let spec = ScgTokenSpec::new("creds");
        let cleared = gates(passing(&spec)).unwrap();
        assert_eq!(
            (cleared.endpoint, cleared.credentials, cleared.settings),
            ("endpoint", "credentials", validate(&spec).unwrap())
        );

        let mut f = passing(&spec);
        f.chain_owner = Some("first".into());
        let Err(Stop::Blocked(b)) = gates(f) else {
            panic!("another owner must block");
        };
        assert!(b.message.contains("\"first\"") && b.message.contains("\"creds\""));
        assert_eq!(b.recheck, Some(now() + SignedDuration::from_secs(60)));

        let mut f = passing(&spec);
        f.target_foreign = true;
        let Err(Stop::Blocked(b)) = gates(f) else {
            panic!("a foreign target must block");
        };
        assert!(b.message.contains("\"messaging-token\""), "{}", b.message);
        assert_eq!(b.recheck, None);

        let mut f = passing(&spec);
        f.endpoint = Err("endpoint uses plain http".into());
        let Err(Stop::Blocked(b)) = gates(f) else {
            panic!("a bad endpoint must block");
        };
        assert_eq!(b.message, "endpoint uses plain http");
    }
}
