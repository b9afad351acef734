//! Front-to-back writes of one downloaded stream that bypass the page cache (`O_DIRECT`).
//!
//! A buffered write copies every byte into the page cache, and the fsync that a verified file
//! needs then writes it all out again: on this project's 2-core machine that copy and its
//! writeback cost about as much CPU as the sha256. Direct writes go from our buffer to the
//! disk (by DMA), which took a single stream from 0.85–1.05× curl's speed to 1.24× (README,
//! "Benchmarks"). They also leave the page cache, which Kubernetes charges to the pod's memory
//! cgroup, to the files that are being read.
//!
//! `O_DIRECT` wants the file offset, the length and the buffer aligned to the device's block
//! size, so bytes are staged in an aligned buffer and written in whole blocks; the tail that
//! does not fill a block goes through the ordinary (buffered) file at the end. Where the file
//! system refuses direct I/O (tmpfs on older kernels, some network file systems), everything
//! goes through the ordinary file instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Alignment of direct writes: 4 KiB covers the logical block size of every common disk.
const ALIGN: usize = 4096;
/// The most one direct write carries: large enough that the disk sees few, long requests.
const MAX_STAGE: u64 = 4 << 20;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; ALIGN]);

pub(crate) struct StreamWriter {
    /// The partial file as the rest of the fetcher has it open (buffered).
    file: File,
    /// The same file opened again with `O_DIRECT`; `None` where that is not possible.
    direct: Option<File>,
    stage: Vec<Block>,
    /// File offset of `stage[0]`: aligned while `direct` is in use.
    stage_start: u64,
    /// Bytes held in `stage`.
    staged: usize,
    /// Where the stream (re)started: the file already had every byte before it.
    resumed_at: u64,
}

impl StreamWriter {
    /// Continues the file at `start`; bytes before `start` are already in it. At most
    /// `max_stage` bytes (and never more than 4 MiB) wait in memory.
    pub(crate) fn new(
        file: &File,
        path: &Path,
        start: u64,
        max_stage: u64,
    ) -> io::Result<StreamWriter> {
        let blocks = (max_stage.min(MAX_STAGE) as usize / ALIGN).max(1);
        let mut writer = StreamWriter {
            file: file.try_clone()?,
            direct: open_direct(path),
            stage: vec![Block([0; ALIGN]); blocks],
            stage_start: 0,
            staged: 0,
            resumed_at: 0,
        };
        writer.restart_at(start)?;
        Ok(writer)
    }

    /// Where the bytes already in the file end: what a resume state may claim.
    pub(crate) fn written(&self) -> u64 {
        self.stage_start.max(self.resumed_at)
    }

    /// Where the stream's next byte goes.
    pub(crate) fn end(&self) -> u64 {
        self.stage_start + self.staged as u64
    }

    /// Throws away what is staged and continues at `start`.
    pub(crate) fn restart_at(&mut self, start: u64) -> io::Result<()> {
        self.staged = 0;
        self.stage_start = start;
        self.resumed_at = start;
        if self.direct.is_some() {
            // Stage from the block boundary before `start`, with the bytes the file already
            // has there, so that every direct write is aligned.
            let head = (start % ALIGN as u64) as usize;
            self.stage_start = start - head as u64;
            let mut filled = 0;
            while filled < head {
                let stage = stage_bytes(&mut self.stage);
                match self
                    .file
                    .read_at(&mut stage[filled..head], self.stage_start + filled as u64)?
                {
                    0 => return Err(io::Error::other("partial file is shorter than its state")),
                    n => filled += n,
                }
            }
            self.staged = head;
        }
        Ok(())
    }

    /// Appends `bytes` at the end of what was written so far.
    pub(crate) fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let stage = stage_bytes(&mut self.stage);
            let n = bytes.len().min(stage.len() - self.staged);
            stage[self.staged..self.staged + n].copy_from_slice(&bytes[..n]);
            self.staged += n;
            bytes = &bytes[n..];
            if self.staged == stage.len() {
                self.flush_blocks()?;
            }
        }
        Ok(())
    }

    /// Writes out everything staged, the tail included; then [`StreamWriter::written`] is
    /// the end of the stream so far.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        self.flush_blocks()?;
        let tail = self.staged;
        let stage = stage_bytes(&mut self.stage);
        self.file.write_all_at(&stage[..tail], self.stage_start)?;
        self.stage_start += tail as u64;
        self.staged = 0;
        Ok(())
    }

    /// Writes the whole blocks that are staged and keeps the rest for later.
    fn flush_blocks(&mut self) -> io::Result<()> {
        let whole = self.staged / ALIGN * ALIGN;
        if whole == 0 {
            return Ok(());
        }
        let stage = stage_bytes(&mut self.stage);
        let offset = self.stage_start;
        let result = match &self.direct {
            Some(direct) => direct.write_all_at(&stage[..whole], offset),
            None => self.file.write_all_at(&stage[..whole], offset),
        };
        match result {
            Ok(()) => {}
            // The file system takes direct I/O at open but not these writes: go buffered.
            Err(e)
                if self.direct.is_some()
                    && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) =>
            {
                tracing::debug!("direct writes refused ({e}); writing through the page cache");
                self.direct = None;
                self.file.write_all_at(&stage[..whole], offset)?;
            }
            Err(e) => return Err(e),
        }
        stage.copy_within(whole..self.staged, 0);
        self.staged -= whole;
        self.stage_start += whole as u64;
        Ok(())
    }
}

// The stage is an array of aligned blocks (O_DIRECT wants aligned buffers); writing takes it
// as bytes.
#[allow(unsafe_code)]
fn stage_bytes(stage: &mut [Block]) -> &mut [u8] {
    let len = std::mem::size_of_val(stage);
    // SAFETY: `Block` is a byte array with no padding (repr(C)), so the blocks are `len`
    // contiguous, initialised bytes, borrowed mutably for as long as the slice lives.
    unsafe { std::slice::from_raw_parts_mut(stage.as_mut_ptr().cast::<u8>(), len) }
}

/// The file opened a second time for direct writes, or `None` where that is refused.
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::debug!("no direct writes to {} ({e})", path.display());
                None
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len as u64).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Pieces of awkward sizes, a stage boundary crossed, a resume from an unaligned offset
    /// and a restart: the file holds exactly the stream, and `written` never claims more
    /// than the file has. With direct writes where the file system takes them, and through
    /// the page cache as where it does not.
    #[test]
    fn stream_lands_exactly_through_resume_and_restart() {
        for direct in [true, false] {
            stream_lands_exactly(direct);
        }
    }

    fn stream_lands_exactly(direct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.partial");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let want = data((MAX_STAGE * 2) as usize + 12_345);

        // A first run wrote an unaligned prefix.
        let kept = 10_001;
        file.write_all_at(&want[..kept], 0).unwrap();
        let mut w = StreamWriter::new(&file, &path, kept as u64, MAX_STAGE).unwrap();
        if !direct {
            w.direct = None;
            w.restart_at(kept as u64).unwrap();
        }
        assert_eq!(w.written(), kept as u64);
        let mut at = kept;
        for size in [1, 4095, 4097, 300_000, 3 << 20, 777].iter().cycle() {
            let end = (at + size).min(want.len());
            w.write(&want[at..end]).unwrap();
            at = end;
            assert_eq!(w.end(), at as u64);
            let written = w.written() as usize;
            assert!(written <= at);
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(on_disk[..written], want[..written]);
            if at == want.len() {
                break;
            }
        }
        w.finish().unwrap();
        assert_eq!(w.written(), want.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), want);

        // A server that ignored the Range: the stream starts over at 0.
        let other = data(50_000).iter().map(|b| b ^ 0x5a).collect::<Vec<u8>>();
        w.restart_at(0).unwrap();
        w.write(&other).unwrap();
        w.finish().unwrap();
        assert_eq!(w.written(), other.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap()[..other.len()], other[..]);
    }
}
