//! The RocksDB implementation of [`ChunkStore`] and [`MetaStore`].
//!
//! Column families:
//!
//! | cf          | key                  | value                                              |
//! |-------------|----------------------|----------------------------------------------------|
//! | `chunks`    | ChunkId              | the chunk's bytes (blob files)                     |
//! | `refs`      | ChunkId              | [`RefRecord`]: reference count and chunk length     |
//! | `manifests` | ObjectId             | canonical manifest bytes (versioned by the manifest)|
//! | `objects`   | ObjectId             | [`ObjectRecord`]: the summary `ls` shows            |
//! | `pending`   | kind byte + key      | durable work queue; today GC candidates            |
//! | `records`   | ObjectId             | the placement record this node keeps               |
//! | `held`      | ObjectId             | part indices referenced here (partial holders)     |
//! | `parts`     | ObjectId             | shard ids of an `ec:K+M` object (what `held` indexes)|
//! | `meta`      | name                 | schema version and counters (merge operator `add`) |
//! | `quarantine`| ChunkId              | chunks whose bytes failed verification ([`scrub`]) |
//!
//! Every stored chunk has a `refs` entry, so "is this chunk stored" is a small point lookup that
//! never touches the chunk's blob. Mutations of one chunk's existence or count happen under a
//! striped lock keyed by the chunk id; uploads in progress pin their chunks in memory so that a
//! concurrent delete of another object sharing them cannot remove them before the commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mesh_proto::api::ObjectSummary;
use mesh_proto::{ChunkId, Manifest, ObjectId, Redundancy};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType,
    Direction, IteratorMode, MergeOperands, Options, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{ChunkStore, Config, Freed, MetaStore, Stats, StoreError, StoredChunk};

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

/// Layout version of everything this module writes; checked at open.
const SCHEMA_VERSION: u32 = 1;
const KEY_SCHEMA: &[u8] = b"schema";
const KEY_OBJECTS: &[u8] = b"count/objects";
const KEY_CHUNKS: &[u8] = b"count/chunks";
const KEY_BYTES: &[u8] = b"count/bytes";

/// Pending-queue kind: a chunk that may have no reference (written by an upload that has not
/// committed, or released while an upload held it).
const PENDING_ORPHAN: u8 = 1;
/// Pending-queue kind: holders of a put that are still owed chunks or the placement record
/// (the writer's background completion; the value is opaque to the store).
const PENDING_DELIVERY: u8 = 2;

const STRIPES: usize = 64;

/// Reference count of a stored chunk, and its length for the byte counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct RefRecord {
    version: u8,
    count: u64,
    len: u32,
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
    pins: Mutex<HashMap<ChunkId, u32>>,
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
        db_opts.set_max_total_wal_size(512 << 20);
        db_opts.set_keep_log_file_num(4);

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
            chunk_opts.set_enable_blob_gc(true);
            chunk_opts.set_blob_gc_age_cutoff(0.25);
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
            pins: Mutex::new(HashMap::new()),
        });
        store.check_schema()?;
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
            Some(v) => Err(StoreError::BadRecord {
                key: "meta/schema".into(),
                reason: format!(
                    "store schema {v:?} is not {SCHEMA_VERSION}; this meshd cannot read it"
                ),
            }),
        }
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync && self.config.sync_commits);
        self.db.write_opt(batch, &opts)?;
        Ok(())
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

    /// Writes a chunk whose id is known to match. Caller holds the chunk's stripe.
    fn insert_chunk(&self, id: &ChunkId, data: &[u8], sync: bool) -> Result<bool, StoreError> {
        if self.ref_record(id)?.is_some() {
            // Verified bytes of a chunk whose stored copy went bad put it back.
            self.heal_if_quarantined(id, data, sync)?;
            return Ok(false);
        }
        let len = u32::try_from(data.len())
            .map_err(|_| StoreError::Db("chunk longer than 4 GiB".into()))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), data);
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
            now_ms().to_le_bytes(),
        );
        batch.merge_cf(self.cf(CF_META), KEY_CHUNKS, 1i64.to_le_bytes());
        batch.merge_cf(self.cf(CF_META), KEY_BYTES, i64::from(len).to_le_bytes());
        // A local upload's chunks are not synced on their own: the object commit that
        // references them syncs the WAL, which covers every earlier write. A chunk another
        // node sends is synced before it is acknowledged (concurrent syncs share one fsync).
        self.write(batch, sync)?;
        Ok(true)
    }

    /// Deletes `id` if no object references it and no upload pins it. Caller holds the stripe.
    fn remove_if_unreferenced(
        &self,
        id: &ChunkId,
        batch: &mut WriteBatch,
        freed: &mut Freed,
    ) -> Result<(), StoreError> {
        if self.pinned(id) {
            // The upload that pins it will commit (taking a reference) or release it; the
            // candidate entry stays for the sweep in case this process dies first.
            return Ok(());
        }
        match self.ref_record(id)? {
            Some(rec) if rec.count == 0 => self.delete_chunk(id, rec.len, batch, freed),
            _ => batch.delete_cf(self.cf(CF_PENDING), Self::orphan_key(id)),
        }
        Ok(())
    }

    fn delete_chunk(&self, id: &ChunkId, len: u32, batch: &mut WriteBatch, freed: &mut Freed) {
        batch.delete_cf(self.cf(CF_CHUNKS), id.as_bytes());
        batch.delete_cf(self.cf(CF_REFS), id.as_bytes());
        batch.delete_cf(self.cf(CF_PENDING), Self::orphan_key(id));
        batch.merge_cf(self.cf(CF_META), KEY_CHUNKS, (-1i64).to_le_bytes());
        batch.merge_cf(self.cf(CF_META), KEY_BYTES, (-i64::from(len)).to_le_bytes());
        freed.chunks += 1;
        freed.bytes += u64::from(len);
    }

    /// Deletes every GC candidate that no object references and no upload pins.
    pub fn sweep_orphans(&self) -> Result<Freed, StoreError> {
        let mut freed = Freed::default();
        let pending = self.cf(CF_PENDING);
        let candidates: Vec<ChunkId> = self
            .db
            .prefix_iterator_cf(pending, [PENDING_ORPHAN])
            .map_while(|item| item.ok())
            .take_while(|(k, _)| k.first() == Some(&PENDING_ORPHAN))
            .filter_map(|(k, _)| <[u8; 32]>::try_from(&k[1..]).ok().map(ChunkId::from_bytes))
            .collect();
        for batch_ids in candidates.chunks(256) {
            let _guards = self.lock_stripes(batch_ids.iter());
            let mut batch = WriteBatch::default();
            for id in batch_ids {
                if !self.pinned(id) {
                    self.remove_if_unreferenced(id, &mut batch, &mut freed)?;
                }
            }
            self.write(batch, false)?;
        }
        Ok(freed)
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
            for id in group {
                if self.unpin(id) {
                    self.remove_if_unreferenced(id, &mut batch, &mut freed)?;
                }
            }
            self.write(batch, false)?;
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
            scrub::CF_QUARANTINE,
        ] {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }

    /// Test hook: overwrites a stored chunk's bytes without verification, as disk rot would.
    #[doc(hidden)]
    pub fn overwrite_chunk_unchecked(&self, id: &ChunkId, data: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), data)?;
        Ok(())
    }

    /// Where the store lives.
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
            info!(object = %id, freed_chunks = freed.map_or(0, |f| f.chunks), "released the surplus share of an object repaired elsewhere");
            return Ok(());
        }
        let shards = self.parts(id)?;
        let parts = Parts::new(manifest, &shards);
        let uses = held_uses(&parts, &dropped);
        let _guards = self.lock_stripes(uses.keys());
        let mut batch = WriteBatch::default();
        let mut freed = Freed::default();
        for (chunk, n) in &uses {
            let Some(mut rec) = self.ref_record(chunk)? else {
                continue;
            };
            rec.count = rec.count.saturating_sub(*n);
            if rec.count == 0 && !self.pinned(chunk) {
                self.delete_chunk(chunk, rec.len, &mut batch, &mut freed);
            } else {
                batch.put_cf(self.cf(CF_REFS), chunk.as_bytes(), encode(&rec));
            }
        }
        let kept: Vec<u32> = previous
            .into_iter()
            .filter(|&i| held.contains(&(i as usize)))
            .collect();
        batch.put_cf(self.cf(CF_HELD), id.as_bytes(), encode(&kept));
        self.write(batch, true)?;
        info!(object = %id, released = dropped.len(), freed_chunks = freed.chunks, "released surplus parts of an object repaired elsewhere");
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
        let Some(value) = self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.as_bytes())? else {
            return Ok(None);
        };
        let actual = ChunkId::of(&value);
        if &actual != id {
            warn!(chunk = %id, %actual, "stored chunk failed verification");
            return Err(StoreError::Corrupt { id: *id, actual });
        }
        Ok(Some(Bytes::copy_from_slice(&value)))
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

    fn put_delivery(&self, id: &ObjectId, value: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_PENDING), delivery_key(id), value);
        self.write(batch, true)
    }

    fn delete_delivery(&self, id: &ObjectId) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_PENDING), delivery_key(id));
        self.write(batch, true)
    }

    fn delivery(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_PENDING), delivery_key(id))?)
    }

    fn visit_deliveries(
        &self,
        after: Option<&ObjectId>,
        visit: &mut dyn FnMut(ObjectId, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let start = match after {
            Some(id) => delivery_key(id).to_vec(),
            None => vec![PENDING_DELIVERY],
        };
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_PENDING));
        iter.seek(&start);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key.first() != Some(&PENDING_DELIVERY) {
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
        let mut freed = Freed::default();
        let refs = self.cf(CF_REFS);
        for (chunk, n) in &uses {
            let Some(mut rec) = self.ref_record(chunk)? else {
                continue;
            };
            rec.count = rec.count.saturating_sub(*n);
            if rec.count == 0 && !self.pinned(chunk) {
                self.delete_chunk(chunk, rec.len, &mut batch, &mut freed);
            } else {
                batch.put_cf(refs, chunk.as_bytes(), encode(&rec));
                if rec.count == 0 {
                    // An upload in progress holds it; it commits a reference or releases it.
                    batch.put_cf(
                        self.cf(CF_PENDING),
                        Self::orphan_key(chunk),
                        now_ms().to_le_bytes(),
                    );
                }
            }
        }
        batch.delete_cf(self.cf(CF_MANIFESTS), id.as_bytes());
        batch.delete_cf(self.cf(CF_OBJECTS), id.as_bytes());
        batch.delete_cf(self.cf(CF_RECORDS), id.as_bytes());
        batch.delete_cf(self.cf(CF_HELD), id.as_bytes());
        batch.delete_cf(self.cf(CF_PARTS), id.as_bytes());
        batch.merge_cf(self.cf(CF_META), KEY_OBJECTS, (-1i64).to_le_bytes());
        self.write(batch, true)?;
        debug!(object = %id, freed_chunks = freed.chunks, "deleted object");
        Ok(Some(freed))
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

fn delivery_key(id: &ObjectId) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[0] = PENDING_DELIVERY;
    key[1..].copy_from_slice(id.as_bytes());
    key
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
        let _guard = lock(&self.store.stripes[self.store.stripe(&id)]);
        self.store.pin(&id);
        self.pinned.push(id);
        let new = self.store.insert_chunk(&id, data, false)?;
        Ok(StoredChunk { id, new })
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
