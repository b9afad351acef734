//! Why a fetch failed, and byte counts as people read them.

use std::path::PathBuf;

use crate::store::StoreError;

/// Why a fetch failed. Nothing partially downloaded or unverified is ever visible afterwards.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The store directory cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The options cannot be used (CA bundle, proxy, runtime).
    #[error("{0}")]
    Config(String),
    /// The files do not fit on the store's filesystem.
    #[error("needs {needed}, {available} free on {}", path.display())]
    InsufficientSpace {
        /// Bytes still to download.
        needed: HumanBytes,
        /// Bytes free.
        available: HumanBytes,
        /// The store.
        path: PathBuf,
    },
    /// The server refused (401, 403, 404); `hint` says what to check.
    #[error("{url}: HTTP {status}: {hint}")]
    Denied {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What to do about it.
        hint: String,
    },
    /// Another HTTP error that retrying does not cure.
    #[error("{url}: HTTP {status}")]
    Http {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// Every retry failed without any progress.
    #[error("{url}: gave up after {attempts} attempts without progress; last error: {last}")]
    GaveUp {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last one's error.
        last: String,
    },
    /// The downloaded file's sha256 is not the expected one.
    #[error("{file}: sha256 is {actual}, expected {expected}; the download was discarded")]
    ChecksumMismatch {
        /// The file (`model/path`).
        file: String,
        /// The sha256 expected.
        expected: String,
        /// The sha256 downloaded.
        actual: String,
    },
    /// The downloaded file's size is not the expected one.
    #[error("{file}: {actual} bytes, expected {expected}; the download was discarded")]
    SizeMismatch {
        /// The file (`model/path`).
        file: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes downloaded.
        actual: u64,
    },
    /// The hub's sha256 of a file differs from the catalog's.
    #[error("{file}: the hub reports sha256 {hub} but the catalog expects {catalog}; the upstream file changed, update the catalog")]
    HubHashMismatch {
        /// The file (`model/path`).
        file: String,
        /// The hub's sha256.
        hub: String,
        /// The catalog's.
        catalog: String,
    },
    /// The hub's size of a file differs from the catalog's.
    #[error("{file}: the hub reports {hub} bytes but the catalog expects {catalog}; the upstream file changed, update the catalog")]
    HubSizeMismatch {
        /// The file (`model/path`).
        file: String,
        /// The hub's size in bytes.
        hub: u64,
        /// The catalog's.
        catalog: u64,
    },
    /// The server answered something this client cannot use.
    #[error("{url}: {message}")]
    Protocol {
        /// The URL.
        url: String,
        /// What was wrong with the answer.
        message: String,
    },
    /// The server's certificate is not trusted: retrying cannot help.
    #[error("{url}: the server's TLS certificate is not trusted ({detail}); behind a TLS-inspecting proxy or for a private mirror, set SDKUBE_CA_BUNDLE to a PEM file with its CA certificate")]
    UntrustedCertificate {
        /// The URL.
        url: String,
        /// The TLS library's reason.
        detail: String,
    },
    /// A catalog pattern matched no file of the repository.
    #[error("no file of {repo} matches {pattern:?}")]
    NoMatch {
        /// The repository.
        repo: String,
        /// The pattern.
        pattern: String,
    },
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
