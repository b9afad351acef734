//! What a caller of [`fetch`](super::fetch) sets: endpoint, credentials, proxies, limits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::net::ProxyConfig;

/// Returns the free bytes on the filesystem holding a path.
pub type FreeSpaceProbe = Arc<dyn Fn(&Path) -> std::io::Result<u64> + Send + Sync>;

/// How to fetch. [`FetchOptions::from_env`] gives the defaults plus `HF_ENDPOINT`, `HF_TOKEN`
/// and the proxy variables.
#[derive(Clone)]
pub struct FetchOptions {
    /// Hugging Face endpoint (a mirror may be set with `HF_ENDPOINT`).
    pub hf_endpoint: String,
    /// Sent as `Authorization: Bearer` to the hub endpoint only (never to plain URLs; dropped
    /// on redirects to other hosts such as the CDN).
    pub hf_token: Option<String>,
    /// Proxies for http and https URLs, and the hosts that bypass them.
    pub proxy: ProxyConfig,
    /// A PEM file of root certificates trusted besides the system's (`SDKUBE_CA_BUNDLE`): the CA
    /// of a TLS-inspecting corporate proxy, or of a mirror with a private certificate.
    pub ca_bundle: Option<PathBuf>,
    /// Parallel ranged connections for files of at least `ranged_min_size` bytes.
    pub connections: usize,
    /// Smaller files take one connection.
    pub ranged_min_size: u64,
    /// Longest wait for a connection to open.
    pub connect_timeout: Duration,
    /// A read that waits longer than this (a stalled server) is retried.
    pub read_timeout: Duration,
    /// Attempts allowed without any progress before giving up on a file.
    pub max_retries: u32,
    /// The first retry's delay at most; each further one doubles it (with full jitter).
    pub retry_base_delay: Duration,
    /// The longest delay between two retries (besides a server's `Retry-After`).
    pub retry_max_delay: Duration,
    /// A server's `Retry-After` is honoured up to this long.
    pub retry_after_max: Duration,
    /// Minimum time between two `file_progress` events of one file.
    pub progress_interval: Duration,
    /// Replaces the filesystem's free-space query (tests; `None` = ask the OS).
    pub free_space: Option<FreeSpaceProbe>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            hf_endpoint: "https://huggingface.co".into(),
            hf_token: None,
            proxy: ProxyConfig::default(),
            ca_bundle: None,
            connections: 4,
            ranged_min_size: 64 << 20,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            max_retries: 8,
            retry_base_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(30),
            retry_after_max: Duration::from_secs(300),
            progress_interval: Duration::from_millis(500),
            free_space: None,
        }
    }
}

impl FetchOptions {
    /// Defaults, with `HF_ENDPOINT`, `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`),
    /// `SDKUBE_CA_BUNDLE` and the proxy variables taken from the environment.
    pub fn from_env() -> FetchOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let mut options = FetchOptions {
            proxy: ProxyConfig::from_env(),
            hf_token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            ca_bundle: var("SDKUBE_CA_BUNDLE").map(PathBuf::from),
            ..FetchOptions::default()
        };
        if let Some(endpoint) = var("HF_ENDPOINT") {
            options.hf_endpoint = endpoint;
        }
        options
    }
}
