//! End to end under stress: SIGKILL at random moments, SIGKILL during a refresh call, and
//! two replicas with leader election whose leader is killed.
//!
//! Every scenario asserts what a user would notice: a token that stops working, a refresh
//! that presents a revoked token, a Lease nobody holds, a replica that refreshes without
//! holding the Lease.

mod common {
    pub mod admin;
    pub mod harness;
    pub mod metrics;
    pub mod proxy;
}

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant, SystemTime},
};

use common::admin::{admin_addr, http, metrics_text, not_ready_message, readyz_ok};
use common::harness::{
    CONSUMER_KEY, Env, Operator, PATIENCE, descendants, lease_holder, short, wait_target_change,
};
use common::metrics::{metric, parse_metrics};
use common::proxy::CallTap;
use k8s_openapi::api::events::v1::Event;
use kube::{Api, api::ListParams};
use testkit::scgsim::{DeadReason, Endpoint, Fault, Outcome, SimConfig};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// xorshift64: a tiny deterministic PRNG, so that a failing chaos run can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Lines of all operator logs that contain `needle`.
fn log_lines(env: &Env, needle: &str) -> Vec<String> {
    env.all_logs()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Every two refresh calls presented different old tokens: at most one replica (and one
/// pass) ever refreshed a given token.
fn assert_no_token_refreshed_twice(env: &Env) {
    let mut seen = BTreeSet::new();
    for call in env.sim.refresh_log() {
        let old = call.old_token.clone().unwrap_or_default();
        assert!(
            seen.insert(old.clone()),
            "two refresh calls presented the same token {}: two passes or replicas refreshed it",
            short(&old)
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Crash safety
// ---------------------------------------------------------------------------------------

/// Where in the operator's life a chaos cycle kills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum KillAt {
    /// A pseudo-random delay after start, from 0 to one token lifetime.
    Random,
    /// Right after the operator wrote a new token into the target Secret (typically
    /// before its status write).
    AfterStore,
    /// Right after a refresh request reached the simulator.
    AfterReceipt,
    /// During a refresh call that the simulator holds for a while (`Fault::Delay`).
    MidCall,
}

/// Everything the random-SIGKILL test keeps across its kill cycles.
struct Chaos {
    rng: XorShift,
    /// Kinds of kill left in the current block of ten cycles.
    schedule: Vec<KillAt>,
    cycle: usize,
    /// The seed in the credentials Secret now.
    seed: String,
    /// Every seed planted so far: their refreshes start a chain rather than continue one.
    seeds: Vec<String>,
    /// The target's token when the chain was last reseeded: obsolete until it changes.
    stale_target: Option<String>,
    /// How many of the simulator's dead-token uses were checked already.
    uses_seen: usize,
    /// Per kind of kill: (kills, kills that landed between issue and store).
    stats: BTreeMap<KillAt, (usize, usize)>,
    /// Random kills postponed until a refresh because the token was near its expiry.
    guarded: usize,
    /// Chains lost to a kill between issue and store (documented limitation).
    lost: Vec<String>,
    /// Cycles after which the stored token had expired.
    starved: Vec<String>,
}

impl Chaos {
    fn new(rng_seed: u64, seed: String) -> Chaos {
        Chaos {
            rng: XorShift(rng_seed),
            schedule: Vec::new(),
            cycle: 0,
            seeds: vec![seed.clone()],
            seed,
            stale_target: None,
            uses_seen: 0,
            stats: BTreeMap::new(),
            guarded: 0,
            lost: Vec::new(),
            starved: Vec::new(),
        }
    }

    /// The next kind of kill: every block of ten cycles has each kind, in a seeded order.
    fn next_kill(&mut self) -> KillAt {
        if self.schedule.is_empty() {
            self.schedule = [
                [KillAt::Random; 6].as_slice(),
                &[KillAt::AfterStore; 2],
                &[KillAt::AfterReceipt, KillAt::MidCall],
            ]
            .concat();
            for i in (1..self.schedule.len()).rev() {
                self.schedule.swap(i, self.rng.below(i as u64 + 1) as usize);
            }
        }
        self.schedule.pop().expect("a scheduled kill")
    }

    /// The token the chain currently stands on, as the operator will see it after a
    /// restart, when the target holds `target`: the target's token, unless a reseed made
    /// that one obsolete; else the seed.
    fn position(&self, target: &Option<String>) -> String {
        match target {
            Some(t) if Some(t) != self.stale_target.as_ref() => t.clone(),
            _ => self.seed.clone(),
        }
    }

    /// Successful refreshes that continue a chain (not the first refresh of a seed).
    fn chain_refreshes(&self, env: &Env) -> usize {
        env.sim
            .refresh_log()
            .iter()
            .filter(|c| c.issued().is_some())
            .filter(|c| {
                !self
                    .seeds
                    .contains(c.old_token.as_ref().unwrap_or(&String::new()))
            })
            .count()
    }

    /// Checks the state after a kill of the operator `op` (of kind `mode`, started at
    /// `spawned`; the chain stood on `position_before`) once the target holds `target`.
    /// Returns whether the chain needs a new seed.
    fn check_kill(
        &mut self,
        env: &Env,
        mode: KillAt,
        spawned: SystemTime,
        position_before: &str,
        target: &Option<String>,
        op: &Operator,
    ) -> bool {
        let cycle = self.cycle;
        // Where does the chain stand now, and is that what the simulator thinks?
        if *target != self.stale_target {
            self.stale_target = None;
        }
        let position = self.position(target);
        let newest = env.sim.current_token(CONSUMER_KEY).expect("the app exists");
        let uses = env.sim.revoked_uses();
        for u in &uses[self.uses_seen..] {
            match u.reason {
                DeadReason::Revoked => panic!(
                    "cycle {cycle} (kill {mode:?}): the operator presented a revoked token {} \
                     on {:?} although the target held the newest token; the chain stood on {} \
                     before this cycle\n{}",
                    short(&u.token),
                    u.endpoint,
                    short(position_before),
                    op.logs()
                ),
                DeadReason::Expired => assert_eq!(
                    u.token, position,
                    "cycle {cycle}: an expired token other than the chain's was presented"
                ),
            }
        }
        self.uses_seen = uses.len();
        if position != newest {
            // The simulator rotated past the stored token. The only legitimate way: the
            // killed process made the call (received after it started), got or was about
            // to get the new token, and died before the Secret write.
            let log = env.sim.refresh_log();
            let last = log.iter().rev().find(|c| c.issued().is_some());
            let explained = last.is_some_and(|c| {
                c.issued() == Some(newest.as_str())
                    && c.old_token.as_deref() == Some(position.as_str())
                    && c.at >= spawned
            });
            assert!(
                explained,
                "cycle {cycle} (kill {mode:?}): the target holds {} but the simulator's newest \
                 token is {}, and that is not explained by a kill between issue and store \
                 (last successful call: {:?})\n{}",
                short(&position),
                short(&newest),
                last.map(|c| (c.at, c.old_token.as_deref().map(short))),
                op.logs()
            );
            self.stats.entry(mode).or_default().1 += 1;
            self.lost.push(format!(
                "cycle {cycle} (kill {mode:?}): token {} was issued to the killed process and \
                 never stored",
                short(&newest)
            ));
            true
        } else if !env.sim.is_valid(&position) {
            // Not a chain break: the token ran out while the test kept killing.
            self.starved.push(format!("cycle {cycle} (kill {mode:?})"));
            true
        } else {
            false
        }
    }

    /// What a human does after a lost chain: re-generate in the SDC UI and put the new
    /// seed in the credentials Secret. Done before the restart, so the next operator never
    /// holds a dead token. The target's token, `target`, is obsolete from then on.
    async fn reseed(&mut self, env: &Env, target: Option<String>) {
        self.seed = env.sim.regenerate(CONSUMER_KEY);
        self.seeds.push(self.seed.clone());
        env.put_credentials("creds", CONSUMER_KEY, &self.seed).await;
        self.stale_target = target;
    }

    fn report(&self, env: &Env, chaos_seed: u64, started: Instant) {
        eprintln!(
            "chaos: seed {chaos_seed:#x}, {} kill cycles in {:?}, {} chain refreshes, {} \
             successful refreshes in all",
            self.cycle,
            started.elapsed(),
            self.chain_refreshes(env),
            env.sim.successful_refreshes()
        );
        for (mode, (kills, lost)) in &self.stats {
            eprintln!("  kill {mode:?}: {kills} kills, {lost} between issue and store");
        }
        eprintln!(
            "  random kills postponed until a refresh (token near expiry): {}",
            self.guarded
        );
        for l in &self.lost {
            eprintln!("  chain lost (documented limitation, reseeded): {l}");
        }
        for s in &self.starved {
            eprintln!("  WARNING token expired while the operator was being killed: {s}");
        }
        let expired = env.sim.revoked_uses().len();
        eprintln!("  revoked uses: 0; expired tokens presented: {expired}");
    }
}

/// Waits until every request the tap saw was answered by the simulator and the target
/// Secret stopped changing (a write sent just before the kill may still land).
async fn settle(env: &Env, tap: &CallTap, target: &str) {
    env.eventually("the simulator to answer every call it received", || async {
        (env.sim.refresh_calls() >= tap.requests()).then_some(())
    })
    .await;
    let mut last = env.target_token(target).await;
    let mut stable = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let now = env.target_token(target).await;
        if now == last {
            stable += 1;
            if stable >= 3 {
                return;
            }
        } else {
            stable = 0;
            last = now;
        }
    }
    panic!("the target Secret kept changing after the operator was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_presents_a_revoked_token() {
    const TARGET: &str = "chaos";
    /// Refreshes that continue a chain (not the first refresh of a seed) to live through.
    const CHAIN_REFRESHES: usize = 20;
    let lifetime = Duration::from_secs(3);
    // Kill only while the stored token has this much life left, else first let the
    // operator refresh it: a test that kills the operator faster than it can start would
    // let the token expire, which says nothing about crash safety.
    let guard = Duration::from_millis(1300);
    let chaos_seed = std::env::var("SCG_CHAOS_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x5eed_c4a0_5b1e_2024);
    eprintln!("chaos seed: {chaos_seed:#x} (replay with SCG_CHAOS_SEED={chaos_seed:x})");

    let env = Env::start(SimConfig {
        validity_cap: lifetime,
        ..SimConfig::default()
    })
    .await;
    let tap = CallTap::start(env.sim.addr()).await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    let url = tap.refresh_url();
    env.scgtoken(TARGET, "creds", |s| s.endpoint = url).await;
    let mut chaos = Chaos::new(chaos_seed, seed);
    let started = Instant::now();
    // Only against a hang: progress is asserted by the chain itself.
    let hang_guard = started + Duration::from_secs(300);

    while chaos.chain_refreshes(&env) < CHAIN_REFRESHES {
        assert!(
            Instant::now() < hang_guard,
            "only {} chain refreshes after {} kill cycles",
            chaos.chain_refreshes(&env),
            chaos.cycle
        );
        chaos.cycle += 1;
        let cycle = chaos.cycle;
        let target_before = env.target_token(TARGET).await;
        let position_before = chaos.position(&target_before);
        let requests_before = tap.requests();
        let mode = chaos.next_kill();
        let delay = Duration::from_millis(chaos.rng.below(lifetime.as_millis() as u64));
        if mode == KillAt::MidCall {
            // Shorter than the life a token has left when it is due (a third of 3 s): a
            // longer hold would let the presented token expire in the simulator.
            env.sim
                .set_fault(Fault::Delay(Duration::from_millis(400)), Some(1));
        }
        let spawned = SystemTime::now();
        let mut op = env.operator(&[]);
        match mode {
            KillAt::Random => {
                tokio::time::sleep(delay).await;
                let target = env.target_token(TARGET).await;
                let position = chaos.position(&target);
                if env
                    .sim
                    .remaining_validity(&position)
                    .is_some_and(|left| left < guard)
                {
                    chaos.guarded += 1;
                    wait_target_change(&env, TARGET, target.as_deref(), PATIENCE)
                        .await
                        .unwrap_or_else(|| {
                            panic!("cycle {cycle}: a token near its expiry was not refreshed")
                        });
                }
            }
            KillAt::AfterStore => {
                wait_target_change(&env, TARGET, target_before.as_deref(), PATIENCE)
                    .await
                    .unwrap_or_else(|| panic!("cycle {cycle}: no refresh was stored"));
            }
            KillAt::AfterReceipt | KillAt::MidCall => {
                assert!(
                    tap.wait_requests(requests_before + 1, PATIENCE).await,
                    "cycle {cycle}: no refresh call was made"
                );
            }
        }
        op.kill().await;
        settle(&env, &tap, TARGET).await;
        chaos.stats.entry(mode).or_default().0 += 1;

        let target = env.target_token(TARGET).await;
        if chaos.check_kill(&env, mode, spawned, &position_before, &target, &op) {
            chaos.reseed(&env, target).await;
        }
    }

    // A last operator, left running: the chain goes on and the target holds a valid token.
    let _op = env.operator(&[]);
    let before = env.target_token(TARGET).await;
    let fresh = wait_target_change(&env, TARGET, before.as_deref(), PATIENCE)
        .await
        .expect("the operator refreshes after the chaos");
    env.eventually("Ready=True after the chaos", || async {
        env.ready(TARGET).await.filter(|(s, _)| s == "True")
    })
    .await;
    let target = env.target_token(TARGET).await.expect("a target Secret");
    assert!(
        env.sim.is_valid(&target),
        "the target holds a dead token after the chaos"
    );
    assert_eq!(Some(&target), env.sim.current_token(CONSUMER_KEY).as_ref());
    // The first token stored after the chaos is on the chain the target holds now: the
    // target holds it, or a token the chain issued after it.
    assert!(
        descendants(&env.sim.refresh_log(), &fresh).contains(&target),
        "the target holds {}, which the chain did not issue after {}, the first token \
         stored after the chaos",
        short(&target),
        short(&fresh)
    );
    let revoked: Vec<_> = env
        .sim
        .revoked_uses()
        .into_iter()
        .filter(|u| u.reason == DeadReason::Revoked)
        .collect();
    assert!(
        revoked.is_empty(),
        "revoked tokens were presented: {revoked:?}"
    );
    assert_no_token_refreshed_twice(&env);

    chaos.report(&env, chaos_seed, started);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_refresh_call_loses_its_token_until_a_new_seed() {
    const TARGET: &str = "midcall";
    // 6 s tokens are refreshed with 2 s left: room for a 1.5 s hold.
    let env = Env::start(SimConfig {
        validity_cap: Duration::from_secs(6),
        ..SimConfig::default()
    })
    .await;
    let tap = CallTap::start(env.sim.addr()).await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    let url = tap.refresh_url();
    env.scgtoken(TARGET, "creds", |s| s.endpoint = url).await;
    let mut op = env.operator(&[]);
    let stored = wait_target_change(&env, TARGET, None, PATIENCE)
        .await
        .expect("a first token");
    assert_ne!(stored, seed);

    // The simulator holds the next call; the operator dies while waiting for the answer.
    env.sim
        .set_fault(Fault::Delay(Duration::from_millis(1500)), Some(1));
    let before = tap.requests();
    assert!(tap.wait_requests(before + 1, PATIENCE).await, "no call");
    assert_eq!(
        env.sim.refresh_calls(),
        before,
        "the held call was answered before the kill"
    );
    op.kill().await;

    // The simulator completes the call anyway: the chain moved to a token nobody has.
    assert!(env.sim.wait_refresh_calls(before + 1, PATIENCE).await);
    let call = env.sim.refresh_log().last().cloned().expect("a call");
    let orphan = call
        .issued()
        .expect("the held call refreshed the token")
        .to_string();
    assert_eq!(call.old_token.as_deref(), Some(stored.as_str()));
    assert_eq!(
        env.target_token(TARGET).await.as_deref(),
        Some(stored.as_str()),
        "the target keeps the token the call replaced"
    );
    assert!(
        !env.sim.is_valid(&stored),
        "the stored token is now revoked"
    );
    assert!(env.sim.is_valid(&orphan));

    // A restarted operator has only the revoked token: it is rejected, and users are told
    // that the chain broke and how to reseed.
    let _op = env.operator(&[]);
    env.eventually("Ready=False with reason ChainBroken", || async {
        env.ready(TARGET)
            .await
            .filter(|(s, r)| s == "False" && r == "ChainBroken")
    })
    .await;
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    env.eventually("a Warning Event ChainBroken", || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("ChainBroken")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(TARGET)
            })
    })
    .await;
    let uses = env.sim.revoked_uses();
    assert!(
        !uses.is_empty()
            && uses.iter().all(|u| u.token == stored
                && u.endpoint == Endpoint::Refresh
                && u.reason == DeadReason::Revoked),
        "only the stored, revoked token may have been presented: {uses:?}"
    );
    let presentations = uses.len();

    // Recovery as documented: a new seed from the SDC UI starts a new chain.
    let seed2 = env.sim.regenerate(CONSUMER_KEY);
    env.put_credentials("creds", CONSUMER_KEY, &seed2).await;
    let fresh = wait_target_change(&env, TARGET, Some(&stored), PATIENCE)
        .await
        .expect("a new chain from the new seed");
    assert!(env.sim.is_valid(&fresh));
    env.eventually("Ready=True after the new seed", || async {
        env.ready(TARGET).await.filter(|(s, _)| s == "True")
    })
    .await;
    let uses = env.sim.revoked_uses();
    assert!(
        uses.iter().all(|u| u.token == stored),
        "a dead token other than the one stored before the kill was presented: {uses:?}"
    );
    eprintln!(
        "mid-call kill: the stored token was presented {presentations} time(s) after the \
         restart and rejected; a new seed recovered the chain"
    );
    env.finish().await;
}

// ---------------------------------------------------------------------------------------
// 2. Leader election
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_refreshes_and_the_standby_takes_over() {
    const TARGET: &str = "ha";
    const LEASE_SECS: u64 = 3;
    // The token must outlive a takeover (Lease duration, up to 1 s of back-off, start).
    let lifetime = Duration::from_secs(12);
    let env = Env::start(SimConfig {
        validity_cap: lifetime,
        ..SimConfig::default()
    })
    .await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken(TARGET, "creds", |_| {}).await;
    let lease_flag = format!("--lease-duration-seconds={LEASE_SECS}");
    let mut a = env.operator(&["--leader-elect=true", &lease_flag, "--identity=a"]);
    let mut b = env.operator(&["--leader-elect=true", &lease_flag, "--identity=b"]);
    let http = http();
    let (addr_a, addr_b) = (admin_addr(&a).await, admin_addr(&b).await);
    let holder = env
        .eventually("a holder of the Lease", || lease_holder(&env))
        .await;
    let (leader, standby, leader_addr, standby_addr) = match holder.as_str() {
        "a" => ("a", "b", addr_a, addr_b),
        "b" => ("b", "a", addr_b, addr_a),
        other => panic!("unexpected Lease holder {other:?}"),
    };

    // The leader refreshes the seed, then rotates once more.
    let Some(first) = wait_target_change(&env, TARGET, Some(&seed), PATIENCE).await else {
        panic!(
            "the leader never refreshed (lease {LEASE_SECS}s); {} passes said: {:?}",
            log_lines(&env, "not refreshing").len(),
            log_lines(&env, "not refreshing").first()
        );
    };
    env.eventually(
        "scgtoken_leader 1 on the leader, 0 on the standby",
        || async {
            let l = parse_metrics(&metrics_text(&http, leader_addr).await?);
            let s = parse_metrics(&metrics_text(&http, standby_addr).await?);
            (metric(&l, "scgtoken_leader", &[]) == Some(1.0)
                && metric(&s, "scgtoken_leader", &[]) == Some(0.0))
            .then_some(())
        },
    )
    .await;
    // Both replicas are ready; they synced before the first refresh. Asserted at the end,
    // so that the takeover is tested too.
    let mut not_ready = Vec::new();
    for (name, addr, op) in [("a", addr_a, &a), ("b", addr_b, &b)] {
        if !readyz_ok(&http, addr, Duration::from_secs(3)).await {
            not_ready.push(format!("replica {name}: {}", not_ready_message(op)));
        }
    }
    let second = wait_target_change(&env, TARGET, Some(&first), PATIENCE)
        .await
        .expect("a second refresh by the leader");

    // Exactly one replica refreshed.
    let ns = env.namespace.clone();
    let labels = [("namespace", ns.as_str()), ("name", TARGET)];
    let successes = env.sim.successful_refreshes();
    let l = parse_metrics(&metrics_text(&http, leader_addr).await.expect("metrics"));
    let s = parse_metrics(&metrics_text(&http, standby_addr).await.expect("metrics"));
    let success = [labels[0], labels[1], ("result", "success")];
    assert_eq!(
        metric(&l, "scgtoken_refreshes_total", &success).map(|v| v as usize),
        Some(successes),
        "the leader made every refresh"
    );
    assert!(
        !s.iter()
            .any(|x| x.name == "scgtoken_refreshes_total" && x.value > 0.0),
        "the standby refreshed"
    );
    assert_no_token_refreshed_twice(&env);

    // Kill the leader right after it stored a token; the standby takes over.
    let calls_at_kill = env.sim.refresh_calls();
    let killed = Instant::now();
    match leader {
        "a" => a.kill().await,
        _ => b.kill().await,
    }
    env.eventually("the Lease to name the standby", || async {
        lease_holder(&env).await.filter(|h| h == standby)
    })
    .await;
    let takeover = killed.elapsed();
    let third = wait_target_change(&env, TARGET, Some(&second), PATIENCE)
        .await
        .expect("a refresh by the new leader");
    let resumed = killed.elapsed();
    let log = env.sim.refresh_log();
    let call = &log[calls_at_kill];
    assert_eq!(
        call.old_token.as_deref(),
        Some(second.as_str()),
        "the new leader continued from the token the old one stored"
    );
    assert!(
        matches!(call.outcome, Outcome::Refreshed { .. }),
        "{call:?}"
    );
    assert!(env.sim.is_valid(&third), "the target holds a valid token");
    env.eventually(
        "scgtoken_leader 1 and a refresh on the new leader",
        || async {
            let m = parse_metrics(&metrics_text(&http, standby_addr).await?);
            (metric(&m, "scgtoken_leader", &[]) == Some(1.0)
                && metric(&m, "scgtoken_refreshes_total", &success).unwrap_or(0.0) >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert_no_token_refreshed_twice(&env);
    assert!(
        env.sim.revoked_uses().is_empty(),
        "{:?}",
        env.sim.revoked_uses()
    );
    eprintln!(
        "leader election (lease {LEASE_SECS}s, tokens {lifetime:?}): leader {leader}; after \
         SIGKILL the Lease named {standby} after {takeover:?}, its first refresh came after \
         {resumed:?}"
    );
    assert!(not_ready.is_empty(), "{not_ready:#?}");
    env.finish().await;
}
