//! Prerequisites of tests that need programs outside the build.

use std::sync::OnceLock;

/// Panics unless `kubectl version --client` runs.
///
/// Tests that drive kubectl carry `#[cfg_attr(not(kubectl), ignore = "needs kubectl on
/// PATH")]` (the cfg comes from the build scripts, see testkit/build.rs) and call this
/// first. Without kubectl such a test is ignored, and counted so in the summary; under
/// `CI` it runs and fails here, so a CI job without kubectl cannot pass by skipping.
#[track_caller]
pub fn require_kubectl() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let check = CHECK.get_or_init(|| {
        match std::process::Command::new("kubectl")
            .args(["version", "--client"])
            .output()
        {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "kubectl is on PATH but `kubectl version --client` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
                "kubectl not found on PATH; CI requires it (outside CI, a build without \
                 kubectl on PATH marks this test ignored)"
                    .to_string(),
            ),
            Err(e) => Err(format!("cannot run kubectl: {e}")),
        }
    });
    if let Err(why) = check {
        panic!("{why}");
    }
}
