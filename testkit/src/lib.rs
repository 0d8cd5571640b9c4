//! Test support for scg-token-operator: an in-memory Kubernetes API server, a
//! simulator of the Syniverse SCG token-refresh API (over http or https), a throw-away
//! CA, and a `CONNECT` proxy. Used by tests and examples only; never linked into the
//! operator binary.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod connect_proxy;
mod prereq;
pub mod scgsim;
pub mod tls;

pub use prereq::require_kubectl;
