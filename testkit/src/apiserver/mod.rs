//! In-memory Kubernetes API server for tests and the no-cluster demo.
//!
//! [`ApiServer::start`] listens on `127.0.0.1:<random port>` (plain HTTP) and serves
//! enough of the Kubernetes API for kube-rs (client and runtime watchers) and
//! `kubectl` (discovery, get/apply/annotate/delete/wait, server-side printing).
//!
//! Served resources: core/v1 `namespaces` (cluster-scoped), `secrets`, `configmaps`,
//! `events`, `pods` (stored objects only: nothing schedules or runs them); `events.k8s.io/v1` `events`; `coordination.k8s.io/v1` `leases`;
//! `apps/v1` `deployments`, `statefulsets`, `daemonsets`;
//! `apiextensions.k8s.io/v1` `customresourcedefinitions`, and every resource
//! declared by a stored CRD (served as soon as the CRD is created).
//!
//! # Simplifications compared with a real API server
//!
//! * No authentication or authorization: every request is allowed; the bearer token in
//!   the kubeconfig is a dummy. No admission, no defaulting beyond what is listed here.
//! * Namespaces need not exist for namespaced objects to be created in them (they are
//!   not auto-created either). `default` and `kube-system` exist at start. Deleting a
//!   namespace deletes the objects in it at once (honouring their finalizers).
//! * One storage per group/resource: a CRD with several versions serves the same
//!   objects under every served version with only `apiVersion` rewritten (no
//!   conversion). Core `events` and `events.k8s.io` `events` are one store, as in a
//!   real cluster: an Event created through one is served by both, each in its own shape
//!   (`regarding`/`involvedObject`, `note`/`message`, ...; field selectors too), so
//!   `kubectl describe` lists the Events an operator publishes through events.k8s.io.
//!   [`ApiServer::object`] returns the stored (core/v1) shape.
//! * Lists and gets always read the latest state; `resourceVersion` /
//!   `resourceVersionMatch` on list/get are accepted and ignored (except that a
//!   `continue` token older than the event history answers 410 Expired).
//! * Watch history is an in-memory ring of the last 10 000 events for the whole
//!   server; a watch from an older resourceVersion gets an `ERROR` event with a
//!   410 `Expired` Status, as real servers do. [`Faults::compact_history`] forces this.
//! * Bookmarks are sent every 5 seconds by default (`allowWatchBookmarks=true`);
//!   see [`Faults::set_bookmark_interval`].
//! * Validation: CRDs are checked for the names and versions a server needs; other
//!   objects are only checked for unknown fields, and only when the client asks for
//!   `fieldValidation=Strict` (kubectl does by default): against the CRD schema for
//!   custom resources (metadata not checked), against k8s-openapi's schemas for
//!   built-ins. No type or required-field validation, no pruning of unknown CR fields.
//! * Strategic merge patch is a JSON merge patch that also understands the `$patch`,
//!   `$retainKeys`, `$setElementOrder/...` and `$deleteFromPrimitiveList/...`
//!   directives and merges the usual keyed lists (`containers`, `env`, `ports`,
//!   `volumes`, `volumeMounts`, `conditions`, `ownerReferences`, ...) by their key.
//! * Server-side apply tracks managed fields per (manager, operation, subresource) with
//!   every list treated as an atomic leaf (no `listType=map` merging); `metadata`
//!   tracks only `labels`, `annotations`, `finalizers` and `ownerReferences`.
//!   `metadata.managedFields` sent by a client replaces the server's only when it
//!   differs from what the server last returned (kubectl's client-side to
//!   server-side apply migration relies on this). As in a real server, an apply by
//!   the `kubectl` manager may take over, without force, fields recorded in the
//!   `kubectl.kubernetes.io/last-applied-configuration` annotation. The field
//!   manager of non-apply writes is the `fieldManager` parameter or the
//!   `User-Agent` prefix before `/`; apply requires `fieldManager` (400 otherwise).
//! * Garbage collection is synchronous: deleting an object deletes (or, with
//!   `propagationPolicy=Orphan`, orphans) its dependents before the response is sent;
//!   `Foreground` behaves like `Background`. Dependents are only looked up by
//!   `ownerReferences[].uid`; objects created with a dangling owner are not collected.
//! * `metadata.generation` exists for apps/v1 workloads, CRDs and custom resources and
//!   is bumped when anything outside `metadata` (and `status`, when the resource has
//!   a status subresource) changes, and when `deletionTimestamp` is set.
//!   Secrets/ConfigMaps/Leases have no generation.
//! * CRDs get `status.conditions` Established/NamesAccepted = True immediately.
//! * `/openapi/v2` answers 404; `/openapi/v3` serves minimal documents: the CRD's
//!   schema for custom resources and schemas that accept any object for built-ins
//!   (so kubectl falls back to its compiled-in strategic-merge metadata). The
//!   documents advertise the `fieldValidation` parameter so kubectl validates
//!   server-side.
//! * Only JSON is spoken (no CBOR, no HTTP/2), except that protobuf request bodies of
//!   Secrets, ConfigMaps and Namespaces are decoded (kubectl's typed clients send them,
//!   e.g. `kubectl create secret generic`); responses are always JSON.
//! * Dry-run (`dryRun=All`) is honoured on create, update, patch and delete.
//!
//! # Things users should know
//!
//! * Errors are `Status` objects with the real reasons (`NotFound`, `AlreadyExists`,
//!   `Conflict`, `Invalid`, `BadRequest`, `Expired` for 410, `ServiceUnavailable`...).
//! * kube 5 clients retry 429/503/504 up to 15 times with backoff, so with
//!   [`Faults::set_outage`] or `fail_next(.., 503)` a plain [`ApiServer::client`]
//!   appears to hang; use [`ApiServer::client_without_retry`] to see the errors.
//! * Printer columns of type `date` are shown as ages, like a real server: a date in
//!   the future prints as `<invalid>`.
//! * kubectl caches discovery per server URL under `~/.kube/cache`; pass
//!   `--cache-dir` to keep test runs apart.
//! * Metadata-only (`as=PartialObjectMetadata[List]`) and `as=Table` Accept headers
//!   work for get, list and watch.

mod control;
mod convert;
mod discovery;
mod handler;
mod jsonpath;
mod managed;
mod openapi;
mod patch;
mod protobuf;
mod request;
mod resources;
mod response;
mod selector;
mod shared;
mod store;
mod table;
mod util;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub use control::{Counters, Faults};
use shared::Shared;

/// An in-memory Kubernetes API server. Dropping it stops the server and removes the
/// temporary directory holding its kubeconfig.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl ApiServer {
    /// Starts a server on `127.0.0.1` with a random port.
    pub async fn start() -> std::io::Result<ApiServer> {
        let shared = Arc::new(Shared::new());
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let dir = util::make_temp_dir()?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&format!("http://{addr}")))?;
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(ApiServer {
            shared,
            addr,
            task: Some(task),
            dir,
            kubeconfig,
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Path of a kubeconfig file pointing at this server (context namespace `default`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The kube `Config` used by [`ApiServer::client`]: this server's URL, default
    /// namespace `default`, kube's defaults otherwise (including `default_retry`).
    pub fn client_config(&self) -> kube::Config {
        let uri: http::Uri = self.url().parse().expect("server URL is a valid URI");
        kube::Config::new(uri)
    }

    /// A kube client for this server with default namespace `default`.
    ///
    /// Like any kube 5 client it retries 429/503/504 answers (up to 15 times with
    /// backoff); use [`ApiServer::client_without_retry`] to see those errors at once.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.client_config()).expect("kube client for a plain http URL")
    }

    /// Like [`ApiServer::client`] but with kube's automatic retries disabled.
    pub fn client_without_retry(&self) -> kube::Client {
        let mut config = self.client_config();
        config.default_retry = false;
        kube::Client::try_from(config).expect("kube client for a plain http URL")
    }

    /// Stops listening (dropping every connection and watch) and listens again on the
    /// same port. Stored objects and the resourceVersion counter are kept.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.shared.close_watches();
        let mut last_err = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.task = Some(tokio::spawn(serve(listener, self.shared.clone())));
                    return Ok(());
                }
                Err(e) => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("could not rebind")))
    }

    /// Fault injection handle.
    pub fn faults(&self) -> Faults {
        Faults::new(self.shared.clone())
    }

    /// Request counters handle.
    pub fn counters(&self) -> Counters {
        Counters::new(self.shared.clone())
    }

    /// Polls `check` against the object `group/resource` `namespace/name` (namespace
    /// "" for cluster-scoped; group "" for core) until it returns true or `timeout`
    /// passes. Returns the last seen object, or `None` on timeout. `check` receives
    /// `None` while the object does not exist.
    pub async fn wait_for<F>(
        &self,
        group: &str,
        resource: &str,
        namespace: &str,
        name: &str,
        timeout: Duration,
        mut check: F,
    ) -> Option<Option<serde_json::Value>>
    where
        F: FnMut(Option<&serde_json::Value>) -> bool,
    {
        let mut rx = self.shared.lock_store().subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.object(group, resource, namespace, name);
            if check(current.as_ref()) {
                return Some(current);
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return None,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The stored object (as JSON, storage version), if any.
    pub fn object(
        &self,
        group: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Option<serde_json::Value> {
        let store = self.shared.lock_store();
        store
            .objects
            .get(&(
                group.to_string(),
                resource.to_string(),
                namespace.to_string(),
                name.to_string(),
            ))
            .map(|s| s.obj.clone())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.shared.close_watches();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testkit\n  cluster:\n    server: {url}\n\
users:\n- name: testkit\n  user:\n    token: testkit-dummy-token\n\
contexts:\n- name: testkit\n  context:\n    cluster: testkit\n    user: testkit\n    namespace: default\n\
current-context: testkit\npreferences: {{}}\n"
    )
}

/// Accept loop. Aborting this task drops the listener and the `JoinSet`, which aborts
/// every connection task (closing connections and their watch streams).
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => {
                let stream = match res {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(handler::handle(shared, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
