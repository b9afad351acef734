//! Retries: backoff with full jitter, `Retry-After`, which answers are worth another try and
//! which become an error saying what to do.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use super::{Ctx, FetchError, ProgressEvent};

/// Backoff state for one request stream (a file's metadata, or one download range).
pub(super) struct Retrier {
    pub(super) attempts: u32,
}

impl Retrier {
    /// Waits before the next attempt, or says to give up.
    pub(super) async fn wait(
        &mut self,
        ctx: &Ctx<'_>,
        file: Option<(&str, &str)>,
        url: &str,
        reason: String,
        retry_after: Option<Duration>,
    ) -> Result<(), FetchError> {
        self.attempts += 1;
        if self.attempts > ctx.options.max_retries {
            return Err(FetchError::GaveUp {
                url: url.to_owned(),
                attempts: self.attempts,
                last: reason,
            });
        }
        let o = ctx.options;
        let cap = o
            .retry_base_delay
            .saturating_mul(1 << (self.attempts - 1).min(20))
            .min(o.retry_max_delay);
        let jittered = cap.mul_f64(rand::random::<f64>());
        let delay = match retry_after {
            Some(after) => after.min(o.retry_after_max),
            None => jittered,
        };
        let (model, file) = file.unwrap_or(("", url));
        (ctx.progress)(ProgressEvent::Retry {
            model: model.to_owned(),
            file: file.to_owned(),
            attempt: self.attempts,
            delay_ms: delay.as_millis() as u64,
            reason,
        });
        tokio::time::sleep(delay).await;
        Ok(())
    }

    pub(super) fn progressed(&mut self) {
        self.attempts = 0;
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn is_transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// Sends a request until it gets a non-transient answer. Redirects (from the non-following
/// client) and 2xx come back; 4xx become errors saying what to do.
pub(super) async fn send_with_retry(
    ctx: &Ctx<'_>,
    url: &str,
    file: Option<(&str, &str)>,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, FetchError> {
    let mut retrier = Retrier { attempts: 0 };
    loop {
        match build().send().await {
            Ok(response) if is_transient(response.status()) => {
                let after = retry_after(response.headers());
                let reason = format!("HTTP {}", response.status().as_u16());
                retrier.wait(ctx, file, url, reason, after).await?;
            }
            Ok(response) => return check_status(ctx, url, response),
            Err(e) => {
                if let Some(detail) = untrusted_certificate(&e) {
                    return Err(FetchError::UntrustedCertificate {
                        url: url.to_owned(),
                        detail,
                    });
                }
                let reason = error_chain(&e);
                retrier.wait(ctx, file, url, reason, None).await?;
            }
        }
    }
}

fn check_status(
    ctx: &Ctx<'_>,
    url: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, FetchError> {
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        return Ok(response);
    }
    let code = status.as_u16();
    let hint = match code {
        401 | 403 if ctx.options.hf_token.is_none() => {
            "the repository is gated or private: accept its license on the hub and set HF_TOKEN"
                .to_owned()
        }
        401 | 403 => {
            "HF_TOKEN was sent but refused: check the token and that it may read this repository"
                .to_owned()
        }
        404 => "not found: check the repository, revision and path (or HF_ENDPOINT)".to_owned(),
        _ => {
            return Err(FetchError::Http {
                url: url.to_owned(),
                status: code,
            })
        }
    };
    Err(FetchError::Denied {
        url: url.to_owned(),
        status: code,
        hint,
    })
}

/// The rustls certificate error somewhere in an error's chain, as text: retrying cannot help,
/// only trusting the right CA can. (`io::Error` hides a wrapped error from `source()`, hence
/// `get_ref`.)
fn untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(e) = next {
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), inner].into_iter().flatten() {
            if let Some(err @ rustls::Error::InvalidCertificate(_)) =
                candidate.downcast_ref::<rustls::Error>()
            {
                return Some(err.to_string());
            }
        }
        next = e.source();
    }
    None
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_header() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        headers.insert(RETRY_AFTER, later.parse().unwrap());
        let d = retry_after(&headers).unwrap();
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
    }
}
