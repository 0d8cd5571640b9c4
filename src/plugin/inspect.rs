//! `kubectl scgtoken inspect NAME`: one YAML document for a support ticket. It holds the
//! ScgToken (spec and status), the metadata and key names of the Secrets it names, its
//! Events and the operator's version, and no secret value: of a Secret only names, labels,
//! annotations and key names are copied, never `data`, and never the annotation
//! `kubectl.kubernetes.io/last-applied-configuration`, which holds the data of a Secret
//! created with `kubectl apply`.

use jiff::Timestamp;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
use kube::{Api, ResourceExt, api::ListParams};
use serde_json::{Value, json};

use super::{Failure, Target, emit, status};
use crate::{crd::ScgToken, k8s::bounded};

/// Annotation in which `kubectl apply` keeps the whole object it applied: for a Secret,
/// its data.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// Events copied into the document (the newest).
const INSPECT_EVENTS: usize = 30;
/// Label the operator's Deployment carries in every install of this repository.
const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=scg-token-operator";

/// What a ticket may show of a Secret: metadata and key names, no value.
pub fn secret_summary(secret: &Secret) -> Value {
    let mut annotations = secret.annotations().clone();
    if annotations.contains_key(LAST_APPLIED) {
        annotations.insert(
            LAST_APPLIED.into(),
            "[left out: it holds the Secret's data]".into(),
        );
    }
    let mut keys: Vec<&String> = secret.data.iter().flat_map(|d| d.keys()).collect();
    keys.extend(secret.string_data.iter().flat_map(|d| d.keys()));
    keys.sort();
    keys.dedup();
    json!({
        "name": secret.name_any(),
        "type": secret.type_,
        "immutable": secret.immutable,
        "creationTimestamp": secret.metadata.creation_timestamp,
        "resourceVersion": secret.metadata.resource_version,
        "labels": secret.labels(),
        "annotations": annotations,
        "ownerReferences": secret.metadata.owner_references,
        "keys": keys,
    })
}

/// The stored ScgToken without its managed fields (noise in a ticket).
fn scgtoken_document(raw: &Value) -> Value {
    let mut raw = raw.clone();
    if let Some(meta) = raw.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    raw
}

/// A Secret's summary, or why it is not shown.
async fn secret(target: &Target, name: &str) -> Value {
    match bounded(target.secrets().get_opt(name)).await {
        Ok(Some(s)) => secret_summary(&s),
        Ok(None) => json!({"name": name, "missing": "no such Secret"}),
        Err(e) => {
            let why = target.explain(&e, "get", &format!("Secret {name:?}")).0;
            json!({"name": name, "notShown": why})
        }
    }
}

/// The operator's Deployments (any namespace) and their images, or why none is shown.
async fn operator(target: &Target) -> Value {
    let api: Api<Deployment> = Api::all(target.client.clone());
    let listed = bounded(api.list(&ListParams::default().labels(OPERATOR_SELECTOR))).await;
    let list = match listed {
        Ok(list) => list,
        Err(e) => {
            return json!({"notFound": target.explain(&e, "list", "Deployments (cluster-wide)").0});
        }
    };
    if list.items.is_empty() {
        return json!({"notFound": format!("no Deployment labelled {OPERATOR_SELECTOR}")});
    }
    let found: Vec<Value> = list
        .items
        .iter()
        .map(|d| {
            let images: Vec<_> = d
                .spec
                .iter()
                .flat_map(|s| s.template.spec.iter().flat_map(|p| &p.containers))
                .filter_map(|c| c.image.clone())
                .collect();
            json!({
                "deployment": format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any()),
                "version": d.labels().get("app.kubernetes.io/version"),
                "images": images,
                "readyReplicas": d.status.as_ref().and_then(|s| s.ready_replicas),
            })
        })
        .collect();
    json!(found)
}

pub async fn run(
    target: &Target,
    name: &str,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), Failure> {
    let (token, raw): (ScgToken, Value) = target.scgtoken(name).await?;
    let mut secrets = vec![
        ("targetSecret", token.target_name()),
        (
            "credentialsSecret",
            token.spec.credentials_secret_ref.name.clone(),
        ),
    ];
    if let Some(h) = &token.spec.headers_from {
        secrets.push(("headersSecret", h.name.clone()));
    }
    let mut doc = serde_json::Map::new();
    doc.insert(
        "generatedBy".into(),
        json!(format!("kubectl-scgtoken {}", env!("CARGO_PKG_VERSION"))),
    );
    doc.insert("generatedAt".into(), json!(Timestamp::now().to_string()));
    doc.insert("namespace".into(), json!(target.namespace));
    doc.insert("operator".into(), operator(target).await);
    doc.insert("scgtoken".into(), scgtoken_document(&raw));
    for (field, secret_name) in secrets {
        doc.insert(field.into(), secret(target, &secret_name).await);
    }
    let events = match status::events(target, name, INSPECT_EVENTS).await {
        Ok(list) => json!(
            list.iter()
                .map(|e| json!({
                    "at": e.at.map(|t| t.to_string()),
                    "type": e.type_,
                    "reason": e.reason,
                    "message": e.message,
                    "reporter": e.reporter,
                }))
                .collect::<Vec<_>>()
        ),
        Err(why) => json!({"notShown": why}),
    };
    doc.insert("events".into(), events);
    let text = serde_yaml::to_string(&Value::Object(doc))
        .map_err(|_| Failure("could not write the document".into()))?;
    emit(
        out,
        &format!("# kubectl scgtoken inspect {name}: no secret value is included\n{text}"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn a_secret_summary_has_key_names_and_no_value() {
        let planted = "planted-value-8f2c";
        let mut s = Secret::default();
        s.metadata.name = Some("creds".into());
        s.metadata.annotations = Some(
            [
                (
                    LAST_APPLIED.to_string(),
                    format!("{{\"data\":\"{planted}\"}}"),
                ),
                ("team".to_string(), "messaging".to_string()),
            ]
            .into(),
        );
        s.data = Some([("accessToken".to_string(), ByteString(planted.into()))].into());
        s.string_data = Some([("consumerSecret".to_string(), planted.to_string())].into());
        let text = serde_json::to_string(&secret_summary(&s)).unwrap();
        assert!(!text.contains(planted), "{text}");
        assert!(
            !text.contains("cGxhbnRlZC12YWx1ZS04ZjJj"),
            "base64 of it: {text}"
        );
        assert!(
            text.contains("\"keys\":[\"accessToken\",\"consumerSecret\"]"),
            "{text}"
        );
        assert!(text.contains("\"team\":\"messaging\""), "{text}");
    }
}
