//! Resolution: a catalog file spec becomes concrete files to download, with the sizes and
//! sha256 the hub (or a plain URL's server) reports.

use reqwest::header::{HeaderMap, AUTHORIZATION};
use serde::Deserialize;

use super::retry::send_with_retry;
use super::{Ctx, FetchError, FileJob};
use crate::catalog::{check_relative_path, glob_matches, FileSource};

fn encode_path(path: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn resolve_url(endpoint: &str, repo: &str, revision: &str, path: &str) -> String {
    format!(
        "{}/{}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        repo,
        encode_path(revision, false),
        encode_path(path, true)
    )
}

/// A lower-case sha256 from an ETag-like header value, if it is one (quotes and `W/` removed).
fn sha256_from_etag(value: &str) -> Option<String> {
    let v = value
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase();
    (v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit())).then_some(v)
}

pub(super) fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(super) async fn resolve(
    ctx: &Ctx<'_>,
    model: &str,
    spec: &crate::FileSpec,
) -> Result<Vec<FileJob>, FetchError> {
    let endpoint = &ctx.options.hf_endpoint;
    match &spec.source {
        FileSource::Hub {
            repo,
            revision,
            path,
        } => {
            let url = resolve_url(endpoint, repo, revision, path);
            let (size, sha) = hub_head(ctx, &url).await?;
            let sha256 = match (&spec.sha256, sha) {
                (Some(expected), Some(hub)) if *expected != hub => {
                    return Err(FetchError::HubHashMismatch {
                        file: format!("{model}/{path}"),
                        hub,
                        catalog: expected.clone(),
                    })
                }
                (Some(expected), _) => Some(expected.clone()),
                (None, hub) => hub,
            };
            if let (Some(expected), Some(hub)) = (spec.size, size) {
                if expected != hub {
                    return Err(FetchError::HubSizeMismatch {
                        file: format!("{model}/{path}"),
                        hub,
                        catalog: expected,
                    });
                }
            }
            let size = spec.size.or(size);
            Ok(vec![FileJob {
                model: model.to_owned(),
                rel_path: path.clone(),
                url,
                hub_auth: true,
                size,
                sha256,
                source_key: spec.source.key(),
            }])
        }
        FileSource::HubPattern {
            repo,
            revision,
            pattern,
        } => {
            let listing = hub_tree(ctx, repo, revision).await?;
            let jobs: Vec<FileJob> = listing
                .into_iter()
                .filter(|e| e.kind == "file" && glob_matches(pattern, &e.path))
                .map(|e| {
                    check_relative_path(&e.path).map_err(|message| FetchError::Protocol {
                        url: format!("{endpoint}/api/models/{repo}"),
                        message,
                    })?;
                    let sha256 = e.lfs.as_ref().and_then(|l| sha256_from_etag(&l.oid));
                    let size = e.lfs.as_ref().map(|l| l.size).or(e.size);
                    Ok(FileJob {
                        model: model.to_owned(),
                        url: resolve_url(endpoint, repo, revision, &e.path),
                        rel_path: e.path,
                        hub_auth: true,
                        size,
                        sha256,
                        source_key: spec.source.key(),
                    })
                })
                .collect::<Result<_, FetchError>>()?;
            if jobs.is_empty() {
                return Err(FetchError::NoMatch {
                    repo: repo.clone(),
                    pattern: pattern.clone(),
                });
            }
            Ok(jobs)
        }
        FileSource::Url { url, file_name } => {
            let size = match spec.size {
                Some(size) => Some(size),
                // Only for the free-space check; servers that refuse HEAD are fine.
                None => ctx
                    .client
                    .head(url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .and_then(|r| header_str(r.headers(), "content-length")?.parse().ok()),
            };
            Ok(vec![FileJob {
                model: model.to_owned(),
                rel_path: file_name.clone(),
                url: url.clone(),
                hub_auth: false,
                size,
                sha256: spec.sha256.clone(),
                source_key: spec.source.key(),
            }])
        }
    }
}

/// HEAD on a resolve URL without following the redirect: LFS files answer with a redirect
/// carrying `X-Linked-Etag` (the sha256) and `X-Linked-Size`; small files answer 200.
async fn hub_head(ctx: &Ctx<'_>, url: &str) -> Result<(Option<u64>, Option<String>), FetchError> {
    let response = send_with_retry(ctx, url, None, || {
        with_auth(ctx, ctx.client_no_redirect.head(url), true)
    })
    .await?;
    let headers = response.headers();
    let linked_size = header_str(headers, "x-linked-size").and_then(|v| v.parse().ok());
    let size = linked_size.or_else(|| {
        if response.status().is_success() {
            header_str(headers, "content-length").and_then(|v| v.parse().ok())
        } else {
            None
        }
    });
    let sha = header_str(headers, "x-linked-etag")
        .and_then(sha256_from_etag)
        .or_else(|| header_str(headers, "etag").and_then(sha256_from_etag));
    Ok((size, sha))
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    size: Option<u64>,
    lfs: Option<TreeLfs>,
}

#[derive(Deserialize)]
struct TreeLfs {
    oid: String,
    size: u64,
}

/// The hub's recursive file listing, following `Link: <…>; rel="next"` pages.
async fn hub_tree(ctx: &Ctx<'_>, repo: &str, revision: &str) -> Result<Vec<TreeEntry>, FetchError> {
    let mut url = format!(
        "{}/api/models/{}/tree/{}?recursive=true",
        ctx.options.hf_endpoint.trim_end_matches('/'),
        repo,
        encode_path(revision, false)
    );
    let mut entries = Vec::new();
    for _page in 0..1000 {
        let response = send_with_retry(ctx, &url, None, || {
            with_auth(ctx, ctx.client.get(&url), true)
        })
        .await?;
        let next = header_str(response.headers(), "link").and_then(next_link);
        let body = response.bytes().await.map_err(|e| FetchError::Protocol {
            url: url.clone(),
            message: format!("reading listing: {e}"),
        })?;
        let page: Vec<TreeEntry> =
            serde_json::from_slice(&body).map_err(|e| FetchError::Protocol {
                url: url.clone(),
                message: format!("listing is not the expected JSON: {e}"),
            })?;
        entries.extend(page);
        match next {
            Some(next) => url = next,
            None => return Ok(entries),
        }
    }
    Err(FetchError::Protocol {
        url,
        message: "listing has more than 1000 pages".into(),
    })
}

fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

pub(super) fn with_auth(
    ctx: &Ctx<'_>,
    request: reqwest::RequestBuilder,
    hub: bool,
) -> reqwest::RequestBuilder {
    match (&ctx.options.hf_token, hub) {
        (Some(token), true) => request.header(AUTHORIZATION, format!("Bearer {token}")),
        _ => request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        let sha = "a".repeat(64);
        assert_eq!(sha256_from_etag(&format!("\"{sha}\"")), Some(sha.clone()));
        assert_eq!(
            sha256_from_etag(&format!("W/\"{}\"", sha.to_uppercase())),
            Some(sha)
        );
        assert_eq!(sha256_from_etag("\"0123abcd\""), None);
        assert_eq!(
            next_link("<https://h/api/x?cursor=2>; rel=\"next\""),
            Some("https://h/api/x?cursor=2".into())
        );
        assert_eq!(next_link("<https://h/a>; rel=\"prev\""), None);
        assert_eq!(
            resolve_url("https://hf.co/", "a/b", "refs/pr/1", "dir/my file.bin"),
            "https://hf.co/a/b/resolve/refs%2Fpr%2F1/dir/my%20file.bin"
        );
    }
}
