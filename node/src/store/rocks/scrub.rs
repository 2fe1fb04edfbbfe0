//! The store's side of scrubbing: walking the `chunks` family in key order while re-hashing
//! each value in place (or the chunk file its marker names), moving a chunk whose bytes fail
//! verification or whose file is unreadable into quarantine, and putting verified bytes back.
//!
//! A quarantined chunk has no value in `chunks` and no chunk file (so no read can return its
//! bad bytes, and a read behaves as for a chunk this node lacks and goes to other holders) but
//! keeps its `refs` entry, so the objects that reference it stay consistent and its counts
//! stay exact. The `quarantine` family remembers it until good bytes come back: from the
//! scrubber's repair, or from any verified write of the same chunk (another node re-sending
//! it, a local put). The bad bytes themselves are dropped: a content address makes them
//! worthless, and keeping up to a few MiB per chunk outside blob files would only cost
//! compaction.
//!
//! The worker that drives this, paces it and repairs, is [`crate::scrub`].

use mesh_proto::{ChunkId, ObjectId};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{
    CF_CHUNKS, CF_HELD, CF_MANIFESTS, CF_META, CF_PARTS, RocksStore, Value, check_hash, decode,
    decode_parts, encode, files, lock, now_ms,
};
use crate::store::StoreError;

/// Chunks whose stored bytes failed verification: ChunkId -> [`Quarantined`].
pub(super) const CF_QUARANTINE: &str = "quarantine";
/// Number of entries in `quarantine` (merge operator `add`).
const KEY_QUARANTINED: &[u8] = b"count/quarantined";
/// The scrubber's persisted state (opaque to the store; the worker versions it).
const KEY_SCRUB_STATE: &[u8] = b"scrub/state";

/// Called with an object's id and a value kept under it; returns whether to go on.
type ValueVisitor<'a> = dyn FnMut(ObjectId, &[u8]) -> Result<bool, StoreError> + 'a;

/// Why a chunk is in quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    version: u8,
    /// When the mismatch was found (ms since the Unix epoch).
    pub since_ms: u64,
    /// What the bad bytes hashed to, and how many there were.
    pub actual: ChunkId,
    pub bad_len: u32,
}

/// What one bounded step of a scrub walk found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubBatch {
    /// Chunks and bytes re-hashed.
    pub chunks: u64,
    pub bytes: u64,
    /// The last key visited: where the next batch starts (after it).
    pub last: Option<ChunkId>,
    /// Chunks that failed verification and were moved into quarantine by this batch.
    pub quarantined: Vec<ChunkId>,
    /// True when the walk reached the end of the chunks.
    pub done: bool,
}

/// What [`RocksStore::restore_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// The bytes were written back and the quarantine entry removed.
    Replaced,
    /// The chunk was stored and readable already (healed meanwhile); the entry, if any, is gone.
    AlreadyGood,
    /// No object references the chunk any more (deleted meanwhile); the entry is gone and
    /// nothing was written.
    NoLongerStored,
}

/// A part of an object this node keeps a reference on: which object, and which part index
/// (a manifest chunk for `rep:N`, a shard for `ec:K+M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartUse {
    pub object: ObjectId,
    pub index: usize,
}

impl RocksStore {
    /// Re-hashes stored chunks in key order, starting after `after` (from the first when
    /// `None`), until at least `max_bytes` were read or `max_chunks` were visited. Values are
    /// hashed where RocksDB holds them, never copied, and chunk files one at a time, so memory
    /// does not grow with the batch. A chunk that fails verification (or whose file cannot be
    /// read) is quarantined before this returns.
    pub fn scrub_batch(
        &self,
        after: Option<&ChunkId>,
        max_bytes: u64,
        max_chunks: usize,
    ) -> Result<ScrubBatch, StoreError> {
        let mut batch = ScrubBatch::default();
        let mut bad = Vec::new();
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_CHUNKS));
        match after {
            Some(id) => {
                iter.seek(id.as_bytes());
                if iter.key() == Some(id.as_bytes().as_slice()) {
                    iter.next();
                }
            }
            None => iter.seek_to_first(),
        }
        while batch.bytes < max_bytes && (batch.chunks as usize) < max_chunks.max(1) {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let Ok(raw) = <[u8; 32]>::try_from(key) else {
                // Not a chunk key; nothing this build writes, so skip rather than fail a pass.
                iter.next();
                continue;
            };
            let id = ChunkId::from_bytes(raw);
            let read = if files::is_marker(&id, value) {
                match self.files.read(&id) {
                    Ok(bytes) => Some((ChunkId::of(&bytes), bytes.len())),
                    Err(e) => {
                        warn!(chunk = %id, error = %e, "chunk file unreadable");
                        None
                    }
                }
            } else {
                Some((ChunkId::of(value), value.len()))
            };
            match read {
                Some((actual, len)) => {
                    if actual != id {
                        bad.push(id);
                    }
                    batch.bytes += len as u64;
                }
                None => bad.push(id),
            }
            batch.chunks += 1;
            batch.last = Some(id);
            iter.next();
        }
        iter.status()?;
        batch.done = iter.key().is_none();
        drop(iter);
        for id in bad {
            if self.quarantine_chunk(&id)?.is_some() {
                batch.quarantined.push(id);
            }
        }
        Ok(batch)
    }

    /// Moves a chunk whose stored bytes fail verification (or whose file is unreadable: it
    /// is recorded as zero bytes) into quarantine, atomically and synced, and removes its
    /// file. Checks again under the chunk's lock, so a chunk healed or deleted since it was
    /// read is left alone (`None`).
    pub fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<Quarantined>, StoreError> {
        let _guard = lock(&self.stripes[self.stripe(id)]);
        let Some(value) = self.value(id)? else {
            return Ok(None);
        };
        let (actual, len) = value.digest().unwrap_or((ChunkId::of(&[]), 0));
        let file = !matches!(value, Value::Inline(_));
        drop(value);
        if &actual == id {
            return Ok(None);
        }
        let entry = Quarantined {
            version: 1,
            since_ms: now_ms(),
            actual,
            bad_len: u32::try_from(len).unwrap_or(u32::MAX),
        };
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_CHUNKS), id.as_bytes());
        let known = self.quarantine_entry(id)?.is_some();
        batch.put_cf(self.cf(CF_QUARANTINE), id.as_bytes(), encode(&entry));
        if !known {
            batch.merge_cf(self.cf(CF_META), KEY_QUARANTINED, 1i64.to_le_bytes());
        }
        self.write(batch, true)?;
        if file {
            self.unlink(&[*id]);
        }
        warn!(chunk = %id, %actual, "stored chunk failed verification; quarantined");
        Ok(Some(entry))
    }

    /// Puts verified bytes back for a chunk (normally a quarantined one). Refuses bytes that
    /// do not hash to `id`. Writes nothing for a chunk no object references any more.
    pub fn restore_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<Restored, StoreError> {
        check_hash(id, data)?;
        let _guard = lock(&self.stripes[self.stripe(id)]);
        let mut batch = WriteBatch::default();
        let known = self.quarantine_entry(id)?.is_some();
        if known {
            batch.delete_cf(self.cf(CF_QUARANTINE), id.as_bytes());
            batch.merge_cf(self.cf(CF_META), KEY_QUARANTINED, (-1i64).to_le_bytes());
        }
        let mut file = false;
        let outcome = if self.ref_record(id)?.is_none() {
            Restored::NoLongerStored
        } else if self.readable(id)? {
            Restored::AlreadyGood
        } else {
            file = self.stage_bytes(&mut batch, id, data)?;
            Restored::Replaced
        };
        self.write_chunk_batch(batch, true, id, file)?;
        debug!(chunk = %id, ?outcome, "restored chunk");
        Ok(outcome)
    }

    /// Drops the quarantine entry of a chunk that no object references any more, or that is
    /// readable again; true when it did. A chunk still referenced and still missing its bytes
    /// keeps its entry.
    pub fn settle_quarantined(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let _guard = lock(&self.stripes[self.stripe(id)]);
        if self.quarantine_entry(id)?.is_none() {
            return Ok(false);
        }
        let gone = self.ref_record(id)?.is_none();
        let readable = !gone && self.readable(id)?;
        if !gone && !readable {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_QUARANTINE), id.as_bytes());
        batch.merge_cf(self.cf(CF_META), KEY_QUARANTINED, (-1i64).to_le_bytes());
        self.write(batch, true)?;
        Ok(true)
    }

    /// Called by every chunk write that found the chunk already referenced (caller holds the
    /// chunk's stripe, `data` is known to hash to `id`): if the chunk is quarantined, these
    /// verified bytes replace the ones that went bad.
    pub(super) fn heal_if_quarantined(
        &self,
        id: &ChunkId,
        data: &[u8],
        sync: bool,
    ) -> Result<(), StoreError> {
        if self.quarantine_entry(id)?.is_none() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let file = self.stage_bytes(&mut batch, id, data)?;
        batch.delete_cf(self.cf(CF_QUARANTINE), id.as_bytes());
        batch.merge_cf(self.cf(CF_META), KEY_QUARANTINED, (-1i64).to_le_bytes());
        self.write_chunk_batch(batch, sync, id, file)?;
        debug!(chunk = %id, "a verified write replaced a quarantined chunk");
        Ok(())
    }

    /// Whether the chunk's stored bytes (inline or in its file) read back and verify.
    fn readable(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let digest = self.value(id)?.and_then(|v| v.digest());
        Ok(digest.is_some_and(|(actual, _)| actual == *id))
    }

    /// The quarantine entry of a chunk, if it has one.
    pub fn quarantine_entry(&self, id: &ChunkId) -> Result<Option<Quarantined>, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_QUARANTINE), id.as_bytes())?
        {
            Some(v) => decode(id.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    /// Up to `limit` quarantined chunks ordered by id, starting after `after`.
    pub fn quarantined(
        &self,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<(ChunkId, Quarantined)>, StoreError> {
        let mut out = Vec::new();
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_QUARANTINE));
        match after {
            Some(id) => iter.seek(id.as_bytes()),
            None => iter.seek_to_first(),
        }
        while out.len() < limit {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            if let Ok(raw) = <[u8; 32]>::try_from(key) {
                let id = ChunkId::from_bytes(raw);
                if Some(&id) != after {
                    out.push((id, decode(key, value)?));
                }
            }
            iter.next();
        }
        iter.status()?;
        Ok(out)
    }

    /// How many chunks are in quarantine.
    pub fn quarantined_count(&self) -> Result<u64, StoreError> {
        self.counter(KEY_QUARANTINED)
    }

    /// Up to `limit` parts of local objects that are the chunk `id` and that this node took a
    /// reference on. Scans every object's shard list, then every manifest: slow, but it only
    /// runs for a chunk that went bad, and holds one value at a time.
    pub fn part_uses(&self, id: &ChunkId, limit: usize) -> Result<Vec<PartUse>, StoreError> {
        let mut out = Vec::new();
        // Erasure-coded objects: the parts are the shards their `parts` entry lists.
        self.visit_containing(CF_PARTS, id, &mut |object, value| {
            let shards = decode_parts(&object, value)?;
            let indices = shards.iter().enumerate().filter(|(_, s)| *s == id);
            self.push_held(&object, indices.map(|(i, _)| i), limit, &mut out)?;
            Ok(out.len() < limit)
        })?;
        // Replicated objects: the parts are the manifest's chunks.
        self.visit_containing(CF_MANIFESTS, id, &mut |object, value| {
            if out.len() >= limit {
                return Ok(false);
            }
            if self
                .db
                .get_pinned_cf(self.cf(CF_PARTS), object.as_bytes())?
                .is_some()
            {
                // Sharded: its manifest's chunks are not stored here, its shards are.
                return Ok(true);
            }
            match mesh_proto::Manifest::decode_verified(&object, value) {
                Ok(manifest) => {
                    let indices = manifest
                        .chunks
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.id == *id);
                    self.push_held(&object, indices.map(|(i, _)| i), limit, &mut out)?;
                }
                Err(e) => warn!(%object, error = %e, "stored manifest is unreadable; skipped"),
            }
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    /// Calls `visit` with each object-keyed value of `cf` that holds `id`'s raw bytes (shard
    /// lists and manifests both do), until it returns false. Values without them are ruled
    /// out without decoding.
    fn visit_containing(
        &self,
        cf: &str,
        id: &ChunkId,
        visit: &mut ValueVisitor<'_>,
    ) -> Result<(), StoreError> {
        let finder = memchr::memmem::Finder::new(id.as_bytes());
        let mut iter = self.db.raw_iterator_cf(self.cf(cf));
        iter.seek_to_first();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if let Ok(raw) = <[u8; 32]>::try_from(key)
                && finder.find(value).is_some()
                && !visit(ObjectId::from_bytes(raw), value)?
            {
                break;
            }
            iter.next();
        }
        Ok(iter.status()?)
    }

    /// Adds the `indices` of `object` that this node holds (all of them when the object was
    /// committed whole) to `out`, up to `limit` entries.
    fn push_held(
        &self,
        object: &ObjectId,
        indices: impl Iterator<Item = usize>,
        limit: usize,
        out: &mut Vec<PartUse>,
    ) -> Result<(), StoreError> {
        let held: Option<Vec<u32>> =
            match self.db.get_pinned_cf(self.cf(CF_HELD), object.as_bytes())? {
                Some(v) => Some(decode(object.as_bytes(), &v)?),
                None => None,
            };
        for index in indices {
            if out.len() >= limit {
                break;
            }
            let mine = held
                .as_ref()
                .is_none_or(|h| u32::try_from(index).is_ok_and(|i| h.contains(&i)));
            if mine {
                out.push(PartUse {
                    object: *object,
                    index,
                });
            }
        }
        Ok(())
    }

    /// The scrubber's persisted state, as it wrote it.
    pub fn scrub_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_META), KEY_SCRUB_STATE)?)
    }

    /// Replaces the scrubber's persisted state. Not synced: after a crash a pass resumes from
    /// a slightly older cursor, re-checking a few chunks.
    pub fn put_scrub_state(&self, value: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), KEY_SCRUB_STATE, value);
        self.write(batch, false)
    }
}
