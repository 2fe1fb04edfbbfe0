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
//! - The reduce output lists the kept records sorted by key (byte-wise on the key encoding).

use std::cmp::Ordering;

use serde_json::Value;

use super::input::Record;
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

    /// The keys of `records`, one after the other in one buffer (`ends[i]` is where record
    /// `i`'s ends), and each record's reduce partition (`partitions` must be at least 1).
    pub fn keys(&self, records: &[Record], partitions: u32) -> Keys {
        let mut keys = Keys {
            bytes: Vec::with_capacity(records.len() * 16),
            ends: Vec::with_capacity(records.len()),
            partitions: Vec::with_capacity(records.len()),
        };
        for r in records {
            let start = keys.bytes.len();
            self.append_key(&r.value, &mut keys.bytes);
            keys.partitions
                .push(partition_of(&keys.bytes[start..], partitions));
            keys.ends.push(keys.bytes.len());
        }
        keys
    }

    /// The timestamp of `record`.
    fn ts<'v>(&self, record: &'v Value) -> Option<&'v Value> {
        self.ts
            .as_ref()
            .and_then(|path| value::lookup(record, path))
    }
}

/// What [`Dedup::keys`] found.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    pub bytes: Vec<u8>,
    pub ends: Vec<usize>,
    pub partitions: Vec<u32>,
}

impl Keys {
    /// Record `i`'s key.
    pub fn get(&self, i: usize) -> &[u8] {
        let start = match i.checked_sub(1) {
            Some(prev) => self.ends.get(prev).copied().unwrap_or(0),
            None => 0,
        };
        let end = self.ends.get(i).copied().unwrap_or(start);
        self.bytes.get(start..end).unwrap_or_default()
    }
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

impl Dedup {
    /// Appends `record`'s shuffle line (without the `\n`) to `out`; `key` is its key encoding.
    /// The record goes as `read` when given (its line as read, holding no tab or newline), else
    /// as compact JSON.
    pub fn write_framed(&self, out: &mut Vec<u8>, key: &[u8], record: &Value, read: Option<&[u8]>) {
        out.extend_from_slice(key);
        out.push(b'\t');
        if let Some(ts) = self.ts(record) {
            value::write_json(out, ts);
        }
        out.push(b'\t');
        match read {
            Some(line) => out.extend_from_slice(line),
            None => value::write_json(out, record),
        }
    }
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

/// The reduce side: every record of the partition, then one per key. Everything is borrowed
/// from the reduce input, the shuffle lines the map side wrote: nothing is parsed but the
/// timestamps of two records that share a key (and not even those when their timestamps are
/// equal bytes).
///
/// It sorts rather than hashes: the output must come out sorted by key anyway, so one sort
/// both groups the records of a key and orders the output. The sort compares 8 bytes of each
/// key as one integer first, taken after the prefix every key of the partition shares (keys
/// such as `["user-000123"]` share a long one), and the rest byte-wise only on a tie.
#[derive(Debug, Default)]
pub(crate) struct Latest<'a> {
    entries: Vec<Entry<'a>>,
}

/// A shuffle line whose timestamp is not JSON: its (reduce input, line) and the error.
pub(crate) type BadTimestamp = ((usize, u64), serde_json::Error);

#[derive(Debug, Clone, Copy)]
struct Entry<'a> {
    prefix: u64,
    framed: Framed<'a>,
    /// Where the line came from (reduce input, line), for errors.
    origin: (usize, u64),
}

impl<'a> Latest<'a> {
    /// Room for `n` records.
    pub fn with_capacity(n: usize) -> Self {
        Latest {
            entries: Vec::with_capacity(n),
        }
    }

    /// Offers a record, read from line `origin.1` of reduce input `origin.0`.
    pub fn offer(&mut self, framed: Framed<'a>, origin: (usize, u64)) {
        self.entries.push(Entry {
            prefix: 0,
            framed,
            origin,
        });
    }

    /// Records offered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The kept records, one per key, sorted by key, each with the reduce input it is in. An
    /// error names the line of a timestamp that is not JSON (a corrupt shuffle line).
    pub fn finish(self) -> Result<Vec<(usize, &'a [u8])>, BadTimestamp> {
        let mut entries = self.entries;
        let Some(first) = entries.first().map(|e| e.framed.key) else {
            return Ok(Vec::new());
        };
        let common = entries.iter().fold(first.len(), |common, e| {
            common.min(
                first
                    .iter()
                    .zip(e.framed.key)
                    .take_while(|(a, b)| a == b)
                    .count(),
            )
        });
        for e in &mut entries {
            e.prefix = prefix(e.framed.key.get(common..).unwrap_or_default());
        }
        entries.sort_unstable_by(|a, b| {
            a.prefix
                .cmp(&b.prefix)
                .then_with(|| a.framed.key.cmp(b.framed.key))
        });
        let mut kept = Vec::new();
        let mut i = 0;
        while let Some(start) = entries.get(i) {
            let mut best = start;
            let mut j = i + 1;
            while let Some(e) = entries.get(j) {
                if e.prefix != start.prefix || e.framed.key != start.framed.key {
                    break;
                }
                let (f, b) = (e.framed, best.framed);
                if newer(f.ts, f.record, b.ts, b.record).map_err(|err| (e.origin, err))? {
                    best = e;
                }
                j += 1;
            }
            kept.push((best.origin.0, best.framed.record));
            i = j;
        }
        Ok(kept)
    }
}

/// The first 8 bytes of `key`, big-endian, zero-padded: ordered as the bytes are.
fn prefix(key: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    let n = key.len().min(8);
    first[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(first)
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

    #[test]
    fn keys_with_a_long_shared_prefix_come_out_in_byte_order() {
        let keys = [
            "[\"user-00010\"]",
            "[\"user-0001\"]",
            "[\"user-0002\"]",
            "[\"user-0001\",2]",
            "[\"user-000\"]",
            "[\"user-0001\"]",
        ];
        let lines: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k}\t{i}\t{{\"n\":{i}}}"))
            .collect();
        let mut latest = Latest::default();
        for (i, line) in lines.iter().enumerate() {
            latest.offer(Framed::split(line.as_bytes()).unwrap(), (0, i as u64));
        }
        let kept: Vec<&str> = latest
            .finish()
            .unwrap()
            .into_iter()
            .map(|(_, r)| std::str::from_utf8(r).unwrap())
            .collect();
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

    #[test]
    fn latest_wins_then_greatest_encoding() {
        let d = Dedup::new("id", Some("ts")).unwrap();
        let lines: Vec<Vec<u8>> = [
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
        ]
        .iter()
        .map(value::encode)
        .collect();
        let framed: Vec<Vec<u8>> = lines
            .iter()
            .map(|line| {
                let v: Value = serde_json::from_slice(line).unwrap();
                let mut key = Vec::new();
                d.write_key(&v, &mut key);
                let mut out = Vec::new();
                d.write_framed(&mut out, &key, &v, None);
                out
            })
            .collect();
        let mut latest = Latest::default();
        for (i, line) in framed.iter().rev().enumerate() {
            latest.offer(Framed::split(line).unwrap(), (0, i as u64));
        }
        let kept: Vec<Value> = latest
            .finish()
            .unwrap()
            .iter()
            .map(|(_, l)| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(
            kept,
            vec![
                json!({"id": 1, "ts": 9, "v": "b"}),
                json!({"id": 2, "ts": 1, "v": "x"}),
                json!({"id": 3, "ts": "2024-01-02", "v": "q"}),
                json!({"id": 4, "ts": 10, "v": "new"}),
            ]
        );
        assert!(Framed::split(b"[1]\t\t").is_none());
        assert!(Framed::split(b"[1]\t{}").is_none());
        assert_eq!(prefix(b"ab"), 0x6162_0000_0000_0000);
    }
}
