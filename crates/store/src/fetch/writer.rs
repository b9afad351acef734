//! The blocking half of a download: positional or streamed writes, the sha256 in file order
//! on its own thread, and checkpoints of the resume state on another.

use std::path::Path;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::resume::{complete_prefix, save_state, state_path, ResumeState};
use crate::direct::StreamWriter;

/// How often (in bytes written) the partial file is flushed and resume state saved. The flush
/// runs beside the download ([`Checkpointer`]); flushing often keeps the final fsync, which
/// the download does wait for, short.
pub(super) const SAVE_EVERY: u64 = 64 << 20;

pub(super) enum WriteOp {
    Data {
        chunk: usize,
        offset: u64,
        bytes: bytes::Bytes,
    },
    /// The server ignored our Range: the single chunk starts over from byte 0.
    Restart,
}

fn thread_panicked(what: &str) -> std::io::Error {
    std::io::Error::other(format!("the {what} thread panicked"))
}

/// Flushes the partial file and then saves resume state, on its own thread so that a slow
/// disk never holds up the download. A state is queued only after the bytes it claims were
/// written, and the flush starts after it is queued, so a saved state never claims bytes that
/// are not on disk.
struct Checkpointer {
    queue: Option<std::sync::mpsc::SyncSender<ResumeState>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Checkpointer {
    fn spawn(file: &std::fs::File, state_file: &Path) -> std::io::Result<Checkpointer> {
        let file = file.try_clone()?;
        let state_file = state_file.to_owned();
        // One state waiting at most: a disk slower than the network slows the download down
        // instead of queueing memory.
        let (queue, states) = std::sync::mpsc::sync_channel::<ResumeState>(1);
        let thread = std::thread::Builder::new()
            .name("sdkube-fetch-fsync".into())
            .spawn(move || {
                for state in states {
                    file.sync_data()?;
                    save_state(&state_file, &state)?;
                }
                Ok(())
            })?;
        Ok(Checkpointer {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues a checkpoint. A failed flush stops the thread; [`Checkpointer::finish`] says why.
    fn save(&self, state: ResumeState) {
        if let Some(queue) = &self.queue {
            let _ = queue.send(state);
        }
    }

    /// Waits for every queued checkpoint; the first error, if any.
    fn finish(mut self) -> std::io::Result<()> {
        drop(self.queue.take());
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| thread_panicked("fsync"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum HashOp {
    /// The next bytes of the file, in order (a single stream hands its chunks over).
    Data(bytes::Bytes),
    /// The file is complete up to this offset: hash what is not hashed yet, read back from the
    /// file (ranged downloads, whose pieces arrive out of order; the pages are still cached).
    UpTo(u64),
    /// Start over from byte 0.
    Restart,
}

/// SHA-256 of the file computed in file order on its own thread, while the download runs:
/// hashing costs about as much CPU as receiving and writing together, so doing it beside the
/// writes (instead of between them, or after the download) is what lets one stream keep up
/// with curl and spares ranged downloads a second pass over the file.
struct OrderedHasher {
    queue: Option<std::sync::mpsc::SyncSender<HashOp>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<(Sha256, u64)>>>,
}

impl OrderedHasher {
    /// Continues `hasher`, which has hashed the first `hashed` bytes of `file`.
    fn spawn(
        file: &std::fs::File,
        mut hasher: Sha256,
        mut hashed: u64,
    ) -> std::io::Result<OrderedHasher> {
        use std::os::unix::fs::FileExt;
        let file = file.try_clone()?;
        // Chunks are a few hundred kB: a short queue is enough to keep both threads busy.
        let (queue, ops) = std::sync::mpsc::sync_channel::<HashOp>(16);
        let thread = std::thread::Builder::new()
            .name("sdkube-fetch-sha256".into())
            .spawn(move || {
                let mut buf = Vec::new();
                for op in ops {
                    match op {
                        HashOp::Data(bytes) => {
                            hasher.update(&bytes);
                            hashed += bytes.len() as u64;
                        }
                        HashOp::UpTo(end) => {
                            buf.resize(1 << 20, 0);
                            while hashed < end {
                                let n = (end - hashed).min(buf.len() as u64) as usize;
                                file.read_exact_at(&mut buf[..n], hashed)?;
                                hasher.update(&buf[..n]);
                                hashed += n as u64;
                            }
                        }
                        HashOp::Restart => {
                            hasher = Sha256::new();
                            hashed = 0;
                        }
                    }
                }
                Ok((hasher, hashed))
            })?;
        Ok(OrderedHasher {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues work. A failed read stops the thread; [`OrderedHasher::finish`] says why.
    fn send(&self, op: HashOp) {
        if let Some(queue) = &self.queue {
            let _ = queue.send(op);
        }
    }

    /// The hash and how many bytes from the start of the file it covers.
    fn finish(mut self) -> std::io::Result<(Sha256, u64)> {
        drop(self.queue.take());
        self.thread
            .take()
            .ok_or_else(|| thread_panicked("sha256"))?
            .join()
            .map_err(|_| thread_panicked("sha256"))?
    }
}

impl Drop for OrderedHasher {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A ranged download tells the hasher about its complete prefix in steps of at least this.
const HASH_STEP: u64 = 8 << 20;

/// The blocking half of a download: the writes (a single stream's through [`StreamWriter`],
/// ranged pieces positional), the hash in file order ([`OrderedHasher`]), and resume state
/// that only ever claims bytes already flushed to the partial file ([`Checkpointer`], every
/// `checkpoint_every` bytes). The hash comes back when it covers the whole file.
pub(super) fn run_writer(
    file: std::fs::File,
    partial: &Path,
    single: bool,
    mut state: ResumeState,
    mut rx: mpsc::Receiver<WriteOp>,
    checkpoint_every: u64,
) -> std::io::Result<(Option<Sha256>, ResumeState)> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let state_file = state_path(partial);
    let mut stream = None;
    let hasher = if single {
        // Hash what an earlier run already wrote, so the stream's hash covers the whole file.
        let mut h = Sha256::new();
        let kept = state.chunks[0].done;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, (&file).take(kept));
        let copied = std::io::copy(&mut reader, &mut HashWriter(&mut h))?;
        if copied != kept {
            return Err(std::io::Error::other(
                "partial file is shorter than its resume state",
            ));
        }
        // Staging no more than a checkpoint's worth lets every checkpoint claim recent bytes.
        stream = Some(StreamWriter::new(&file, partial, kept, checkpoint_every)?);
        OrderedHasher::spawn(&file, h, kept)?
    } else {
        OrderedHasher::spawn(&file, Sha256::new(), 0)?
    };
    let mut told_prefix = 0u64;
    let mut tell_prefix = |state: &ResumeState, force: bool| {
        let prefix = complete_prefix(state);
        if prefix > told_prefix && (force || prefix >= told_prefix + HASH_STEP) {
            hasher.send(HashOp::UpTo(prefix));
            told_prefix = prefix;
        }
    };
    if !single {
        tell_prefix(&state, true);
    }
    let mut checkpoints = Checkpointer::spawn(&file, &state_file)?;
    let mut unsaved = 0u64;
    while let Some(op) = rx.blocking_recv() {
        match op {
            WriteOp::Data {
                chunk,
                offset,
                bytes,
            } => {
                let n = bytes.len() as u64;
                match &mut stream {
                    Some(stream) => {
                        if offset != stream.end() {
                            return Err(std::io::Error::other("single-stream write out of order"));
                        }
                        stream.write(&bytes)?;
                        hasher.send(HashOp::Data(bytes));
                        // Only what left the stage is in the file.
                        let written = stream.written();
                        unsaved += written - state.chunks[0].done;
                        state.chunks[0].done = written;
                    }
                    None => {
                        file.write_all_at(&bytes, offset)?;
                        state.chunks[chunk].done += n;
                        tell_prefix(&state, false);
                        unsaved += n;
                    }
                }
                if unsaved >= checkpoint_every {
                    checkpoints.save(state.clone());
                    unsaved = 0;
                }
            }
            WriteOp::Restart => {
                // Let queued checkpoints land before the file shrinks under them.
                checkpoints.finish()?;
                hasher.send(HashOp::Restart);
                state.chunks[0].done = 0;
                if let Some(stream) = &mut stream {
                    stream.restart_at(0)?;
                }
                if state.size.is_none() {
                    file.set_len(0)?;
                }
                save_state(&state_file, &state)?;
                unsaved = 0;
                checkpoints = Checkpointer::spawn(&file, &state_file)?;
            }
        }
    }
    if let Some(stream) = &mut stream {
        stream.finish()?;
        state.chunks[0].done = stream.written();
    }
    if !single {
        tell_prefix(&state, true);
    }
    checkpoints.finish()?;
    if state.size.is_none() {
        file.set_len(state.chunks[0].done)?;
    }
    file.sync_data()?;
    save_state(&state_file, &state)?;
    let (hash, hashed) = hasher.finish()?;
    let whole = hashed == state.done() && state.size.is_none_or(|size| size == hashed);
    Ok((whole.then_some(hash), state))
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::fetch::resume::plan_chunks;
    use crate::store::hex;

    /// The writer's own threads: in-order hashing across a restart, a checkpoint saved while
    /// the download still runs (claiming only bytes already in the file), the final state.
    #[test]
    fn writer_hashes_in_order_checkpoints_on_the_way_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("f.partial");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial)
            .unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let state = ResumeState {
            url: "http://x/f".into(),
            size: None,
            sha256: None,
            chunks: plan_chunks(None, 1, 0),
        };
        let state_file = state_path(&partial);
        let (tx, rx) = mpsc::channel(4);
        let writer = std::thread::spawn({
            let partial = partial.clone();
            move || run_writer(file, &partial, true, state, rx, 10_000)
        });
        let send = |offset: usize, bytes: &[u8]| {
            tx.blocking_send(WriteOp::Data {
                chunk: 0,
                offset: offset as u64,
                bytes: bytes::Bytes::copy_from_slice(bytes),
            })
            .unwrap()
        };
        // A server that ignored our Range: what came first is thrown away, hash included.
        // Less than one checkpoint's worth, so every checkpoint the test can read below was
        // saved after the restart (a larger prefix raced the poll: CI once read a checkpoint
        // of the thrown-away bytes).
        send(0, &[0xAA; 9_000]);
        tx.blocking_send(WriteOp::Restart).unwrap();
        let pieces: Vec<&[u8]> = data.chunks(7_000).collect();
        for (i, piece) in pieces[..3].iter().enumerate() {
            send(i * 7_000, piece);
        }
        // 21 000 bytes written, checkpoint every 10 000: one lands while the writer waits.
        let deadline = Instant::now() + Duration::from_secs(10);
        let saved = loop {
            let saved = std::fs::read(&state_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<ResumeState>(&b).ok());
            match saved {
                Some(s) if s.done() > 0 => break s,
                _ if Instant::now() > deadline => panic!("no checkpoint was saved"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let claimed = saved.done() as usize;
        assert!((10_000..=21_000).contains(&claimed), "{claimed}");
        assert_eq!(std::fs::read(&partial).unwrap()[..claimed], data[..claimed]);
        for (i, piece) in pieces.iter().enumerate().skip(3) {
            send(i * 7_000, piece);
        }
        drop(tx);
        let (hasher, state) = writer.join().unwrap().unwrap();
        assert_eq!(
            hex(&hasher.unwrap().finalize()),
            hex(&Sha256::digest(&data))
        );
        assert_eq!(state.done(), data.len() as u64);
        assert_eq!(std::fs::read(&partial).unwrap(), data);
        let saved: ResumeState =
            serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
        assert_eq!(saved, state);
    }

    /// Ranged pieces arrive out of order; the hash still comes out of the writer, read back in
    /// file order, including a piece an earlier run had already finished.
    #[test]
    fn writer_hashes_ranged_pieces_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("f.partial");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let mut kept = data[..25_000].to_vec();
        kept.resize(data.len(), 0); // preallocated file: only the first piece is real
        std::fs::write(&partial, &kept).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&partial)
            .unwrap();
        let mut chunks = plan_chunks(Some(100_000), 4, 0);
        assert_eq!(chunks.len(), 4);
        chunks[0].done = 25_000;
        let state = ResumeState {
            url: "http://x/f".into(),
            size: Some(100_000),
            sha256: None,
            chunks,
        };
        let (tx, rx) = mpsc::channel(4);
        let writer = std::thread::spawn({
            let partial = partial.clone();
            move || run_writer(file, &partial, false, state, rx, 10_000)
        });
        for chunk in [3usize, 1, 2] {
            for offset in (chunk * 25_000..(chunk + 1) * 25_000).step_by(5_000) {
                tx.blocking_send(WriteOp::Data {
                    chunk,
                    offset: offset as u64,
                    bytes: bytes::Bytes::copy_from_slice(&data[offset..offset + 5_000]),
                })
                .unwrap();
            }
        }
        drop(tx);
        let (hasher, state) = writer.join().unwrap().unwrap();
        assert_eq!(state.done(), 100_000);
        assert_eq!(std::fs::read(&partial).unwrap(), data);
        assert_eq!(
            hex(&hasher.expect("the hash covers the file").finalize()),
            hex(&Sha256::digest(&data))
        );
    }
}
