//! Test support for scg-token-operator: an in-memory Kubernetes API server and a
//! simulator of the Syniverse SCG token-refresh API. Used by tests and examples only;
//! never linked into the operator binary.
#![forbid(unsafe_code)]

pub mod apiserver;
mod prereq;
pub mod scgsim;

pub use prereq::require_kubectl;
