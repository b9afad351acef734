//! The shared queue, gallery and cluster state in Redis, for `api` and `worker` replicas.
//!
//! Why Redis, and how it is used (README, "Scaling out", says the same to users):
//! - the queue is a Redis **stream** read by one **consumer group**: a job delivered to a
//!   worker stays in the group's pending list until the worker acknowledges it, a worker
//!   keeps its entries fresh while it runs them, and an entry idle for longer than the
//!   visibility timeout (its worker died) is claimed by another worker (`XAUTOCLAIM`);
//! - each job is a hash (spec, status, preview, flags) whose changes are published on one
//!   pub/sub channel, so that any API replica streams any job's events;
//! - the moves that must not interleave (submit under the capacity, claim, finish once,
//!   cancel, hand back) are Lua scripts, which Redis runs atomically;
//! - the waiting jobs are also a sorted set by submission order: the queue's depth (429 when
//!   full, cluster-wide), each job's place in line, and the stream's read-ahead for batching
//!   compatible jobs come from there.
//!
//! Durability is Redis's: with `appendonly yes` (the chart's bundled Redis), queued jobs,
//! records and results survive a Redis restart up to the last second of writes.

mod cluster;
mod conn;
mod gallery;
mod queue;

use std::time::Duration;

use redis::RedisError;

use conn::Conn;

pub use cluster::RedisCluster;
pub use gallery::RedisGallery;
pub use queue::RedisQueue;

use crate::config::SharedQueue;
use crate::queue::QueueError;

/// The consumer group every worker reads the stream in.
const GROUP: &str = "workers";

/// Key names under the deployment's prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }
    fn queue(&self) -> String {
        self.key("queue")
    }
    fn waiting(&self) -> String {
        self.key("waiting")
    }
    fn running(&self) -> String {
        self.key("running")
    }
    fn recent(&self) -> String {
        self.key("recent")
    }
    fn seq(&self) -> String {
        self.key("seq")
    }
    fn job(&self, id: &str) -> String {
        self.key(&format!("job:{id}"))
    }
    fn png(&self, id: &str, i: usize) -> String {
        self.key(&format!("png:{id}:{i}"))
    }
    fn events(&self) -> String {
        self.key("events")
    }
    fn signals(&self) -> String {
        self.key("signals")
    }
    fn options(&self) -> String {
        self.key("options")
    }
    fn workers(&self) -> String {
        self.key("workers")
    }
    fn gallery(&self) -> String {
        self.key("gallery")
    }
    fn gallery_seq(&self) -> String {
        self.key("gallery:seq")
    }
    fn output(&self, name: &str) -> String {
        self.key(&format!("out:{name}"))
    }
}

/// A connection to the shared Redis, from which the three backends are made.
pub struct Engine {
    client: redis::Client,
    conn: Conn,
    keys: Keys,
    config: SharedQueue,
    capacity: usize,
}

/// Most time one command may take (a large image included) before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn engine_error(e: RedisError) -> QueueError {
    QueueError::Engine(e.to_string())
}

impl Engine {
    /// Connects and makes sure the stream and its consumer group exist.
    pub async fn connect(config: &SharedQueue, capacity: usize) -> anyhow::Result<Engine> {
        // rediss:// goes through rustls, with the same crypto as the model fetcher.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client =
            client(config).map_err(|e| anyhow::anyhow!("--queue {}: {e}", redact(&config.url)))?;
        let conn = manager(&client).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the queue at {}: {e} ({})",
                redact(&config.url),
                connect_hint(&e)
            )
        })?;
        let keys = Keys {
            prefix: config.prefix.clone(),
        };
        let mut c = conn.clone();
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.queue())
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => anyhow::bail!("creating the job stream in {}: {e}", redact(&config.url)),
        }
        Ok(Engine {
            client,
            conn,
            keys,
            config: config.clone(),
            capacity,
        })
    }

    /// The queue, read by this process as consumer `consumer` (its `host/pid`).
    pub fn queue(&self, consumer: &str) -> RedisQueue {
        RedisQueue::new(
            self.client.clone(),
            self.conn.clone(),
            self.keys.clone(),
            self.config.clone(),
            self.capacity,
        )
        .with_consumer(consumer)
    }

    pub fn gallery(&self) -> RedisGallery {
        RedisGallery::new(
            self.conn.clone(),
            self.keys.clone(),
            self.config.gallery_keep,
        )
    }

    pub fn cluster(&self) -> RedisCluster {
        RedisCluster::new(self.conn.clone(), self.keys.clone())
    }
}

/// The client of `--queue`: the password of `SDKUBE_QUEUE_PASSWORD` when set (a password
/// from a Secret need not be URL-safe), and for `rediss://` the system's CAs plus
/// `SDKUBE_CA_BUNDLE`'s, as the model fetcher trusts them.
fn client(config: &SharedQueue) -> Result<redis::Client, String> {
    use redis::IntoConnectionInfo;
    let mut info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| e.to_string())?;
    if let Some(password) = &config.password {
        let redis = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(redis);
    }
    match (config.url.starts_with("rediss://"), extra_roots()?) {
        (true, Some(roots)) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(roots),
            },
        )
        .map_err(|e| e.to_string()),
        _ => redis::Client::open(info).map_err(|e| e.to_string()),
    }
}

/// The system's CA certificates followed by `SDKUBE_CA_BUNDLE`'s (PEM), when that is set.
fn extra_roots() -> Result<Option<Vec<u8>>, String> {
    let Some(bundle) = std::env::var_os("SDKUBE_CA_BUNDLE").filter(|b| !b.is_empty()) else {
        return Ok(None);
    };
    let mut pem = std::fs::read(&bundle).map_err(|e| {
        format!(
            "SDKUBE_CA_BUNDLE {}: {e}",
            std::path::Path::new(&bundle).display()
        )
    })?;
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain([
            "/etc/ssl/certs/ca-certificates.crt".into(),
            "/etc/pki/tls/certs/ca-bundle.crt".into(),
        ]);
    if let Some(mut roots) = system.filter_map(|p| std::fs::read(p).ok()).next() {
        roots.push(b'\n');
        roots.append(&mut pem);
        pem = roots;
    }
    Ok(Some(pem))
}

async fn manager(client: &redis::Client) -> Result<Conn, RedisError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    Ok(Conn::new(
        client.get_connection_manager_with_config(config).await?,
    ))
}

/// What to check when the first connection fails.
fn connect_hint(e: &RedisError) -> &'static str {
    let text = e.to_string().to_lowercase();
    if e.kind() == redis::ErrorKind::AuthenticationFailed || text.contains("wrongpass") {
        "check the password in the queue URL, or the secret it comes from"
    } else if text.contains("certificate") || text.contains("tls") {
        "rediss:// checks the server's certificate: trust its CA with SDKUBE_CA_BUNDLE"
    } else {
        "is Redis running and reachable from here?"
    }
}

/// The URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
