//! The token agent end to end: the real binary against the in-memory API server (and,
//! for the proxy, the SCG simulator or a local upstream). The target Secret is written by
//! the test the way the operator writes it.

mod common {
    pub mod agent;
    pub mod harness;
}

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::agent::*;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use testkit::{
    apiserver::ApiServer,
    scgsim::{PROTECTED_PATH, ScgSimulator, SimConfig},
};

const HOUR: Duration = Duration::from_secs(3600);

fn file_args(dir: &Scratch) -> Vec<String> {
    vec![
        format!("--dir={}", dir.0.display()),
        "--formats=token,authorization,env".into(),
        "--expiry-file".into(),
    ]
}

fn read(dir: &Scratch, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.0.join(file)).ok()
}

/// Waits until the token file holds `token`; returns how long that took.
async fn wait_file(dir: &Scratch, token: &str) -> Duration {
    let start = Instant::now();
    loop {
        if read(dir, "token").as_deref() == Some(token) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the token file never showed the new token"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_swaps_atomically_and_reports_the_operators_fingerprint() {
    let api = ApiServer::start().await.expect("API server");
    let client = api.client();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let dir = Scratch::new("file-mode");
    let mut tokens = vec![new_token(0)];
    put_token(&secrets, &tokens[0], HOUR).await;

    let mut agent = Agent::spawn(api.kubeconfig_path(), "client-0", &file_args(&dir));
    let admin = agent.addr("admin server").await;
    wait_ready(admin, 200).await;
    assert_eq!(read(&dir, "token").as_deref(), Some(tokens[0].as_str()));
    assert_eq!(
        read(&dir, "authorization").unwrap(),
        format!("Authorization: Bearer {}\n", tokens[0])
    );
    assert_eq!(
        read(&dir, "token.env").unwrap(),
        format!("SCG_ACCESS_TOKEN={}\n", tokens[0])
    );
    assert!(
        read(&dir, "expires-at")
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok()
    );
    let link = std::fs::read_link(dir.0.join("token")).unwrap();
    assert_eq!(link, std::path::Path::new("..data/token"));

    // A reader that never stops while the token changes ten times.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(tokens.clone()));
    let reader = {
        let (path, stop, seen) = (dir.0.join("token"), stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let (mut reads, mut misses) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match std::fs::read_to_string(&path) {
                    Ok(got) => {
                        let known = seen.lock().unwrap().contains(&got);
                        assert!(known, "a reader saw a partial or unknown token file");
                        reads += 1;
                    }
                    Err(_) => misses += 1,
                }
            }
            (reads, misses)
        })
    };
    let mut delays = Vec::new();
    for n in 1..=10 {
        let token = new_token(n);
        seen.lock().unwrap().push(token.clone());
        tokens.push(token.clone());
        put_token(&secrets, &token, HOUR).await;
        delays.push(wait_file(&dir, &token).await);
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, misses) = reader.join().expect("the reader saw only whole tokens");
    assert!(reads > 0);
    assert_eq!(misses, 0, "the token file was missing for a reader");
    delays.sort();
    eprintln!(
        "FIGURE agent file mode: Secret write to file visible over {} updates: p50 {:?}, p99 {:?}",
        delays.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.99)
    );

    // Old timestamped directories are gone (after their short grace).
    let only_current = wait_until(PATIENCE, || async {
        let dirs = std::fs::read_dir(&dir.0)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count();
        dirs == 1
    })
    .await;
    assert!(only_current, "old token directories were left behind");

    // The Lease reports the same fingerprint the operator would.
    let last = tokens.last().unwrap().clone();
    let report = eventually("the report of the last token", || async {
        reports(&client)
            .await
            .into_iter()
            .find(|r| r.fingerprint.as_deref() == Some(fingerprint(&last).as_str()))
    })
    .await;
    assert_eq!(report.pod, "client-0");
    assert!(report.since.is_some());

    let (status, metrics) = get(admin, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "scgtoken_agent_token_info{{fingerprint=\"{}\"}} 1",
            fingerprint(&last)
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("scgtoken_agent_updates_total 11"),
        "{metrics}"
    );
    assert!(metrics.contains("scgtoken_agent_ready 1"), "{metrics}");
    assert_eq!(
        metrics.matches("scgtoken_agent_token_info{").count(),
        1,
        "one fingerprint at a time: {metrics}"
    );

    // A clean stop releases the Lease, so the operator drops the pod at once.
    let status = agent
        .terminate(PATIENCE)
        .await
        .expect("the agent stops on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        reports(&client).await.is_empty(),
        "the Lease was not released"
    );
    assert_no_leak("agent logs", &agent.logs(), &tokens);
    assert_no_leak("agent metrics", &metrics, &tokens);
}

/// Asks the simulator for a new token in place of `old` (which it revokes at once).
async fn refresh(sim: &ScgSimulator, key: &str, old: &str) -> String {
    let resp = http()
        .get(sim.refresh_url())
        .query(&[
            ("consumerkey", key),
            ("consumersecret", CONSUMER_SECRET),
            ("oldtoken", old),
            ("validity", "3600"),
        ])
        .send()
        .await
        .expect("refresh call");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("refresh answer");
    body["accessToken"].as_str().expect("a token").to_string()
}

const CONSUMER_SECRET: &str = "agent-e2e-consumer-secret";

fn proxy_args(upstream: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("--upstream={upstream}"),
        "--allow-insecure-upstream".into(),
        "--listen=127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn counter(metrics: &str, name: &str, result: &str) -> u64 {
    let prefix = format!("{name}{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_adds_the_bearer_header_and_retries_a_401_once_with_a_newer_token() {
    let api = ApiServer::start().await.expect("API server");
    let secrets: Api<Secret> = Api::namespaced(api.client(), NAMESPACE);
    let sim = ScgSimulator::start(SimConfig::default())
        .await
        .expect("simulator");
    let seed = sim.add_app("key", CONSUMER_SECRET);
    let a = refresh(&sim, "key", &seed).await;
    put_token(&secrets, &a, HOUR).await;

    // A generous wait: the new token is written 300 ms after the revocation.
    let args = proxy_args(&sim.base_url(), &["--retry-wait-ms=20000"]);
    let agent = Agent::spawn(api.kubeconfig_path(), "client-0", &args);
    let (admin, proxy) = (agent.addr("admin server").await, agent.addr("proxy").await);
    wait_ready(admin, 200).await;
    let call = || {
        http()
            .post(format!(
                "http://{proxy}{PROTECTED_PATH}?note=query-not-for-logs"
            ))
            // Replaced by the agent's.
            .header("authorization", "Bearer client-supplied")
            .body(r#"{"to":"+15550100"}"#)
            .send()
    };
    assert_eq!(call().await.expect("call").status(), 200);

    // The API revokes A as it issues B; B reaches the Secret a little later.
    let b = refresh(&sim, "key", &a).await;
    let writer = {
        let (secrets, b) = (secrets.clone(), b.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            put_token(&secrets, &b, HOUR).await;
        })
    };
    let resp = call().await.expect("call");
    assert_eq!(
        resp.status(),
        200,
        "the 401 was not retried with the newer token"
    );
    writer.await.expect("writer");
    let dead: Vec<_> = sim.revoked_uses().into_iter().map(|u| u.token).collect();
    assert_eq!(
        dead,
        std::slice::from_ref(&a),
        "exactly one attempt with the revoked token"
    );

    let (_, metrics) = get(admin, "/metrics").await.expect("metrics");
    assert_eq!(
        counter(&metrics, "scgtoken_agent_proxy_retries_total", "ok"),
        1,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, "scgtoken_agent_proxy_requests_total", "ok"),
        2,
        "{metrics}"
    );
    let logs = agent.logs();
    assert!(
        !logs.contains("query-not-for-logs"),
        "a query string was logged:\n{logs}"
    );
    assert!(
        !logs.contains("client-supplied"),
        "a header was logged:\n{logs}"
    );
    assert!(!logs.contains("+15550100"), "a body was logged:\n{logs}");
    let tokens = vec![seed, a, b];
    assert_no_leak("agent logs", &logs, &tokens);
    assert_no_leak("agent metrics", &metrics, &tokens);
}

/// What the local upstream saw of one request.
#[derive(Debug, Clone, Default)]
struct Seen {
    path: String,
    query: Option<String>,
    authorization: Option<String>,
    custom: Option<String>,
    hop_by_hop: bool,
    body_len: usize,
}

/// An upstream on 127.0.0.1 that records requests: `/echo` answers 200, `/redirect` a
/// 302 to `/followed`, `/deny` a 401, `/big` a 100 KiB body.
async fn upstream() -> (String, Arc<std::sync::Mutex<Vec<Seen>>>) {
    use axum::{
        body::Bytes,
        extract::State,
        http::{HeaderMap, StatusCode, Uri},
        response::IntoResponse,
        routing::any,
    };
    type Log = Arc<std::sync::Mutex<Vec<Seen>>>;
    async fn record(
        State(log): State<Log>,
        uri: Uri,
        h: HeaderMap,
        body: Bytes,
    ) -> impl IntoResponse {
        let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        log.lock().unwrap().push(Seen {
            path: uri.path().into(),
            query: uri.query().map(str::to_string),
            authorization: header("authorization"),
            custom: header("x-custom"),
            hop_by_hop: h.contains_key("x-dropped") || h.contains_key("keep-alive"),
            body_len: body.len(),
        });
        match uri.path().trim_start_matches("/api") {
            "/redirect" => (StatusCode::FOUND, [("location", "/followed")], Vec::new()),
            "/deny" => (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Bearer")],
                Vec::new(),
            ),
            "/big" => (StatusCode::OK, [("x-big", "1")], vec![b'b'; 100 * 1024]),
            _ => (StatusCode::OK, [("x-echo", "1")], b"echo".to_vec()),
        }
    }
    let log: Log = Arc::default();
    let app = axum::Router::new()
        .fallback(any(record))
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_only_end_to_end_headers_and_bounds_what_it_passes() {
    let api = ApiServer::start().await.expect("API server");
    let secrets: Api<Secret> = Api::namespaced(api.client(), NAMESPACE);
    let token = new_token(0);
    put_token(&secrets, &token, HOUR).await;
    let (base, seen) = upstream().await;
    let args = proxy_args(
        &format!("{base}/api"),
        &[
            "--retry-wait-ms=200",
            "--retry-buffer-bytes=1024",
            "--max-body-bytes=65536",
        ],
    );
    let agent = Agent::spawn(api.kubeconfig_path(), "client-0", &args);
    let (admin, proxy) = (agent.addr("admin server").await, agent.addr("proxy").await);
    wait_ready(admin, 200).await;
    let url = |p: &str| format!("http://{proxy}{p}");
    let last = || seen.lock().unwrap().last().cloned().unwrap_or_default();
    let hits = || seen.lock().unwrap().len();

    // The token replaces the client's header; end-to-end headers and the query pass;
    // hop-by-hop ones (and those named in Connection) do not.
    let resp = http()
        .get(url("/echo?x=1"))
        .header("authorization", "Bearer client-supplied")
        .header("x-custom", "kept")
        .header("x-dropped", "no")
        .header("connection", "x-dropped")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echo"], "1");
    let s = last();
    assert_eq!(s.path, "/api/echo");
    assert_eq!(s.query.as_deref(), Some("x=1"));
    assert_eq!(s.authorization, Some(format!("Bearer {token}")));
    assert_eq!(s.custom.as_deref(), Some("kept"));
    assert!(!s.hop_by_hop);

    // Redirects are passed on, never followed.
    let no_follow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_follow.get(url("/redirect")).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "/followed");
    assert!(
        !seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.path.ends_with("/followed"))
    );

    // A 401 without a newer token within the bound is passed on after one attempt.
    let before = hits();
    let resp = http()
        .post(url("/deny"))
        .body("small")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert_eq!(hits(), before + 1);
    // A body over the retry buffer streams through whole and is not retried.
    let resp = http()
        .post(url("/deny"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(last().body_len, 4096);
    assert_eq!(hits(), before + 2);
    // So does a chunked body of unknown length.
    let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b'c'; 1000])));
    let body = reqwest::Body::wrap(http_body_util::StreamBody::new(futures::StreamExt::map(
        chunks,
        |c| c.map(|c| hyper::body::Frame::data(bytes::Bytes::from(c))),
    )));
    let resp = http().post(url("/echo")).body(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(last().body_len, 10_000);

    // Bodies over the limit: refused before anything goes upstream, or cut off.
    let before = hits();
    let resp = http()
        .post(url("/echo"))
        .body(vec![b'x'; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(hits(), before);
    let big = http().get(url("/big")).send().await.unwrap();
    assert_eq!(big.status(), 502, "a response over the limit was passed on");

    let (_, metrics) = get(admin, "/metrics").await.expect("metrics");
    let retries = "scgtoken_agent_proxy_retries_total";
    assert_eq!(counter(&metrics, retries, "no_newer_token"), 1, "{metrics}");
    assert_eq!(counter(&metrics, retries, "not_replayable"), 1, "{metrics}");
    let requests = "scgtoken_agent_proxy_requests_total";
    assert_eq!(counter(&metrics, requests, "too_large"), 1, "{metrics}");
    assert_eq!(
        counter(&metrics, requests, "response_too_large"),
        1,
        "{metrics}"
    );
    assert_no_leak("agent logs", &agent.logs(), std::slice::from_ref(&token));
    assert_no_leak("agent metrics", &metrics, &[token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_watch_drops_gone_a_recreated_secret_and_restarts() {
    let mut api = ApiServer::start().await.expect("API server");
    let client = api.client();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let (faults, counters) = (api.faults(), api.counters());
    // No BOOKMARK events: one sent between the compaction and the dropped watch below
    // could carry the resourceVersion of a later write to another object (the agent's
    // own report Lease), and the watch would resume from it without a 410.
    faults.set_bookmark_interval(Duration::from_secs(3600));
    let dir = Scratch::new("survives");
    let tokens: Vec<String> = (0..7).map(new_token).collect();
    put_token(&secrets, &tokens[0], HOUR).await;
    let mut agent = Agent::spawn(api.kubeconfig_path(), "client-0", &file_args(&dir));
    let admin = agent.addr("admin server").await;
    wait_ready(admin, 200).await;
    wait_file(&dir, &tokens[0]).await;

    // The watch drops.
    faults.close_watches();
    put_token(&secrets, &tokens[1], HOUR).await;
    wait_file(&dir, &tokens[1]).await;

    // The watch drops and its resourceVersion is gone (410): the agent lists again.
    let lists = counters.get("list", "core/secrets");
    faults.compact_history();
    faults.close_watches();
    put_token(&secrets, &tokens[2], HOUR).await;
    wait_file(&dir, &tokens[2]).await;
    assert!(
        counters.get("list", "core/secrets") > lists,
        "no relist after 410"
    );

    // The Secret is deleted: the last token stays served until a new one arrives.
    secrets
        .delete(TARGET, &Default::default())
        .await
        .expect("delete the Secret");
    agent.wait_log("the Secret was deleted").await;
    assert_eq!(read(&dir, "token").as_deref(), Some(tokens[2].as_str()));
    assert_eq!(get(admin, "/readyz").await.map(|r| r.0), Some(200));
    put_token(&secrets, &tokens[3], HOUR).await;
    wait_file(&dir, &tokens[3]).await;

    // The API server goes away and comes back.
    api.restart().await.expect("restart the API server");
    put_token(&secrets, &tokens[4], HOUR).await;
    wait_file(&dir, &tokens[4]).await;
    assert!(agent.alive(), "the agent died:\n{}", agent.logs());
    let first_logs = agent.logs();

    // The agent itself is killed and restarted: the files stay, and it takes them up.
    let since = eventually("a report", || async {
        reports(&client).await.into_iter().find_map(|r| r.since)
    })
    .await;
    agent.kill().await;
    let mut agent = Agent::spawn(api.kubeconfig_path(), "client-0", &file_args(&dir));
    let admin = agent.addr("admin server").await;
    wait_ready(admin, 200).await;
    agent
        .wait_log("the files already hold the Secret's token")
        .await;
    assert_eq!(read(&dir, "token").as_deref(), Some(tokens[4].as_str()));
    let report = eventually("the restarted agent's report", || async {
        reports(&client)
            .await
            .into_iter()
            .find(|r| r.since.is_some())
    })
    .await;
    assert!(
        report.since <= Some(since + jiff::SignedDuration::from_secs(1)),
        "a restart is not a switch"
    );
    put_token(&secrets, &tokens[5], HOUR).await;
    wait_file(&dir, &tokens[5]).await;
    assert!(agent.alive());
    assert_no_leak("agent logs", &(first_logs + &agent.logs()), &tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_secret_contents_are_refused_with_a_log_line_and_never_crash_the_agent() {
    use k8s_openapi::ByteString;
    let api = ApiServer::start().await.expect("API server");
    let secrets: Api<Secret> = Api::namespaced(api.client(), NAMESPACE);
    let dir = Scratch::new("bad-contents");
    let mut args = file_args(&dir);
    args.push("--max-token-bytes=4096".into());
    let mut agent = Agent::spawn(api.kubeconfig_path(), "client-0", &args);
    let admin = agent.addr("admin server").await;
    agent.wait_log("the Secret does not exist").await;
    assert_eq!(get(admin, "/readyz").await.map(|r| r.0), Some(503));

    let now = jiff::Timestamp::now();
    let later = now + jiff::SignedDuration::from_hours(1);
    let good = new_token(1);
    let set = |value: Option<Vec<u8>>| {
        move |s: &mut Secret| {
            let data = s.data.get_or_insert_with(Default::default);
            data.remove("accessToken");
            if let Some(v) = &value {
                data.insert("accessToken".into(), ByteString(v.clone()));
            }
        }
    };
    let cases: [(Option<Vec<u8>>, &str); 4] = [
        (None, "has no key \"accessToken\""),
        (Some(vec![0xff, 0xfe, b'a']), "is not UTF-8 text"),
        (
            Some(vec![b'a'; 5000]),
            "holds 5000 bytes, more than the 4096 allowed",
        ),
        (
            Some(b"two words".to_vec()),
            "characters a bearer token cannot have",
        ),
    ];
    for (value, log) in cases {
        put_chain(&secrets, &good, now, later, set(value)).await;
        agent.wait_log(log).await;
        assert_eq!(get(admin, "/readyz").await.map(|r| r.0), Some(503));
        assert!(agent.alive(), "the agent died:\n{}", agent.logs());
    }
    // An expired token is never served, also not at start.
    let expired = new_token(0);
    let past = now - jiff::SignedDuration::from_secs(1);
    put_chain(
        &secrets,
        &expired,
        past - jiff::SignedDuration::from_hours(1),
        past,
        |_| {},
    )
    .await;
    agent.wait_log("its token expired at").await;
    assert_eq!(get(admin, "/readyz").await.map(|r| r.0), Some(503));
    assert_eq!(
        read(&dir, "token"),
        None,
        "a refused token reached the files"
    );

    // A good token: served. Bad contents after it: the good token stays served.
    put_token(&secrets, &good, HOUR).await;
    wait_ready(admin, 200).await;
    wait_file(&dir, &good).await;
    put_chain(&secrets, &good, now, later, set(None)).await;
    wait_until(PATIENCE, || async {
        agent.logs().matches("has no key").count() >= 2
    })
    .await;
    assert_eq!(get(admin, "/readyz").await.map(|r| r.0), Some(200));
    assert_eq!(read(&dir, "token").as_deref(), Some(good.as_str()));

    let (_, metrics) = get(admin, "/metrics").await.expect("metrics");
    for reason in [
        "missing_key",
        "not_utf8",
        "too_large",
        "not_a_token",
        "expired",
    ] {
        assert!(
            metrics.contains(&format!(
                "scgtoken_agent_secret_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }
    assert!(agent.alive());
    let logs = agent.logs();
    assert!(!logs.contains("two words"), "a refused value was logged");
    assert_no_leak("agent logs", &logs, &[good.clone(), expired.clone()]);
    assert_no_leak("agent metrics", &metrics, &[good, expired]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_turns_stale_then_current_again_and_a_dead_one_drops_out() {
    use scg_token_operator::consumers::{self, ConditionInputs, CurrentToken};
    let api = ApiServer::start().await.expect("API server");
    let client = api.client();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let (dir_a, dir_b) = (Scratch::new("frozen-a"), Scratch::new("frozen-b"));
    let tokens = [new_token(0), new_token(1)];
    let mut stored = put_token(&secrets, &tokens[0], HOUR).await;
    let mut args_b = file_args(&dir_b);
    args_b.push("--report-lease-seconds=3".into());
    let a = Agent::spawn(api.kubeconfig_path(), "client-a", &file_args(&dir_a));
    let mut b = Agent::spawn(api.kubeconfig_path(), "client-b", &args_b);
    let grace = Duration::from_secs(1);
    // What the operator computes from the Leases.
    let state = |current: usize, stored| {
        let client = client.clone();
        let fp = fingerprint(&tokens[current]);
        async move {
            let token = CurrentToken {
                fingerprint: Some(&fp),
                stored_at: Some(stored),
            };
            let now = jiff::Timestamp::now();
            let reports = reports(&client).await;
            // As a first pass would: nothing remembered of the pods, and none lost (these
            // agents run as processes, with no pod object).
            let behind = consumers::track_behind(&Default::default(), &reports, token);
            let lost = Default::default();
            let status = consumers::aggregate(&reports, token, &behind, &lost, grace, now);
            let inputs = ConditionInputs {
                status: Some(&status),
                unread: None,
                refusal: None,
                stale_after: grace,
                generation: None,
                now,
            };
            let c = consumers::condition(None, inputs).expect("a condition");
            // The reports too: a timeout shows what the aggregate was made from.
            (status, c.status, c.message, reports)
        }
    };
    eventually_seen(
        "both agents current",
        || state(0, stored),
        |s| s.0.summary == "2/2",
    )
    .await;

    a.signal("STOP");
    stored = put_token(&secrets, &tokens[1], HOUR).await;
    let (status, _, message, _) = eventually_seen(
        "the frozen agent stale",
        || state(1, stored),
        |s| s.1 == "False",
    )
    .await;
    assert_eq!(status.stale_pods, ["client-a"]);
    assert_eq!(status.summary, "1/2");
    assert!(message.contains("client-a"), "{message}");

    a.signal("CONT");
    let (status, ..) = eventually_seen(
        "the thawed agent current",
        || state(1, stored),
        |s| s.1 == "True" && s.0.current == 2,
    )
    .await;
    assert!(status.slowest_switch_seconds.is_some());
    assert_eq!(read(&dir_a, "token").as_deref(), Some(tokens[1].as_str()));

    // Killed without a chance to release its Lease: it drops out when the heartbeat ends.
    b.kill().await;
    eventually_seen(
        "the dead agent gone",
        || state(1, stored),
        |s| s.0.summary == "1/1",
    )
    .await;
    assert_no_leak("agent logs", &(a.logs() + &b.logs()), &tokens);
}

/// Resident memory of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Figures, not assertions on time: the proxy's cost per request against a local
/// upstream (the same requests sent directly and through the agent), and the agent's
/// memory after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_proxy_overhead_and_agent_memory() {
    let api = ApiServer::start().await.expect("API server");
    let secrets: Api<Secret> = Api::namespaced(api.client(), NAMESPACE);
    let token = new_token(0);
    put_token(&secrets, &token, HOUR).await;
    let (base, _) = upstream().await;
    let agent = Agent::spawn(api.kubeconfig_path(), "client-0", &proxy_args(&base, &[]));
    let (admin, proxy) = (agent.addr("admin server").await, agent.addr("proxy").await);
    wait_ready(admin, 200).await;
    let client = http();
    let measure = |url: String| {
        let client = client.clone();
        async move {
            let mut times = Vec::new();
            for _ in 0..400 {
                let start = Instant::now();
                let resp = client.post(&url).body("{}").send().await.expect("request");
                assert_eq!(resp.status(), 200);
                resp.bytes().await.expect("body");
                times.push(start.elapsed());
            }
            times.sort();
            times
        }
    };
    // Warm both paths (connections, allocations) before measuring.
    measure(format!("http://{proxy}/echo")).await;
    let direct = measure(format!("{base}/echo")).await;
    let proxied = measure(format!("http://{proxy}/echo")).await;
    let rss = rss_kib(agent.pid());
    eprintln!(
        "FIGURE agent proxy ({} build), {} requests each: direct p50 {:?} p99 {:?}; through the agent p50 {:?} p99 {:?}; overhead p50 {:?}; agent RSS {} KiB",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        direct.len(),
        percentile(&direct, 0.5),
        percentile(&direct, 0.99),
        percentile(&proxied, 0.5),
        percentile(&proxied, 0.99),
        percentile(&proxied, 0.5).saturating_sub(percentile(&direct, 0.5)),
        rss.map_or_else(|| "unknown".into(), |k| k.to_string()),
    );
    assert_no_leak("agent logs", &agent.logs(), &[token]);
}
