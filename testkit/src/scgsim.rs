//! SCG token-refresh API simulator (work in progress).
