//! `meshctl status`: the node's identity, storage and health as aligned key/value lines.

use std::fmt::Write as _;
use std::time::Duration;

use mesh_proto::api::StatusResponse;

use crate::client::Client;
use crate::error::Error;
use crate::output::{self, human_bytes};

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
        ("default redundancy", status.default_redundancy.to_string()),
    ];
    let width = rows.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    let mut text = String::new();
    for (key, value) in rows {
        let _ = writeln!(text, "{key:<width$}  {value}");
    }
    text
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
        };
        let text = render(&status);
        assert!(text.contains("uptime              1h 2m 3s\n"), "{text}");
        assert!(
            text.contains("disk                1.0 GiB free of 4.0 GiB (75% used)\n"),
            "{text}"
        );
        assert!(text.contains("default redundancy  rep:3\n"), "{text}");
        assert_eq!(text.lines().count(), 11);
    }
}
