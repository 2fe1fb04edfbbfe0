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
//! chunks that arrived late. A holder that fails is retried with exponential backoff on its
//! own count of failures, so a dead holder owed only the record does not hold back the retries
//! of a live one still owed parts; after [`GIVE_UP_AFTER`] failures a holder is left to repair,
//! with a warning and a metric.
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
/// announced), version 2 one schedule for all holders; such entries are still read.
const DELIVERY_VERSION: u8 = 3;
/// Largest queued entry decoded (a manifest of a very large object plus its record).
const MAX_ENTRY: usize = 512 << 20;
/// First retry delay after a failed attempt; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Failed attempts before a holder is left to repair (about two hours at the longest backoff).
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
    /// Attempts at the entry so far.
    attempts: u32,
    /// When the first owed holder is due (milliseconds since the epoch).
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

/// A [`Delivery`] as version 1 wrote it: one schedule for every holder. Version 2 is this
/// followed by `announce`.
#[derive(Debug, Deserialize)]
struct DeliveryV1 {
    _version: u8,
    attempts: u32,
    next_ms: u64,
    created_ms: u64,
    record: Vec<u8>,
    manifest: Vec<u8>,
    owed: Vec<OwedV2>,
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
                !matches!(schedule.version, 1 | 2 | DELIVERY_VERSION) || schedule.next_ms <= now
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
    /// Failed attempts at this holder.
    failures: u32,
    /// When this holder is due (milliseconds since the epoch).
    next_ms: u64,
}

/// An [`Owed`] as versions 1 and 2 wrote it (the entry held the schedule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OwedV2 {
    peer: Vec<u8>,
    chunks: Vec<u32>,
}

impl OwedV2 {
    /// The holder, on the schedule its whole entry had.
    fn upgrade(self, failures: u32, next_ms: u64) -> Owed {
        Owed {
            peer: self.peer,
            chunks: self.chunks,
            failures,
            next_ms,
        }
    }
}

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENTRY>()
}

/// Decodes `bytes` as one `T`, with nothing left over.
fn decode_whole<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(bytes, codec()).map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err("trailing bytes".into());
    }
    Ok(value)
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
                    failures: 0,
                    next_ms: now_ms,
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
        match bytes.first() {
            // Version 1 predates `announce`: its holders announce.
            Some(1) => Ok(Self::upgraded(decode_whole(bytes)?, true)),
            Some(2) => {
                let (old, announce) = decode_whole(bytes)?;
                Ok(Self::upgraded(old, announce))
            }
            _ => {
                let delivery: Self = decode_whole(bytes)?;
                if delivery.version != DELIVERY_VERSION {
                    return Err(format!("unknown version {}", delivery.version));
                }
                Ok(delivery)
            }
        }
    }

    /// An entry of an older version: each holder gets the schedule the entry had.
    fn upgraded(old: DeliveryV1, announce: bool) -> Self {
        let DeliveryV1 {
            attempts,
            next_ms,
            created_ms,
            record,
            manifest,
            owed,
            ..
        } = old;
        Self {
            version: DELIVERY_VERSION,
            attempts,
            next_ms,
            created_ms,
            record,
            manifest,
            owed: owed
                .into_iter()
                .map(|o| o.upgrade(attempts, next_ms))
                .collect(),
            announce,
        }
    }

    /// Splits the owed holders into those due at `now` (all of them with `all`) and the rest.
    fn due_holders(&self, now: u64, all: bool) -> (Vec<Owed>, Vec<Owed>) {
        self.owed
            .iter()
            .cloned()
            .partition(|o| all || o.next_ms <= now)
    }

    /// The entry after an attempt at some of its holders: the ones that were sent everything
    /// leave it; each that `failed` backs off on its own count, or is given up on (returned
    /// second) at [`GIVE_UP_AFTER`]; the ones not tried keep their schedule. `None` when no
    /// holder is left.
    fn after_attempt(
        self,
        failed: Vec<Owed>,
        untried: Vec<Owed>,
        now: u64,
    ) -> (Option<Self>, Vec<Owed>) {
        let mut given_up = Vec::new();
        let mut left = untried;
        for mut owed in failed {
            owed.failures = owed.failures.saturating_add(1);
            if owed.failures >= GIVE_UP_AFTER {
                given_up.push(owed);
            } else {
                owed.next_ms = now + backoff(owed.failures - 1).as_millis() as u64;
                left.push(owed);
            }
        }
        let Some(next_ms) = left.iter().map(|o| o.next_ms).min() else {
            return (None, given_up);
        };
        let next = Self {
            attempts: self.attempts.saturating_add(1),
            next_ms,
            owed: left,
            ..self
        };
        (Some(next), given_up)
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
                        () = self.complete_object(object, false) => {}
                    }
                }
                _ = scan.tick() => {
                    let all = first_scan;
                    let due = match self.due_objects(all) {
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
                            () = self.complete_object(object, all) => {}
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

    /// One attempt at the holders `object`'s entry owes that are due (all of them with `all`).
    async fn complete_object(&self, object: ObjectId, all: bool) {
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
        let (due, untried) = delivery.due_holders(now_ms(), all);
        if due.is_empty() {
            return;
        }
        let attempts = due.iter().map(|owed| {
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
        let mut failed = Vec::new();
        for (owed, result) in results {
            let peer = PeerId::from_bytes(&owed.peer).ok();
            match result {
                Ok(sent) => {
                    debug!(%object, ?peer, sent, "holder completed in the background");
                }
                Err(e) => {
                    debug!(%object, ?peer, error = %e, failures = owed.failures + 1, "background delivery failed; will retry");
                    failed.push(owed.clone());
                }
            }
        }
        let (next, given_up) = delivery.after_attempt(failed, untried, now_ms());
        for owed in &given_up {
            warn!(%object, peer = ?PeerId::from_bytes(&owed.peer).ok(), failures = owed.failures, "giving up on a holder; the object stays below its target until repair");
            self.inner.metrics.deliveries_abandoned().increment(1);
        }
        if next.is_none() && given_up.is_empty() {
            debug!(%object, "every holder of the object is complete");
        }
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
                failures: 3,
                next_ms: 42,
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

        // Entries of versions 1 (no `announce`: they announce) and 2 (one schedule for the
        // whole entry) are read, each holder on the entry's schedule.
        let old_owed = vec![OwedV2 {
            peer: vec![9; 38],
            chunks: vec![0, 5, 7],
        }];
        let head = (d.attempts, d.next_ms, d.created_ms);
        let body = (d.record.clone(), d.manifest.clone(), old_owed);
        let v1 = bincode::serde::encode_to_vec((1u8, head, body.clone()), codec()).unwrap();
        let v2 = bincode::serde::encode_to_vec((2u8, head, body, false), codec()).unwrap();
        for (old, announce) in [(v1, true), (v2, false)] {
            assert!(Schedule::due(&old, 42) && !Schedule::due(&old, 41));
            assert_eq!(
                Delivery::decode(&old).unwrap(),
                Delivery {
                    announce,
                    ..d.clone()
                }
            );
            assert!(Delivery::decode(&old[..old.len() - 1]).is_err());
        }
    }

    fn holder(peer: u8, chunks: Vec<u32>, failures: u32, next_ms: u64) -> Owed {
        Owed {
            peer: vec![peer; 38],
            chunks,
            failures,
            next_ms,
        }
    }

    fn entry(owed: Vec<Owed>) -> Delivery {
        Delivery {
            version: DELIVERY_VERSION,
            attempts: 8,
            next_ms: 0,
            created_ms: 0,
            record: Vec::new(),
            manifest: Vec::new(),
            owed,
            announce: true,
        }
    }

    #[test]
    fn each_holder_backs_off_on_its_own_failures() {
        let now = 1_000_000;
        // A dead holder owed only the record has failed 8 times; a live one owed parts fails
        // for the first time; a third completes.
        let dead = holder(1, Vec::new(), 8, now);
        let live = holder(2, vec![0, 1], 0, now);
        let done = holder(3, vec![2], 0, now);
        let d = entry(vec![dead.clone(), live.clone(), done]);
        let (due, untried) = d.due_holders(now, false);
        assert_eq!((due.len(), untried.len()), (3, 0));
        let (next, given_up) = d.after_attempt(vec![dead.clone(), live.clone()], untried, now);
        assert!(given_up.is_empty());
        let next = next.unwrap();
        assert_eq!(
            next.owed,
            vec![
                holder(1, Vec::new(), 9, now + 256_000),
                holder(2, vec![0, 1], 1, now + 1_000),
            ]
        );
        // The entry is due when its first holder is, and then only that holder is tried.
        assert_eq!(next.next_ms, now + 1_000);
        assert_eq!(next.attempts, 9);
        let (due, untried) = next.due_holders(now + 1_000, false);
        assert_eq!(due, vec![holder(2, vec![0, 1], 1, now + 1_000)]);
        assert_eq!(untried.len(), 1);
        // The live holder completes: the dead one keeps its own schedule.
        let (next, _) = next.after_attempt(Vec::new(), untried, now + 1_000);
        let next = next.unwrap();
        assert_eq!(next.owed, vec![holder(1, Vec::new(), 9, now + 256_000)]);
        assert_eq!(next.next_ms, now + 256_000);
        // After a restart every holder is tried at once.
        assert_eq!(next.due_holders(now + 2_000, true).0.len(), 1);
        // At the last allowed failure the holder is given up on and the entry ends.
        let last = holder(1, Vec::new(), GIVE_UP_AFTER - 1, now);
        let (next, given_up) = entry(vec![last.clone()]).after_attempt(vec![last], vec![], now);
        assert!(next.is_none());
        assert_eq!(given_up.len(), 1);
        assert_eq!(given_up[0].failures, GIVE_UP_AFTER);
        // Everyone done: no entry.
        let (next, given_up) = entry(vec![dead]).after_attempt(vec![], vec![], now);
        assert!(next.is_none() && given_up.is_empty());
    }
}
