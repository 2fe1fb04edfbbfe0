//! The RocksDB implementation of [`ChunkStore`] and [`MetaStore`].
//!
//! Column families:
//!
//! | cf          | key                  | value                                              |
//! |-------------|----------------------|----------------------------------------------------|
//! | `chunks`    | ChunkId              | the chunk's bytes (blob files), or a [`files`] marker |
//! | `refs`      | ChunkId              | [`RefRecord`]: reference count and chunk length     |
//! | `manifests` | ObjectId             | canonical manifest bytes (versioned by the manifest)|
//! | `objects`   | ObjectId             | [`ObjectRecord`]: the summary `ls` shows            |
//! | `pending`   | kind byte + key      | durable work: GC candidates, delivery queues, tombstone ages |
//! | `records`   | ObjectId             | the placement record this node keeps               |
//! | `held`      | ObjectId             | part indices referenced here (partial holders)     |
//! | `parts`     | ObjectId             | shard ids of an `ec:K+M` object (what `held` indexes)|
//! | `meta`      | name                 | schema version and counters (merge operator `add`) |
//! | `quarantine`| ChunkId              | chunks whose bytes failed verification ([`scrub`]) |
//!
//! The `pending` kinds: `1` + ChunkId -> when the chunk became a GC candidate and why
//! ([`Candidate`]); `2` + ObjectId -> a put's background deliveries; `3` + ObjectId -> a
//! delete's tombstone deliveries (both opaque [`Queue`] values); `4` + ObjectId -> when this
//! node stored the object's tombstone (dropped after the retention, see
//! [`MetaStore::expire_tombstones`]).
//!
//! Every stored chunk has a `refs` entry, so "is this chunk stored" is a small point lookup that
//! never touches the chunk's blob. Mutations of one chunk's existence or count happen under a
//! striped lock keyed by the chunk id; uploads in progress pin their chunks in memory so that a
//! concurrent delete of another object sharing them cannot remove them before the commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mesh_proto::api::ObjectSummary;
use mesh_proto::wire::PlacementRecord;
use mesh_proto::{ChunkId, Manifest, ObjectId, Redundancy};
use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamily, ColumnFamilyDescriptor,
    CompactOptions, DB, DBCompressionType, Direction, IteratorMode, MergeOperands, Options,
    WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{
    ChunkStore, Collected, Config, Freed, MetaStore, Queue, Stats, StoreError, StoredChunk,
};

pub mod files;
pub mod scrub;

const CF_CHUNKS: &str = "chunks";
const CF_REFS: &str = "refs";
const CF_MANIFESTS: &str = "manifests";
const CF_OBJECTS: &str = "objects";
const CF_PENDING: &str = "pending";
const CF_META: &str = "meta";
/// Placement records (ObjectId -> encoded `PlacementRecord`), kept by every holder.
const CF_RECORDS: &str = "records";
/// For objects this node holds only part of: the part indices it took references on
/// (absent = every chunk, as for a local put).
const CF_HELD: &str = "held";
/// `ec:K+M` objects: the id of every part (shard), which `held` indexes; absent for `rep:N`,
/// whose parts are the manifest's chunks.
const CF_PARTS: &str = "parts";
/// Keys and values of a scan.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;
/// Job state kept by coordinators: free-form keys owned by [`crate::jobs`].
const CF_JOBS: &str = "jobs";
/// Room in a chunk's write batch beyond its bytes: the batch header, the chunk, reference
/// and orphan-candidate entries' tags, keys and lengths, and the two counter merges.
const BATCH_OVERHEAD: usize = 512;

/// Layout version of everything this module writes; checked at open. Version 2 added chunk
/// files ([`files`]); a version-1 store is upgraded at open (nothing to rewrite: its chunks
/// stay inline), and a meshd that knows only version 1 refuses a version-2 store rather than
/// reading markers as chunk bytes.
const SCHEMA_VERSION: u32 = 2;
const OLDEST_SCHEMA: u32 = 1;
/// Set (synced) when the store is closed, cleared at open: without it, the last run may have
/// left stray chunk files.
const KEY_CLOSED: &[u8] = b"files/closed";
const KEY_SCHEMA: &[u8] = b"schema";
const KEY_OBJECTS: &[u8] = b"count/objects";
const KEY_CHUNKS: &[u8] = b"count/chunks";
const KEY_BYTES: &[u8] = b"count/bytes";

/// Pending-queue kind: a GC candidate, a chunk that may have no reference (written by an
/// upload that has not committed, or whose last reference a delete released).
const PENDING_ORPHAN: u8 = 1;
/// Pending-queue kind: holders of a put that are still owed chunks or the placement record
/// (the writer's background completion; the value is opaque to the store).
const PENDING_DELIVERY: u8 = 2;
/// Pending-queue kind: holders a delete still has to tell (opaque to the store).
const PENDING_TOMBSTONE: u8 = 3;
/// Pending-queue kind: when this node stored an object's tombstone record.
const PENDING_EXPIRY: u8 = 4;
/// Fraction of the oldest blob files whose live blobs compactions move (then the files go).
const BLOB_GC_AGE_CUTOFF: f64 = 0.25;
/// Garbage share of the blob bytes above which [`RocksStore::compact_chunks`] moves every
/// live blob.
const FORCE_BLOB_GC_RATIO: f64 = 0.25;
/// Candidates handled per write batch (and per stripe-locked step) of a sweep.
const SWEEP_BATCH: usize = 256;

const STRIPES: usize = 64;

/// Reference count of a stored chunk, and its length for the byte counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct RefRecord {
    version: u8,
    count: u64,
    len: u32,
}

/// Why a chunk is a GC candidate. Only the reason differs in what happens at open: chunks of
/// uploads that never committed are swept then, released ones wait out the grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Written by an upload (or a peer's store request) that has not committed a reference.
    Upload,
    /// Its last reference went away with a deleted object.
    Released,
}

/// A GC candidate's value: since when (ms since the epoch) and why. Stored as 8 bytes of time,
/// little-endian, then one origin byte; the 8-byte form of earlier builds means an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    since_ms: u64,
    origin: Origin,
}

impl Candidate {
    fn now(origin: Origin) -> Self {
        Self {
            since_ms: now_ms(),
            origin,
        }
    }

    fn encode(self) -> [u8; 9] {
        let mut out = [0u8; 9];
        out[..8].copy_from_slice(&self.since_ms.to_le_bytes());
        out[8] = match self.origin {
            Origin::Upload => 0,
            Origin::Released => 1,
        };
        out
    }

    /// An unreadable value reads as an upload's candidate from the epoch: swept at once,
    /// which is what a chunk with a zero count and a damaged entry deserves.
    fn decode(bytes: &[u8]) -> Self {
        let since_ms = bytes
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes);
        let origin = match bytes.get(8) {
            Some(1) => Origin::Released,
            _ => Origin::Upload,
        };
        Self { since_ms, origin }
    }
}

/// What `ls` shows of an object, kept apart from the (possibly large) manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ObjectRecord {
    version: u8,
    name: Option<String>,
    size: u64,
    chunks: u64,
    redundancy: Redundancy,
    created_ms: u64,
}

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 64 * 1024 }>()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, codec()).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, codec())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::BadRecord {
            key: hex::encode(key),
            reason: e.to_string(),
        })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn add_merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let read = |b: &[u8]| b.try_into().map(i64::from_le_bytes).unwrap_or(0);
    let mut total = existing.map(read).unwrap_or(0);
    for op in operands {
        total = total.wrapping_add(read(op));
    }
    Some(total.to_le_bytes().to_vec())
}

/// The store. Cheap to share behind an `Arc`; all methods block, so async callers run them on
/// the blocking pool.
pub struct RocksStore {
    db: DB,
    path: PathBuf,
    config: Config,
    stripes: Vec<Mutex<()>>,
    /// Serialize the read-decide-write of one object's record ([`RocksStore::object_lock`]).
    object_stripes: Vec<Mutex<()>>,
    pins: Mutex<HashMap<ChunkId, u32>>,
    files: files::ChunkFiles,
    /// Stray chunk files may exist: the last run did not close the store, or a file that
    /// nothing names failed to go, and no sweep has started since
    /// ([`RocksStore::sweep_strays_if_pending`]).
    strays_pending: AtomicBool,
}

/// A stored chunk's bytes as read: pinned in RocksDB, from a chunk file, or lost (a marker
/// whose file is missing or unreadable).
enum Value<'a> {
    Inline(rocksdb::DBPinnableSlice<'a>),
    File(Bytes),
    Lost(String),
}

impl Value<'_> {
    /// What the bytes hash to, and their length (`None` for a lost file).
    fn digest(&self) -> Option<(ChunkId, usize)> {
        match self {
            Value::Inline(value) => Some((ChunkId::of(value), value.len())),
            Value::File(bytes) => Some((ChunkId::of(bytes), bytes.len())),
            Value::Lost(_) => None,
        }
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        // Every chunk file written by this run has its marker, and every unlink followed its
        // synced batch: unless strays of an earlier run are still there, the next open need
        // not look for any.
        if self.strays_pending.load(Ordering::SeqCst) {
            return;
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        if let Err(e) = self
            .db
            .put_cf_opt(self.cf(CF_META), KEY_CLOSED, [1u8], &opts)
        {
            warn!(error = %e, "marking the store closed failed; the next open sweeps chunk files");
        }
    }
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RocksStore {
    /// Opens (or creates) the store at `path`, then sweeps orphans left by a previous run.
    pub fn open(path: &Path, config: &Config) -> Result<Arc<Self>, StoreError> {
        let cache = Cache::new_lru_cache(config.block_cache_size.as_u64() as usize);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        // Every chunk stored inline passes through the write-ahead log (all of them with
        // `chunk_files` off; chunk files keep large ones out of it). Reusing obsolete log files
        // overwrites pages still in the page cache instead of filling new ones; on the VMs we
        // measured, filling fresh pages ran at 0.5-0.9 GB/s and overwriting cached ones at
        // 8 GB/s, and the log was the largest single cost of a put. Only obsolete logs are
        // reused, and a log stays live until every column family with data in it has flushed;
        // the small ones flush when the logs' total passes this bound, so until then every log
        // is new. Two chunk memtables (one filling, one flushing) keep that first stretch to
        // three new logs (a 1 GiB put on a new node: six with four memtables); one would cut
        // chunk memtables short, into small blob files.
        let memtable = config.write_buffer_size.as_u64();
        db_opts.set_max_total_wal_size(memtable.saturating_mul(2).max(64 << 20));
        db_opts.set_recycle_log_file_num(6);
        db_opts.set_keep_log_file_num(4);
        let mut direct = false;
        if config.direct_io {
            match direct_io_works(path) {
                Ok(()) => {
                    direct = true;
                    db_opts.set_use_direct_io_for_flush_and_compaction(true);
                    // Direct reads get no kernel readahead; compactions read ahead themselves.
                    db_opts.set_compaction_readahead_size(2 << 20);
                }
                Err(e) => warn!(
                    path = %path.display(),
                    error = %e,
                    "the file system refuses O_DIRECT; flushes and compactions go through the page cache"
                ),
            }
        }

        let meta_opts = |merge: bool| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            o.set_compression_type(DBCompressionType::Lz4);
            if merge {
                o.set_merge_operator_associative("add", add_merge);
            }
            o
        };
        let mut chunk_opts = Options::default();
        chunk_opts.set_block_based_table_factory(&table);
        chunk_opts.set_write_buffer_size(config.write_buffer_size.as_u64() as usize);
        chunk_opts.set_max_write_buffer_number(3);
        // Chunks are mostly incompressible and already deduplicated; compressing them costs
        // CPU for nothing.
        chunk_opts.set_compression_type(DBCompressionType::None);
        if config.blob_files {
            chunk_opts.set_enable_blob_files(true);
            chunk_opts.set_min_blob_size(config.min_blob_size.as_u64());
            chunk_opts.set_blob_file_size(256 << 20);
            chunk_opts.set_blob_compression_type(DBCompressionType::None);
            // Off except during [`RocksStore::compact_chunks`]: with it on, every compaction
            // that writes cause moves the live blobs of the oldest files, rewriting data that
            // has no garbage next to it (a third more bytes written during a write-heavy job).
            chunk_opts.set_enable_blob_gc(false);
            chunk_opts.set_blob_gc_age_cutoff(BLOB_GC_AGE_CUTOFF);
        }

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_opts),
            ColumnFamilyDescriptor::new(CF_REFS, meta_opts(false)),
            ColumnFamilyDescriptor::new(CF_MANIFESTS, meta_opts(false)),
            ColumnFamilyDescriptor::new(CF_OBJECTS, meta_opts(false)),
            ColumnFamilyDescriptor::new(CF_PENDING, meta_opts(false)),
            ColumnFamilyDescriptor::new(CF_META, meta_opts(true)),
            ColumnFamilyDescriptor::new(CF_RECORDS, meta_opts(false)),
            ColumnFamilyDescriptor::new(CF_HELD, meta_opts(false)),
            ColumnFamilyDescriptor::new(CF_PARTS, meta_opts(false)),
            ColumnFamilyDescriptor::new(scrub::CF_QUARANTINE, meta_opts(false)),
            ColumnFamilyDescriptor::new(CF_JOBS, meta_opts(false)),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| {
            let text = e.into_string();
            if text.contains("lock") || text.contains("LOCK") {
                StoreError::Locked {
                    path: path.display().to_string(),
                    detail: text,
                }
            } else if text.contains("No space left") {
                StoreError::DiskFull(text)
            } else {
                StoreError::Db(text)
            }
        })?;
        let store = Arc::new(Self {
            db,
            path: path.to_owned(),
            config: config.clone(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            object_stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            pins: Mutex::new(HashMap::new()),
            files: files::ChunkFiles::open(path, direct)
                .map_err(|e| io_error("opening the chunk-file directory", e))?,
            strays_pending: AtomicBool::new(false),
        });
        store.check_schema()?;
        store.open_files()?;
        let swept = store.sweep_orphans()?;
        if swept.chunks > 0 {
            info!(
                chunks = swept.chunks,
                bytes = swept.bytes,
                "removed chunks of uploads that never committed"
            );
        }
        Ok(store)
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        // Every family is created at open; a missing one is an unrecoverable bug.
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let meta = self.cf(CF_META);
        match self.db.get_cf(meta, KEY_SCHEMA)? {
            None => {
                self.db
                    .put_cf(meta, KEY_SCHEMA, SCHEMA_VERSION.to_le_bytes())?;
                Ok(())
            }
            Some(v) if v.as_slice() == SCHEMA_VERSION.to_le_bytes() => Ok(()),
            Some(v) if v.as_slice() == OLDEST_SCHEMA.to_le_bytes() => {
                info!(
                    from = OLDEST_SCHEMA,
                    to = SCHEMA_VERSION,
                    "upgrading the store's schema (chunk files)"
                );
                let mut opts = WriteOptions::default();
                opts.set_sync(true);
                self.db
                    .put_cf_opt(meta, KEY_SCHEMA, SCHEMA_VERSION.to_le_bytes(), &opts)?;
                Ok(())
            }
            Some(v) => Err(StoreError::BadRecord {
                key: "meta/schema".into(),
                reason: format!(
                    "store schema {v:?} is not {SCHEMA_VERSION}; this meshd cannot read it"
                ),
            }),
        }
    }

    /// Notes whether the last run closed the store (if not, stray chunk files may exist),
    /// then marks it open.
    fn open_files(&self) -> Result<(), StoreError> {
        let meta = self.cf(CF_META);
        if self.db.get_cf(meta, KEY_CLOSED)?.is_none() {
            // A new store, or one whose last run did not close it (killed, crashed).
            debug!("store not closed cleanly (or new); a sweep for stray chunk files is due");
            self.strays_pending.store(true, Ordering::SeqCst);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.delete_cf_opt(meta, KEY_CLOSED, &opts)?;
        Ok(())
    }

    /// Runs [`RocksStore::sweep_stray_files`] if the last run did not close the store and no
    /// sweep has finished since; returns how many files it removed (`None`: none was due).
    /// The node's GC worker calls it, so that a node with millions of chunk files serves at
    /// once after a crash: a stray is only wasted space, never read. Until a sweep finishes,
    /// closing the store does not mark it closed, so the next open sweeps instead.
    pub fn sweep_strays_if_pending(&self) -> Result<Option<u64>, StoreError> {
        // Cleared first: a file that fails to go during the sweep sets it again.
        if !self.strays_pending.swap(false, Ordering::SeqCst) {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let strays = self.sweep_stray_files().inspect_err(|_| {
            self.strays_pending.store(true, Ordering::SeqCst);
        })?;
        info!(
            removed = strays,
            seconds = started.elapsed().as_secs_f64(),
            "looked for chunk files that no chunk entry names (the store was not closed cleanly)"
        );
        Ok(Some(strays))
    }

    /// Deletes every chunk file whose chunk has no marker in `chunks` (checked under the
    /// chunk's stripe, so no write in progress is touched). Returns how many went.
    fn sweep_stray_files(&self) -> Result<u64, StoreError> {
        let mut strays = 0u64;
        let mut failure = None;
        self.files
            .visit(&mut |id| {
                let _guard = lock(&self.stripes[self.stripe(&id)]);
                let named = match self.has_marker(&id) {
                    Ok(named) => named,
                    Err(e) => {
                        failure = Some(e);
                        return Err(std::io::Error::other("store read failed"));
                    }
                };
                if !named {
                    self.files.remove(&id)?;
                    strays += 1;
                }
                Ok(())
            })
            .map_err(|e| match failure.take() {
                Some(store) => store,
                None => io_error("sweeping stray chunk files", e),
            })?;
        Ok(strays)
    }

    /// Whether chunks of this length are written to chunk files.
    fn in_file(&self, len: usize) -> bool {
        self.config.chunk_files && len as u64 >= self.config.min_file_size.as_u64()
    }

    /// Adds `data` as `id`'s bytes to `batch`: inline, or (for a large chunk) written to its
    /// chunk file and synced now, with the marker in the batch. Caller holds the stripe, and
    /// calls [`RocksStore::write_chunk_batch`] with the returned flag.
    fn stage_bytes(
        &self,
        batch: &mut WriteBatch,
        id: &ChunkId,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        if self.in_file(data.len()) {
            if let Err(e) = self.files.write(id, data) {
                // Nothing names a half-written file.
                self.discard_file(id);
                return Err(io_error("writing a chunk file", e));
            }
            batch.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), files::marker(id));
            Ok(true)
        } else {
            batch.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), data);
            Ok(false)
        }
    }

    /// Writes a batch that [`RocksStore::stage_bytes`] filled; if it fails, the chunk file
    /// it wrote goes too, so no stray is left behind by an error.
    fn write_chunk_batch(
        &self,
        batch: WriteBatch,
        sync: bool,
        id: &ChunkId,
        file: bool,
    ) -> Result<(), StoreError> {
        let written = self.write(batch, sync);
        if written.is_err() && file {
            self.discard_file(id);
        }
        written
    }

    /// Whether `chunks` names a chunk file for `id`.
    fn has_marker(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let value = self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.as_bytes())?;
        Ok(value.is_some_and(|v| files::is_marker(id, &v)))
    }

    /// The stored bytes of `id` (`None` if `chunks` has no entry for it).
    fn value(&self, id: &ChunkId) -> Result<Option<Value<'_>>, StoreError> {
        let Some(value) = self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.as_bytes())? else {
            return Ok(None);
        };
        if !files::is_marker(id, &value) {
            return Ok(Some(Value::Inline(value)));
        }
        drop(value);
        Ok(match self.files.read(id) {
            Ok(bytes) => Some(Value::File(bytes)),
            // Readers take no lock: a collection or quarantine may have removed the chunk
            // between the marker and the file. Then it is absent, not lost.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.has_marker(id)?.then(|| Value::Lost(e.to_string()))
            }
            Err(e) => Some(Value::Lost(e.to_string())),
        })
    }

    /// Deletes the chunk files of chunks whose entries a batch just removed. The batch must
    /// be synced first: a marker that came back after a crash must find its file.
    fn unlink(&self, ids: &[ChunkId]) {
        for id in ids {
            self.discard_file(id);
        }
    }

    /// Removes a chunk file nothing names (any more). One that will not go is a stray: the
    /// next GC pass sweeps for it, and the store is not marked closed until one has.
    fn discard_file(&self, id: &ChunkId) {
        if let Err(e) = self.files.remove(id) {
            warn!(chunk = %id, error = %e, "removing a chunk file failed; a sweep will retry");
            self.strays_pending.store(true, Ordering::SeqCst);
        }
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync && self.config.sync_commits);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Held by whoever reads an object's record, decides on it and writes a new one (a record
    /// or tombstone from a peer, a repair), so that two such writers cannot both decide on
    /// the same old record: a tombstone applied between a live record's check and its commit
    /// would otherwise be overwritten, and the object would come back on this node. The
    /// store's own methods do not take it; they take chunk stripes, always after it.
    pub fn object_lock(&self, id: &ObjectId) -> MutexGuard<'_, ()> {
        lock(&self.object_stripes[usize::from(id.as_bytes()[0]) % STRIPES])
    }

    fn stripe(&self, id: &ChunkId) -> usize {
        usize::from(id.as_bytes()[0]) % STRIPES
    }

    fn lock_stripes<'a>(
        &'a self,
        ids: impl Iterator<Item = &'a ChunkId>,
    ) -> Vec<MutexGuard<'a, ()>> {
        let mut wanted = [false; STRIPES];
        for id in ids {
            wanted[self.stripe(id)] = true;
        }
        // Always in index order, so two multi-stripe lockers cannot deadlock.
        wanted
            .iter()
            .enumerate()
            .filter(|(_, w)| **w)
            .map(|(i, _)| lock(&self.stripes[i]))
            .collect()
    }

    fn ref_record(&self, id: &ChunkId) -> Result<Option<RefRecord>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_REFS), id.as_bytes())? {
            Some(v) => decode(id.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    fn pinned(&self, id: &ChunkId) -> bool {
        lock(&self.pins).contains_key(id)
    }

    fn pin(&self, id: &ChunkId) {
        *lock(&self.pins).entry(*id).or_insert(0) += 1;
    }

    /// Drops one pin; true when nobody pins the chunk any more.
    fn unpin(&self, id: &ChunkId) -> bool {
        let mut pins = lock(&self.pins);
        match pins.get_mut(id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                pins.remove(id);
                true
            }
            None => true,
        }
    }

    fn orphan_key(id: &ChunkId) -> [u8; 33] {
        let mut key = [0u8; 33];
        key[0] = PENDING_ORPHAN;
        key[1..].copy_from_slice(id.as_bytes());
        key
    }

    fn candidate(&self, id: &ChunkId) -> Result<Option<Candidate>, StoreError> {
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_PENDING), Self::orphan_key(id))?;
        Ok(value.map(|v| Candidate::decode(&v)))
    }

    /// Writes a chunk whose id is known to match. Caller holds the chunk's stripe.
    fn insert_chunk(&self, id: &ChunkId, data: &[u8], sync: bool) -> Result<bool, StoreError> {
        if let Some(rec) = self.ref_record(id)? {
            // Verified bytes of a chunk whose stored copy went bad put it back.
            self.heal_if_quarantined(id, data, sync)?;
            if rec.count == 0 {
                // Stored again while unreferenced: its grace starts over, so a holder that
                // has just acknowledged it still has it when the placement record arrives.
                let origin = self.candidate(id)?.map_or(Origin::Upload, |c| c.origin);
                let mut batch = WriteBatch::default();
                batch.put_cf(
                    self.cf(CF_PENDING),
                    Self::orphan_key(id),
                    Candidate::now(origin).encode(),
                );
                self.write(batch, sync)?;
            }
            return Ok(false);
        }
        let len = u32::try_from(data.len())
            .map_err(|_| StoreError::Db("chunk longer than 4 GiB".into()))?;
        // Sized for the chunk up front: a growing batch copies the chunk once more on
        // every doubling, each time into memory not touched before.
        let inline = if self.in_file(data.len()) {
            0
        } else {
            data.len()
        };
        let mut batch = WriteBatch::with_capacity_bytes(inline + BATCH_OVERHEAD);
        let file = self.stage_bytes(&mut batch, id, data)?;
        batch.put_cf(
            self.cf(CF_REFS),
            id.as_bytes(),
            encode(&RefRecord {
                version: 1,
                count: 0,
                len,
            }),
        );
        batch.put_cf(
            self.cf(CF_PENDING),
            Self::orphan_key(id),
            Candidate::now(Origin::Upload).encode(),
        );
        batch.merge_cf(self.cf(CF_META), KEY_CHUNKS, 1i64.to_le_bytes());
        batch.merge_cf(self.cf(CF_META), KEY_BYTES, i64::from(len).to_le_bytes());
        // A local upload's chunks are not synced on their own: the object commit that
        // references them syncs the WAL, which covers every earlier write (a chunk file is
        // synced before its marker is written, either way). A chunk another node sends is
        // synced before it is acknowledged (concurrent syncs share one fsync).
        self.write_chunk_batch(batch, sync, id, file)?;
        Ok(true)
    }

    /// Deletes `id` if no object references it, no upload pins it, and no delete released
    /// it (those wait out the GC grace). Caller holds the stripe.
    fn remove_if_unreferenced(
        &self,
        id: &ChunkId,
        batch: &mut WriteBatch,
        freed: &mut Freed,
        unlink: &mut Vec<ChunkId>,
    ) -> Result<(), StoreError> {
        if self.pinned(id) {
            // The upload that pins it will commit (taking a reference) or release it; the
            // candidate entry stays for the sweep in case this process dies first.
            return Ok(());
        }
        match self.ref_record(id)? {
            Some(rec) if rec.count == 0 => {
                let released = self
                    .candidate(id)?
                    .is_some_and(|c| c.origin == Origin::Released);
                if !released {
                    self.delete_chunk(id, rec.len, batch, freed, unlink);
                }
            }
            _ => batch.delete_cf(self.cf(CF_PENDING), Self::orphan_key(id)),
        }
        Ok(())
    }

    /// Adds the deletion of a chunk to `batch`; a chunk with a file goes on `unlink`, for
    /// [`RocksStore::unlink`] once the batch is synced.
    fn delete_chunk(
        &self,
        id: &ChunkId,
        len: u32,
        batch: &mut WriteBatch,
        freed: &mut Freed,
        unlink: &mut Vec<ChunkId>,
    ) {
        if self.files.exists(id) {
            unlink.push(*id);
        }
        batch.delete_cf(self.cf(CF_CHUNKS), id.as_bytes());
        batch.delete_cf(self.cf(CF_REFS), id.as_bytes());
        batch.delete_cf(self.cf(CF_PENDING), Self::orphan_key(id));
        batch.merge_cf(self.cf(CF_META), KEY_CHUNKS, (-1i64).to_le_bytes());
        batch.merge_cf(self.cf(CF_META), KEY_BYTES, (-i64::from(len)).to_le_bytes());
        freed.chunks += 1;
        freed.bytes += u64::from(len);
    }

    /// Deletes the chunks of uploads that never committed (run at open: no upload of this
    /// process can hold them). Chunks a delete released are left to [`MetaStore::collect_garbage`].
    pub fn sweep_orphans(&self) -> Result<Freed, StoreError> {
        Ok(self.sweep(|c| c.origin == Origin::Upload)?.freed)
    }

    /// Walks the GC candidates in pages of [`SWEEP_BATCH`]; under the stripes of each page's
    /// chunks, deletes the unreferenced, unpinned ones that are `due`, drops the entries of
    /// chunks referenced again (or gone), and counts the rest as waiting. Memory stays bounded
    /// by the page, however many candidates there are.
    fn sweep(&self, due: impl Fn(Candidate) -> bool) -> Result<Collected, StoreError> {
        let pending = self.cf(CF_PENDING);
        let mut out = Collected::default();
        let mut start = vec![PENDING_ORPHAN];
        loop {
            let mut page = Vec::with_capacity(SWEEP_BATCH);
            let mut iter = self.db.raw_iterator_cf(pending);
            iter.seek(&start);
            while let Some(key) = iter.key() {
                if key.first() != Some(&PENDING_ORPHAN) || page.len() >= SWEEP_BATCH {
                    break;
                }
                if let Ok(bytes) = <[u8; 32]>::try_from(&key[1..]) {
                    page.push(ChunkId::from_bytes(bytes));
                }
                iter.next();
            }
            iter.status()?;
            drop(iter);
            let Some(last) = page.last() else {
                break;
            };
            // The smallest key after the last one seen.
            start = Self::orphan_key(last).to_vec();
            start.push(0);
            let _guards = self.lock_stripes(page.iter());
            let mut batch = WriteBatch::default();
            let mut unlink = Vec::new();
            for id in &page {
                // Read again under the stripe: a store or a commit may have changed it.
                let Some(candidate) = self.candidate(id)? else {
                    continue;
                };
                match self.ref_record(id)? {
                    Some(rec) if rec.count == 0 => {
                        if !self.pinned(id) && due(candidate) {
                            self.delete_chunk(id, rec.len, &mut batch, &mut out.freed, &mut unlink);
                        } else {
                            out.waiting_chunks += 1;
                            out.waiting_bytes += u64::from(rec.len);
                        }
                    }
                    _ => batch.delete_cf(pending, Self::orphan_key(id)),
                }
            }
            self.write(batch, !unlink.is_empty())?;
            self.unlink(&unlink);
            if page.len() < SWEEP_BATCH {
                break;
            }
        }
        Ok(out)
    }

    /// Starts an upload: chunks it stores stay pinned until it commits or is dropped.
    pub fn begin_upload(self: &Arc<Self>) -> Upload {
        Upload {
            store: Arc::clone(self),
            pinned: Vec::new(),
            committed: false,
        }
    }

    fn release(&self, ids: &[ChunkId]) -> Result<Freed, StoreError> {
        let mut freed = Freed::default();
        for group in ids.chunks(256) {
            let _guards = self.lock_stripes(group.iter());
            let mut batch = WriteBatch::default();
            let mut unlink = Vec::new();
            for id in group {
                if self.unpin(id) {
                    self.remove_if_unreferenced(id, &mut batch, &mut freed, &mut unlink)?;
                }
            }
            self.write(batch, !unlink.is_empty())?;
            self.unlink(&unlink);
        }
        Ok(freed)
    }

    fn counter(&self, key: &[u8]) -> Result<u64, StoreError> {
        let v = self.db.get_cf(self.cf(CF_META), key)?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(i64::from_le_bytes)
            .unwrap_or(0)
            .max(0) as u64)
    }

    /// A job-state value.
    pub fn job_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_JOBS), key)?)
    }

    /// Writes job-state values (`None` deletes) atomically; `sync` waits for the disk.
    pub fn job_write(
        &self,
        entries: &[(Vec<u8>, Option<Vec<u8>>)],
        sync: bool,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_JOBS);
        for (key, value) in entries {
            match value {
                Some(v) => batch.put_cf(cf, key, v),
                None => batch.delete_cf(cf, key),
            }
        }
        self.write(batch, sync)
    }

    /// Every job-state entry whose key starts with `prefix`, in key order.
    pub fn job_scan(&self, prefix: &[u8]) -> Result<KeyValues, StoreError> {
        let cf = self.cf(CF_JOBS);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            cf,
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// Flushes memtables so a restart replays no WAL; called at shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        for cf in [
            CF_CHUNKS,
            CF_REFS,
            CF_MANIFESTS,
            CF_OBJECTS,
            CF_PENDING,
            CF_META,
            CF_RECORDS,
            CF_HELD,
            CF_PARTS,
            scrub::CF_QUARANTINE,
            CF_JOBS,
        ] {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }

    /// Test hook: overwrites a stored chunk's bytes without verification, as disk rot would.
    #[doc(hidden)]
    pub fn overwrite_chunk_unchecked(&self, id: &ChunkId, data: &[u8]) -> Result<(), StoreError> {
        if self.has_marker(id)? {
            return self
                .files
                .overwrite(id, data)
                .map_err(|e| io_error("overwriting a chunk file", e));
        }
        self.db.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), data)?;
        Ok(())
    }

    /// Removes a stored object and releases its references in one synced batch, to which
    /// `keep` adds the caller's own writes (they come after the removal, so a record put
    /// there stays). Chunks whose count reaches zero become GC candidates; none is deleted
    /// here. `None` (and nothing written) if the object is not stored.
    fn remove_object(
        &self,
        id: &ObjectId,
        keep: &dyn Fn(&mut WriteBatch),
    ) -> Result<Option<Freed>, StoreError> {
        let Some((manifest, _)) = self.manifest(id)? else {
            return Ok(None);
        };
        let uses = self.object_uses(id, &manifest)?;
        let _guards = self.lock_stripes(uses.keys());
        if self
            .db
            .get_pinned_cf(self.cf(CF_OBJECTS), id.as_bytes())?
            .is_none()
        {
            return Ok(None);
        }
        let mut batch = WriteBatch::default();
        let released = self.release_uses(&uses, &mut batch)?;
        for cf in [CF_MANIFESTS, CF_OBJECTS, CF_RECORDS, CF_HELD, CF_PARTS] {
            batch.delete_cf(self.cf(cf), id.as_bytes());
        }
        // A deleted object owes its holders nothing more.
        batch.delete_cf(self.cf(CF_PENDING), queue_key(Queue::Delivery, id));
        batch.merge_cf(self.cf(CF_META), KEY_OBJECTS, (-1i64).to_le_bytes());
        keep(&mut batch);
        self.write(batch, true)?;
        debug!(object = %id, released_chunks = released.chunks, "deleted object");
        Ok(Some(released))
    }

    /// Takes `uses` off the chunks' reference counts, in `batch`. A chunk whose count reaches
    /// zero becomes a GC candidate and stays for the grace; returns those chunks and bytes.
    /// Caller holds the chunks' stripes.
    fn release_uses(
        &self,
        uses: &HashMap<ChunkId, u64>,
        batch: &mut WriteBatch,
    ) -> Result<Freed, StoreError> {
        let mut released = Freed::default();
        for (chunk, n) in uses {
            let Some(mut rec) = self.ref_record(chunk)? else {
                continue;
            };
            let before = rec.count;
            rec.count = rec.count.saturating_sub(*n);
            batch.put_cf(self.cf(CF_REFS), chunk.as_bytes(), encode(&rec));
            if rec.count == 0 && before > 0 {
                batch.put_cf(
                    self.cf(CF_PENDING),
                    Self::orphan_key(chunk),
                    Candidate::now(Origin::Released).encode(),
                );
                released.chunks += 1;
                released.bytes += u64::from(rec.len);
            }
        }
        Ok(released)
    }

    /// See [`MetaStore::expire_tombstones`].
    fn drop_tombstones(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        let pending = self.cf(CF_PENDING);
        let mut due = Vec::new();
        let mut iter = self.db.raw_iterator_cf(pending);
        iter.seek([PENDING_EXPIRY]);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key.first() != Some(&PENDING_EXPIRY) || due.len() >= 4096 {
                break;
            }
            let since = <[u8; 8]>::try_from(value).map_or(0, u64::from_le_bytes);
            if since <= cutoff_ms
                && let Ok(bytes) = <[u8; 32]>::try_from(&key[1..])
            {
                due.push(ObjectId::from_bytes(bytes));
            }
            iter.next();
        }
        iter.status()?;
        drop(iter);
        let mut batch = WriteBatch::default();
        let mut dropped = 0;
        for id in &due {
            let still_tombstone = self
                .db
                .get_pinned_cf(self.cf(CF_RECORDS), id.as_bytes())?
                .is_some_and(|r| PlacementRecord::decode(&r).is_ok_and(|r| r.tombstone));
            if still_tombstone {
                batch.delete_cf(self.cf(CF_RECORDS), id.as_bytes());
                dropped += 1;
            }
            batch.delete_cf(pending, object_key(PENDING_EXPIRY, id));
        }
        self.write(batch, false)?;
        Ok(dropped)
    }

    /// Compacts the chunk column family so that deleted chunks leave its files, and returns
    /// the bytes of those files before and after. Blocks until done.
    ///
    /// A compaction drops the deleted keys, which tells RocksDB how much of each blob file is
    /// garbage; a blob file is deleted once all of it is, and the blob GC, which is on only
    /// for these compactions, moves the live blobs out of the oldest quarter of the files
    /// (`blob_gc_age_cutoff`). Deleted chunks in newer
    /// files that still hold live ones would wait until those files age into that quarter,
    /// so when at least [`FORCE_BLOB_GC_RATIO`] of the blob bytes are garbage after the first
    /// pass, a second pass runs with the cutoff at 1.0: every live blob moves once, and all
    /// the garbage goes. Rewriting at most three live bytes per garbage byte bounds the cost.
    pub fn compact_chunks(&self) -> Result<(u64, u64), StoreError> {
        let cf = self.cf(CF_CHUNKS);
        if self.config.blob_files {
            self.db
                .set_options_cf(cf, &[("enable_blob_garbage_collection", "true")])?;
        }
        let result = self.compact_chunks_with_gc();
        if self.config.blob_files {
            self.db
                .set_options_cf(cf, &[("enable_blob_garbage_collection", "false")])?;
        }
        result
    }

    fn compact_chunks_with_gc(&self) -> Result<(u64, u64), StoreError> {
        let cf = self.cf(CF_CHUNKS);
        let before = self.chunk_file_bytes()?;
        // The bottommost level too: that is where the deleted chunks' keys mostly are.
        let mut opts = CompactOptions::default();
        opts.set_bottommost_level_compaction(BottommostLevelCompaction::ForceOptimized);
        let compact = || {
            self.db
                .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts)
        };
        compact();
        if self.config.blob_files {
            let live = self
                .db
                .property_int_value_cf(cf, "rocksdb.live-blob-file-size")?
                .unwrap_or(0);
            let garbage = self
                .db
                .property_int_value_cf(cf, "rocksdb.live-blob-file-garbage-size")?
                .unwrap_or(0);
            if garbage > 0 && garbage as f64 >= live as f64 * FORCE_BLOB_GC_RATIO {
                debug!(
                    live,
                    garbage, "blob files are mostly garbage; moving every live blob"
                );
                self.db
                    .set_options_cf(cf, &[("blob_garbage_collection_age_cutoff", "1.0")])?;
                compact();
                self.db.set_options_cf(
                    cf,
                    &[(
                        "blob_garbage_collection_age_cutoff",
                        &BLOB_GC_AGE_CUTOFF.to_string(),
                    )],
                )?;
            }
        }
        Ok((before, self.chunk_file_bytes()?))
    }

    /// Bytes of the chunk column family on disk: its blob files plus its SST files.
    pub fn chunk_file_bytes(&self) -> Result<u64, StoreError> {
        let cf = self.cf(CF_CHUNKS);
        let blob = self
            .db
            .property_int_value_cf(cf, "rocksdb.total-blob-file-size")?;
        let sst = self
            .db
            .property_int_value_cf(cf, "rocksdb.total-sst-files-size")?;
        Ok(blob.unwrap_or(0) + sst.unwrap_or(0))
    }

    /// Commits `manifest`. With `placed`, only the parts at the given indices are referenced
    /// (this node holds part of the object), parts among them that are not stored are
    /// skipped and returned, and the placement record is stored in the same batch.
    fn commit(
        &self,
        manifest: &Manifest,
        placed: Option<(&[u8], &[usize], &[ChunkId])>,
    ) -> Result<(ObjectId, Vec<ChunkId>), StoreError> {
        let bytes = manifest.encode();
        let id = ObjectId::of(&bytes);
        let uses = match placed {
            None => chunk_uses(manifest),
            Some((_, held, parts)) => held_uses(&Parts::new(manifest, parts), held),
        };
        let _guards = self.lock_stripes(uses.keys());
        if self
            .db
            .get_pinned_cf(self.cf(CF_OBJECTS), id.as_bytes())?
            .is_some()
        {
            return match placed {
                Some((record, held, parts)) => {
                    self.extend_placed(&id, &Parts::new(manifest, parts), record, held)
                }
                None => Ok((id, Vec::new())),
            };
        }
        let mut batch = WriteBatch::default();
        let refs = self.cf(CF_REFS);
        let keys: Vec<&ChunkId> = uses.keys().collect();
        let current = self
            .db
            .multi_get_cf(keys.iter().map(|id| (refs, id.as_bytes())));
        let mut missing = Vec::new();
        for (chunk, value) in keys.into_iter().zip(current) {
            let Some(value) = value? else {
                if placed.is_some() {
                    missing.push(*chunk);
                    continue;
                }
                return Err(StoreError::MissingChunk {
                    object: id,
                    chunk: *chunk,
                });
            };
            let mut rec: RefRecord = decode(chunk.as_bytes(), &value)?;
            rec.count += uses[chunk];
            batch.put_cf(refs, chunk.as_bytes(), encode(&rec));
        }
        if let Some((record, held, parts)) = placed {
            batch.put_cf(self.cf(CF_RECORDS), id.as_bytes(), record);
            let lookup = Parts::new(manifest, parts);
            let held: Vec<u32> = held
                .iter()
                .filter(|&&i| lookup.get(i).is_some_and(|c| !missing.contains(&c)))
                .map(|&i| i as u32)
                .collect();
            batch.put_cf(self.cf(CF_HELD), id.as_bytes(), encode(&held));
            if !parts.is_empty() {
                batch.put_cf(self.cf(CF_PARTS), id.as_bytes(), encode_parts(parts));
            }
        }
        batch.put_cf(self.cf(CF_MANIFESTS), id.as_bytes(), &bytes);
        let record = ObjectRecord {
            version: 1,
            name: manifest.name.clone(),
            size: manifest.size,
            chunks: manifest.chunks.len() as u64,
            redundancy: manifest.redundancy,
            created_ms: manifest.created_ms,
        };
        batch.put_cf(self.cf(CF_OBJECTS), id.as_bytes(), encode(&record));
        batch.merge_cf(self.cf(CF_META), KEY_OBJECTS, 1i64.to_le_bytes());
        self.write(batch, true)?;
        debug!(object = %id, chunks = manifest.chunks.len(), "committed object");
        Ok((id, missing))
    }

    /// A placed object committed before: replaces the record and takes references on the
    /// chunks `held` names that arrived since (a holder finished in the background gets the
    /// record once at the put and again when its last chunks are delivered). References are
    /// only added here; releasing a holder's share is the repair's job. Caller holds the
    /// stripes of every chunk in `held`.
    fn extend_placed(
        &self,
        id: &ObjectId,
        parts: &Parts<'_>,
        record: &[u8],
        held: &[usize],
    ) -> Result<(ObjectId, Vec<ChunkId>), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_RECORDS), id.as_bytes(), record);
        let Some(previous) = self.db.get_pinned_cf(self.cf(CF_HELD), id.as_bytes())? else {
            // Committed whole (a local put): every chunk is referenced already.
            self.write(batch, true)?;
            return Ok((*id, Vec::new()));
        };
        let previous: Vec<u32> = decode(id.as_bytes(), &previous)?;
        let mut now_held: Vec<u32> = previous.clone();
        let added: Vec<usize> = held
            .iter()
            .copied()
            .filter(|&i| parts.get(i).is_some() && !previous.contains(&(i as u32)))
            .collect();
        let mut missing = Vec::new();
        let refs = self.cf(CF_REFS);
        let mut updated: HashMap<ChunkId, RefRecord> = HashMap::new();
        for i in added {
            let Some(chunk) = parts.get(i) else {
                continue;
            };
            let rec = match updated.get(&chunk) {
                Some(rec) => Some(*rec),
                None => self.ref_record(&chunk)?,
            };
            match rec {
                Some(mut rec) => {
                    rec.count += 1;
                    updated.insert(chunk, rec);
                    now_held.push(i as u32);
                }
                None => missing.push(chunk),
            }
        }
        if updated.is_empty() {
            self.write(batch, true)?;
            return Ok((*id, missing));
        }
        for (chunk, rec) in &updated {
            batch.put_cf(refs, chunk.as_bytes(), encode(rec));
        }
        now_held.sort_unstable();
        batch.put_cf(self.cf(CF_HELD), id.as_bytes(), encode(&now_held));
        self.write(batch, true)?;
        debug!(object = %id, added = now_held.len() - previous.len(), "took references on late chunks");
        Ok((*id, missing))
    }

    /// After a newer record moved parts away from this node (repair placed them elsewhere
    /// while this node was thought dead): releases the references of the parts it no longer
    /// lists here, and forgets the object when none is left, so a returning node does not
    /// keep surplus copies forever.
    fn release_dropped(
        &self,
        id: &ObjectId,
        manifest: &Manifest,
        held: &[usize],
    ) -> Result<(), StoreError> {
        let Some(previous) = self.db.get_pinned_cf(self.cf(CF_HELD), id.as_bytes())? else {
            return Ok(());
        };
        let previous: Vec<u32> = decode(id.as_bytes(), &previous)?;
        let dropped: Vec<usize> = previous
            .iter()
            .map(|&i| i as usize)
            .filter(|i| !held.contains(i))
            .collect();
        if dropped.is_empty() {
            return Ok(());
        }
        if dropped.len() == previous.len() {
            let freed = self.delete_object(id)?;
            info!(object = %id, released_chunks = freed.map_or(0, |f| f.chunks), "released the surplus share of an object repaired elsewhere");
            return Ok(());
        }
        let shards = self.parts(id)?;
        let parts = Parts::new(manifest, &shards);
        let uses = held_uses(&parts, &dropped);
        let _guards = self.lock_stripes(uses.keys());
        let mut batch = WriteBatch::default();
        let released = self.release_uses(&uses, &mut batch)?;
        let kept: Vec<u32> = previous
            .into_iter()
            .filter(|&i| held.contains(&(i as usize)))
            .collect();
        batch.put_cf(self.cf(CF_HELD), id.as_bytes(), encode(&kept));
        self.write(batch, true)?;
        info!(object = %id, released = dropped.len(), released_chunks = released.chunks, "released surplus parts of an object repaired elsewhere");
        Ok(())
    }

    /// Chunk references an object took: all of them, or those recorded as held.
    fn object_uses(
        &self,
        id: &ObjectId,
        manifest: &Manifest,
    ) -> Result<HashMap<ChunkId, u64>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_HELD), id.as_bytes())? {
            None => Ok(chunk_uses(manifest)),
            Some(v) => {
                let held: Vec<u32> = decode(id.as_bytes(), &v)?;
                let held: Vec<usize> = held.into_iter().map(|i| i as usize).collect();
                let parts = self.parts(id)?;
                Ok(held_uses(&Parts::new(manifest, &parts), &held))
            }
        }
    }

    /// The shard ids of an `ec:K+M` object this node keeps a share of; empty otherwise.
    pub fn parts(&self, id: &ObjectId) -> Result<Vec<ChunkId>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_PARTS), id.as_bytes())? {
            None => Ok(Vec::new()),
            Some(v) => decode_parts(id, &v),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl RocksStore {
    /// Stores a chunk whose bytes the caller has just hashed to `id` (a verified fetch from
    /// a peer), synced, without hashing them a second time.
    pub(crate) fn put_chunk_hashed(&self, id: &ChunkId, data: &[u8]) -> Result<bool, StoreError> {
        let _guard = lock(&self.stripes[self.stripe(id)]);
        self.insert_chunk(id, data, true)
    }
}

impl ChunkStore for RocksStore {
    fn put_chunk(&self, data: &[u8]) -> Result<StoredChunk, StoreError> {
        let id = ChunkId::of(data);
        let _guard = lock(&self.stripes[self.stripe(&id)]);
        let new = self.insert_chunk(&id, data, false)?;
        Ok(StoredChunk { id, new })
    }

    fn put_chunk_verified(&self, id: &ChunkId, data: &[u8]) -> Result<StoredChunk, StoreError> {
        check_hash(id, data)?;
        let _guard = lock(&self.stripes[self.stripe(id)]);
        let new = self.insert_chunk(id, data, true)?;
        Ok(StoredChunk { id: *id, new })
    }

    fn get_chunk(&self, id: &ChunkId) -> Result<Option<Bytes>, StoreError> {
        let bytes = match self.value(id)? {
            None => return Ok(None),
            Some(Value::Inline(value)) => Bytes::copy_from_slice(&value),
            Some(Value::File(bytes)) => bytes,
            Some(Value::Lost(reason)) => {
                warn!(chunk = %id, %reason, "stored chunk's file is unreadable");
                return Err(StoreError::Lost { id: *id, reason });
            }
        };
        let actual = ChunkId::of(&bytes);
        if &actual != id {
            warn!(chunk = %id, %actual, "stored chunk failed verification");
            return Err(StoreError::Corrupt { id: *id, actual });
        }
        Ok(Some(bytes))
    }

    fn has_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        // A quarantined chunk is referenced but not readable: a writer asking should send it.
        Ok(self.ref_record(id)?.is_some() && self.quarantine_entry(id)?.is_none())
    }
}

impl MetaStore for RocksStore {
    fn commit_object(&self, manifest: &Manifest) -> Result<ObjectId, StoreError> {
        self.commit(manifest, None).map(|(id, _)| id)
    }

    fn commit_placed(
        &self,
        manifest: &Manifest,
        record: &[u8],
        held: &[usize],
        parts: &[ChunkId],
    ) -> Result<(ObjectId, Vec<ChunkId>), StoreError> {
        let done = self.commit(manifest, Some((record, held, parts)))?;
        self.release_dropped(&done.0, manifest, held)?;
        Ok(done)
    }

    fn record(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_RECORDS), id.as_bytes())?)
    }

    fn put_queued(&self, queue: Queue, id: &ObjectId, value: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_PENDING), queue_key(queue, id), value);
        self.write(batch, true)
    }

    fn delete_queued(&self, queue: Queue, id: &ObjectId) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_PENDING), queue_key(queue, id));
        self.write(batch, true)
    }

    fn queued(&self, queue: Queue, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_PENDING), queue_key(queue, id))?)
    }

    fn visit_queued(
        &self,
        queue: Queue,
        after: Option<&ObjectId>,
        visit: &mut dyn FnMut(ObjectId, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let kind = queue_kind(queue);
        let start = match after {
            Some(id) => queue_key(queue, id).to_vec(),
            None => vec![kind],
        };
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_PENDING));
        iter.seek(&start);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key.first() != Some(&kind) {
                break;
            }
            if let Ok(bytes) = <[u8; 32]>::try_from(&key[1..]) {
                let id = ObjectId::from_bytes(bytes);
                if Some(&id) != after && !visit(id, value) {
                    break;
                }
            }
            iter.next();
        }
        Ok(iter.status()?)
    }

    fn put_record(&self, id: &ObjectId, record: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_RECORDS), id.as_bytes(), record);
        self.write(batch, true)
    }

    fn manifest(&self, id: &ObjectId) -> Result<Option<(Manifest, Vec<u8>)>, StoreError> {
        let Some(bytes) = self.db.get_cf(self.cf(CF_MANIFESTS), id.as_bytes())? else {
            return Ok(None);
        };
        let manifest = Manifest::decode_verified(id, &bytes)
            .map_err(|source| StoreError::BadManifest { id: *id, source })?;
        Ok(Some((manifest, bytes)))
    }

    fn object(&self, id: &ObjectId) -> Result<Option<ObjectSummary>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_OBJECTS), id.as_bytes())? {
            Some(v) => Ok(Some(summary(*id, decode(id.as_bytes(), &v)?))),
            None => Ok(None),
        }
    }

    fn list_objects(
        &self,
        after: Option<&ObjectId>,
        limit: usize,
    ) -> Result<Vec<ObjectSummary>, StoreError> {
        let mode = match after {
            Some(id) => IteratorMode::From(id.as_bytes(), Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_OBJECTS), mode) {
            let (key, value) = item?;
            let Ok(bytes) = <[u8; 32]>::try_from(&key[..]) else {
                continue;
            };
            let id = ObjectId::from_bytes(bytes);
            if Some(&id) == after {
                continue;
            }
            out.push(summary(id, decode(&key, &value)?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn delete_object(&self, id: &ObjectId) -> Result<Option<Freed>, StoreError> {
        self.remove_object(id, &|_| {})
    }

    fn apply_tombstone(
        &self,
        id: &ObjectId,
        tombstone: &[u8],
        deliveries: Option<&[u8]>,
    ) -> Result<Freed, StoreError> {
        let keep = |batch: &mut WriteBatch| {
            batch.put_cf(self.cf(CF_RECORDS), id.as_bytes(), tombstone);
            batch.put_cf(
                self.cf(CF_PENDING),
                object_key(PENDING_EXPIRY, id),
                now_ms().to_le_bytes(),
            );
            if let Some(value) = deliveries {
                batch.put_cf(self.cf(CF_PENDING), queue_key(Queue::Tombstone, id), value);
            }
        };
        if let Some(released) = self.remove_object(id, &keep)? {
            return Ok(released);
        }
        // Not stored here (a node that was only told, or a holder whose copy never committed).
        let mut batch = WriteBatch::default();
        keep(&mut batch);
        self.write(batch, true)?;
        Ok(Freed::default())
    }

    fn collect_garbage(&self, cutoff_ms: u64) -> Result<Collected, StoreError> {
        self.sweep(|c| c.since_ms <= cutoff_ms)
    }

    fn expire_tombstones(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        self.drop_tombstones(cutoff_ms)
    }

    fn stats(&self) -> Result<Stats, StoreError> {
        Ok(Stats {
            objects: self.counter(KEY_OBJECTS)?,
            chunks: self.counter(KEY_CHUNKS)?,
            bytes: self.counter(KEY_BYTES)?,
        })
    }
}

/// Refuses bytes that do not hash to the id they are offered under.
/// Whether files in `dir` (created if missing) can be opened with `O_DIRECT`; RocksDB would
/// otherwise fail its first flush.
fn direct_io_works(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".direct-io-probe");
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    opened.map(drop)
}

/// A file-system error of the chunk files, as a store error (`DiskFull` for `ENOSPC`).
fn io_error(what: &str, e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        StoreError::DiskFull(format!("{what}: {e}"))
    } else {
        StoreError::Db(format!("{what}: {e}"))
    }
}

fn check_hash(id: &ChunkId, data: &[u8]) -> Result<(), StoreError> {
    let actual = ChunkId::of(data);
    if &actual != id {
        return Err(StoreError::HashMismatch {
            claimed: *id,
            actual,
        });
    }
    Ok(())
}

fn object_key(kind: u8, id: &ObjectId) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[0] = kind;
    key[1..].copy_from_slice(id.as_bytes());
    key
}

fn queue_kind(queue: Queue) -> u8 {
    match queue {
        Queue::Delivery => PENDING_DELIVERY,
        Queue::Tombstone => PENDING_TOMBSTONE,
    }
}

fn queue_key(queue: Queue, id: &ObjectId) -> [u8; 33] {
    object_key(queue_kind(queue), id)
}

/// How many times the manifest references each chunk: the amount its commit adds to (and its
/// delete takes from) each reference count.
fn held_uses(parts: &Parts<'_>, held: &[usize]) -> HashMap<ChunkId, u64> {
    let mut uses = HashMap::new();
    for chunk in held.iter().filter_map(|&i| parts.get(i)) {
        *uses.entry(chunk).or_insert(0) += 1;
    }
    uses
}

/// The parts of an object, by index: its manifest's chunks (`rep:N`), or its shards.
struct Parts<'a> {
    manifest: &'a Manifest,
    shards: &'a [ChunkId],
}

impl<'a> Parts<'a> {
    fn new(manifest: &'a Manifest, shards: &'a [ChunkId]) -> Self {
        Self { manifest, shards }
    }

    fn get(&self, index: usize) -> Option<ChunkId> {
        if self.shards.is_empty() {
            self.manifest.chunks.get(index).map(|c| c.id)
        } else {
            self.shards.get(index).copied()
        }
    }
}

/// Shard ids are stored as their raw bytes back to back: no length limit to trip over.
fn encode_parts(parts: &[ChunkId]) -> Vec<u8> {
    parts.iter().flat_map(|p| *p.as_bytes()).collect()
}

fn decode_parts(id: &ObjectId, bytes: &[u8]) -> Result<Vec<ChunkId>, StoreError> {
    if !bytes.len().is_multiple_of(32) {
        return Err(StoreError::BadRecord {
            key: hex::encode(id.as_bytes()),
            reason: format!("shard list of {} bytes is not whole ids", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(32)
        .filter_map(|c| <[u8; 32]>::try_from(c).ok())
        .map(ChunkId::from_bytes)
        .collect())
}

fn chunk_uses(manifest: &Manifest) -> HashMap<ChunkId, u64> {
    let mut uses = HashMap::new();
    for chunk in &manifest.chunks {
        *uses.entry(chunk.id).or_insert(0) += 1;
    }
    uses
}

fn summary(id: ObjectId, rec: ObjectRecord) -> ObjectSummary {
    ObjectSummary {
        id,
        name: rec.name,
        size: rec.size,
        chunks: rec.chunks,
        redundancy: rec.redundancy,
        created_ms: rec.created_ms,
    }
}

/// An upload in progress: the chunks it stored are pinned until [`Upload::commit`]; dropping
/// it uncommitted deletes those of its chunks that nothing else references.
#[derive(Debug)]
pub struct Upload {
    store: Arc<RocksStore>,
    pinned: Vec<ChunkId>,
    committed: bool,
}

impl Upload {
    /// Stores a chunk for this upload (computing its id) and pins it.
    pub fn put(&mut self, data: &[u8]) -> Result<StoredChunk, StoreError> {
        let id = ChunkId::of(data);
        let new = self.put_hashed(id, data)?;
        Ok(StoredChunk { id, new })
    }

    /// [`Upload::put`] for bytes this node has just hashed itself (never bytes from a
    /// peer): `id` must be their BLAKE3. Returns whether the chunk is new here.
    pub(crate) fn put_hashed(&mut self, id: ChunkId, data: &[u8]) -> Result<bool, StoreError> {
        debug_assert_eq!(id, ChunkId::of(data));
        let _guard = lock(&self.store.stripes[self.store.stripe(&id)]);
        self.store.pin(&id);
        self.pinned.push(id);
        self.store.insert_chunk(&id, data, false)
    }

    /// Commits this node's part of a placed object (see [`MetaStore::commit_placed`]) and
    /// unpins the upload's chunks.
    pub fn commit_placed(
        mut self,
        manifest: &Manifest,
        record: &[u8],
        held: &[usize],
        parts: &[ChunkId],
    ) -> Result<(ObjectId, Vec<ChunkId>), StoreError> {
        let done = self.store.commit_placed(manifest, record, held, parts)?;
        self.committed = true;
        // Unpin; chunks this upload stored but the record does not place here are removed.
        if let Err(e) = self.store.release(&self.pinned) {
            warn!(error = %e, "releasing chunks not placed on this node failed");
        }
        Ok(done)
    }

    /// Commits the object and unpins its chunks.
    pub fn commit(mut self, manifest: &Manifest) -> Result<ObjectId, StoreError> {
        let id = self.store.commit_object(manifest)?;
        self.committed = true;
        for chunk in &self.pinned {
            self.store.unpin(chunk);
        }
        Ok(id)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.committed || self.pinned.is_empty() {
            return;
        }
        match self.store.release(&self.pinned) {
            Ok(freed) => debug!(
                chunks = freed.chunks,
                bytes = freed.bytes,
                "released chunks of an abandoned upload"
            ),
            // The chunks stay listed as GC candidates; the next sweep retries.
            Err(e) => warn!(error = %e, "releasing an abandoned upload's chunks failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_version_1_store_is_upgraded_at_open_and_its_inline_chunks_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let inline = Config {
            chunk_files: false,
            ..Config::default()
        };
        let data = vec![3u8; 200_000];
        {
            // What a meshd before chunk files left: schema 1, every chunk inline.
            let store = RocksStore::open(dir.path(), &inline).unwrap();
            store.put_chunk(&data).unwrap();
            let manifest = Manifest::new(
                None,
                mesh_proto::ChunkerSpec::Fixed { size: 1 << 20 },
                Redundancy::DEFAULT,
                vec![mesh_proto::ChunkRef {
                    id: ChunkId::of(&data),
                    len: 200_000,
                }],
                std::collections::BTreeMap::new(),
                1,
            )
            .unwrap();
            store.commit_object(&manifest).unwrap();
            store
                .db
                .put_cf(store.cf(CF_META), KEY_SCHEMA, 1u32.to_le_bytes())
                .unwrap();
        }
        let store = RocksStore::open(dir.path(), &Config::default()).unwrap();
        let schema = store.db.get_cf(store.cf(CF_META), KEY_SCHEMA).unwrap();
        assert_eq!(schema.unwrap(), SCHEMA_VERSION.to_le_bytes());
        let id = ChunkId::of(&data);
        assert!(matches!(store.value(&id).unwrap(), Some(Value::Inline(_))));
        assert_eq!(store.get_chunk(&id).unwrap().unwrap(), data);

        // A schema this build does not know is refused.
        store
            .db
            .put_cf(store.cf(CF_META), KEY_SCHEMA, 3u32.to_le_bytes())
            .unwrap();
        drop(store);
        assert!(matches!(
            RocksStore::open(dir.path(), &Config::default()),
            Err(StoreError::BadRecord { .. })
        ));
    }
}
