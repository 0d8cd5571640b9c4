//! End to end over HTTPS, the way production runs: the real binary against the SCG
//! simulator's TLS mode, trusting its CA only through `--ca-bundle`, and reaching it
//! through an egress proxy given in `HTTPS_PROXY`.
//!
//! Proxy settings and trust roots come from the environment, which is shared by every
//! thread of this test process; so they are set on the operator process only.

mod common {
    pub mod harness;
}

use common::harness::{CONSUMER_KEY, CONSUMER_SECRET, Env};
use k8s_openapi::api::events::v1::Event;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use scg_token_operator::crd::REFRESH_REQUEST_ANNOTATION;
use testkit::{
    connect_proxy::{ConnectProxy, basic_auth},
    scgsim::{REFRESH_PATH, ScgSimulator, SimConfig},
    tls::TempFile,
};

/// Variables that would steer the operator's egress or trust if inherited from the
/// machine running the tests.
const AMBIENT: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "SCG_CA_BUNDLE",
];

const PROXY_USER: &str = "egress-user";
const PROXY_PASSWORD: &str = "planted-proxy-password-8c2d";

fn tls() -> SimConfig {
    SimConfig {
        tls: true,
        ..SimConfig::default()
    }
}

/// The operator's environment: nothing ambient, then `set`.
fn environment<'a>(set: &[(&'a str, &'a str)]) -> Vec<(&'a str, Option<&'a str>)> {
    let mut envs: Vec<_> = AMBIENT.iter().map(|name| (*name, None)).collect();
    envs.extend(set.iter().map(|(name, value)| (*name, Some(*value))));
    envs
}

fn ca_file(sim: &ScgSimulator) -> TempFile {
    TempFile::write("scg-e2e-ca", sim.ca_pem().expect("a TLS simulator")).expect("write CA")
}

/// The Ready condition's (status, reason, message).
async fn ready(env: &Env, name: &str) -> Option<(String, String, String)> {
    let token = env.tokens().get_opt(name).await.ok()??;
    let c = token.ready_condition()?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits for a Ready=True condition and returns the token then in the target.
async fn refreshed(env: &Env, name: &str, seed: &str) -> String {
    env.eventually(&format!("{name} to be refreshed"), || async {
        let (status, _, _) = ready(env, name).await?;
        let token = env.target_token(name).await.filter(|t| t != seed)?;
        (status == "True").then_some(token)
    })
    .await
}

/// Asks for one refresh now, with the refresh-request annotation.
async fn request_refresh(env: &Env, name: &str) {
    let patch = serde_json::json!({
        "metadata": { "annotations": { REFRESH_REQUEST_ANNOTATION: "2026-01-01T00:00:00Z" } }
    });
    env.tokens()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
}

/// Everything a user could read about the tokens: logs, conditions and Events.
async fn everything_shown(env: &Env) -> String {
    let mut shown = env.all_logs();
    for token in env.tokens().list(&Default::default()).await.expect("list") {
        shown.push_str(&serde_json::to_string(&token.status).unwrap_or_default());
    }
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    for event in events.list(&Default::default()).await.expect("list Events") {
        shown.push_str(&event.note.unwrap_or_default());
        shown.push_str(&event.reason.unwrap_or_default());
    }
    shown
}

fn assert_not_shown(shown: &str, secret: &str) {
    assert!(
        !shown.contains(secret),
        "shown: {}",
        shown
            .lines()
            .find(|l| l.contains(secret))
            .unwrap_or_default()
            .replace(secret, "<SECRET>")
    );
}

/// Proxy credentials in every form they could leak in: the password alone, as
/// `user:password`, and as the `Proxy-Authorization` value.
fn assert_proxy_credentials_not_shown(shown: &str, password: &str) {
    let pair = format!("{PROXY_USER}:{password}");
    let basic = basic_auth(PROXY_USER, password);
    // The base64 part alone, in case the header is shown without its scheme.
    let encoded = basic.trim_start_matches("Basic ");
    for secret in [password, pair.as_str(), encoded] {
        assert_not_shown(shown, secret);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_bundle_is_trusted_in_addition_to_the_platform_roots() {
    let env = Env::start(tls()).await;
    // A second endpoint whose CA stands in for the platform's roots (SSL_CERT_FILE).
    let platform = ScgSimulator::start(tls()).await.expect("second simulator");
    let (private_ca, platform_ca) = (ca_file(&env.sim), ca_file(&platform));
    let platform_ca_path = platform_ca.path().display().to_string();

    let seed = env.credentials("creds-private", CONSUMER_KEY).await;
    let platform_seed = platform.add_app("platform-key", CONSUMER_SECRET);
    env.put_credentials("creds-platform", "platform-key", &platform_seed)
        .await;
    env.scgtoken("private", "creds-private", |_| {}).await;
    let platform_url = platform.refresh_url();
    env.scgtoken("platform", "creds-platform", |s| s.endpoint = platform_url)
        .await;

    // Without the bundle: the platform-trusted endpoint works, the private one fails
    // with a condition that names TLS, and no request reaches it.
    let platform_env = environment(&[("SSL_CERT_FILE", &platform_ca_path)]);
    let mut op = env.operator_with_env(&[], &platform_env);
    let first_platform = refreshed(&env, "platform", &platform_seed).await;
    let message = env
        .eventually("the private endpoint to be Unavailable", || async {
            let (status, reason, message) = ready(&env, "private").await?;
            (status == "False" && reason == "Unavailable").then_some(message)
        })
        .await;
    // Status names the class and the fix; the log says which check failed.
    assert!(
        message.contains("TLS handshake failed") && message.contains("--ca-bundle"),
        "{message}"
    );
    assert!(
        env.all_logs().contains("certificate not trusted"),
        "the log does not say why the handshake failed"
    );
    assert_eq!(env.sim.refresh_calls(), 0, "a request was sent over TLS");
    assert_eq!(
        env.target_token("private").await,
        None,
        "a target was written"
    );
    op.terminate(common::harness::PATIENCE)
        .await
        .expect("operator exit");

    // With the bundle, both: the bundle was added, the platform roots kept.
    let private_ca_path = private_ca.path().display().to_string();
    let _op = env.operator_with_env(&["--ca-bundle", &private_ca_path], &platform_env);
    let token = refreshed(&env, "private", &seed).await;
    assert!(env.sim.is_valid(&token));
    request_refresh(&env, "platform").await;
    let platform_token = env
        .eventually("the platform endpoint's next token", || async {
            env.target_token("platform")
                .await
                .filter(|t| *t != first_platform && platform.is_valid(t))
        })
        .await;
    assert_ne!(platform_token, platform_seed);

    let shown = everything_shown(&env).await;
    assert!(!shown.contains("panicked"), "the operator panicked");
    for secret in platform.issued_tokens() {
        assert_not_shown(&shown, &secret);
    }
    env.finish().await;
}

/// A TLS simulator with one ScgToken (`messaging`) pointing at `endpoint` (default: the
/// simulator's own URL), the CA file for `--ca-bundle`, and the seed token.
async fn https_setup(endpoint: impl FnOnce(&ScgSimulator) -> String) -> (Env, TempFile, String) {
    let env = Env::start(tls()).await;
    let ca = ca_file(&env.sim);
    let seed = env.credentials("creds", CONSUMER_KEY).await;
    let url = endpoint(&env.sim);
    env.scgtoken("messaging", "creds", |s| s.endpoint = url)
        .await;
    (env, ca, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_go_through_the_https_proxy_with_its_credentials() {
    let (env, ca, seed) = https_setup(ScgSimulator::refresh_url).await;
    let proxy = ConnectProxy::start(Some((PROXY_USER, PROXY_PASSWORD)))
        .await
        .expect("proxy");
    let proxy_url = proxy.url_with_credentials(PROXY_USER, PROXY_PASSWORD);
    let ca_path = ca.path().display().to_string();
    let envs = environment(&[("HTTPS_PROXY", &proxy_url)]);
    let _op = env.operator_with_env(&["--ca-bundle", &ca_path], &envs);

    let token = refreshed(&env, "messaging", &seed).await;
    assert!(env.sim.is_valid(&token));
    // A tunnel is recorded before the client gets its answer, so the count is final
    // for the refresh just seen.
    let tunnels = proxy.tunnels_to_port(env.sim.addr().port());
    assert!(
        tunnels >= 1,
        "no tunnel to the SCG API: {:?}",
        proxy.tunnels()
    );
    assert_eq!(proxy.refusals(), [], "the proxy refused a request");

    let shown = everything_shown(&env).await;
    assert_proxy_credentials_not_shown(&shown, PROXY_PASSWORD);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_covering_the_host_bypasses_the_proxy() {
    let (env, ca, seed) = https_setup(ScgSimulator::refresh_url).await;
    let proxy = ConnectProxy::start(None).await.expect("proxy");
    let proxy_url = proxy.url();
    let ca_path = ca.path().display().to_string();
    let envs = environment(&[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "127.0.0.1")]);
    let _op = env.operator_with_env(&["--ca-bundle", &ca_path], &envs);

    let token = refreshed(&env, "messaging", &seed).await;
    assert!(env.sim.is_valid(&token));
    assert_eq!(
        proxy.tunnels_to_port(env.sim.addr().port()),
        0,
        "the refresh went through the proxy: {:?}",
        proxy.tunnels()
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_proxy_credentials_are_named_and_never_shown() {
    // The SCG API by name (localhost), the Kubernetes API by address (127.0.0.1), and
    // NO_PROXY=127.0.0.1: only the refresh goes to the proxy.
    let (env, ca, _) =
        https_setup(|sim| format!("https://localhost:{}{REFRESH_PATH}", sim.addr().port())).await;
    let proxy = ConnectProxy::start(Some((PROXY_USER, PROXY_PASSWORD)))
        .await
        .expect("proxy");
    let wrong = "planted-wrong-password-41f7";
    let proxy_url = proxy.url_with_credentials(PROXY_USER, wrong);
    let ca_path = ca.path().display().to_string();
    let envs = environment(&[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "127.0.0.1")]);
    let _op = env.operator_with_env(&["--ca-bundle", &ca_path], &envs);

    let message = env
        .eventually("the token to be Unavailable", || async {
            let (status, reason, message) = ready(&env, "messaging").await?;
            (status == "False" && reason == "Unavailable").then_some(message)
        })
        .await;
    assert!(
        message.contains(
            "the egress proxy did not open a tunnel: proxy authorization required \
             (check the user and password in HTTPS_PROXY)"
        ),
        "{message}"
    );
    let refusals = proxy.refusals();
    assert!(!refusals.is_empty(), "the proxy saw no request");
    assert!(refusals.iter().all(|r| r.status == 407), "{refusals:?}");
    assert_eq!(env.sim.refresh_calls(), 0);
    assert_eq!(
        env.target_token("messaging").await,
        None,
        "a target was written"
    );

    let shown = everything_shown(&env).await;
    assert!(!shown.contains("panicked"), "the operator panicked");
    assert_proxy_credentials_not_shown(&shown, wrong);
    env.finish().await;
}

/// Runs the operator until it exits by itself (bounded); returns success and stderr.
async fn run_to_exit(env: &Env, args: &[&str], set: &[(&str, &str)]) -> (bool, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_scg-token-operator"));
    for (name, value) in environment(set) {
        match value {
            Some(v) => command.env(name, v),
            None => command.env_remove(name),
        };
    }
    let run = command
        .args(["run", "--admin-addr=127.0.0.1:0", "--leader-elect=false"])
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(common::harness::PATIENCE, run)
        .await
        .expect("the operator kept running")
        .expect("run the operator");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), stderr)
}

/// A CA bundle that cannot be used stops the operator at start, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ca_bundle_stops_the_operator_at_start() {
    let env = Env::start(tls()).await;
    let not_pem = TempFile::write("scg-e2e-bad-ca", "not a certificate\n").expect("write");
    let missing = format!("{}.missing", not_pem.path().display());
    for (path, why) in [
        (not_pem.path().display().to_string(), "holds no certificate"),
        (missing, "cannot be read"),
    ] {
        let (ok, stderr) = run_to_exit(&env, &["--ca-bundle", &path], &[]).await;
        assert!(!ok, "{stderr}");
        assert!(stderr.contains(&format!("CA bundle {path}")), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
    }
    env.close().await;
}

/// Run from a kubeconfig, the Kubernetes client takes HTTPS_PROXY too; a scheme it
/// cannot use stops the operator without quoting the proxy URL and its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_proxy_is_refused_without_showing_its_credentials() {
    let env = Env::start(tls()).await;
    let proxy = format!("socks5://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:1");
    let (ok, stderr) = run_to_exit(&env, &[], &[("HTTPS_PROXY", &proxy)]).await;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("does not support"), "{stderr}");
    assert_proxy_credentials_not_shown(&stderr, PROXY_PASSWORD);
    env.close().await;
}
