//! The committed CRD (crds/scgtoken.yaml) against a real kube-apiserver: the server
//! compiles and cost-checks its CEL rules when the CRD is applied, and each rule must
//! refuse a bad ScgToken at admission with its own message.
//!
//! Needs a real API server, so it is ignored by a plain `cargo test`. It runs when the
//! tests are built with `SCG_E2E_KUBECONFIG` set (`cfg(real_cluster)`, see build.rs), as
//! under testenv/run:
//!
//! ```text
//! testenv/run -- cargo test --test crd_admission
//! ```
//!
//! (or with `SCG_E2E_KUBECONFIG` pointing at any cluster where you may install CRDs).
//! Objects are only created with server-side dry-run: nothing but the CRD is left behind.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use scg_token_operator::crd::ScgToken;
use serde_json::{Value, json};

const IGNORE_REASON: &str =
    "needs a real API server: testenv/run -- cargo test --test crd_admission";
const CRD_NAME: &str = "scgtokens.scgtoken.io";
/// Upper bound of any wait; generous for a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// One bad spec per CEL rule of crds/scgtoken.yaml, and the fragment of that rule's
/// message the refusal must carry. Every spec but the malformed durations passes the
/// OpenAPI schema (types, patterns), so only the CEL rule can refuse it; a malformed
/// duration also fails the schema's pattern, and the refusal must still carry the rule's
/// own message, not a CEL type conversion error.
const BAD_SPECS: &[(&str, &str, &str)] = &[
    (
        "endpoint not http(s)",
        r#"{"endpoint": "ftp://api.example.invalid/apptoken-refresh"}"#,
        "endpoint must be an http(s) URL",
    ),
    (
        "timeout below 1s",
        r#"{"timeout": "0s"}"#,
        "timeout must be between 1s and 2m",
    ),
    (
        "timeout above 2m",
        r#"{"timeout": "2m1s"}"#,
        "timeout must be between 1s and 2m",
    ),
    (
        "validity below 30s",
        r#"{"validity": "29s"}"#,
        "validity must be between 30s and 8760h",
    ),
    (
        "validity above 8760h",
        r#"{"validity": "8760h1s"}"#,
        "validity must be between 30s and 8760h",
    ),
    (
        "both refresh margins",
        r#"{"refreshBefore": "10m", "refreshBeforePercentage": 25}"#,
        "set refreshBefore or refreshBeforePercentage, not both",
    ),
    (
        "refreshBefore equal to validity",
        r#"{"validity": "1h", "refreshBefore": "60m"}"#,
        "refreshBefore must be longer than 0s and shorter than validity",
    ),
    (
        "refreshBefore zero",
        r#"{"refreshBefore": "0s"}"#,
        "refreshBefore must be longer than 0s and shorter than validity",
    ),
    (
        "endpoint scheme in upper case",
        r#"{"endpoint": "HTTPS://api.example.invalid/apptoken-refresh"}"#,
        "endpoint must be an http(s) URL",
    ),
    (
        "refreshBefore longer than the default validity",
        r#"{"refreshBefore": "25h"}"#,
        "refreshBefore must be longer than 0s and shorter than validity",
    ),
    (
        "staleAfter below 1s",
        r#"{"consumers": {"agents": true, "staleAfter": "0s"}}"#,
        "staleAfter must be between 1s and 10m",
    ),
    (
        "staleAfter above 10m",
        r#"{"consumers": {"agents": true, "staleAfter": "10m1s"}}"#,
        "staleAfter must be between 1s and 10m",
    ),
    (
        "podSelector matching every pod",
        r#"{"consumers": {"podSelector": {}}}"#,
        "podSelector must not be empty: it would match every pod in the namespace",
    ),
    (
        "validity in days",
        r#"{"validity": "1d"}"#,
        "validity is not a duration such as 90s, 10m or 12h",
    ),
    (
        "validity in days with a refreshBefore",
        r#"{"validity": "1d", "refreshBefore": "1h"}"#,
        "validity is not a duration such as 90s, 10m or 12h",
    ),
    (
        "validity of more hours than a duration holds",
        r#"{"validity": "9999999h"}"#,
        "validity is not a duration such as 90s, 10m or 12h",
    ),
    (
        "timeout without a unit",
        r#"{"timeout": "10"}"#,
        "timeout is not a duration such as 90s, 10m or 12h",
    ),
    (
        "refreshBefore in words",
        r#"{"refreshBefore": "soon"}"#,
        "refreshBefore is not a duration such as 90s, 10m or 12h",
    ),
    (
        "staleAfter in fractions",
        r#"{"consumers": {"agents": true, "staleAfter": "1.5s"}}"#,
        "staleAfter is not a duration such as 90s, 10m or 12h",
    ),
    (
        "target name in upper case with an underscore",
        r#"{"target": {"name": "Messaging_Token"}}"#,
        "target name is not a valid Secret name: at most 253 lowercase letters, digits, '-' and '.', each part between dots starting and ending with a letter or digit",
    ),
    (
        "target name with an empty part",
        r#"{"target": {"name": "messaging..token"}}"#,
        "target name is not a valid Secret name: at most 253 lowercase letters, digits, '-' and '.', each part between dots starting and ending with a letter or digit",
    ),
    (
        "target name ending in a dash",
        r#"{"target": {"name": "messaging-"}}"#,
        "target name is not a valid Secret name: at most 253 lowercase letters, digits, '-' and '.', each part between dots starting and ending with a letter or digit",
    ),
    (
        "target name of a Helm release Secret",
        r#"{"target": {"name": "sh.helm.release.v1.payments.v9"}}"#,
        "target name is reserved for Helm's release Secrets",
    ),
    (
        "target type of Helm",
        r#"{"target": {"type": "helm.sh/release.v1"}}"#,
        "target type belongs to Kubernetes or Helm, whose controllers trust Secrets of that type",
    ),
    (
        "target type of a Kubernetes subdomain",
        r#"{"target": {"type": "bootstrap.kubernetes.io/token"}}"#,
        "target type belongs to Kubernetes or Helm, whose controllers trust Secrets of that type",
    ),
    (
        "expiryKey equal to tokenKey",
        r#"{"target": {"tokenKey": "token", "expiryKey": "token"}}"#,
        "target expiryKey must differ from tokenKey: the expiry would overwrite the token",
    ),
    (
        "expiryKey equal to the default tokenKey",
        r#"{"target": {"expiryKey": "accessToken"}}"#,
        "target expiryKey must differ from tokenKey: the expiry would overwrite the token",
    ),
    (
        "podSelector with empty lists",
        r#"{"consumers": {"podSelector": {"matchLabels": {}, "matchExpressions": []}}}"#,
        "podSelector must not be empty: it would match every pod in the namespace",
    ),
];

/// Specs at the edges of every rule, which must all be admitted: without them a server
/// that refused everything would pass the table above.
const GOOD_SPECS: &[(&str, &str)] = &[
    ("defaults only", r#"{}"#),
    (
        "lowest bounds",
        r#"{"endpoint": "http://127.0.0.1:1/apptoken-refresh", "timeout": "1s", "validity": "30s"}"#,
    ),
    (
        "highest bounds",
        r#"{"timeout": "2m", "validity": "8760h", "refreshBefore": "8759h59m59s"}"#,
    ),
    ("percentage alone", r#"{"refreshBeforePercentage": 90}"#),
    (
        "a year in seconds, a timeout in minutes and seconds",
        r#"{"validity": "31536000s", "timeout": "1m30s"}"#,
    ),
    (
        "target name with dots, an expiry key of its own",
        r#"{"target": {"name": "scg-token.messaging", "tokenKey": "token", "expiryKey": "accessToken"}}"#,
    ),
    ("shortest refreshBefore", r#"{"refreshBefore": "1s"}"#),
    (
        "a Secret type of one's own, a name that only looks like Helm's",
        r#"{"target": {"type": "example.com/scg-token", "name": "sh.helm.releases-of-mine"}}"#,
    ),
    (
        "a type whose domain only ends like a reserved one",
        r#"{"target": {"type": "notkubernetes.io/x"}}"#,
    ),
    (
        "consumers at their bounds",
        r#"{"consumers": {"agents": true, "staleAfter": "1s", "podSelector": {"matchLabels": {"app": "a"}}}}"#,
    ),
    (
        "longest staleAfter, selector by expression",
        r#"{"consumers": {"staleAfter": "10m", "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}}"#,
    ),
];

fn manifest_crd() -> CustomResourceDefinition {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/scgtoken.yaml");
    let text = std::fs::read_to_string(path).expect("read crds/scgtoken.yaml");
    serde_yaml::from_str(&text).expect("crds/scgtoken.yaml is a CustomResourceDefinition")
}

async fn real_cluster_client() -> Client {
    let Some(path) = std::env::var_os("SCG_E2E_KUBECONFIG") else {
        // Run explicitly (--ignored) without a server: a failure, never a silent pass.
        let hint = if std::env::var_os("CI").is_some() {
            "CI must run this under testenv/run"
        } else {
            "run it under testenv/run"
        };
        panic!(
            "SCG_E2E_KUBECONFIG is not set: this test needs a real API server; {hint}: {IGNORE_REASON}"
        );
    };
    let kubeconfig = Kubeconfig::read_from(&path).expect("read SCG_E2E_KUBECONFIG");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    Client::try_from(config).expect("client from kubeconfig")
}

/// Applies the committed CRD and waits until it is Established. A CEL rule that does not
/// compile, or costs more than the server allows, makes this apply fail with the
/// server's reason.
async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("crd-admission-test").force();
    if let Err(e) = crds
        .patch(CRD_NAME, &params, &Patch::Apply(manifest_crd()))
        .await
    {
        panic!("the API server refused crds/scgtoken.yaml: {e}");
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let established = crds
            .get_opt(CRD_NAME)
            .await
            .ok()
            .flatten()
            .and_then(|c| c.status)
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "CRD {CRD_NAME} not Established after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn scgtoken(name: &str, spec_overrides: &str) -> DynamicObject {
    let mut spec = json!({ "credentialsSecretRef": { "name": "scg-credentials" } });
    let overrides: Value = serde_json::from_str(spec_overrides).expect("table spec is JSON");
    for (k, v) in overrides.as_object().expect("table spec is an object") {
        spec[k] = v.clone();
    }
    let mut obj = DynamicObject::new(name, &ApiResource::erase::<ScgToken>(&()));
    obj.data = json!({ "spec": spec });
    obj
}

/// Creates the object with server-side dry-run: admission runs in full, nothing is stored.
/// A just-Established CRD can take a moment to be served; a 404 is retried within
/// [`PATIENCE`].
async fn dry_run_create(api: &Api<DynamicObject>, obj: &DynamicObject) -> Result<(), kube::Error> {
    let params = PostParams {
        dry_run: true,
        field_manager: Some("crd-admission-test".into()),
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        match api.create(&params, obj).await {
            Err(kube::Error::Api(s)) if s.code == 404 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other.map(|_| ()),
        }
    }
}

#[tokio::test]
#[cfg_attr(
    not(real_cluster),
    ignore = "needs a real API server: testenv/run -- cargo test --test crd_admission"
)]
async fn each_cel_rule_refuses_its_bad_spec_at_admission() {
    let client = real_cluster_client().await;
    install_crd(&client).await;
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, "default", &ApiResource::erase::<ScgToken>(&()));

    let mut problems = Vec::new();
    for (i, (what, spec)) in GOOD_SPECS.iter().enumerate() {
        if let Err(e) = dry_run_create(&api, &scgtoken(&format!("good-{i}"), spec)).await {
            problems.push(format!(
                "{what}: a valid spec was refused: {}",
                describe(&e)
            ));
        }
    }
    for (i, (what, spec, message)) in BAD_SPECS.iter().enumerate() {
        match dry_run_create(&api, &scgtoken(&format!("bad-{i}"), spec)).await {
            Ok(()) => problems.push(format!("{what}: admitted, expected \"{message}\"")),
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains(message) => {}
            Err(e) => problems.push(format!(
                "{what}: expected 422 with \"{message}\", got: {}",
                describe(&e)
            )),
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// The server's own words for a refusal; other errors as they are.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("HTTP {} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

/// The operator's own check of a spec (for clusters without CEL, and objects stored
/// before a rule existed) gives the CEL rules' answer: it refuses each bad spec of the
/// tables with the rule's message, and admits each good one. The consumers' rules are
/// the exception, by design: the operator does not stop refreshing a token over how its
/// consumers are watched; it keeps the default `staleAfter` and refuses an empty
/// `podSelector` when it would nudge. Runs without a server.
#[test]
fn the_operator_refuses_what_the_cel_rules_refuse() {
    use scg_token_operator::{crd::ScgTokenSpec, policy, scg::Endpoint};
    let check = |spec: &str| -> Result<(), String> {
        let obj = scgtoken("check", spec);
        let spec: ScgTokenSpec = serde_json::from_value(obj.data["spec"].clone())
            .map_err(|e| format!("not an ScgTokenSpec: {e}"))?;
        // Plain http is the operator's own switch, not a CEL rule.
        Endpoint::parse(&spec.endpoint, true)?;
        policy::validate(&spec).map(drop).map_err(|e| e.0)
    };
    let mut problems = Vec::new();
    for (what, spec) in GOOD_SPECS {
        if let Err(e) = check(spec) {
            problems.push(format!("{what}: refused by the operator: {e}"));
        }
    }
    for (what, spec, message) in BAD_SPECS
        .iter()
        .filter(|(_, s, _)| !s.contains("consumers"))
    {
        match check(spec) {
            Ok(()) => problems.push(format!("{what}: admitted by the operator")),
            Err(e) if says(&e, message) => {}
            Err(e) => problems.push(format!("{what}: refused for another reason: {e}")),
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Whether `runtime` carries every word of `rule` in order: the operator's messages add
/// the values ("timeout 0s must be between 1s and 2m") and punctuation.
fn says(runtime: &str, rule: &str) -> bool {
    fn words(s: &str) -> impl Iterator<Item = &str> {
        s.split_whitespace()
            .map(|w| w.trim_end_matches([',', ':', ';']))
    }
    let mut said = words(runtime);
    words(rule).all(|w| said.any(|r| r == w))
}

/// Every CEL rule in the committed CRD has a row in the table, so a new rule cannot
/// go untested. Runs without a server.
#[test]
fn every_cel_rule_of_the_crd_has_a_bad_spec() {
    let crd = serde_json::to_value(manifest_crd()).expect("CRD as JSON");
    let mut messages = Vec::new();
    collect_rule_messages(&crd, &mut messages);
    assert!(
        !messages.is_empty(),
        "no CEL rules found in crds/scgtoken.yaml"
    );
    for message in messages {
        assert!(
            BAD_SPECS.iter().any(|(_, _, m)| *m == message),
            "the CEL rule \"{message}\" has no row in BAD_SPECS"
        );
    }
}

fn collect_rule_messages(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "x-kubernetes-validations" {
                    for rule in v.as_array().into_iter().flatten() {
                        let message = rule["message"].as_str().unwrap_or("(rule without message)");
                        out.push(message.to_string());
                    }
                } else {
                    collect_rule_messages(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_rule_messages(i, out)),
        _ => {}
    }
}
