//! Fault injection and request counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Shared;

/// Internal fault configuration, cheap to check on every request.
pub(crate) struct FaultState {
    rules: Mutex<HashMap<(String, String), (u32, u16)>>,
    has_rules: AtomicBool,
    latency_us: AtomicU64,
    outage: AtomicBool,
    bookmark_ms: AtomicU64,
}

impl Default for FaultState {
    fn default() -> Self {
        FaultState {
            rules: Mutex::new(HashMap::new()),
            has_rules: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            outage: AtomicBool::new(false),
            bookmark_ms: AtomicU64::new(5000),
        }
    }
}

impl FaultState {
    pub(crate) fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    pub(crate) fn outage(&self) -> bool {
        self.outage.load(Ordering::Relaxed)
    }

    pub(crate) fn bookmark_interval(&self) -> Duration {
        Duration::from_millis(self.bookmark_ms.load(Ordering::Relaxed).max(1))
    }

    /// Consumes one injected failure for (verb, resource), if any, returning its code.
    pub(crate) fn take(&self, verb: &str, resource: &str) -> Option<u16> {
        if !self.has_rules.load(Ordering::Relaxed) {
            return None;
        }
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let key = (verb.to_string(), resource.to_string());
        let (times, code) = rules.get_mut(&key)?;
        let code = *code;
        *times -= 1;
        if *times == 0 {
            rules.remove(&key);
        }
        if rules.is_empty() {
            self.has_rules.store(false, Ordering::Relaxed);
        }
        Some(code)
    }
}

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
        let state = &self.shared.faults;
        let mut rules = state.rules.lock().unwrap_or_else(|e| e.into_inner());
        let key = (verb.to_string(), resource.to_string());
        if times == 0 {
            rules.remove(&key);
        } else {
            rules.insert(key, (times, code));
        }
        state.has_rules.store(!rules.is_empty(), Ordering::Relaxed);
    }

    /// Adds `latency` to every request (before it is processed).
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shared.faults.latency_us.store(us, Ordering::Relaxed);
    }

    /// Ends every open watch stream now (clients see the stream end and re-watch).
    pub fn close_watches(&self) {
        self.shared.close_watches();
    }

    /// While `true`, every request answers 503 and open watches are closed.
    pub fn set_outage(&self, outage: bool) {
        self.shared.faults.outage.store(outage, Ordering::Relaxed);
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
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self.shared
            .faults
            .bookmark_ms
            .store(ms.max(1), Ordering::Relaxed);
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
