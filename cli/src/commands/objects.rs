//! `meshctl ls`, `stat` and `rm`: the catalogue of stored objects.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use mesh_proto::ObjectId;
use mesh_proto::api::{ChunkStat, DeleteResponse, ObjectSummary, StatResponse};

use crate::client::Client;
use crate::error::Error;
use crate::output::{self, Align, cell, human_bytes, short_peer_id};

/// Lists every object, page by page. Each page is printed as it arrives, so a large catalogue
/// never sits in memory; with `--json` the pages form one JSON array.
pub async fn ls(client: &Client, json: bool) -> Result<(), Error> {
    let mut after = None;
    let mut first_page = true;
    let mut first_object = true;
    loop {
        // Fetched before anything is printed, so a failing first request leaves stdout empty.
        let page = client.list(after).await?;
        let mut text = String::new();
        if first_page {
            text.push_str(if json { "[" } else { &TABLE_HEADER });
            first_page = false;
        }
        for object in &page.objects {
            if json {
                let line = serde_json::to_string(object)
                    .map_err(|e| Error::BadResponse(format!("cannot print as JSON: {e}")))?;
                text.push_str(if first_object { "\n  " } else { ",\n  " });
                text.push_str(&line);
            } else {
                push_row(&mut text, object);
            }
            first_object = false;
        }
        output::print(&text)?;
        // A `next` that does not move forward would loop for ever; a node doing that is buggy,
        // and what was listed so far is all there is to show.
        match page.next {
            Some(next) if !page.objects.is_empty() && Some(next) != after => after = Some(next),
            _ => break,
        }
    }
    if json {
        output::print("\n]\n")?;
    }
    Ok(())
}

const ID_WIDTH: usize = 64;

static TABLE_HEADER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{:<ID_WIDTH$}  {:>10}  {:>6}  {:<10}  NAME\n",
        "ID", "SIZE", "CHUNKS", "REDUNDANCY"
    )
});

fn push_row(text: &mut String, object: &ObjectSummary) {
    let name = object
        .name
        .as_deref()
        .map_or_else(|| "-".to_owned(), display_name);
    let _ = writeln!(
        text,
        "{:<ID_WIDTH$}  {:>10}  {:>6}  {:<10}  {}",
        object.id.to_string(),
        human_bytes(object.size),
        object.chunks,
        object.redundancy.to_string(),
        name
    );
}

/// Object names come from whoever uploaded them; control characters are escaped so that a
/// name cannot rewrite the operator's terminal.
fn display_name(name: &str) -> String {
    if name.chars().any(char::is_control) {
        name.escape_debug().to_string()
    } else {
        name.to_owned()
    }
}

pub async fn stat(client: &Client, id: ObjectId, json: bool) -> Result<(), Error> {
    let stat = client.stat(&id).await?;
    if json {
        output::print_json(&stat)
    } else {
        output::print(&render_stat(&stat))
    }
}

/// The object's details, whether it meets its redundancy target, and a row per chunk followed
/// by one indented line per holder: short peer id, zone, RTT from the node, liveness.
fn render_stat(stat: &StatResponse) -> String {
    let object = &stat.object;
    let width = object.redundancy.width();
    let created = UNIX_EPOCH + Duration::from_millis(object.created_ms);
    let mut text = String::new();
    let _ = writeln!(text, "id          {}", object.id);
    let _ = writeln!(
        text,
        "name        {}",
        object
            .name
            .as_deref()
            .map_or_else(|| "-".into(), display_name)
    );
    let _ = writeln!(
        text,
        "size        {} ({} bytes)",
        human_bytes(object.size),
        object.size
    );
    let _ = writeln!(
        text,
        "created     {}",
        humantime::format_rfc3339_seconds(created)
    );
    let _ = writeln!(text, "chunker     {}", stat.chunker);
    let _ = writeln!(text, "redundancy  {}", object.redundancy);
    let _ = writeln!(text, "chunks      {}", object.chunks);
    let erasure = stat.chunks.iter().any(|c| !c.shards.is_empty());
    let target = if stat.meets_target && erasure {
        format!("met: every chunk has its {width} shards on live holders")
    } else if stat.meets_target {
        format!("met: every chunk has at least {width} holders")
    } else if erasure {
        let short = stat
            .chunks
            .iter()
            .filter(|c| live_shards(c) < width)
            .count();
        format!(
            "NOT met: {short} of {} chunks have fewer than {width} live shards",
            stat.chunks.len()
        )
    } else {
        let short = stat
            .chunks
            .iter()
            .filter(|c| holder_count(c) < width)
            .count();
        format!(
            "NOT met: {short} of {} chunks have fewer than {width} holders",
            stat.chunks.len()
        )
    };
    let _ = writeln!(text, "target      {target}");
    if stat.chunks.is_empty() {
        return text;
    }
    let _ = writeln!(
        text,
        "\n{:>6}  {:<8}  {:>14}  {:>10}  HOLDERS",
        "#", "CHUNK", "OFFSET", "LEN"
    );
    // Holder lines are aligned across all chunks, so zones and RTTs form columns.
    let per_chunk: Vec<Vec<Vec<String>>> = stat.chunks.iter().map(holder_rows).collect();
    let flat: Vec<Vec<String>> = per_chunk.iter().flatten().cloned().collect();
    let mut holder_lines = output::align_rows(&HOLDER_ALIGN, &flat).into_iter();
    for ((index, chunk), rows) in stat.chunks.iter().enumerate().zip(&per_chunk) {
        let count = if chunk.shards.is_empty() {
            holder_count(chunk)
        } else {
            live_shards(chunk)
        };
        let _ = writeln!(
            text,
            "{index:>6}  {:<8}  {:>14}  {:>10}  {count}/{width}",
            chunk.id.short(),
            chunk.offset,
            human_bytes(u64::from(chunk.len)),
        );
        if chunk.shards.is_empty() {
            for line in holder_lines.by_ref().take(rows.len()) {
                let _ = writeln!(text, "{:8}{line}", "");
            }
        } else {
            // One line per shard: its index and id, then its holder.
            let mut shard_of_line =
                chunk.shards.iter().enumerate().flat_map(|(s, shard)| {
                    std::iter::repeat_n((s, shard), shard.placed.len().max(1))
                });
            for line in holder_lines.by_ref().take(rows.len()) {
                let (s, shard) = shard_of_line.next().unwrap_or((0, &chunk.shards[0]));
                let _ = writeln!(text, "{:8}s{s:<3} {:<8}  {line}", "", shard.id.short());
            }
        }
    }
    text
}

/// Shards of an erasure-coded chunk that have a live holder (or the answering node).
fn live_shards(chunk: &ChunkStat) -> usize {
    chunk
        .shards
        .iter()
        .filter(|s| {
            s.placed
                .iter()
                .any(|h| h.liveness == "self" || h.liveness == "alive")
        })
        .count()
}

/// Holder lines: id, zone, RTT (right-aligned), liveness.
const HOLDER_ALIGN: [Align; 4] = [Align::Left, Align::Left, Align::Right, Align::Left];

/// A chunk's holders as table cells: from `placed` when the node sent it, else just the ids
/// of `holders` (an older node).
fn holder_rows(chunk: &ChunkStat) -> Vec<Vec<String>> {
    if !chunk.shards.is_empty() {
        return chunk
            .shards
            .iter()
            .flat_map(|shard| {
                if shard.placed.is_empty() {
                    return vec![vec!["(no holder)".to_owned()]];
                }
                shard.placed.iter().map(holder_cells).collect()
            })
            .collect();
    }
    if chunk.placed.is_empty() {
        chunk
            .holders
            .iter()
            .map(|id| vec![short_peer_id(id)])
            .collect()
    } else {
        chunk.placed.iter().map(holder_cells).collect()
    }
}

fn holder_cells(holder: &mesh_proto::api::HolderStat) -> Vec<String> {
    vec![
        short_peer_id(&holder.id),
        cell(&holder.zone),
        output::rtt(holder.rtt_ms),
        cell(&holder.liveness),
    ]
}

fn holder_count(chunk: &ChunkStat) -> usize {
    chunk.holders.len().max(chunk.placed.len())
}

pub async fn rm(client: &Client, id: ObjectId, json: bool) -> Result<(), Error> {
    let deleted = client.delete(&id).await?;
    if json {
        return output::print_json(&deleted);
    }
    output::print(&removed_text(&deleted))
}

fn removed_text(deleted: &DeleteResponse) -> String {
    let mut text = format!(
        "removed {}: freed {} chunks ({}) on this node, deleted once the gc grace has passed",
        deleted.id,
        deleted.freed_chunks,
        human_bytes(deleted.freed_bytes)
    );
    if deleted.holders_told + deleted.holders_pending > 0 {
        let _ = write!(text, "; told {} other holders", deleted.holders_told);
        if deleted.holders_pending > 0 {
            let _ = write!(
                text,
                ", {} more are told in the background",
                deleted.holders_pending
            );
        }
    }
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use mesh_proto::api::{HolderStat, ShardStat};
    use mesh_proto::{ChunkId, ChunkerSpec, Redundancy};

    use super::*;

    #[test]
    fn rm_says_what_waits_for_the_grace_and_who_was_told() {
        let mut deleted = DeleteResponse {
            id: ObjectId::of(b"x"),
            freed_chunks: 2,
            freed_bytes: 2 << 20,
            holders_told: 0,
            holders_pending: 0,
        };
        let alone = removed_text(&deleted);
        assert!(alone.starts_with(&format!("removed {}: freed 2 chunks (2.0 MiB)", deleted.id)));
        assert!(!alone.contains("told"), "{alone}");
        deleted.holders_told = 1;
        deleted.holders_pending = 1;
        let text = removed_text(&deleted);
        assert!(
            text.ends_with("; told 1 other holders, 1 more are told in the background\n"),
            "{text}"
        );
    }

    #[test]
    fn rows_line_up_with_the_header() {
        let object = ObjectSummary {
            id: ObjectId::of(b"x"),
            name: Some("bad\u{1b}name".into()),
            size: 5 << 20,
            chunks: 5,
            redundancy: Redundancy::Erasure { data: 4, parity: 2 },
            created_ms: 0,
        };
        let mut row = String::new();
        push_row(&mut row, &object);
        assert_eq!(
            row.find("5.0 MiB").map(|i| i + 7),
            TABLE_HEADER.find("SIZE").map(|i| i + 4)
        );
        assert!(row.contains("ec:4+2"), "{row}");
        assert!(row.ends_with("bad\\u{1b}name\n"), "{row}");
    }

    fn holder(id: &str, zone: &str, rtt_ms: Option<f64>, liveness: &str) -> HolderStat {
        HolderStat {
            id: id.into(),
            zone: zone.into(),
            rtt_ms,
            liveness: liveness.into(),
        }
    }

    #[test]
    fn stat_lists_each_holder_with_zone_rtt_and_liveness() {
        let node = "12D3KooWselfSSSSSSSSSSSSSSSS";
        let peer = "12D3KooWpeerPPPPPPPPPPPPPPPP";
        let stat = StatResponse {
            object: ObjectSummary {
                id: ObjectId::of(b"x"),
                name: Some("x.bin".into()),
                size: 3 << 20,
                chunks: 3,
                redundancy: Redundancy::Replicas(2),
                created_ms: 0,
            },
            chunker: ChunkerSpec::DEFAULT_CDC,
            chunks: vec![
                ChunkStat {
                    id: ChunkId::of(b"a"),
                    offset: 0,
                    len: 1 << 20,
                    holders: vec![node.into(), peer.into()],
                    placed: vec![
                        holder(node, "eu-west", None, "self"),
                        holder(peer, "", Some(12.34), "alive"),
                    ],
                    shards: Vec::new(),
                },
                ChunkStat {
                    id: ChunkId::of(b"b"),
                    offset: 1 << 20,
                    len: 1 << 20,
                    holders: vec![node.into()],
                    placed: vec![holder(node, "eu-west", None, "self")],
                    shards: Vec::new(),
                },
                // An older node sends no `placed`.
                ChunkStat {
                    id: ChunkId::of(b"c"),
                    offset: 2 << 20,
                    len: 1 << 20,
                    holders: vec![peer.into()],
                    placed: Vec::new(),
                    shards: Vec::new(),
                },
            ],
            meets_target: false,
        };
        let text = render_stat(&stat);
        assert!(
            text.contains("target      NOT met: 2 of 3 chunks have fewer than 2 holders\n"),
            "{text}"
        );
        assert!(text.contains("HOLDERS\n"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let first = lines.iter().position(|l| l.ends_with("2/2")).unwrap();
        let second = format!(
            "     1  {:<8}         1048576     1.0 MiB  1/2",
            ChunkId::of(b"b").short()
        );
        let third = format!(
            "     2  {:<8}         2097152     1.0 MiB  1/2",
            ChunkId::of(b"c").short()
        );
        assert_eq!(
            &lines[first + 1..],
            [
                "        …SSSSSSSSSS  eu-west        -  self",
                "        …PPPPPPPPPP  -        12.3 ms  alive",
                second.as_str(),
                "        …SSSSSSSSSS  eu-west        -  self",
                third.as_str(),
                "        …PPPPPPPPPP",
            ]
        );
    }

    #[test]
    fn stat_of_an_erasure_coded_object_lists_each_shard_and_its_holder() {
        let node = "12D3KooWselfSSSSSSSSSSSSSSSS";
        let peer = "12D3KooWpeerPPPPPPPPPPPPPPPP";
        let shards = vec![
            ShardStat {
                id: ChunkId::of(b"s0"),
                placed: vec![holder(node, "eu-west", None, "self")],
            },
            ShardStat {
                id: ChunkId::of(b"s1"),
                placed: vec![holder(peer, "us-east", Some(80.0), "dead")],
            },
            ShardStat {
                id: ChunkId::of(b"s2"),
                placed: vec![holder(peer, "us-east", Some(80.0), "alive")],
            },
        ];
        let stat = StatResponse {
            object: ObjectSummary {
                id: ObjectId::of(b"x"),
                name: None,
                size: 1000,
                chunks: 1,
                redundancy: Redundancy::Erasure { data: 2, parity: 1 },
                created_ms: 0,
            },
            chunker: ChunkerSpec::DEFAULT_CDC,
            chunks: vec![ChunkStat {
                id: ChunkId::of(b"a"),
                offset: 0,
                len: 1000,
                holders: vec![node.into(), peer.into(), peer.into()],
                placed: Vec::new(),
                shards,
            }],
            meets_target: false,
        };
        let text = render_stat(&stat);
        assert!(
            text.contains("NOT met: 1 of 1 chunks have fewer than 3 live shards"),
            "{text}"
        );
        assert!(text.contains("2/3\n"), "{text}");
        let s1 = format!(
            "s1   {:<8}  …PPPPPPPPPP  us-east",
            ChunkId::of(b"s1").short()
        );
        assert!(text.contains(&s1), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("s1 ") && l.ends_with("dead")),
            "{text}"
        );
    }
}
