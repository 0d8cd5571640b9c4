//! In-memory Kubernetes API server (work in progress).
