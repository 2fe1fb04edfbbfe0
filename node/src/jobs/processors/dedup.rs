//! `dedup`: one record per key, the latest by a timestamp field. It shuffles: the map side
//! sends each record to a reduce partition by the hash of its key, and the reduce side keeps
//! one record per key.
//!
//! Parameters: `key`, comma-separated field names or dotted paths (`user.id,day`); `ts`
//! (optional), the timestamp field.
//!
//! - A record's key is the compact JSON array of its key fields' values, a missing field
//!   counting as `null`. So records that lack every key field share the key `[null]` (and one
//!   of them is kept), and keys compare by their encoding: `1`, `1.0` and `"1"` are three
//!   different keys.
//! - Partition: the first 8 bytes of the key's BLAKE3 hash, little-endian, modulo the number
//!   of partitions: the same on every platform and in every version that keeps this rule.
//! - Which record is kept: the greatest `ts` (missing or null oldest, then false, true,
//!   numbers numerically, strings byte-wise, arrays and objects); between equal timestamps,
//!   or without `ts`, the record whose written form (its line as read, or its compact JSON
//!   after a `map` stage: see the processors' module doc) is greatest byte-wise. The choice
//!   depends only on the set of records, not on their order or on how they were partitioned.
//! - The map side writes each partition's shuffle lines sorted by key, and the reduce side
//!   merges them ([`Merge`]): its output lists the kept records sorted by key (byte-wise on
//!   the key encoding).

use std::cmp::Ordering;
use std::ops::Range;

use serde_json::Value;

use super::value::{self, FieldPath};

/// A parsed `dedup` stage.
#[derive(Debug)]
pub(crate) struct Dedup {
    key: Vec<FieldPath>,
    ts: Option<FieldPath>,
}

impl Dedup {
    /// Parses the parameters; errors name the parameter at fault.
    pub fn new(key: &str, ts: Option<&str>) -> Result<Self, (&'static str, String)> {
        let key = key
            .split(',')
            .map(|field| value::parse_path(field.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ("key", e))?;
        let ts = ts
            .map(|t| value::parse_path(t.trim()))
            .transpose()
            .map_err(|e| ("ts", e))?;
        Ok(Self { key, ts })
    }

    /// Writes the key of `record` to `out` (cleared first).
    #[cfg(test)]
    pub fn write_key(&self, record: &Value, out: &mut Vec<u8>) {
        out.clear();
        self.append_key(record, out);
    }

    /// Appends the key of `record` to `out`.
    pub fn append_key(&self, record: &Value, out: &mut Vec<u8>) {
        out.push(b'[');
        for (i, path) in self.key.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            value::write_json(out, value::lookup(record, path).unwrap_or(&Value::Null));
        }
        out.push(b']');
    }

    /// Adds a record to the map side's shuffle lines: its key and reduce partition
    /// (`partitions` must be at least 1), its timestamp, and its written form, unless `read`
    /// (where its line is in the chunk) says it is written as it was read. Nothing of `record`
    /// is kept, so the caller can drop it.
    pub fn add(
        &self,
        lines: &mut Keys,
        record: &Value,
        read: Option<Range<usize>>,
        partitions: u32,
    ) {
        let start = lines.bytes.len();
        self.append_key(record, &mut lines.bytes);
        lines
            .partitions
            .push(partition_of(&lines.bytes[start..], partitions));
        lines.ends.push(lines.bytes.len());
        if let Some(ts) = self.ts(record) {
            value::write_json(&mut lines.tails, ts);
        }
        lines.tails.push(b'\t');
        if read.is_none() {
            value::write_json(&mut lines.tails, record);
        }
        lines.tail_ends.push(lines.tails.len());
        lines.read.push(read);
    }

    /// The timestamp of `record`.
    fn ts<'v>(&self, record: &'v Value) -> Option<&'v Value> {
        self.ts
            .as_ref()
            .and_then(|path| value::lookup(record, path))
    }
}

/// The map side's shuffle lines of one chunk, as [`Dedup::add`] gathers them: record `i`'s key
/// is `bytes[ends[i - 1]..ends[i]]`, its partition `partitions[i]`, and the rest of its line
/// (`TS \t`, then its compact JSON unless `read[i]` places its line in the chunk) is likewise
/// in `tails`.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    pub bytes: Vec<u8>,
    pub ends: Vec<usize>,
    pub partitions: Vec<u32>,
    tails: Vec<u8>,
    tail_ends: Vec<usize>,
    read: Vec<Option<Range<usize>>>,
}

impl Keys {
    /// The records' indices ordered by partition, then key (byte-wise), then index: the order
    /// the map side writes shuffle lines in. Keys often share a long prefix (`["user-000…`),
    /// so the sort compares 8 bytes of each key as one integer first, taken after the prefix
    /// all keys share, and the rest byte-wise only on a tie.
    pub fn order(&self) -> Vec<usize> {
        let n = self.ends.len();
        let common = (1..n).fold(self.get(0).len(), |common, i| {
            common.min(
                self.get(0)
                    .iter()
                    .zip(self.get(i))
                    .take_while(|(a, b)| a == b)
                    .count(),
            )
        });
        let rest = |i: usize| self.get(i).get(common..).unwrap_or_default();
        let mut order: Vec<(u32, u64, usize)> = (0..n)
            .map(|i| {
                let partition = self.partitions.get(i).copied().unwrap_or(0);
                (partition, prefix(rest(i)), i)
            })
            .collect();
        order.sort_unstable_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| rest(a.2).cmp(rest(b.2)))
                .then(a.2.cmp(&b.2))
        });
        order.into_iter().map(|(_, _, i)| i).collect()
    }

    /// Record `i`'s key.
    pub fn get(&self, i: usize) -> &[u8] {
        slice(&self.bytes, &self.ends, i)
    }

    /// Appends record `i`'s shuffle line (without its newline) to `out`; `data` is the chunk
    /// the records were read from.
    pub fn write_line(&self, i: usize, data: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(self.get(i));
        out.push(b'\t');
        out.extend_from_slice(slice(&self.tails, &self.tail_ends, i));
        if let Some(Some(read)) = self.read.get(i) {
            out.extend_from_slice(data.get(read.clone()).unwrap_or_default());
        }
    }
}

/// Item `i` of a buffer of items laid end to end, where `ends[i]` is where item `i` ends.
fn slice<'b>(bytes: &'b [u8], ends: &[usize], i: usize) -> &'b [u8] {
    let start = match i.checked_sub(1) {
        Some(prev) => ends.get(prev).copied().unwrap_or(0),
        None => 0,
    };
    let end = ends.get(i).copied().unwrap_or(start);
    bytes.get(start..end).unwrap_or_default()
}

/// The first 8 bytes of `key`, big-endian, zero-padded: ordered as the bytes are.
fn prefix(key: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    let n = key.len().min(8);
    first[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(first)
}

/// The partition of a key: BLAKE3, first 8 bytes little-endian, modulo `partitions`.
pub(crate) fn partition_of(key: &[u8], partitions: u32) -> u32 {
    let hash = blake3::hash(key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(first) % u64::from(partitions.max(1))) as u32
}

/// One record of a shuffle buffer: the line `KEY \t TS \t RECORD`, where `KEY` is the
/// record's key encoding, `TS` the compact JSON of its timestamp (empty when it has none) and
/// `RECORD` the record as the map side writes it: its input line as read, or its compact JSON
/// when a stage changed it or its line has a tab between tokens. Neither holds a raw tab or
/// newline (JSON strings cannot; serde_json escapes control characters, keys included), so
/// the framing needs no escaping and a buffer stays line-aligned for the records chunker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Framed<'a> {
    pub key: &'a [u8],
    pub ts: &'a [u8],
    pub record: &'a [u8],
}

impl<'a> Framed<'a> {
    /// Splits a shuffle line; `None` if it does not have the three fields.
    pub fn split(line: &'a [u8]) -> Option<Self> {
        let first = memchr::memchr(b'\t', line)?;
        let rest = line.get(first + 1..)?;
        let second = memchr::memchr(b'\t', rest)?;
        let record = rest.get(second + 1..)?;
        if record.is_empty() {
            return None;
        }
        Some(Framed {
            key: &line[..first],
            ts: &rest[..second],
            record,
        })
    }
}

/// A timestamp as a shuffle line carries it: empty for none, else compact JSON.
fn parse_ts(bytes: &[u8]) -> Result<Option<Value>, serde_json::Error> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        serde_json::from_slice(bytes).map(Some)
    }
}

/// Whether record `a` (timestamp `a_ts`) wins over `b` (`b_ts`): the later timestamp, then the
/// greater encoding. Equal timestamp bytes skip the parse, the common case for a repeat.
fn newer(a_ts: &[u8], a: &[u8], b_ts: &[u8], b: &[u8]) -> Result<bool, serde_json::Error> {
    let by_ts = if a_ts == b_ts {
        Ordering::Equal
    } else {
        value::cmp_ts(parse_ts(a_ts)?.as_ref(), parse_ts(b_ts)?.as_ref())
    };
    Ok(by_ts.then_with(|| a.cmp(b)) == Ordering::Greater)
}

/// One input of the reduce side: one map task's shuffle lines for the partition, sorted by
/// key, in blocks of whole lines. A packed shuffle chunk is read a block at a time
/// ([`crate::jobs::shuffle::Blocks`]); a buffer in memory is one block ([`Whole`]).
pub trait Run {
    type Error: std::fmt::Display;
    /// Moves to the next block; false after the last. The previous block is gone then.
    fn advance(&mut self) -> Result<bool, Self::Error>;
    /// The current block (empty before the first [`Run::advance`]).
    fn block(&self) -> &[u8];
}

/// An input that is all in memory: one block.
#[derive(Debug)]
pub struct Whole<'a> {
    data: &'a [u8],
    state: WholeState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WholeState {
    Before,
    On,
    After,
}

impl<'a> Whole<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Whole {
            data,
            state: WholeState::Before,
        }
    }
}

impl Run for Whole<'_> {
    type Error = std::convert::Infallible;

    fn advance(&mut self) -> Result<bool, Self::Error> {
        self.state = match self.state {
            WholeState::Before => WholeState::On,
            WholeState::On | WholeState::After => WholeState::After,
        };
        Ok(self.state == WholeState::On)
    }

    fn block(&self) -> &[u8] {
        match self.state {
            WholeState::On => self.data,
            WholeState::Before | WholeState::After => &[],
        }
    }
}

/// Why the reduce side stopped.
#[derive(Debug)]
pub(crate) enum MergeError<E> {
    /// An input could not be read (for a packed chunk: it does not unpack).
    Read { input: usize, error: E },
    /// A line of an input is not a shuffle line, is out of key order, or has a timestamp
    /// that is not JSON.
    Line {
        input: usize,
        line: u64,
        message: String,
    },
}

/// The reduce side: a merge of the partition's inputs, each sorted by key, that writes one
/// record per key, in key order. Nothing is parsed but the timestamps of two records that
/// share a key (and not even those when their timestamps are equal bytes).
///
/// It holds one block of each input, not the partition: the inputs are read a block at a time
/// as the merge reaches them. The record kept so far for the current key is borrowed from its
/// input's block, and copied only when that input moves on to its next block before the key
/// is done.
///
/// The inputs are in a binary heap by their current line's key (then by input, so that the
/// order is fixed). An input whose lines are not in key order is an error, not a wrong
/// result: the map side sorts each partition before it packs it.
#[derive(Debug)]
pub(crate) struct Merge<R> {
    runs: Vec<R>,
    heads: Vec<Head>,
    /// Inputs that have a current line, as a min-heap.
    heap: Vec<usize>,
    /// The key being merged.
    key: Vec<u8>,
    best: Best,
    owned_ts: Vec<u8>,
    owned_record: Vec<u8>,
    /// Lines read, records kept and their bytes (without newlines).
    pub lines: u64,
    pub kept: u64,
    pub bytes: u64,
}

/// An input's current line: byte ranges in its current block.
#[derive(Debug, Clone, Copy, Default)]
struct Head {
    /// Where the next line starts.
    next: usize,
    /// 1-based number of the current line in the input.
    line: u64,
    key: (usize, usize),
    ts: (usize, usize),
    record: (usize, usize),
}

/// The record kept so far for the current key.
#[derive(Debug, Clone, Copy)]
enum Best {
    /// In an input's current block.
    InBlock {
        input: usize,
        ts: (usize, usize),
        record: (usize, usize),
    },
    /// Copied out, because its input moved to another block.
    Owned,
}

fn range(block: &[u8], (start, end): (usize, usize)) -> &[u8] {
    block.get(start..end).unwrap_or_default()
}

impl<R: Run> Merge<R> {
    /// Reads the first line of every input.
    pub fn new(runs: Vec<R>) -> Result<Self, MergeError<R::Error>> {
        let n = runs.len();
        let mut merge = Merge {
            runs,
            heads: vec![Head::default(); n],
            heap: Vec::with_capacity(n),
            key: Vec::new(),
            best: Best::Owned,
            owned_ts: Vec::new(),
            owned_record: Vec::new(),
            lines: 0,
            kept: 0,
            bytes: 0,
        };
        for input in 0..n {
            if merge.step(input, false)? {
                merge.heap.push(input);
                merge.sift_up(merge.heap.len() - 1);
            }
        }
        Ok(merge)
    }

    /// The inputs.
    pub fn runs(&self) -> &[R] {
        &self.runs
    }

    /// Appends kept records, each followed by `\n`, to `out` until it holds `target` bytes or
    /// more, or the inputs are used up. False when they are.
    pub fn fill(&mut self, out: &mut Vec<u8>, target: usize) -> Result<bool, MergeError<R::Error>> {
        while out.len() < target {
            let Some(&first) = self.heap.first() else {
                return Ok(false);
            };
            let mut key = std::mem::take(&mut self.key);
            key.clear();
            key.extend_from_slice(self.key_of(first));
            self.key = key;
            self.best = self.in_block(first);
            self.lines += 1;
            self.step_top(first)?;
            while let Some(&top) = self.heap.first() {
                if self.key_of(top) != self.key.as_slice() {
                    break;
                }
                self.lines += 1;
                let (best_ts, best_record) = self.best_bytes();
                let block = self.runs[top].block();
                let head = self.heads[top];
                let wins = newer(
                    range(block, head.ts),
                    range(block, head.record),
                    best_ts,
                    best_record,
                )
                .map_err(|e| MergeError::Line {
                    input: top,
                    line: head.line,
                    message: format!("a shuffle line's timestamp is not JSON: {e}"),
                })?;
                if wins {
                    self.best = self.in_block(top);
                }
                self.step_top(top)?;
            }
            let (_, record) = self.best_bytes();
            let len = record.len() as u64;
            out.extend_from_slice(record);
            out.push(b'\n');
            self.kept += 1;
            self.bytes += len;
        }
        Ok(!self.heap.is_empty())
    }

    fn key_of(&self, input: usize) -> &[u8] {
        range(self.runs[input].block(), self.heads[input].key)
    }

    fn in_block(&self, input: usize) -> Best {
        let head = self.heads[input];
        Best::InBlock {
            input,
            ts: head.ts,
            record: head.record,
        }
    }

    fn best_bytes(&self) -> (&[u8], &[u8]) {
        match self.best {
            Best::InBlock { input, ts, record } => {
                let block = self.runs[input].block();
                (range(block, ts), range(block, record))
            }
            Best::Owned => (&self.owned_ts, &self.owned_record),
        }
    }

    /// Moves the input at the top of the heap to its next line and restores the heap.
    fn step_top(&mut self, input: usize) -> Result<(), MergeError<R::Error>> {
        if self.step(input, true)? {
            self.sift_down(0);
        } else {
            self.heap.swap_remove(0);
            if !self.heap.is_empty() {
                self.sift_down(0);
            }
        }
        Ok(())
    }

    /// Moves `input` to its next line; false at its end. With `ordered`, the line must not
    /// sort before the key being merged (the input's previous line had that key).
    fn step(&mut self, input: usize, ordered: bool) -> Result<bool, MergeError<R::Error>> {
        loop {
            let next = self.heads[input].next;
            if next >= self.runs[input].block().len() {
                if let Best::InBlock { input: held, .. } = self.best
                    && held == input
                {
                    let (ts, record) = self.best_bytes();
                    let (ts, record) = (ts.to_vec(), record.to_vec());
                    self.owned_ts = ts;
                    self.owned_record = record;
                    self.best = Best::Owned;
                }
                self.heads[input].next = 0;
                let more = self.runs[input]
                    .advance()
                    .map_err(|error| MergeError::Read { input, error })?;
                if !more {
                    return Ok(false);
                }
                continue;
            }
            let block = self.runs[input].block();
            let rest = &block[next..];
            let len = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
            let line = &rest[..len];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let head = &mut self.heads[input];
            head.next = next + len + 1;
            head.line += 1;
            if line.is_empty() {
                continue;
            }
            let Some(framed) = Framed::split(line) else {
                return Err(MergeError::Line {
                    input,
                    line: head.line,
                    message: "not a shuffle line (key, tab, timestamp, tab, record)".into(),
                });
            };
            let base = block.as_ptr() as usize;
            let at = |part: &[u8]| {
                let start = (part.as_ptr() as usize).saturating_sub(base);
                (start, start + part.len())
            };
            head.key = at(framed.key);
            head.ts = at(framed.ts);
            head.record = at(framed.record);
            if ordered && framed.key < self.key.as_slice() {
                return Err(MergeError::Line {
                    input,
                    line: head.line,
                    message: "shuffle lines out of key order (written by another version of \
                              meshd, or corrupt)"
                        .into(),
                });
            }
            return Ok(true);
        }
    }

    /// Whether input `a`'s current line comes before input `b`'s.
    fn before(&self, a: usize, b: usize) -> bool {
        self.key_of(a).cmp(self.key_of(b)).then(a.cmp(&b)) == Ordering::Less
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if !self.before(self.heap[at], self.heap[parent]) {
                break;
            }
            self.heap.swap(at, parent);
            at = parent;
        }
    }

    fn sift_down(&mut self, mut at: usize) {
        loop {
            let left = 2 * at + 1;
            if left >= self.heap.len() {
                break;
            }
            let right = left + 1;
            let child = if right < self.heap.len() && self.before(self.heap[right], self.heap[left])
            {
                right
            } else {
                left
            };
            if !self.before(self.heap[child], self.heap[at]) {
                break;
            }
            self.heap.swap(at, child);
            at = child;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_and_partitions() {
        let d = Dedup::new("id, user.name", None).unwrap();
        let mut key = Vec::new();
        d.write_key(&json!({"id": 7, "user": {"name": "a"}, "x": 1}), &mut key);
        assert_eq!(key, br#"[7,"a"]"#);
        d.write_key(&json!({"x": 1}), &mut key);
        assert_eq!(key, b"[null,null]");
        // Fixed across platforms and releases: a change here moves records between partitions.
        assert_eq!(partition_of(br#"[7,"a"]"#, 1), 0);
        let spread: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| partition_of(format!("[{i}]").as_bytes(), 4))
            .collect();
        assert_eq!(spread.len(), 4);
        let h = blake3::hash(b"[1]");
        let expected = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap()) % 10;
        assert_eq!(u64::from(partition_of(b"[1]", 10)), expected);
        assert!(Dedup::new("a,,b", None).unwrap_err().0 == "key");
        assert!(Dedup::new("a", Some("")).unwrap_err().0 == "ts");
    }

    /// An input whose blocks are given: the merge must carry a kept record across them.
    struct Blocks {
        blocks: Vec<Vec<u8>>,
        at: Option<usize>,
    }

    impl Blocks {
        fn new(blocks: Vec<Vec<u8>>) -> Self {
            Blocks { blocks, at: None }
        }
    }

    impl Run for Blocks {
        type Error = String;

        fn advance(&mut self) -> Result<bool, String> {
            let next = self.at.map_or(0, |a| a + 1);
            self.at = Some(next);
            // The block that is gone is overwritten, as a reused buffer would be.
            if let Some(prev) = next.checked_sub(1).and_then(|p| self.blocks.get_mut(p)) {
                prev.fill(b'#');
            }
            Ok(next < self.blocks.len())
        }

        fn block(&self) -> &[u8] {
            self.at
                .and_then(|a| self.blocks.get(a))
                .map_or(&[], Vec::as_slice)
        }
    }

    /// Merges `inputs` and returns the kept records.
    fn merge<R: Run>(inputs: Vec<R>) -> Result<Vec<String>, MergeError<R::Error>> {
        let mut merge = Merge::new(inputs)?;
        let mut out = Vec::new();
        // A small target: the merge stops and resumes many times.
        loop {
            let mut part = Vec::new();
            let more = merge.fill(&mut part, 10)?;
            out.extend_from_slice(&part);
            if !more {
                break;
            }
        }
        let lines = std::str::from_utf8(&out)
            .unwrap()
            .lines()
            .map(str::to_owned);
        Ok(lines.collect())
    }

    /// Keys with a long shared prefix, some of them equal, some a prefix of another.
    const SHARED_PREFIX_KEYS: [&str; 7] = [
        "[\"user-00010\"]",
        "[\"user-0001\"]",
        "[\"user-0002\"]",
        "[\"user-0001\",2]",
        "[\"user-000\"]",
        "[\"user-0001\"]",
        "[\"user-0001\"]",
    ];

    #[test]
    fn the_map_side_order_is_partition_then_key_bytes_then_input() {
        let keys = SHARED_PREFIX_KEYS;
        let mut k = Keys::default();
        for (i, key) in keys.iter().enumerate() {
            k.bytes.extend_from_slice(key.as_bytes());
            k.ends.push(k.bytes.len());
            k.partitions.push(u32::from(i == 2));
        }
        let order = k.order();
        let mut want: Vec<usize> = (0..keys.len()).collect();
        want.sort_by_key(|&i| (k.partitions[i], keys[i], i));
        assert_eq!(order, want);
        assert_eq!(*order.last().unwrap(), 2, "partition 1 comes last");
        assert_eq!(Keys::default().order(), Vec::<usize>::new());
        assert_eq!(prefix(b"ab"), 0x6162_0000_0000_0000);
    }

    #[test]
    fn keys_with_a_long_shared_prefix_come_out_in_byte_order() {
        let keys = &SHARED_PREFIX_KEYS[..6];
        let lines: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k}\t{i}\t{{\"n\":{i}}}"))
            .collect();
        // Each line is an input of its own: any order of inputs is sorted input.
        let kept = merge(lines.iter().map(|l| Whole::new(l.as_bytes())).collect()).unwrap();
        let mut want: Vec<(&str, &str)> = vec![
            (keys[0], "{\"n\":0}"),
            (keys[1], "{\"n\":5}"),
            (keys[2], "{\"n\":2}"),
            (keys[3], "{\"n\":3}"),
            (keys[4], "{\"n\":4}"),
        ];
        want.sort();
        assert_eq!(kept, want.iter().map(|(_, r)| *r).collect::<Vec<_>>());
    }

    fn framed_lines(d: &Dedup, records: &[Value]) -> Vec<Vec<u8>> {
        records
            .iter()
            .map(|r| {
                let v: Value = serde_json::from_slice(&value::encode(r)).unwrap();
                let mut lines = Keys::default();
                d.add(&mut lines, &v, None, 1);
                let mut out = Vec::new();
                lines.write_line(0, &[], &mut out);
                out
            })
            .collect()
    }

    #[test]
    fn latest_wins_then_greatest_encoding() {
        let d = Dedup::new("id", Some("ts")).unwrap();
        let framed = framed_lines(
            &d,
            &[
                json!({"id": 1, "ts": 5, "v": "a"}),
                json!({"id": 1, "ts": 9, "v": "b"}),
                json!({"id": 1, "ts": 7, "v": "c"}),
                json!({"id": 2, "v": "no ts"}),
                json!({"id": 2, "ts": null, "v": "null ts"}),
                json!({"id": 2, "ts": 1, "v": "x"}),
                json!({"id": 3, "ts": "2024-01-02", "v": "p"}),
                json!({"id": 3, "ts": "2024-01-02", "v": "q"}),
                // 10 and 9.5 are numbers: 10 is later, though "9.5" > "10" as bytes.
                json!({"id": 4, "ts": 9.5, "v": "old"}),
                json!({"id": 4, "ts": 10, "v": "new"}),
            ],
        );
        let want = vec![
            json!({"id": 1, "ts": 9, "v": "b"}),
            json!({"id": 2, "ts": 1, "v": "x"}),
            json!({"id": 3, "ts": "2024-01-02", "v": "q"}),
            json!({"id": 4, "ts": 10, "v": "new"}),
        ];
        let parse = |kept: Vec<String>| -> Vec<Value> {
            kept.iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        // One input per line, in both orders.
        for lines in [framed.clone(), framed.iter().rev().cloned().collect()] {
            let kept = merge(lines.iter().map(|l| Whole::new(l)).collect()).unwrap();
            assert_eq!(parse(kept), want);
        }
        // One sorted input, a line per block: the record kept so far is in a block that is
        // gone (overwritten) by the time the next line of its key is compared.
        let mut sorted = framed.clone();
        sorted.sort_by(|a, b| {
            Framed::split(a)
                .unwrap()
                .key
                .cmp(Framed::split(b).unwrap().key)
        });
        let blocks = sorted
            .iter()
            .map(|l| [l.as_slice(), b"\n"].concat())
            .collect();
        assert_eq!(parse(merge(vec![Blocks::new(blocks)]).unwrap()), want);
        // Two inputs, split between blocks at odd places.
        let halves: Vec<Vec<u8>> = sorted
            .iter()
            .map(|l| [l.as_slice(), b"\n"].concat())
            .collect();
        let (a, b): (Vec<_>, Vec<_>) = halves
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % 3 == 0);
        let to_blocks = |lines: Vec<(usize, Vec<u8>)>| {
            let mut blocks = vec![Vec::new()];
            for (i, line) in lines {
                blocks.last_mut().unwrap().extend_from_slice(&line);
                if i % 2 == 0 {
                    blocks.push(Vec::new());
                }
            }
            Blocks::new(blocks)
        };
        assert_eq!(
            parse(merge(vec![to_blocks(a), to_blocks(b)]).unwrap()),
            want
        );

        assert!(Framed::split(b"[1]\t\t").is_none());
        assert!(Framed::split(b"[1]\t{}").is_none());
    }

    #[test]
    fn bad_inputs_are_errors_that_name_the_line() {
        let out_of_order = b"[2]\t1\t{\"id\":2}\n[1]\t1\t{\"id\":1}\n";
        match merge(vec![Whole::new(b"[0]\t\t{}\n"), Whole::new(out_of_order)]) {
            Err(MergeError::Line {
                input: 1,
                line: 2,
                message,
            }) => {
                assert!(message.contains("out of key order"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        match merge(vec![Whole::new(b"\n\n[1]\t{}\n")]) {
            Err(MergeError::Line {
                input: 0,
                line: 3,
                message,
            }) => {
                assert!(message.contains("not a shuffle line"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let failing = Blocks {
            blocks: Vec::new(),
            at: None,
        };
        struct Broken;
        impl Run for Broken {
            type Error = String;
            fn advance(&mut self) -> Result<bool, String> {
                Err("does not unpack".into())
            }
            fn block(&self) -> &[u8] {
                &[]
            }
        }
        assert!(matches!(merge(vec![failing]), Ok(kept) if kept.is_empty()));
        assert!(matches!(
            merge(vec![Broken]),
            Err(MergeError::Read { input: 0, .. })
        ));
    }
}
