//! Object operations on the local store: ingest a byte stream as an object, and read an
//! object's bytes (or a range of them) back as a stream of verified chunks.
//!
//! Ingest is a two-stage pipeline so both cores work: the caller's task reads the stream and
//! finds cut points; a blocking worker hashes and stores each chunk. A bounded channel between
//! them caps memory at a few chunks whatever the object's size. The object becomes visible only
//! when its manifest commits; if the stream fails or the caller goes away first, the
//! [`Upload`](crate::store::rocks::Upload) is dropped and its unreferenced chunks are removed.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use mesh_proto::api::PutResponse;
use mesh_proto::{ChunkId, ChunkRef, ChunkerSpec, Manifest, ManifestError, Redundancy};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use crate::chunker::{ChunkError, Chunker};
use crate::metrics::Metrics;
use crate::store::{ChunkStore, RocksStore, StoreError};

/// Chunks between the reader and the store writer.
const INGEST_WINDOW: usize = 4;

/// Why a put failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("the store worker stopped unexpectedly")]
    WorkerGone,
}

/// What a put asks for.
#[derive(Debug, Clone)]
pub struct PutOptions {
    pub name: Option<String>,
    pub redundancy: Redundancy,
    pub chunker: ChunkerSpec,
    /// The manifest's creation time; `None` is now. A job's outputs fix it, so that the same
    /// input always makes the same object.
    pub created_ms: Option<u64>,
}

/// Reads `reader` to its end, stores its chunks and commits the object.
pub async fn ingest<R: AsyncRead + Unpin>(
    store: &Arc<RocksStore>,
    metrics: &Metrics,
    reader: R,
    options: PutOptions,
) -> Result<PutResponse, IngestError> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(INGEST_WINDOW);
    let writer_store = Arc::clone(store);
    let writer = tokio::task::spawn_blocking(move || {
        let mut upload = writer_store.begin_upload();
        let mut refs = Vec::new();
        let (mut new_chunks, mut new_bytes, mut dedup_bytes) = (0u64, 0u64, 0u64);
        while let Some(chunk) = rx.blocking_recv() {
            let stored = match upload.put(&chunk) {
                Ok(stored) => stored,
                Err(e) => return (upload, Err(e)),
            };
            let len = chunk.len() as u32;
            if stored.new {
                new_chunks += 1;
                new_bytes += u64::from(len);
            } else {
                dedup_bytes += u64::from(len);
            }
            refs.push(ChunkRef { id: stored.id, len });
        }
        (upload, Ok((refs, new_chunks, new_bytes, dedup_bytes)))
    });

    let mut chunker = Chunker::new(reader, options.chunker);
    let read_result = loop {
        match chunker.next_chunk().await {
            Ok(Some(chunk)) => {
                if tx.send(chunk).await.is_err() {
                    // The writer stopped early with an error; it reports it below.
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    drop(tx);
    let (upload, written) = writer.await.map_err(|_| IngestError::WorkerGone)?;
    let aborted = |upload| {
        metrics.aborted_uploads().increment(1);
        // Releasing touches RocksDB; keep it off the async workers.
        tokio::task::spawn_blocking(move || drop(upload));
    };
    let (refs, new_chunks, new_bytes, dedup_bytes) = match (read_result, written) {
        (Ok(()), Ok(done)) => done,
        (Err(e), _) => {
            aborted(upload);
            return Err(e.into());
        }
        (_, Err(e)) => {
            aborted(upload);
            return Err(e.into());
        }
    };
    let created_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let manifest = Manifest::new(
        options.name,
        options.chunker,
        options.redundancy,
        refs,
        BTreeMap::new(),
        created_ms,
    )?;
    let size = manifest.size;
    let chunks = manifest.chunks.len() as u64;
    let id = tokio::task::spawn_blocking(move || upload.commit(&manifest))
        .await
        .map_err(|_| IngestError::WorkerGone)??;
    metrics.puts().increment(1);
    metrics.put_bytes().increment(size);
    metrics.dedup_bytes().increment(dedup_bytes);
    Ok(PutResponse {
        id,
        size,
        chunks,
        new_chunks,
        new_bytes,
    })
}

/// A byte range `start..end` of an object, resolved from an HTTP `Range` header.
pub type ByteRange = Range<u64>;

/// The chunks covering `range`, each with the part of it to send.
pub fn read_plan(manifest: &Manifest, range: &ByteRange) -> Vec<(usize, ChunkId, Range<usize>)> {
    manifest
        .chunk_offsets()
        .enumerate()
        .filter_map(|(index, (offset, chunk))| {
            let end = offset + u64::from(chunk.len);
            if end <= range.start || offset >= range.end {
                return None;
            }
            let from = range.start.saturating_sub(offset) as usize;
            let to = (range.end.min(end) - offset) as usize;
            Some((index, chunk.id, from..to))
        })
        .collect()
}

/// Streams the planned chunk parts, reading `read_ahead` chunks ahead on the blocking pool.
/// Every chunk is verified by the store; a missing or corrupt chunk ends the stream with an
/// error, so the client sees a short body rather than wrong bytes.
pub fn read_stream(
    store: Arc<RocksStore>,
    metrics: Metrics,
    plan: Vec<(usize, ChunkId, Range<usize>)>,
    read_ahead: usize,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::iter(plan)
        .map(move |(_, id, part)| {
            let store = Arc::clone(&store);
            let metrics = metrics.clone();
            async move {
                let read = tokio::task::spawn_blocking(move || store.get_chunk(&id))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let bytes = match read {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => {
                        return Err(std::io::Error::other(format!("chunk {id} is missing")));
                    }
                    Err(e) => {
                        if matches!(e, StoreError::Corrupt { .. } | StoreError::Lost { .. }) {
                            metrics.corrupt_chunks().increment(1);
                        }
                        return Err(std::io::Error::other(e.to_string()));
                    }
                };
                let part = bytes.slice(part);
                metrics.get_bytes().increment(part.len() as u64);
                Ok(part)
            }
        })
        .buffered(read_ahead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_plan_slices_the_covering_chunks() {
        let chunks = vec![
            ChunkRef {
                id: ChunkId::of(b"a"),
                len: 100,
            },
            ChunkRef {
                id: ChunkId::of(b"b"),
                len: 50,
            },
            ChunkRef {
                id: ChunkId::of(b"c"),
                len: 10,
            },
        ];
        let m = Manifest::new(
            None,
            ChunkerSpec::Fixed { size: 1024 },
            Redundancy::DEFAULT,
            chunks,
            BTreeMap::new(),
            0,
        )
        .unwrap();
        assert_eq!(
            read_plan(&m, &(0..160))
                .iter()
                .map(|(_, _, r)| r.clone())
                .collect::<Vec<_>>(),
            vec![0..100, 0..50, 0..10]
        );
        assert_eq!(
            read_plan(&m, &(99..101)),
            vec![
                (0, ChunkId::of(b"a"), 99..100),
                (1, ChunkId::of(b"b"), 0..1)
            ]
        );
        assert_eq!(
            read_plan(&m, &(150..160)),
            vec![(2, ChunkId::of(b"c"), 0..10)]
        );
        assert!(read_plan(&m, &(160..160)).is_empty());
    }
}
