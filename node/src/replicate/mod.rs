//! Objects across the mesh: the write path (place each chunk on `rep:N` holders, or its
//! `ec:K+M` shards on K+M holders, succeed when `W` have it durably), the read path (local
//! chunks first, else the nearest holder (equally near ones by rendezvous hash, so reads of
//! a large object spread over them), hedged, verified, with fallback; for `ec:` the
//! nearest K shards, decoded), [`repair`] of what dead holders took with them, and the
//! storage service that answers other nodes' chunk and control requests.
//!
//! Data flow of a put: the chunker cuts the stream; each chunk goes through
//! `placement::choose_targets` over the live peer table plus this node, and is sent to its
//! targets at once (this node's share through the open [`Upload`], others over
//! `/mesh/chunk/1`), with at most `write_window` chunks in flight. A failed target is replaced
//! by the next one in placement order. A chunk counts once `W` holders acknowledged it (a
//! holder syncs a chunk before acknowledging it); sends still running then finish on their
//! own. Once every chunk counts, the manifest and the placement record go to every holder
//! that acknowledged something, over `/mesh/control/1`; each commits its part, keeps the record
//! and announces the object in the DHT (`PutObject`), except for a job task's output, which
//! nobody announces (`KeepObject`: its coordinator learns where it is from the task's result,
//! and the job's composed objects are announced). Holders still owed chunks (or the record) are written
//! to a durable queue before the put returns; [`complete`] finishes them in the background,
//! after a restart too. A replica the sender does not hold itself is not relayed: the holder
//! to be fetches it from a holder that has it (`ChunkRequest::Copy`, served by
//! `answer_copy`), so the bytes cross the network once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use libp2p::PeerId;
use mesh_proto::api::PutResponse;
use mesh_proto::wire::{
    ChunkRequest, ChunkResponse, ControlRequest, ControlResponse, NodeId, PlacementRecord, Refusal,
};
use mesh_proto::{ChunkId, ChunkRef, Manifest, ObjectId, Redundancy};
use tokio::io::AsyncRead;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{debug, warn};

use crate::chunker::{ChunkSource, Chunker};
use crate::metrics::Metrics;
use crate::net::{Frame, Inbound, Network, PeerView, Role};
use crate::objects::{IngestError, PutOptions};
use crate::placement::{self, Candidate, Liveness, Zone};
use crate::store::rocks::Upload;
use crate::store::{ChunkStore, MetaStore, RocksStore, StoreError};

pub mod complete;
pub mod compose;
pub mod delete;
pub mod repair;

use complete::Delivery;

/// How long a peer that sent bad bytes is avoided.
const AVOID_FOR: Duration = Duration::from_secs(300);
/// Inbound requests served at once; more wait in the network's bounded queue.
const INBOUND_WORKERS: usize = 32;
/// Of those, `Copy` requests (each waits on a fetch from another node) served at once; more
/// are refused as busy and the sender falls back to sending the bytes itself. Fewer than
/// [`INBOUND_WORKERS`], so copies that wait on each other's fetches cannot take every worker.
const COPY_WORKERS: usize = 8;
/// Nearest peers asked for an object's manifest while the DHT lookup runs.
const NEAR_PROBE: usize = 3;
/// Peers asked directly, nearest first, when the DHT names no provider that has an object.
const FALLBACK_ASK: usize = 16;
/// Of those, asked at once.
const FALLBACK_PARALLEL: usize = 4;
/// How long a manifest and record opened from another node are reused: a download asks for
/// the manifest first and the bytes second, and each would otherwise look the object up.
const OPENED_TTL: Duration = Duration::from_secs(10);
/// Most objects kept in that cache.
const OPENED_MAX: usize = 256;

/// Tuning of the replicated paths.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Chunks in flight per put.
    pub write_window: usize,
    /// A fetch slower than this starts the same fetch from the next holder.
    pub hedge_after: Duration,
    /// A peer (or this node) with less free disk than this gets no new chunks.
    pub min_free_bytes: u64,
    /// Longest a put waits for its DHT announcement to be stored.
    pub announce_timeout: Duration,
    /// A holder silent this long is dead and its parts are repaired.
    pub dead_after: Duration,
    /// Bytes per second of background sends (put completion and repair); 0 = unthrottled.
    pub repair_rate: u64,
}

/// Whether a put tells the DHT that this node provides the new object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// Announce, and return once the DHT stored it (bounded): a user's put.
    Wait,
    /// Never: a job's task outputs. Their coordinator learns where they are from the answer;
    /// a shuffle output is read once through its placement record, and the other outputs
    /// and the rejects become chunks of the job's composed output and rejects objects, which
    /// are announced.
    Never,
}

/// An object a put stored: what the API answers, and the manifest and record it committed.
#[derive(Debug, Clone)]
pub struct Written {
    pub response: PutResponse,
    pub manifest: Manifest,
    pub record: PlacementRecord,
}

/// Why a replicated put or get failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(
        "chunk {chunk} reached {acked} of the {needed} holders the write quorum needs ({reason})"
    )]
    QuorumFailed {
        chunk: ChunkId,
        acked: usize,
        needed: usize,
        reason: String,
    },
    #[error("object {0} was not found on this node or any provider")]
    NotFound(ObjectId),
    #[error("chunk {chunk} could not be read from any holder: {reason}")]
    ChunkUnavailable { chunk: ChunkId, reason: String },
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Objects that cannot be composed (see [`compose`]).
    #[error("{0}")]
    Invalid(String),
}

/// Where one copy of a chunk goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Local,
    Remote(PeerId),
}

/// A chunk once its write quorum is reached.
#[derive(Debug)]
struct Placed {
    /// Per part of the chunk: one for `rep:N` (the chunk), K+M for `ec:K+M` (the shards).
    parts: Vec<PartPlaced>,
    /// The shard ids (`ec:K+M`); empty for `rep:N`.
    shard_ids: Vec<ChunkId>,
    was_new: bool,
    /// The sends still running.
    stragglers: Option<tokio::task::JoinHandle<()>>,
}

/// Where one part of a chunk went.
#[derive(Debug, Default)]
struct PartPlaced {
    /// Targets that stored it.
    acked: Vec<Target>,
    /// Targets still being sent to when the quorum was reached.
    owed: Vec<Target>,
}

/// The request that gives a holder an object's placement record: it announces the object
/// (`PutObject`) or only keeps it (`KeepObject`).
pub(crate) fn record_request(record: PlacementRecord, announce: bool) -> ControlRequest {
    if announce {
        ControlRequest::PutObject { record }
    } else {
        ControlRequest::KeepObject { record }
    }
}

/// A refusal on the control protocol.
pub(super) fn control_refused(reason: Refusal, message: String) -> Frame<ControlResponse> {
    Frame::new(ControlResponse::Refused { reason, message })
}

/// A refusal on the chunk protocol.
fn chunk_refused(reason: Refusal, message: String) -> Frame<ChunkResponse> {
    Frame::new(ChunkResponse::Refused { reason, message })
}

/// A chunk for this node's own store, with the id the caller already hashed and where to say
/// whether it was new.
type LocalChunk = (ChunkId, Bytes, oneshot::Sender<Result<bool, StoreError>>);
/// A sender of this node's share of a put to its local writer.
type LocalWriter = mpsc::Sender<LocalChunk>;

/// Runs `tasks` in order with a window that starts at one and doubles with every result
/// delivered, up to `max`; yields the results in order.
fn ramped<I, F, T>(tasks: I, max: usize) -> impl Stream<Item = T>
where
    I: Iterator<Item = F>,
    F: std::future::Future<Output = T>,
{
    let max = max.max(1);
    futures::stream::unfold(
        (tasks, futures::stream::FuturesOrdered::new(), 1usize),
        move |(mut tasks, mut running, window)| async move {
            while running.len() < window {
                match tasks.next() {
                    Some(task) => running.push_back(task),
                    None => break,
                }
            }
            let item = running.next().await?;
            Some((item, (tasks, running, (window * 2).min(max))))
        },
    )
}

/// Sends a chunk to `peer`; `Ok(new)` once the peer stored it durably.
async fn store_remote(
    net: &Network,
    peer: PeerId,
    id: ChunkId,
    data: Bytes,
) -> Result<bool, String> {
    let request = Frame::with_payload(ChunkRequest::Store { id }, data);
    stored_answer(peer, net.chunk(peer, request).await)
}

/// `Ok(new)` when `peer` answered a `Store` or `Copy` with `Stored`, else what went wrong.
fn stored_answer(
    peer: PeerId,
    answer: Result<Frame<ChunkResponse>, crate::net::NetError>,
) -> Result<bool, String> {
    match answer {
        Ok(Frame {
            header: ChunkResponse::Stored { new },
            ..
        }) => Ok(new),
        Ok(Frame {
            header: ChunkResponse::Refused { reason, message },
            ..
        }) => Err(format!("{peer} refused: {reason}: {message}")),
        Ok(other) => Err(format!("{peer} answered {:?}", other.header)),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends one part to a target: this node's share through its local writer, or a peer over
/// the chunk protocol. `Ok(new)` once it is stored durably.
async fn send_part(
    net: &Network,
    local: &LocalWriter,
    target: Target,
    id: ChunkId,
    data: Bytes,
) -> Result<bool, String> {
    match target {
        Target::Local => {
            let (tx, rx) = oneshot::channel();
            match local.send((id, data, tx)).await {
                Err(_) => Err("local writer stopped".to_owned()),
                Ok(()) => match rx.await {
                    Ok(Ok(new)) => Ok(new),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("local writer stopped".to_owned()),
                },
            }
        }
        Target::Remote(peer) => store_remote(net, peer, id, data).await,
    }
}

/// The replicated object service of one node.
#[derive(Debug, Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<RocksStore>,
    net: Network,
    metrics: Metrics,
    settings: Settings,
    /// Peers that sent bytes failing verification, and since when.
    avoid: Mutex<HashMap<PeerId, Instant>>,
    /// The background completion: objects whose quorum-exceeding sends are still running
    /// (it waits for them), and a nudge to look at an object now.
    completion: complete::Shared,
    /// Objects recently opened from another node (see [`OPENED_TTL`]).
    opened: Mutex<HashMap<ObjectId, (Instant, Manifest, PlacementRecord)>>,
    /// What the repair worker last saw.
    repair: repair::Shared,
    /// Paces background sends at `repair_rate`.
    pace: repair::Pace,
    /// Bounds the `Copy` requests served at once ([`COPY_WORKERS`]).
    copies: Arc<Semaphore>,
    /// Where job-protocol requests go, once the job service runs.
    jobs: std::sync::OnceLock<mpsc::Sender<JobCall>>,
    /// Test hook: serve corrupted chunks (see [`Mesh::serve_corrupt_chunks`]).
    serve_corrupt: AtomicBool,
}

/// A job-protocol request from a peer, for the job service, with the way to answer it.
#[derive(Debug)]
pub struct JobCall {
    pub peer: PeerId,
    pub request: mesh_proto::job::JobRequest,
    pub reply: oneshot::Sender<mesh_proto::job::JobResponse>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Keeps an object's manifest and placement record as a holder named `me` in it, taking
/// references on the chunks it holds; `Ok(None)` when the store keeps a record this one does
/// not supersede (a tombstone, say), else the held chunks not stored here yet. The same
/// record again (the writer's background completion delivered the rest of this node's
/// chunks) takes references on the chunks now here.
fn keep_record(
    store: &RocksStore,
    me: &NodeId,
    manifest: &Manifest,
    record: &PlacementRecord,
) -> Result<Option<Vec<ChunkId>>, StoreError> {
    let _object = store.object_lock(&record.object);
    if let Some(existing) = store.record(&record.object)?
        && let Ok(existing) = PlacementRecord::decode(&existing)
        && existing != *record
        && !record.supersedes(&existing)
    {
        return Ok(None);
    }
    let held = record.chunks_held_by(me);
    let (_, missing) = store.commit_placed(manifest, &record.encode(), &held, &record.parts)?;
    Ok(Some(missing))
}

/// Free space of the disk holding `path`, or `u64::MAX` when it cannot be read.
pub fn disk_free(path: &std::path::Path) -> u64 {
    fs4::available_space(path).unwrap_or(u64::MAX)
}

impl Mesh {
    pub fn new(store: Arc<RocksStore>, net: Network, metrics: Metrics, settings: Settings) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                net,
                metrics,
                avoid: Mutex::new(HashMap::new()),
                completion: complete::Shared::new(),
                opened: Mutex::new(HashMap::new()),
                repair: repair::Shared::default(),
                pace: repair::Pace::new(settings.repair_rate),
                copies: Arc::new(Semaphore::new(COPY_WORKERS)),
                jobs: std::sync::OnceLock::new(),
                serve_corrupt: AtomicBool::new(false),
                settings,
            }),
        }
    }

    pub fn network(&self) -> &Network {
        &self.inner.net
    }

    /// Test hook: while on, this node flips one byte of every chunk it sends in answer to a
    /// fetch, as a lying or broken peer would, so that tests can watch readers catch the bad
    /// bytes on the wire, count them and avoid the peer. (Rot at rest is not that: the store
    /// verifies what it reads, so a corrupt chunk is never sent.)
    ///
    /// Only code holding this node in-process can turn it on: no API route, config key or
    /// peer message reaches it. A cargo feature would be the other way, but features unify
    /// across a workspace build, so the test crate asking for it would build it into `meshd`.
    #[doc(hidden)]
    pub fn serve_corrupt_chunks(&self, on: bool) {
        self.inner
            .serve_corrupt
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hands job-protocol requests to `jobs` from now on (set once, by the job service).
    pub fn serve_jobs(&self, jobs: mpsc::Sender<JobCall>) {
        let _ = self.inner.jobs.set(jobs);
    }

    /// The local store.
    pub fn store(&self) -> &Arc<RocksStore> {
        &self.inner.store
    }

    /// Reads chunk `index` of an object (locally, or from its holders; decoded from shards for
    /// `ec:`), verified.
    pub async fn read_chunk(
        &self,
        manifest: &Manifest,
        record: Option<&PlacementRecord>,
        index: usize,
    ) -> Result<Bytes, MeshError> {
        let chunk = *manifest.chunks.get(index).ok_or_else(|| {
            MeshError::Invalid(format!(
                "chunk {index} of an object with {} chunks",
                manifest.chunks.len()
            ))
        })?;
        match record.filter(|r| matches!(r.redundancy, Redundancy::Erasure { .. })) {
            Some(record) => self.fetch_erasure_chunk(chunk, index, record, None).await,
            None => {
                let holders = record
                    .map(|r| Self::part_holders(r, index))
                    .unwrap_or_default();
                self.fetch_chunk(chunk.id, holders).await
            }
        }
    }

    fn local_id(&self) -> PeerId {
        self.inner.net.local_peer_id()
    }

    /// Placement candidates: live storage peers plus this node.
    fn candidates(&self, peers: &[PeerView]) -> (Vec<Candidate>, Vec<Target>) {
        let now_free = disk_free(self.inner.store.path());
        let mut candidates = vec![Candidate {
            id: self.local_id().to_bytes(),
            zone: Zone::new(self.inner.net.zone()),
            rtt: Duration::ZERO,
            free_bytes: now_free,
            load: 0.0,
            liveness: Liveness::Alive,
        }];
        let mut targets = vec![Target::Local];
        for peer in peers.iter().filter(|p| p.role == Role::Storage) {
            let load = peer.load.as_ref();
            candidates.push(Candidate {
                id: peer.id.to_bytes(),
                zone: Zone::new(&peer.zone),
                // Not yet measured: rank it behind measured peers rather than as nearest.
                rtt: peer
                    .rtt
                    .unwrap_or(Duration::from_secs(1))
                    .max(Duration::from_micros(1)),
                free_bytes: load.map_or(u64::MAX, |l| l.disk_free),
                load: load.map_or(0.0, |l| l.cpu),
                liveness: if peer.connected {
                    peer.liveness
                } else {
                    Liveness::Suspect
                },
            });
            targets.push(Target::Remote(peer.id));
        }
        (candidates, targets)
    }

    /// Stores `reader` as an object with `rep:N` replicas or `ec:K+M` shards per chunk, of
    /// which `quorum` must be stored for each chunk.
    pub async fn put<R: AsyncRead + Unpin + Send>(
        &self,
        reader: R,
        options: PutOptions,
        quorum: usize,
    ) -> Result<PutResponse, MeshError> {
        let chunker = Chunker::new(reader, options.chunker);
        let written = self
            .put_chunks(chunker, options, quorum, Announce::Wait)
            .await?;
        Ok(written.response)
    }

    /// Stores the chunks `source` yields as one object, like [`Mesh::put`], and returns its
    /// manifest and placement record too; `announce` says whether and how this node tells
    /// the DHT it provides the object.
    pub async fn put_chunks<S: ChunkSource>(
        &self,
        source: S,
        options: PutOptions,
        quorum: usize,
        announce: Announce,
    ) -> Result<Written, MeshError> {
        let width = options.redundancy.width();
        let quorum = quorum.clamp(1, width);
        let inner = &self.inner;
        let (local_tx, local_rx) = mpsc::channel(inner.settings.write_window);
        let writer = spawn_local_writer(Arc::clone(&inner.store), local_rx);

        let mut chunker = source;
        let mut in_flight = FuturesUnordered::new();
        let mut placed: BTreeMap<usize, (ChunkRef, Vec<PartPlaced>, Vec<ChunkId>)> =
            BTreeMap::new();
        let mut stragglers = Vec::new();
        let mut index = 0usize;
        let mut new_chunks = 0u64;
        let mut new_bytes = 0u64;
        let mut failure: Option<MeshError> = None;
        let mut eof = false;
        while failure.is_none() && (!eof || !in_flight.is_empty()) {
            if !eof && in_flight.len() < inner.settings.write_window {
                match chunker.next_chunk().await {
                    Ok(Some(data)) => {
                        let id = ChunkId::of(&data);
                        let order = self.placement_order(&id, options.redundancy);
                        let this = self.clone();
                        let local_tx = local_tx.clone();
                        let i = index;
                        index += 1;
                        let redundancy = options.redundancy;
                        // A task per chunk, so its sends start now rather than when this
                        // loop next polls the in-flight set.
                        in_flight.push(tokio::spawn(async move {
                            let len = data.len() as u32;
                            let result = match redundancy {
                                Redundancy::Replicas(_) => {
                                    this.place_chunk(id, data, order, width, quorum, local_tx)
                                        .await
                                }
                                Redundancy::Erasure { data: k, parity: m } => {
                                    this.place_erasure(data, k, m, order, quorum, local_tx)
                                        .await
                                }
                            };
                            (i, id, len, result)
                        }));
                        continue;
                    }
                    Ok(None) => {
                        eof = true;
                        continue;
                    }
                    Err(e) => {
                        failure = Some(IngestError::from(e).into());
                        break;
                    }
                }
            }
            if let Some(joined) = in_flight.next().await {
                let Ok((i, id, len, result)) = joined else {
                    failure = Some(IngestError::WorkerGone.into());
                    break;
                };
                match result {
                    Ok(chunk) => {
                        if chunk.was_new {
                            new_chunks += 1;
                            new_bytes += u64::from(len);
                        }
                        stragglers.extend(chunk.stragglers);
                        placed.insert(i, (ChunkRef { id, len }, chunk.parts, chunk.shard_ids));
                    }
                    Err(e) => failure = Some(e),
                }
            }
        }
        for task in in_flight.iter() {
            task.abort();
        }
        drop(in_flight);
        drop(local_tx);
        let upload = writer.await.map_err(|_| IngestError::WorkerGone)?;
        if let Some(e) = failure {
            for task in &stragglers {
                task.abort();
            }
            inner.metrics.aborted_uploads().increment(1);
            tokio::task::spawn_blocking(move || drop(upload));
            return Err(e);
        }

        let chunks: Vec<ChunkRef> = placed.values().map(|(c, _, _)| *c).collect();
        let manifest = Manifest::new(
            options.name,
            options.chunker,
            options.redundancy,
            chunks,
            BTreeMap::new(),
            options.created_ms.unwrap_or_else(now_ms),
        )
        .map_err(IngestError::from)?;
        let object = manifest.object_id();
        let me = self.local_id();
        let peer_of = |target: &Target| match target {
            Target::Local => me,
            Target::Remote(p) => *p,
        };
        let mut nodes: Vec<PeerId> = Vec::new();
        let mut holders = Vec::with_capacity(placed.len());
        let mut parts = Vec::new();
        // Per remote holder: whether it stored any part yet, and the parts it is owed.
        let mut acked_peers: Vec<PeerId> = Vec::new();
        let mut owed: BTreeMap<PeerId, Vec<u32>> = BTreeMap::new();
        let placed_parts = placed.values().flat_map(|(_, chunk_parts, shard_ids)| {
            parts.extend_from_slice(shard_ids);
            chunk_parts.iter()
        });
        for (index, part) in placed_parts.enumerate() {
            let mut list = Vec::with_capacity(part.acked.len() + part.owed.len());
            for target in part.acked.iter().chain(&part.owed) {
                let peer = peer_of(target);
                let pos = match nodes.iter().position(|n| *n == peer) {
                    Some(pos) => pos,
                    None => {
                        nodes.push(peer);
                        nodes.len() - 1
                    }
                };
                list.push(pos as u16);
            }
            holders.push(list);
            for target in &part.acked {
                if let Target::Remote(p) = target
                    && !acked_peers.contains(p)
                {
                    acked_peers.push(*p);
                }
            }
            for target in &part.owed {
                owed.entry(peer_of(target)).or_default().push(index as u32);
            }
        }
        let record = PlacementRecord {
            object,
            version: 1,
            writer: NodeId(me.to_bytes()),
            redundancy: options.redundancy,
            tombstone: false,
            nodes: nodes.iter().map(|p| NodeId(p.to_bytes())).collect(),
            holders,
            parts,
        };
        let manifest_bytes = Bytes::from(manifest.encode());
        let size = manifest.size;
        let chunk_count = manifest.chunks.len() as u64;

        // This node's share commits with the upload that pinned it.
        let local_held = record.chunks_held_by(&NodeId(me.to_bytes()));
        let encoded = record.encode();
        let commit_manifest = manifest.clone();
        let commit_parts = record.parts.clone();
        let is_holder = nodes.contains(&me) || manifest.chunks.is_empty();
        let store = Arc::clone(&self.inner.store);
        tokio::task::spawn_blocking(move || {
            let _object = store.object_lock(&object);
            if is_holder {
                upload.commit_placed(&commit_manifest, &encoded, &local_held, &commit_parts)
            } else {
                drop(upload);
                Ok((object, Vec::new()))
            }
        })
        .await
        .map_err(|_| IngestError::WorkerGone)??;
        // Every holder that stored something gets the manifest and the record now, in
        // parallel, while this node's announcement goes out; one that is only owed chunks
        // gets them with its last chunk.
        // Thousands of a job's task outputs, each announced by every holder, kept the DHT
        // busy for nothing: their holders only keep them (see `ControlRequest::KeepObject`).
        let holders_announce = announce == Announce::Wait;
        let sends = acked_peers.iter().map(|peer| {
            let net = inner.net.clone();
            let request = Frame::with_payload(
                record_request(record.clone(), holders_announce),
                manifest_bytes.clone(),
            );
            let peer = *peer;
            async move { (peer, complete::send_record(&net, peer, request).await) }
        });
        let announcing = async {
            match announce {
                _ if !is_holder => {}
                Announce::Wait => self.announce(object).await,
                Announce::Never => {}
            }
        };
        let ((), results) = tokio::join!(announcing, futures::future::join_all(sends));
        for (peer, result) in results {
            if let Err(e) = result {
                warn!(%peer, %object, error = %e, "placement record not delivered; retrying in the background");
                owed.entry(peer).or_default();
            }
        }
        if !owed.is_empty() {
            let delivery = Delivery::new(&record, &manifest_bytes, owed, now_ms())
                .with_announce(holders_announce);
            let owed_holders = delivery.owed.len();
            self.enqueue_delivery(object, delivery, stragglers).await?;
            debug!(%object, owed_holders, "holders beyond the quorum finish in the background");
        }
        inner.metrics.puts().increment(1);
        inner.metrics.put_bytes().increment(size);
        debug!(%object, size, chunks = chunk_count, holders = nodes.len(), "stored replicated object");
        Ok(Written {
            response: PutResponse {
                id: object,
                size,
                chunks: chunk_count,
                new_chunks,
                new_bytes,
            },
            manifest,
            record,
        })
    }

    /// Sends one chunk to its first `width` targets (replacing failed ones from `order`),
    /// and returns once `quorum` of them stored it and this node's own copy (if it is a
    /// target) is settled. Sends still running then are returned as owed, and keep going.
    async fn place_chunk(
        &self,
        id: ChunkId,
        data: Bytes,
        order: Vec<Target>,
        width: usize,
        quorum: usize,
        local: LocalWriter,
    ) -> Result<Placed, MeshError> {
        let mut spare = order.into_iter();
        let mut sends = FuturesUnordered::new();
        let send = |target: Target| {
            let data = data.clone();
            let local = local.clone();
            let net = self.inner.net.clone();
            async move { (target, send_part(&net, &local, target, id, data).await) }
        };
        let mut running = Vec::with_capacity(width);
        for target in spare.by_ref().take(width) {
            running.push(target);
            sends.push(send(target));
        }
        let mut acked = Vec::new();
        let mut unreplaced = Vec::new();
        let mut was_new = false;
        let mut last_error = String::from("no eligible holders");
        while let Some((target, result)) = sends.next().await {
            running.retain(|t| *t != target);
            match result {
                Ok(new) => {
                    if target == Target::Local {
                        was_new = new;
                    }
                    acked.push(target);
                }
                Err(e) => {
                    debug!(chunk = %id, ?target, error = %e, "chunk not stored; trying the next holder");
                    last_error = e;
                    if let Some(next) = spare.next() {
                        running.push(next);
                        sends.push(send(next));
                    } else if let Target::Remote(_) = target {
                        // No other peer to take its place: retry it in the background.
                        unreplaced.push(target);
                    }
                }
            }
            if acked.len() >= quorum && !running.contains(&Target::Local) {
                break;
            }
        }
        if acked.len() < quorum {
            return Err(MeshError::QuorumFailed {
                chunk: id,
                acked: acked.len(),
                needed: quorum,
                reason: last_error,
            });
        }
        let stragglers = (!sends.is_empty()).then(|| {
            tokio::spawn(async move {
                // Outcomes are not needed: the background completion asks the owed holders
                // what they have before sending anything.
                while sends.next().await.is_some() {}
            })
        });
        running.extend(unreplaced);
        Ok(Placed {
            parts: vec![PartPlaced {
                acked,
                owed: running,
            }],
            shard_ids: Vec::new(),
            was_new,
            stragglers,
        })
    }

    /// The order in which a chunk's holders are tried: for `ec:K+M`, the K+M shard targets
    /// (at most M per region when the regions allow it) come first, then every other eligible
    /// peer as a spare.
    fn placement_order(&self, chunk: &ChunkId, redundancy: Redundancy) -> Vec<Target> {
        let peers = self.inner.net.peers();
        let (candidates, targets) = self.candidates(&peers);
        let zone = Zone::new(self.inner.net.zone());
        let request = |width, max_per_zone| placement::Request {
            chunk,
            width,
            max_per_zone,
            writer_zone: &zone,
            min_free_bytes: self.inner.settings.min_free_bytes,
        };
        let mut order = match redundancy {
            Redundancy::Replicas(_) => Vec::new(),
            Redundancy::Erasure { parity, .. } => placement::choose_targets(
                &candidates,
                &request(redundancy.width(), Some(usize::from(parity))),
            ),
        };
        for i in placement::choose_targets(&candidates, &request(candidates.len(), None)) {
            if !order.contains(&i) {
                order.push(i);
            }
        }
        order.into_iter().map(|i| targets[i]).collect()
    }

    /// Cuts one chunk into K data and M parity shards and sends shard `s` to the `s`-th
    /// target, one shard per holder; a failed target is replaced by the next spare. Returns
    /// once `quorum` shards are stored and this node's own shard (if any) is settled; sends
    /// still running are returned as owed and keep going.
    async fn place_erasure(
        &self,
        chunk: Bytes,
        data: u8,
        parity: u8,
        order: Vec<Target>,
        quorum: usize,
        local: LocalWriter,
    ) -> Result<Placed, MeshError> {
        let (k, m) = (usize::from(data), usize::from(parity));
        let chunk_id = ChunkId::of(&chunk);
        let shards = tokio::task::spawn_blocking(move || crate::erasure::encode(k, m, &chunk))
            .await
            .map_err(|_| IngestError::WorkerGone)?
            .map_err(|e| MeshError::ChunkUnavailable {
                chunk: chunk_id,
                reason: e.to_string(),
            })?;
        let shard_ids: Vec<ChunkId> = shards.iter().map(|s| ChunkId::of(s)).collect();
        let mut spare = order.into_iter();
        let mut sends = FuturesUnordered::new();
        let send = |shard: usize, target: Target| {
            let data = shards[shard].clone();
            let id = shard_ids[shard];
            let local = local.clone();
            let net = self.inner.net.clone();
            async move {
                let result = send_part(&net, &local, target, id, data).await;
                (shard, target, result)
            }
        };
        let mut parts: Vec<PartPlaced> = (0..k + m).map(|_| PartPlaced::default()).collect();
        // The target each shard is being sent to.
        let mut running: Vec<Option<Target>> = vec![None; k + m];
        for (shard, slot) in running.iter_mut().enumerate() {
            if let Some(target) = spare.next() {
                *slot = Some(target);
                sends.push(send(shard, target));
            }
        }
        let mut acked = 0usize;
        let mut was_new = false;
        let mut last_error = String::from("no eligible holders");
        while let Some((shard, target, result)) = sends.next().await {
            running[shard] = None;
            match result {
                Ok(new) => {
                    if target == Target::Local {
                        was_new = new;
                    }
                    parts[shard].acked.push(target);
                    acked += 1;
                }
                Err(e) => {
                    debug!(chunk = %chunk_id, shard, ?target, error = %e, "shard not stored; trying the next holder");
                    last_error = e;
                    if let Some(next) = spare.next() {
                        running[shard] = Some(next);
                        sends.push(send(shard, next));
                    } else if let Target::Remote(_) = target {
                        // No other peer to take its place: retry it in the background.
                        parts[shard].owed.push(target);
                    }
                }
            }
            if acked >= quorum && !running.contains(&Some(Target::Local)) {
                break;
            }
        }
        if acked < quorum {
            return Err(MeshError::QuorumFailed {
                chunk: chunk_id,
                acked,
                needed: quorum,
                reason: last_error,
            });
        }
        for (shard, target) in running.into_iter().enumerate() {
            if let Some(target) = target {
                parts[shard].owed.push(target);
            }
        }
        let stragglers = (!sends.is_empty())
            .then(|| tokio::spawn(async move { while sends.next().await.is_some() {} }));
        Ok(Placed {
            parts,
            shard_ids,
            was_new,
            stragglers,
        })
    }

    /// The manifest and placement record of an object: from this node, or else from the
    /// nearest provider the DHT knows.
    pub async fn open(
        &self,
        id: ObjectId,
    ) -> Result<(Manifest, Option<PlacementRecord>), MeshError> {
        let store = Arc::clone(&self.inner.store);
        let local = tokio::task::spawn_blocking(move || {
            let manifest = store.manifest(&id)?;
            let record = store.record(&id)?;
            Ok::<_, StoreError>((manifest, record))
        })
        .await
        .map_err(|_| IngestError::WorkerGone)??;
        if delete::is_tombstone(local.1.as_deref()) {
            return Err(MeshError::NotFound(id));
        }
        if let (Some((manifest, _)), record) = local {
            let record = record.and_then(|r| PlacementRecord::decode(&r).ok());
            return Ok((manifest, record));
        }
        if let Some((manifest, record)) = self.opened(&id) {
            return Ok((manifest, Some(record)));
        }
        // The nearest peers are asked at once, while the DHT lookup (which may cross regions)
        // runs: an object with a holder next door opens in one short round trip.
        let near = self.nearest_peers(NEAR_PROBE);
        let probe = async {
            let mut asks: FuturesUnordered<_> =
                near.iter().map(|&peer| self.ask_object(peer, id)).collect();
            while let Some(answer) = asks.next().await {
                if answer.is_some() {
                    return answer;
                }
            }
            None
        };
        let lookup = async {
            let providers = self.inner.net.find_providers(id).await.unwrap_or_default();
            let me = self.local_id();
            let providers = self.by_distance(
                providers
                    .into_iter()
                    .filter(|p| *p != me && !near.contains(p))
                    .collect(),
            );
            for peer in &providers {
                if let Some(found) = self.ask_object(*peer, id).await {
                    return Some(found);
                }
            }
            // Provider records are best effort: a partition while the object was announced
            // can leave them where this node's lookup does not reach. The peer table is the
            // mesh's own view of who is alive: ask the nearest of those not asked yet.
            let rest: Vec<PeerId> = self
                .nearest_peers_unbanded(FALLBACK_ASK)
                .into_iter()
                .filter(|p| !near.contains(p) && !providers.contains(p))
                .collect();
            let mut asks =
                futures::stream::iter(rest.into_iter().map(|peer| self.ask_object(peer, id)))
                    .buffer_unordered(FALLBACK_PARALLEL);
            while let Some(answer) = asks.next().await {
                if answer.is_some() {
                    debug!(object = %id, "found through the peer table, not the DHT");
                    return answer;
                }
            }
            None
        };
        tokio::pin!(probe, lookup);
        let (mut probe_done, mut lookup_done) = (false, false);
        let found = loop {
            tokio::select! {
                answer = &mut probe, if !probe_done => match answer {
                    Some(found) => break Some(found),
                    None => probe_done = true,
                },
                answer = &mut lookup, if !lookup_done => match answer {
                    Some(found) => break Some(found),
                    None => lookup_done = true,
                },
            }
            if probe_done && lookup_done {
                break None;
            }
        };
        let (manifest, record) = found.ok_or(MeshError::NotFound(id))?;
        self.remember_opened(id, &manifest, &record);
        Ok((manifest, Some(record)))
    }

    /// Asks `peer` for an object's manifest and placement record; `None` when it has no copy,
    /// cannot be reached, or sends one that does not match the object (it is then avoided).
    async fn ask_object(&self, peer: PeerId, id: ObjectId) -> Option<(Manifest, PlacementRecord)> {
        let request = Frame::new(ControlRequest::GetObject { id });
        match self.inner.net.control(peer, request).await {
            Ok(Frame {
                header: ControlResponse::Object { record },
                payload,
            }) => match Manifest::decode_verified(&id, &payload) {
                Ok(manifest)
                    if record.object == id && record.validate(manifest.chunks.len()).is_ok() =>
                {
                    Some((manifest, record))
                }
                _ => {
                    warn!(%peer, object = %id, "peer sent a manifest or record that does not match the object");
                    self.inner.metrics.bad_peer_data().increment(1);
                    self.avoid(peer);
                    None
                }
            },
            Ok(other) => {
                debug!(%peer, object = %id, response = ?other.header, "peer has no copy");
                None
            }
            Err(e) => {
                debug!(%peer, object = %id, error = %e, "peer unreachable");
                None
            }
        }
    }

    /// Up to `limit` alive storage peers inside the near band of the nearest one.
    pub fn nearest_peers(&self, limit: usize) -> Vec<PeerId> {
        let measured = self.alive_by_rtt();
        let Some(&(best, _)) = measured.first() else {
            return Vec::new();
        };
        let band = placement::near_band(best);
        measured
            .into_iter()
            .take_while(|(rtt, _)| *rtt <= band)
            .take(limit)
            .map(|(_, peer)| peer)
            .collect()
    }

    /// Up to `limit` alive storage peers, nearest first, however far.
    fn nearest_peers_unbanded(&self, limit: usize) -> Vec<PeerId> {
        self.alive_by_rtt()
            .into_iter()
            .take(limit)
            .map(|(_, peer)| peer)
            .collect()
    }

    /// Alive, measured storage peers that are not avoided, nearest first.
    fn alive_by_rtt(&self) -> Vec<(Duration, PeerId)> {
        let mut measured: Vec<(Duration, PeerId)> = self
            .inner
            .net
            .peers()
            .iter()
            .filter(|p| p.role == Role::Storage && p.liveness == Liveness::Alive)
            .filter(|p| !self.avoided(&p.id))
            .filter_map(|p| Some((p.rtt?, p.id)))
            .collect();
        measured.sort();
        measured
    }

    fn opened(&self, id: &ObjectId) -> Option<(Manifest, PlacementRecord)> {
        let opened = lock(&self.inner.opened);
        let (at, manifest, record) = opened.get(id)?;
        (at.elapsed() < OPENED_TTL).then(|| (manifest.clone(), record.clone()))
    }

    fn remember_opened(&self, id: ObjectId, manifest: &Manifest, record: &PlacementRecord) {
        let mut opened = lock(&self.inner.opened);
        if opened.len() >= OPENED_MAX {
            opened.retain(|_, (at, _, _)| at.elapsed() < OPENED_TTL);
        }
        if opened.len() >= OPENED_MAX
            && let Some(oldest) = opened
                .iter()
                .min_by_key(|(_, (at, _, _))| *at)
                .map(|(k, _)| *k)
        {
            opened.remove(&oldest);
        }
        opened.insert(id, (Instant::now(), manifest.clone(), record.clone()));
    }

    /// Announces a committed object in the DHT and waits (bounded) until the announcement is
    /// stored, so that a get on any node finds the object as soon as the put has returned.
    async fn announce(&self, object: ObjectId) {
        let timeout = self.inner.settings.announce_timeout;
        if !self.inner.net.provide_confirmed(object, timeout).await {
            debug!(%object, "announcement not confirmed by any peer yet; it is repeated periodically");
        }
    }

    fn avoid(&self, peer: PeerId) {
        lock(&self.inner.avoid).insert(peer, Instant::now());
    }

    fn avoided(&self, peer: &PeerId) -> bool {
        let mut avoid = lock(&self.inner.avoid);
        match avoid.get(peer) {
            Some(since) if since.elapsed() < AVOID_FOR => true,
            Some(_) => {
                avoid.remove(peer);
                false
            }
            None => false,
        }
    }

    /// What the peer table says of `peer` for choosing whom to ask: avoided for bad data,
    /// alive, and its RTT.
    fn standing(&self, table: &[PeerView], peer: &PeerId) -> (bool, bool, Option<Duration>) {
        let view = table.iter().find(|v| v.id == *peer);
        (
            self.avoided(peer),
            view.is_some_and(|v| v.liveness == Liveness::Alive),
            view.and_then(|v| v.rtt),
        )
    }

    /// Orders peers nearest first (unmeasured and dead last, avoided peers after all others).
    fn by_distance(&self, mut peers: Vec<PeerId>) -> Vec<PeerId> {
        let table = self.inner.net.peers();
        peers.sort_by_cached_key(|p| {
            let (avoided, alive, rtt) = self.standing(&table, p);
            (avoided, !alive, rtt.unwrap_or(Duration::from_secs(3600)))
        });
        peers
    }

    /// The holders of `chunk` in the order to ask them (see [`placement::read_order`]).
    fn read_order(&self, chunk: &ChunkId, peers: Vec<PeerId>) -> Vec<PeerId> {
        let table = self.inner.net.peers();
        let sources: Vec<placement::Source> = peers
            .iter()
            .map(|p| {
                let (avoided, alive, rtt) = self.standing(&table, p);
                placement::Source {
                    id: p.to_bytes(),
                    rtt,
                    usable: alive && !avoided,
                }
            })
            .collect();
        placement::read_order(chunk, &sources)
            .into_iter()
            .map(|i| peers[i])
            .collect()
    }

    /// The chunk from this node's store, if it is here and reads back intact.
    async fn local_chunk(&self, id: ChunkId) -> Option<Bytes> {
        let store = Arc::clone(&self.inner.store);
        match tokio::task::spawn_blocking(move || store.get_chunk(&id)).await {
            Ok(Ok(found)) => found,
            Ok(Err(StoreError::Corrupt { .. } | StoreError::Lost { .. })) => {
                self.inner.metrics.corrupt_chunks().increment(1);
                None
            }
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// Reads one chunk: locally if stored here, else from the holders, nearest first,
    /// hedging to the next holder when one is slow and verifying every answer.
    pub async fn fetch_chunk(&self, id: ChunkId, holders: Vec<PeerId>) -> Result<Bytes, MeshError> {
        let store = Arc::clone(&self.inner.store);
        let local = tokio::task::spawn_blocking(move || store.get_chunk(&id))
            .await
            .map_err(|_| IngestError::WorkerGone)?;
        match local {
            Ok(Some(bytes)) => return Ok(bytes),
            Ok(None) => {}
            Err(StoreError::Corrupt { .. } | StoreError::Lost { .. }) => {
                self.inner.metrics.corrupt_chunks().increment(1)
            }
            Err(e) => return Err(e.into()),
        }
        self.fetch_remote(id, holders).await
    }

    /// Reads one chunk from the holders other than this node, nearest first, hedged and
    /// verified.
    async fn fetch_remote(&self, id: ChunkId, holders: Vec<PeerId>) -> Result<Bytes, MeshError> {
        self.fetch_from(id, holders, Some(self.inner.settings.hedge_after))
            .await
    }

    /// [`Mesh::fetch_remote`], hedging to the next holder after `hedge` (never with `None`:
    /// the next one is asked only when one fails).
    async fn fetch_from(
        &self,
        id: ChunkId,
        holders: Vec<PeerId>,
        hedge: Option<Duration>,
    ) -> Result<Bytes, MeshError> {
        let me = self.local_id();
        let mut order = self
            .read_order(&id, holders.into_iter().filter(|p| *p != me).collect())
            .into_iter();
        let mut attempts = FuturesUnordered::new();
        let mut last_error = String::from("no holder is known");
        let fetch = |peer: PeerId| {
            let net = self.inner.net.clone();
            async move {
                let started = Instant::now();
                let result = net
                    .chunk(peer, Frame::new(ChunkRequest::Fetch { id }))
                    .await;
                (peer, started.elapsed(), result)
            }
        };
        if let Some(peer) = order.next() {
            attempts.push(fetch(peer));
        }
        loop {
            let hedge_timer = tokio::time::sleep(hedge.unwrap_or(Duration::MAX));
            tokio::pin!(hedge_timer);
            tokio::select! {
                done = attempts.next() => {
                    let Some((peer, _elapsed, result)) = done else {
                        return Err(MeshError::ChunkUnavailable { chunk: id, reason: last_error });
                    };
                    match result {
                        Ok(Frame { header: ChunkResponse::Data, payload }) => {
                            if ChunkId::of(&payload) == id {
                                self.inner.metrics.get_remote_bytes().increment(payload.len() as u64);
                                return Ok(payload);
                            }
                            warn!(%peer, chunk = %id, "peer sent bytes that do not match the chunk id; avoiding it");
                            self.inner.metrics.bad_peer_data().increment(1);
                            self.avoid(peer);
                            last_error = format!("{peer} sent corrupt bytes");
                        }
                        Ok(other) => last_error = format!("{peer} answered {:?}", other.header),
                        Err(e) => last_error = e.to_string(),
                    }
                    match order.next() {
                        Some(next) => attempts.push(fetch(next)),
                        None if attempts.is_empty() => {
                            return Err(MeshError::ChunkUnavailable { chunk: id, reason: last_error });
                        }
                        None => {}
                    }
                }
                () = &mut hedge_timer, if hedge.is_some() && !attempts.is_empty() => {
                    if let Some(next) = order.next() {
                        debug!(chunk = %id, peer = %next, "fetch is slow; hedging to the next holder");
                        self.inner.metrics.hedged_fetches().increment(1);
                        attempts.push(fetch(next));
                    }
                }
            }
        }
    }

    /// The holders of part `index` of a record, as peer ids.
    fn part_holders(record: &PlacementRecord, index: usize) -> Vec<PeerId> {
        record
            .holders_of(index)
            .filter_map(|n| PeerId::from_bytes(&n.0).ok())
            .collect()
    }

    /// Reads chunk `index` of an `ec:K+M` object: K of its shards, the nearest first (this
    /// node's own first of all, data shards before parity among equals), each verified
    /// against its id; a missing, failing or corrupt shard is replaced by the next one, and a
    /// slow one is hedged with one more. The K shards are decoded and the chunk verified
    /// against the manifest. `skip` leaves one shard out (the one being rebuilt).
    pub async fn fetch_erasure_chunk(
        &self,
        chunk: ChunkRef,
        index: usize,
        record: &PlacementRecord,
        skip: Option<usize>,
    ) -> Result<Bytes, MeshError> {
        let Redundancy::Erasure { data, parity } = record.redundancy else {
            return Err(MeshError::ChunkUnavailable {
                chunk: chunk.id,
                reason: format!("its record is {}, not erasure-coded", record.redundancy),
            });
        };
        let (k, m) = (usize::from(data), usize::from(parity));
        let base = index * (k + m);
        let me = self.local_id();
        let table = self.inner.net.peers();
        let distance = |peer: &PeerId| -> Duration {
            if *peer == me {
                return Duration::ZERO;
            }
            match table.iter().find(|v| v.id == *peer) {
                Some(v) if v.liveness == Liveness::Alive && !self.avoided(peer) => {
                    v.rtt.unwrap_or(Duration::from_secs(1))
                }
                _ => Duration::from_secs(3600),
            }
        };
        let mut order: Vec<(Duration, bool, usize, ChunkId, Vec<PeerId>)> = (0..k + m)
            .filter(|&s| Some(s) != skip)
            .filter_map(|s| {
                let id = record.parts.get(base + s).copied()?;
                let holders = Self::part_holders(record, base + s);
                let nearest = holders.iter().map(distance).min().unwrap_or(Duration::MAX);
                Some((nearest, s >= k, s, id, holders))
            })
            .collect();
        order.sort_by_key(|(d, parity, s, _, _)| (*d, *parity, *s));
        let mut order = order.into_iter();
        let mut shards: Vec<Option<Bytes>> = vec![None; k + m];
        let mut got = 0usize;
        let mut attempts = FuturesUnordered::new();
        let fetch = |(_, _, s, id, holders): (Duration, bool, usize, ChunkId, Vec<PeerId>)| async move {
            (s, self.fetch_chunk(id, holders).await)
        };
        for next in order.by_ref().take(k) {
            attempts.push(fetch(next));
        }
        let mut last_error = String::from("no shard holder is known");
        while got < k {
            let hedge = tokio::time::sleep(self.inner.settings.hedge_after);
            tokio::pin!(hedge);
            tokio::select! {
                done = attempts.next() => {
                    let Some((s, result)) = done else {
                        return Err(MeshError::ChunkUnavailable {
                            chunk: chunk.id,
                            reason: format!("only {got} of the {k} shards needed could be read ({last_error})"),
                        });
                    };
                    match result {
                        Ok(bytes) => {
                            shards[s] = Some(bytes);
                            got += 1;
                        }
                        Err(e) => {
                            debug!(chunk = %chunk.id, shard = s, error = %e, "shard unreadable; trying another");
                            last_error = e.to_string();
                            if let Some(next) = order.next() {
                                attempts.push(fetch(next));
                            }
                        }
                    }
                }
                () = &mut hedge, if got + attempts.len() <= k => {
                    if let Some(next) = order.next() {
                        self.inner.metrics.hedged_fetches().increment(1);
                        attempts.push(fetch(next));
                    }
                }
            }
        }
        drop(attempts);
        let len = chunk.len as usize;
        let decoded =
            tokio::task::spawn_blocking(move || crate::erasure::decode(k, m, shards, len))
                .await
                .map_err(|_| IngestError::WorkerGone)?
                .map_err(|e| MeshError::ChunkUnavailable {
                    chunk: chunk.id,
                    reason: e.to_string(),
                })?;
        if ChunkId::of(&decoded) != chunk.id {
            return Err(MeshError::ChunkUnavailable {
                chunk: chunk.id,
                reason: "its shards decode to other bytes (the record names wrong shards)".into(),
            });
        }
        Ok(decoded)
    }

    /// A verified copy of part `index` of an object that does not come from this node's own
    /// copy: a replica from another holder (`rep:N`), or a shard fetched from another holder
    /// or rebuilt from K others (`ec:K+M`). For replacing a corrupt local copy.
    pub async fn recover_part(
        &self,
        manifest: &Manifest,
        record: &PlacementRecord,
        index: usize,
    ) -> Result<Bytes, MeshError> {
        self.part_bytes(manifest, record, index, false).await
    }

    /// A verified copy of part `index`; this node's own copy counts when `local` is set.
    pub(crate) async fn part_bytes(
        &self,
        manifest: &Manifest,
        record: &PlacementRecord,
        index: usize,
        local: bool,
    ) -> Result<Bytes, MeshError> {
        let id =
            record
                .part_id(&manifest.chunks, index)
                .ok_or_else(|| MeshError::ChunkUnavailable {
                    chunk: ChunkId::of(&[]),
                    reason: format!("part {index} is out of range"),
                })?;
        let me = self.local_id();
        let holders: Vec<PeerId> = Self::part_holders(record, index)
            .into_iter()
            .filter(|p| *p != me)
            .collect();
        let Redundancy::Erasure { data, parity } = record.redundancy else {
            return if local {
                self.fetch_chunk(id, holders).await
            } else {
                self.fetch_remote(id, holders).await
            };
        };
        // A shard usually has one holder; when another has it too, copying beats rebuilding.
        let copied = if local {
            self.fetch_chunk(id, holders).await
        } else if holders.is_empty() {
            Err(MeshError::ChunkUnavailable {
                chunk: id,
                reason: "no other holder".into(),
            })
        } else {
            self.fetch_remote(id, holders).await
        };
        if let Ok(bytes) = copied {
            return Ok(bytes);
        }
        let (k, m) = (usize::from(data), usize::from(parity));
        let (chunk_index, shard) = (index / (k + m), index % (k + m));
        let chunk = *manifest
            .chunks
            .get(chunk_index)
            .ok_or(MeshError::ChunkUnavailable {
                chunk: id,
                reason: format!("chunk {chunk_index} is out of range"),
            })?;
        let bytes = self
            .fetch_erasure_chunk(chunk, chunk_index, record, Some(shard))
            .await?;
        let rebuilt = tokio::task::spawn_blocking(move || crate::erasure::encode(k, m, &bytes))
            .await
            .map_err(|_| IngestError::WorkerGone)?
            .map_err(|e| MeshError::ChunkUnavailable {
                chunk: id,
                reason: e.to_string(),
            })?;
        match rebuilt.into_iter().nth(shard) {
            Some(bytes) if ChunkId::of(&bytes) == id => {
                self.inner.metrics.rebuilt_shards().increment(1);
                Ok(bytes)
            }
            _ => Err(MeshError::ChunkUnavailable {
                chunk: id,
                reason: "the rebuilt shard does not match its id".into(),
            }),
        }
    }

    /// Streams the planned parts of an object, fetching up to `read_ahead` chunks ahead. The
    /// window opens from one chunk, doubling with each chunk delivered: the first chunk does
    /// not share the link with a full window of others, so the first byte comes after about
    /// one chunk's transfer, and the window is full after a handful of chunks. Chunks of an
    /// `ec:K+M` object are decoded from their shards.
    pub fn read_stream(
        &self,
        manifest: &Manifest,
        record: Option<PlacementRecord>,
        plan: Vec<(usize, ChunkId, std::ops::Range<usize>)>,
        read_ahead: usize,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + use<> {
        let this = self.clone();
        let record = record.map(Arc::new);
        let lens: Vec<u32> = plan
            .iter()
            .map(|(index, _, _)| manifest.chunks.get(*index).map_or(0, |c| c.len))
            .collect();
        let fetches = plan
            .into_iter()
            .zip(lens)
            .map(move |((index, id, part), len)| {
                let this = this.clone();
                let record = record.clone();
                async move {
                    let erasure = record
                        .as_ref()
                        .filter(|r| matches!(r.redundancy, Redundancy::Erasure { .. }));
                    let fetched = match erasure {
                        Some(record) => {
                            this.fetch_erasure_chunk(ChunkRef { id, len }, index, record, None)
                                .await
                        }
                        None => {
                            let holders = record
                                .as_ref()
                                .map(|r| Self::part_holders(r, index))
                                .unwrap_or_default();
                            this.fetch_chunk(id, holders).await
                        }
                    };
                    let bytes = fetched.map_err(|e| std::io::Error::other(e.to_string()))?;
                    let part = bytes.slice(part);
                    this.inner.metrics.get_bytes().increment(part.len() as u64);
                    Ok(part)
                }
            });
        ramped(fetches, read_ahead)
    }

    /// Serves other nodes' chunk and control requests until the channel closes.
    pub async fn serve(self, mut inbound: mpsc::Receiver<Inbound>) {
        let workers = Arc::new(Semaphore::new(INBOUND_WORKERS));
        while let Some(request) = inbound.recv().await {
            let Ok(permit) = Arc::clone(&workers).acquire_owned().await else {
                break;
            };
            let this = self.clone();
            tokio::spawn(async move {
                match request {
                    Inbound::Chunk {
                        peer,
                        request,
                        reply,
                    } => reply.send(this.answer_chunk(peer, request).await).await,
                    Inbound::Control {
                        peer,
                        request,
                        reply,
                    } => reply.send(this.answer_control(peer, request).await).await,
                }
                drop(permit);
            });
        }
        // Wait for the requests being answered, so the store is released with the service.
        let _ = workers.acquire_many(INBOUND_WORKERS as u32).await;
    }

    async fn answer_chunk(
        &self,
        peer: PeerId,
        request: Frame<ChunkRequest>,
    ) -> Frame<ChunkResponse> {
        if let ChunkRequest::Copy { id, from } = request.header {
            return self.answer_copy(peer, id, from).await;
        }
        let store = Arc::clone(&self.inner.store);
        let min_free = self.inner.settings.min_free_bytes;
        let result = tokio::task::spawn_blocking(move || match request.header {
            ChunkRequest::Store { id } => {
                if disk_free(store.path()) < min_free {
                    return Ok(chunk_refused(Refusal::Full, "disk is full".into()));
                }
                match store.put_chunk_verified(&id, &request.payload) {
                    Ok(stored) => Ok(Frame::new(ChunkResponse::Stored { new: stored.new })),
                    Err(StoreError::HashMismatch { .. }) => Ok(chunk_refused(
                        Refusal::BadRequest,
                        format!("the bytes sent do not hash to {id}"),
                    )),
                    Err(e) => Err(e),
                }
            }
            ChunkRequest::Fetch { id } => Ok(match store.get_chunk(&id)? {
                Some(bytes) => Frame::with_payload(ChunkResponse::Data, bytes),
                None => Frame::new(ChunkResponse::NotFound),
            }),
            ChunkRequest::Has { ids } => {
                if ids.len() > mesh_proto::wire::MAX_HAS_IDS {
                    return Ok(chunk_refused(Refusal::BadRequest, "too many ids".into()));
                }
                let present = ids
                    .iter()
                    .map(|id| store.has_chunk(id))
                    .collect::<Result<Vec<bool>, _>>()?;
                Ok(Frame::new(ChunkResponse::Has { present }))
            }
            ChunkRequest::Copy { .. } => Ok(chunk_refused(
                Refusal::Internal,
                "copy requests are answered apart".into(),
            )),
        })
        .await;
        match result {
            Ok(Ok(mut frame)) => {
                if let ChunkResponse::Data = frame.header {
                    if self
                        .inner
                        .serve_corrupt
                        .load(std::sync::atomic::Ordering::Relaxed)
                    {
                        let mut bytes = frame.payload.to_vec();
                        if let Some(first) = bytes.first_mut() {
                            *first ^= 0xff;
                        }
                        frame.payload = Bytes::from(bytes);
                    }
                    self.inner.metrics.served(frame.payload.len() as u64);
                }
                frame
            }
            Ok(Err(e)) => {
                warn!(%peer, error = %e, "chunk request failed");
                chunk_refused(Refusal::Internal, e.to_string())
            }
            Err(_) => chunk_refused(Refusal::Internal, "worker failed".into()),
        }
    }

    /// `Copy`: fetches the chunk from the holders named (verified, nearest first, hedged)
    /// and stores it, unless it is here already.
    async fn answer_copy(
        &self,
        peer: PeerId,
        id: ChunkId,
        from: Vec<NodeId>,
    ) -> Frame<ChunkResponse> {
        use mesh_proto::wire::MAX_COPY_SOURCES;
        if from.is_empty() || from.len() > MAX_COPY_SOURCES {
            return chunk_refused(
                Refusal::BadRequest,
                format!(
                    "a copy names 1 to {MAX_COPY_SOURCES} holders, not {}",
                    from.len()
                ),
            );
        }
        let Ok(sources) = from
            .iter()
            .map(|n| PeerId::from_bytes(&n.0))
            .collect::<Result<Vec<PeerId>, _>>()
        else {
            return chunk_refused(Refusal::BadRequest, "a holder's peer id is invalid".into());
        };
        let Ok(_permit) = Arc::clone(&self.inner.copies).try_acquire_owned() else {
            return chunk_refused(Refusal::Busy, "too many copies in flight".into());
        };
        let store = Arc::clone(&self.inner.store);
        let min_free = self.inner.settings.min_free_bytes;
        let here = tokio::task::spawn_blocking(move || {
            if disk_free(store.path()) < min_free {
                return Ok(None);
            }
            store.has_chunk(&id).map(Some)
        })
        .await;
        match here {
            Ok(Ok(Some(true))) => return Frame::new(ChunkResponse::Stored { new: false }),
            Ok(Ok(Some(false))) => {}
            Ok(Ok(None)) => return chunk_refused(Refusal::Full, "disk is full".into()),
            Ok(Err(e)) => return chunk_refused(Refusal::Internal, e.to_string()),
            Err(_) => return chunk_refused(Refusal::Internal, "worker failed".into()),
        }
        // The sender is no source: it asked because it does not hold the chunk.
        let sources = sources.into_iter().filter(|p| *p != peer).collect();
        // A background copy is not hedged: on a busy holder a second transfer of the same
        // chunk only adds to the load that made the first one slow.
        let data = match self.fetch_from(id, sources, None).await {
            Ok(data) => data,
            Err(e) => {
                debug!(%peer, chunk = %id, error = %e, "cannot copy a chunk");
                return Frame::new(ChunkResponse::NotFound);
            }
        };
        // `fetch_remote` hashed the bytes to `id` already.
        let store = Arc::clone(&self.inner.store);
        match tokio::task::spawn_blocking(move || store.put_chunk_hashed(&id, &data)).await {
            Ok(Ok(new)) => {
                self.inner.metrics.copied_chunks().increment(1);
                Frame::new(ChunkResponse::Stored { new })
            }
            Ok(Err(e)) => {
                warn!(%peer, chunk = %id, error = %e, "cannot store a copied chunk");
                chunk_refused(Refusal::Internal, e.to_string())
            }
            Err(_) => chunk_refused(Refusal::Internal, "worker failed".into()),
        }
    }

    /// `PutObject` and `KeepObject`: keeps an object's manifest (`payload`) and placement
    /// record here, as one of its holders, and announces the object unless told not to.
    async fn answer_put_object(
        &self,
        peer: PeerId,
        record: PlacementRecord,
        payload: Bytes,
        announce: bool,
    ) -> Frame<ControlResponse> {
        let store = Arc::clone(&self.inner.store);
        let me = NodeId(self.local_id().to_bytes());
        let object = record.object;
        let manifest = match Manifest::decode_verified(&object, &payload) {
            Ok(m) => m,
            Err(e) => return control_refused(Refusal::BadRequest, format!("bad manifest: {e}")),
        };
        if let Err(e) = record.validate(manifest.chunks.len()) {
            return control_refused(Refusal::BadRequest, format!("bad placement record: {e}"));
        }
        let result =
            tokio::task::spawn_blocking(move || keep_record(&store, &me, &manifest, &record)).await;
        match result {
            // Older than the record kept here (a tombstone, say): nothing to announce.
            Ok(Ok(None)) => Frame::new(ControlResponse::Stored),
            Ok(Ok(Some(missing))) => {
                if !missing.is_empty() {
                    // Expected while the writer's background completion is still
                    // sending them; it sends the record again after the last one.
                    debug!(%peer, %object, missing = missing.len(), "placement record names chunks not here yet");
                }
                // The writer waits for its own announcement; a holder's only adds
                // providers, so the writer is not kept waiting for it.
                if announce {
                    self.inner.net.provide(object).await;
                }
                Frame::new(ControlResponse::Stored)
            }
            Ok(Err(e)) => control_refused(Refusal::Internal, e.to_string()),
            Err(_) => control_refused(Refusal::Internal, "worker failed".into()),
        }
    }

    async fn answer_control(
        &self,
        peer: PeerId,
        request: Frame<ControlRequest>,
    ) -> Frame<ControlResponse> {
        let store = Arc::clone(&self.inner.store);
        match request.header {
            ControlRequest::Job(request) => {
                let Some(jobs) = self.inner.jobs.get() else {
                    return control_refused(Refusal::Busy, "jobs are not running here yet".into());
                };
                let (reply, answer) = oneshot::channel();
                let call = JobCall {
                    peer,
                    request,
                    reply,
                };
                if jobs.send(call).await.is_err() {
                    return control_refused(Refusal::Busy, "jobs stopped".into());
                }
                match answer.await {
                    Ok(response) => Frame::new(ControlResponse::Job(response)),
                    Err(_) => {
                        control_refused(Refusal::Internal, "job service dropped the request".into())
                    }
                }
            }
            ControlRequest::PutObject { record } => {
                self.answer_put_object(peer, record, request.payload, true)
                    .await
            }
            ControlRequest::KeepObject { record } => {
                self.answer_put_object(peer, record, request.payload, false)
                    .await
            }
            ControlRequest::DeleteObject { record } => self.answer_delete(peer, record).await,
            ControlRequest::GetObject { id } => {
                let result = tokio::task::spawn_blocking(move || {
                    let manifest = store.manifest(&id)?;
                    let record = store.record(&id)?;
                    Ok::<_, StoreError>((manifest, record))
                })
                .await;
                match result {
                    Ok(Ok((Some((_, bytes)), Some(record)))) => {
                        match PlacementRecord::decode(&record) {
                            Ok(record) => Frame::with_payload(
                                ControlResponse::Object { record },
                                Bytes::from(bytes),
                            ),
                            Err(e) => control_refused(
                                Refusal::Internal,
                                format!("stored record unreadable: {e}"),
                            ),
                        }
                    }
                    Ok(Ok(_)) => Frame::new(ControlResponse::NotFound),
                    Ok(Err(e)) => control_refused(Refusal::Internal, e.to_string()),
                    Err(_) => control_refused(Refusal::Internal, "worker failed".into()),
                }
            }
        }
    }
}

/// This node's share of a put goes through one blocking writer that holds the upload (and
/// so pins the chunks until the commit).
fn spawn_local_writer(
    store: Arc<RocksStore>,
    mut rx: mpsc::Receiver<LocalChunk>,
) -> tokio::task::JoinHandle<Upload> {
    tokio::task::spawn_blocking(move || {
        let mut upload = store.begin_upload();
        while let Some((id, data, reply)) = rx.blocking_recv() {
            // The id was hashed from these bytes on this node: hashing them again would be
            // a fourth BLAKE3 pass over every byte of a rep:3 put.
            let _ = reply.send(upload.put_hashed(id, &data));
        }
        upload
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_ramped_window_starts_at_one_doubles_and_keeps_the_order() {
        let running = Arc::new(AtomicUsize::new(0));
        let peaks = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..20).map(|i| {
            let running = Arc::clone(&running);
            let peaks = Arc::clone(&peaks);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                lock(&peaks).push(now);
                // Later tasks finish first, so order comes from the stream, not from timing.
                tokio::time::sleep(Duration::from_millis(20 - i)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                i
            }
        });
        let out: Vec<u64> = ramped(tasks, 8).collect().await;
        assert_eq!(out, (0..20).collect::<Vec<u64>>());
        let peaks = lock(&peaks).clone();
        // The first task runs alone; the window never exceeds its maximum.
        assert_eq!(peaks[0], 1);
        assert!(peaks.iter().all(|&p| p <= 8), "{peaks:?}");
        assert!(
            peaks.contains(&8),
            "the window never opened fully: {peaks:?}"
        );
    }
}
