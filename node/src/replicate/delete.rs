//! Deleting an object across the mesh: its tombstone, applied here and delivered durably to
//! every holder.
//!
//! `meshctl rm ID` on any node calls [`Mesh::delete`]: it finds the object's placement record
//! (this node's, else another node's through [`Mesh::open`]) and writes the tombstone, the next
//! version by this node with the same holder list, plus any other provider the DHT names
//! (a holder a repair added after this node's copy of the record). One synced batch applies it
//! here (the object's references are released, its manifest and summary go, the tombstone
//! stays as the record) and queues its delivery on the store's [`Queue::Tombstone`]. Then every
//! other holder is told at once (`DeleteObject` over `/mesh/control/1`); the answer waits for
//! that first attempt for at most [`DELETE_WAIT`]. Holders not reached stay queued:
//! [`Mesh::run_tombstone_delivery`] retries them with the put completion's exponential backoff
//! (1 s doubling to 5 min), after a restart too,
//! until `tombstone_retention` has passed since the delete.
//!
//! A holder receiving a tombstone that supersedes its record ([`Mesh::answer_delete`]) applies
//! it the same way and stops announcing the object. The tombstone stays as its record, so an
//! older `PutObject` arriving late is ignored instead of bringing the object back; a tombstone
//! beats every live record ([`PlacementRecord::supersedes`]). The chunks whose last reference
//! went wait out `gc_grace` and are then deleted by [`crate::gc`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use mesh_proto::ObjectId;
use mesh_proto::wire::{
    ControlRequest, ControlResponse, MAX_RECORD_NODES, NodeId, PlacementRecord, Refusal,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::complete::{backoff, send_record};
use super::{Mesh, MeshError, control_refused, lock, now_ms};
use crate::metrics::Metrics;
use crate::net::Frame;
use crate::objects::IngestError;
use crate::store::{Freed, MetaStore, Queue, StoreError};

/// Format version of a queued [`Entry`].
const ENTRY_VERSION: u8 = 1;
/// Largest queued entry decoded: a record naming [`MAX_RECORD_NODES`] holders, twice.
const MAX_ENTRY: usize = 1 << 20;
/// Longest a delete waits for its first delivery before answering; the rest goes on.
pub const DELETE_WAIT: Duration = Duration::from_secs(3);
/// Longest a delete waits for the DHT to name the object's providers.
const PROVIDERS_WAIT: Duration = Duration::from_secs(2);
/// The delete's own first attempt owns a new entry this long; then the worker may try it too.
const FIRST_ATTEMPT: Duration = Duration::from_secs(2 * DELETE_WAIT.as_secs());
/// How often the queue is scanned for entries that are due.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// Objects attempted per scan; the next scan takes the rest.
const MAX_DUE: usize = 256;
/// Holders told at once.
const TELL_WINDOW: usize = 16;

/// What a delete still has to do: the holders that have not acknowledged its tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    // The schedule comes first, so the queue scan decodes only [`Schedule`].
    version: u8,
    attempts: u32,
    next_ms: u64,
    created_ms: u64,
    /// The encoded tombstone.
    record: Vec<u8>,
    /// Peer ids still to tell.
    owed: Vec<Vec<u8>>,
}

/// The leading fields of an encoded [`Entry`].
#[derive(Debug, Deserialize)]
struct Schedule {
    version: u8,
    _attempts: u32,
    next_ms: u64,
}

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENTRY>()
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        // Plain owned data into a Vec cannot fail.
        bincode::serde::encode_to_vec(self, codec()).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (entry, used): (Self, usize) =
            bincode::serde::decode_from_slice(bytes, codec()).map_err(|e| e.to_string())?;
        if used != bytes.len() {
            return Err("trailing bytes".into());
        }
        if entry.version != ENTRY_VERSION {
            return Err(format!("unknown version {}", entry.version));
        }
        Ok(entry)
    }

    /// Whether an encoded entry is due at `now`; an unreadable one is, so the worker drops it.
    fn due(bytes: &[u8], now: u64) -> bool {
        match bincode::serde::decode_from_slice::<Schedule, _>(bytes, codec()) {
            Ok((s, _)) => s.version != ENTRY_VERSION || s.next_ms <= now,
            Err(_) => true,
        }
    }
}

/// What a delete did, for the API's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// References released here (the chunks wait out the grace).
    pub released: Freed,
    /// Other holders that acknowledged the tombstone before the answer.
    pub told: u64,
    /// Other holders still owed it, retried in the background.
    pub pending: u64,
}

/// The outcome of one attempt at an entry: holders told, and holders still owed.
#[derive(Debug, Clone, Copy, Default)]
struct Attempt {
    told: u64,
    pending: u64,
}

impl Mesh {
    /// Deletes `id` everywhere: applies its tombstone here and delivers it to every holder
    /// (see the module comment). [`MeshError::NotFound`] if no node knows the object, or it
    /// is deleted already.
    pub async fn delete(&self, id: ObjectId) -> Result<Deleted, MeshError> {
        let me = self.inner.net.local_node_id();
        let (manifest, record) = self.open(id).await?;
        // An object stored without a record (by an older build) is this node's alone.
        let live = record.unwrap_or_else(|| PlacementRecord {
            object: id,
            version: 0,
            writer: me.clone(),
            redundancy: manifest.redundancy,
            tombstone: false,
            nodes: vec![me.clone()],
            holders: Vec::new(),
            parts: Vec::new(),
        });
        let mut tombstone = live.tombstone(me.clone());
        let providers = tokio::time::timeout(PROVIDERS_WAIT, self.inner.net.find_providers(id))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        for peer in providers {
            let node = NodeId(peer.to_bytes());
            if tombstone.nodes.len() < MAX_RECORD_NODES && !tombstone.nodes.contains(&node) {
                tombstone.nodes.push(node);
            }
        }
        let owed: Vec<Vec<u8>> = tombstone
            .nodes
            .iter()
            .filter(|n| **n != me)
            .map(|n| n.0.clone())
            .collect();
        let others = owed.len() as u64;
        let now = now_ms();
        let entry = (!owed.is_empty()).then(|| {
            Entry {
                version: ENTRY_VERSION,
                attempts: 0,
                next_ms: now + FIRST_ATTEMPT.as_millis() as u64,
                created_ms: now,
                record: tombstone.encode(),
                owed,
            }
            .encode()
        });
        let store = Arc::clone(&self.inner.store);
        let encoded = tombstone.encode();
        let released = tokio::task::spawn_blocking(move || {
            let _object = store.object_lock(&id);
            store.apply_tombstone(&id, &encoded, entry.as_deref())
        })
        .await
        .map_err(|_| IngestError::WorkerGone)??;
        self.forget(id).await;
        let mut deleted = Deleted {
            released,
            told: 0,
            pending: others,
        };
        if others > 0 {
            let first = self.attempt(id, None, Some(DELETE_WAIT)).await;
            deleted.told = first.told;
            deleted.pending = first.pending;
        }
        info!(object = %id, version = tombstone.version, released_chunks = released.chunks, released_bytes = released.bytes, told = deleted.told, pending = deleted.pending, "deleted object");
        Ok(deleted)
    }

    /// Drops what this node remembers of a deleted object beyond the store.
    async fn forget(&self, id: ObjectId) {
        lock(&self.inner.opened).remove(&id);
        self.inner.net.stop_providing(id).await;
    }

    /// A peer's `DeleteObject`: applies the tombstone if it supersedes the record kept here
    /// (or none is), and acknowledges it either way, as there is nothing to retry.
    pub(super) async fn answer_delete(
        &self,
        peer: PeerId,
        record: PlacementRecord,
    ) -> Frame<ControlResponse> {
        if let Err(e) = record.validate_tombstone() {
            return control_refused(Refusal::BadRequest, format!("bad tombstone: {e}"));
        }
        let object = record.object;
        let store = Arc::clone(&self.inner.store);
        let result = tokio::task::spawn_blocking(move || {
            let _object = store.object_lock(&object);
            if let Some(existing) = store.record(&object)?
                && let Ok(existing) = PlacementRecord::decode(&existing)
                && !record.supersedes(&existing)
            {
                return Ok(None);
            }
            store
                .apply_tombstone(&object, &record.encode(), None)
                .map(Some)
        })
        .await;
        match result {
            Ok(Ok(Some(released))) => {
                debug!(%peer, %object, released_chunks = released.chunks, "applied a tombstone");
                self.forget(object).await;
                Frame::new(ControlResponse::Stored)
            }
            Ok(Ok(None)) => Frame::new(ControlResponse::Stored),
            Ok(Err(e)) => control_refused(Refusal::Internal, e.to_string()),
            Err(_) => control_refused(Refusal::Internal, "worker failed".into()),
        }
    }

    /// Deletes whose tombstone some holders have not acknowledged yet.
    pub fn pending_tombstones(&self) -> Result<usize, StoreError> {
        let mut count = 0;
        self.inner
            .store
            .visit_queued(Queue::Tombstone, None, &mut |_, _| {
                count += 1;
                true
            })?;
        Ok(count)
    }

    /// Delivers queued tombstones until `stop` is cancelled; a holder still unreached after
    /// `retention` is given up on. Runs once per node.
    pub async fn run_tombstone_delivery(self, retention: Duration, stop: CancellationToken) {
        let mut scan = tokio::time::interval(SCAN_EVERY);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // After a restart no first attempt is running: everything queued is due now.
        let mut ignore_time = true;
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                _ = scan.tick() => {}
            }
            let due = match self.due_tombstones(ignore_time) {
                Ok(due) => due,
                Err(e) => {
                    warn!(error = %e, "cannot read the tombstone queue");
                    continue;
                }
            };
            ignore_time = false;
            for id in due {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    _ = self.attempt(id, Some(retention), None) => {}
                }
            }
        }
    }

    fn due_tombstones(&self, ignore_time: bool) -> Result<Vec<ObjectId>, StoreError> {
        let now = now_ms();
        let mut due = Vec::new();
        self.inner
            .store
            .visit_queued(Queue::Tombstone, None, &mut |id, bytes| {
                if ignore_time || Entry::due(bytes, now) {
                    due.push(id);
                }
                due.len() < MAX_DUE
            })?;
        Ok(due)
    }

    /// One attempt at every holder `id`'s entry still owes; updates or removes the entry.
    /// With `retention`, holders still owed after it since the delete are given up on; with
    /// `deadline`, holders that have not answered by then count as not told.
    async fn attempt(
        &self,
        id: ObjectId,
        retention: Option<Duration>,
        deadline: Option<Duration>,
    ) -> Attempt {
        let store = Arc::clone(&self.inner.store);
        let seen =
            match tokio::task::spawn_blocking(move || store.queued(Queue::Tombstone, &id)).await {
                Ok(Ok(Some(bytes))) => bytes,
                Ok(Ok(None)) | Err(_) => return Attempt::default(),
                Ok(Err(e)) => {
                    warn!(object = %id, error = %e, "cannot read a queued tombstone");
                    return Attempt::default();
                }
            };
        let parsed = Entry::decode(&seen).and_then(|entry| {
            let record = PlacementRecord::decode(&entry.record).map_err(|e| e.to_string())?;
            record.validate_tombstone().map_err(|e| e.to_string())?;
            Ok((entry, record))
        });
        let (entry, record) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                warn!(object = %id, error = %e, "dropping an unreadable queued tombstone");
                self.finish_tombstone(id, seen, None).await;
                return Attempt::default();
            }
        };
        let net = &self.inner.net;
        let record = &record;
        let mut sends = futures::stream::iter(entry.owed.iter().cloned())
            .map(|peer| async move {
                let result = match PeerId::from_bytes(&peer) {
                    Ok(p) => {
                        let request = Frame::new(ControlRequest::DeleteObject {
                            record: record.clone(),
                        });
                        send_record(net, p, request).await
                    }
                    Err(e) => Err(format!("bad peer id in the queue: {e}")),
                };
                (peer, result)
            })
            .buffer_unordered(TELL_WINDOW);
        let mut told: Vec<Vec<u8>> = Vec::new();
        let collect = async {
            while let Some((peer, result)) = sends.next().await {
                let peer_id = PeerId::from_bytes(&peer).ok();
                match result {
                    Ok(()) => {
                        debug!(object = %id, peer = ?peer_id, "holder has the tombstone");
                        told.push(peer);
                    }
                    Err(e) => {
                        debug!(object = %id, peer = ?peer_id, error = %e, attempt = entry.attempts + 1, "tombstone not delivered; will retry");
                    }
                }
            }
        };
        match deadline {
            // Sends still running then are dropped; the worker tries those holders again.
            Some(deadline) => {
                let _ = tokio::time::timeout(deadline, collect).await;
            }
            None => collect.await,
        }
        let left: Vec<Vec<u8>> = entry
            .owed
            .iter()
            .filter(|p| !told.contains(p))
            .cloned()
            .collect();
        let outcome = Attempt {
            told: (entry.owed.len() - left.len()) as u64,
            pending: left.len() as u64,
        };
        let age = Duration::from_millis(now_ms().saturating_sub(entry.created_ms));
        let next = if left.is_empty() {
            debug!(object = %id, "every holder has the tombstone");
            None
        } else if retention.is_some_and(|r| age >= r) {
            give_up(&self.inner.metrics, id, &left);
            None
        } else {
            let attempts = entry.attempts + 1;
            Some(Entry {
                attempts,
                next_ms: now_ms() + backoff(attempts - 1).as_millis() as u64,
                owed: left,
                ..entry
            })
        };
        self.finish_tombstone(id, seen, next).await;
        outcome
    }

    /// Replaces (or with `None` removes) the queued entry, unless it changed meanwhile.
    async fn finish_tombstone(&self, id: ObjectId, seen: Vec<u8>, next: Option<Entry>) {
        let store = Arc::clone(&self.inner.store);
        let result = tokio::task::spawn_blocking(move || {
            if store.queued(Queue::Tombstone, &id)?.as_deref() != Some(&seen[..]) {
                return Ok(());
            }
            match next {
                Some(next) => store.put_queued(Queue::Tombstone, &id, &next.encode()),
                None => store.delete_queued(Queue::Tombstone, &id),
            }
        })
        .await;
        if let Ok(Err(e)) = result {
            warn!(object = %id, error = %e, "cannot update the tombstone queue");
        }
    }
}

/// Whether an encoded placement record is a tombstone (this node knows the object is deleted).
pub(super) fn is_tombstone(record: Option<&[u8]>) -> bool {
    record.is_some_and(|r| PlacementRecord::decode(r).is_ok_and(|r| r.tombstone))
}

fn give_up(metrics: &Metrics, id: ObjectId, peers: &[Vec<u8>]) {
    for peer in peers {
        warn!(object = %id, peer = ?PeerId::from_bytes(peer).ok(), "giving up on telling a holder about a delete: its tombstone retention has passed");
        metrics.tombstone_deliveries_abandoned().increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_entry_round_trips_and_its_schedule_reads_alone() {
        let entry = Entry {
            version: ENTRY_VERSION,
            attempts: 2,
            next_ms: 500,
            created_ms: 100,
            record: vec![1; 40],
            owed: vec![vec![7; 38], vec![8; 38]],
        };
        let bytes = entry.encode();
        assert_eq!(Entry::decode(&bytes).unwrap(), entry);
        assert!(!Entry::due(&bytes, 499));
        assert!(Entry::due(&bytes, 500));
        assert!(
            Entry::due(b"junk", 0),
            "unreadable entries are due, to be dropped"
        );
        assert!(Entry::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut other = entry.clone();
        other.version = 9;
        assert!(Entry::decode(&other.encode()).is_err());
        assert!(Entry::due(&other.encode(), 0));
    }
}
