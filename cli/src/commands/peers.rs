//! `meshctl peers`: the mesh peers the node knows, nearest (lowest RTT) first, with their zone,
//! liveness and last load report. `--json` prints the node's full [`PeersResponse`] (full ids,
//! addresses, load) in the same order.

use std::cmp::Ordering;

use mesh_proto::api::{PeerSummary, PeersResponse};

use crate::client::Client;
use crate::error::Error;
use crate::output::{self, Align, cell, human_bytes, rtt, short_peer_id};

/// What the text output says when the node knows no peer.
pub const NO_PEERS: &str = "no peers known; start other nodes with --bootstrap <addr>";

pub async fn run(client: &Client, json: bool) -> Result<(), Error> {
    let mut response = client.peers().await?;
    sort_nearest_first(&mut response.peers);
    if json {
        output::print_json(&response)
    } else {
        output::print(&render(&response))
    }
}

/// Measured peers by ascending RTT, then the unmeasured ones; ties by id, so the order is
/// stable from one run to the next.
fn sort_nearest_first(peers: &mut [PeerSummary]) {
    peers.sort_by(|a, b| by_rtt(a.rtt_ms, b.rtt_ms).then_with(|| a.id.cmp(&b.id)));
}

fn by_rtt(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.total_cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

const COLUMNS: [(&str, Align); 8] = [
    ("PEER", Align::Left),
    ("ZONE", Align::Left),
    ("ROLE", Align::Left),
    ("RTT", Align::Right),
    ("LIVENESS", Align::Left),
    ("CPU%", Align::Right),
    ("DISK FREE", Align::Right),
    ("CHUNKS", Align::Right),
];

fn render(response: &PeersResponse) -> String {
    if response.peers.is_empty() {
        return format!("{NO_PEERS}\n");
    }
    let rows: Vec<Vec<String>> = response.peers.iter().map(row).collect();
    output::table(&COLUMNS, &rows)
}

fn row(peer: &PeerSummary) -> Vec<String> {
    let dash = || "-".to_owned();
    let load = peer.load.as_ref();
    vec![
        short_peer_id(&peer.id),
        cell(&peer.zone),
        cell(&peer.role),
        // A provisional RTT (the first ping, taken while the peer joined) reads high.
        if peer.rtt_provisional && peer.rtt_ms.is_some() {
            format!("~{}", rtt(peer.rtt_ms))
        } else {
            rtt(peer.rtt_ms)
        },
        cell(&peer.liveness),
        load.map_or_else(dash, |l| format!("{:.1}", f64::from(l.cpu) * 100.0)),
        load.map_or_else(dash, |l| human_bytes(l.disk_free)),
        load.map_or_else(dash, |l| l.chunks.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use mesh_proto::api::PeerLoad;

    use super::*;

    fn peer(id: &str, rtt_ms: Option<f64>, load: bool) -> PeerSummary {
        PeerSummary {
            id: id.into(),
            zone: "eu-west".into(),
            role: "storage".into(),
            addrs: vec!["/ip4/10.0.0.1/udp/4001/quic-v1".into()],
            rtt_ms,
            rtt_provisional: false,
            last_rtt_ms: rtt_ms,
            last_seen_secs_ago: 1.5,
            liveness: "alive".into(),
            connected: true,
            relayed: false,
            load: load.then_some(PeerLoad {
                cpu: 0.125,
                mem_used: 1 << 30,
                mem_total: 4 << 30,
                disk_free: 3 << 30,
                disk_used: 1 << 20,
                chunks: 42,
                bytes: 1 << 20,
                tasks_running: 1,
            }),
        }
    }

    #[test]
    fn nearest_peers_come_first_and_unmeasured_ones_last() {
        let mut peers = vec![
            peer("12D3KooWunmeasuredBBBBBBBBBB", None, false),
            peer("12D3KooWfarAAAAAAAAAAAAAAAAA", Some(80.0), true),
            peer("12D3KooWunmeasuredAAAAAAAAAA", None, false),
            peer("12D3KooWnearAAAAAAAAAAAAAAAA", Some(0.4), true),
        ];
        sort_nearest_first(&mut peers);
        let order: Vec<&str> = peers.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(
            order,
            [
                "12D3KooWnearAAAAAAAAAAAAAAAA",
                "12D3KooWfarAAAAAAAAAAAAAAAAA",
                "12D3KooWunmeasuredAAAAAAAAAA",
                "12D3KooWunmeasuredBBBBBBBBBB",
            ]
        );
    }

    #[test]
    fn the_table_shows_every_column() {
        let response = PeersResponse {
            peers: vec![
                peer("12D3KooWnearAAAAAAAAAAAAAAAA", Some(0.44), true),
                PeerSummary {
                    rtt_provisional: true,
                    ..peer("12D3KooWjoiningAAAAAAAAAAAAA", Some(88.8), false)
                },
                peer("12D3KooWunmeasuredBBBBBBBBBB", None, false),
            ],
        };
        let text = render(&response);
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        for column in [
            "PEER",
            "ZONE",
            "ROLE",
            "RTT",
            "LIVENESS",
            "CPU%",
            "DISK FREE",
            "CHUNKS",
        ] {
            assert!(header.contains(column), "{header}");
        }
        let near = lines.next().unwrap();
        assert!(near.starts_with("…AAAAAAAAAA  eu-west  storage"), "{near}");
        for value in ["0.4 ms", "alive", "12.5", "3.0 GiB", "42"] {
            assert!(near.contains(value), "{value} missing from {near}");
        }
        let joining = lines.next().unwrap();
        assert!(joining.contains("~88.8 ms"), "{joining}");
        let unmeasured = lines.next().unwrap();
        assert!(unmeasured.starts_with("…BBBBBBBBBB"), "{unmeasured}");
        assert!(
            unmeasured.ends_with("alive        -          -       -"),
            "{unmeasured}"
        );
        assert_eq!(lines.next(), None);
    }

    #[test]
    fn no_peers_says_how_to_get_some() {
        let text = render(&PeersResponse { peers: Vec::new() });
        assert_eq!(text, format!("{NO_PEERS}\n"));
        assert!(text.contains("--bootstrap"));
    }
}
