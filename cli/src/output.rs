//! How results reach the person or the script: human-readable sizes, aligned tables, JSON on
//! stdout, and the transfer progress bar on stderr (only when stderr is a terminal, so logs and
//! pipes stay clean).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::Error;

/// Writes `text` to stdout. A closed pipe is an error rather than a panic, as `println!` would.
pub fn print(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::local_io("writing", "standard output", e))
}

/// Writes `value` as pretty JSON and a newline to stdout.
pub fn print_json<T: Serialize>(value: &T) -> Result<(), Error> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::BadResponse(format!("cannot print the answer as JSON: {e}")))?;
    text.push('\n');
    print(&text)
}

/// `n` bytes in binary units with one decimal, e.g. `5.0 MiB`; plain bytes below 1 KiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A round-trip time in milliseconds with one decimal, e.g. `12.3 ms`; `-` when unmeasured.
pub fn rtt(ms: Option<f64>) -> String {
    match ms {
        Some(ms) if ms.is_finite() => format!("{ms:.1} ms"),
        _ => "-".to_owned(),
    }
}

/// Characters of a peer id shown in tables (after an ellipsis); `--json` has the full id.
const SHORT_PEER_ID: usize = 10;

/// The tail of a peer id, e.g. `…Ab3xYz9QwE`. The head is no use: every Ed25519 libp2p id
/// starts with `12D3KooW`.
pub fn short_peer_id(id: &str) -> String {
    let count = id.chars().count();
    if count <= SHORT_PEER_ID + 1 {
        return cell(id);
    }
    let tail: String = id.chars().skip(count - SHORT_PEER_ID).collect();
    format!("…{}", cell(&tail))
}

/// Text from the node or its peers made fit for a table cell: `-` for nothing, and control
/// characters escaped so that a peer's zone name cannot rewrite the operator's terminal.
pub fn cell(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else if text.chars().any(char::is_control) {
        text.escape_debug().to_string()
    } else {
        text.to_owned()
    }
}

/// How a table column is aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Rows as lines whose columns are padded to the widest cell and two spaces apart, without
/// trailing spaces. A row may have fewer cells than `aligns` (the rest is empty); extra cells
/// are left-aligned.
pub fn align_rows(aligns: &[Align], rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in rows {
        for (width, text) in widths.iter_mut().zip(row) {
            *width = (*width).max(text.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (index, text) in row.iter().enumerate() {
                if index > 0 {
                    line.push_str("  ");
                }
                let width = widths[index];
                match aligns.get(index).copied().unwrap_or(Align::Left) {
                    Align::Left => {
                        let _ = write!(line, "{text:<width$}");
                    }
                    Align::Right => {
                        let _ = write!(line, "{text:>width$}");
                    }
                }
            }
            line.truncate(line.trim_end().len());
            line
        })
        .collect()
}

/// A table: a header line of `columns`' names, then `rows`, aligned as [`align_rows`] does.
pub fn table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let aligns: Vec<Align> = columns.iter().map(|(_, align)| *align).collect();
    let mut all: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    all.push(columns.iter().map(|(name, _)| (*name).to_owned()).collect());
    all.extend(rows.iter().cloned());
    let mut text = String::new();
    for line in align_rows(&aligns, &all) {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// A progress bar for a transfer of `total` bytes (unknown for stdin), hidden unless stderr is
/// a terminal.
pub fn transfer_bar(verb: &str, total: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(len) => (
            ProgressBar::new(len),
            "{prefix} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ),
        None => (
            ProgressBar::no_length(),
            "{prefix} {spinner} {bytes} {bytes_per_sec} {elapsed}",
        ),
    };
    // The templates are constants; should one ever fail to parse, a plain bar still works.
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(verb.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A progress line for a job being waited for: tasks done of all, and the job's state in the
/// message. Hidden unless stderr is a terminal.
pub fn job_bar(prefix: String) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{prefix} [{wide_bar}] {pos}/{len} tasks done, {msg} {elapsed}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_bytes(1536 * 1024 * 1024), "1.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn rtts_have_one_decimal() {
        assert_eq!(rtt(Some(12.345)), "12.3 ms");
        assert_eq!(rtt(Some(0.0)), "0.0 ms");
        assert_eq!(rtt(None), "-");
        assert_eq!(rtt(Some(f64::NAN)), "-");
    }

    #[test]
    fn peer_ids_are_shortened_to_their_tail() {
        let id = "12D3KooWGzBxR5x6qYb9n4p1s2LQ8WvE7fRk3mJc5dHt9aZ0uVwX";
        assert_eq!(short_peer_id(id), "…Ht9aZ0uVwX");
        assert_eq!(short_peer_id("short"), "short");
        assert_eq!(short_peer_id(""), "-");
        assert_eq!(cell("eu\u{1b}[2J"), "eu\\u{1b}[2J");
    }

    #[test]
    fn tables_line_up() {
        let text = table(
            &[
                ("NAME", Align::Left),
                ("SIZE", Align::Right),
                ("NOTE", Align::Left),
            ],
            &[
                vec!["a".into(), "1.0 KiB".into(), "-".into()],
                vec!["longer".into(), "5 B".into(), "x".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME       SIZE  NOTE\n\
             a       1.0 KiB  -\n\
             longer      5 B  x\n"
        );
        let ragged = align_rows(
            &[Align::Left, Align::Left],
            &[vec!["ab".into()], vec!["a".into(), "b".into()]],
        );
        assert_eq!(ragged, ["ab", "a   b"]);
    }
}
