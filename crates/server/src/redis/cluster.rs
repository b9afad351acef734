//! A1111's options and the workers' reports in Redis, read and written by every replica.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use serde_json::{Map, Value};

use super::{engine_error, Conn, Keys};
use crate::cluster::{Cluster, WorkerReport, REPORT_TTL};
use crate::queue::QueueError;

pub struct RedisCluster {
    conn: Conn,
    keys: Keys,
}

impl RedisCluster {
    pub fn new(conn: Conn, keys: Keys) -> Self {
        Self { conn, keys }
    }
}

#[async_trait]
impl Cluster for RedisCluster {
    async fn options(&self) -> Result<Map<String, Value>, QueueError> {
        let mut c = self.conn.clone();
        let stored: Vec<(String, String)> =
            c.hgetall(self.keys.options()).await.map_err(engine_error)?;
        Ok(stored
            .into_iter()
            .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|v| (k, v)))
            .collect())
    }

    async fn set_options(&self, changes: &Map<String, Value>) -> Result<(), QueueError> {
        if changes.is_empty() {
            return Ok(());
        }
        let fields: Vec<(String, String)> = changes
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        let mut c = self.conn.clone();
        c.hset_multiple::<_, _, _, ()>(self.keys.options(), &fields)
            .await
            .map_err(engine_error)
    }

    async fn report(&self, report: &WorkerReport) -> Result<(), QueueError> {
        let json = serde_json::to_string(report).map_err(|e| QueueError::Engine(e.to_string()))?;
        let mut c = self.conn.clone();
        c.hset::<_, _, _, ()>(self.keys.workers(), &report.id, json)
            .await
            .map_err(engine_error)
    }

    async fn forget(&self, id: &str) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        c.hdel::<_, _, ()>(self.keys.workers(), id)
            .await
            .map_err(engine_error)
    }

    async fn workers(&self) -> Result<Vec<WorkerReport>, QueueError> {
        let mut c = self.conn.clone();
        let all: Vec<(String, String)> =
            c.hgetall(self.keys.workers()).await.map_err(engine_error)?;
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for (id, json) in all {
            match serde_json::from_str::<WorkerReport>(&json) {
                Ok(r) if r.is_live() => live.push(r),
                // Reports of workers killed without a goodbye are dropped after a while.
                Ok(r) if r.seen.elapsed().unwrap_or(Duration::ZERO) > REPORT_TTL * 20 => {
                    gone.push(id)
                }
                Ok(_) => {}
                Err(_) => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _: Result<(), _> = c.hdel(self.keys.workers(), gone).await;
        }
        live.sort_by_key(|r| std::cmp::Reverse(r.seen));
        Ok(live)
    }
}
