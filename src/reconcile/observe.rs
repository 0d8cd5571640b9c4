//! Every read of a pass, gathered before anything is decided.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::Pass;
use crate::{
    chain::{self, Chain, Credentials, LoadError, Target},
    crd::REFRESH_REQUEST_ANNOTATION,
    policy::{Facts, Unloaded},
    report::TokenLabels,
    scg::Endpoint,
};

/// What a pass knows once the token held in memory, if any, was stored.
pub(super) struct Observed<'a> {
    /// What the gates look at: deletion, leadership, the spec and its endpoint, another
    /// owner of the chain, a foreign target, the credentials.
    pub facts: Facts<'a, Endpoint, Credentials, kube::Error>,
    /// The target Secret, when it is this ScgToken's.
    pub target: Option<Secret>,
    /// The newest token of the chain in memory.
    pub remembered: Option<Chain>,
    /// The refresh-request annotation's value.
    pub request: Option<String>,
    /// The value memory last acted on.
    pub handled_request: Option<String>,
}

impl<'a> Pass<'a> {
    /// Reads the credentials, memory, the ScgToken cache and the leadership, around the
    /// target Secret as it stands.
    pub(super) async fn observe(&self, target: Target) -> Observed<'a> {
        let policy = self.ctx.credentials_policy;
        let credentials = chain::load_credentials(&self.secrets, self.obj, policy).await;
        self.note_opt_in(&credentials);
        let credentials = credentials.map_err(|e| match e {
            LoadError::Missing(message) => Unloaded::Missing(message),
            LoadError::NotAllowed(message) => Unloaded::NotAllowed(message),
            LoadError::Kube(e) => Unloaded::Unreadable(e),
        });
        let obj = self.obj;
        let endpoint = Endpoint::parse(&obj.spec.endpoint, self.ctx.allow_insecure)
            .and_then(|e| self.ctx.allowed_endpoints.check(&e).map(|()| e));
        let facts = Facts {
            now: self.now,
            deleting: obj.metadata.deletion_timestamp.is_some(),
            leader: self.ctx.leadership.is_leader(),
            spec: &obj.spec,
            endpoint,
            chain_owner: self.ctx.chain_owner_other_than(obj),
            target_name: obj.target_name(),
            target_foreign: matches!(target, Target::Foreign),
            target_immutable: target.owned().and_then(|s| s.immutable) == Some(true),
            credentials,
        };
        Observed {
            facts,
            target: target.into_owned(),
            remembered: self.ctx.memory.chain(&self.key),
            request: obj.annotations().get(REFRESH_REQUEST_ANNOTATION).cloned(),
            handled_request: self.ctx.memory.handled_request(&self.key),
        }
    }

    /// Notes for status and the metric whether the Secrets read are opted in. An
    /// unreadable Secret changes neither.
    fn note_opt_in(&self, credentials: &Result<Credentials, LoadError>) {
        let not_opted_in = match credentials {
            Ok(c) => c.not_opted_in.clone(),
            Err(LoadError::NotAllowed(_) | LoadError::Missing(_)) => Vec::new(),
            Err(LoadError::Kube(_)) => return,
        };
        let labels = TokenLabels {
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
        };
        let refused = matches!(credentials, Err(LoadError::NotAllowed(_)));
        self.ctx
            .metrics
            .set_credentials_not_allowed(&labels, refused || !not_opted_in.is_empty());
        self.noted.set(not_opted_in);
    }
}
