//! Watch streams: initial events, history replay, live events, bookmarks, timeouts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::request::{Output, Query, selectors};
use super::resources::ResourceDef;
use super::response::{Resp, render_one};
use super::selector::{FieldSelector, LabelSelector};
use super::shared::Shared;
use super::store::{Event, EventType, Store};
use super::util::ApiError;

struct Filter {
    /// The stored resource whose events this watch follows.
    res: Arc<ResourceDef>,
    /// The resource as asked for (its shape, kind and apiVersion); usually `res`.
    view: Arc<ResourceDef>,
    version: String,
    ns: Option<String>,
    label: LabelSelector,
    field: FieldSelector,
    output: Output,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.label.matches(obj) && self.field.matches(obj)
    }

    fn line(&self, etype: &str, obj: &Value) -> Bytes {
        let object = render_one(&self.view, &self.version, obj, self.output);
        let mut v =
            serde_json::to_vec(&json!({"type": etype, "object": object})).unwrap_or_default();
        v.push(b'\n');
        Bytes::from(v)
    }

    /// The line for a stored event, or None when it is not visible to this watch.
    fn event_line(&self, ev: &Event) -> Option<Bytes> {
        if ev.group != self.res.group || ev.plural != self.res.plural {
            return None;
        }
        if let Some(ns) = &self.ns
            && ev.namespace != *ns
        {
            return None;
        }
        let now = self.matches(&ev.object);
        let etype = match ev.etype {
            EventType::Modified => {
                let before = ev.old.as_deref().is_some_and(|o| self.matches(o));
                match (before, now) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return None,
                }
            }
            other => {
                if !now {
                    return None;
                }
                other.as_str()
            }
        };
        Some(self.line(etype, &ev.object))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = match self.output {
            Output::Meta => {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta})
            }
            _ => {
                json!({"kind": self.view.kind, "apiVersion": self.view.api_version(&self.version), "metadata": meta})
            }
        };
        let mut v =
            serde_json::to_vec(&json!({"type": "BOOKMARK", "object": object})).unwrap_or_default();
        v.push(b'\n');
        Bytes::from(v)
    }
}

struct WatchState {
    queue: VecDeque<Bytes>,
    /// End the stream once the queue is drained.
    finish: bool,
    rx: tokio::sync::broadcast::Receiver<Arc<Event>>,
    epoch: tokio::sync::watch::Receiver<u64>,
    deadline: Option<Instant>,
    bookmark_every: Option<Duration>,
    next_bookmark: Instant,
    last_rv: u64,
    filter: Filter,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<Bytes, std::convert::Infallible>, Self)> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                return Some((Ok(b), self));
            }
            if self.finish {
                return None;
            }
            let deadline = self.deadline;
            let bookmark_at = self.bookmark_every.map(|_| self.next_bookmark);
            // Biased, in this order: a watch closed by the test ends before it delivers
            // an event written after the close. Unbiased, a write right after
            // `close_watches` could still reach the client on the old stream, moving its
            // resourceVersion past a compaction the test meant it to meet.
            tokio::select! {
                biased;
                changed = self.epoch.changed() => {
                    let _ = changed;
                    return None;
                }
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending::<()>().await,
                    }
                } => return None,
                _ = async {
                    match bookmark_at {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    let every = self.bookmark_every.unwrap_or(Duration::from_secs(5));
                    self.next_bookmark = Instant::now() + every;
                    let line = self.filter.bookmark(self.last_rv, false);
                    self.queue.push_back(line);
                }
                ev = self.rx.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= self.last_rv {
                            continue;
                        }
                        self.last_rv = ev.rv;
                        if let Some(line) = self.filter.event_line(&ev) {
                            self.queue.push_back(line);
                        }
                    }
                    // Too slow: end the stream; the client resumes from its last rv.
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return None,
                },
            }
        }
    }
}

/// Starts a watch of the stored resource `res` as served through `view`. Called with the
/// store locked so that no event is missed between the initial state and the live
/// subscription.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    shared: &Arc<Shared>,
    store: &mut Store,
    res: Arc<ResourceDef>,
    view: Arc<ResourceDef>,
    version: String,
    ns: Option<String>,
    q: &Query,
    output: Output,
) -> Result<Resp, ApiError> {
    let (label, field) = selectors(q, &view)?;
    let bookmarks = q
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let send_initial = q
        .get("sendInitialEvents")
        .is_some_and(|v| v == "true" || v == "1");
    let timeout = match q.get("timeoutSeconds").filter(|s| !s.is_empty()) {
        Some(t) => Some(
            t.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
        None => None,
    };
    let rv_param = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let filter = Filter {
        res,
        view,
        version,
        ns,
        label,
        field,
        output,
    };
    let mut queue = VecDeque::new();
    let mut finish = false;
    let initial_state = send_initial || rv_param.is_empty() || rv_param == "0";
    if initial_state {
        for (_, obj) in store.list(&filter.res, filter.ns.as_deref()) {
            if filter.matches(obj) {
                queue.push_back(filter.line("ADDED", obj));
            }
        }
        if send_initial {
            queue.push_back(filter.bookmark(store.rv, true));
        }
    } else {
        let rv: u64 = rv_param
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv_param:?}")))?;
        match store.events_since(rv) {
            Some(events) => {
                for ev in events {
                    if let Some(line) = filter.event_line(&ev) {
                        queue.push_back(line);
                    }
                }
            }
            None => {
                let status = ApiError::expired(format!(
                    "too old resource version: {rv} ({})",
                    store.compacted + 1
                ))
                .to_status();
                let mut v = serde_json::to_vec(&json!({"type": "ERROR", "object": status}))
                    .unwrap_or_default();
                v.push(b'\n');
                queue.push_back(Bytes::from(v));
                finish = true;
            }
        }
    }
    let every = shared.faults.bookmark_interval();
    let state = WatchState {
        queue,
        finish,
        rx: store.subscribe(),
        epoch: shared.watch_epoch.subscribe(),
        deadline: timeout.map(|t| Instant::now() + Duration::from_secs(t)),
        bookmark_every: bookmarks.then_some(every),
        next_bookmark: Instant::now() + every,
        last_rv: store.rv,
        filter,
    };
    let stream = futures::stream::unfold(state, WatchState::next);
    hyper::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::new(500, "InternalError", e.to_string()))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use serde_json::json;

    use super::*;

    /// A closed watch delivers nothing written after the close, however its stream is
    /// polled. Unbiased, three polls in four would deliver the write first.
    #[tokio::test]
    async fn a_closed_watch_ends_before_any_later_event() {
        let shared = Arc::new(Shared::new());
        for i in 0..32 {
            let res = shared
                .lock_store()
                .resource("", "secrets")
                .expect("secrets");
            let resp = {
                let mut store = shared.lock_store();
                let q = Query::from([("resourceVersion".into(), store.rv.to_string())]);
                let ns = Some("default".to_string());
                start(
                    &shared,
                    &mut store,
                    res.clone(),
                    res.clone(),
                    "v1".into(),
                    ns,
                    &q,
                    Output::Full,
                )
                .expect("watch")
            };
            shared.close_watches();
            let body = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("s{i}")}});
            shared
                .lock_store()
                .create(&res, "default", body, "test", false)
                .expect("create");
            let seen = resp.into_body().collect().await.expect("body").to_bytes();
            assert!(seen.is_empty(), "a closed watch delivered {seen:?}");
        }
    }
}
