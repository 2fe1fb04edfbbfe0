#![allow(clippy::unwrap_used)]
//! Delete and garbage collection across a mesh: `rm` writes a tombstone that reaches every
//! holder (durably, across restarts), holders release their references, and after the GC
//! grace (one second here) the chunks no live object uses are gone while shared ones stay.
//! Every wait is a condition with a deadline.

use std::time::Duration;

use mesh_node::net::Frame;
use mesh_node::store::{ChunkStore, MetaStore, Queue};
use mesh_proto::api::{DeleteResponse, PutResponse};
use mesh_proto::wire::{ControlRequest, ControlResponse};
use mesh_proto::{ChunkId, ObjectId};
use mesh_tests::{
    Cluster, TestNode, api_client, api_get, api_status, random_bytes, record_on, wait_until,
};
use reqwest::StatusCode;

const JOIN: Duration = Duration::from_secs(60);
const GRACE: Duration = Duration::from_secs(1);
/// Chunk size of the fixed chunker, so that the test decides which chunks objects share.
const CHUNK: usize = 256 * 1024;

async fn put(node: &TestNode, body: Vec<u8>) -> PutResponse {
    let response = api_client(node)
        .unwrap()
        .post(format!(
            "{}/v1/objects?redundancy=rep:3&chunker=fixed:256KiB",
            node.api_url()
        ))
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.unwrap()
}

async fn rm(node: &TestNode, id: &ObjectId) -> DeleteResponse {
    let response = api_client(node)
        .unwrap()
        .delete(format!("{}/v1/objects/{id}", node.api_url()))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.unwrap()
}

async fn metrics(node: &TestNode) -> String {
    reqwest::get(format!("{}/metrics", node.api_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The node keeps the object's tombstone and no longer has the object.
fn deleted_on(node: &TestNode, id: &ObjectId) -> bool {
    record_on(node, id).unwrap().is_some_and(|r| r.tombstone)
        && node.node().store().object(id).unwrap().is_none()
        && node.node().store().manifest(id).unwrap().is_none()
}

fn has(node: &TestNode, chunk: &[u8]) -> bool {
    node.node().store().has_chunk(&ChunkId::of(chunk)).unwrap()
}

async fn cluster(n: usize) -> Cluster {
    let cluster = Cluster::start(n, |_, config| {
        config.durability.gc_grace = GRACE;
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rm_reaches_every_holder_and_after_the_grace_only_the_shared_chunk_stays() {
    let cluster = cluster(3).await;
    let nodes = &cluster.nodes;
    // A = a0 a1 s, B = s b1: B shares one chunk with A.
    let (a0, a1, s, b1) = (
        random_bytes(CHUNK, 1),
        random_bytes(CHUNK, 2),
        random_bytes(CHUNK, 3),
        random_bytes(CHUNK, 4),
    );
    let a = put(&nodes[0], [&a0[..], &a1, &s].concat()).await;
    cluster.wait_settled(JOIN).await.unwrap();
    let b_bytes = [&s[..], &b1].concat();
    let b = put(&nodes[1], b_bytes.clone()).await;
    assert_eq!((a.chunks, b.chunks, b.new_chunks), (3, 2, 1));
    cluster.wait_settled(JOIN).await.unwrap();
    for node in nodes {
        assert!([&a0, &a1, &s, &b1].iter().all(|c| has(node, c)));
    }
    // What a late copy of A's put would carry.
    let old_record = record_on(&nodes[0], &a.id).unwrap().unwrap();
    let (_, manifest_bytes) = nodes[0].node().store().manifest(&a.id).unwrap().unwrap();

    // Deleted from a node that did not write it.
    let deleted = rm(&nodes[2], &a.id).await;
    assert_eq!(deleted.id, a.id);
    assert_eq!(
        (deleted.freed_chunks, deleted.freed_bytes),
        (2, 2 * CHUNK as u64),
        "a0 and a1 lost their last reference here; s is still B's"
    );
    assert_eq!(deleted.holders_told + deleted.holders_pending, 2);
    wait_until(JOIN, "every holder to keep A's tombstone", || {
        let done = nodes.iter().all(|n| deleted_on(n, &a.id));
        async move { Ok(done) }
    })
    .await
    .unwrap();
    let tombstone = record_on(&nodes[0], &a.id).unwrap().unwrap();
    assert_eq!(tombstone.version, old_record.version + 1);
    assert_eq!(tombstone.writer.0, nodes[2].node().peer_id().to_bytes());

    // A late, older put of A reaches a holder: it is acknowledged and ignored.
    let late = Frame::with_payload(
        ControlRequest::PutObject {
            record: old_record.clone(),
        },
        manifest_bytes.into(),
    );
    let answer = nodes[0]
        .node()
        .network()
        .control(nodes[1].node().peer_id(), late)
        .await
        .unwrap();
    assert!(
        matches!(answer.header, ControlResponse::Stored),
        "{:?}",
        answer.header
    );
    assert!(deleted_on(&nodes[1], &a.id), "the late put brought A back");

    // After the grace the chunks only A used are gone from every holder; B's stay.
    wait_until(JOIN, "a0 and a1 to be collected on every holder", || {
        let done = nodes.iter().all(|n| !has(n, &a0) && !has(n, &a1));
        async move { Ok(done) }
    })
    .await
    .unwrap();
    for node in nodes {
        assert!(has(node, &s) && has(node, &b1), "B's chunks must stay");
        let listed = node.node().store().list_objects(None, 10).unwrap();
        assert_eq!(
            listed.iter().map(|o| o.id).collect::<Vec<_>>(),
            vec![b.id],
            "ls shows B only"
        );
        assert_eq!(
            api_get(node, &a.id).await.unwrap().status(),
            StatusCode::NOT_FOUND
        );
        let response = api_get(node, &b.id).await.unwrap();
        assert!(response.status().is_success());
        assert_eq!(response.bytes().await.unwrap().as_ref(), &b_bytes[..]);
    }

    // Deleting it again finds nothing.
    let again = api_client(&nodes[0])
        .unwrap()
        .delete(format!("{}/v1/objects/{}", nodes[0].api_url(), a.id))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);

    // The operator's view: the collection and its compaction show in the metrics, and
    // nothing is left waiting or undelivered.
    let first = &nodes[0];
    wait_until(JOIN, "the GC metrics and an empty backlog", || async {
        let text = metrics(first).await;
        let status = api_status(first).await?;
        Ok(text.contains("mesh_gc_deleted_chunks_total 2\n")
            && text.contains(&format!("mesh_gc_deleted_bytes_total {}\n", 2 * CHUNK))
            && text.contains("mesh_gc_compactions_total 1\n")
            && text.contains("mesh_gc_pending_chunks 0\n")
            && status.gc_pending_chunks == 0
            && status.deletes_delivering == 0)
    })
    .await
    .unwrap();
    assert_eq!(api_status(&nodes[2]).await.unwrap().deletes_delivering, 0);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_that_was_down_gets_the_tombstone_after_the_deleting_node_restarts() {
    let cluster = cluster(3).await;
    let data = [random_bytes(CHUNK, 11), random_bytes(CHUNK, 12)].concat();
    let a = put(&cluster.nodes[0], data.clone()).await;
    cluster.wait_settled(JOIN).await.unwrap();
    let Cluster {
        bootstrap,
        mut nodes,
        ..
    } = cluster;

    // Holder 2 is down when node 1 deletes A: node 0 is told, node 2 stays owed.
    let down = nodes.remove(2).park().await;
    let deleted = rm(&nodes[1], &a.id).await;
    assert_eq!(deleted.holders_told + deleted.holders_pending, 2);
    assert!(deleted.holders_pending >= 1, "{deleted:?}");
    wait_until(JOIN, "node 0 to keep A's tombstone", || {
        let done = deleted_on(&nodes[0], &a.id);
        async move { Ok(done) }
    })
    .await
    .unwrap();
    let owed = |node: &TestNode| {
        let mut count = 0;
        node.node()
            .store()
            .visit_queued(Queue::Tombstone, None, &mut |_, _| {
                count += 1;
                true
            })
            .unwrap();
        count
    };
    assert_eq!(owed(&nodes[1]), 1, "the delete is queued for node 2");

    // The deleting node restarts before it could reach node 2; then node 2 comes back.
    let deleter = nodes.remove(1).restart().await.unwrap();
    assert_eq!(owed(&deleter), 1, "the queue survives the restart");
    let back = down.start().await.unwrap();
    assert!(
        back.node().store().object(&a.id).unwrap().is_some(),
        "node 2 still has A until it is told"
    );
    wait_until(
        Duration::from_secs(120),
        "node 2 to get the tombstone and the deleter's queue to empty",
        || {
            let done = deleted_on(&back, &a.id) && owed(&deleter) == 0;
            async move { Ok(done) }
        },
    )
    .await
    .unwrap();
    let manifest_chunks = [random_bytes(CHUNK, 11), random_bytes(CHUNK, 12)];
    wait_until(JOIN, "node 2 to collect A's chunks", || {
        let done = manifest_chunks.iter().all(|c| !has(&back, c));
        async move { Ok(done) }
    })
    .await
    .unwrap();
    assert_eq!(
        api_get(&back, &a.id).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    for node in nodes.into_iter().chain([deleter, back]) {
        node.stop().await;
    }
    bootstrap.shutdown().await;
}
