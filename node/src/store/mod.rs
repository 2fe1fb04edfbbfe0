//! Local storage: content-addressed chunks and object metadata, behind two narrow traits.
//!
//! - [`ChunkStore`]: chunk bytes keyed by their BLAKE3. Every write checks that the bytes hash
//!   to the key (or computes the key from them); every read hashes again and returns
//!   [`StoreError::Corrupt`] rather than bad bytes.
//! - [`MetaStore`]: manifests, object summaries and per-chunk reference counts. Committing or
//!   deleting an object is one atomic, synced write batch, so an object is either wholly
//!   visible or not at all, even after `kill -9`.
//!
//! Chunks shared by several objects are stored once. A chunk written by an upload that never
//! commits (client gone, process killed) is an orphan: it is recorded as a GC candidate in the
//! same batch that stores it, and swept when no object references it and no upload in progress
//! holds it. Deleting an object (locally, or by applying a tombstone placement record another
//! node sent) releases its references in one batch; each chunk whose count reaches zero
//! becomes a GC candidate with a timestamp, and the node's GC worker (`crate::gc`) deletes it
//! once `gc_grace` has passed if nothing referenced it again meanwhile, then compacts the chunk
//! column family so the blob files give the space back. [`rocks::RocksStore`] is the
//! implementation. It keeps large chunks (64 KiB and up by default) in files of their own,
//! one per chunk, written once with `O_DIRECT` and synced before RocksDB names them
//! ([`rocks::files`]); small ones stay in RocksDB, in its integrated blob files above
//! `min_blob_size`. Metadata, counts and the names of chunk files are RocksDB's either way.

pub mod rocks;

use bytes::Bytes;
use mesh_proto::api::ObjectSummary;
use mesh_proto::{ChunkId, Manifest, ManifestError, ObjectId};
use serde::{Deserialize, Serialize};

pub use rocks::RocksStore;

/// Tuning of the RocksDB store. Defaults are what the `store` benchmark found fastest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Keep chunk values in blob files instead of the LSM tree.
    pub blob_files: bool,
    /// Values at least this long go to blob files.
    pub min_blob_size: bytesize::ByteSize,
    /// Memtable size of the chunk column family.
    pub write_buffer_size: bytesize::ByteSize,
    /// Block cache shared by the metadata column families.
    pub block_cache_size: bytesize::ByteSize,
    /// Sync the WAL on every object commit and delete (power-loss durability).
    pub sync_commits: bool,
    /// Write memtable flushes and compactions with `O_DIRECT`, past the page cache. Every
    /// chunk byte is flushed once into a blob file; through the page cache that is one more
    /// copy of it (a tenth of a write-heavy job's CPU on the benchmark VM) and pages that
    /// crowd out what readers use. Ignored, with a warning, where the file system has no
    /// `O_DIRECT` (tmpfs).
    pub direct_io: bool,
    /// Keep the bytes of large chunks in files of their own (`chunk-files/` in the store
    /// directory) instead of RocksDB: one write per stored byte instead of five copies and
    /// two checksums (see `rocks::files`). Chunks already stored stay where they are.
    pub chunk_files: bool,
    /// Chunks at least this long go to chunk files; smaller ones (manifests, small shards)
    /// stay in RocksDB.
    pub min_file_size: bytesize::ByteSize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            blob_files: true,
            min_blob_size: bytesize::ByteSize::kib(64),
            write_buffer_size: bytesize::ByteSize::mib(64),
            block_cache_size: bytesize::ByteSize::mib(32),
            sync_commits: true,
            direct_io: true,
            chunk_files: true,
            min_file_size: bytesize::ByteSize::kib(64),
        }
    }
}

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk {id} is corrupt: its stored bytes hash to {actual}")]
    Corrupt { id: ChunkId, actual: ChunkId },
    /// The chunk's file is missing or unreadable (deleted or damaged outside meshd).
    #[error("chunk {id} is lost: its file is unreadable: {reason}")]
    Lost { id: ChunkId, reason: String },
    #[error("refused chunk {claimed}: its bytes hash to {actual}")]
    HashMismatch { claimed: ChunkId, actual: ChunkId },
    #[error("object {object} references chunk {chunk}, which is not stored")]
    MissingChunk { object: ObjectId, chunk: ChunkId },
    #[error("stored manifest of {id} is unreadable: {source}")]
    BadManifest { id: ObjectId, source: ManifestError },
    #[error("stored record under {key} is unreadable: {reason}")]
    BadRecord { key: String, reason: String },
    #[error("the data directory {path} is in use by another process (RocksDB lock held): {detail}")]
    Locked { path: String, detail: String },
    #[error("no space left on the device holding the store: {0}")]
    DiskFull(String),
    #[error("storage error: {0}")]
    Db(String),
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let text = e.into_string();
        if text.contains("No space left") || text.contains("ENOSPC") {
            StoreError::DiskFull(text)
        } else {
            StoreError::Db(text)
        }
    }
}

/// Result of storing one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    pub id: ChunkId,
    /// False when the chunk was already stored (deduplicated).
    pub new: bool,
}

/// Chunks and their bytes: those whose last reference a delete released (they become GC
/// candidates), or those a sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Freed {
    pub chunks: u64,
    pub bytes: u64,
}

/// What a garbage collection pass did, and what it left for later.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Chunks deleted.
    pub freed: Freed,
    /// Unreferenced chunks still inside their grace (or pinned by an upload).
    pub waiting_chunks: u64,
    pub waiting_bytes: u64,
}

/// The durable per-object work queues the store keeps for the node's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// Holders a put still owes chunks or its placement record (`replicate::complete`).
    Delivery,
    /// Holders a delete still has to tell about the tombstone (`replicate::delete`).
    Tombstone,
}

/// Counters kept in the store itself, exact across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub objects: u64,
    pub chunks: u64,
    pub bytes: u64,
}

/// Content-addressed chunk bytes.
pub trait ChunkStore: Send + Sync {
    /// Stores `data` under its BLAKE3, computed here.
    fn put_chunk(&self, data: &[u8]) -> Result<StoredChunk, StoreError>;
    /// Stores `data` under `id`, refusing bytes that do not hash to `id`, durably (synced)
    /// before it returns: this is how another node's chunk is acknowledged.
    fn put_chunk_verified(&self, id: &ChunkId, data: &[u8]) -> Result<StoredChunk, StoreError>;
    /// Reads and verifies a chunk.
    fn get_chunk(&self, id: &ChunkId) -> Result<Option<Bytes>, StoreError>;
    fn has_chunk(&self, id: &ChunkId) -> Result<bool, StoreError>;
}

/// Object metadata and reference counts.
pub trait MetaStore: Send + Sync {
    /// Records the object and takes a reference on each of its chunks, atomically. Every
    /// chunk must be stored. Committing the same manifest twice is a no-op.
    fn commit_object(&self, manifest: &Manifest) -> Result<ObjectId, StoreError>;
    /// Records an object this node holds part of: references only the parts at the indices
    /// in `held` (skipping, and returning, those that are not stored), and keeps the encoded
    /// placement record, atomically. Parts are the manifest's chunks when `parts` is empty
    /// (`rep:N`), else the shard ids it lists (`ec:K+M`). If the object is already committed, the record is
    /// replaced and references are added for held chunks that arrived since (the caller
    /// decides which record wins).
    fn commit_placed(
        &self,
        manifest: &Manifest,
        record: &[u8],
        held: &[usize],
        parts: &[ChunkId],
    ) -> Result<(ObjectId, Vec<ChunkId>), StoreError>;
    /// The encoded placement record of an object, if this node keeps one.
    fn record(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Queues (or replaces) an entry of a durable per-object work queue: an opaque,
    /// versioned value its worker encodes. Synced, so it survives a restart.
    fn put_queued(&self, queue: Queue, id: &ObjectId, value: &[u8]) -> Result<(), StoreError>;
    fn delete_queued(&self, queue: Queue, id: &ObjectId) -> Result<(), StoreError>;
    fn queued(&self, queue: Queue, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Calls `visit` with each entry of `queue` after `after`, in object-id order, on the
    /// stored bytes (no copies), until it returns false.
    fn visit_queued(
        &self,
        queue: Queue,
        after: Option<&ObjectId>,
        visit: &mut dyn FnMut(ObjectId, &[u8]) -> bool,
    ) -> Result<(), StoreError>;
    /// Queues (or replaces) the background deliveries still owed for an object.
    fn put_delivery(&self, id: &ObjectId, value: &[u8]) -> Result<(), StoreError> {
        self.put_queued(Queue::Delivery, id, value)
    }
    fn delete_delivery(&self, id: &ObjectId) -> Result<(), StoreError> {
        self.delete_queued(Queue::Delivery, id)
    }
    fn delivery(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        self.queued(Queue::Delivery, id)
    }
    /// The queued deliveries after `after`, as [`MetaStore::visit_queued`] visits them.
    fn visit_deliveries(
        &self,
        after: Option<&ObjectId>,
        visit: &mut dyn FnMut(ObjectId, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.visit_queued(Queue::Delivery, after, visit)
    }
    /// Up to `limit` queued deliveries ordered by object id, starting after `after`.
    fn deliveries(
        &self,
        after: Option<&ObjectId>,
        limit: usize,
    ) -> Result<Vec<(ObjectId, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        self.visit_deliveries(after, &mut |id, value| {
            out.push((id, value.to_vec()));
            out.len() < limit
        })?;
        Ok(out)
    }
    /// Replaces the placement record of an object.
    fn put_record(&self, id: &ObjectId, record: &[u8]) -> Result<(), StoreError>;
    /// The decoded manifest and its canonical bytes.
    fn manifest(&self, id: &ObjectId) -> Result<Option<(Manifest, Vec<u8>)>, StoreError>;
    fn object(&self, id: &ObjectId) -> Result<Option<ObjectSummary>, StoreError>;
    /// Up to `limit` objects ordered by id, starting after `after`.
    fn list_objects(
        &self,
        after: Option<&ObjectId>,
        limit: usize,
    ) -> Result<Vec<ObjectSummary>, StoreError>;
    /// Removes the object, its placement record and any deliveries it still owes, and
    /// releases its references, atomically. Chunks whose last reference this releases become
    /// GC candidates and stay until a [`MetaStore::collect_garbage`] after the grace
    /// (or a new object references them again). `None` if the object is unknown.
    fn delete_object(&self, id: &ObjectId) -> Result<Option<Freed>, StoreError>;
    /// Deletes the object as [`MetaStore::delete_object`] does (if it is stored here) and
    /// keeps `tombstone` as its placement record, in one synced batch, with `deliveries`
    /// queued on [`Queue::Tombstone`] when given. The record stays until
    /// [`MetaStore::expire_tombstones`] drops it, so a late, older record of the
    /// object cannot bring it back.
    fn apply_tombstone(
        &self,
        id: &ObjectId,
        tombstone: &[u8],
        deliveries: Option<&[u8]>,
    ) -> Result<Freed, StoreError>;
    /// Deletes every GC candidate that became one at or before `cutoff_ms` (ms since the
    /// epoch) and that no object references and no upload pins, and forgets candidates that
    /// are referenced again. Reports what it deleted and what is still waiting.
    fn collect_garbage(&self, cutoff_ms: u64) -> Result<Collected, StoreError>;
    /// Drops the tombstone records this node has kept since `cutoff_ms` or earlier (ms since
    /// the epoch); a record that is no longer a tombstone stays. Returns how many went.
    fn expire_tombstones(&self, cutoff_ms: u64) -> Result<u64, StoreError>;
    fn stats(&self) -> Result<Stats, StoreError>;
}
