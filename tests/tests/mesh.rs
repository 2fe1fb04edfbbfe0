#![allow(clippy::unwrap_used)]
//! Multi-node tests: a bootstrap peer and several nodes in one process on loopback, talking
//! QUIC to each other. Every wait is a condition with a deadline.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::PeerId;
use mesh_node::placement::Liveness;
use mesh_node::store::{ChunkStore, MetaStore};
use mesh_proto::api::{PeersResponse, PutResponse, StatusResponse};
use mesh_proto::wire::PlacementRecord;
use mesh_proto::{Manifest, ObjectId};
use mesh_tests::{Cluster, TestNode, api_client, random_bytes, wait_until};

const JOIN: Duration = Duration::from_secs(60);

async fn status(node: &TestNode) -> StatusResponse {
    api_client(node)
        .unwrap()
        .get(format!("{}/v1/status", node.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn put(node: &TestNode, query: &str, body: Vec<u8>) -> reqwest::Response {
    mesh_tests::api_put(node, query, body).await.unwrap()
}

async fn get(node: &TestNode, id: &ObjectId) -> reqwest::Response {
    mesh_tests::api_get(node, id).await.unwrap()
}

fn record_on(node: &TestNode, id: &ObjectId) -> Option<PlacementRecord> {
    mesh_tests::record_on(node, id).unwrap()
}

fn holders(record: &PlacementRecord) -> Vec<HashSet<PeerId>> {
    (0..record.holders.len())
        .map(|i| {
            record
                .holders_of(i)
                .map(|n| PeerId::from_bytes(&n.0).unwrap())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rep3_put_lands_on_three_holders_and_reads_back_from_a_node_holding_nothing() {
    let cluster = Cluster::start(4, |_, _| {}).await.unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let writer = &cluster.nodes[0];

    // One chunk, so that exactly three of the four nodes hold something.
    let data = random_bytes(200 * 1024, 1);
    let response = put(writer, "redundancy=rep:3", data.clone()).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let put: PutResponse = response.json().await.unwrap();
    assert_eq!(put.chunks, 1);
    // The put returned at W=2; the third holder may still be finishing in the background.
    cluster.wait_settled(JOIN).await.unwrap();

    let record = record_on(writer, &put.id).expect("the writer holds a replica and the record");
    let holders = holders(&record);
    assert_eq!(holders[0].len(), 3, "three distinct holders: {holders:?}");
    assert!(holders[0].contains(&writer.node().peer_id()));
    // Every holder has the chunk and the same record.
    let manifest: Manifest = writer.node().store().manifest(&put.id).unwrap().unwrap().0;
    for node in &cluster.nodes {
        let holds = holders[0].contains(&node.node().peer_id());
        let has = node
            .node()
            .store()
            .has_chunk(&manifest.chunks[0].id)
            .unwrap();
        assert_eq!(
            holds,
            has,
            "node {} holds per record: {holds}, has: {has}",
            node.node().peer_id()
        );
        if holds {
            assert_eq!(record_on(node, &put.id).as_ref(), Some(&record));
        }
    }

    let reader = cluster
        .nodes
        .iter()
        .find(|n| !holders[0].contains(&n.node().peer_id()))
        .unwrap();
    let response = get(reader, &put.id).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);

    // Kill the two holders other than the writer (so whichever the reader would pick first is
    // gone): the writer's replica still serves the bytes.
    let reader_id = reader.node().peer_id();
    let writer_id = writer.node().peer_id();
    let mut keep = Vec::new();
    let mut killed = 0;
    for node in cluster.nodes {
        let id = node.node().peer_id();
        if holders[0].contains(&id) && id != writer_id {
            node.stop().await;
            killed += 1;
        } else {
            keep.push(node);
        }
    }
    assert_eq!(killed, 2);
    let reader = keep
        .iter()
        .find(|n| n.node().peer_id() == reader_id)
        .unwrap();
    let response = get(reader, &put.id).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    for node in keep {
        node.stop().await;
    }
    cluster.bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_object_spreads_over_the_mesh_and_reads_back_everywhere() {
    let cluster = Cluster::start(3, |_, _| {}).await.unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let data = random_bytes(24 << 20, 2);
    let response = put(&cluster.nodes[1], "redundancy=rep:2", data.clone()).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let put: PutResponse = response.json().await.unwrap();
    assert!(put.chunks > 4);
    let record = record_on(&cluster.nodes[1], &put.id).unwrap();
    for set in holders(&record) {
        assert_eq!(set.len(), 2);
    }
    for node in &cluster.nodes {
        let response = get(node, &put.id).await;
        assert_eq!(response.status(), 200);
        let body = response.bytes().await.unwrap();
        assert_eq!(body.len(), data.len());
        assert!(
            body.as_ref() == &data[..],
            "bytes differ on {}",
            node.node().peer_id()
        );
    }
    cluster.stop().await;
}

/// A reader asks equally near holders in rendezvous order per chunk, so a large object is read
/// from all of its holders, not all from the one whose RTT sample happens to be lowest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_spreads_its_fetches_over_equally_near_holders() {
    let cluster = Cluster::start(3, |_, config| {
        // No hedging, so every chunk served is one the reader asked that holder for first.
        config.net.hedge_after = Duration::from_secs(60);
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let data = random_bytes(8 << 20, 7);
    let response = put(
        &cluster.nodes[0],
        "redundancy=rep:3&chunker=fixed:262144",
        data.clone(),
    )
    .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let put: PutResponse = response.json().await.unwrap();
    assert_eq!(put.chunks, 32);
    cluster.wait_settled(JOIN).await.unwrap();
    // A reader that joins now holds nothing; all three nodes hold every chunk.
    let addr = cluster.bootstrap_addr();
    let reader = TestNode::start_with(|config| {
        config.net.bootstrap = vec![addr];
        config.net.hedge_after = Duration::from_secs(60);
        // No ping disturbs the RTTs the test sets.
        config.net.ping_interval = Duration::from_secs(60);
    })
    .await
    .unwrap();
    let ids: Vec<PeerId> = cluster.nodes.iter().map(|n| n.node().peer_id()).collect();
    // Loopback RTTs of a debug build under load wander by milliseconds; make all three look
    // about 1 ms away, as they are, so that they share the near band (2 ms). Each RTT is the
    // median of the last three samples, so the one exchange that fetches the manifest and
    // record from a provider does not move it. (A sample counts once the peer is known.)
    wait_until(JOIN, "the holders to look 1 ms from the reader", || {
        let network = reader.node().network();
        for _ in 0..10 {
            for id in &ids {
                network.rtt_sample(*id, Duration::from_millis(1));
            }
        }
        let peers = network.peers();
        let ids = ids.clone();
        async move {
            Ok(ids.iter().all(|id| {
                peers.iter().any(|p| {
                    p.id == *id
                        && p.liveness == Liveness::Alive
                        && p.rtt.is_some_and(|r| r < Duration::from_micros(1500))
                })
            }))
        }
    })
    .await
    .unwrap();
    let mut before = Vec::new();
    for node in &cluster.nodes {
        before.push(status(node).await.chunks_served);
    }
    let response = get(&reader, &put.id).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    let mut served = Vec::new();
    for (node, before) in cluster.nodes.iter().zip(before) {
        served.push(status(node).await.chunks_served - before);
    }
    // The manifest and record come from one provider too; they are not chunks.
    assert_eq!(
        served.iter().sum::<u64>(),
        32,
        "one fetch per chunk: {served:?}"
    );
    // With all three in the band, each serves a share (one serving none has probability
    // 3 * (2/3)^32, below 1e-5). A ping during the get may still push one out of the band,
    // so the test asks for two; reading from the nearest alone would give one.
    let serving = served.iter().filter(|&&n| n > 0).count();
    assert!(
        serving >= 2,
        "chunks served per holder: {served:?}; the reader's peers: {:?}",
        reader
            .node()
            .network()
            .peers()
            .iter()
            .map(|p| (p.id, p.rtt, p.liveness))
            .collect::<Vec<_>>()
    );
    reader.stop().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_put_that_cannot_reach_quorum_fails_and_leaves_no_object() {
    let cluster = Cluster::start(2, |_, _| {}).await.unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let node = &cluster.nodes[0];
    let response = put(node, "redundancy=rep:3&quorum=3", random_bytes(100_000, 3)).await;
    assert_eq!(response.status(), 503);
    let text = response.text().await.unwrap();
    assert!(text.contains("reached 2 of the 3 holders"), "{text}");
    for n in &cluster.nodes {
        assert_eq!(n.node().store().stats().unwrap().objects, 0);
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_replica_is_detected_and_another_holder_serves_the_bytes() {
    let cluster = Cluster::start(4, |_, _| {}).await.unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let writer = &cluster.nodes[0];
    let data = random_bytes(150 * 1024, 4);
    let put: PutResponse = put(writer, "redundancy=rep:3", data.clone())
        .await
        .json()
        .await
        .unwrap();
    let record = record_on(writer, &put.id).unwrap();
    let holders = holders(&record);
    let chunk = writer
        .node()
        .store()
        .manifest(&put.id)
        .unwrap()
        .unwrap()
        .0
        .chunks[0]
        .id;
    // Corrupt every replica except the writer's.
    for node in &cluster.nodes {
        let id = node.node().peer_id();
        if holders[0].contains(&id) && id != writer.node().peer_id() {
            node.node()
                .store()
                .overwrite_chunk_unchecked(&chunk, b"not the chunk")
                .unwrap();
        }
    }
    let reader = cluster
        .nodes
        .iter()
        .find(|n| !holders[0].contains(&n.node().peer_id()))
        .unwrap();
    let response = get(reader, &put.id).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_that_sends_corrupt_bytes_is_caught_counted_and_avoided() {
    let cluster = Cluster::start(4, |_, config| {
        // No hedging: a reader asks the next holder only when one failed, so which holders
        // a get asked follows from the order alone.
        config.net.hedge_after = Duration::from_secs(60);
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let writer = &cluster.nodes[0];
    let data = random_bytes(150 * 1024, 6);
    let put: PutResponse = put(writer, "redundancy=rep:3", data.clone())
        .await
        .json()
        .await
        .unwrap();
    cluster.wait_settled(JOIN).await.unwrap();
    let holders = holders(&record_on(writer, &put.id).unwrap());
    assert_eq!((holders.len(), holders[0].len()), (1, 3), "{holders:?}");
    let reader = cluster
        .nodes
        .iter()
        .find(|n| !holders[0].contains(&n.node().peer_id()))
        .unwrap();
    let liar = cluster
        .nodes
        .iter()
        .find(|n| {
            n.node().peer_id() != writer.node().peer_id()
                && holders[0].contains(&n.node().peer_id())
        })
        .unwrap();
    let liar_id = liar.node().peer_id();
    let honest: Vec<PeerId> = holders[0]
        .iter()
        .copied()
        .filter(|p| *p != liar_id)
        .collect();
    // The liar's store is intact; it flips a byte of what it sends.
    liar.node().mesh().serve_corrupt_chunks(true);

    // Make the reader rank the liar nearest: the honest holders seem a second away (the
    // reader asks holders nearest first). Pings pull that back down slowly, over seconds.
    let push_away = || async {
        for peer in &honest {
            for _ in 0..3 {
                reader
                    .node()
                    .network()
                    .rtt_sample(*peer, Duration::from_secs(1));
            }
        }
        wait_until(
            JOIN,
            "the honest holders to look far from the reader",
            || {
                let peers = reader.node().network().peers();
                let far = honest.iter().all(|h| {
                    peers.iter().any(|p| {
                        p.id == *h && p.rtt.is_some_and(|r| r > Duration::from_millis(100))
                    })
                });
                async move { Ok(far) }
            },
        )
        .await
        .unwrap();
    };
    let bad_chunks = || async {
        mesh_tests::metric(reader, "mesh_peer_bad_chunks_total")
            .await
            .unwrap()
    };
    let served_by_liar = || async { status(liar).await.chunks_served };

    let (bad_before, served_before) = (bad_chunks().await, served_by_liar().await);
    // One get on the reader, which must give the exact bytes; then how many chunks the liar
    // served and how many bad ones the reader caught, since the start.
    let read = || async {
        push_away().await;
        let response = get(reader, &put.id).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
        (
            served_by_liar().await - served_before,
            bad_chunks().await - bad_before,
        )
    };
    // The reader asks the liar first, finds that the bytes do not hash to the chunk id,
    // counts them, and gets the chunk from an honest holder.
    assert_eq!(read().await, (1, 1.0), "(served by the liar, caught)");
    // Now it avoids the liar: though the liar still looks nearest, the next get asks an
    // honest holder first, and the liar serves nothing more.
    assert_eq!(read().await, (1, 1.0), "(served by the liar, caught)");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_the_wrong_cluster_key_can_neither_store_nor_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.key");
    let bad = dir.path().join("bad.key");
    mesh_node::identity::create_cluster_key(&good).unwrap();
    mesh_node::identity::create_cluster_key(&bad).unwrap();
    let (good2, bad2) = (good.clone(), bad.clone());
    let cluster = Cluster::start(4, move |i, config| {
        config.net.cluster_key_file = Some(if i == 3 { bad2.clone() } else { good2.clone() });
    })
    .await
    .unwrap();
    let (members, intruder) = cluster.nodes.split_at(3);
    let intruder = &intruder[0];
    let member_ids: Vec<PeerId> = members.iter().map(|n| n.node().peer_id()).collect();
    wait_until(JOIN, "the members to see each other", || {
        let views: Vec<_> = members.iter().map(|n| n.node().network().peers()).collect();
        let ids = member_ids.clone();
        async move {
            Ok(views.iter().all(|peers| {
                ids.iter()
                    .filter(|id| peers.iter().any(|p| p.id == **id && p.rtt.is_some()))
                    .count()
                    == 2
            }))
        }
    })
    .await
    .unwrap();
    let data = random_bytes(100_000, 5);
    let response = put(&members[0], "redundancy=rep:3", data).await;
    assert_eq!(response.status(), 200);
    let put_ok: PutResponse = response.json().await.unwrap();

    // The intruder is in nobody's peer table, stores nothing and finds nothing.
    for member in members {
        assert!(
            !member
                .node()
                .network()
                .peers()
                .iter()
                .any(|p| p.id == intruder.node().peer_id())
        );
    }
    assert!(intruder.node().network().peers().is_empty());
    let response = put(intruder, "redundancy=rep:2", random_bytes(1000, 6)).await;
    assert_eq!(response.status(), 503);
    let response = get(intruder, &put_ok.id).await;
    assert_eq!(response.status(), 404);
    assert_eq!(intruder.node().store().stats().unwrap().chunks, 0);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_beyond_the_quorum_is_completed_in_the_background_across_a_restart() {
    // Node 2 refuses every chunk (it believes its disk is full), so a rep:3 put on node 0
    // reaches 2 of its 3 holders: enough for W=2, and node 2 is owed the rest.
    let cluster = Cluster::start(3, |i, config| {
        if i == 2 {
            config.net.min_free_space = bytesize::ByteSize::b(u64::MAX / 2);
        }
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let data = random_bytes(3 << 20, 11);
    let response = put(&cluster.nodes[0], "redundancy=rep:3&quorum=2", data.clone()).await;
    assert!(response.status().is_success(), "{}", response.status());
    let put_ok: PutResponse = response.json().await.unwrap();
    let id = put_ok.id;
    let owed = cluster.nodes[2].node().peer_id();
    let record = record_on(&cluster.nodes[0], &id).unwrap();
    assert!(
        holders(&record)
            .iter()
            .all(|h| h.len() == 3 && h.contains(&owed)),
        "the record names node 2 as the third holder of every chunk"
    );
    assert_eq!(cluster.nodes[2].node().store().stats().unwrap().chunks, 0);
    assert!(
        cluster.nodes[2]
            .node()
            .store()
            .object(&id)
            .unwrap()
            .is_none()
    );
    assert_eq!(
        cluster.nodes[0]
            .node()
            .store()
            .deliveries(None, 10)
            .unwrap()
            .len(),
        1,
        "the writer queued what node 2 is owed"
    );
    assert_eq!(status(&cluster.nodes[0]).await.objects_completing, 1);

    // The queue survives the writer's restart; node 2 then gets space and is completed.
    let Cluster {
        bootstrap,
        mut nodes,
        ..
    } = cluster;
    let full = nodes.remove(2);
    let writer = nodes.remove(0).restart().await.unwrap();
    let fixed = full
        .restart_with(|config| {
            config.net.min_free_space = bytesize::ByteSize::mib(16);
        })
        .await
        .unwrap();
    let manifest: Manifest = writer.node().store().manifest(&id).unwrap().unwrap().0;
    wait_until(
        Duration::from_secs(90),
        "node 2 to hold every chunk and the object, and the writer's queue to empty",
        || {
            let store = fixed.node().store();
            let done = store.object(&id).unwrap().is_some()
                && manifest
                    .chunks
                    .iter()
                    .all(|c| store.has_chunk(&c.id).unwrap())
                && writer
                    .node()
                    .store()
                    .deliveries(None, 10)
                    .unwrap()
                    .is_empty();
            async move { Ok(done) }
        },
    )
    .await
    .unwrap();
    // Node 2 took references on the late chunks: it serves the object from its own store
    // (the others are stopped), and its record names it for every chunk.
    nodes
        .iter()
        .for_each(|n| assert_ne!(n.node().peer_id(), owed));
    for node in nodes {
        node.stop().await;
    }
    writer.stop().await;
    let response = get(&fixed, &id).await;
    assert!(response.status().is_success());
    assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    let record = record_on(&fixed, &id).unwrap();
    assert!(holders(&record).iter().all(|h| h.contains(&owed)));
    fixed.stop().await;
    bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_keeps_its_id_and_chunks_and_rejoins() {
    let cluster = Cluster::start(3, |_, _| {}).await.unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let data = random_bytes(300_000, 7);
    let put_ok: PutResponse = put(&cluster.nodes[0], "redundancy=rep:3", data.clone())
        .await
        .json()
        .await
        .unwrap();
    cluster.wait_settled(JOIN).await.unwrap();
    let Cluster {
        bootstrap,
        mut nodes,
        ..
    } = cluster;
    let node = nodes.remove(2);
    let id = node.node().peer_id();
    let stats = node.node().store().stats().unwrap();
    let node = node.restart().await.unwrap();
    assert_eq!(node.node().peer_id(), id);
    assert_eq!(node.node().store().stats().unwrap(), stats);
    nodes.push(node);
    wait_until(JOIN, "the restarted node to be seen again", || {
        let views: Vec<_> = nodes[..2]
            .iter()
            .map(|n| n.node().network().peers())
            .collect();
        async move {
            Ok(views.iter().all(|peers| {
                peers
                    .iter()
                    .any(|p| p.id == id && p.connected && p.rtt.is_some())
            }))
        }
    })
    .await
    .unwrap();
    let response = get(&nodes[2], &put_ok.id).await;
    assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);

    // The operator's view: status and peers over the control API.
    let client = api_client(&nodes[0]).unwrap();
    let status = status(&nodes[0]).await;
    // The two other nodes and the bootstrap peer.
    assert_eq!(status.peers_alive, 3);
    assert!(!status.listen_addrs.is_empty());
    let peers: PeersResponse = client
        .get(format!("{}/v1/peers", nodes[0].api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        peers
            .peers
            .iter()
            .any(|p| p.id == id.to_string() && p.liveness == "alive")
    );
    for node in nodes {
        node.stop().await;
    }
    bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bootstrap_peer_does_not_stop_the_node() {
    // A UDP port nobody answers on, under a made-up peer id.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    drop(socket);
    let addr = format!("/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{}", PeerId::random());
    let node = TestNode::start_with(|config| {
        config.net.bootstrap = vec![addr];
        config.net.request_timeout = Duration::from_secs(2);
    })
    .await
    .unwrap();
    // It keeps serving: a rep:1 put and get work while it retries in the background.
    let data = random_bytes(10_000, 8);
    let response = put(&node, "redundancy=rep:1", data.clone()).await;
    assert_eq!(response.status(), 200);
    let put: PutResponse = response.json().await.unwrap();
    let response = get(&node, &put.id).await;
    assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    assert!(node.node().network().peers().is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_joins_later_finds_and_reads_existing_objects() {
    let cluster = Cluster::start(3, |_, _| {}).await.unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let data = random_bytes(3 << 20, 9);
    let put_ok: PutResponse = put(&cluster.nodes[0], "redundancy=rep:3", data.clone())
        .await
        .json()
        .await
        .unwrap();
    let addr = cluster.bootstrap_addr();
    let late = TestNode::start_with(|config| {
        config.net.bootstrap = vec![addr];
        config.net.ping_interval = Duration::from_millis(500);
    })
    .await
    .unwrap();
    let ids: Vec<PeerId> = cluster.nodes.iter().map(|n| n.node().peer_id()).collect();
    wait_until(JOIN, "the late node to see the others", || {
        let peers = late.node().network().peers();
        let ids = ids.clone();
        async move {
            Ok(ids
                .iter()
                .all(|id| peers.iter().any(|p| p.id == *id && p.rtt.is_some())))
        }
    })
    .await
    .unwrap();
    let response = get(&late, &put_ok.id).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    // The manifest (what meshctl verifies against) comes from a provider too.
    let manifest = api_client(&late)
        .unwrap()
        .get(format!(
            "{}/v1/objects/{}/manifest",
            late.api_url(),
            put_ok.id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200);
    assert_eq!(ObjectId::of(&manifest.bytes().await.unwrap()), put_ok.id);
    late.stop().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_flooding_requests_is_limited_and_the_node_stays_responsive() {
    use mesh_node::net::Frame;
    use mesh_proto::ChunkId;
    use mesh_proto::wire::{ChunkRequest, ChunkResponse, Refusal};

    let cluster = Cluster::start(2, |_, config| config.net.max_streams_per_peer = 8)
        .await
        .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let target = cluster.nodes[1].node().peer_id();
    let net = cluster.nodes[0].node().network().clone();
    // 2000 requests at once from one peer, for chunks the target does not have.
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..2000u32 {
        let net = net.clone();
        flood.spawn(async move {
            let id = ChunkId::of(&i.to_le_bytes());
            net.chunk(target, Frame::new(ChunkRequest::Fetch { id }))
                .await
        });
    }
    // Meanwhile the flooded node still answers its operator.
    let client = api_client(&cluster.nodes[1]).unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .get(format!("{}/v1/status", cluster.nodes[1].api_url()))
            .send(),
    )
    .await
    .expect("status answered during the flood")
    .unwrap();
    assert_eq!(status.status(), 200);
    let results = flood.join_all().await;
    let (mut answered, mut busy, mut failed) = (0, 0, 0);
    for result in results {
        match result {
            Ok(Frame {
                header: ChunkResponse::NotFound,
                ..
            }) => answered += 1,
            Ok(Frame {
                header:
                    ChunkResponse::Refused {
                        reason: Refusal::Busy,
                        ..
                    },
                ..
            }) => busy += 1,
            Ok(other) => panic!("unexpected answer {:?}", other.header),
            Err(_) => failed += 1,
        }
    }
    assert!(
        answered > 0,
        "answered {answered}, busy {busy}, failed {failed}"
    );
    assert_eq!(answered + busy + failed, 2000);
    // And it still serves real requests afterwards.
    let data = random_bytes(50_000, 10);
    let response = put(&cluster.nodes[1], "redundancy=rep:2", data).await;
    assert_eq!(response.status(), 200);
    cluster.stop().await;
}

/// A job's task outputs are put unannounced (`Announce::Never`): neither the writer nor the
/// holders, which get `KeepObject` instead of `PutObject`, tell the DHT. A user's put is
/// announced by every holder. Thousands of task outputs per job used to start a DHT query
/// on each holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn task_outputs_are_not_announced_by_their_holders() {
    use mesh_node::chunker::PreCut;
    use mesh_node::objects::PutOptions;
    use mesh_node::replicate::Announce;
    use mesh_proto::{ChunkerSpec, Redundancy};

    let cluster = Cluster::start(4, |_, _| {}).await.unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let writer = &cluster.nodes[0];
    let quiet = writer
        .node()
        .mesh()
        .put_chunks(
            PreCut(vec![bytes::Bytes::from(random_bytes(100 * 1024, 21))].into()),
            PutOptions {
                name: None,
                redundancy: Redundancy::Replicas(3),
                chunker: ChunkerSpec::default(),
                created_ms: Some(0),
            },
            2,
            Announce::Never,
        )
        .await
        .unwrap()
        .response
        .id;
    assert_eq!(holders(&record_on(writer, &quiet).unwrap())[0].len(), 3);
    let loud: PutResponse = put(writer, "redundancy=rep:3", random_bytes(100 * 1024, 22))
        .await
        .json()
        .await
        .unwrap();
    // Once the user's object is found through all three of its holders, the holders'
    // announcements (which the task output's holders would have made first) are in.
    let reader = &cluster.nodes[3];
    wait_until(
        JOIN,
        "the announced object's three holders are providers",
        || async {
            Ok(reader
                .node()
                .network()
                .find_providers(loud.id)
                .await
                .is_ok_and(|p| p.len() >= 3))
        },
    )
    .await
    .unwrap();
    let providers = reader.node().network().find_providers(quiet).await.unwrap();
    assert!(
        providers.is_empty(),
        "the task output is announced by {providers:?}"
    );
    // It is still stored and readable where its record says.
    assert_eq!(get(writer, &quiet).await.status(), 200);
    cluster.stop().await;
}

/// A new connection's first ping comes back before the peer has been identified and has
/// proven the cluster key; its sample must wait for the admission instead of being dropped,
/// or placement knows nothing of the new peer's RTT until the next ping. Pings are two minutes
/// apart here, so only the first one can give the RTT in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_peer_has_an_rtt_from_its_first_ping() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    mesh_node::identity::create_cluster_key(&key).unwrap();
    let cluster = Cluster::start(3, move |_, config| {
        config.net.cluster_key_file = Some(key.clone());
        config.net.ping_interval = Duration::from_secs(120);
    })
    .await
    .unwrap();
    // Provisional (the first ping came before the admission) or not.
    cluster
        .wait_every_view(
            Duration::from_secs(30),
            "every node to have an RTT of every other",
            |p| p.rtt.is_some(),
        )
        .await
        .unwrap();
}
