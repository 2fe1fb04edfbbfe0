#![allow(clippy::unwrap_used)]
//! Erasure-coded objects (`ec:K+M`) on in-process clusters: shards land on distinct holders,
//! reads decode from any K of them, and lost or corrupt shards never reach the reader.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::PeerId;
use mesh_node::store::{ChunkStore, MetaStore};
use mesh_proto::api::PutResponse;
use mesh_proto::wire::PlacementRecord;
use mesh_proto::{ObjectId, Redundancy};
use mesh_tests::{Cluster, TestNode, random_bytes};

const JOIN: Duration = Duration::from_secs(60);

async fn put(node: &TestNode, query: &str, body: Vec<u8>) -> reqwest::Response {
    mesh_tests::api_put(node, query, body).await.unwrap()
}

async fn get(node: &TestNode, id: &ObjectId) -> reqwest::Response {
    mesh_tests::api_get(node, id).await.unwrap()
}

fn record_on(node: &TestNode, id: &ObjectId) -> Option<PlacementRecord> {
    mesh_tests::record_on(node, id).unwrap()
}

fn holder_of(record: &PlacementRecord, part: usize) -> Vec<PeerId> {
    record
        .holders_of(part)
        .map(|n| PeerId::from_bytes(&n.0).unwrap())
        .collect()
}

fn node_by_id<'a>(nodes: &'a [TestNode], id: &PeerId) -> &'a TestNode {
    nodes.iter().find(|n| n.node().peer_id() == *id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ec_4_2_spreads_shards_over_six_holders_and_survives_losing_two() {
    let cluster = Cluster::start(7, |_, _| {}).await.unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let writer = &cluster.nodes[0];

    // Three 1 MiB chunks and a short tail: 4 chunks, 24 shards.
    let data = random_bytes(3 * 1024 * 1024 + 1234, 42);
    let response = put(
        writer,
        "redundancy=ec:4%2B2&chunker=fixed:1MiB",
        data.clone(),
    )
    .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let put: PutResponse = response.json().await.unwrap();
    assert_eq!(put.chunks, 4);
    cluster.wait_settled(JOIN).await.unwrap();

    let record = record_on(writer, &put.id).expect("the writer keeps the record");
    assert_eq!(
        record.redundancy,
        Redundancy::Erasure { data: 4, parity: 2 }
    );
    assert_eq!(record.parts.len(), 24);
    for chunk in 0..4 {
        let holders: Vec<PeerId> = (0..6)
            .flat_map(|s| holder_of(&record, chunk * 6 + s))
            .collect();
        let distinct: HashSet<PeerId> = holders.iter().copied().collect();
        assert_eq!(holders.len(), 6, "one holder per shard: {holders:?}");
        assert_eq!(distinct.len(), 6, "six distinct holders for chunk {chunk}");
        // Every shard is stored where the record says, and nowhere is the whole chunk.
        for s in 0..6 {
            let part = chunk * 6 + s;
            let holder = node_by_id(&cluster.nodes, &holder_of(&record, part)[0]);
            assert!(
                holder
                    .node()
                    .store()
                    .has_chunk(&record.parts[part])
                    .unwrap(),
                "shard {s} of chunk {chunk} missing on its holder"
            );
            assert_eq!(record_on(holder, &put.id).as_ref(), Some(&record));
        }
    }
    let manifest = writer.node().store().manifest(&put.id).unwrap().unwrap().0;
    for node in &cluster.nodes {
        for chunk in &manifest.chunks {
            assert!(!node.node().store().has_chunk(&chunk.id).unwrap());
        }
    }

    // Any node reads it back exactly.
    for node in &cluster.nodes {
        let response = get(node, &put.id).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    }

    // Kill two holders of chunk 0 other than the writer: every chunk loses at most two
    // shards, and the object still reads back exactly.
    let writer_id = writer.node().peer_id();
    let victims: Vec<PeerId> = (0..6)
        .flat_map(|s| holder_of(&record, s))
        .filter(|p| *p != writer_id)
        .take(2)
        .collect();
    let mut alive = Vec::new();
    for node in cluster.nodes {
        if victims.contains(&node.node().peer_id()) {
            node.stop().await;
        } else {
            alive.push(node);
        }
    }
    assert_eq!(alive.len(), 5);
    for node in &alive {
        let response = get(node, &put.id).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    }
    for node in alive {
        node.stop().await;
    }
    cluster.bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_shard_is_rejected_and_the_chunk_rebuilt_from_the_others() {
    let cluster = Cluster::start(4, |_, _| {}).await.unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let writer = &cluster.nodes[0];
    let data = random_bytes(700 * 1024, 7);
    let response = put(
        writer,
        "redundancy=ec:2%2B1&chunker=fixed:1MiB",
        data.clone(),
    )
    .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let put: PutResponse = response.json().await.unwrap();
    cluster.wait_settled(JOIN).await.unwrap();
    let record = record_on(writer, &put.id).unwrap();

    // Flip the bytes of data shard 0 on its holder.
    let holder = node_by_id(&cluster.nodes, &holder_of(&record, 0)[0]);
    holder
        .node()
        .store()
        .overwrite_chunk_unchecked(&record.parts[0], &vec![0u8; 512 * 1024])
        .unwrap();
    for node in &cluster.nodes {
        let response = get(node, &put.id).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_erasure_put_refuses_a_quorum_below_k_plus_one() {
    let node = TestNode::start().await.unwrap();
    let response = put(&node, "redundancy=ec:4%2B2&quorum=4", vec![1; 1000]).await;
    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(text.contains("quorum 4 is outside 5..=6"), "{text}");
    node.stop().await;
}
