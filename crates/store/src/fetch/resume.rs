//! What survives an interrupted download (the partial file and its resume state beside it),
//! and how a file is cut into ranges.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::FileJob;

pub(super) fn partial_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

pub(super) fn state_path(partial: &Path) -> PathBuf {
    let mut name = partial.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

/// What survives an interrupted download, next to the partial file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct ResumeState {
    pub(super) url: String,
    pub(super) size: Option<u64>,
    pub(super) sha256: Option<String>,
    pub(super) chunks: Vec<ChunkState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(super) struct ChunkState {
    pub(super) start: u64,
    /// Exclusive; `None` when the file size is unknown (single chunk to the end).
    pub(super) end: Option<u64>,
    /// Bytes written (and flushed before this state was saved) from `start`.
    pub(super) done: u64,
}

impl ResumeState {
    pub(super) fn done(&self) -> u64 {
        self.chunks.iter().map(|c| c.done).sum()
    }
}

pub(super) fn load_state(partial: &Path, job: &FileJob) -> Option<ResumeState> {
    let bytes = std::fs::read(state_path(partial)).ok()?;
    let state: ResumeState = serde_json::from_slice(&bytes).ok()?;
    let valid = state.url == job.url
        && state.size == job.size
        && state.sha256 == job.sha256
        && !state.chunks.is_empty()
        && state
            .chunks
            .iter()
            .all(|c| c.end.is_none_or(|end| c.start + c.done <= end));
    valid.then_some(state)
}

/// A ranged download is cut into up to this many pieces per connection, of at least
/// [`MIN_PIECE`] bytes. The connections take the pieces in file order, so the complete prefix
/// of the file, which is all that can be hashed yet, grows at the speed of all connections
/// together and the hash ends a piece or so after the last byte arrives.
const PIECES_PER_CONNECTION: u64 = 8;
const MIN_PIECE: u64 = 8 << 20;

pub(super) fn plan_chunks(
    size: Option<u64>,
    connections: usize,
    ranged_min_size: u64,
) -> Vec<ChunkState> {
    match size {
        Some(size) if connections > 1 && size >= ranged_min_size.max(connections as u64) => {
            let per_connection =
                (size / (connections as u64 * MIN_PIECE)).clamp(1, PIECES_PER_CONNECTION);
            let n = connections as u64 * per_connection;
            (0..n)
                .map(|i| ChunkState {
                    start: size * i / n,
                    end: Some(size * (i + 1) / n),
                    done: 0,
                })
                .collect()
        }
        _ => vec![ChunkState {
            start: 0,
            end: size,
            done: 0,
        }],
    }
}

pub(super) fn save_state(path: &Path, state: &ResumeState) -> std::io::Result<()> {
    let tmp = {
        let mut name = path.as_os_str().to_owned();
        name.push(".tmp");
        PathBuf::from(name)
    };
    std::fs::write(
        &tmp,
        serde_json::to_vec(state).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

/// Where the complete prefix of the file ends: chunks are contiguous and in file order.
pub(super) fn complete_prefix(state: &ResumeState) -> u64 {
    let mut end = 0;
    for chunk in &state.chunks {
        if chunk.start != end {
            break;
        }
        end = chunk.start + chunk.done;
        if chunk.end != Some(end) {
            break;
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_file_exactly() {
        for (size, pieces) in [
            (64u64 << 20, 8),
            ((64 << 20) + 7, 8),
            (100 << 20, 12),
            (1 << 31, 32),
        ] {
            let chunks = plan_chunks(Some(size), 4, 64 << 20);
            assert_eq!(chunks.len(), pieces, "{size}");
            assert_eq!(chunks[0].start, 0);
            assert_eq!(chunks[pieces - 1].end, Some(size));
            for pair in chunks.windows(2) {
                assert_eq!(pair[0].end, Some(pair[1].start));
            }
        }
        assert_eq!(plan_chunks(Some(1000), 4, 64 << 20).len(), 1);
        assert_eq!(plan_chunks(None, 4, 0).len(), 1);
    }
}
