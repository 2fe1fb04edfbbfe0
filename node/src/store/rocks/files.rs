//! Chunk files: the bytes of large chunks, one file per chunk, outside RocksDB.
//!
//! A chunk at least `store.min_file_size` long is written to `chunk-files/<xx>/<id>` under the
//! store directory (`xx`: the id's first byte, so no directory grows past 1/256 of the
//! chunks), and the `chunks` family keeps a [`marker`] under its id instead of the bytes. A
//! write is synced (the file's data, then its directory) before the marker is written, so a
//! marker, however it reached the log, always names a complete file. Keeping the bytes out of
//! RocksDB spares every stored byte the write batch, the log (a copy and a CRC32C), the
//! memtable and the blob flush (another copy and CRC32C): one write per byte is left, with
//! `O_DIRECT` where the file system allows it, so not even the page cache copies it. The
//! content address is the checksum: every read is verified against the id by the caller.
//!
//! Files are written and read through buffers aligned for `O_DIRECT`, kept in small pools so
//! that the memory they use stays warm (fresh pages are slow on the VMs we measured) and
//! bounded. A file with no marker (a crash between the file and its batch, or between a
//! delete's batch and the unlink) is a stray; after a run that did not close the store, the
//! node's GC worker removes strays ([`super::RocksStore::sweep_strays_if_pending`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use mesh_proto::ChunkId;

/// Alignment of `O_DIRECT` buffers, offsets and lengths (the largest logical block size in
/// use).
const ALIGN: usize = 4096;
/// New buffers are sized up to a multiple of this, so that one serves chunks of nearby sizes.
const GRAIN: usize = 64 << 10;
/// The largest buffer a pool keeps: the largest content-defined chunk. Larger chunks (fixed
/// chunkers may make them) get a buffer of their own.
const POOLED_MAX: usize = 4 << 20;
/// Pooled buffers kept for writes (one per concurrent writer is enough) and for reads (a
/// read's buffer lives as long as the `Bytes` it became, through a send). At most
/// `POOLED_MAX` each; buffers in use beyond these are allocated to size and freed after.
const WRITE_POOL: usize = 4;
const READ_POOL: usize = 16;
/// The directory under the store that holds the chunk files.
pub(super) const DIR: &str = "chunk-files";

/// What the `chunks` family keeps, under a chunk's id, for a chunk whose bytes are in a file:
/// this prefix followed by the id. A chunk stored inline with exactly these bytes would have
/// to hash to its own suffix, which BLAKE3 rules out, so a marker is never mistaken for
/// bytes.
const MARKER_PREFIX: &[u8; 16] = b"mesh/chunk-file1";

pub(super) fn marker(id: &ChunkId) -> [u8; 48] {
    let mut out = [0u8; 48];
    out[..16].copy_from_slice(MARKER_PREFIX);
    out[16..].copy_from_slice(id.as_bytes());
    out
}

pub(super) fn is_marker(id: &ChunkId, value: &[u8]) -> bool {
    value.len() == 48 && value[..16] == MARKER_PREFIX[..] && value[16..] == id.as_bytes()[..]
}

/// A heap buffer with an `ALIGN`-aligned window of `cap` bytes (safe code: the vector is
/// over-allocated and the window starts at the first aligned address).
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    cap: usize,
}

impl Aligned {
    fn new(cap: usize) -> Self {
        let cap = cap.div_ceil(ALIGN).max(1) * ALIGN;
        let raw = vec![0u8; cap + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        Self { raw, start, cap }
    }

    fn window(&self, len: usize) -> &[u8] {
        &self.raw[self.start..self.start + len]
    }

    fn window_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}

type Pool = Arc<Mutex<Vec<Aligned>>>;

/// The smallest pooled buffer that holds `len` bytes, or a new one: a buffer much larger than
/// the chunk would keep memory resident for nothing while the read is in flight.
fn take(pool: &Pool, len: usize) -> Aligned {
    let mut pooled = pool.lock().unwrap_or_else(|p| p.into_inner());
    let fit = pooled
        .iter()
        .enumerate()
        .filter(|(_, b)| b.cap >= len && b.cap <= len.saturating_mul(2).max(GRAIN))
        .min_by_key(|(_, b)| b.cap)
        .map(|(i, _)| i);
    match fit {
        Some(i) => pooled.swap_remove(i),
        None => {
            drop(pooled);
            Aligned::new(len.div_ceil(GRAIN).max(1) * GRAIN)
        }
    }
}

fn give(pool: &Pool, buf: Aligned, max: usize) {
    if buf.cap <= POOLED_MAX {
        let mut pooled = pool.lock().unwrap_or_else(|p| p.into_inner());
        pooled.push(buf);
        if pooled.len() > max {
            // The oldest goes, so the pool follows the sizes in use.
            pooled.remove(0);
        }
    }
}

/// A read chunk's bytes: `Bytes` over a pooled buffer, which goes back to the pool when the
/// last clone is dropped.
struct ReadBuf {
    buf: Option<Aligned>,
    range: Range<usize>,
    pool: Pool,
}

impl AsRef<[u8]> for ReadBuf {
    fn as_ref(&self) -> &[u8] {
        self.buf
            .as_ref()
            .map_or(&[][..], |b| &b.raw[self.range.clone()])
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give(&self.pool, buf, READ_POOL);
        }
    }
}

/// The chunk-file directory of one store.
pub(super) struct ChunkFiles {
    dir: PathBuf,
    direct: bool,
    writes: Pool,
    reads: Pool,
}

impl std::fmt::Debug for ChunkFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkFiles")
            .field("dir", &self.dir)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

impl ChunkFiles {
    /// Opens (creating) the directory and its 256 subdirectories. `direct`: use `O_DIRECT`.
    pub(super) fn open(store: &Path, direct: bool) -> io::Result<Self> {
        let dir = store.join(DIR);
        for b in 0..=255u8 {
            std::fs::create_dir_all(dir.join(format!("{b:02x}")))?;
        }
        Ok(Self {
            dir,
            direct,
            writes: Arc::new(Mutex::new(Vec::new())),
            reads: Arc::new(Mutex::new(Vec::new())),
        })
    }

    fn subdir(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(format!("{:02x}", id.as_bytes()[0]))
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        self.subdir(id).join(id.to_string())
    }

    /// Writes `data` as the file of `id`, replacing any file there, and syncs it and its
    /// directory entry.
    pub(super) fn write(&self, id: &ChunkId, data: &[u8]) -> io::Result<()> {
        let file = self.write_unsynced(id, data)?;
        file.sync_data()?;
        File::open(self.subdir(id))?.sync_all()
    }

    fn write_unsynced(&self, id: &ChunkId, data: &[u8]) -> io::Result<File> {
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if self.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(self.path(id))?;
        if !self.direct {
            file.write_all_at(data, 0)?;
            return Ok(file);
        }
        // O_DIRECT writes whole aligned blocks from an aligned buffer: the tail block is
        // padded, and the file cut back to the chunk's length after.
        let padded = data.len().div_ceil(ALIGN) * ALIGN;
        let mut buf = take(&self.writes, padded);
        let window = buf.window_mut(padded);
        window[..data.len()].copy_from_slice(data);
        window[data.len()..].fill(0);
        let written = file.write_all_at(buf.window(padded), 0);
        give(&self.writes, buf, WRITE_POOL);
        written?;
        if padded != data.len() {
            file.set_len(data.len() as u64)?;
        }
        Ok(file)
    }

    /// Test hook: replaces a file's bytes without syncing, as disk rot would.
    pub(super) fn overwrite(&self, id: &ChunkId, data: &[u8]) -> io::Result<()> {
        self.write_unsynced(id, data).map(drop)
    }

    /// The bytes of `id`'s file; `NotFound` if there is none.
    pub(super) fn read(&self, id: &ChunkId) -> io::Result<Bytes> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        if self.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(self.path(id))?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::other("chunk file too large"))?;
        let padded = len.div_ceil(ALIGN) * ALIGN;
        let mut buf = take(&self.reads, padded);
        let window = buf.window_mut(padded);
        let mut done = 0;
        while done < len {
            match file.read_at(&mut window[done..], done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        if done != len {
            give(&self.reads, buf, READ_POOL);
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("chunk file ended at {done} of {len} bytes"),
            ));
        }
        let start = buf.start;
        Ok(Bytes::from_owner(ReadBuf {
            buf: Some(buf),
            range: start..start + len,
            pool: Arc::clone(&self.reads),
        }))
    }

    pub(super) fn exists(&self, id: &ChunkId) -> bool {
        self.path(id).exists()
    }

    /// Removes `id`'s file; a missing one is not an error.
    pub(super) fn remove(&self, id: &ChunkId) -> io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Calls `visit` with the id of every chunk file (names that are not chunk ids are
    /// skipped), one subdirectory at a time.
    pub(super) fn visit(&self, visit: &mut dyn FnMut(ChunkId) -> io::Result<()>) -> io::Result<()> {
        for b in 0..=255u8 {
            let sub = self.dir.join(format!("{b:02x}"));
            for entry in std::fs::read_dir(&sub)? {
                let entry = entry?;
                let Some(id) = entry
                    .file_name()
                    .to_str()
                    .and_then(|name| name.parse::<ChunkId>().ok())
                else {
                    continue;
                };
                visit(id)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(direct: bool) -> (tempfile::TempDir, ChunkFiles) {
        let dir = tempfile::tempdir().unwrap();
        let direct = direct && super::super::direct_io_works(dir.path()).is_ok();
        let files = ChunkFiles::open(dir.path(), direct).unwrap();
        (dir, files)
    }

    #[test]
    fn files_read_back_what_was_written_at_every_length() {
        for direct in [true, false] {
            let (_dir, files) = files(direct);
            for len in [
                0,
                1,
                4095,
                4096,
                4097,
                65_536 + 17,
                POOLED_MAX,
                POOLED_MAX + 1,
            ] {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let id = ChunkId::of(&data);
                files.write(&id, &data).unwrap();
                assert_eq!(
                    std::fs::metadata(files.path(&id)).unwrap().len(),
                    len as u64
                );
                let back = files.read(&id).unwrap();
                assert_eq!(&back[..], &data[..], "length {len}, direct {direct}");
            }
        }
    }

    #[test]
    fn a_shorter_rewrite_replaces_the_whole_file() {
        let (_dir, files) = files(true);
        let id = ChunkId::of(b"x");
        files.write(&id, &vec![1u8; 10_000]).unwrap();
        files.overwrite(&id, b"short").unwrap();
        assert_eq!(&files.read(&id).unwrap()[..], b"short");
    }

    #[test]
    fn missing_files_are_not_found_and_removing_them_is_fine() {
        let (_dir, files) = files(true);
        let id = ChunkId::of(b"absent");
        assert_eq!(files.read(&id).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(!files.exists(&id));
        files.remove(&id).unwrap();
    }

    #[test]
    fn visit_lists_chunk_files_and_skips_other_names() {
        let (_dir, files) = files(true);
        let ids: Vec<ChunkId> = (0..20u8).map(|i| ChunkId::of(&[i])).collect();
        for id in &ids {
            files.write(id, &[1, 2, 3]).unwrap();
        }
        std::fs::write(files.dir.join("00").join("not-a-chunk"), b"x").unwrap();
        let mut seen = Vec::new();
        files
            .visit(&mut |id| {
                seen.push(id);
                Ok(())
            })
            .unwrap();
        seen.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn markers_name_their_own_chunk_only() {
        let a = ChunkId::of(b"a");
        let b = ChunkId::of(b"b");
        assert!(is_marker(&a, &marker(&a)));
        assert!(!is_marker(&b, &marker(&a)));
        assert!(!is_marker(&a, &marker(&a)[..47]));
    }
}
