//! The connection to the cluster, chosen as kubectl chooses it, and Kubernetes API errors
//! told in the plugin's own words.

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{ApiResource, DynamicObject},
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
};

use super::{Failure, Globals};
use crate::{crd::ScgToken, k8s::bounded};

/// The cluster and namespace a verb works in.
#[derive(Clone)]
pub struct Target {
    pub client: kube::Client,
    pub namespace: String,
}

impl Target {
    pub fn tokens(&self) -> Api<ScgToken> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Reads the ScgToken `name`, typed, and as stored (with any field this version of
    /// the types does not know, e.g. one a newer CRD added).
    pub async fn scgtoken(&self, name: &str) -> Result<(ScgToken, serde_json::Value), Failure> {
        let resource = ApiResource::erase::<ScgToken>(&());
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &resource);
        let obj = bounded(api.get(name))
            .await
            .map_err(|e| self.explain(&e, "get", &format!("ScgToken {name:?}")))?;
        let raw = serde_json::to_value(&obj).unwrap_or_default();
        let typed = serde_json::from_value(raw.clone()).map_err(|_| {
            Failure(format!(
                "ScgToken {name:?} in namespace {:?} does not match this plugin's version of the \
                 resource; upgrade the plugin",
                self.namespace
            ))
        })?;
        Ok((typed, raw))
    }

    /// A Kubernetes API error as one line: what was being done, to what, and the answer's
    /// status, never its message (it may quote what was written).
    pub fn explain(&self, e: &kube::Error, verb: &str, what: &str) -> Failure {
        let ns = &self.namespace;
        Failure(match e {
            kube::Error::Api(s) if s.code == 404 => {
                format!("{what} not found in namespace {ns:?}")
            }
            kube::Error::Api(s) if s.code == 403 => format!(
                "forbidden: your credentials may not {verb} {what} in namespace {ns:?} (RBAC); \
                 ask for a role that allows it, or use another --context"
            ),
            kube::Error::Api(s) if s.code == 401 => {
                "unauthorized: the Kubernetes API refused the kubeconfig's credentials \
                 (expired or wrong token or certificate)"
                    .to_string()
            }
            kube::Error::Api(s) => format!(
                "could not {verb} {what} in namespace {ns:?}: the Kubernetes API answered {} {}",
                s.code, s.reason
            ),
            _ => format!(
                "could not {verb} {what}: the Kubernetes API could not be reached or did not \
                 answer in time (check --kubeconfig and --context)"
            ),
        })
    }
}

/// Connects as kubectl would: `--kubeconfig` (else `$KUBECONFIG`, else `~/.kube/config`),
/// `--context` (else the current context), `-n` (else the context's namespace).
pub async fn connect(globals: &Globals) -> Result<Target, Failure> {
    let options = KubeConfigOptions {
        context: globals.context.clone(),
        cluster: None,
        user: None,
    };
    let config = match &globals.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
                Failure(format!(
                    "cannot read the kubeconfig {}: {}",
                    path.display(),
                    kubeconfig_problem(&e)
                ))
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await
        }
        None => kube::Config::from_kubeconfig(&options).await,
    };
    let mut config = config.map_err(|e| {
        Failure(format!(
            "cannot use the kubeconfig: {} (check --kubeconfig and --context)",
            kubeconfig_problem(&e)
        ))
    })?;
    // A CLI answers or says why, at once: kube's client would retry a 429 or 503 for
    // minutes. Every request is also bounded by `k8s::bounded`.
    config.default_retry = false;
    config.connect_timeout = Some(std::time::Duration::from_secs(10));
    let namespace = globals
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).map_err(|_| {
        Failure(
            "cannot build a Kubernetes client from the kubeconfig (its proxy or TLS settings)"
                .into(),
        )
    })?;
    Ok(Target { client, namespace })
}

/// What is wrong with a kubeconfig, in one line. A YAML parser's message may quote the
/// text around the error, which in a kubeconfig can be a token: only its class is told.
fn kubeconfig_problem(e: &KubeconfigError) -> String {
    match e {
        KubeconfigError::ReadConfig(io, _) => io.to_string(),
        KubeconfigError::Parse(_) => "it is not a valid kubeconfig (YAML)".into(),
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

impl Target {
    /// Watches the ScgToken `name` until `check` returns `Some` for a version of it, and
    /// returns that; `None` after `timeout` (with the last version seen, if any). A
    /// dropped watch is resumed with kube's back-off within the same time.
    pub async fn wait_for<T>(
        &self,
        name: &str,
        timeout: std::time::Duration,
        mut check: impl FnMut(&ScgToken) -> Option<T>,
    ) -> Result<T, Option<ScgToken>> {
        use futures::{StreamExt, TryStreamExt};
        use kube::runtime::{WatchStreamExt, watcher};
        let fields = format!("metadata.name={name}");
        let config = watcher::Config::default().fields(&fields);
        let mut changes = watcher(self.tokens(), config)
            .default_backoff()
            .applied_objects()
            .boxed();
        let mut last = None;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, changes.try_next()).await {
                Ok(Ok(Some(token))) => {
                    if let Some(done) = check(&token) {
                        return Ok(done);
                    }
                    last = Some(token);
                }
                Ok(Ok(None)) | Err(_) => return Err(last),
                // With a back-off the watcher retries; an error here is a poll too.
                Ok(Err(_)) => {}
            }
        }
    }
}
