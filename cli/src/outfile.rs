//! Writing a download to a file on a thread of its own, so that the single-threaded runtime
//! keeps receiving and verifying while the disk writes.
//!
//! Large outputs are written with `O_DIRECT` where the file system takes it: the bytes go
//! from one reused, block-aligned staging buffer to the device, instead of being copied into
//! fresh page-cache pages that the final sync then has to write back all at once. On the
//! 2-core benchmark VM that copy into new pages ran at 0.5 to 0.9 GB/s and took half of a
//! 1 GiB get's time; direct writes to the same disk run at 1.5 GB/s. Small outputs, and file
//! systems that refuse `O_DIRECT` (tmpfs on older kernels, some FUSE file systems), get
//! ordinary buffered writes. Either way the file is synced before [`OutFile::finish`] returns.
//!
//! Memory is bounded: the staging buffer, plus at most [`QUEUE`] chunks waiting in the
//! channel. Spent chunk buffers go back to the caller ([`OutFile::spare`]) for reuse.

use std::fs::File;
use std::io::{self, Write as _};
use std::sync::mpsc as sync_mpsc;
use std::thread::JoinHandle;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::sync::mpsc;

/// Alignment of direct writes: offsets, lengths and memory. 4 KiB covers 512-byte and
/// 4 KiB logical blocks.
const ALIGN: usize = 4096;
/// Size of one direct write.
const STAGE: usize = 8 << 20;
/// Outputs smaller than this are written through the page cache.
pub const DIRECT_MIN: u64 = 8 << 20;
/// Chunks queued for the writer thread.
const QUEUE: usize = 4;

enum Message {
    Data(Vec<u8>),
    /// Write what is staged, sync, and stop. Without it (the sender dropped) the thread stops
    /// without syncing: the download failed and the file is going away.
    Finish,
}

/// A file being written by its own thread.
#[derive(Debug)]
pub struct OutFile {
    tx: Option<mpsc::Sender<Message>>,
    spares: sync_mpsc::Receiver<Vec<u8>>,
    thread: Option<JoinHandle<io::Result<Report>>>,
}

/// How the file was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub bytes: u64,
    /// Whether all whole blocks went through `O_DIRECT`.
    pub direct: bool,
}

impl OutFile {
    /// Starts the writer thread for `file`; `size` (the bytes expected) decides whether
    /// direct writes are tried.
    pub fn start(file: File, size: u64) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (spare_tx, spares) = sync_mpsc::channel();
        let writer = Writer::new(file, size >= DIRECT_MIN);
        let thread = std::thread::Builder::new()
            .name("meshctl-write".into())
            .spawn(move || writer.run(rx, spare_tx))?;
        Ok(Self {
            tx: Some(tx),
            spares,
            thread: Some(thread),
        })
    }

    /// Queues `data` to be written (waits while the queue is full).
    pub async fn write(&mut self, data: Vec<u8>) -> io::Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send(Message::Data(data)).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The thread stopped early: its error says why.
            Err(self.join().await.err().unwrap_or_else(|| {
                io::Error::other("the writer thread stopped before the download ended")
            }))
        }
    }

    /// A buffer the writer is done with, if one is waiting.
    pub fn spare(&self) -> Option<Vec<u8>> {
        self.spares.try_recv().ok()
    }

    /// Writes what is left, syncs the file and stops the thread.
    pub async fn finish(mut self) -> io::Result<Report> {
        if let Some(tx) = &self.tx {
            // A closed channel means the thread already stopped; `join` reports why.
            let _ = tx.send(Message::Finish).await;
        }
        self.join().await
    }

    async fn join(&mut self) -> io::Result<Report> {
        self.tx = None;
        let Some(thread) = self.thread.take() else {
            return Err(io::Error::other("the writer thread already stopped"));
        };
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(io::Error::other)?
            .map_err(|_| io::Error::other("the writer thread panicked"))?
    }
}

/// The writer thread's state.
struct Writer {
    file: File,
    direct: bool,
    /// Holds the staging area at an aligned offset; never resized.
    raw: Vec<u8>,
    at: usize,
    staged: usize,
    bytes: u64,
}

impl Writer {
    fn new(file: File, try_direct: bool) -> Self {
        let direct = try_direct && set_direct(&file, true).is_ok();
        let (raw, at) = if direct {
            let raw = vec![0u8; STAGE + ALIGN];
            let at = raw.as_ptr().align_offset(ALIGN);
            (raw, at)
        } else {
            (Vec::new(), 0)
        };
        Self {
            file,
            direct,
            raw,
            at,
            staged: 0,
            bytes: 0,
        }
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<Message>,
        spares: sync_mpsc::Sender<Vec<u8>>,
    ) -> io::Result<Report> {
        loop {
            match rx.blocking_recv() {
                Some(Message::Data(data)) => {
                    self.push(&data)?;
                    // The receiver may be gone (the download ended); the buffer is just freed.
                    let _ = spares.send(data);
                }
                Some(Message::Finish) => return self.finish(),
                None => {
                    return Err(io::Error::other(
                        "the download ended before the file was complete",
                    ));
                }
            }
        }
    }

    fn push(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.bytes += data.len() as u64;
        if self.raw.is_empty() {
            return self.file.write_all(data);
        }
        while !data.is_empty() {
            let n = data.len().min(STAGE - self.staged);
            let start = self.at + self.staged;
            self.raw[start..start + n].copy_from_slice(&data[..n]);
            self.staged += n;
            data = &data[n..];
            if self.staged == STAGE {
                self.write_staged(STAGE)?;
                self.staged = 0;
            }
        }
        Ok(())
    }

    /// Writes the first `len` staged bytes (a multiple of [`ALIGN`] unless buffered).
    fn write_staged(&mut self, len: usize) -> io::Result<()> {
        let range = self.at..self.at + len;
        match self.file.write_all(&self.raw[range.clone()]) {
            // Some file systems take the flag at open but refuse direct writes; go on through
            // the page cache.
            Err(e) if self.direct && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                set_direct(&self.file, false)?;
                self.direct = false;
                self.file.write_all(&self.raw[range])
            }
            other => other,
        }
    }

    fn finish(mut self) -> io::Result<Report> {
        if !self.raw.is_empty() {
            let whole = self.staged / ALIGN * ALIGN;
            if whole > 0 {
                self.write_staged(whole)?;
            }
            // The last partial block cannot go through O_DIRECT.
            if self.direct && whole < self.staged {
                set_direct(&self.file, false)?;
            }
            let tail = self.at + whole..self.at + self.staged;
            self.file.write_all(&self.raw[tail])?;
        }
        self.file.sync_all()?;
        Ok(Report {
            bytes: self.bytes,
            direct: self.direct,
        })
    }
}

/// Turns `O_DIRECT` on or off for an open file.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    let wanted = if on {
        flags | OFlag::O_DIRECT
    } else {
        flags - OFlag::O_DIRECT
    };
    fcntl(file, FcntlArg::F_SETFL(wanted))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    async fn write_all(parts: &[Vec<u8>]) -> (Vec<u8>, Report) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create(&path).unwrap();
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut out = OutFile::start(file, total).unwrap();
        for part in parts {
            out.write(part.clone()).await.unwrap();
        }
        let report = out.finish().await.unwrap();
        (std::fs::read(&path).unwrap(), report)
    }

    #[tokio::test]
    async fn large_outputs_are_written_whole_and_exact() {
        // Chunk lengths that straddle blocks and the staging buffer, and a partial last block.
        let parts: Vec<Vec<u8>> = [1 << 20, 4095, 3 << 20, 1, STAGE + 17, 5 << 20, 777]
            .iter()
            .enumerate()
            .map(|(i, len)| pattern(*len, i as u8))
            .collect();
        let expected = parts.concat();
        let (written, report) = write_all(&parts).await;
        assert_eq!(written.len(), expected.len());
        assert!(
            written == expected,
            "the file differs from what was written"
        );
        assert_eq!(report.bytes, expected.len() as u64);
        // The test's temporary directory is on a file system that takes O_DIRECT in CI (ext4
        // or overlayfs over it); where it does not, the buffered path wrote the same bytes.
        if set_direct(&tempfile::tempfile().unwrap(), true).is_ok() {
            assert!(report.direct, "direct writes were available but not used");
        }
    }

    #[tokio::test]
    async fn an_output_of_whole_blocks_and_an_empty_one_are_exact() {
        let parts = vec![pattern(DIRECT_MIN as usize, 3)];
        let (written, _) = write_all(&parts).await;
        assert!(written == parts[0]);
        let (written, report) = write_all(&[]).await;
        assert!(written.is_empty());
        assert!(
            !report.direct,
            "an empty output is written through the page cache"
        );
    }

    #[tokio::test]
    async fn small_outputs_go_through_the_page_cache() {
        let parts = vec![pattern(10_000, 1), pattern(5, 2)];
        let (written, report) = write_all(&parts).await;
        assert_eq!(written, parts.concat());
        assert!(!report.direct);
    }

    #[tokio::test]
    async fn spent_buffers_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("out")).unwrap();
        let mut out = OutFile::start(file, 1 << 20).unwrap();
        out.write(Vec::with_capacity(1 << 20)).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let spare = loop {
            if let Some(spare) = out.spare() {
                break spare;
            }
            assert!(std::time::Instant::now() < deadline, "no buffer came back");
            tokio::task::yield_now().await;
        };
        assert!(spare.capacity() >= 1 << 20);
        out.finish().await.unwrap();
    }

    #[tokio::test]
    async fn a_download_that_stops_early_ends_the_thread_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("out")).unwrap();
        let mut out = OutFile::start(file, 64 << 20).unwrap();
        out.write(pattern(1000, 0)).await.unwrap();
        // Dropping the sender (as a failed download does) must not hang the join.
        let err = out.join().await.unwrap_err();
        assert!(err.to_string().contains("ended before"), "{err}");
    }
}
