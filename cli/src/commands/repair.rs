//! `meshctl repair`: the node's repair state.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use mesh_proto::api::RepairStatus;

use crate::client::Client;
use crate::error::Error;
use crate::output::{self, human_bytes};

pub async fn run(client: &Client, json: bool) -> Result<(), Error> {
    let state = client.repair().await?;
    if json {
        output::print_json(&state)
    } else {
        output::print(&render(&state))
    }
}

fn render(state: &RepairStatus) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "below target   {} objects", state.below_target);
    let _ = writeln!(
        text,
        "backlog        {} objects (this node is their repairer)",
        state.backlog
    );
    let _ = writeln!(
        text,
        "queued         {} parts, {} since start",
        state.parts_queued,
        human_bytes(state.bytes_queued)
    );
    let last = state
        .last_repair_seconds
        .map_or_else(|| "-".to_owned(), |s| format!("{s:.1} s"));
    let _ = writeln!(text, "last repair    {last}");
    let rate = if state.rate_bytes_per_sec == 0 {
        "unthrottled".to_owned()
    } else {
        format!("{}/s", human_bytes(state.rate_bytes_per_sec))
    };
    let _ = writeln!(text, "rate           {rate}");
    let scan = if state.last_scan_ms == 0 {
        "not yet".to_owned()
    } else {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(state.last_scan_ms))
            .to_string()
    };
    let _ = writeln!(text, "last scan      {scan}");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reads_as_a_short_table() {
        let text = render(&RepairStatus {
            below_target: 3,
            backlog: 2,
            parts_queued: 5,
            bytes_queued: 5 << 20,
            last_repair_seconds: Some(12.25),
            last_scan_ms: 0,
            rate_bytes_per_sec: 64 << 20,
        });
        assert!(text.contains("below target   3 objects\n"), "{text}");
        assert!(text.contains("backlog        2 objects"), "{text}");
        assert!(
            text.contains("queued         5 parts, 5.0 MiB since start"),
            "{text}"
        );
        assert!(
            text.contains("last repair    12.2 s") || text.contains("last repair    12.3 s"),
            "{text}"
        );
        assert!(text.contains("rate           64.0 MiB/s"), "{text}");
        assert!(text.contains("last scan      not yet"), "{text}");
    }
}
