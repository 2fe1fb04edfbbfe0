#![allow(clippy::unwrap_used)]
//! Nodes behind NAT: reached through the bootstrap peer's circuit relay, and moved to a
//! direct connection by DCUtR's hole punching where that can work.
//!
//! Loopback has no NAT and AutoNAT does not probe loopback addresses, so these nodes are put
//! behind the relay the way an operator would: `net.listen` names a circuit through the
//! bootstrap peer (`<bootstrap address>/p2p-circuit`), and `net.advertise_listen_addrs =
//! false` keeps any direct listen address to themselves. The only address their peers learn
//! is the circuit. Both ends of each test are such nodes: a node that can be dialed directly
//! would be dialed directly by the other (a node behind NAT can dial out), and the relay
//! would carry nothing.

use std::time::Duration;

use libp2p::PeerId;
use mesh_node::config::Config;
use mesh_node::net::{NetStatus, is_circuit};
use mesh_proto::api::PutResponse;
use mesh_tests::{
    Cluster, TestNode, api_get, api_put, metric, random_bytes, record_on, wait_until,
};

const JOIN: Duration = Duration::from_secs(60);

/// Puts node `config` behind the cluster's bootstrap relay: it listens through a circuit,
/// plus (with `direct_socket`) on a direct address it does not advertise, which DCUtR
/// needs to punch a hole to.
fn behind_relay(config: &mut Config, direct_socket: bool) {
    let circuit = format!("{}/p2p-circuit", config.net.bootstrap[0]);
    config.net.listen = if direct_socket {
        vec!["/ip4/127.0.0.1/udp/0/quic-v1".into(), circuit]
    } else {
        vec![circuit]
    };
    config.net.advertise_listen_addrs = false;
}

/// Two nodes behind the relay, joined (alive, measured and connected to each other).
async fn two_behind_relay(direct_socket: bool) -> Cluster {
    let cluster = Cluster::start(2, |i, config| {
        // `usize::MAX` is the bootstrap peer's probe config, which has no bootstrap address.
        if i != usize::MAX {
            behind_relay(config, direct_socket);
        }
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    cluster
}

fn net(node: &TestNode) -> NetStatus {
    (*node.node().network().status()).clone()
}

/// Stores `data` on `holder` alone (`rep:1`: the writer is its own nearest holder) in 1 MiB
/// chunks, checks that the placement record says so, and reads it back on `reader`.
async fn put_on_and_get_from(holder: &TestNode, reader: &TestNode, data: &[u8]) {
    let response = api_put(holder, "redundancy=rep:1&chunker=fixed:1MiB", data.to_vec())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let put: PutResponse = response.json().await.unwrap();
    assert!(put.chunks > 1, "{put:?}");
    let record = record_on(holder, &put.id).unwrap().unwrap();
    let holder_id = holder.node().peer_id();
    for part in 0..record.holders.len() {
        let holders: Vec<PeerId> = record
            .holders_of(part)
            .map(|n| PeerId::from_bytes(&n.0).unwrap())
            .collect();
        assert_eq!(holders, [holder_id], "part {part}");
    }
    assert!(record_on(reader, &put.id).unwrap().is_none());
    let response = api_get(reader, &put.id).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_reachable_only_through_the_relay_serves_its_objects_through_it() {
    let cluster = two_behind_relay(false).await;
    let [holder, reader] = &cluster.nodes[..] else {
        unreachable!()
    };
    let (holder_id, reader_id) = (holder.node().peer_id(), reader.node().peer_id());
    // Each knows the other by its circuit only, and is connected to it only through the relay.
    for (node, peer) in [(holder, reader_id), (reader, holder_id)] {
        let view = node.view_of(peer).unwrap();
        assert!(view.connected && view.relayed, "{view:?}");
        assert!(view.addrs.iter().all(is_circuit), "{view:?}");
        let status = net(node);
        assert!(status.listen_addrs.iter().all(is_circuit), "{status:?}");
        assert!(
            !status.external_addrs.is_empty() && status.external_addrs.iter().all(is_circuit),
            "{status:?}"
        );
    }

    // The reader gets, through the relay, an object whose only holder is the other node.
    let data = random_bytes(3 << 20, 21);
    put_on_and_get_from(holder, reader, &data).await;

    // DCUtR cannot upgrade these connections: neither node has a socket that accepts
    // connections (QUIC dials out from an ephemeral socket that takes none), so the hole
    // punch, which dials each side's observed address, finds nothing to connect to. The
    // listening side of the relayed connection gives up after three attempts; the
    // connection stays relayed.
    wait_until(JOIN, "a failed hole punch", || {
        let failed = net(holder).hole_punches_failed + net(reader).hole_punches_failed;
        async move { Ok(failed > 0) }
    })
    .await
    .unwrap();
    for (node, peer) in [(holder, reader_id), (reader, holder_id)] {
        assert_eq!(net(node).hole_punches_succeeded, 0);
        let view = node.view_of(peer).unwrap();
        assert!(view.connected && view.relayed, "{view:?}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relayed_connection_is_upgraded_to_a_direct_one_by_hole_punching() {
    let cluster = two_behind_relay(true).await;
    let [holder, reader] = &cluster.nodes[..] else {
        unreachable!()
    };
    let (holder_id, reader_id) = (holder.node().peer_id(), reader.node().peer_id());
    // Neither advertises its direct socket: the first connection between them can only
    // have gone through the relay, and a direct one only come from a hole punch.
    for node in [holder, reader] {
        let status = net(node);
        assert!(status.external_addrs.iter().all(is_circuit), "{status:?}");
    }
    wait_until(JOIN, "a direct connection between the two", || {
        let direct = [(holder, reader_id), (reader, holder_id)]
            .iter()
            .all(|(node, peer)| {
                let view = node.view_of(*peer).unwrap();
                view.connected && !view.relayed
            });
        async move { Ok(direct) }
    })
    .await
    .unwrap();
    let succeeded: u64 = [holder, reader]
        .iter()
        .map(|n| net(n).hole_punches_succeeded)
        .sum();
    assert!(succeeded > 0, "no hole punch counted");
    // Operators see the same in the Prometheus metrics.
    let mut counted = 0.0;
    for node in [holder, reader] {
        counted += metric(node, "mesh_hole_punches_total{result=\"succeeded\"}")
            .await
            .unwrap();
    }
    assert!(counted >= succeeded as f64, "{counted} < {succeeded}");

    let data = random_bytes(3 << 20, 22);
    put_on_and_get_from(holder, reader, &data).await;
    cluster.stop().await;
}
