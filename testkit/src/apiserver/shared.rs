//! State shared by every connection of one server: the store, the fault settings every
//! request consults, the request counters, and the switch that ends open watches.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::store::Store;

/// State shared by every connection of one server.
pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    pub(crate) faults: FaultState,
    pub(crate) counters: Mutex<BTreeMap<(String, String), u64>>,
    /// Bumped to end every open watch stream.
    pub(crate) watch_epoch: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new() -> Shared {
        let (tx, _rx) = tokio::sync::watch::channel(0u64);
        Shared {
            store: Mutex::new(Store::new()),
            faults: FaultState::default(),
            counters: Mutex::new(Default::default()),
            watch_epoch: tx,
        }
    }

    pub(crate) fn lock_store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn close_watches(&self) {
        self.watch_epoch.send_modify(|e| *e += 1);
    }
}

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

    pub(crate) fn fail_next(&self, verb: &str, resource: &str, times: u32, code: u16) {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let key = (verb.to_string(), resource.to_string());
        if times == 0 {
            rules.remove(&key);
        } else {
            rules.insert(key, (times, code));
        }
        self.has_rules.store(!rules.is_empty(), Ordering::Relaxed);
    }

    pub(crate) fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(us, Ordering::Relaxed);
    }

    pub(crate) fn set_outage(&self, outage: bool) {
        self.outage.store(outage, Ordering::Relaxed);
    }

    pub(crate) fn set_bookmark_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self.bookmark_ms.store(ms.max(1), Ordering::Relaxed);
    }
}
