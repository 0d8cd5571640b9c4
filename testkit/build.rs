// Sets `cfg(kubectl)` for tests that drive kubectl, which mark themselves
// `#[cfg_attr(not(kubectl), ignore = "needs kubectl on PATH")]`.
//
// The cfg is set when kubectl is on PATH, and also when `CI` is set: under CI such a test
// runs, and fails in `testkit::require_kubectl()` if kubectl is missing, instead of being
// skipped. Elsewhere a missing kubectl makes the test ignored, which the test summary
// counts, rather than a silent pass.
//
// The root package's build script includes this file as a module and calls `main`, so
// both packages decide alike.

use std::path::Path;

pub fn main() {
    println!("cargo::rustc-check-cfg=cfg(kubectl)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=CI");
    if ci() || on_path("kubectl") {
        println!("cargo::rustc-cfg=kubectl");
    }
}

/// `CI` set to anything but empty, `0` or `false` (CI services set `CI=true`).
fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

fn on_path(program: &str) -> bool {
    let file = format!("{program}{}", std::env::consts::EXE_SUFFIX);
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(&file))))
}

#[cfg(unix)]
fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn executable(path: &Path) -> bool {
    path.is_file()
}
