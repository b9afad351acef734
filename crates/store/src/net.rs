//! HTTP client setup: proxies, timeouts, TLS.
//!
//! Proxy variables are read by us, not left to reqwest's implicit environment lookup, so that
//! the rules are written down here, testable without touching the process environment, and
//! the same in the CLI and the server:
//! `HTTPS_PROXY`/`https_proxy` for https URLs, `HTTP_PROXY`/`http_proxy` for http URLs,
//! `ALL_PROXY`/`all_proxy` for both when the specific one is unset, and `NO_PROXY`/`no_proxy`
//! (comma-separated hosts, `.domain` suffixes, IPs, CIDR blocks, `*`) to bypass them. The
//! upper-case spelling wins when both are set. Empty values count as unset.
//!
//! TLS trusts the system's roots (which `SSL_CERT_FILE`/`SSL_CERT_DIR` replace, as for
//! OpenSSL) plus the certificates of an optional PEM bundle ([`load_ca_bundle`]): the CA of a
//! TLS-inspecting corporate proxy or of a private mirror, without giving up the public roots.

use std::path::Path;
use std::time::Duration;

/// Proxy settings, usually [`ProxyConfig::from_env`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Proxy of http URLs (`HTTP_PROXY`).
    pub http: Option<String>,
    /// Proxy of https URLs (`HTTPS_PROXY`).
    pub https: Option<String>,
    /// Proxy of both when the specific one is unset (`ALL_PROXY`).
    pub all: Option<String>,
    /// Hosts, domains and networks reached directly (`NO_PROXY`).
    pub no_proxy: Option<String>,
}

impl ProxyConfig {
    /// Reads the conventional variables from the process environment.
    pub fn from_env() -> ProxyConfig {
        ProxyConfig::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the conventional variables through `lookup` (for tests and embedding).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> ProxyConfig {
        let get = |upper: &str| {
            lookup(upper)
                .filter(|v| !v.trim().is_empty())
                .or_else(|| lookup(&upper.to_ascii_lowercase()).filter(|v| !v.trim().is_empty()))
        };
        ProxyConfig {
            http: get("HTTP_PROXY"),
            https: get("HTTPS_PROXY"),
            all: get("ALL_PROXY"),
            no_proxy: get("NO_PROXY"),
        }
    }

    fn apply(&self, mut builder: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, String> {
        // Never let reqwest consult the environment on its own: only what is configured here.
        builder = builder.no_proxy();
        let no_proxy = || {
            self.no_proxy
                .as_deref()
                .and_then(reqwest::NoProxy::from_string)
        };
        let bad = |var: &str, e: reqwest::Error| format!("invalid {var} proxy URL: {e}");
        let http = self.http.as_ref().or(self.all.as_ref());
        let https = self.https.as_ref().or(self.all.as_ref());
        if let Some(url) = http {
            let proxy = reqwest::Proxy::http(url.as_str()).map_err(|e| bad("HTTP_PROXY", e))?;
            builder = builder.proxy(proxy.no_proxy(no_proxy()));
        }
        if let Some(url) = https {
            let proxy = reqwest::Proxy::https(url.as_str()).map_err(|e| bad("HTTPS_PROXY", e))?;
            builder = builder.proxy(proxy.no_proxy(no_proxy()));
        }
        Ok(builder)
    }
}

/// Reads every certificate of a PEM file, to be trusted besides the system's roots.
pub(crate) fn load_ca_bundle(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let what = |e: &dyn std::fmt::Display| format!("CA bundle {}: {e}", path.display());
    let pem = std::fs::read(path).map_err(|e| what(&e))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| what(&e))?;
    if certs.is_empty() {
        return Err(what(&"no PEM certificate in it"));
    }
    Ok(certs)
}

/// Builds the two clients the fetcher uses: one following redirects (downloads) and one not
/// (hub metadata, whose interesting headers sit on the redirect response itself). `extra_roots`
/// are trusted in addition to the system's roots.
pub(crate) fn build_clients(
    proxy: &ProxyConfig,
    extra_roots: &[reqwest::Certificate],
    connect_timeout: Duration,
    read_timeout: Duration,
) -> Result<(reqwest::Client, reqwest::Client), String> {
    // rustls with the ring provider: no OpenSSL in the image. Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let make = |redirects: reqwest::redirect::Policy| -> Result<reqwest::Client, String> {
        let builder = reqwest::Client::builder()
            .user_agent(concat!("sdkube/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .redirect(redirects)
            .tls_certs_merge(extra_roots.iter().cloned());
        proxy
            .apply(builder)?
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))
    };
    Ok((
        make(reqwest::redirect::Policy::limited(10))?,
        make(reqwest::redirect::Policy::none())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_case_wins_lower_case_is_honoured_empty_is_unset() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let cfg = ProxyConfig::from_lookup(env(&[
            ("https_proxy", "http://lower:1"),
            ("HTTP_PROXY", "http://upper:2"),
            ("http_proxy", "http://lower:2"),
            ("NO_PROXY", ""),
            ("no_proxy", "localhost,.internal"),
        ]));
        assert_eq!(cfg.https.as_deref(), Some("http://lower:1"));
        assert_eq!(cfg.http.as_deref(), Some("http://upper:2"));
        assert_eq!(cfg.no_proxy.as_deref(), Some("localhost,.internal"));
        assert_eq!(cfg.all, None);
    }

    #[test]
    fn a_bad_proxy_url_is_a_clear_error() {
        let cfg = ProxyConfig {
            https: Some("http://[::1".into()),
            ..Default::default()
        };
        let err =
            build_clients(&cfg, &[], Duration::from_secs(1), Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("HTTPS_PROXY"), "{err}");
    }

    #[test]
    fn a_ca_bundle_that_is_missing_or_holds_no_certificate_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = load_ca_bundle(&missing).unwrap_err();
        assert!(err.contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = load_ca_bundle(&empty).unwrap_err();
        assert!(
            err.contains("empty.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
    }
}
