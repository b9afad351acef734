//! Why a fetch failed, and byte counts as people read them.

use std::path::PathBuf;

use crate::store::StoreError;

/// Why a fetch failed. Nothing partially downloaded or unverified is ever visible afterwards.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
    #[error("needs {needed}, {available} free on {}", path.display())]
    InsufficientSpace {
        needed: HumanBytes,
        available: HumanBytes,
        path: PathBuf,
    },
    #[error("{url}: HTTP {status}: {hint}")]
    Denied {
        url: String,
        status: u16,
        hint: String,
    },
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: gave up after {attempts} attempts without progress; last error: {last}")]
    GaveUp {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("{file}: sha256 is {actual}, expected {expected}; the download was discarded")]
    ChecksumMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{file}: {actual} bytes, expected {expected}; the download was discarded")]
    SizeMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("{file}: the hub reports sha256 {hub} but the catalog expects {catalog}; the upstream file changed, update the catalog")]
    HubHashMismatch {
        file: String,
        hub: String,
        catalog: String,
    },
    #[error("{file}: the hub reports {hub} bytes but the catalog expects {catalog}; the upstream file changed, update the catalog")]
    HubSizeMismatch {
        file: String,
        hub: u64,
        catalog: u64,
    },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
    #[error("{url}: the server's TLS certificate is not trusted ({detail}); behind a TLS-inspecting proxy or for a private mirror, set SDKUBE_CA_BUNDLE to a PEM file with its CA certificate")]
    UntrustedCertificate { url: String, detail: String },
    #[error("no file of {repo} matches {pattern:?}")]
    NoMatch { repo: String, pattern: String },
}

impl FetchError {
    /// True when the fix lies with the operator (configuration, credentials, disk space, the
    /// catalog) rather than with a flaky network or server: exit code 2 in the CLI.
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            FetchError::Store(_)
                | FetchError::Config(_)
                | FetchError::InsufficientSpace { .. }
                | FetchError::Denied { .. }
                | FetchError::HubHashMismatch { .. }
                | FetchError::HubSizeMismatch { .. }
                | FetchError::NoMatch { .. }
                | FetchError::UntrustedCertificate { .. }
        )
    }
}

/// Byte counts printed the way disk sizes are sold: "6.9 GB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanBytes(pub u64);

impl std::fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0 as f64;
        match self.0 {
            n if n >= 1_000_000_000 => write!(f, "{:.1} GB", b / 1e9),
            n if n >= 1_000_000 => write!(f, "{:.1} MB", b / 1e6),
            n if n >= 1_000 => write!(f, "{:.1} kB", b / 1e3),
            n => write!(f, "{n} B"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes() {
        assert_eq!(HumanBytes(6_900_000_000).to_string(), "6.9 GB");
        assert_eq!(HumanBytes(1_234_567).to_string(), "1.2 MB");
    }
}
