//! Accepting connections so that no client can hold the server down for the others: every
//! connection has a deadline to send a request's headers (and to send the next one on a kept-
//! alive connection), a request body has a deadline to arrive, and the connections open at once
//! are capped below the process's file limit. Past the cap a connection is answered 503 at
//! once and closed, instead of waiting unseen in the kernel's queue: a handful of slow clients
//! cannot make `/healthz` time out (and the kubelet restart a healthy pod).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// How connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most connections open at once (the file limit lowers it, see [`effective_cap`]).
    pub max_connections: usize,
    /// Time to send a request's headers, and between requests on a kept-alive connection.
    pub header_timeout: Duration,
}

/// File descriptors kept for everything but client connections (model files, Redis, logs).
const RESERVED_FILES: usize = 64;

/// The cap: `max_connections`, or less when the soft file limit would not allow it.
pub fn effective_cap(max_connections: usize) -> usize {
    match open_files_limit() {
        Some(limit) => max_connections.min(limit.saturating_sub(RESERVED_FILES).max(1)),
        None => max_connections,
    }
}

/// The soft limit on open files, from /proc (Linux).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What a connection past the cap gets before it is closed.
fn over_cap(cap: usize) -> Vec<u8> {
    let message = format!("too many open connections (the limit is {cap}); retry later");
    let body = serde_json::json!({"error": message, "detail": message}).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` until `shutdown` resolves, then lets open requests end (at most `drain`).
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()> {
    let cap = effective_cap(limits.max_connections);
    let refusal: Arc<[u8]> = over_cap(cap).into();
    let slots = Arc::new(Semaphore::new(cap));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_timeout));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (mut stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let refusal = refusal.clone();
            tokio::spawn(async move {
                // Clients expect the answer after their request: read what came (briefly).
                let mut head = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut head)).await;
                let _ = stream.write_all(&refusal).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                async move {
                    Ok::<_, Infallible>(
                        app.oneshot(req.map(axum::body::Body::new))
                            .await
                            .unwrap_or_else(|e| match e {}),
                    )
                }
            });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {drain:?}: closing them");
    }
    Ok(())
}
