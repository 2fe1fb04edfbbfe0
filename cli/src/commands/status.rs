//! `meshctl status`: the node's identity, addresses, storage, health and mesh peers as aligned
//! key/value lines (a list value continues on the following lines, under its first item).

use std::fmt::Write as _;
use std::time::Duration;

use mesh_proto::api::StatusResponse;

use crate::client::Client;
use crate::error::Error;
use crate::output::{self, human_bytes};

use super::scrub;

pub async fn run(client: &Client, json: bool) -> Result<(), Error> {
    let status = client.status().await?;
    if json {
        output::print_json(&status)
    } else {
        output::print(&render(&status))
    }
}

fn render(status: &StatusResponse) -> String {
    let used = status
        .disk_total_bytes
        .saturating_sub(status.disk_free_bytes);
    let used_percent = if status.disk_total_bytes == 0 {
        0.0
    } else {
        used as f64 * 100.0 / status.disk_total_bytes as f64
    };
    let rows = [
        ("node id", status.node_id.clone()),
        ("version", status.version.clone()),
        ("data dir", status.data_dir.clone()),
        ("api address", status.api_addr.clone()),
        (
            "uptime",
            humantime::format_duration(Duration::from_secs(status.uptime_secs)).to_string(),
        ),
        ("objects", status.objects.to_string()),
        ("chunks", status.chunks.to_string()),
        ("stored", human_bytes(status.stored_bytes)),
        (
            "disk",
            format!(
                "{} free of {} ({used_percent:.0}% used)",
                human_bytes(status.disk_free_bytes),
                human_bytes(status.disk_total_bytes)
            ),
        ),
        (
            "below target",
            format!("{} objects", status.objects_below_target),
        ),
        (
            "completing",
            format!(
                "{} objects (holders beyond the write quorum)",
                status.objects_completing
            ),
        ),
        (
            "repair backlog",
            format!("{} objects (this node repairs them)", status.repair_backlog),
        ),
        (
            "gc backlog",
            format!(
                "{} chunks ({}) waiting out the grace, {} deletes being delivered",
                status.gc_pending_chunks,
                human_bytes(status.gc_pending_bytes),
                status.deletes_delivering
            ),
        ),
        ("default redundancy", status.default_redundancy.to_string()),
        ("zone", output::cell(&status.zone)),
        ("listen addresses", list(&status.listen_addrs)),
        ("external addresses", list(&status.external_addrs)),
        (
            "peers",
            format!("{} alive of {} known", status.peers_alive, status.peers),
        ),
        (
            "served to peers",
            format!(
                "{} chunks, {}",
                status.chunks_served,
                human_bytes(status.bytes_served)
            ),
        ),
        (
            "scrub",
            status
                .scrub
                .as_ref()
                .map_or_else(|| "-".to_owned(), |s| scrub::summary(s, scrub::now_ms())),
        ),
    ];
    render_rows(rows)
}

/// `key  value` lines with the values aligned; a multi-line value continues under its first
/// line.
pub(super) fn render_rows(rows: impl IntoIterator<Item = (&'static str, String)>) -> String {
    let rows: Vec<_> = rows.into_iter().collect();
    let width = rows.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    let mut text = String::new();
    for (key, value) in rows {
        let mut lines = value.lines();
        let first = lines.next().unwrap_or("");
        let _ = writeln!(text, "{key:<width$}  {first}");
        for line in lines {
            let _ = writeln!(text, "{:<width$}  {line}", "");
        }
    }
    text
}

/// One item per line, or `-` for none.
fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::Redundancy;

    use super::*;

    #[test]
    fn every_field_is_shown_aligned() {
        let status = StatusResponse {
            node_id: "12D3KooW".into(),
            version: "0.1.0".into(),
            data_dir: "/var/lib/mesh".into(),
            api_addr: "127.0.0.1:5080".into(),
            uptime_secs: 3723,
            objects: 2,
            chunks: 7,
            stored_bytes: 3 << 20,
            disk_free_bytes: 1 << 30,
            disk_total_bytes: 4 << 30,
            objects_below_target: 1,
            default_redundancy: Redundancy::DEFAULT,
            zone: "eu-west".into(),
            listen_addrs: vec![
                "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
                "/ip6/::/udp/4001/quic-v1".into(),
            ],
            external_addrs: Vec::new(),
            peers: 3,
            peers_alive: 2,
            objects_completing: 1,
            chunks_served: 4,
            bytes_served: 3 << 20,
            repair_backlog: 2,
            gc_pending_chunks: 3,
            gc_pending_bytes: 2 << 20,
            deletes_delivering: 1,
            scrub: None,
        };
        let text = render(&status);
        assert!(text.contains("uptime              1h 2m 3s\n"), "{text}");
        assert!(
            text.contains("disk                1.0 GiB free of 4.0 GiB (75% used)\n"),
            "{text}"
        );
        assert!(text.contains("default redundancy  rep:3\n"), "{text}");
        assert!(
            text.contains("served to peers     4 chunks, 3.0 MiB\n"),
            "{text}"
        );
        assert!(text.contains("zone                eu-west\n"), "{text}");
        assert!(
            text.contains(
                "listen addresses    /ip4/0.0.0.0/udp/4001/quic-v1\n                    \
                 /ip6/::/udp/4001/quic-v1\n"
            ),
            "{text}"
        );
        assert!(text.contains("external addresses  -\n"), "{text}");
        assert!(
            text.contains("peers               2 alive of 3 known\n"),
            "{text}"
        );
        assert!(
            text.contains("completing          1 objects (holders beyond the write quorum)\n"),
            "{text}"
        );
        assert!(
            text.contains("repair backlog      2 objects (this node repairs them)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "gc backlog          3 chunks (2.0 MiB) waiting out the grace, 1 deletes being delivered\n"
            ),
            "{text}"
        );
        assert!(text.contains("scrub               -\n"), "{text}");
        assert_eq!(text.lines().count(), 21);
    }
}
