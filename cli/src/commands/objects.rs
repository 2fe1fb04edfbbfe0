//! `meshctl ls`, `stat` and `rm`: the catalogue of stored objects.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use mesh_proto::ObjectId;
use mesh_proto::api::ObjectSummary;

use crate::client::Client;
use crate::error::Error;
use crate::output::{self, human_bytes};

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
        return output::print_json(&stat);
    }
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
    let target = if stat.meets_target {
        format!("met: every chunk has at least {width} holders")
    } else {
        let short = stat
            .chunks
            .iter()
            .filter(|c| c.holders.len() < width)
            .count();
        format!(
            "NOT met: {short} of {} chunks have fewer than {width} holders",
            stat.chunks.len()
        )
    };
    let _ = writeln!(text, "target      {target}");
    if !stat.chunks.is_empty() {
        let _ = writeln!(
            text,
            "\n{:>6}  {:<8}  {:>14}  {:>10}  HOLDERS",
            "#", "CHUNK", "OFFSET", "LEN"
        );
        for (index, chunk) in stat.chunks.iter().enumerate() {
            let holders = if chunk.holders.is_empty() {
                "-".to_owned()
            } else {
                chunk.holders.join(",")
            };
            let _ = writeln!(
                text,
                "{index:>6}  {:<8}  {:>14}  {:>10}  {holders}",
                chunk.id.short(),
                chunk.offset,
                human_bytes(u64::from(chunk.len)),
            );
        }
    }
    output::print(&text)
}

pub async fn rm(client: &Client, id: ObjectId, json: bool) -> Result<(), Error> {
    let deleted = client.delete(&id).await?;
    if json {
        return output::print_json(&deleted);
    }
    output::print(&format!(
        "removed {}: freed {} chunks ({})\n",
        deleted.id,
        deleted.freed_chunks,
        human_bytes(deleted.freed_bytes)
    ))
}

#[cfg(test)]
mod tests {
    use mesh_proto::Redundancy;

    use super::*;

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
}
