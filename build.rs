// The tests of this package that drive kubectl use the same `cfg(kubectl)` as the test
// kit's: see testkit/build.rs.
//
// `cfg(real_cluster)` is set when `SCG_E2E_KUBECONFIG` is: the end-to-end tests then run
// against that cluster, and the ones that need the in-memory API server (its fault
// injection and request counters) mark themselves
// `#[cfg_attr(real_cluster, ignore = "...")]`, so the test summary counts them as ignored
// instead of reporting a pass. The variable's value is tracked, so a new path rebuilds
// this package: testenv/run keeps the path stable from one run to the next.

#[path = "testkit/build.rs"]
mod kit;

fn main() {
    kit::main();
    println!("cargo::rustc-check-cfg=cfg(real_cluster)");
    println!("cargo::rerun-if-env-changed=SCG_E2E_KUBECONFIG");
    if std::env::var_os("SCG_E2E_KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=real_cluster");
    }
}
