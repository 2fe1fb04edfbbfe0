//! Background completion of puts: the holders beyond the write quorum.
//!
//! A put returns once every chunk has `W` holders. The sends still running then keep going,
//! and before the put returns, the holders they target (plus a holder that failed with no
//! other peer to take its place, and any holder the placement record did not reach) are
//! written to the store's delivery queue: one synced entry per object, holding the record, the
//! manifest and, per owed holder, the chunk indices it is owed.
//!
//! [`Mesh::run_completion`] works through that queue: an object as soon as its put's remaining
//! sends have ended, the rest when due, and everything at once after a restart. For each owed
//! holder it asks which chunks the holder already has (`Has`, which also samples the RTT),
//! sends the others, and then sends the placement record again, which makes the holder take references on the
//! chunks that arrived late. A holder that fails is retried with exponential backoff; after
//! [`GIVE_UP_AFTER`] attempts it is left to repair, with a warning and a metric.
//!
//! A part this node holds is read from its store and sent. A replica it does not hold is not
//! relayed: the holder is told to fetch it from one that has it (`ChunkRequest::Copy`), so
//! the bytes cross the network, get encrypted and get verified once instead of twice (repair
//! fetched about 80% of the lost replicas that way in `netsim bench --scenario repair`). Only
//! when the copy fails does this node fetch the replica and send it itself. A shard is
//! rebuilt here from K others and sent.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use libp2p::PeerId;
use mesh_proto::wire::{
    ChunkRequest, ChunkResponse, ControlRequest, ControlResponse, MAX_COPY_SOURCES, MAX_HAS_IDS,
    NodeId, PlacementRecord,
};
use mesh_proto::{ChunkId, Manifest, ObjectId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Mesh, MeshError, lock, now_ms, record_request, store_remote, stored_answer};
use crate::net::{Frame, Network};
use crate::objects::IngestError;
use crate::store::MetaStore;

/// Format version of a queued [`Delivery`]. Version 1 had no `announce` (its holders
/// announced); such entries are still read.
const DELIVERY_VERSION: u8 = 2;
/// Largest queued entry decoded (a manifest of a very large object plus its record).
const MAX_ENTRY: usize = 512 << 20;
/// First retry delay after a failed attempt; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Attempts before a holder is left to repair (about two hours at the longest backoff).
pub const GIVE_UP_AFTER: u32 = 30;
/// How often the queue is scanned for entries that are due.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// Chunks sent to one holder at once.
const SEND_WINDOW: usize = 4;
/// Nudges queued for the worker; when full, the periodic scan finds the object instead.
const KICK_QUEUE: usize = 1024;

/// State the put path and the worker share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Objects whose put still has sends running; the worker leaves them alone until then.
    waiting: Mutex<HashSet<ObjectId>>,
    kick_tx: mpsc::Sender<ObjectId>,
    kick_rx: Mutex<Option<mpsc::Receiver<ObjectId>>>,
}

impl Shared {
    pub(crate) fn new() -> Self {
        let (kick_tx, kick_rx) = mpsc::channel(KICK_QUEUE);
        Self {
            waiting: Mutex::new(HashSet::new()),
            kick_tx,
            kick_rx: Mutex::new(Some(kick_rx)),
        }
    }
}

/// What an object's put still owes its holders (the queued value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Delivery {
    // The schedule comes first, so the queue scan decodes only [`Schedule`].
    version: u8,
    attempts: u32,
    next_ms: u64,
    created_ms: u64,
    /// The encoded placement record.
    record: Vec<u8>,
    /// The manifest's canonical bytes.
    manifest: Vec<u8>,
    pub(crate) owed: Vec<Owed>,
    /// Whether the holders announce the object (`PutObject`) or only keep it (`KeepObject`).
    announce: bool,
}

/// A [`Delivery`] as version 1 wrote it.
#[derive(Debug, Deserialize)]
struct DeliveryV1 {
    _version: u8,
    attempts: u32,
    next_ms: u64,
    created_ms: u64,
    record: Vec<u8>,
    manifest: Vec<u8>,
    owed: Vec<Owed>,
}

/// The leading fields of an encoded [`Delivery`]: all the queue scan needs.
#[derive(Debug, Deserialize)]
struct Schedule {
    version: u8,
    _attempts: u32,
    next_ms: u64,
}

impl Schedule {
    /// Whether the entry is due at `now`; an unreadable entry is, so the worker drops it.
    fn due(bytes: &[u8], now: u64) -> bool {
        match bincode::serde::decode_from_slice::<Schedule, _>(bytes, codec()) {
            Ok((schedule, _)) => {
                !matches!(schedule.version, 1 | DELIVERY_VERSION) || schedule.next_ms <= now
            }
            Err(_) => true,
        }
    }
}

/// One holder and the part indices (chunks, or shards for ec) it is owed (none: only the record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Owed {
    peer: Vec<u8>,
    chunks: Vec<u32>,
}

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENTRY>()
}

impl Delivery {
    pub(crate) fn new(
        record: &PlacementRecord,
        manifest: &[u8],
        owed: BTreeMap<PeerId, Vec<u32>>,
        now_ms: u64,
    ) -> Self {
        Self {
            version: DELIVERY_VERSION,
            record: record.encode(),
            manifest: manifest.to_vec(),
            owed: owed
                .into_iter()
                .map(|(peer, chunks)| Owed {
                    peer: peer.to_bytes(),
                    chunks,
                })
                .collect(),
            attempts: 0,
            next_ms: now_ms,
            created_ms: now_ms,
            announce: true,
        }
    }

    /// The same delivery, whose holders announce the object or (a job task's output: see
    /// `ControlRequest::KeepObject`) only keep it.
    pub(crate) fn with_announce(self, announce: bool) -> Self {
        Self { announce, ..self }
    }

    fn encode(&self) -> Vec<u8> {
        // Encoding plain owned data into a Vec cannot fail.
        bincode::serde::encode_to_vec(self, codec()).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.first() == Some(&1) {
            return Self::decode_v1(bytes);
        }
        let (delivery, used): (Self, usize) =
            bincode::serde::decode_from_slice(bytes, codec()).map_err(|e| e.to_string())?;
        if used != bytes.len() {
            return Err("trailing bytes".into());
        }
        if delivery.version != DELIVERY_VERSION {
            return Err(format!("unknown version {}", delivery.version));
        }
        Ok(delivery)
    }

    /// An entry queued by a node that predates `announce`: its holders announce.
    fn decode_v1(bytes: &[u8]) -> Result<Self, String> {
        let (old, used): (DeliveryV1, usize) =
            bincode::serde::decode_from_slice(bytes, codec()).map_err(|e| e.to_string())?;
        if used != bytes.len() {
            return Err("trailing bytes".into());
        }
        Ok(Self {
            version: DELIVERY_VERSION,
            attempts: old.attempts,
            next_ms: old.next_ms,
            created_ms: old.created_ms,
            record: old.record,
            manifest: old.manifest,
            owed: old.owed,
            announce: true,
        })
    }

    /// Whether a queued entry still owes some holder parts (not only the record), and the
    /// peers it owes anything. An unreadable entry owes parts (leave it to the worker).
    pub(crate) fn summary(bytes: &[u8]) -> (bool, Vec<PeerId>) {
        match Self::decode(bytes) {
            Err(_) => (true, Vec::new()),
            Ok(delivery) => (
                delivery.owed.iter().any(|o| !o.chunks.is_empty()),
                delivery
                    .owed
                    .iter()
                    .filter_map(|o| PeerId::from_bytes(&o.peer).ok())
                    .collect(),
            ),
        }
    }
}

/// Delay before attempt `attempts + 1`.
pub(super) fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempts.min(16))
        .min(MAX_BACKOFF)
}

/// Asks `peer` to fetch chunk `id` from `sources` and store it; `Ok(new)` once it did.
async fn copy_remote(
    net: &Network,
    peer: PeerId,
    id: ChunkId,
    sources: &[PeerId],
) -> Result<bool, String> {
    let from: Vec<NodeId> = sources
        .iter()
        .filter(|p| **p != peer)
        .take(MAX_COPY_SOURCES)
        .map(|p| NodeId(p.to_bytes()))
        .collect();
    if from.is_empty() {
        return Err("no other holder to copy from".into());
    }
    let request = Frame::new(ChunkRequest::Copy { id, from });
    stored_answer(peer, net.chunk(peer, request).await)
}

/// Sends a placement record (with the manifest as payload) and checks the holder kept it.
pub(crate) async fn send_record(
    net: &Network,
    peer: PeerId,
    request: Frame<ControlRequest>,
) -> Result<(), String> {
    match net.control(peer, request).await {
        Ok(Frame {
            header: ControlResponse::Stored,
            ..
        }) => Ok(()),
        Ok(Frame { header, .. }) => Err(format!("{peer} answered {header:?}")),
        Err(e) => Err(e.to_string()),
    }
}

impl Mesh {
    /// Queues what `object`'s put still owes (synced), and hands it to the worker once the
    /// put's remaining sends have ended.
    pub(super) async fn enqueue_delivery(
        &self,
        object: ObjectId,
        delivery: Delivery,
        stragglers: Vec<tokio::task::JoinHandle<()>>,
    ) -> Result<(), MeshError> {
        let store = std::sync::Arc::clone(&self.inner.store);
        let encoded = delivery.encode();
        tokio::task::spawn_blocking(move || store.put_delivery(&object, &encoded))
            .await
            .map_err(|_| IngestError::WorkerGone)??;
        let shared = &self.inner.completion;
        lock(&shared.waiting).insert(object);
        let this = self.clone();
        tokio::spawn(async move {
            for task in stragglers {
                let _ = task.await;
            }
            lock(&this.inner.completion.waiting).remove(&object);
            // When the queue is full the next scan finds the object.
            let _ = this.inner.completion.kick_tx.try_send(object);
        });
        Ok(())
    }

    /// Objects with holders still owed something (queued deliveries).
    pub fn pending_deliveries(&self) -> Result<usize, crate::store::StoreError> {
        let mut count = 0;
        self.inner.store.visit_deliveries(None, &mut |_, _| {
            count += 1;
            true
        })?;
        Ok(count)
    }

    /// Works through the delivery queue until `stop` is cancelled. Runs once per node.
    pub async fn run_completion(self, stop: CancellationToken) {
        let Some(mut kicks) = lock(&self.inner.completion.kick_rx).take() else {
            warn!("background completion is already running");
            return;
        };
        let mut scan = tokio::time::interval(SCAN_EVERY);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // After a restart nothing is still being sent: everything queued is due now.
        let mut first_scan = true;
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(object) = kicks.recv() => {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = self.complete_object(object) => {}
                    }
                }
                _ = scan.tick() => {
                    let due = match self.due_objects(first_scan) {
                        Ok(due) => due,
                        Err(e) => {
                            warn!(error = %e, "cannot read the delivery queue");
                            continue;
                        }
                    };
                    first_scan = false;
                    for object in due {
                        tokio::select! {
                            biased;
                            () = stop.cancelled() => return,
                            () = self.complete_object(object) => {}
                        }
                    }
                }
            }
        }
    }

    /// Queued objects that are due (all of them with `ignore_time`), except those whose put
    /// is still sending.
    fn due_objects(&self, ignore_time: bool) -> Result<Vec<ObjectId>, MeshError> {
        let now = now_ms();
        let waiting = lock(&self.inner.completion.waiting).clone();
        let mut due = Vec::new();
        self.inner
            .store
            .visit_deliveries(None, &mut |object, bytes| {
                if !waiting.contains(&object) && (ignore_time || Schedule::due(bytes, now)) {
                    due.push(object);
                }
                true
            })?;
        Ok(due)
    }

    /// One attempt at everything `object`'s entry owes.
    async fn complete_object(&self, object: ObjectId) {
        let store = std::sync::Arc::clone(&self.inner.store);
        let entry = match tokio::task::spawn_blocking(move || store.delivery(&object)).await {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                warn!(%object, error = %e, "cannot read a queued delivery");
                return;
            }
            Err(_) => return,
        };
        let delivery = match Delivery::decode(&entry) {
            Ok(d) => d,
            Err(e) => {
                warn!(%object, error = %e, "dropping an unreadable queued delivery");
                self.finish(object, &entry, None).await;
                return;
            }
        };
        let parsed = PlacementRecord::decode(&delivery.record)
            .map_err(|e| e.to_string())
            .and_then(|record| {
                let manifest = Manifest::decode_verified(&object, &delivery.manifest)
                    .map_err(|e| e.to_string())?;
                record
                    .validate(manifest.chunks.len())
                    .map_err(|e| e.to_string())?;
                Ok((record, manifest))
            });
        let (record, manifest) = match parsed {
            Ok(p) => p,
            Err(e) => {
                warn!(%object, error = %e, "dropping a queued delivery with a bad record or manifest");
                self.finish(object, &entry, None).await;
                return;
            }
        };
        let manifest_bytes = Bytes::from(delivery.manifest.clone());
        let attempts = delivery.owed.iter().map(|owed| {
            let record = &record;
            let manifest = &manifest;
            let manifest_bytes = manifest_bytes.clone();
            async move {
                let result = match PeerId::from_bytes(&owed.peer) {
                    Ok(peer) => {
                        let request = Frame::with_payload(
                            record_request(record.clone(), delivery.announce),
                            manifest_bytes,
                        );
                        self.deliver(peer, record, manifest, request, &owed.chunks)
                            .await
                    }
                    Err(e) => Err(format!("bad peer id in the queue: {e}")),
                };
                (owed, result)
            }
        });
        let results = futures::future::join_all(attempts).await;
        let mut left = Vec::new();
        for (owed, result) in results {
            match result {
                Ok(sent) => {
                    debug!(%object, peer = ?PeerId::from_bytes(&owed.peer).ok(), sent, "holder completed in the background");
                }
                Err(e) => {
                    debug!(%object, peer = ?PeerId::from_bytes(&owed.peer).ok(), error = %e, attempt = delivery.attempts + 1, "background delivery failed; will retry");
                    left.push(owed.clone());
                }
            }
        }
        let next = if left.is_empty() {
            debug!(%object, "every holder of the object is complete");
            None
        } else if delivery.attempts + 1 >= GIVE_UP_AFTER {
            for owed in &left {
                warn!(%object, peer = ?PeerId::from_bytes(&owed.peer).ok(), attempts = delivery.attempts + 1, "giving up on a holder; the object stays below its target until repair");
                self.inner.metrics.deliveries_abandoned().increment(1);
            }
            None
        } else {
            let attempts = delivery.attempts + 1;
            Some(Delivery {
                owed: left,
                attempts,
                next_ms: now_ms() + backoff(attempts - 1).as_millis() as u64,
                ..delivery
            })
        };
        self.finish(object, &entry, next).await;
    }

    /// Replaces (or with `None` removes) the queued entry, unless a newer put replaced it
    /// while this attempt ran.
    async fn finish(&self, object: ObjectId, seen: &[u8], next: Option<Delivery>) {
        let store = std::sync::Arc::clone(&self.inner.store);
        let seen = seen.to_vec();
        let result = tokio::task::spawn_blocking(move || {
            if store.delivery(&object)?.as_deref() != Some(&seen[..]) {
                return Ok(());
            }
            match next {
                Some(next) => store.put_delivery(&object, &next.encode()),
                None => store.delete_delivery(&object),
            }
        })
        .await;
        if let Ok(Err(e)) = result {
            warn!(%object, error = %e, "cannot update the delivery queue");
        }
    }

    /// Brings one holder up to date: the chunks it lacks, then `request` (the record, as
    /// `PutObject` or `KeepObject`). Returns how many chunks were sent.
    async fn deliver(
        &self,
        peer: PeerId,
        record: &PlacementRecord,
        manifest: &Manifest,
        request: Frame<ControlRequest>,
        indices: &[u32],
    ) -> Result<usize, String> {
        let net = &self.inner.net;
        // Distinct parts, each with its index and the holders it can be copied from.
        let mut wanted: BTreeMap<ChunkId, (usize, Vec<PeerId>)> = BTreeMap::new();
        for &index in indices {
            let index = index as usize;
            let part = record
                .part_id(&manifest.chunks, index)
                .ok_or_else(|| format!("part index {index} is out of range"))?;
            let (_, sources) = wanted.entry(part).or_insert((index, Vec::new()));
            for holder in record.holders_of(index) {
                if let Ok(holder) = PeerId::from_bytes(&holder.0)
                    && holder != peer
                    && !sources.contains(&holder)
                {
                    sources.push(holder);
                }
            }
        }
        let ids: Vec<ChunkId> = wanted.keys().copied().collect();
        let mut missing = Vec::new();
        for batch in ids.chunks(MAX_HAS_IDS) {
            let request = Frame::new(ChunkRequest::Has {
                ids: batch.to_vec(),
            });
            match net.chunk(peer, request).await {
                Ok(Frame {
                    header: ChunkResponse::Has { present },
                    ..
                }) if present.len() == batch.len() => {
                    missing.extend(
                        batch
                            .iter()
                            .zip(present)
                            .filter(|(_, has)| !has)
                            .map(|(id, _)| *id),
                    );
                }
                Ok(other) => return Err(format!("{peer} answered {:?} to has", other.header)),
                Err(e) => return Err(e.to_string()),
            }
        }
        let sent = missing.len();
        let mut sends = futures::stream::iter(missing)
            .map(|id| {
                let (index, sources) = wanted.get(&id).cloned().unwrap_or_default();
                async move {
                    let data = match record.redundancy {
                        // A replica this node does not hold goes from a holder straight to
                        // the peer, which fetches it (`Copy`); sent from here only when that
                        // fails.
                        mesh_proto::Redundancy::Replicas(_) => match self.local_chunk(id).await {
                            Some(data) => data,
                            None => {
                                let len = manifest.chunks.get(index).map_or(0, |c| c.len);
                                self.inner.pace.take(u64::from(len)).await;
                                match copy_remote(net, peer, id, &sources).await {
                                    Ok(new) => return Ok(new),
                                    Err(e) => {
                                        debug!(%peer, chunk = %id, error = %e, "copy failed; sending the chunk from here");
                                    }
                                }
                                let data =
                                    self.fetch_chunk(id, sources).await.map_err(|e| e.to_string())?;
                                return store_remote(net, peer, id, data).await;
                            }
                        },
                        // A shard has no other holder to copy from: it is rebuilt from K others.
                        mesh_proto::Redundancy::Erasure { .. } => self
                            .part_bytes(manifest, record, index, true)
                            .await
                            .map_err(|e| e.to_string())?,
                    };
                    self.inner.pace.take(data.len() as u64).await;
                    store_remote(net, peer, id, data).await
                }
            })
            .buffer_unordered(SEND_WINDOW);
        while let Some(result) = sends.next().await {
            result?;
            self.inner.metrics.delivered_chunks().increment(1);
        }
        drop(sends);
        send_record(net, peer, request).await?;
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(9), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_queued_delivery_round_trips_and_rejects_garbage() {
        let d = Delivery {
            version: DELIVERY_VERSION,
            attempts: 3,
            next_ms: 42,
            created_ms: 7,
            record: vec![1, 2, 3],
            manifest: vec![4; 100],
            owed: vec![Owed {
                peer: vec![9; 38],
                chunks: vec![0, 5, 7],
            }],
            announce: false,
        };
        let bytes = d.encode();
        assert_eq!(Delivery::decode(&bytes).unwrap(), d);
        assert!(Delivery::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Delivery::decode(&longer).is_err());
        let mut other = d.clone();
        other.version = 9;
        assert!(Delivery::decode(&other.encode()).is_err());

        // An entry a version-1 node queued (no `announce`) is read, and announces.
        let v1 = (
            1u8,
            d.attempts,
            d.next_ms,
            d.created_ms,
            d.record.clone(),
            d.manifest.clone(),
            d.owed.clone(),
        );
        let v1 = bincode::serde::encode_to_vec(&v1, codec()).unwrap();
        assert!(Schedule::due(&v1, 42) && !Schedule::due(&v1, 41));
        assert_eq!(
            Delivery::decode(&v1).unwrap(),
            Delivery {
                announce: true,
                ..d.clone()
            }
        );
        assert!(Delivery::decode(&v1[..v1.len() - 1]).is_err());
    }
}
