//! Composing objects: one object made of other objects' chunks, one after another, without
//! moving a byte. A job's result is made this way from its tasks' outputs.
//!
//! The new manifest lists the parts' chunks in order; its placement record lists, for every
//! chunk, the holders the part's record named. Every holder is sent the new record (the same
//! `PutObject` a put sends), keeps references on the chunks it holds and announces the
//! object; a holder that cannot be reached now gets the record from the durable delivery
//! queue. Since the ObjectId hashes the manifest only, the same parts in the same order give
//! the same object wherever those parts happen to be stored.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use libp2p::PeerId;
use mesh_proto::wire::{ControlRequest, NodeId, PlacementRecord};
use mesh_proto::{ChunkRef, ChunkerSpec, Manifest, ObjectId, Redundancy};
use tracing::{debug, warn};

use super::complete::{self, Delivery};
use super::{Mesh, MeshError, now_ms};
use crate::net::Frame;
use crate::objects::IngestError;

/// What a composed object is called and how it is described.
#[derive(Debug, Clone)]
pub struct Composition {
    pub name: Option<String>,
    pub chunker: ChunkerSpec,
    pub redundancy: Redundancy,
    pub metadata: BTreeMap<String, String>,
    pub created_ms: u64,
}

/// Why parts cannot be composed.
fn bad(reason: String) -> MeshError {
    MeshError::Invalid(reason)
}

impl Mesh {
    /// Makes one object of `parts` (manifest and record each), in order, and commits it on
    /// every holder. Parts must share `redundancy`; empty parts add nothing.
    pub async fn compose(
        &self,
        parts: &[(Manifest, PlacementRecord)],
        how: Composition,
    ) -> Result<ObjectId, MeshError> {
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let mut nodes: Vec<NodeId> = Vec::new();
        let mut holders: Vec<Vec<u16>> = Vec::new();
        let mut shard_ids = Vec::new();
        for (manifest, record) in parts {
            if manifest.chunks.is_empty() {
                continue;
            }
            if record.redundancy != how.redundancy {
                return Err(bad(format!(
                    "part {} is stored as {}, not {}",
                    record.object, record.redundancy, how.redundancy
                )));
            }
            record
                .validate(manifest.chunks.len())
                .map_err(|e| bad(format!("part {}: {e}", record.object)))?;
            chunks.extend_from_slice(&manifest.chunks);
            for list in &record.holders {
                let mut mapped = Vec::with_capacity(list.len());
                for &index in list {
                    let node = record.nodes.get(usize::from(index)).ok_or_else(|| {
                        bad(format!("part {} names a holder it lacks", record.object))
                    })?;
                    let at = match nodes.iter().position(|n| n == node) {
                        Some(at) => at,
                        None => {
                            nodes.push(node.clone());
                            nodes.len() - 1
                        }
                    };
                    mapped.push(
                        u16::try_from(at)
                            .map_err(|_| bad("more holders than a record can name".into()))?,
                    );
                }
                holders.push(mapped);
            }
            shard_ids.extend_from_slice(&record.parts);
        }
        let manifest = Manifest::new(
            how.name,
            how.chunker,
            how.redundancy,
            chunks,
            how.metadata,
            how.created_ms,
        )
        .map_err(IngestError::from)?;
        let object = manifest.object_id();
        let me = self.local_id();
        let record = PlacementRecord {
            object,
            version: 1,
            writer: NodeId(me.to_bytes()),
            redundancy: how.redundancy,
            tombstone: false,
            nodes,
            holders,
            parts: shard_ids,
        };
        record
            .validate(manifest.chunks.len())
            .map_err(|e| bad(format!("composed record: {e}")))?;
        let manifest_bytes = Bytes::from(manifest.encode());

        let me_node = NodeId(me.to_bytes());
        let local = record.nodes.contains(&me_node) || manifest.chunks.is_empty();
        if local {
            let store = Arc::clone(&self.inner.store);
            let (m, r, mine) = (manifest.clone(), record.clone(), me_node.clone());
            // Composed before (a coordinator that restarted) or deleted since: kept as it is.
            tokio::task::spawn_blocking(move || super::keep_record(&store, &mine, &m, &r))
                .await
                .map_err(|_| IngestError::WorkerGone)??;
        }
        let peers: Vec<PeerId> = record
            .nodes
            .iter()
            .filter(|n| **n != me_node)
            .filter_map(|n| PeerId::from_bytes(&n.0).ok())
            .collect();
        let sends = peers.iter().map(|&peer| {
            let net = self.inner.net.clone();
            let request = Frame::with_payload(
                ControlRequest::PutObject {
                    record: record.clone(),
                },
                manifest_bytes.clone(),
            );
            async move { (peer, complete::send_record(&net, peer, request).await) }
        });
        let results = futures::future::join_all(sends).await;
        let mut owed: BTreeMap<PeerId, Vec<u32>> = BTreeMap::new();
        for (peer, result) in results {
            if let Err(e) = result {
                warn!(%peer, %object, error = %e, "composed record not delivered; retrying in the background");
                owed.insert(peer, Vec::new());
            }
        }
        if !owed.is_empty() {
            let delivery = Delivery::new(&record, &manifest_bytes, owed, now_ms());
            self.enqueue_delivery(object, delivery, Vec::new()).await?;
        }
        if local {
            self.inner.net.provide(object).await;
        }
        debug!(%object, parts = parts.len(), holders = record.nodes.len(), "composed object");
        Ok(object)
    }
}
