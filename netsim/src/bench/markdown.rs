//! Markdown tables for the benchmark report: padded so they read well as plain text too,
//! numeric columns aligned right.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Lines printed under the table: what was measured, and how.
    pub notes: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Self {
        Self {
            title: title.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The table as markdown: `### title`, the table, then the notes as a list.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let cell = |row: &[String], i: usize| escape(row.get(i).map_or("", String::as_str));
        let numeric: Vec<bool> = (0..columns)
            .map(|i| {
                !self.rows.is_empty()
                    && self.rows.iter().all(|r| {
                        let c = cell(r, i);
                        c.is_empty() || c == "-" || is_number(&c)
                    })
            })
            .collect();
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| cell(r, i).chars().count())
                    .chain([cell(&self.headers, i).chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line = |row: &[String]| {
            let cells: Vec<String> = (0..columns)
                .map(|i| {
                    let c = cell(row, i);
                    if numeric[i] {
                        format!("{c:>w$}", w = widths[i])
                    } else {
                        format!("{c:<w$}", w = widths[i])
                    }
                })
                .collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let mut out = format!("### {}\n\n", self.title);
        out.push_str(&line(&self.headers));
        let rule: Vec<String> = (0..columns)
            .map(|i| {
                if numeric[i] {
                    format!("{}:", "-".repeat(widths[i] - 1))
                } else {
                    "-".repeat(widths[i])
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", rule.join(" | ")));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                out.push_str(&format!("- {}\n", escape_note(note)));
            }
        }
        out
    }
}

fn is_number(text: &str) -> bool {
    text.trim_end_matches('%').parse::<f64>().is_ok()
}

/// A cell never breaks the table: `|` is escaped, line breaks become spaces.
fn escape(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn escape_note(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// A number with `decimals` places, or `-` when missing.
pub fn num(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_escaped_tables() {
        let mut t = Table::new("put", &["phase", "MB/s", "note"]);
        t.row(vec!["to W=2".into(), "812.5".into(), "a|b".into()]);
        t.row(vec!["all".into(), "90.0".into(), "-".into()]);
        t.note("sizes are MiB");
        let text = t.render();
        let expected = "### put\n\n\
                        | phase  |  MB/s | note |\n\
                        | ------ | ----: | ---- |\n\
                        | to W=2 | 812.5 | a\\|b |\n\
                        | all    |  90.0 | -    |\n\
                        \n\
                        - sizes are MiB\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn short_rows_and_empty_tables() {
        let mut t = Table::new("x", &["a", "b"]);
        t.row(vec!["only\none".into()]);
        let text = t.render();
        assert!(text.contains("| only one |     |\n"), "{text}");
        let empty = Table::new("none", &["a"]).render();
        assert_eq!(empty, "### none\n\n| a   |\n| --- |\n");
    }

    #[test]
    fn numbers() {
        assert_eq!(num(Some(1.23456), 2), "1.23");
        assert_eq!(num(None, 1), "-");
        assert_eq!(num(Some(f64::NAN), 1), "-");
        assert!(is_number("12.5") && is_number("50%") && !is_number("1.2 s"));
    }
}
