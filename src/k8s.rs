//! Helpers for talking to the Kubernetes API that every module needs: a timeout for one
//! request, and error descriptions that are safe to show.

use std::time::Duration;

/// Longest wait for one Kubernetes API request. The client has no read timeout of its
/// own (watches must not have one), and a request that never returns would stall the
/// chain's pending write and the shutdown behind it.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// `f`, or a timeout error after [`API_TIMEOUT`].
pub async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(API_TIMEOUT, f).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the Kubernetes API did not answer in time",
        )))),
    }
}

/// A Kubernetes API error in the operator's own words: the code and reason of an API
/// answer, never its message (admission webhooks may quote the object, here a token).
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("the Kubernetes API answered {} {}", s.code, s.reason),
        kube::Error::Service(_) | kube::Error::HyperError(_) => {
            "the Kubernetes API could not be reached or did not answer in time".into()
        }
        _ => "the Kubernetes API request failed".into(),
    }
}
