//! The pass's writes and its one call: storing tokens in the target Secret, and the
//! refresh call itself.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt, runtime::controller::Action};
use tracing::{debug, info, warn};

use super::{
    Context, Pass,
    memory::Key,
    outcome::{Attempt, Happened},
};
use crate::{
    Error,
    budget::Turn,
    chain::{self, Chain, Credentials, PersistError, Target},
    crd::ScgToken,
    k8s,
    policy::{self, Footing, Settings, TokenTimes},
    report::RefreshLabels,
    scg::{Endpoint, RefreshError, RefreshRequest, Refreshed, SecretString},
};

/// Writes a token kept in memory into the target Secret (`base` is the Secret as last
/// read, if it is this ScgToken's). The one way a held token is stored: at the start of
/// a pass, when restoring a deleted Secret, and on shutdown. When it landed, or a newer
/// token was already there, memory notes it as stored.
pub(super) async fn store_held(
    ctx: &Context,
    obj: &ScgToken,
    base: Option<&Secret>,
    held: &Chain,
) -> Result<Secret, PersistError> {
    let namespace = obj.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = Key::new(namespace, obj.name_any());
    let result = persist(ctx, &secrets, &key, obj, base, held).await;
    match &result {
        Ok(_) => info!("stored the token held in memory"),
        Err(PersistError::Superseded(_)) => {
            warn!("a newer token than the one held in memory is already stored")
        }
        Err(_) => return result,
    }
    ctx.memory.stored(&key, held.clone());
    result
}

/// [`chain::persist`], with the write noted in memory (the token while it is on its
/// way, the version once it landed), so that its watch event starts no pass.
async fn persist(
    ctx: &Context,
    secrets: &Api<Secret>,
    key: &Key,
    obj: &ScgToken,
    base: Option<&Secret>,
    chain: &Chain,
) -> Result<Secret, PersistError> {
    ctx.memory
        .writing(key, chain::fingerprint(obj, chain.token.expose()));
    let result = chain::persist(secrets, obj, base, chain).await;
    ctx.memory.wrote(key, result.as_ref().ok());
    result
}

/// The token a chain stands on, and the target Secret as it is after the write that
/// choice implied.
pub(super) struct Standing {
    pub chain: Chain,
    pub base: Option<Secret>,
    /// The chain starts from a new seed.
    pub rotated: bool,
}

impl Pass<'_> {
    /// Stores a token received earlier and not yet stored, if there is one: it goes
    /// first, whatever else has changed (spec, suspension, deletion, leadership), and
    /// nothing else happens until it is safe. Returns the target as it then stands.
    pub(super) async fn store_pending(&self, target: Target) -> Result<Target, Error> {
        let Some(pending) = self.ctx.memory.pending(&self.key) else {
            return Ok(target);
        };
        match store_held(self.ctx, self.obj, target.owned(), &pending).await {
            Ok(written) => Ok(Target::Owned(Box::new(written))),
            Err(PersistError::Superseded(_)) => {
                Ok(chain::load_target(&self.secrets, self.obj).await?)
            }
            Err(e) => Err(self.held_back(e, None).await),
        }
    }

    /// Chooses the token the chain stands on ([`policy::footing`]) and makes the write
    /// that implies: the stored Secret's metadata brought in line with the spec, or the
    /// Secret restored from memory.
    pub(super) async fn stand(
        &self,
        target: Option<Secret>,
        remembered: Option<Chain>,
        seed: &SecretString,
    ) -> Result<Standing, Error> {
        let seed_fingerprint = chain::fingerprint(self.obj, seed.expose());
        let stored = target
            .as_ref()
            .and_then(|s| chain::stored_chain(s, self.obj));
        let mut base = target;
        let (chain, rotated) = match policy::footing(&seed_fingerprint, stored, remembered) {
            Footing::Stored(c) => {
                if let Some(s) = &base
                    && let Some(written) =
                        chain::sync_metadata(&self.secrets, self.obj, s, &c).await?
                {
                    self.ctx.memory.wrote(&self.key, Some(&written));
                    base = Some(written);
                }
                (c, false)
            }
            Footing::Restore(c) => {
                info!(
                    secret = self.obj.target_name(),
                    "restoring the target Secret from memory"
                );
                match store_held(self.ctx, self.obj, base.as_ref(), &c).await {
                    Ok(written) => base = Some(written),
                    Err(e) => return Err(self.held_back(e, None).await),
                }
                (c, false)
            }
            Footing::Seed { rotated } => {
                let times = TokenTimes::default();
                let token = seed.clone();
                let new = Chain {
                    token,
                    times,
                    seed_fingerprint,
                };
                (new, rotated)
            }
        };
        Ok(Standing {
            chain,
            base,
            rotated,
        })
    }

    /// Waits for this refresh's turn in the shared budget ([`crate::budget`]), before the
    /// Lease check so that the check is fresh at call time. `Some` when the refresh must
    /// not happen after all: shutdown began, or the ScgToken changed while it waited.
    pub(super) async fn take_turn(
        &self,
        endpoint: &Endpoint,
        expires_at: Option<Timestamp>,
    ) -> Result<Option<Action>, Error> {
        let left = expires_at.map(|t| t.duration_since(self.ctx.clock.now()));
        let started = Instant::now();
        match self.ctx.budget.turn(endpoint, left).await {
            Turn::Now => Ok(None),
            Turn::Closed => {
                info!("not refreshing: shutting down");
                Ok(Some(Action::await_change()))
            }
            Turn::Waited => {
                let waited_ms = started.elapsed().as_millis() as u64;
                debug!(waited_ms, "the refresh budget gave this refresh its turn");
                if let (Some(at), Some(left)) = (expires_at, left)
                    && left.is_positive()
                    && at <= self.ctx.clock.now()
                {
                    warn!(
                        expired_at = %at,
                        waited_ms,
                        "the token expired while its refresh waited for the refresh budget; \
                         --max-refresh-rate may be too low for this many tokens"
                    );
                }
                self.unchanged_while_waiting().await
            }
        }
    }

    /// A wait can be long: a refresh whose ScgToken was meanwhile deleted, suspended or
    /// edited must not go ahead on what was read before it. Another pass looks again.
    async fn unchanged_while_waiting(&self) -> Result<Option<Action>, Error> {
        let api: Api<ScgToken> = Api::namespaced(self.ctx.client.clone(), &self.key.namespace);
        let now = k8s::bounded(api.get_opt(&self.key.name)).await?;
        let unchanged = now.is_some_and(|o| {
            o.metadata.uid == self.obj.metadata.uid
                && o.metadata.generation == self.obj.metadata.generation
                && o.metadata.deletion_timestamp.is_none()
        });
        if unchanged {
            return Ok(None);
        }
        info!("the ScgToken changed while its refresh waited for the budget; looking again");
        Ok(Some(Action::requeue(Duration::from_secs(1))))
    }

    /// Calls the refresh API with the chain's current token. Returns when the request
    /// left, and the answer. A 429, or a 503 with `Retry-After`, pauses every refresh
    /// through the endpoint.
    pub(super) async fn call(
        &self,
        settings: &Settings,
        endpoint: &Endpoint,
        credentials: &Credentials,
        current: &Chain,
    ) -> (Timestamp, Result<Refreshed, RefreshError>) {
        let sent_at = self.ctx.clock.now();
        let started = Instant::now();
        let result = self
            .ctx
            .token_api
            .refresh(&RefreshRequest {
                endpoint,
                consumer_key: &credentials.consumer_key,
                consumer_secret: &credentials.consumer_secret,
                old_token: &current.token,
                validity: settings.validity,
                headers: &credentials.headers,
                timeout: settings.timeout,
            })
            .await;
        // The API said when to come back: every refresh through the endpoint waits.
        match &result {
            Err(RefreshError::RateLimited { retry_after }) => {
                self.ctx.budget.pause(endpoint, *retry_after)
            }
            Err(RefreshError::Unavailable {
                retry_after: Some(after),
                ..
            }) => self.ctx.budget.pause(endpoint, Some(*after)),
            _ => {}
        }
        let metrics = &self.ctx.metrics;
        metrics
            .refresh_duration
            .observe(started.elapsed().as_secs_f64());
        let labels = RefreshLabels {
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            result: result.as_ref().map_or_else(|e| e.label(), |_| "success"),
        };
        metrics.refreshes.get_or_create(&labels).inc();
        (sent_at, result)
    }

    /// Stores a token just received. From the moment it arrived the old token may be
    /// dead: the new one is held in memory until the write lands.
    pub(super) async fn store_new(
        &self,
        base: Option<&Secret>,
        new: &Chain,
    ) -> Result<(), PersistError> {
        self.ctx.memory.hold(&self.key, new.clone());
        persist(self.ctx, &self.secrets, &self.key, self.obj, base, new).await?;
        self.ctx.memory.stored(&self.key, new.clone());
        Ok(())
    }

    /// A token is held in memory because the target Secret could not be written: says
    /// so in status (best effort: the API server may be what is failing) and fails the
    /// pass, so that it is retried soon.
    pub(super) async fn held_back(&self, e: PersistError, received: Option<Attempt>) -> Error {
        warn!(error = %e, "could not store the new token; holding it in memory");
        let error = e.to_string();
        self.report(Happened::Pending { error, received }).await;
        Error::Persist(e)
    }
}
