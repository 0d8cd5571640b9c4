//! The shared upstream rate budget: every refresh call takes its turn here first.
//!
//! SCG rate limits apply per application, not per token, and after an outage every
//! token is due at once. So, across all ScgTokens:
//!
//! - at most `rate` calls per second, with bursts of up to `burst` calls (a token bucket
//!   in its GCRA form, in whole nanoseconds, so the bound is exact);
//! - the waiter whose token expires first goes first. A token that can still be saved
//!   goes before a seed (its expiry is unknown, and a seed is normally long-lived), and
//!   a seed before a token that has already expired (its consumers are down already and
//!   ordering cannot save it; among those, the one dead longest goes first);
//! - a 429's `Retry-After` (or a 503's, when it has one) pauses every waiter of that
//!   endpoint (scheme, host, port and path), not only the token that got it, so they wait instead of each collecting a
//!   429. Other endpoints go on. A pause never holds a token within [`URGENT_LEAD`] of
//!   its expiry, as the per-token back-off never waits past expiry either.
//!
//! A waiting refresh is an await in its own reconcile: other ScgTokens' passes go on.
//! [`Budget::close`] (on shutdown) ends every wait, and no turn is given after it.
//! Nothing here sees a credential; the endpoint is logged without query (it has none).

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use futures::future::BoxFuture;
use jiff::SignedDuration;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::{
    sync::{Notify, oneshot},
    time::Instant,
};
use tracing::info;

use crate::{report::Metrics, scg::Endpoint};

/// A pause holds no waiter whose token expires within this much: its call would
/// otherwise start too late to finish before expiry.
pub const URGENT_LEAD: Duration = Duration::from_secs(15);
/// Longest pause one `Retry-After` imposes on an endpoint, like the longest back-off.
pub const MAX_PAUSE: Duration = Duration::from_secs(300);
/// Pause after a 429 that did not say how long to wait.
pub const UNSPECIFIED_PAUSE: Duration = Duration::from_secs(1);

/// Calls per second across all tokens, and how many may go at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_second: f64,
    burst: u32,
}

impl Rate {
    /// `per_second` of zero means no limit (`None`).
    pub fn new(per_second: f64, burst: u32) -> Result<Option<Rate>, String> {
        if per_second == 0.0 {
            return Ok(None);
        }
        if !per_second.is_finite() || !(0.001..=1e6).contains(&per_second) {
            return Err(format!(
                "--max-refresh-rate must be 0 (no limit) or between 0.001 and 1000000, not {per_second}"
            ));
        }
        if burst == 0 {
            return Err("--refresh-burst must be at least 1".into());
        }
        Ok(Some(Rate { per_second, burst }))
    }
}

/// Monotonic time for the budget; tests replace it with one they move by hand.
pub trait Timer: Send + Sync {
    fn now(&self) -> Instant;
    fn sleep_until(&self, at: Instant) -> BoxFuture<'static, ()>;
}

/// Tokio's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep_until(&self, at: Instant) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep_until(at))
    }
}

/// How a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Given at once: nothing was waiting ahead and the rate allowed it.
    Now,
    /// Given after waiting; what the caller read before may be stale.
    Waited,
    /// The budget was closed (shutdown): no call may start.
    Closed,
}

/// The budget. Clones share it.
#[derive(Clone)]
pub struct Budget(Arc<Shared>);

struct Shared {
    state: Mutex<State>,
    timer: Arc<dyn Timer>,
    /// Wakes the task that gives turns when time passes.
    wake: Arc<Notify>,
    epoch: Instant,
    waiting: Gauge,
    waits: Counter,
    pauses: Counter,
}

struct State {
    queue: Queue<oneshot::Sender<()>>,
    closed: bool,
    ticking: bool,
}

impl Budget {
    /// A budget allowing `rate` (`None`: no limit; `Retry-After` pauses still apply).
    pub fn new(rate: Option<Rate>, timer: Arc<dyn Timer>, metrics: &Metrics) -> Budget {
        let epoch = timer.now();
        Budget(Arc::new(Shared {
            state: Mutex::new(State {
                queue: Queue::new(rate),
                closed: false,
                ticking: false,
            }),
            timer,
            wake: Arc::new(Notify::new()),
            epoch,
            waiting: metrics.refreshes_waiting.clone(),
            waits: metrics.budget_waits.clone(),
            pauses: metrics.budget_pauses.clone(),
        }))
    }

    /// Waits for a turn to call `endpoint` for a token expiring in `expires_in` (negative:
    /// expired; `None`: unknown, a seed). Cancel-safe: a dropped wait takes no turn.
    pub async fn turn(&self, endpoint: &Endpoint, expires_in: Option<SignedDuration>) -> Turn {
        let shared = &self.0;
        let (tx, mut rx) = oneshot::channel();
        let ticket = {
            let mut state = shared.lock();
            if state.closed {
                return Turn::Closed;
            }
            let now = shared.now();
            let expiry = expires_in.map_or(Expiry::Unknown, |d| {
                let d = i64::try_from(d.as_nanos()).unwrap_or(if d.is_negative() {
                    i64::MIN
                } else {
                    i64::MAX
                });
                Expiry::At(now.saturating_add(d))
            });
            let ticket = state.queue.push(endpoint, expiry, tx);
            shared.waiting.inc();
            shared.dispatch(&mut state);
            if rx.try_recv().is_ok() {
                return Turn::Now;
            }
            shared.tick(&mut state);
            ticket
        };
        shared.waits.inc();
        let mut queued = Queued {
            shared,
            ticket: Some(ticket),
        };
        match rx.await {
            Ok(()) => {
                queued.ticket = None;
                Turn::Waited
            }
            Err(_) => Turn::Closed,
        }
    }

    /// The API answered 429 for `endpoint`: its waiters hold back for `retry_after`
    /// ([`UNSPECIFIED_PAUSE`] when absent, at most [`MAX_PAUSE`]).
    pub fn pause(&self, endpoint: &Endpoint, retry_after: Option<Duration>) {
        let pause = pause_for(retry_after);
        if pause.is_zero() {
            return;
        }
        let shared = &self.0;
        let started = {
            let mut state = shared.lock();
            let until = shared.now().saturating_add(nanos(pause));
            let started = state.queue.pause(endpoint, until);
            if state.ticking {
                shared.wake.notify_one();
            }
            started
        };
        shared.pauses.inc();
        if started {
            info!(
                endpoint = ?endpoint,
                seconds = pause.as_secs(),
                "the SCG API is rate limiting: refreshes through this endpoint wait"
            );
        }
    }

    /// Ends every wait with [`Turn::Closed`], and every later one at once.
    pub fn close(&self) {
        let shared = &self.0;
        let mut state = shared.lock();
        state.closed = true;
        let dropped = state.queue.clear();
        shared.waiting.dec_by(dropped as i64);
        shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> i64 {
        nanos(self.timer.now().saturating_duration_since(self.epoch))
    }

    /// Gives every turn that is due now; returns when to look again.
    fn dispatch(&self, state: &mut State) -> Option<i64> {
        let now = self.now();
        loop {
            match state.queue.next(now) {
                Next::Go(tx) => {
                    self.waiting.dec();
                    // A waiter that went away in the meantime uses no slot.
                    if tx.send(()).is_ok() {
                        state.queue.charge(now);
                    }
                }
                Next::At(at) => return Some(at),
                Next::Idle => return None,
            }
        }
    }

    /// Makes sure the task that gives turns as time passes runs, and looks again.
    fn tick(self: &Arc<Self>, state: &mut State) {
        if !state.ticking {
            state.ticking = true;
            tokio::spawn(ticker(Arc::downgrade(self), self.wake.clone()));
        }
        self.wake.notify_one();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the ticker notice that the budget is gone.
        self.wake.notify_one();
    }
}

/// Gives turns as time passes, until the budget is closed or dropped.
async fn ticker(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let sleep = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = shared.lock();
            if state.closed {
                return;
            }
            shared.dispatch(&mut state).map(|at| {
                let at = shared.epoch + Duration::from_nanos(u64::try_from(at).unwrap_or(0));
                shared.timer.sleep_until(at)
            })
        };
        match sleep {
            Some(sleep) => {
                tokio::select! {
                    () = sleep => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// A waiter in the queue; leaving without a turn takes it out.
struct Queued<'a> {
    shared: &'a Shared,
    ticket: Option<Ticket>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let mut state = self.shared.lock();
            if state.queue.remove(&ticket).is_some() {
                self.shared.waiting.dec();
            }
        }
    }
}

/// How long a 429 pauses its endpoint.
fn pause_for(retry_after: Option<Duration>) -> Duration {
    retry_after.unwrap_or(UNSPECIFIED_PAUSE).min(MAX_PAUSE)
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

// The queue itself: no I/O, no clock. Times are nanoseconds since the budget was made.

/// When a waiter's token expires. `At` sorts before `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Expiry {
    At(i64),
    Unknown,
}

/// A waiter's place: its expiry, then arrival.
type Key = (Expiry, u64);

struct Ticket {
    endpoint: Endpoint,
    key: Key,
}

enum Next<W> {
    /// This waiter's turn; [`Queue::charge`] if it took it.
    Go(W),
    /// Nothing may go before this instant.
    At(i64),
    /// Nobody waits.
    Idle,
}

/// GCRA: a call conforms when the theoretical arrival time is at most `tolerance` ahead.
struct Gcra {
    interval: i64,
    tolerance: i64,
    tat: i64,
}

impl Gcra {
    fn new(rate: Rate) -> Gcra {
        // Rounded up, so that rounding never allows more than the rate.
        let interval = (1e9 / rate.per_second).ceil() as i64;
        Gcra {
            interval,
            tolerance: interval.saturating_mul(i64::from(rate.burst) - 1),
            tat: 0,
        }
    }
    /// The earliest instant from `now` on at which a call conforms.
    fn free_at(&self, now: i64) -> i64 {
        now.max(self.tat.saturating_sub(self.tolerance))
    }
    fn charge(&mut self, now: i64) {
        self.tat = self.tat.max(now).saturating_add(self.interval);
    }
}

/// The waiters of one endpoint.
struct Line<W> {
    paused_until: Option<i64>,
    waiters: BTreeMap<Key, W>,
}

impl<W> Line<W> {
    /// The waiter this line would send next: the first one still alive (a known expiry
    /// in the future, else a seed), else the one expired longest. `true` when expired.
    fn first(&self, now: i64) -> Option<(bool, Key)> {
        let alive = (
            Bound::Excluded((Expiry::At(now), u64::MAX)),
            Bound::Unbounded,
        );
        match self.waiters.range(alive).next() {
            Some((key, _)) => Some((false, *key)),
            None => self.waiters.keys().next().map(|key| (true, *key)),
        }
    }

    fn paused(&self, now: i64) -> bool {
        self.paused_until.is_some_and(|until| until > now)
    }

    /// The waiter that may go now, if the rate allows.
    fn eligible(&self, now: i64) -> Option<(bool, Key)> {
        let first = self.first(now)?;
        if !self.paused(now) {
            return Some(first);
        }
        // Expiries are ordered and the lead is the same for all: if the first live
        // waiter is not urgent, none is.
        match first {
            (false, (Expiry::At(at), _)) if at <= now.saturating_add(nanos(URGENT_LEAD)) => {
                Some(first)
            }
            _ => None,
        }
    }

    /// When a paused line next lets a waiter go: the pause's end, or its first waiter
    /// becoming urgent.
    fn opens_at(&self, now: i64) -> Option<i64> {
        let until = self.paused_until.filter(|u| *u > now)?;
        let urgent = match self.first(now)? {
            (false, (Expiry::At(at), _)) => at.saturating_sub(nanos(URGENT_LEAD)),
            _ => until,
        };
        Some(until.min(urgent))
    }
}

/// Waiters by endpoint, each line in order of expiry, and the rate they share.
struct Queue<W> {
    rate: Option<Gcra>,
    lines: HashMap<Endpoint, Line<W>>,
    arrivals: u64,
}

impl<W> Queue<W> {
    fn new(rate: Option<Rate>) -> Queue<W> {
        Queue {
            rate: rate.map(Gcra::new),
            lines: HashMap::new(),
            arrivals: 0,
        }
    }

    fn line(&mut self, endpoint: &Endpoint) -> &mut Line<W> {
        self.lines.entry(endpoint.clone()).or_insert_with(|| Line {
            paused_until: None,
            waiters: BTreeMap::new(),
        })
    }

    fn push(&mut self, endpoint: &Endpoint, expiry: Expiry, waiter: W) -> Ticket {
        self.arrivals += 1;
        let key = (expiry, self.arrivals);
        self.line(endpoint).waiters.insert(key, waiter);
        Ticket {
            endpoint: endpoint.clone(),
            key,
        }
    }

    fn remove(&mut self, ticket: &Ticket) -> Option<W> {
        self.lines
            .get_mut(&ticket.endpoint)
            .and_then(|line| line.waiters.remove(&ticket.key))
    }

    /// Pauses `endpoint` until `until` (a pause is only ever lengthened). `true` when it
    /// was not paused before.
    fn pause(&mut self, endpoint: &Endpoint, until: i64) -> bool {
        let line = self.line(endpoint);
        let started = line.paused_until.is_none();
        line.paused_until = Some(line.paused_until.map_or(until, |u| u.max(until)));
        started
    }

    /// Takes the waiter whose turn it is at `now`, or says when to look again.
    fn next(&mut self, now: i64) -> Next<W> {
        self.lines.retain(|_, line| {
            if !line.paused(now) {
                line.paused_until = None;
            }
            line.paused_until.is_some() || !line.waiters.is_empty()
        });
        let best = self
            .lines
            .iter()
            .filter_map(|(endpoint, line)| line.eligible(now).map(|rank| (rank, endpoint)))
            .min_by_key(|(rank, _)| *rank)
            .map(|((_, key), endpoint)| (key, endpoint.clone()));
        let Some((key, endpoint)) = best else {
            let opens = self.lines.values().filter_map(|l| l.opens_at(now)).min();
            return opens.map_or(Next::Idle, Next::At);
        };
        if let Some(rate) = &self.rate {
            let free = rate.free_at(now);
            if free > now {
                return Next::At(free);
            }
        }
        match self.remove(&Ticket { endpoint, key }) {
            Some(waiter) => Next::Go(waiter),
            None => Next::Idle,
        }
    }

    /// Counts a call against the rate.
    fn charge(&mut self, now: i64) {
        if let Some(rate) = &mut self.rate {
            rate.charge(now);
        }
    }

    /// Drops every waiter; returns how many there were.
    fn clear(&mut self) -> usize {
        let n = self.lines.values().map(|l| l.waiters.len()).sum();
        self.lines.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1_000_000;
    const S: i64 = 1_000 * MS;

    fn endpoint(host: &str) -> Endpoint {
        Endpoint::parse(&format!("https://{host}/apptoken-refresh"), false).unwrap()
    }

    fn rate(per_second: f64, burst: u32) -> Option<Rate> {
        Rate::new(per_second, burst).unwrap()
    }

    /// Runs the queue as the budget does, returning who went.
    fn drain<W>(q: &mut Queue<W>, now: i64) -> Vec<W> {
        let mut went = Vec::new();
        while let Next::Go(w) = q.next(now) {
            q.charge(now);
            went.push(w);
        }
        went
    }

    #[test]
    fn burst_then_one_per_interval_and_never_more() {
        let mut q = Queue::new(rate(10.0, 5));
        let a = endpoint("a");
        for i in 0..50 {
            q.push(&a, Expiry::At(3600 * S), i);
        }
        let mut grants = Vec::new();
        let mut now = 0;
        for _ in 0..1000 {
            for w in drain(&mut q, now) {
                grants.push((now, w));
            }
            match q.next(now) {
                Next::At(at) => {
                    assert!(at > now);
                    now = at;
                }
                Next::Idle => break,
                Next::Go(_) => unreachable!("drained"),
            }
        }
        assert_eq!(grants.len(), 50);
        assert_eq!(grants.iter().filter(|(t, _)| *t == 0).count(), 5);
        // At most burst + rate × window in every window.
        for (i, (start, _)) in grants.iter().enumerate() {
            for window in [0, 50 * MS, 100 * MS, S, 3 * S] {
                let n = grants[i..]
                    .iter()
                    .filter(|(t, _)| *t <= start + window)
                    .count() as i64;
                assert!(
                    n <= 5 + window / (100 * MS),
                    "{n} in {window} ns from {start}"
                );
            }
        }
        assert_eq!(grants.last().unwrap().0, 4500 * MS);
        // Equal expiries go in arrival order.
        let order: Vec<_> = grants.iter().map(|(_, w)| *w).collect();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn an_idle_budget_refills_only_up_to_the_burst() {
        let mut q = Queue::new(rate(10.0, 3));
        let a = endpoint("a");
        assert!(matches!(q.next(0), Next::Idle));
        for i in 0..10 {
            q.push(&a, Expiry::At(3600 * S), i);
        }
        assert_eq!(drain(&mut q, 3600 * S).len(), 3);
        assert!(matches!(q.next(3600 * S), Next::At(t) if t == 3600 * S + 100 * MS));
    }

    #[test]
    fn live_tokens_first_by_expiry_then_seeds_then_the_expired() {
        let mut q = Queue::new(rate(1.0, 1));
        let a = endpoint("a");
        let b = endpoint("b");
        let now = 100 * S;
        q.push(&a, Expiry::Unknown, "seed-1");
        q.push(&b, Expiry::At(now - 50 * S), "dead-long");
        q.push(&a, Expiry::At(now + 90 * S), "live-90");
        q.push(&b, Expiry::At(now + 20 * S), "live-20");
        q.push(&a, Expiry::At(now - 5 * S), "dead-recent");
        q.push(&b, Expiry::Unknown, "seed-2");
        q.push(&a, Expiry::At(now + 40 * S), "live-40");
        let mut order = Vec::new();
        let mut t = now;
        while let Next::Go(w) = q.next(t) {
            q.charge(t);
            order.push(w);
            t += S;
        }
        assert_eq!(
            order,
            [
                "live-20",
                "live-40",
                "live-90",
                "seed-1",
                "seed-2",
                "dead-long",
                "dead-recent"
            ]
        );
    }

    #[test]
    fn a_token_that_expires_while_waiting_yields_to_live_ones() {
        let mut q = Queue::new(rate(1.0, 1));
        let a = endpoint("a");
        q.push(&a, Expiry::At(2 * S), "short");
        q.push(&a, Expiry::At(60 * S), "long");
        q.charge(0);
        // The rate keeps both waiting past "short"'s expiry: "long" can still be saved.
        assert!(matches!(q.next(0), Next::At(t) if t == S));
        assert_eq!(drain(&mut q, 3 * S), ["long"]);
        assert_eq!(drain(&mut q, 4 * S), ["short"]);
    }

    #[test]
    fn retry_after_pauses_one_endpoint_only() {
        let mut q = Queue::new(None);
        let a = endpoint("a");
        let b = endpoint("b");
        let far = Expiry::At(3600 * S);
        assert!(q.pause(&a, 30 * S));
        assert!(!q.pause(&a, 10 * S), "a pause is never shortened");
        q.push(&a, far, "a1");
        q.push(&b, far, "b1");
        q.push(&a, far, "a2");
        assert_eq!(drain(&mut q, 0), ["b1"]);
        assert!(matches!(q.next(0), Next::At(t) if t == 30 * S));
        assert!(drain(&mut q, 30 * S - 1).is_empty());
        assert_eq!(drain(&mut q, 30 * S), ["a1", "a2"]);
        // The pause is over and forgotten.
        q.push(&a, far, "a3");
        assert_eq!(drain(&mut q, 31 * S), ["a3"]);
    }

    #[test]
    fn a_pause_never_holds_a_token_about_to_expire() {
        let mut q = Queue::new(None);
        let a = endpoint("a");
        q.pause(&a, 300 * S);
        q.push(&a, Expiry::At(100 * S), "soon");
        q.push(&a, Expiry::At(200 * S), "later");
        q.push(&a, Expiry::Unknown, "seed");
        let lead = nanos(URGENT_LEAD);
        assert!(matches!(q.next(0), Next::At(t) if t == 100 * S - lead));
        assert_eq!(drain(&mut q, 100 * S - lead), ["soon"]);
        assert!(matches!(q.next(100 * S), Next::At(t) if t == 200 * S - lead));
        assert_eq!(drain(&mut q, 200 * S - lead), ["later"]);
        // A seed's expiry is unknown: it waits for the pause to end.
        assert!(matches!(q.next(200 * S), Next::At(t) if t == 300 * S));
        assert_eq!(drain(&mut q, 300 * S), ["seed"]);
    }

    #[test]
    fn an_expired_token_waits_out_the_pause() {
        let mut q = Queue::new(None);
        let a = endpoint("a");
        q.pause(&a, 60 * S);
        q.push(&a, Expiry::At(5 * S), "dead");
        assert!(drain(&mut q, 10 * S).is_empty());
        assert_eq!(drain(&mut q, 60 * S), ["dead"]);
    }

    #[test]
    fn a_removed_waiter_is_gone() {
        let mut q = Queue::new(rate(1.0, 1));
        let a = endpoint("a");
        q.charge(0);
        let t = q.push(&a, Expiry::Unknown, "gone");
        q.push(&a, Expiry::Unknown, "stays");
        assert_eq!(q.remove(&t), Some("gone"));
        assert_eq!(drain(&mut q, S), ["stays"]);
        assert_eq!(q.clear(), 0);
    }

    #[test]
    fn pauses_are_bounded() {
        assert_eq!(pause_for(None), UNSPECIFIED_PAUSE);
        assert_eq!(pause_for(Some(Duration::ZERO)), Duration::ZERO);
        assert_eq!(
            pause_for(Some(Duration::from_secs(42))),
            Duration::from_secs(42)
        );
        assert_eq!(pause_for(Some(Duration::from_secs(86_400))), MAX_PAUSE);
    }

    #[test]
    fn rates_are_checked() {
        assert_eq!(Rate::new(0.0, 0), Ok(None));
        assert!(Rate::new(0.5, 1).unwrap().is_some());
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e7, 0.0001] {
            assert!(Rate::new(bad, 10).is_err(), "{bad}");
        }
        assert!(Rate::new(10.0, 0).is_err());
        // A rate that does not divide a second evenly rounds its interval up.
        let g = Gcra::new(Rate::new(3.0, 1).unwrap().unwrap());
        assert_eq!(g.interval, 333_333_334);
    }
}
