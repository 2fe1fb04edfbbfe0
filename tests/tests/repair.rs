#![allow(clippy::unwrap_used)]
//! Repair on in-process clusters: a killed holder's parts are re-created on live peers, the
//! record's version goes up, and a holder that comes back ends with no surplus copies.

use std::time::Duration;

use libp2p::PeerId;
use mesh_node::placement::Liveness;
use mesh_node::store::ChunkStore;
use mesh_proto::api::PutResponse;
use mesh_proto::wire::PlacementRecord;
use mesh_proto::{ChunkId, ObjectId};
use mesh_tests::{Cluster, TestNode, random_bytes, wait_until};

const JOIN: Duration = Duration::from_secs(60);
const REPAIR: Duration = Duration::from_secs(90);

async fn start(n: usize) -> Cluster {
    let cluster = Cluster::start(n, |_, config| {
        config.net.suspect_after = Duration::from_secs(2);
        config.net.dead_after = Duration::from_secs(4);
        // Surplus copies a returning holder releases wait out the GC grace before they go.
        config.durability.gc_grace = Duration::from_secs(1);
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    cluster
}

async fn put(node: &TestNode, query: &str, data: &[u8]) -> PutResponse {
    let response = mesh_tests::api_put(node, query, data.to_vec())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    response.json().await.unwrap()
}

fn holders(record: &PlacementRecord, part: usize) -> Vec<PeerId> {
    record
        .holders_of(part)
        .map(|n| PeerId::from_bytes(&n.0).unwrap())
        .collect()
}

/// Puts `data` on the first node, waits until every holder has its parts and record, and
/// returns the put, the record and the part ids.
async fn put_settled(
    cluster: &Cluster,
    query: &str,
    data: &[u8],
) -> (PutResponse, PlacementRecord, Vec<ChunkId>) {
    let writer = &cluster.nodes[0];
    let put = put(writer, query, data).await;
    cluster.wait_settled(JOIN).await.unwrap();
    let record = mesh_tests::record_on(writer, &put.id).unwrap().unwrap();
    let parts = part_ids(writer, &put.id, &record);
    (put, record, parts)
}

/// Stops the node with id `victim` and returns the others.
async fn stop_peer(nodes: Vec<TestNode>, victim: PeerId) -> Vec<TestNode> {
    let mut alive = Vec::new();
    for node in nodes {
        if node.node().peer_id() == victim {
            node.stop().await;
        } else {
            alive.push(node);
        }
    }
    alive
}

fn part_ids(node: &TestNode, id: &ObjectId, record: &PlacementRecord) -> Vec<ChunkId> {
    use mesh_node::store::MetaStore;
    let manifest = node.node().store().manifest(id).unwrap().unwrap().0;
    (0..record.part_count())
        .map(|i| record.part_id(&manifest.chunks, i).unwrap())
        .collect()
}

/// Whether every part of `id` has `wanted` holders among `alive`, each of which stores it,
/// and `reference`'s record on the writer is newer than `version`.
fn repaired(
    alive: &[TestNode],
    writer: &TestNode,
    id: &ObjectId,
    version: u64,
    wanted: usize,
) -> bool {
    let Some(record) = mesh_tests::record_on(writer, id).unwrap() else {
        return false;
    };
    if record.version <= version {
        return false;
    }
    let parts = part_ids(writer, id, &record);
    (0..record.part_count()).all(|i| {
        let list = holders(&record, i);
        list.len() == wanted
            && list.iter().all(|p| {
                alive
                    .iter()
                    .find(|n| n.node().peer_id() == *p)
                    .is_some_and(|n| n.node().store().has_chunk(&parts[i]).unwrap())
            })
    })
}

/// How many of `nodes` store each part.
fn copies(nodes: &[TestNode], parts: &[ChunkId]) -> Vec<usize> {
    parts
        .iter()
        .map(|p| {
            nodes
                .iter()
                .filter(|n| n.node().store().has_chunk(p).unwrap())
                .count()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_rep3_holder_is_repaired_and_a_returning_one_keeps_no_surplus() {
    let cluster = start(5).await;
    let writer_id = cluster.nodes[0].node().peer_id();
    let data = random_bytes(1024 * 1024, 5);
    let (put, record, parts) =
        put_settled(&cluster, "redundancy=rep:3&chunker=fixed:256KiB", &data).await;

    // Kill a holder other than the writer.
    let victim = holders(&record, 0)
        .into_iter()
        .find(|p| *p != writer_id)
        .unwrap();
    let mut alive = Vec::new();
    let mut stopped = None;
    for node in cluster.nodes {
        if node.node().peer_id() == victim {
            stopped = Some(node);
        } else {
            alive.push(node);
        }
    }
    let stopped = stopped.unwrap();
    let victim_dir = stopped.data_dir().to_path_buf();
    // Stop it, keeping its data directory for its return.
    let parked = stopped.park().await;

    wait_until(REPAIR, "every chunk to have 3 live holders again", || {
        let done = repaired(&alive, &alive[0], &put.id, record.version, 3);
        async move { Ok(done) }
    })
    .await
    .unwrap();
    assert_eq!(copies(&alive, &parts), vec![3; parts.len()]);
    // One node did the repair, and `GET /v1/repair` says so; nothing is left below target.
    let mut queued = 0;
    for node in &alive {
        let state: mesh_proto::api::RepairStatus = mesh_tests::api_client(node)
            .unwrap()
            .get(format!("{}/v1/repair", node.api_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        queued += state.parts_queued;
    }
    assert!(queued >= 1, "no node reports queued repair parts");
    wait_until(REPAIR, "the repair backlog to drain", || {
        let backlog: u64 = alive
            .iter()
            .map(|n| n.node().mesh().repair_state().backlog)
            .sum();
        async move { Ok(backlog == 0) }
    })
    .await
    .unwrap();
    for node in &alive {
        let response = mesh_tests::api_get(node, &put.id).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    }

    // The victim comes back with its old copies: once the new record reaches it, it releases
    // them, and no chunk ends with more than 3 copies.
    let returned = parked.start().await.unwrap();
    assert_eq!(returned.data_dir(), victim_dir);
    alive.push(returned);
    wait_until(
        REPAIR,
        "the returned holder to release its surplus copies",
        || {
            let counts = copies(&alive, &parts);
            async move { Ok(counts.iter().all(|&c| c == 3)) }
        },
    )
    .await
    .unwrap();
    for node in alive {
        node.stop().await;
    }
    cluster.bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ec_4_2_rebuilds_the_shards_of_two_killed_holders() {
    let cluster = start(7).await;
    let writer_id = cluster.nodes[0].node().peer_id();
    let data = random_bytes(2 * 1024 * 1024 + 99, 9);
    let (put, record, parts) =
        put_settled(&cluster, "redundancy=ec:4%2B2&chunker=fixed:1MiB", &data).await;
    let victims: Vec<PeerId> = (0..6)
        .flat_map(|s| holders(&record, s))
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
    wait_until(REPAIR, "all 6 shards of every chunk live again", || {
        let done = repaired(&alive, &alive[0], &put.id, record.version, 1);
        async move { Ok(done) }
    })
    .await
    .unwrap();
    // Every shard exists exactly once among the live nodes (shards of equal bytes, like the
    // zero padding of a short chunk, share an id and count once per shard).
    let expected: Vec<usize> = parts
        .iter()
        .map(|p| parts.iter().filter(|q| *q == p).count())
        .collect();
    assert_eq!(copies(&alive, &parts), expected);
    for node in &alive {
        let response = mesh_tests::api_get(node, &put.id).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap().as_ref(), &data[..]);
    }
    for node in alive {
        node.stop().await;
    }
    cluster.bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repairer_restarted_mid_repair_resumes_and_makes_no_extra_copies() {
    use mesh_node::store::MetaStore;
    // Slow repair (256 KiB/s after a one-second burst), so the restart lands mid-repair.
    // `dead_after` leaves room for the repairer to stay down through the others' walks.
    let cluster = Cluster::start(5, |_, config| {
        config.net.suspect_after = Duration::from_secs(2);
        config.net.dead_after = Duration::from_secs(10);
        config.durability.repair_rate = bytesize::ByteSize::kib(256);
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let writer_id = cluster.nodes[0].node().peer_id();
    let data = random_bytes(4 * 1024 * 1024, 11);
    let (put, record, parts) =
        put_settled(&cluster, "redundancy=rep:3&chunker=fixed:256KiB", &data).await;
    let victim = record
        .nodes
        .iter()
        .map(|n| PeerId::from_bytes(&n.0).unwrap())
        .find(|p| *p != writer_id)
        .unwrap();
    // The repairer is the holder with the lowest peer id that is not dead.
    let repairer = record
        .nodes
        .iter()
        .filter(|n| n.0 != victim.to_bytes())
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|n| PeerId::from_bytes(&n.0).unwrap())
        .unwrap();
    let mut alive = stop_peer(cluster.nodes, victim).await;
    let at = alive
        .iter()
        .position(|n| n.node().peer_id() == repairer)
        .unwrap();
    wait_until(REPAIR, "the repairer to queue the repair", || {
        let queued = mesh_tests::record_on(&alive[at], &put.id)
            .unwrap()
            .is_some_and(|r| r.version > record.version);
        async move { Ok(queued) }
    })
    .await
    .unwrap();
    let pending = alive[at].node().store().deliveries(None, 1).unwrap();
    assert!(
        !pending.is_empty(),
        "the repair finished before the restart"
    );
    let parked = alive.remove(at).park().await;
    // While the repairer is down (suspect, not dead), every other node walks its records
    // at least once: none of them may take the repair over and plan it a second time.
    walk_twice_once(&alive, "see the repairer gone", |node| {
        !node.view_of(repairer).is_some_and(|v| v.connected)
    })
    .await;
    for node in &alive {
        assert_eq!(
            node.node().mesh().repair_state().parts_queued,
            0,
            "{} planned the repair while the repairer was only down",
            node.node().peer_id()
        );
    }
    alive.push(parked.start().await.unwrap());

    wait_until(
        REPAIR,
        "every chunk to have 3 live holders after the restart",
        || {
            // (The record stays owed to the dead victim; the parts are what must arrive.)
            let done = repaired(&alive, &alive[0], &put.id, record.version, 3);
            async move { Ok(done) }
        },
    )
    .await
    .unwrap();
    repaired_once(alive, &parts, &put.id, &data).await;
    cluster.bootstrap.shutdown().await;
}

/// Checks the end of a repair the last of `alive` (the restarted repairer) made: three copies of
/// every part, no other node queued any, the object reads back; then stops the nodes.
async fn repaired_once(alive: Vec<TestNode>, parts: &[ChunkId], id: &ObjectId, data: &[u8]) {
    assert_eq!(copies(&alive, parts), vec![3; parts.len()]);
    for node in &alive[..alive.len() - 1] {
        assert_eq!(node.node().mesh().repair_state().parts_queued, 0);
    }
    let response = mesh_tests::api_get(&alive[0], id).await.unwrap();
    assert_eq!(response.bytes().await.unwrap().as_ref(), data);
    for node in alive {
        node.stop().await;
    }
}

/// Waits until each of `nodes`, once `seen` holds for it, has finished two more walks over its
/// records (the second began after `seen` held).
async fn walk_twice_once(nodes: &[TestNode], what: &str, seen: impl Fn(&TestNode) -> bool) {
    let mut walks: Vec<Option<(u64, usize)>> = vec![None; nodes.len()];
    wait_until(
        REPAIR,
        &format!("every node to {what} and walk its records twice"),
        || {
            for (node, walked) in nodes.iter().zip(walks.iter_mut()) {
                let scan = node.node().mesh().repair_state().last_scan_ms;
                match walked {
                    None if seen(node) => *walked = Some((scan, 0)),
                    Some((last, n)) if scan != *last => *walked = Some((scan, *n + 1)),
                    _ => {}
                }
            }
            let done = walks.iter().all(|w| w.is_some_and(|(_, n)| n >= 2));
            async move { Ok(done) }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repairer_down_but_not_dead_keeps_the_repair_to_itself() {
    // The victim dies while the repairer is down but not yet dead: the next holder must not
    // plan the repair, or two next versions of the record and two sets of copies would go out.
    let dead_after = Duration::from_secs(12);
    let cluster = Cluster::start(5, |_, config| {
        config.net.suspect_after = Duration::from_secs(1);
        config.net.dead_after = dead_after;
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    let writer_id = cluster.nodes[0].node().peer_id();
    let data = random_bytes(1024 * 1024, 12);
    let (put, record, parts) =
        put_settled(&cluster, "redundancy=rep:3&chunker=fixed:256KiB", &data).await;
    let ids: Vec<PeerId> = record
        .nodes
        .iter()
        .map(|n| PeerId::from_bytes(&n.0).unwrap())
        .collect();
    assert!(ids.len() >= 3, "rep:3 has at least three holders");
    let victim = *ids.iter().find(|p| **p != writer_id).unwrap();
    let repairer = *ids.iter().filter(|p| **p != victim).min().unwrap();
    let mut alive = stop_peer(cluster.nodes, victim).await;
    // Half-way to the victim's death, the repairer goes down too.
    wait_until(
        REPAIR,
        "the victim to be silent for half of dead_after",
        || {
            let half = alive.iter().all(|n| {
                n.view_of(victim)
                    .is_some_and(|v| !v.connected && v.last_seen_ago >= dead_after / 2)
            });
            async move { Ok(half) }
        },
    )
    .await
    .unwrap();
    let at = alive
        .iter()
        .position(|n| n.node().peer_id() == repairer)
        .unwrap();
    let parked = alive.remove(at).park().await;
    walk_twice_once(&alive, "see the victim dead", |node| {
        node.view_of(victim)
            .is_some_and(|v| v.liveness == Liveness::Dead)
    })
    .await;
    for node in &alive {
        let seen = node.view_of(repairer).unwrap();
        assert_ne!(
            seen.liveness,
            Liveness::Dead,
            "the host was too slow: the repairer counted dead before the walks ended"
        );
        assert_eq!(
            node.node().mesh().repair_state().parts_queued,
            0,
            "{} planned the repair while the repairer was down but not dead",
            node.node().peer_id()
        );
    }

    // The repairer comes back and repairs (once the victim has been silent for dead_after
    // since its start).
    alive.push(parked.start().await.unwrap());
    wait_until(REPAIR, "every chunk to have 3 live holders", || {
        let at = alive.len() - 1;
        let done = repaired(&alive, &alive[at], &put.id, record.version, 3);
        async move { Ok(done) }
    })
    .await
    .unwrap();
    repaired_once(alive, &parts, &put.id, &data).await;
    cluster.bootstrap.shutdown().await;
}

/// The `mesh_copied_chunks_total` counter of a node.
async fn copied_chunks(node: &TestNode) -> f64 {
    let text = mesh_tests::api_client(node)
        .unwrap()
        .get(format!("{}/metrics", node.api_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("mesh_copied_chunks_total "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_request_fetches_a_replica_from_its_holder_and_refuses_bad_ones() {
    use mesh_node::net::Frame;
    use mesh_proto::wire::{ChunkRequest, ChunkResponse, MAX_COPY_SOURCES, NodeId, Refusal};

    let cluster = start(3).await;
    let [a, b, c] = &cluster.nodes[..] else {
        panic!("three nodes")
    };
    let data = random_bytes(300_000, 7);
    let id = a.node().store().put_chunk(&data).unwrap().id;
    let node_id = |n: &TestNode| NodeId(n.node().peer_id().to_bytes());
    let net = c.node().network().clone();
    let ask = |from: Vec<NodeId>, id: ChunkId| {
        let net = net.clone();
        let target = b.node().peer_id();
        async move {
            net.chunk(target, Frame::new(ChunkRequest::Copy { id, from }))
                .await
                .unwrap()
                .header
        }
    };

    // c asks b to copy from c itself (it has nothing) or a: b fetches from a, verifies, keeps.
    assert_eq!(
        ask(vec![node_id(c), node_id(a)], id).await,
        ChunkResponse::Stored { new: true }
    );
    assert_eq!(
        b.node().store().get_chunk(&id).unwrap().unwrap().as_ref(),
        &data[..]
    );
    assert_eq!(copied_chunks(b).await, 1.0);
    // Asked again, b has it already and fetches nothing.
    assert_eq!(
        ask(vec![node_id(a)], id).await,
        ChunkResponse::Stored { new: false }
    );
    assert_eq!(copied_chunks(b).await, 1.0);

    // A chunk none of the named holders has: not found, and nothing stored.
    let absent = ChunkId::of(b"no node holds this");
    assert_eq!(
        ask(vec![node_id(a), node_id(c)], absent).await,
        ChunkResponse::NotFound
    );
    assert!(!b.node().store().has_chunk(&absent).unwrap());

    // Malformed requests are refused, not served.
    let bad = |header: ChunkResponse| {
        matches!(
            header,
            ChunkResponse::Refused {
                reason: Refusal::BadRequest,
                ..
            }
        )
    };
    assert!(bad(ask(Vec::new(), absent).await), "no holder named");
    assert!(
        bad(ask(vec![node_id(a); MAX_COPY_SOURCES + 1], absent).await),
        "too many holders named"
    );
    assert!(
        bad(ask(vec![NodeId(vec![0xff; 12])], absent).await),
        "a holder that is no peer id"
    );
    assert_eq!(copied_chunks(b).await, 1.0);
    cluster.stop().await;
}
