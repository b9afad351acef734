//! What a fetch tells its caller while it runs.

use serde::Serialize;

/// One step of a fetch, for progress bars, `--progress json` lines and the server's UI.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// Another fetcher holds the store lock; this one waits.
    WaitingForLock {
        /// The store's directory.
        store: String,
    },
    /// What this run will do, after looking at the manifest and asking the servers.
    Plan {
        /// The models asked for.
        models: Vec<String>,
        /// Files already in the store, verified.
        files_present: usize,
        /// Files to download.
        files_to_download: usize,
        /// Bytes still to transfer (sizes the servers did not tell are not counted).
        bytes_to_download: u64,
    },
    /// A verified file is already in the store; nothing was requested for it.
    FilePresent {
        /// The model.
        model: String,
        /// The file, relative to the model's directory.
        file: String,
        /// Its size in bytes.
        size: u64,
    },
    /// A download starts (or resumes).
    FileStart {
        /// The model.
        model: String,
        /// The file, relative to the model's directory.
        file: String,
        /// Its size in bytes, when known.
        size: Option<u64>,
        /// Bytes kept from an earlier interrupted download.
        resumed_from: u64,
        /// Parallel connections it uses.
        connections: usize,
    },
    /// Bytes arrived (at most once per `progress_interval` for a file).
    FileProgress {
        /// The model.
        model: String,
        /// The file, relative to the model's directory.
        file: String,
        /// Bytes of the file received so far, resumed ones included.
        bytes: u64,
        /// Its size in bytes, when known.
        size: Option<u64>,
        /// Speed of this run so far.
        bytes_per_sec: f64,
    },
    /// A request failed and will be tried again.
    Retry {
        /// The model (empty for metadata requests).
        model: String,
        /// The file (the URL for metadata requests).
        file: String,
        /// Attempts without progress so far.
        attempt: u32,
        /// Wait before the next attempt.
        delay_ms: u64,
        /// What went wrong.
        reason: String,
    },
    /// A file is downloaded, verified and in place.
    FileDone {
        /// The model.
        model: String,
        /// The file, relative to the model's directory.
        file: String,
        /// Its size in bytes.
        size: u64,
        /// Its sha256, lower-case hex.
        sha256: String,
        /// Time the file took.
        seconds: f64,
    },
    /// Every file of a model is in the store.
    ModelReady {
        /// The model.
        model: String,
        /// Its directory.
        path: String,
    },
    /// The fetch is over.
    Done {
        /// Files downloaded by this run.
        files_downloaded: usize,
        /// Bytes those files hold.
        bytes_downloaded: u64,
        /// Time the whole run took.
        seconds: f64,
    },
}
