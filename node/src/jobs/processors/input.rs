//! Turning a chunk into records (JSONL lines or CSV rows), and the reject lines of records
//! that cannot go on.
//!
//! Every record remembers where it came from (its line and byte span in the chunk), so a
//! stage that rejects it can report the record as it was read, without a copy of each record
//! being kept on the way.

use std::borrow::Cow;
use std::ops::Range;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{Format, TaskError, value};

/// One record on its way through the stages.
#[derive(Debug)]
pub(crate) struct Record {
    /// 1-based line of the chunk on which the record starts.
    pub line: u64,
    /// The record's bytes in the chunk.
    pub span: Range<usize>,
    /// Always a JSON object.
    pub value: Value,
}

/// Sum of the input bytes of `records`.
pub(crate) fn input_bytes(records: &[Record]) -> u64 {
    records.iter().map(|r| r.span.len() as u64).sum()
}

/// The chunk being processed, to read a rejected record back as it was.
#[derive(Debug)]
pub(crate) struct Source<'a> {
    pub data: &'a [u8],
    pub format: Format,
    pub header: Option<&'a CsvHeader>,
}

impl Source<'_> {
    /// The record at `span` as it was read (null if it no longer parses, which cannot happen
    /// for a span that parsed before).
    fn original(&self, span: &Range<usize>) -> Value {
        let Some(bytes) = self.data.get(span.clone()) else {
            return Value::Null;
        };
        match (self.format, self.header) {
            (Format::Jsonl, _) => serde_json::from_slice(trim_line(bytes)).unwrap_or(Value::Null),
            (Format::Csv, Some(header)) => {
                let mut reader = csv_reader(bytes);
                let mut row = csv::ByteRecord::new();
                match reader.read_byte_record(&mut row) {
                    Ok(true) => header.object(&row).unwrap_or(Value::Null),
                    _ => Value::Null,
                }
            }
            (Format::Csv, None) => Value::Null,
        }
    }
}

/// One line of the rejects output. Fields serialise in this order whatever serde_json's map
/// order is.
#[derive(Serialize)]
struct RejectLine<'a> {
    line: u64,
    reason: &'a str,
    /// The record as read, when it parsed.
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<&'a Value>,
    /// The text of a line that did not parse.
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<Cow<'a, str>>,
}

/// The rejected records of one chunk, as JSONL lines, put in line order at the end.
#[derive(Debug, Default)]
pub(crate) struct Rejects {
    lines: Vec<(u64, Vec<u8>)>,
}

impl Rejects {
    /// Rejects a parsed record; the reject line carries the record as it was read.
    pub fn record(&mut self, source: &Source<'_>, record: &Record, reason: &str) {
        let original = source.original(&record.span);
        self.push(RejectLine {
            line: record.line,
            reason,
            record: Some(&original),
            raw: None,
        });
    }

    /// Rejects a line or row that did not parse; the reject line carries its text.
    pub fn raw(&mut self, line: u64, text: &[u8], reason: &str) {
        self.push(RejectLine {
            line,
            reason,
            record: None,
            raw: Some(String::from_utf8_lossy(trim_line(text))),
        });
    }

    fn push(&mut self, reject: RejectLine<'_>) {
        let mut out = Vec::new();
        if serde_json::to_writer(&mut out, &reject).is_ok() {
            out.push(b'\n');
            self.lines.push((reject.line, out));
        }
    }

    /// The reject lines in line order.
    pub fn into_bytes(mut self) -> Vec<u8> {
        self.lines.sort_by_key(|(line, _)| *line);
        self.lines.into_iter().flat_map(|(_, l)| l).collect()
    }
}

/// A line without its `\n` or `\r\n`.
fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Reads a chunk's records a batch at a time, so that the stages can handle each batch and
/// let go of its parsed values before the next is parsed: the allocator then hands the same
/// memory, still in cache, to the next batch instead of growing by a whole chunk's values and
/// freeing them all at the end.
pub(crate) enum RecordReader<'a> {
    /// One JSON object per line; blank lines are skipped, other lines that are not a JSON
    /// object are rejected.
    Jsonl {
        data: &'a [u8],
        start: usize,
        line_no: u64,
    },
    /// RFC 4180 CSV (a quoted field may hold newlines). In the object's first chunk the first
    /// row is the header: it is skipped, and read as the header when none was given.
    Csv {
        data: &'a [u8],
        reader: Box<csv::Reader<&'a [u8]>>,
        row: csv::ByteRecord,
        header: Option<CsvHeader>,
        skip_header: bool,
        done: bool,
    },
}

impl<'a> RecordReader<'a> {
    pub fn new(
        format: Format,
        data: &'a [u8],
        csv_header: Option<&[u8]>,
        first_chunk: bool,
    ) -> Result<Self, TaskError> {
        match format {
            Format::Jsonl => Ok(Self::Jsonl {
                data,
                start: 0,
                line_no: 0,
            }),
            Format::Csv => {
                let header = csv_header.map(CsvHeader::parse).transpose()?;
                if header.is_none() && !first_chunk {
                    return Err(TaskError::CsvHeader(
                        "no header given for a chunk after the first".into(),
                    ));
                }
                Ok(Self::Csv {
                    data,
                    reader: Box::new(csv_reader(data)),
                    row: csv::ByteRecord::new(),
                    header,
                    skip_header: first_chunk,
                    done: false,
                })
            }
        }
    }

    /// The CSV header in use (none for JSONL, and for a first chunk before its first row).
    pub fn header(&self) -> Option<&CsvHeader> {
        match self {
            Self::Jsonl { .. } => None,
            Self::Csv { header, .. } => header.as_ref(),
        }
    }

    /// True once every record has been read.
    pub fn is_done(&self) -> bool {
        match self {
            Self::Jsonl { data, start, .. } => *start >= data.len(),
            Self::Csv { done, .. } => *done,
        }
    }

    /// Reads records into `records` until it holds `max` or the chunk ends; lines or rows that
    /// do not parse go to `rejects`. Returns how many lines or rows were seen (blank lines and
    /// a CSV header excluded), rejected ones included.
    pub fn fill(
        &mut self,
        records: &mut Vec<Record>,
        rejects: &mut Rejects,
        max: usize,
    ) -> Result<u64, TaskError> {
        match self {
            Self::Jsonl {
                data,
                start,
                line_no,
            } => Ok(fill_jsonl(data, start, line_no, records, rejects, max)),
            Self::Csv {
                data,
                reader,
                row,
                header,
                skip_header,
                done,
            } => {
                let mut seen = 0;
                while records.len() < max && !*done {
                    if !read_csv_row(data, reader, row, header, skip_header, records, rejects)? {
                        *done = true;
                    } else {
                        seen += 1;
                    }
                }
                Ok(seen)
            }
        }
    }
}

fn fill_jsonl(
    data: &[u8],
    start: &mut usize,
    line_no: &mut u64,
    records: &mut Vec<Record>,
    rejects: &mut Rejects,
    max: usize,
) -> u64 {
    let mut seen = 0;
    while *start < data.len() && records.len() < max {
        let end = memchr::memchr(b'\n', &data[*start..]).map_or(data.len(), |i| *start + i + 1);
        *line_no += 1;
        let span = *start..end;
        let line = trim_line(&data[span.clone()]);
        *start = end;
        match serde_json::from_slice::<Value>(line) {
            Ok(value @ Value::Object(_)) => {
                seen += 1;
                records.push(Record {
                    line: *line_no,
                    span,
                    value,
                });
            }
            Ok(other) => {
                seen += 1;
                let reason = format!("not a JSON object but {}", value::type_name(&other));
                rejects.raw(*line_no, line, &reason);
            }
            // Blank lines fail to parse too; checking only then keeps the common case fast.
            Err(_) if line.iter().all(u8::is_ascii_whitespace) => {}
            Err(e) => {
                seen += 1;
                rejects.raw(*line_no, line, &format!("invalid JSON: {e}"));
            }
        }
    }
    seen
}

/// A CSV header: the names of the columns, in order.
#[derive(Debug, Clone)]
pub(crate) struct CsvHeader {
    names: Vec<String>,
}

impl CsvHeader {
    /// Parses the raw header line.
    pub fn parse(line: &[u8]) -> Result<Self, TaskError> {
        let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        let mut reader = csv_reader(line);
        let mut row = csv::ByteRecord::new();
        match reader.read_byte_record(&mut row) {
            Ok(true) => Self::from_row(&row),
            Ok(false) => Err(TaskError::CsvHeader("the header line is empty".into())),
            Err(e) => Err(TaskError::CsvHeader(e.to_string())),
        }
    }

    fn from_row(row: &csv::ByteRecord) -> Result<Self, TaskError> {
        let mut names = Vec::with_capacity(row.len());
        for (i, field) in row.iter().enumerate() {
            let name = std::str::from_utf8(field).map_err(|_| {
                TaskError::CsvHeader(format!("column {} name is not valid UTF-8", i + 1))
            })?;
            if names.iter().any(|n| n == name) {
                return Err(TaskError::CsvHeader(format!(
                    "column name {name:?} appears more than once"
                )));
            }
            names.push(name.to_owned());
        }
        Ok(Self { names })
    }

    /// The row as an object of strings keyed by column name.
    fn object(&self, row: &csv::ByteRecord) -> Result<Value, String> {
        if row.len() != self.names.len() {
            return Err(format!(
                "expected {} fields as in the header, found {}",
                self.names.len(),
                row.len()
            ));
        }
        let mut object = Map::new();
        for (name, field) in self.names.iter().zip(row.iter()) {
            let text = std::str::from_utf8(field)
                .map_err(|_| format!("field {name:?} is not valid UTF-8"))?;
            object.insert(name.clone(), Value::String(text.to_owned()));
        }
        Ok(Value::Object(object))
    }
}

fn csv_reader(data: &[u8]) -> csv::Reader<&[u8]> {
    // Field counts are checked against the header here, so a short row is a reject naming its
    // line, not an error that stops the chunk.
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(data)
}

/// Reads the next CSV row that is a record (skipping the header row of a first chunk, and
/// taking the header from it when none was given) into `records`, or into `rejects` when its
/// fields do not match the header. False at the end of the chunk.
fn read_csv_row(
    data: &[u8],
    reader: &mut csv::Reader<&[u8]>,
    row: &mut csv::ByteRecord,
    header: &mut Option<CsvHeader>,
    skip_header: &mut bool,
    records: &mut Vec<Record>,
    rejects: &mut Rejects,
) -> Result<bool, TaskError> {
    loop {
        match reader.read_byte_record(row) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => return Err(TaskError::Csv(e.to_string())),
        }
        let (mut line, start) = row
            .position()
            .map_or((0, 0), |p| (p.line(), p.byte() as usize));
        let mut start = start.min(data.len());
        // The reader's position of a row after blank lines is where the blank lines start.
        while let Some(&b) = data.get(start).filter(|b| matches!(b, b'\n' | b'\r')) {
            line += u64::from(b == b'\n');
            start += 1;
        }
        let end = (reader.position().byte() as usize).clamp(start, data.len());
        let text = data.get(start..end).unwrap_or_default();
        if *skip_header {
            *skip_header = false;
            if header.is_none() {
                *header = Some(CsvHeader::from_row(row)?);
            }
            continue;
        }
        let Some(columns) = header.as_ref() else {
            continue;
        };
        match columns.object(row) {
            Ok(value) => records.push(Record {
                line,
                span: start..end,
                value,
            }),
            Err(reason) => rejects.raw(line, text, &reason),
        }
        return Ok(true);
    }
}
