//! End to end: the happy path of the real binary, over several rotations.

mod common {
    pub mod harness;
}

use std::time::Duration;

use common::harness::{CONSUMER_KEY, Env, PATIENCE};
use testkit::scgsim::SimConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_a_valid_token_in_the_target_across_rotations() {
    let env = Env::start(SimConfig {
        validity_cap: Duration::from_secs(4),
        // Between the API revoking the old token and the Secret write landing there is
        // an unavoidable window of milliseconds; a second of grace keeps sampling honest
        // without hiding a token that stays dead.
        grace: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await;
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    env.scgtoken("messaging", "creds", |_| {}).await;
    let _op = env.operator(&[]);

    let first = env
        .eventually("the first token", || async {
            env.target_token("messaging").await.filter(|t| *t != seed)
        })
        .await;
    assert!(env.sim.is_valid(&first));
    assert_ne!(
        env.sim.current_token(CONSUMER_KEY).as_deref(),
        Some(seed.as_str()),
        "the seed was used and replaced"
    );

    // Sample the target through at least 5 rotations: every token seen must be valid
    // at the moment it is read.
    let mut seen = vec![first];
    let deadline = std::time::Instant::now() + PATIENCE;
    while seen.len() <= 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} tokens seen",
            seen.len()
        );
        if let Some(token) = env.target_token("messaging").await {
            assert!(env.sim.is_valid(&token), "the target held a dead token");
            if seen.last() != Some(&token) {
                seen.push(token);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        env.sim.revoked_uses().is_empty(),
        "{:?}",
        env.sim.revoked_uses()
    );

    // No refresh earlier than the margin requires: 4 s tokens, a third left = after
    // about 2.7 s; never twice within a second.
    let log = env.sim.refresh_log();
    for pair in log.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at).unwrap_or_default();
        assert!(
            gap >= Duration::from_millis(1500),
            "refreshes {gap:?} apart"
        );
    }

    let (status, reason) = env.ready("messaging").await.unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Refreshed"));
    let t = env.tokens().get("messaging").await.unwrap();
    let s = t.status.unwrap();
    assert!(s.expires_at.is_some() && s.next_refresh_at.is_some());
    assert!(s.next_refresh_at.unwrap().0 < s.expires_at.unwrap().0);
    env.finish().await;
}
