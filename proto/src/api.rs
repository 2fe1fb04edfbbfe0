//! Types of the meshd control API (HTTP + JSON), shared by `meshd` and `meshctl`.
//!
//! Routes (all under the node's `--api-addr`; every route but `/health` and `/metrics` needs
//! `Authorization: Bearer <token>`):
//!
//! | method and path                   | request             | response                      |
//! |-----------------------------------|---------------------|-------------------------------|
//! | `GET /health`                     |                     | `ok`                          |
//! | `GET /metrics`                    |                     | Prometheus text               |
//! | `POST /v1/objects`                | [`PutQuery`], body  | [`PutResponse`]               |
//! | `GET /v1/objects`                 | [`ListQuery`]       | [`ListResponse`]              |
//! | `GET /v1/objects/{id}`            | optional `Range`    | the bytes (200 or 206)        |
//! | `GET /v1/objects/{id}/manifest`   |                     | canonical manifest bytes      |
//! | `GET /v1/objects/{id}/stat`       |                     | [`StatResponse`]              |
//! | `DELETE /v1/objects/{id}`         |                     | [`DeleteResponse`]            |
//! | `GET /v1/status`                  |                     | [`StatusResponse`]            |
//! | `GET /v1/scrub`                   |                     | [`ScrubStatus`]               |
//! | `POST /v1/scrub`                  |                     | [`ScrubStartResponse`]        |
//!
//! Errors come back as an HTTP status with an [`ErrorBody`].

use serde::{Deserialize, Serialize};

use crate::id::{ChunkId, ObjectId};
use crate::policy::{ChunkerSpec, RecordFormat, Redundancy};

/// Default address of the control API.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:5080";
/// Name of the token file inside the data directory.
pub const TOKEN_FILE: &str = "api.token";
/// Largest page `GET /v1/objects` returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Query of `POST /v1/objects`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutQuery {
    pub name: Option<String>,
    pub redundancy: Option<Redundancy>,
    /// `cdc`, `cdc:MIN:AVG:MAX` or `fixed:SIZE`.
    pub chunker: Option<String>,
    /// Record-aligned chunking; overrides `chunker`'s kind but keeps its sizes for `cdc`.
    pub records: Option<RecordFormat>,
    /// Holders that must store each chunk before the put succeeds (default: the policy's).
    pub quorum: Option<u8>,
}

/// Answer to a completed upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub id: ObjectId,
    pub size: u64,
    pub chunks: u64,
    /// Chunks that were not stored before this upload (the rest deduplicated).
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// Query of `GET /v1/objects`: a page of objects ordered by id, starting after `after`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub after: Option<ObjectId>,
    pub limit: Option<usize>,
}

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectSummary {
    pub id: ObjectId,
    pub name: Option<String>,
    pub size: u64,
    pub chunks: u64,
    pub redundancy: Redundancy,
    pub created_ms: u64,
}

/// A page of objects; `next` is the `after` for the following page, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    pub objects: Vec<ObjectSummary>,
    pub next: Option<ObjectId>,
}

/// Where one chunk of an object is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkStat {
    pub id: ChunkId,
    pub offset: u64,
    pub len: u32,
    /// Peer ids of the holders known to this node.
    pub holders: Vec<String>,
    /// The same holders with their zone, RTT from the answering node and liveness.
    #[serde(default)]
    pub placed: Vec<HolderStat>,
    /// `ec:K+M` objects: the chunk's K+M shards and where each is; empty for `rep:N`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStat>,
}

/// One shard of an erasure-coded chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStat {
    pub id: ChunkId,
    pub placed: Vec<HolderStat>,
}

/// One holder of a chunk, as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HolderStat {
    pub id: String,
    pub zone: String,
    /// `None` for the answering node itself or a peer not measured yet.
    pub rtt_ms: Option<f64>,
    /// `self`, `alive`, `suspect`, `dead` or `unknown`.
    pub liveness: String,
}

/// Answer of `GET /v1/objects/{id}/stat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatResponse {
    pub object: ObjectSummary,
    pub chunker: ChunkerSpec,
    pub chunks: Vec<ChunkStat>,
    /// Whether every chunk has as many holders as the policy asks for.
    pub meets_target: bool,
}

/// Answer of `DELETE /v1/objects/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub id: ObjectId,
    /// Chunks on the answering node whose last reference this delete released, and their
    /// bytes: deleted after the node's `gc_grace` unless an object references them again.
    pub freed_chunks: u64,
    pub freed_bytes: u64,
    /// Other holders that acknowledged the tombstone before the answer.
    #[serde(default)]
    pub holders_told: u64,
    /// Other holders the tombstone is still being delivered to, in the background.
    #[serde(default)]
    pub holders_pending: u64,
}

/// Answer of `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub node_id: String,
    pub version: String,
    pub data_dir: String,
    pub api_addr: String,
    pub uptime_secs: u64,
    pub objects: u64,
    pub chunks: u64,
    pub stored_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    /// Objects with fewer holders per chunk than their policy asks for.
    pub objects_below_target: u64,
    pub default_redundancy: Redundancy,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub listen_addrs: Vec<String>,
    #[serde(default)]
    pub external_addrs: Vec<String>,
    /// Mesh peers known (any liveness).
    #[serde(default)]
    pub peers: u64,
    /// Of those, alive.
    #[serde(default)]
    pub peers_alive: u64,
    /// Objects this node wrote whose holders beyond the write quorum are still being
    /// completed in the background.
    #[serde(default)]
    pub objects_completing: u64,
    /// Chunks, and their bytes, this node sent to peers that fetched them since it started.
    #[serde(default)]
    pub chunks_served: u64,
    #[serde(default)]
    pub bytes_served: u64,
    /// Objects below target that this node is the repairer of (see `GET /v1/repair`).
    #[serde(default)]
    pub repair_backlog: u64,
    /// Unreferenced chunks, and their bytes, waiting out `gc_grace` before they are deleted
    /// (as of the last garbage collection pass).
    #[serde(default)]
    pub gc_pending_chunks: u64,
    #[serde(default)]
    pub gc_pending_bytes: u64,
    /// Deletes this node made whose tombstone some holders have not acknowledged yet.
    #[serde(default)]
    pub deletes_delivering: u64,
    /// The scrubber's progress (absent from nodes that predate it).
    #[serde(default)]
    pub scrub: Option<ScrubStatus>,
}

/// Answer of `GET /v1/scrub`: what the scrubber (which re-hashes stored chunks and replaces
/// those that went bad) has done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// False when `durability.scrub_rate` is 0: no pass runs, not even on request.
    pub enabled: bool,
    /// Bytes re-hashed per second at most.
    pub rate_bytes_per_sec: u64,
    /// A pass starts this long after the previous one started.
    pub interval_secs: u64,
    /// The pass in progress, or else the last one.
    pub pass: Option<ScrubPass>,
    /// When the last finished pass finished (ms since the Unix epoch).
    pub last_finished_ms: Option<u64>,
    /// When the next pass is due (ms since the Unix epoch); `None` while one runs or when off.
    pub next_pass_ms: Option<u64>,
    /// Chunks stored on the node, what a whole pass checks.
    pub chunks_stored: u64,
    /// Chunks whose bytes went bad and are not replaced yet: reads of them go to other
    /// holders, and every pass tries again to fetch or rebuild them.
    pub quarantined: u64,
    /// Since the store was created: chunks found corrupt, and of those replaced.
    pub corrupt_total: u64,
    pub repaired_total: u64,
    pub passes_completed: u64,
}

/// One scrub pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubPass {
    /// Ms since the Unix epoch.
    pub started_ms: u64,
    /// `None` while the pass runs.
    pub finished_ms: Option<u64>,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Chunks found corrupt in this pass, and of those (or of earlier passes' quarantined
    /// ones) replaced with verified bytes in this pass.
    pub corrupt: u64,
    pub repaired: u64,
}

/// Answer of `POST /v1/scrub`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStartResponse {
    /// False when a pass was already running (it goes on; no second one starts).
    pub started: bool,
    pub status: ScrubStatus,
}

/// Answer of `GET /v1/peers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersResponse {
    pub peers: Vec<PeerSummary>,
}

/// One peer as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerSummary {
    pub id: String,
    pub zone: String,
    /// `storage` or `bootstrap`.
    pub role: String,
    pub addrs: Vec<String>,
    /// EWMA of RTT samples, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// `rtt_ms` is provisional: the connection's first ping, taken while the peer joined,
    /// which reads high (it also pays for the connection's setup); the next ping replaces it.
    #[serde(default)]
    pub rtt_provisional: bool,
    pub last_rtt_ms: Option<f64>,
    pub last_seen_secs_ago: f64,
    /// `alive`, `suspect` or `dead`.
    pub liveness: String,
    pub connected: bool,
    /// Connected only through a relay's circuit (no direct connection).
    #[serde(default)]
    pub relayed: bool,
    pub load: Option<PeerLoad>,
}

/// The last load report of a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerLoad {
    pub cpu: f32,
    pub mem_used: u64,
    pub mem_total: u64,
    pub disk_free: u64,
    pub disk_used: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub tasks_running: u32,
}

/// Machine-readable error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    NotFound,
    Corrupt,
    DiskFull,
    RangeNotSatisfiable,
    Unavailable,
    Internal,
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// `GET /v1/repair`: what the node's repair worker last saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepairStatus {
    /// Objects kept here that have fewer live holders than their policy wants.
    pub below_target: u64,
    /// Of those, the ones this node repairs (it is their lowest holder that is not dead).
    pub backlog: u64,
    /// Parts (replicas or shards) repair has queued for new holders since the node started.
    pub parts_queued: u64,
    /// Bytes of those parts.
    pub bytes_queued: u64,
    /// Seconds from an object going below target to its repair completing, last one.
    pub last_repair_seconds: Option<f64>,
    /// Milliseconds since the epoch of the last completed walk over the records (0: none yet).
    pub last_scan_ms: u64,
    /// Bytes per second background sends are paced at (0 = unthrottled).
    pub rate_bytes_per_sec: u64,
}
