//! The control API: HTTP + JSON on `api_addr`, the interface `meshctl` drives.
//!
//! Handlers are thin: they check input, call [`crate::objects`] or the store on the blocking
//! pool, and map errors to an [`ErrorBody`] with a status. Uploads stream the request body
//! through the chunker; downloads stream verified chunks with `Range` support. Every route but
//! `/health` and `/metrics` requires the bearer token, compared in constant time; a bad or
//! missing token gets a bare 401.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::TryStreamExt;
use mesh_proto::api::{
    ChunkStat, DeleteResponse, ErrorBody, ErrorCode, HolderStat, ListQuery, ListResponse,
    MAX_LIST_LIMIT, PeerLoad, PeerSummary, PeersResponse, PutQuery, PutResponse,
    ScrubStartResponse, ScrubStatus, ShardStat, StatResponse, StatusResponse,
};
use mesh_proto::{ChunkerSpec, ObjectId, Redundancy};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use tokio_util::io::StreamReader;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::objects::{self, ByteRange, IngestError, PutOptions};
use crate::replicate::{Mesh, MeshError};
use crate::store::{MetaStore, RocksStore, StoreError};

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
    /// Status and start of scrub passes (`/v1/scrub`); see [`ApiState::with_scrub`].
    scrub: Option<crate::scrub::Handle>,
    /// The job coordinator (`/v1/jobs`) and worker; see [`ApiState::with_jobs`].
    jobs: Option<(
        crate::jobs::coordinator::Coordinator,
        crate::jobs::worker::Worker,
    )>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("api_addr", &self.inner.api_addr)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<RocksStore>,
    mesh: Mesh,
    metrics: Metrics,
    config: Config,
    token: String,
    node_id: String,
    api_addr: String,
    started: Instant,
    uploads: Semaphore,
}

impl ApiState {
    pub fn new(
        store: Arc<RocksStore>,
        mesh: Mesh,
        metrics: Metrics,
        config: Config,
        token: String,
        node_id: String,
        api_addr: String,
    ) -> Self {
        let uploads = Semaphore::new(config.api.max_concurrent_uploads);
        Self {
            inner: Arc::new(Inner {
                store,
                mesh,
                metrics,
                config,
                token,
                node_id,
                api_addr,
                started: Instant::now(),
                uploads,
            }),
            scrub: None,
            jobs: None,
        }
    }
}

impl ApiState {
    /// Serves the scrubber's status and start switch.
    pub fn with_scrub(mut self, scrub: crate::scrub::Handle) -> Self {
        self.scrub = Some(scrub);
        self
    }

    /// Serves job submission and reports.
    pub fn with_jobs(
        mut self,
        coordinator: crate::jobs::coordinator::Coordinator,
        worker: crate::jobs::worker::Worker,
    ) -> Self {
        self.jobs = Some((coordinator, worker));
        self
    }

    fn jobs(&self) -> Result<crate::jobs::coordinator::Coordinator, ApiError> {
        self.jobs.as_ref().map(|(c, _)| c.clone()).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "this node runs no job service",
            )
        })
    }

    fn scrub(&self) -> Result<crate::scrub::Handle, ApiError> {
        self.scrub.clone().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "this node has no scrubber",
            )
        })
    }
}

/// The router with every route, the auth layer and the latency layer.
pub fn router(state: ApiState) -> Router {
    let authed = Router::new()
        .route("/v1/objects", get(list_objects).post(put_object))
        .route("/v1/objects/{id}", get(get_object).delete(delete_object))
        .route("/v1/objects/{id}/manifest", get(get_manifest))
        .route("/v1/objects/{id}/stat", get(stat_object))
        .route("/v1/status", get(status))
        .route("/v1/repair", get(repair))
        .route("/v1/peers", get(peers))
        .route("/v1/scrub", get(scrub_status).post(scrub_start))
        .route("/v1/jobs", get(list_jobs).post(submit_job))
        .route("/v1/jobs/{id}", get(job_status).delete(forget_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .merge(authed)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_latency,
        ))
        .with_state(state)
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                code,
                message: message.into(),
            },
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    fn not_found(id: &ObjectId) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("object {id} not found"),
        )
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body.clone())).into_response();
        // Read by the latency layer, which counts errors by code.
        response.extensions_mut().insert(self.body.code);
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt { .. } | StoreError::Lost { .. } => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Corrupt,
                e.to_string(),
            ),
            StoreError::DiskFull(_) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                ErrorCode::DiskFull,
                e.to_string(),
            ),
            StoreError::HashMismatch { .. } => Self::bad_request(e.to_string()),
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Store(e) => e.into(),
            IngestError::Chunk(e @ crate::chunker::ChunkError::RecordTooLarge { .. }) => {
                Self::bad_request(e.to_string())
            }
            IngestError::Chunk(e) => Self::bad_request(format!("upload did not complete: {e}")),
            IngestError::Manifest(e) => Self::bad_request(e.to_string()),
            IngestError::WorkerGone => Self::internal(e.to_string()),
        }
    }
}

impl From<MeshError> for ApiError {
    fn from(e: MeshError) -> Self {
        match e {
            MeshError::NotFound(id) => Self::not_found(&id),
            MeshError::QuorumFailed { .. } | MeshError::ChunkUnavailable { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                e.to_string(),
            ),
            MeshError::Ingest(e) => e.into(),
            MeshError::Store(e) => e.into(),
            MeshError::Invalid(reason) => Self::internal(reason),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::internal(format!("store task failed: {e}"))
    }
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(state.inner.token.as_bytes())) {
        next.run(request).await
    } else {
        state.inner.metrics.api_error("unauthorized");
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "unauthorized",
        )
        .into_response();
        response.extensions_mut().remove::<ErrorCode>();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }
}

async fn record_latency(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| format!("{} {}", request.method(), p.as_str()))
        .unwrap_or_else(|| "unmatched".to_owned());
    let start = Instant::now();
    let response = next.run(request).await;
    let metrics = &state.inner.metrics;
    metrics.request_latency(route, start.elapsed());
    if let Some(code) = response.extensions().get::<ErrorCode>() {
        metrics.api_error(error_code_label(*code));
    }
    response
}

fn error_code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::NotFound => "not_found",
        ErrorCode::Corrupt => "corrupt",
        ErrorCode::DiskFull => "disk_full",
        ErrorCode::RangeNotSatisfiable => "range_not_satisfiable",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Internal => "internal",
    }
}

fn parse_id(path: Result<Path<String>, PathRejection>) -> Result<ObjectId, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    raw.parse()
        .map_err(|e| ApiError::bad_request(format!("bad object id {raw:?}: {e}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// How much of a refused upload's body the node still reads, and for how long, so that the
/// client sees the error response instead of a broken pipe while it is still sending.
const DRAIN_LIMIT: u64 = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

async fn put_object(
    State(state): State<ApiState>,
    query: Result<Query<PutQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<PutResponse>, ApiError> {
    let mut reader = StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let result = put_object_from(&state, query, &mut reader).await;
    if result.is_err() {
        // Lingering read: an HTTP/1 client that is still writing the body when the
        // response arrives would otherwise fail with EPIPE and never read our message.
        let mut rest = (&mut reader).take(DRAIN_LIMIT);
        let _ = tokio::time::timeout(
            DRAIN_TIME,
            tokio::io::copy(&mut rest, &mut tokio::io::sink()),
        )
        .await;
    }
    result
}

async fn put_object_from<R: AsyncRead + Unpin + Send>(
    state: &ApiState,
    query: Result<Query<PutQuery>, QueryRejection>,
    reader: R,
) -> Result<Json<PutResponse>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let inner = &state.inner;
    let redundancy = query.redundancy.unwrap_or(inner.config.redundancy);
    let chunker = match &query.chunker {
        Some(spec) => spec
            .parse::<ChunkerSpec>()
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        None => inner.config.chunker,
    };
    let chunker = match (query.records, chunker) {
        (None, chunker) => chunker,
        (Some(format), ChunkerSpec::Cdc { min, avg, max }) => ChunkerSpec::Records {
            format,
            min,
            avg,
            max,
        },
        (Some(format), _) => ChunkerSpec::records(format),
    };
    if query
        .name
        .as_ref()
        .is_some_and(|n| n.len() > mesh_proto::manifest::MAX_NAME_LEN)
    {
        return Err(ApiError::bad_request(
            "object name is longer than 4096 bytes",
        ));
    }
    let _permit = inner.uploads.acquire().await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "node is shutting down",
        )
    })?;
    let options = PutOptions {
        name: query.name,
        redundancy,
        chunker,
        created_ms: None,
    };
    let quorum = query
        .quorum
        .map_or_else(|| redundancy.default_write_quorum(), usize::from);
    // An erasure-coded chunk needs K shards to be readable at all; the quorum keeps one more
    // so that a single lost holder right after the put loses nothing.
    let min_quorum = match redundancy {
        Redundancy::Replicas(_) => 1,
        Redundancy::Erasure { .. } => redundancy.default_write_quorum(),
    };
    if quorum < min_quorum || quorum > redundancy.width() {
        return Err(ApiError::bad_request(format!(
            "quorum {quorum} is outside {min_quorum}..={} for {redundancy}",
            redundancy.width()
        )));
    }
    let response = inner.mesh.put(reader, options, quorum).await?;
    info!(object = %response.id, size = response.size, chunks = response.chunks, new_chunks = response.new_chunks, "stored object");
    Ok(Json(response))
}

async fn list_objects(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(1000).clamp(1, MAX_LIST_LIMIT);
    let store = Arc::clone(&state.inner.store);
    let after = query.after;
    let objects = blocking(move || store.list_objects(after.as_ref(), limit + 1)).await?;
    let (objects, next) = if objects.len() > limit {
        let page = objects[..limit].to_vec();
        let next = page.last().map(|o| o.id);
        (page, next)
    } else {
        (objects, None)
    };
    Ok(Json(ListResponse { objects, next }))
}

async fn get_manifest(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(path)?;
    // From this node or, for an object it does not hold, from a provider.
    let (manifest, _) = state.inner.mesh.open(id).await?;
    let bytes = manifest.encode();
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn get_object(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(path)?;
    let inner = &state.inner;
    let (manifest, record) = inner.mesh.open(id).await?;
    let size = manifest.size;
    let range = match headers.get(header::RANGE).map(|v| v.to_str().unwrap_or("")) {
        None => None,
        Some(value) => match parse_range(value, size) {
            RangeRequest::Satisfiable(r) => Some(r),
            RangeRequest::Ignore => None,
            RangeRequest::Unsatisfiable => {
                let mut response = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    ErrorCode::RangeNotSatisfiable,
                    format!("range {value:?} is outside the object's {size} bytes"),
                )
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(response);
            }
        },
    };
    let span = range.clone().unwrap_or(0..size);
    let plan = objects::read_plan(&manifest, &span);
    inner.metrics.gets().increment(1);
    // Reads from other nodes are bound by round trips: keep more of them in flight.
    let me = inner.mesh.network().local_node_id();
    let remote = record
        .as_ref()
        .is_some_and(|r| r.chunks_held_by(&me).len() < manifest.chunks.len());
    let window = if remote {
        inner.config.net.fetch_window
    } else {
        inner.config.api.read_ahead_chunks
    };
    let stream = inner.mesh.read_stream(&manifest, record, plan, window);
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(span.end - span.start),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{id}\"")) {
        h.insert(header::ETAG, etag);
    }
    if let Some(r) = range {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end - 1)) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

/// The outcome of reading a `Range` header against an object of a known size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    Satisfiable(ByteRange),
    /// Not a single byte range we serve (multiple ranges, other units, malformed): RFC 9110
    /// lets a server answer with the whole representation.
    Ignore,
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n`.
pub fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignore;
    };
    if spec.contains(',') {
        return RangeRequest::Ignore;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignore;
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    let range = match (first.is_empty(), last.is_empty()) {
        (true, true) => return RangeRequest::Ignore,
        (true, false) => match parse(last) {
            Some(0) => return RangeRequest::Unsatisfiable,
            Some(n) => size.saturating_sub(n)..size,
            None => return RangeRequest::Ignore,
        },
        (false, _) => {
            let Some(start) = parse(first) else {
                return RangeRequest::Ignore;
            };
            let end = if last.is_empty() {
                size
            } else {
                match parse(last) {
                    Some(l) if l >= start => l.saturating_add(1).min(size),
                    _ => return RangeRequest::Ignore,
                }
            };
            start..end
        }
    };
    if range.start >= size || range.is_empty() {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Satisfiable(range)
    }
}

async fn stat_object(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<StatResponse>, ApiError> {
    let id = parse_id(path)?;
    let mesh = &state.inner.mesh;
    let (manifest, record) = mesh.open(id).await?;
    let network = mesh.network();
    let me = network.local_peer_id();
    let peers = network.peers();
    let store = Arc::clone(&state.inner.store);
    let local_summary = blocking(move || store.object(&id)).await?;
    let object = local_summary.unwrap_or_else(|| mesh_proto::api::ObjectSummary {
        id,
        name: manifest.name.clone(),
        size: manifest.size,
        chunks: manifest.chunks.len() as u64,
        redundancy: manifest.redundancy,
        created_ms: manifest.created_ms,
    });
    let describe = |peer: libp2p::PeerId| {
        if peer == me {
            return HolderStat {
                id: peer.to_string(),
                zone: network.zone().to_owned(),
                rtt_ms: None,
                liveness: "self".into(),
            };
        }
        match peers.iter().find(|p| p.id == peer) {
            Some(view) => HolderStat {
                id: peer.to_string(),
                zone: view.zone.clone(),
                rtt_ms: view.rtt.map(|d| d.as_secs_f64() * 1000.0),
                liveness: match view.liveness {
                    crate::placement::Liveness::Alive => "alive",
                    crate::placement::Liveness::Suspect => "suspect",
                    crate::placement::Liveness::Dead => "dead",
                }
                .into(),
            },
            None => HolderStat {
                id: peer.to_string(),
                zone: String::new(),
                rtt_ms: None,
                liveness: "unknown".into(),
            },
        }
    };
    let holders_of = |part: usize| -> Vec<libp2p::PeerId> {
        match &record {
            Some(record) => record
                .holders_of(part)
                .filter_map(|n| libp2p::PeerId::from_bytes(&n.0).ok())
                .collect(),
            None => vec![me],
        }
    };
    let live = |placed: &[HolderStat]| {
        placed
            .iter()
            .filter(|h| h.liveness == "self" || h.liveness == "alive")
            .count()
    };
    let width = manifest.redundancy.width();
    let erasure = record.as_ref().filter(|r| !r.parts.is_empty());
    let mut chunks = Vec::with_capacity(manifest.chunks.len());
    let mut meets_target = true;
    for (index, (offset, chunk)) in manifest.chunk_offsets().enumerate() {
        let (holder_ids, shards) = match erasure {
            None => (holders_of(index), Vec::new()),
            Some(record) => {
                let shards: Vec<ShardStat> = (index * width..(index + 1) * width)
                    .map(|part| ShardStat {
                        id: record.parts.get(part).copied().unwrap_or(chunk.id),
                        placed: holders_of(part).into_iter().map(describe).collect(),
                    })
                    .collect();
                let ids = (index * width..(index + 1) * width)
                    .flat_map(holders_of)
                    .collect();
                (ids, shards)
            }
        };
        let placed: Vec<HolderStat> = holder_ids.iter().map(|p| describe(*p)).collect();
        meets_target &= if shards.is_empty() {
            live(&placed) >= width
        } else {
            shards.iter().all(|s| live(&s.placed) >= 1)
        };
        chunks.push(ChunkStat {
            id: chunk.id,
            offset,
            len: chunk.len,
            holders: holder_ids.iter().map(ToString::to_string).collect(),
            placed,
            shards,
        });
    }
    Ok(Json(StatResponse {
        object,
        chunker: manifest.chunker,
        chunks,
        meets_target,
    }))
}

async fn delete_object(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DeleteResponse>, ApiError> {
    let id = parse_id(path)?;
    // A tombstone applied here and delivered to every holder (`replicate::delete`).
    let deleted = state.inner.mesh.delete(id).await?;
    state.inner.metrics.deletes().increment(1);
    Ok(Json(DeleteResponse {
        id,
        freed_chunks: deleted.released.chunks,
        freed_bytes: deleted.released.bytes,
        holders_told: deleted.told,
        holders_pending: deleted.pending,
    }))
}

async fn repair(State(state): State<ApiState>) -> Json<mesh_proto::api::RepairStatus> {
    Json(state.inner.mesh.repair_state())
}

async fn status(State(state): State<ApiState>) -> Result<Json<StatusResponse>, ApiError> {
    let inner = &state.inner;
    let store = Arc::clone(&inner.store);
    let data_dir = inner.config.data_dir.clone();
    let net = inner.mesh.network().status();
    let peers = inner.mesh.network().peers();
    let me = inner.mesh.network().local_node_id();
    let alive: std::collections::HashSet<Vec<u8>> = peers
        .iter()
        .filter(|p| p.liveness == crate::placement::Liveness::Alive)
        .map(|p| p.id.to_bytes())
        .chain(std::iter::once(me.0.clone()))
        .collect();
    let (stats, below_target, free, total) = blocking(move || {
        let stats = store.stats()?;
        // An object is below target when one of its chunks has fewer live holders (per its
        // placement record, this node included) than its policy wants.
        let mut below = 0u64;
        let mut after = None;
        loop {
            let page = store.list_objects(after.as_ref(), 4096)?;
            for object in &page {
                let width = object.redundancy.width();
                let short = match store.record(&object.id)? {
                    None => width > 1,
                    Some(bytes) => match mesh_proto::wire::PlacementRecord::decode(&bytes) {
                        Err(_) => true,
                        Ok(record) => !record
                            .parts_below_target(|n| alive.contains(&n.0))
                            .is_empty(),
                    },
                };
                below += u64::from(short);
            }
            match page.last() {
                Some(last) => after = Some(last.id),
                None => break,
            }
        }
        let free = fs4::available_space(&data_dir).unwrap_or(0);
        let total = fs4::total_space(&data_dir).unwrap_or(0);
        Ok((stats, below, free, total))
    })
    .await?;
    let mesh = inner.mesh.clone();
    let (completing, deleting) = blocking(move || {
        Ok::<_, StoreError>((mesh.pending_deliveries()?, mesh.pending_tombstones()?))
    })
    .await?;
    let (gc_pending_chunks, gc_pending_bytes) = inner.metrics.gc_backlog();
    let scrub = match state.scrub.clone() {
        Some(scrub) => Some(blocking(move || scrub.status()).await?),
        None => None,
    };
    let (served_chunks, served_bytes) = inner.metrics.served_totals();
    Ok(Json(StatusResponse {
        node_id: inner.node_id.clone(),
        version: mesh_proto::MESH_VERSION.to_owned(),
        data_dir: inner.config.data_dir.display().to_string(),
        api_addr: inner.api_addr.clone(),
        uptime_secs: inner.started.elapsed().as_secs(),
        objects: stats.objects,
        chunks: stats.chunks,
        stored_bytes: stats.bytes,
        disk_free_bytes: free,
        disk_total_bytes: total,
        objects_below_target: below_target,
        default_redundancy: inner.config.redundancy,
        zone: inner.config.net.zone.clone(),
        listen_addrs: net.listen_addrs.iter().map(ToString::to_string).collect(),
        external_addrs: net.external_addrs.iter().map(ToString::to_string).collect(),
        peers: peers.len() as u64,
        peers_alive: peers
            .iter()
            .filter(|p| p.liveness == crate::placement::Liveness::Alive)
            .count() as u64,
        objects_completing: completing as u64,
        repair_backlog: inner.mesh.repair_state().backlog,
        chunks_served: served_chunks,
        bytes_served: served_bytes,
        gc_pending_chunks,
        gc_pending_bytes,
        deletes_delivering: deleting as u64,
        scrub,
    }))
}

async fn scrub_status(State(state): State<ApiState>) -> Result<Json<ScrubStatus>, ApiError> {
    let scrub = state.scrub()?;
    Ok(Json(blocking(move || scrub.status()).await?))
}

/// Starts a scrub pass unless one runs; answers at once (the pass goes on in the background).
async fn scrub_start(State(state): State<ApiState>) -> Result<Json<ScrubStartResponse>, ApiError> {
    let scrub = state.scrub()?;
    let started = scrub
        .request_pass()
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, ErrorCode::BadRequest, e.to_string()))?;
    let status = blocking(move || scrub.status()).await?;
    Ok(Json(ScrubStartResponse { started, status }))
}

impl From<crate::jobs::coordinator::JobError> for ApiError {
    fn from(e: crate::jobs::coordinator::JobError) -> Self {
        use crate::jobs::coordinator::JobError;
        match e {
            JobError::Spec(_) | JobError::Invalid(_) | JobError::InputNotFound(_) => {
                Self::bad_request(e.to_string())
            }
            JobError::NotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
            }
            JobError::Store(e) => e.into(),
            JobError::Mesh(e) => e.into(),
        }
    }
}

fn parse_job_id(path: Result<Path<String>, PathRejection>) -> Result<mesh_proto::JobId, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    raw.parse()
        .map_err(|e| ApiError::bad_request(format!("bad job id {raw:?}: {e}")))
}

/// `POST /v1/jobs`: checks a job spec and starts coordinating it here.
async fn submit_job(
    State(state): State<ApiState>,
    body: Result<Json<mesh_proto::job::JobSubmit>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<mesh_proto::job::SubmitResponse>, ApiError> {
    let Json(submit) =
        body.map_err(|e| ApiError::bad_request(format!("bad job spec: {}", e.body_text())))?;
    Ok(Json(state.jobs()?.submit(submit).await?))
}

async fn list_jobs(
    State(state): State<ApiState>,
) -> Result<Json<mesh_proto::job::JobList>, ApiError> {
    Ok(Json(state.jobs()?.list()))
}

/// Asks the coordinator of a job this node does not coordinate (known from its
/// announcements) for its report, or to cancel it.
async fn ask_coordinator(
    state: &ApiState,
    id: mesh_proto::JobId,
    request: mesh_proto::job::JobRequest,
) -> Result<mesh_proto::job::JobStatus, ApiError> {
    use crate::jobs::coordinator::JobError;
    use mesh_proto::job::JobResponse;
    let not_here = || ApiError::from(JobError::NotFound(id));
    let Some((_, worker)) = &state.jobs else {
        return Err(not_here());
    };
    let Some(coordinator) = worker.coordinator_of(&id) else {
        return Err(not_here());
    };
    match worker.call(coordinator, request).await {
        Ok(JobResponse::Status(report)) => Ok(*report),
        Ok(JobResponse::UnknownJob) => Err(not_here()),
        Ok(other) => Err(ApiError::internal(format!(
            "coordinator {coordinator} answered {other:?}"
        ))),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            format!("job {id} is coordinated by {coordinator}, which cannot be reached: {e}"),
        )),
    }
}

/// `GET /v1/jobs/{id}`: the report, from this node or from the job's coordinator.
async fn job_status(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<mesh_proto::job::JobStatus>, ApiError> {
    use crate::jobs::coordinator::JobError;
    let id = parse_job_id(path)?;
    match state.jobs()?.status(id) {
        Ok(report) => Ok(Json(report)),
        Err(JobError::NotFound(_)) => Ok(Json(
            ask_coordinator(&state, id, mesh_proto::job::JobRequest::Status { job: id }).await?,
        )),
        Err(e) => Err(e.into()),
    }
}

/// `POST /v1/jobs/{id}/cancel`, on this node or the job's coordinator.
async fn cancel_job(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<mesh_proto::job::JobStatus>, ApiError> {
    use crate::jobs::coordinator::JobError;
    let id = parse_job_id(path)?;
    let jobs = state.jobs()?;
    match jobs.cancel(id) {
        Ok(_) => Ok(Json(jobs.status(id)?)),
        Err(JobError::NotFound(_)) => Ok(Json(
            ask_coordinator(&state, id, mesh_proto::job::JobRequest::Cancel { job: id }).await?,
        )),
        Err(e) => Err(e.into()),
    }
}

async fn forget_job(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = parse_job_id(path)?;
    state.jobs()?.forget(id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn peers(State(state): State<ApiState>) -> Json<PeersResponse> {
    let peers = state.inner.mesh.network().peers();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Json(PeersResponse {
        peers: peers
            .iter()
            .map(|p| PeerSummary {
                id: p.id.to_string(),
                zone: p.zone.clone(),
                role: p.role.as_str().to_owned(),
                addrs: p.addrs.iter().map(ToString::to_string).collect(),
                rtt_ms: p.rtt.map(ms),
                rtt_provisional: p.rtt_provisional,
                last_rtt_ms: p.last_rtt.map(ms),
                last_seen_secs_ago: p.last_seen_ago.as_secs_f64(),
                liveness: match p.liveness {
                    crate::placement::Liveness::Alive => "alive",
                    crate::placement::Liveness::Suspect => "suspect",
                    crate::placement::Liveness::Dead => "dead",
                }
                .to_owned(),
                connected: p.connected,
                relayed: p.relayed,
                load: p.load.as_ref().map(|l| PeerLoad {
                    cpu: l.cpu,
                    mem_used: l.mem_used,
                    mem_total: l.mem_total,
                    disk_free: l.disk_free,
                    disk_used: l.disk_used,
                    chunks: l.chunks,
                    bytes: l.bytes,
                    tasks_running: l.tasks_running,
                }),
            })
            .collect(),
    })
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let inner = &state.inner;
    let store = Arc::clone(&inner.store);
    let data_dir = inner.config.data_dir.clone();
    match tokio::task::spawn_blocking(move || {
        (store.stats(), fs4::available_space(&data_dir).unwrap_or(0))
    })
    .await
    {
        Ok((Ok(stats), free)) => {
            inner
                .metrics
                .set_store_gauges(stats.objects, stats.chunks, stats.bytes, free)
        }
        Ok((Err(e), _)) => warn!(error = %e, "reading store counters for metrics failed"),
        Err(e) => warn!(error = %e, "metrics task failed"),
    }
    let net = inner.mesh.network().status();
    inner
        .metrics
        .set_hole_punches(net.hole_punches_succeeded, net.hole_punches_failed);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        inner.metrics.render(),
    )
        .into_response()
}

/// Runs metrics upkeep until `stop` fires.
pub async fn metrics_upkeep(metrics: Metrics, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => metrics.upkeep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_per_rfc_9110() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-99", 1000), Satisfiable(0..100));
        assert_eq!(parse_range("bytes=900-", 1000), Satisfiable(900..1000));
        assert_eq!(parse_range("bytes=-100", 1000), Satisfiable(900..1000));
        assert_eq!(parse_range("bytes=-5000", 1000), Satisfiable(0..1000));
        assert_eq!(parse_range("bytes=990-5000", 1000), Satisfiable(990..1000));
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 1000), Ignore);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Ignore);
        assert_eq!(parse_range("items=0-1", 1000), Ignore);
        assert_eq!(parse_range("bytes=x-1", 1000), Ignore);
    }
}
