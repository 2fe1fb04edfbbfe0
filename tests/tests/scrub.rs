//! Scrubbing: a chunk whose stored bytes rot is found by the scrubber, kept from every read,
//! and replaced from another holder; a pass survives a restart. Nodes run in this process;
//! every wait is a condition with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mesh_node::store::{ChunkStore, MetaStore};
use mesh_proto::api::{PutResponse, ScrubStartResponse, ScrubStatus, StatusResponse};
use mesh_proto::{ChunkId, ObjectId};
use mesh_tests::{Cluster, TestNode, api_client, random_bytes, wait_until};
use reqwest::Method;
use serde::de::DeserializeOwned;

const JOIN: Duration = Duration::from_secs(60);
const SCRUB: Duration = Duration::from_secs(60);

async fn put(node: &TestNode, query: &str, body: Vec<u8>) -> PutResponse {
    let response = mesh_tests::api_put(node, query, body).await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    response.json().await.unwrap()
}

/// The object's bytes, or `None` when the node could not serve all of them.
async fn get(node: &TestNode, id: &ObjectId) -> Option<Vec<u8>> {
    let response = mesh_tests::api_get(node, id).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.bytes().await.ok().map(|b| b.to_vec())
}

/// A successful JSON answer of the control API.
async fn call<T: DeserializeOwned>(node: &TestNode, method: Method, path: &str) -> T {
    let response = api_client(node)
        .unwrap()
        .request(method, format!("{}{path}", node.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    response.json().await.unwrap()
}

async fn scrub_status(node: &TestNode) -> ScrubStatus {
    call(node, Method::GET, "/v1/scrub").await
}

async fn scrub_now(node: &TestNode) -> ScrubStartResponse {
    call(node, Method::POST, "/v1/scrub").await
}

/// A lone node scrubbing at `rate`, past the pass it runs at its first start.
async fn scrubbing_node(rate: bytesize::ByteSize) -> TestNode {
    let node = TestNode::start_with(|config| config.durability.scrub_rate = rate)
        .await
        .unwrap();
    wait_idle(&node).await;
    node
}

fn running(status: &ScrubStatus) -> bool {
    status
        .pass
        .as_ref()
        .is_some_and(|p| p.finished_ms.is_none())
}

/// Waits for the pass a node runs at its first start (over an empty store) to finish.
async fn wait_idle(node: &TestNode) {
    wait_until(SCRUB, "the start-up scrub pass to finish", || async {
        let status = scrub_status(node).await;
        Ok(!running(&status) && status.passes_completed >= 1)
    })
    .await
    .unwrap();
}

/// Starts a pass, waits for it to finish, and returns the status after it.
async fn full_pass(node: &TestNode) -> ScrubStatus {
    let before = scrub_status(node).await.passes_completed;
    assert!(scrub_now(node).await.started);
    wait_until(SCRUB, "the requested pass to finish", || async {
        let status = scrub_status(node).await;
        Ok(!running(&status) && status.passes_completed > before)
    })
    .await
    .unwrap();
    scrub_status(node).await
}

fn chunk_ids(node: &TestNode, id: &ObjectId) -> Vec<ChunkId> {
    let (manifest, _) = node.node().store().manifest(id).unwrap().unwrap();
    manifest.chunks.iter().map(|c| c.id).collect()
}

/// Bytes that differ from `data` in one bit, as a flipped bit on disk would.
fn rotten(data: &[u8]) -> Vec<u8> {
    let mut bad = data.to_vec();
    let at = bad.len() / 2;
    bad[at] ^= 0x08;
    bad
}

/// Flips a bit of a chunk stored on `node` (through the store's test hook); returns the good
/// bytes.
fn rot(node: &TestNode, id: &ChunkId) -> Vec<u8> {
    let store = node.node().store();
    let good = store.get_chunk(id).unwrap().unwrap().to_vec();
    store.overwrite_chunk_unchecked(id, &rotten(&good)).unwrap();
    good
}

/// `n` joined nodes scrubbing at 1 GiB/s, once `data`, put on the first with `query`, is on
/// all its holders.
async fn cluster_holding(n: usize, query: &str, data: Vec<u8>) -> (Cluster, PutResponse) {
    let cluster = Cluster::start(n, |_, config| {
        config.durability.scrub_rate = bytesize::ByteSize::gib(1);
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let stored = put(&cluster.nodes[0], query, data).await;
    cluster.wait_settled(JOIN).await.unwrap();
    (cluster, stored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotten_replica_is_found_by_scrub_and_replaced_from_another_holder() {
    let data = random_bytes(300 * 1024, 21);
    let (cluster, put) =
        cluster_holding(3, "redundancy=rep:3&chunker=fixed:64KiB", data.clone()).await;
    assert_eq!(put.chunks, 5);

    // Node 1 holds a replica of every chunk; one of them rots there.
    let holder = &cluster.nodes[1];
    wait_idle(holder).await;
    let chunks = chunk_ids(holder, &put.id);
    let victim = chunks[2];
    let good = rot(holder, &victim);

    // Before any scrub, a read on that node already gets the right bytes (from another
    // holder) and never the rotten ones.
    assert_eq!(get(holder, &put.id).await.as_deref(), Some(&data[..]));

    let started = scrub_now(holder).await;
    assert!(started.started, "{started:?}");
    assert!(running(&started.status));
    wait_until(
        SCRUB,
        "the scrubber to replace the rotten chunk",
        || async {
            let stored = holder.node().store().get_chunk(&victim);
            let status = scrub_status(holder).await;
            Ok(matches!(stored, Ok(Some(ref b)) if *b == good)
                && !running(&status)
                && status.repaired_total == 1)
        },
    )
    .await
    .unwrap();

    let status = scrub_status(holder).await;
    let pass = status.pass.clone().unwrap();
    assert_eq!((pass.corrupt, pass.repaired), (1, 1), "{status:?}");
    assert_eq!(pass.chunks_checked, 5);
    assert_eq!((status.corrupt_total, status.quarantined), (1, 0));
    assert!(status.last_finished_ms.is_some());
    // `meshctl status` carries the same figures.
    let node_status: StatusResponse = call(holder, Method::GET, "/v1/status").await;
    assert_eq!(node_status.scrub.as_ref(), Some(&status));
    let metrics = reqwest::get(format!("{}/metrics", holder.api_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "mesh_scrub_corrupt_chunks_total 1",
        "mesh_scrub_repaired_chunks_total 1",
        "mesh_scrub_quarantined_chunks 0",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    // Every chunk verifies on the holder again, and reads give the object.
    for id in &chunks {
        assert!(holder.node().store().get_chunk(id).unwrap().is_some());
    }
    assert_eq!(get(holder, &put.id).await.as_deref(), Some(&data[..]));
    // The other holders found nothing.
    for node in [&cluster.nodes[0], &cluster.nodes[2]] {
        assert_eq!(scrub_status(node).await.corrupt_total, 0);
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotten_erasure_shard_is_rebuilt_from_the_other_shards() {
    let data = random_bytes(200 * 1024, 24);
    // Four chunks of 64 KiB or less, each cut into 2 data + 1 parity shards on 3 holders.
    let (cluster, put) =
        cluster_holding(4, "redundancy=ec:2%2B1&chunker=fixed:64KiB", data.clone()).await;
    let record = mesh_tests::record_on(&cluster.nodes[0], &put.id)
        .unwrap()
        .unwrap();
    assert_eq!(record.parts.len(), 12);
    // Shard 1 of chunk 2: its only holder loses it to rot, so it can only be rebuilt.
    let part = 2 * 3 + 1;
    let shard = record.parts[part];
    let holders: Vec<_> = record.holders_of(part).collect();
    assert_eq!(holders.len(), 1);
    let holder = cluster
        .nodes
        .iter()
        .find(|n| n.node().peer_id().to_bytes() == holders[0].0)
        .unwrap();
    wait_idle(holder).await;
    let good = rot(holder, &shard);
    assert_eq!(get(holder, &put.id).await.as_deref(), Some(&data[..]));

    let status = full_pass(holder).await;
    assert_eq!(
        (
            status.corrupt_total,
            status.repaired_total,
            status.quarantined
        ),
        (1, 1, 0),
        "{status:?}"
    );
    assert_eq!(
        holder.node().store().get_chunk(&shard).unwrap().unwrap(),
        good
    );
    for node in &cluster.nodes {
        assert_eq!(get(node, &put.id).await.as_deref(), Some(&data[..]));
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_nobody_else_holds_stays_quarantined_and_is_never_served() {
    let node = scrubbing_node(bytesize::ByteSize::gib(1)).await;
    // rep:1: this node holds the only copy.
    let data = random_bytes(200 * 1024, 22);
    let stored = put(&node, "redundancy=rep:1&chunker=fixed:64KiB", data.clone()).await;
    let victim = chunk_ids(&node, &stored.id)[1];
    let bad = rotten(&rot(&node, &victim));

    let status = full_pass(&node).await;
    assert_eq!(
        (
            status.corrupt_total,
            status.repaired_total,
            status.quarantined
        ),
        (1, 0, 1),
        "{status:?}"
    );
    assert!(node.node().store().get_chunk(&victim).unwrap().is_none());
    let served = get(&node, &stored.id).await;
    assert!(
        served.is_none_or(|b| !b.windows(bad.len()).any(|w| w == &bad[..])),
        "the rotten bytes were served"
    );

    // A later pass tries again without counting the chunk twice.
    let status = full_pass(&node).await;
    assert_eq!(status.passes_completed, 3);
    assert_eq!((status.corrupt_total, status.quarantined), (1, 1));

    // The same bytes uploaded again carry a verified copy: the chunk heals.
    put(&node, "redundancy=rep:1&chunker=fixed:64KiB", data.clone()).await;
    assert_eq!(node.node().store().quarantined_count().unwrap(), 0);
    assert_eq!(get(&node, &stored.id).await.as_deref(), Some(&data[..]));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_its_scrub_pass_from_the_cursor() {
    // 256 KiB/s over 64 chunks of 16 KiB: a pass takes about four seconds.
    let node = scrubbing_node(bytesize::ByteSize::kib(256)).await;
    let put = put(
        &node,
        "redundancy=rep:1&chunker=fixed:16KiB",
        random_bytes(1 << 20, 23),
    )
    .await;
    assert_eq!(put.chunks, 64);
    assert!(scrub_now(&node).await.started);
    wait_until(SCRUB, "the pass to check a few chunks", || async {
        let status = scrub_status(&node).await;
        Ok(status.pass.is_some_and(|p| p.chunks_checked >= 8))
    })
    .await
    .unwrap();
    let before = scrub_status(&node).await.pass.unwrap();
    assert!(before.finished_ms.is_none(), "the pass ended too soon");

    let node = node.restart().await.unwrap();
    let after = scrub_status(&node).await.pass.unwrap();
    assert_eq!(after.started_ms, before.started_ms, "the same pass goes on");
    assert!(after.chunks_checked >= before.chunks_checked);
    wait_until(SCRUB, "the resumed pass to finish", || async {
        Ok(!running(&scrub_status(&node).await))
    })
    .await
    .unwrap();
    let done = scrub_status(&node).await;
    let pass = done.pass.unwrap();
    assert_eq!(pass.started_ms, before.started_ms);
    // Resumed, not restarted: every chunk counted exactly once over both runs.
    assert_eq!(pass.chunks_checked, 64);
    assert_eq!(pass.bytes_checked, 1 << 20);
    assert_eq!(done.passes_completed, 2);
    node.stop().await;
}
