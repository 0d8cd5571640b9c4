//! The pass's writes: storing tokens in the target Secret and the refresh call.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::{Context, memory::Key};
use crate::{
    chain::{self, Chain, PersistError},
    crd::ScgToken,
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
    let result = chain::persist(&secrets, obj, base, held).await;
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
