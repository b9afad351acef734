//! What a fetch tells its caller while it runs.

use serde::Serialize;

/// One step of a fetch, for progress bars, `--progress json` lines and the server's UI.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// Another fetcher holds the store lock; this one waits.
    WaitingForLock {
        store: String,
    },
    /// What this run will do, after looking at the manifest and asking the servers.
    Plan {
        models: Vec<String>,
        files_present: usize,
        files_to_download: usize,
        /// Bytes still to transfer (sizes the servers did not tell are not counted).
        bytes_to_download: u64,
    },
    /// A verified file is already in the store; nothing was requested for it.
    FilePresent {
        model: String,
        file: String,
        size: u64,
    },
    FileStart {
        model: String,
        file: String,
        size: Option<u64>,
        /// Bytes kept from an earlier interrupted download.
        resumed_from: u64,
        connections: usize,
    },
    FileProgress {
        model: String,
        file: String,
        bytes: u64,
        size: Option<u64>,
        bytes_per_sec: f64,
    },
    Retry {
        model: String,
        file: String,
        attempt: u32,
        delay_ms: u64,
        reason: String,
    },
    FileDone {
        model: String,
        file: String,
        size: u64,
        sha256: String,
        seconds: f64,
    },
    ModelReady {
        model: String,
        path: String,
    },
    Done {
        files_downloaded: usize,
        bytes_downloaded: u64,
        seconds: f64,
    },
}
