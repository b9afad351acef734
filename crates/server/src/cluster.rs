//! What every replica must agree on besides the jobs: A1111's options (the selected
//! checkpoint among them), and what each worker reports about itself (its device, model and
//! the upscalers, face restorers, checkpoints, embeddings and LoRAs it can use), which the `api`
//! role answers its lists from. In one process ([`MemoryCluster`]) both are plain memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lock;
use crate::model::{CheckpointInfo, ModelStatus};
use crate::post::UpscalerInfo;
use crate::queue::QueueError;

/// A worker's report, refreshed every few seconds while it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    /// `host/pid`, unique while the process lives.
    pub id: String,
    /// Device labels of its device workers, e.g. `cuda:0`.
    pub devices: Vec<String>,
    pub model: ModelStatus,
    pub checkpoints: Vec<CheckpointInfo>,
    pub upscalers: Vec<UpscalerInfo>,
    pub face_restorers: Vec<String>,
    /// `/sdapi/v1/embeddings`' answer for its loaded model, when one is loaded.
    pub embeddings: Option<Value>,
    /// `/sdapi/v1/loras`' answer: the files of its LoRA folders (absent from older workers).
    #[serde(default)]
    pub loras: Option<Value>,
    /// `/controlnet/model_list`'s titles: its ControlNet folders and store (absent from older
    /// workers).
    #[serde(default)]
    pub controlnets: Option<Vec<String>>,
    /// Device memory in use, bytes per device label.
    pub device_memory: Vec<(String, u64)>,
    /// Jobs it is running now.
    pub running: usize,
    pub seen: SystemTime,
}

/// How long a report stays valid: a worker that stopped reporting for this long is gone.
pub const REPORT_TTL: Duration = Duration::from_secs(15);

impl WorkerReport {
    pub fn is_live(&self) -> bool {
        self.seen.elapsed().map_or(true, |age| age < REPORT_TTL)
    }
}

#[async_trait]
pub trait Cluster: Send + Sync {
    /// Options set through `POST /sdapi/v1/options`.
    async fn options(&self) -> Result<Map<String, Value>, QueueError>;
    async fn set_options(&self, changes: &Map<String, Value>) -> Result<(), QueueError>;
    /// Publishes (or refreshes) a worker's report.
    async fn report(&self, report: &WorkerReport) -> Result<(), QueueError>;
    /// Removes a worker's report (it stopped).
    async fn forget(&self, id: &str) -> Result<(), QueueError>;
    /// Reports of the live workers, most recent first.
    async fn workers(&self) -> Result<Vec<WorkerReport>, QueueError>;
}

#[derive(Default)]
pub struct MemoryCluster {
    options: Mutex<Map<String, Value>>,
    workers: Mutex<HashMap<String, WorkerReport>>,
}

#[async_trait]
impl Cluster for MemoryCluster {
    async fn options(&self) -> Result<Map<String, Value>, QueueError> {
        Ok(lock(&self.options).clone())
    }

    async fn set_options(&self, changes: &Map<String, Value>) -> Result<(), QueueError> {
        let mut o = lock(&self.options);
        for (k, v) in changes {
            o.insert(k.clone(), v.clone());
        }
        Ok(())
    }

    async fn report(&self, report: &WorkerReport) -> Result<(), QueueError> {
        lock(&self.workers).insert(report.id.clone(), report.clone());
        Ok(())
    }

    async fn forget(&self, id: &str) -> Result<(), QueueError> {
        lock(&self.workers).remove(id);
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerReport>, QueueError> {
        let mut out: Vec<WorkerReport> = lock(&self.workers)
            .values()
            .filter(|r| r.is_live())
            .cloned()
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.seen));
        Ok(out)
    }
}
