//! The connection every Redis call goes through: the connection manager (one multiplexed
//! connection, re-established in the background when Redis goes away), plus a retry of a
//! command that met a dropped connection. Without it the first command after a Redis restart
//! or failover fails even though Redis is back. Everything sdkube sends is safe to send twice:
//! the scripts check what they already did, and the rest are reads or overwrites.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Tries after a dropped connection, waiting 0.1, 0.2, 0.4 then 0.8 s for the reconnect.
const RETRIES: u32 = 4;

#[derive(Clone)]
pub struct Conn(ConnectionManager);

impl Conn {
    pub fn new(manager: ConnectionManager) -> Self {
        Self(manager)
    }
}

fn dropped(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal()
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut wait = Duration::from_millis(100);
            let mut tries = 0;
            loop {
                match self.0.req_packed_command(cmd).await {
                    Err(e) if dropped(&e) && tries < RETRIES => {
                        tries += 1;
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                    result => return result,
                }
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut wait = Duration::from_millis(100);
            let mut tries = 0;
            loop {
                match self.0.req_packed_commands(pipeline, offset, count).await {
                    Err(e) if dropped(&e) && tries < RETRIES => {
                        tries += 1;
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                    result => return result,
                }
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}
