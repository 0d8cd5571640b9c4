//! `kubectl scgtoken reseed NAME [--standby]`: a new seed token (re-generated in the SDC
//! UI) into the credentials Secret, then the chain that starts from it.
//!
//! The token never passes through an argument (shell history, `ps`): it is read from a
//! prompt that does not echo, or from standard input when that is not a terminal. It is
//! checked for shape before anything is written, written as the one key of the Secret
//! (a merge patch of `data`), and never printed: every message about it is fixed text.
//! Whether the operator started from it is told by fingerprints: the target Secret's
//! `scgtoken.io/seed-fingerprint` equals the new seed's, computed here the operator's way.

use std::{io::Read, time::Duration};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    ResourceExt,
    api::{Patch, PatchParams},
};

use super::{FIELD_MANAGER, Failure, Target, emit, renew::timed_out};
use crate::{
    access,
    chain::{self, MAX_CREDENTIAL},
    crd::{REFRESH_REQUEST_ANNOTATION, ScgToken},
    k8s::bounded,
    report::Reason,
    scg::SecretString,
};

/// Shortest token accepted: SCG tokens are UUIDs (36 characters); anything much shorter
/// is a slip of the clipboard.
pub const MIN_SEED: usize = 8;

/// Where the seed comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedSource {
    /// A prompt on the terminal, without echo.
    Prompt,
    /// Standard input, to its end (a pipe or a file).
    Stdin,
}

impl SeedSource {
    pub fn detect() -> SeedSource {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() {
            SeedSource::Prompt
        } else {
            SeedSource::Stdin
        }
    }

    /// Reads the raw token. Errors say what went wrong, never what was read.
    fn read(self, what: &str) -> Result<Vec<u8>, Failure> {
        match self {
            SeedSource::Prompt => {
                rpassword::prompt_password(format!("new seed token for {what}: "))
                    .map(String::into_bytes)
                    .map_err(|_| Failure("could not read the token from the terminal".into()))
            }
            SeedSource::Stdin => {
                let mut raw = Vec::new();
                // Bounded: a file piped in by mistake is refused, not read whole.
                let limit = u64::try_from(MAX_CREDENTIAL + 3).unwrap_or(u64::MAX);
                std::io::stdin()
                    .take(limit)
                    .read_to_end(&mut raw)
                    .map_err(|_| Failure("could not read the token from standard input".into()))?;
                Ok(raw)
            }
        }
    }
}

/// The token in `raw`, if it has the shape of one: one trailing newline (of `echo` or a
/// file) is dropped; nothing else is changed, since a token the operator would trim
/// differently than shown here would be another token. Each refusal is fixed text.
pub fn check_seed(raw: &[u8]) -> Result<SecretString, &'static str> {
    let raw = raw
        .strip_suffix(b"\r\n")
        .or_else(|| raw.strip_suffix(b"\n"))
        .unwrap_or(raw);
    if raw.is_empty() {
        return Err("the token is empty");
    }
    if raw.iter().any(|b| b.is_ascii_whitespace() || *b == b'\x0b') {
        return Err(
            "the token contains a space, tab or line break: paste the token alone, on one line",
        );
    }
    if !raw.iter().all(|b| b.is_ascii_graphic()) {
        return Err("the token contains characters other than printable ASCII");
    }
    if raw.len() < MIN_SEED {
        return Err("the token is shorter than 8 characters: an SCG token is longer");
    }
    if raw.len() > MAX_CREDENTIAL {
        return Err("the token is longer than 8 KiB, more than the operator accepts");
    }
    let text = std::str::from_utf8(raw).map_err(|_| "the token is not text")?;
    Ok(SecretString::new(text))
}

/// Reasons that stop the operator before any refresh: a request waits on them forever,
/// so an unanswered request under them is not a refresh in flight.
const BLOCKED: [Reason; 5] = [
    Reason::CredentialsNotFound,
    Reason::CredentialsNotAllowed,
    Reason::InvalidSpec,
    Reason::Suspended,
    Reason::TargetConflict,
];

/// Why a new seed must not be written now: a token held in memory (`Pending`), or a
/// refresh asked for and not yet answered. A seed written under either could race the
/// token the operator is about to store.
pub fn in_flight(token: &ScgToken, name: &str) -> Option<String> {
    let reason = token
        .ready_condition()
        .and_then(|c| c.reason.parse::<Reason>().ok());
    if reason == Some(Reason::Pending) {
        return Some(format!(
            "not reseeding ScgToken {name:?}: it is Pending (a new token waits in the \
             operator's memory to be stored); run again once kubectl scgtoken status {name} \
             no longer says Pending"
        ));
    }
    let asked = token.annotations().get(REFRESH_REQUEST_ANNOTATION)?;
    let answered = token
        .status
        .as_ref()
        .and_then(|s| s.last_refresh_request.as_ref())
        == Some(asked);
    let blocked = reason.is_some_and(|r| BLOCKED.contains(&r));
    (!answered && !blocked).then(|| {
        format!(
            "not reseeding ScgToken {name:?}: the refresh asked for at {asked} has not been \
             acted on yet; run again once kubectl scgtoken status {name} says it was"
        )
    })
}

/// The Secret and key to write: the chain's credentials, or with `standby` the standby
/// chain's, read from the stored object so that a CRD that has the field needs no newer
/// plugin (a field the CRD does not have is pruned by the API server, never stored).
pub fn seed_location(
    token: &ScgToken,
    raw: &serde_json::Value,
    standby: bool,
) -> Result<(String, String), Failure> {
    if !standby {
        let r = &token.spec.credentials_secret_ref;
        return Ok((r.name.clone(), r.access_token_key.clone()));
    }
    let r = raw
        .pointer("/spec/standby/credentialsSecretRef")
        .ok_or_else(|| {
            Failure(format!(
                "standby is not configured: ScgToken {:?} has no \
                 spec.standby.credentialsSecretRef",
                token.name_any()
            ))
        })?;
    let name = r["name"].as_str().filter(|n| !n.is_empty());
    let name =
        name.ok_or_else(|| Failure("spec.standby.credentialsSecretRef has no name".into()))?;
    let key = r["accessTokenKey"].as_str().unwrap_or("accessToken");
    Ok((name.to_string(), key.to_string()))
}

/// How the operator took the new seed, seen in one version of the ScgToken.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Ready with a token that is neither the old one nor the seed: its fingerprint. The
    /// target Secret says whether it descends from the new seed.
    Candidate(String),
    /// The call presenting the new seed failed: Ready's reason and message.
    Refused(String, String),
}

/// Reads `token` for the outcome of the seed whose fingerprint is `seed`.
pub fn taken(token: &ScgToken, before: Option<&str>, seed: &str) -> Option<Taken> {
    let status = token.status.as_ref()?;
    let ready = token.ready_condition()?;
    let shown = status.token_fingerprint.as_deref();
    if ready.status == "True" {
        let fp = shown.filter(|f| Some(*f) != before && *f != seed)?;
        return Some(Taken::Candidate(fp.to_string()));
    }
    // A failed attempt shows the token it presented: the new seed.
    (shown == Some(seed)).then(|| Taken::Refused(ready.reason.clone(), ready.message.clone()))
}

pub async fn run(
    target: &Target,
    name: &str,
    standby: bool,
    timeout: Duration,
    source: SeedSource,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), Failure> {
    let (token, raw) = target.scgtoken(name).await?;
    let (secret, key) = seed_location(&token, &raw, standby)?;
    if let Some(why) = in_flight(&token, name) {
        return Err(Failure(why));
    }
    let what = format!("Secret {secret:?}");
    let meta = bounded(target.secrets().get_metadata(&secret))
        .await
        .map_err(|e| target.explain(&e, "get", &what))?;
    let seed = check_seed(&source.read(&format!("{what} key {key:?}"))?)
        .map_err(|why| Failure(format!("refused: {why}; nothing was written")))?;
    let fingerprint = chain::fingerprint(&token, seed.expose());
    if !standby && current_seed(target, &token).await.as_deref() == Some(fingerprint.as_str()) {
        return Err(Failure(format!(
            "refused: this is the seed the current chain of {name} started from (most likely \
             revoked); re-generate a new token in the SDC UI; nothing was written"
        )));
    }
    let opted_in = access::opted_in(
        &Secret {
            metadata: meta.metadata,
            ..Secret::default()
        },
        name,
    );
    write_seed(target, &secret, &key, seed).await?;
    emit(out, &format!("wrote a new seed into {what} key {key:?}\n"));
    if !opted_in {
        emit(
            out,
            &format!("warning: {}\n", access::not_opted_in_message(&what, name)),
        );
    }
    if standby {
        emit(
            out,
            "the standby chain's progress is not shown by this plugin version\n",
        );
        return Ok(());
    }
    if token.spec.suspend {
        emit(
            out,
            &format!("{name} is suspended: the seed is used once it is resumed\n"),
        );
        return Ok(());
    }
    emit(
        out,
        &format!(
            "waiting up to {}s for the operator to use it\n",
            timeout.as_secs()
        ),
    );
    await_chain(target, &token, &fingerprint, timeout, out).await
}

/// The seed fingerprint of the chain stored in the target Secret, if it can be read.
async fn current_seed(target: &Target, token: &ScgToken) -> Option<String> {
    let meta = bounded(target.secrets().get_metadata(&token.target_name()))
        .await
        .ok()?;
    meta.annotations().get(chain::SEED_FINGERPRINT).cloned()
}

/// Writes `seed` as the one key `key` of `secret`; the Secret's other keys stay.
async fn write_seed(
    target: &Target,
    secret: &str,
    key: &str,
    seed: SecretString,
) -> Result<(), Failure> {
    let value = serde_json::to_value(ByteString(seed.expose().as_bytes().to_vec()))
        .map_err(|_| Failure("could not encode the token".into()))?;
    let patch = serde_json::json!({ "data": { key: value } });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    bounded(
        target
            .secrets()
            .patch(secret, &params, &Patch::Merge(&patch)),
    )
    .await
    .map_err(|e| target.explain(&e, "patch", &format!("Secret {secret:?}")))?;
    Ok(())
}

/// Waits until the chain runs from the seed whose fingerprint is `seed`, or its first
/// call is refused, or `timeout` passes.
async fn await_chain(
    target: &Target,
    token: &ScgToken,
    seed: &str,
    timeout: Duration,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), Failure> {
    let name = token.name_any();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut before = token
        .status
        .as_ref()
        .and_then(|s| s.token_fingerprint.clone());
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let seen = target
            .wait_for(&name, left, |t| taken(t, before.as_deref(), seed))
            .await;
        match seen {
            Ok(Taken::Refused(reason, message)) => {
                return Err(Failure(format!(
                    "the operator tried the new seed and it was refused: Ready is {reason}: \
                     {message}"
                )));
            }
            Ok(Taken::Candidate(fp)) => {
                if current_seed(target, token).await.as_deref() == Some(seed) {
                    emit(
                        out,
                        &format!(
                            "Ready: a new chain runs from the new seed; token fingerprint {fp}\n"
                        ),
                    );
                    return Ok(());
                }
                // A refresh of the old chain landed first; the new seed is still to come.
                before = Some(fp);
            }
            Err(last) => return Err(Failure(timed_out(last.as_ref(), timeout))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ScgTokenSpec, ScgTokenStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    #[test]
    fn a_seed_must_look_like_a_token() {
        let ok = "e6e9b18a-6e62-38fb-9bd4-9aa82e93f654";
        for raw in [ok.to_string(), format!("{ok}\n"), format!("{ok}\r\n")] {
            assert_eq!(check_seed(raw.as_bytes()).unwrap().expose(), ok);
        }
        for (raw, why) in [
            ("", "empty"),
            ("\n", "empty"),
            ("abc def-ghij", "space"),
            ("abcdefgh\nijkl", "line break"),
            ("abcdefgh\n\n", "line break"),
            (" abcdefghij", "space"),
            ("abcdéfghij", "printable ASCII"),
            ("abc\x07defghij", "printable ASCII"),
            ("short", "shorter"),
        ] {
            let err = check_seed(raw.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{raw:?}: {err}");
        }
        assert!(
            check_seed(&vec![b'a'; MAX_CREDENTIAL + 1])
                .unwrap_err()
                .contains("8 KiB")
        );
    }

    fn token(reason: &str, request: Option<(&str, Option<&str>)>) -> ScgToken {
        let mut t = ScgToken::new("m", ScgTokenSpec::new("c"));
        t.status = Some(ScgTokenStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if reason == "Refreshed" {
                    "True"
                } else {
                    "False"
                }
                .into(),
                reason: reason.into(),
                message: "msg".into(),
                last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            token_fingerprint: Some("old".into()),
            last_refresh_request: request.and_then(|(_, done)| done.map(Into::into)),
            ..Default::default()
        });
        if let Some((asked, _)) = request {
            t.annotations_mut()
                .insert(REFRESH_REQUEST_ANNOTATION.into(), asked.into());
        }
        t
    }

    #[test]
    fn no_reseed_while_a_token_is_held_or_a_request_is_unanswered() {
        assert!(
            in_flight(&token("Pending", None), "m")
                .unwrap()
                .contains("Pending")
        );
        let waiting = token("Refreshed", Some(("t2", Some("t1"))));
        assert!(
            in_flight(&waiting, "m")
                .unwrap()
                .contains("not been acted on")
        );
        assert_eq!(
            in_flight(&token("Refreshed", Some(("t2", Some("t2")))), "m"),
            None
        );
        assert_eq!(in_flight(&token("ChainBroken", None), "m"), None);
        // A request the operator cannot act on (credentials missing) waits forever.
        assert_eq!(
            in_flight(&token("CredentialsNotFound", Some(("t2", None))), "m"),
            None
        );
    }

    #[test]
    fn standby_needs_the_field() {
        let t = token("Refreshed", None);
        let plain = serde_json::json!({"spec": {"credentialsSecretRef": {"name": "c"}}});
        assert_eq!(
            seed_location(&t, &plain, false).unwrap(),
            ("c".into(), "accessToken".into())
        );
        let err = seed_location(&t, &plain, true).unwrap_err();
        assert!(err.0.starts_with("standby is not configured"), "{err}");
        let with = serde_json::json!({"spec": {"standby": {"credentialsSecretRef": {"name": "s", "accessTokenKey": "seed"}}}});
        assert_eq!(
            seed_location(&t, &with, true).unwrap(),
            ("s".into(), "seed".into())
        );
    }

    #[test]
    fn the_outcome_is_read_from_fingerprints() {
        let mut ok = token("Refreshed", None);
        assert_eq!(taken(&ok, Some("old"), "seedfp"), None);
        ok.status.as_mut().unwrap().token_fingerprint = Some("new".into());
        assert_eq!(
            taken(&ok, Some("old"), "seedfp"),
            Some(Taken::Candidate("new".into()))
        );
        let mut refused = token("Rejected", None);
        assert_eq!(taken(&refused, Some("old"), "seedfp"), None);
        refused.status.as_mut().unwrap().token_fingerprint = Some("seedfp".into());
        assert_eq!(
            taken(&refused, Some("old"), "seedfp"),
            Some(Taken::Refused("Rejected".into(), "msg".into()))
        );
    }
}
