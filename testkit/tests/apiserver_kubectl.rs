//! kubectl against the in-memory API server.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use testkit::apiserver::ApiServer;

/// A CRD of the same shape as the operator's (the test kit does not depend on it).
const CRD: &str = include_str!("fixtures/scgtoken-crd.yaml");

const OBJECTS: &str = r#"apiVersion: scgtoken.io/v1alpha1
kind: ScgToken
metadata:
  name: demo
spec:
  secretName: demo-token
---
apiVersion: v1
kind: Secret
metadata:
  name: demo-creds
type: Opaque
data:
  user: YWxpY2U=
"#;

struct Kubectl {
    kubeconfig: String,
    cache: String,
}

impl Kubectl {
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .output()
            .expect("run kubectl");
        eprintln!(
            "$ kubectl {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs kubectl in a blocking task (bounded in time) and expects success.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.spawn(args).await;
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn spawn(&self, args: &[&str]) -> Output {
        let me = Kubectl {
            kubeconfig: self.kubeconfig.clone(),
            cache: self.cache.clone(),
        };
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                me.run(&refs)
            }),
        )
        .await
        .expect("kubectl finished in time")
        .expect("kubectl task")
    }
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write file");
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]
async fn kubectl_workflow() {
    testkit::require_kubectl();
    let server = ApiServer::start().await.expect("start");
    let dir = server
        .kubeconfig_path()
        .parent()
        .expect("kubeconfig dir")
        .to_path_buf();
    let k = Kubectl {
        kubeconfig: server.kubeconfig_path().display().to_string(),
        cache: dir.join("cache").display().to_string(),
    };
    let crd = write(&dir, "crd.yaml", CRD);
    let objects = write(&dir, "objects.yaml", OBJECTS);

    let out = k.ok(&["apply", "-f", &crd]).await;
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/scgtokens.scgtoken.io created"),
        "{out}"
    );

    let out = k.ok(&["api-resources"]).await;
    let line = out
        .lines()
        .find(|l| l.starts_with("scgtokens "))
        .expect("scgtokens listed");
    for word in ["scgt", "scgtoken.io/v1alpha1", "true", "ScgToken"] {
        assert!(line.contains(word), "{line}");
    }
    assert!(out.lines().any(|l| l.starts_with("leases ")), "{out}");

    let out = k.ok(&["apply", "-f", &objects]).await;
    assert!(out.contains("scgtoken.scgtoken.io/demo created"), "{out}");
    assert!(out.contains("secret/demo-creds created"), "{out}");
    let out = k.ok(&["apply", "-f", &objects]).await;
    assert!(out.contains("scgtoken.scgtoken.io/demo unchanged"), "{out}");
    assert!(out.contains("secret/demo-creds unchanged"), "{out}");
    let changed = OBJECTS.replace("demo-token", "other-token");
    let changed = write(&dir, "changed.yaml", &changed);
    let out = k.ok(&["apply", "-f", &changed]).await;
    assert!(
        out.contains("scgtoken.scgtoken.io/demo configured"),
        "{out}"
    );
    let out = k
        .ok(&[
            "get",
            "scgtoken",
            "demo",
            "-o",
            "jsonpath={.spec.secretName} {.metadata.generation}",
        ])
        .await;
    assert_eq!(out, "other-token 2");

    // Unknown fields are rejected (server-side strict validation).
    let bad = write(
        &dir,
        "bad.yaml",
        &OBJECTS.replace("  secretName: demo-token", "  secretName: x\n  bogus: 1"),
    );
    let out = k.spawn(&["apply", "-f", &bad]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field \"spec.bogus\""));

    let bad_secret = write(
        &dir,
        "bad-secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: bad\nbogus: 1\n",
    );
    let out = k.spawn(&["apply", "-f", &bad_secret]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field \"bogus\""));

    // Printer columns via server-side printing, with the plural and the short name.
    for what in ["scgtokens", "scgt"] {
        let out = k.ok(&["get", what]).await;
        let header = out.lines().next().unwrap_or("");
        for col in ["NAME", "READY", "EXPIRES", "NEXT REFRESH", "AGE"] {
            assert!(header.contains(col), "{header}");
        }
        assert!(
            out.lines().nth(1).unwrap_or("").starts_with("demo "),
            "{out}"
        );
    }
    k.ok(&[
        "patch",
        "scgtoken",
        "demo",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ])
    .await;
    let out = k.ok(&["get", "scgt", "demo", "--no-headers"]).await;
    assert!(out.split_whitespace().nth(1) == Some("True"), "{out}");
    let out = k
        .ok(&[
            "wait",
            "--for=condition=Ready",
            "scgtoken/demo",
            "--timeout=10s",
        ])
        .await;
    assert!(out.contains("condition met"), "{out}");

    let out = k.ok(&["get", "secret", "demo-creds", "-o", "yaml"]).await;
    assert!(out.contains("user: YWxpY2U="), "{out}");
    assert!(out.contains("kind: Secret"), "{out}");
    let out = k.ok(&["get", "secrets"]).await;
    assert!(
        out.lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .eq(["NAME", "TYPE", "DATA", "AGE"]),
        "{out}"
    );

    let out = k
        .ok(&["annotate", "scgtoken", "demo", "x=y", "--overwrite"])
        .await;
    assert!(out.contains("scgtoken.scgtoken.io/demo annotated"), "{out}");
    let out = k
        .ok(&[
            "get",
            "scgtoken",
            "demo",
            "-o",
            "jsonpath={.metadata.annotations.x}",
        ])
        .await;
    assert_eq!(out, "y");

    let out = k.ok(&["apply", "--server-side", "-f", &objects]).await;
    assert!(
        out.contains("scgtoken.scgtoken.io/demo serverside-applied"),
        "{out}"
    );
    let out = k
        .ok(&[
            "get",
            "scgtoken",
            "demo",
            "-o",
            "jsonpath={.spec.secretName}",
        ])
        .await;
    assert_eq!(out, "demo-token");
    let out = k
        .ok(&[
            "get",
            "scgtoken",
            "demo",
            "-o",
            "yaml",
            "--show-managed-fields",
        ])
        .await;
    assert!(
        out.contains("manager: kubectl") && out.contains("operation: Apply"),
        "{out}"
    );

    // Typed kubectl commands send protobuf bodies.
    let out = k
        .ok(&[
            "create",
            "secret",
            "generic",
            "cli-secret",
            "--from-literal=token=abc",
        ])
        .await;
    assert!(out.contains("secret/cli-secret created"), "{out}");
    let out = k
        .ok(&[
            "get",
            "secret",
            "cli-secret",
            "-o",
            "jsonpath={.data.token} {.type}",
        ])
        .await;
    assert_eq!(out, "YWJj Opaque");

    let out = k.ok(&["delete", "-f", &objects]).await;
    assert!(
        out.contains("scgtoken.scgtoken.io \"demo\" deleted"),
        "{out}"
    );
    assert!(out.contains("secret \"demo-creds\" deleted"), "{out}");
    let out = k.spawn(&["get", "scgtoken", "demo"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
    let out = k.ok(&["get", "namespaces"]).await;
    assert!(out.contains("default") && out.contains("Active"), "{out}");
}
