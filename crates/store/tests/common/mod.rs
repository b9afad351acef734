//! Test servers on loopback: a Hugging Face-like hub, its "CDN" on a second port, fault
//! injection on the CDN, both over plain HTTP or HTTPS (a CA generated per run), and a real
//! forward HTTP proxy with CONNECT tunnels.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random content (xorshift), so corruption cannot go unnoticed.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Clone)]
pub struct HubFile {
    pub data: Bytes,
    pub sha256: String,
    /// LFS files redirect to the CDN; others are served by the hub itself.
    pub lfs: bool,
}

/// One injected misbehaviour, consumed by the next CDN GET.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer with this status (and `Retry-After` seconds, if given).
    Status(u16, Option<u64>),
    /// Send this many body bytes, then drop the connection.
    DropAfter(usize),
    /// Send this many body bytes, then go silent for a long time.
    StallAfter(usize),
    /// Serve the right length with one byte flipped.
    WrongBytes,
    /// Ignore the Range header and send the whole file with 200.
    IgnoreRange,
}

#[derive(Debug, Clone)]
pub struct Logged {
    pub server: &'static str,
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

pub struct HubState {
    pub files: Mutex<HashMap<(String, String), HubFile>>,
    pub gated: Mutex<Vec<String>>,
    pub token: Option<String>,
    pub cdn_base: Mutex<String>,
    pub faults: Mutex<VecDeque<Fault>>,
    /// Applies to every CDN GET while set: bytes per second.
    pub throttle: Mutex<Option<u64>>,
    pub log: Mutex<Vec<Logged>>,
    pub requests: AtomicUsize,
    /// "http" or "https", for the URLs the hub writes (listing pages).
    pub scheme: &'static str,
}

pub struct Hub {
    pub state: Arc<HubState>,
    pub hub_addr: SocketAddr,
    pub cdn_addr: SocketAddr,
}

impl Hub {
    pub async fn start(token: Option<&str>) -> Hub {
        Hub::start_with(token, None).await
    }

    /// The hub and its CDN over HTTPS, with certificates of `tls`'s CA.
    pub async fn start_tls(token: Option<&str>, tls: &TestTls) -> Hub {
        Hub::start_with(token, Some(tls)).await
    }

    async fn start_with(token: Option<&str>, tls: Option<&TestTls>) -> Hub {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let state = Arc::new(HubState {
            files: Mutex::default(),
            gated: Mutex::default(),
            token: token.map(str::to_owned),
            cdn_base: Mutex::default(),
            faults: Mutex::default(),
            throttle: Mutex::default(),
            log: Mutex::default(),
            requests: AtomicUsize::new(0),
            scheme,
        });
        let cdn_app = Router::new().fallback(cdn).with_state(state.clone());
        let hub_app = Router::new().fallback(hub).with_state(state.clone());
        let (cdn_addr, hub_addr) = match tls {
            None => (serve(cdn_app).await, serve(hub_app).await),
            Some(tls) => (serve_tls(cdn_app, tls).await, serve_tls(hub_app, tls).await),
        };
        *state.cdn_base.lock().unwrap() = format!("{scheme}://{cdn_addr}");
        Hub {
            state,
            hub_addr,
            cdn_addr,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("{}://{}", self.state.scheme, self.hub_addr)
    }

    pub fn add(&self, repo: &str, path: &str, data: Vec<u8>, lfs: bool) -> String {
        let sha256 = sha256_hex(&data);
        self.state.files.lock().unwrap().insert(
            (repo.to_owned(), path.to_owned()),
            HubFile {
                data: Bytes::from(data),
                sha256: sha256.clone(),
                lfs,
            },
        );
        sha256
    }

    pub fn gate(&self, repo: &str) {
        self.state.gated.lock().unwrap().push(repo.to_owned());
    }

    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.faults.lock().unwrap().extend(faults);
    }

    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        *self.state.throttle.lock().unwrap() = bytes_per_sec;
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn cdn_gets(&self) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| l.server == "cdn" && l.method == "GET")
            .collect()
    }
}

pub async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A certificate authority made for one test run, and a server certificate it signed for
/// `127.0.0.1` and `localhost`: what a private mirror's or a TLS-inspecting proxy's CA looks
/// like to the fetcher.
pub struct TestTls {
    pub ca_pem: String,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl TestTls {
    pub fn generate() -> TestTls {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sdkube test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&key, &*ca)
            .unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone(), ca.der().clone()], key_der)
            .unwrap();
        TestTls {
            ca_pem: ca.pem(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }

    /// Writes the CA certificate as a PEM bundle, as a user would hand it to the fetcher.
    pub fn write_ca_bundle(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}

/// TLS connections for `axum::serve`: handshakes run on their own tasks (a slow or failed
/// one holds up nobody) and finished ones are handed over in order of completion.
struct TlsListener {
    addr: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task ended (runtime shutting down): never yield again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

pub async fn serve_tls(app: Router, tls: &TestTls) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, ready) = tokio::sync::mpsc::channel(64);
    let acceptor = tls.acceptor.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                // A client refusing our certificate ends its handshake here: nothing to serve.
                if let Ok(stream) = acceptor.accept(tcp).await {
                    let _ = tx.send((stream, peer)).await;
                }
            });
        }
    });
    tokio::spawn(async move { axum::serve(TlsListener { addr, ready }, app).await.unwrap() });
    addr
}

fn record(state: &HubState, server: &'static str, method: &Method, uri: &Uri, headers: &HeaderMap) {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    state.log.lock().unwrap().push(Logged {
        server,
        method: method.to_string(),
        path: uri.path().to_owned(),
        range: header("range"),
        authorization: header("authorization"),
    });
}

fn status(code: StatusCode, text: &str) -> Response {
    (code, text.to_owned()).into_response()
}

async fn hub(
    State(state): State<Arc<HubState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&state, "hub", &method, &uri, &headers);
    let path = uri.path().trim_start_matches('/');
    let parts: Vec<&str> = path.splitn(5, '/').collect();
    let authorised = |repo: &str| {
        if !state.gated.lock().unwrap().iter().any(|g| g == repo) {
            return true;
        }
        let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
        matches!((sent, &state.token), (Some(s), Some(t)) if s == format!("Bearer {t}"))
    };
    // /api/models/{owner}/{name}/tree/{rev}?recursive=true[&cursor=N]
    if parts.first() == Some(&"api") {
        let rest: Vec<&str> = path.split('/').collect();
        if rest.len() < 6 || rest[1] != "models" || rest[4] != "tree" {
            return status(StatusCode::NOT_FOUND, "no such api");
        }
        let repo = format!("{}/{}", rest[2], rest[3]);
        if !authorised(&repo) {
            return status(StatusCode::UNAUTHORIZED, "gated");
        }
        let cursor: usize = uri
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("cursor=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut entries: Vec<(String, HubFile)> = state
            .files
            .lock()
            .unwrap()
            .iter()
            .filter(|((r, _), _)| *r == repo)
            .map(|((_, p), f)| (p.clone(), f.clone()))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        const PAGE: usize = 2;
        let page: Vec<serde_json::Value> = entries
            .iter()
            .skip(cursor)
            .take(PAGE)
            .map(|(p, f)| {
                let mut v = serde_json::json!({"type": "file", "path": p, "size": f.data.len(), "oid": "0123456789abcdef0123456789abcdef01234567"});
                if f.lfs {
                    v["lfs"] = serde_json::json!({"oid": f.sha256, "size": f.data.len(), "pointerSize": 134});
                }
                v
            })
            .collect();
        let mut response = axum::Json(page).into_response();
        if cursor + PAGE < entries.len() {
            let next = format!(
                "<{}://{}/api/models/{repo}/tree/{}?recursive=true&cursor={}>; rel=\"next\"",
                state.scheme,
                headers.get("host").unwrap().to_str().unwrap(),
                rest[5],
                cursor + PAGE
            );
            response.headers_mut().insert("link", next.parse().unwrap());
        }
        return response;
    }
    // /{owner}/{name}/resolve/{rev}/{path}
    if parts.len() != 5 || parts[2] != "resolve" {
        return status(StatusCode::NOT_FOUND, "not a resolve url");
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let (_rev, file_path) = parts[3..]
        .split_first()
        .map(|(r, p)| (*r, p.join("/")))
        .unwrap();
    let file_path = file_path.replace("%20", " ");
    if !authorised(&repo) {
        return status(StatusCode::UNAUTHORIZED, "gated repo: send a token");
    }
    let Some(file) = state.files.lock().unwrap().get(&(repo, file_path)).cloned() else {
        return status(StatusCode::NOT_FOUND, "entry not found");
    };
    if file.lfs {
        let location = format!("{}/blob/{}", state.cdn_base.lock().unwrap(), file.sha256);
        Response::builder()
            .status(StatusCode::FOUND)
            .header("location", location)
            .header("x-linked-etag", format!("\"{}\"", file.sha256))
            .header("x-linked-size", file.data.len().to_string())
            .header("etag", "\"0123456789abcdef0123456789abcdef01234567\"")
            .body(Body::empty())
            .unwrap()
    } else {
        serve_bytes(&state, &method, &headers, file.data, None, false)
    }
}

async fn cdn(
    State(state): State<Arc<HubState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&state, "cdn", &method, &uri, &headers);
    if headers.contains_key("authorization") {
        return status(StatusCode::BAD_REQUEST, "the hub token leaked to the CDN");
    }
    let Some(sha) = uri.path().strip_prefix("/blob/") else {
        return status(StatusCode::NOT_FOUND, "no blob");
    };
    let Some(file) = state
        .files
        .lock()
        .unwrap()
        .values()
        .find(|f| f.sha256 == sha)
        .cloned()
    else {
        return status(StatusCode::NOT_FOUND, "no blob");
    };
    let fault = if method == Method::GET {
        state.faults.lock().unwrap().pop_front()
    } else {
        None
    };
    let throttle = *state.throttle.lock().unwrap();
    match fault {
        Some(Fault::Status(code, after)) => {
            let mut response = status(StatusCode::from_u16(code).unwrap(), "injected");
            if let Some(after) = after {
                response
                    .headers_mut()
                    .insert("retry-after", after.to_string().parse().unwrap());
            }
            response
        }
        Some(Fault::WrongBytes) => {
            let mut data = file.data.to_vec();
            let middle = data.len() / 2;
            data[middle] ^= 0xff;
            serve_bytes(
                &state,
                &method,
                &headers,
                Bytes::from(data),
                throttle,
                false,
            )
        }
        Some(Fault::IgnoreRange) => serve_bytes(
            &state,
            &method,
            &HeaderMap::new(),
            file.data,
            throttle,
            false,
        ),
        Some(Fault::DropAfter(n)) => serve_faulty(&headers, file.data, n, false),
        Some(Fault::StallAfter(n)) => serve_faulty(&headers, file.data, n, true),
        None => serve_bytes(&state, &method, &headers, file.data, throttle, true),
    }
}

/// Parses `bytes=a-b` / `bytes=a-` against a length.
fn parse_range(headers: &HeaderMap, len: usize) -> Option<(usize, usize)> {
    let value = headers
        .get("range")?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    let (a, b) = value.split_once('-')?;
    let start: usize = a.parse().ok()?;
    let end: usize = if b.is_empty() {
        len - 1
    } else {
        b.parse::<usize>().ok()?.min(len - 1)
    };
    (start <= end).then_some((start, end))
}

fn serve_bytes(
    _state: &HubState,
    method: &Method,
    headers: &HeaderMap,
    data: Bytes,
    throttle: Option<u64>,
    ranges: bool,
) -> Response {
    let len = data.len();
    let (code, body, content_range) = match parse_range(headers, len).filter(|_| ranges) {
        Some((start, end)) => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(start..=end),
            Some(format!("bytes {start}-{end}/{len}")),
        ),
        None => (StatusCode::OK, data, None),
    };
    let mut builder = Response::builder()
        .status(code)
        .header("content-length", body.len().to_string())
        .header("accept-ranges", if ranges { "bytes" } else { "none" });
    if let Some(cr) = content_range {
        builder = builder.header("content-range", cr);
    }
    if *method == Method::HEAD {
        return builder.body(Body::empty()).unwrap();
    }
    let body = match throttle {
        None => Body::from(body),
        Some(rate) => Body::from_stream(throttled(body, rate)),
    };
    builder.body(body).unwrap()
}

fn throttled(
    data: Bytes,
    bytes_per_sec: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let piece = (bytes_per_sec / 20).max(1) as usize; // 20 pieces a second
    futures_util::stream::unfold(0usize, move |offset| {
        let data = data.clone();
        async move {
            if offset >= data.len() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let end = (offset + piece).min(data.len());
            Some((Ok(data.slice(offset..end)), end))
        }
    })
}

/// Promises the full length, sends `n` bytes, then drops the connection or stalls.
fn serve_faulty(headers: &HeaderMap, data: Bytes, n: usize, stall: bool) -> Response {
    let len = data.len();
    let (code, body, content_range) = match parse_range(headers, len) {
        Some((start, end)) => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(start..=end),
            Some(format!("bytes {start}-{end}/{len}")),
        ),
        None => (StatusCode::OK, data, None),
    };
    let promised = body.len();
    let first = body.slice(..n.min(promised));
    let stream = futures_util::stream::unfold(0u8, move |step| {
        let first = first.clone();
        async move {
            match step {
                0 => Some((Ok(first), 1)),
                1 if stall => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    None
                }
                1 => {
                    // Let hyper flush what was sent first, as a real mid-body drop would.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((Err(std::io::Error::other("injected connection drop")), 2))
                }
                _ => None,
            }
        }
    });
    let mut builder = Response::builder()
        .status(code)
        .header("content-length", promised.to_string());
    if let Some(cr) = content_range {
        builder = builder.header("content-range", cr);
    }
    builder.body(Body::from_stream(stream)).unwrap()
}

/// A forward HTTP proxy: plain requests with absolute URIs are forwarded (one per
/// connection), CONNECT is tunnelled. Records the `host:port` of every request, and of every
/// tunnel separately.
pub struct ForwardProxy {
    pub addr: SocketAddr,
    pub targets: Arc<Mutex<Vec<String>>>,
    pub tunnels: Arc<Mutex<Vec<String>>>,
}

impl ForwardProxy {
    pub async fn start() -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets: Arc<Mutex<Vec<String>>> = Arc::default();
        let tunnels: Arc<Mutex<Vec<String>>> = Arc::default();
        let (seen, tunnelled) = (targets.clone(), tunnels.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (seen, tunnelled) = (seen.clone(), tunnelled.clone());
                tokio::spawn(async move {
                    let _ = proxy_connection(client, seen, tunnelled).await;
                });
            }
        });
        ForwardProxy {
            addr,
            targets,
            tunnels,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }

    /// The `host:port` of every CONNECT tunnel opened so far.
    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

async fn proxy_connection(
    mut client: TcpStream,
    seen: Arc<Mutex<Vec<String>>>,
    tunnels: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let rest = buf[head_end..].to_vec();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut words = request_line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if method == "CONNECT" {
        seen.lock().unwrap().push(target.to_owned());
        tunnels.lock().unwrap().push(target.to_owned());
        let mut upstream = TcpStream::connect(target).await?;
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        upstream.write_all(&rest).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        return Ok(());
    }
    let Some(after_scheme) = target.strip_prefix("http://") else {
        client
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let (host, path) = match after_scheme.find('/') {
        Some(i) => (&after_scheme[..i], &after_scheme[i..]),
        None => (after_scheme, "/"),
    };
    seen.lock().unwrap().push(host.to_owned());
    let mut upstream = TcpStream::connect(host).await?;
    let mut new_head = format!("{method} {path} HTTP/1.1\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("proxy-connection:") {
            continue;
        }
        new_head.push_str(line);
        new_head.push_str("\r\n");
    }
    new_head.push_str("Connection: close\r\n\r\n");
    upstream.write_all(new_head.as_bytes()).await?;
    upstream.write_all(&rest).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
