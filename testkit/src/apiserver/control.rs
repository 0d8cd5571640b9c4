//! The public handles for fault injection and request counters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::shared::Shared;

/// Handle for injecting faults. Cheap to clone.
#[derive(Clone)]
pub struct Faults {
    shared: Arc<Shared>,
}

impl Faults {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Faults { shared }
    }

    /// The next `times` requests with `verb` (get, list, watch, create, update, patch,
    /// delete, deletecollection) on `resource` (plural, e.g. "secrets", or with a
    /// subresource, e.g. "scgtokens/status") answer a Status error with `code`.
    /// Replaces any earlier rule for the same verb and resource; `times == 0` clears it.
    pub fn fail_next(&self, verb: &str, resource: &str, times: u32, code: u16) {
        self.shared.faults.fail_next(verb, resource, times, code);
    }

    /// Adds `latency` to every request (before it is processed).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.set_latency(latency);
    }

    /// Ends every open watch stream now (clients see the stream end and re-watch).
    pub fn close_watches(&self) {
        self.shared.close_watches();
    }

    /// While `true`, every request answers 503 and open watches are closed.
    pub fn set_outage(&self, outage: bool) {
        self.shared.faults.set_outage(outage);
        if outage {
            self.shared.close_watches();
        }
    }

    /// Forgets the watch event history: a watch from any resourceVersion older than
    /// the current one then gets a 410 Expired error event (forcing clients to relist).
    pub fn compact_history(&self) {
        self.shared.lock_store().compact();
    }

    /// Interval between BOOKMARK events on watches that allow them (default 5 s).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.faults.set_bookmark_interval(interval);
    }
}

/// Handle for reading request counters. Cheap to clone.
#[derive(Clone)]
pub struct Counters {
    shared: Arc<Shared>,
}

impl Counters {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Counters { shared }
    }

    /// Requests per (RBAC verb, "group/resource[/subresource]"), group "core" for the
    /// legacy group, e.g. `("get", "core/secrets")`, `("patch", "scgtoken.io/scgtokens/status")`.
    pub fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.shared
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Count for one verb and resource (0 if none).
    pub fn get(&self, verb: &str, resource: &str) -> u64 {
        self.snapshot()
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Sets every counter back to zero.
    pub fn reset(&self) {
        self.shared
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}
