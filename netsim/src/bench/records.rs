//! The input of the `jobs` scenario: JSONL customer records, generated from the seed as they
//! are sent, so that 10 million of them (2 GB) never sit in memory or on disk.
//!
//! Record `k` (from 0) is, by its position alone:
//! - `k % 10 != 9`: the first record of id `u<b>`, `b = k / 10 * 9 + k % 10` (ids are numbered
//!   in the order they first appear), and valid;
//! - `k % 10 == 9`: a record of an id seen before, `u<j>` with `j` drawn from the ids before
//!   it, with its own timestamp: the repeats `dedup` removes (10%);
//! - `k % 100 == 99`, a repeat too: invalid for [`SCHEMA`] in one of four ways (a string `ts`,
//!   no `id`, a negative `age`, a number `id`): the rejects `validate` finds (1%).
//!
//! So every id's first record is valid, and what a `validate` + `dedup` job must find is known
//! from the count alone ([`Expected::of`]): `n / 100` rejects and `n - n / 10` distinct ids.
//! The random parts (which earlier id a repeat has, timestamps, names, padding) come from the
//! seeded BLAKE3 stream of [`super::data`], so a seed always gives the same bytes. Every line
//! is [`RECORD_LEN`] bytes long, newline included.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Length of every line, newline included.
pub const RECORD_LEN: usize = 200;
/// What `validate` checks: a string id, an integer timestamp, a non-negative integer age.
pub const SCHEMA: &str = r#"{"type":"object","required":["id","ts","age"],"properties":{"id":{"type":"string"},"ts":{"type":"integer"},"age":{"type":"integer","minimum":0}}}"#;
/// Timestamps are milliseconds in the year after this one (2023-11-14).
const BASE_TS: u64 = 1_700_000_000_000;
const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;
/// Records generated per refill of the buffer.
const BATCH: u64 = 4096;
/// Random bytes used per record.
const RANDOM_PER_RECORD: usize = 32;

const FIRST: [&str; 16] = [
    "ada", "alan", "grace", "linus", "barbara", "ken", "dennis", "margaret", "edsger", "donald",
    "frances", "john", "radia", "tim", "vint", "hedy",
];
const LAST: [&str; 16] = [
    "lovelace", "turing", "hopper", "torvalds", "liskov", "thompson", "ritchie", "hamilton",
    "dijkstra", "knuth", "allen", "backus", "perlman", "lee", "cerf", "lamarr",
];
const CITIES: [&str; 8] = [
    "Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Toronto", "Auckland", "Tallinn",
];

/// What the first `n` records hold, by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Expected {
    pub records: u64,
    /// Records of an id seen before (the invalid ones among them).
    pub repeats: u64,
    /// Records `validate` must reject.
    pub invalid: u64,
    /// Distinct ids with a valid record: what `dedup` must keep.
    pub distinct_valid_ids: u64,
}

impl Expected {
    pub fn of(n: u64) -> Self {
        Self {
            records: n,
            repeats: n / 10,
            invalid: n / 100,
            distinct_valid_ids: n - n / 10,
        }
    }
}

/// What a record is, from its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    First,
    Repeat,
    /// A repeat broken in one of four ways.
    Invalid(u8),
}

fn kind(k: u64) -> Kind {
    if k % 100 == 99 {
        Kind::Invalid(((k / 100) % 4) as u8)
    } else if k % 10 == 9 {
        Kind::Repeat
    } else {
        Kind::First
    }
}

/// Ids that appeared before record `k` (every record before it that is not a repeat).
fn ids_before(k: u64) -> u64 {
    k - k / 10
}

/// A [`Read`] of the first `n` records of a seed.
pub struct Records {
    next: u64,
    end: u64,
    rng: blake3::OutputReader,
    random: Vec<u8>,
    buf: Vec<u8>,
    pos: usize,
    /// Counted while generating, to check against [`Expected::of`].
    counted: Expected,
    /// Bytes handed out so far, readable from another thread.
    sent: Arc<AtomicU64>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("next", &self.next)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl Records {
    pub fn new(seed: u64, stream: u64, n: u64) -> Self {
        Self {
            next: 0,
            end: n,
            rng: super::data::stream(seed, stream),
            random: vec![0; BATCH as usize * RANDOM_PER_RECORD],
            buf: Vec::with_capacity(BATCH as usize * RECORD_LEN),
            pos: 0,
            counted: Expected {
                records: 0,
                repeats: 0,
                invalid: 0,
                distinct_valid_ids: 0,
            },
            sent: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A counter of the bytes read so far, for progress lines.
    pub fn sent(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.sent)
    }

    /// What the records generated so far held.
    pub fn counted(&self) -> Expected {
        self.counted
    }

    /// Generates the next batch into `buf`.
    fn refill(&mut self) {
        use std::io::Write;
        self.buf.clear();
        self.pos = 0;
        let count = (self.end - self.next).min(BATCH);
        let random = &mut self.random[..count as usize * RANDOM_PER_RECORD];
        self.rng.fill(random);
        for (k, r) in (self.next..self.next + count).zip(random.chunks_exact(RANDOM_PER_RECORD)) {
            let word =
                |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap_or_default());
            let kind = kind(k);
            let id = match kind {
                Kind::First => k / 10 * 9 + k % 10,
                Kind::Repeat | Kind::Invalid(_) => word(0) % ids_before(k),
            };
            let ts = BASE_TS + word(1) % YEAR_MS;
            let looks = word(2);
            let first = FIRST[(looks & 15) as usize];
            let last = LAST[((looks >> 4) & 15) as usize];
            let city = CITIES[((looks >> 8) & 7) as usize];
            let age = 18 + (looks >> 11) % 80;
            let start = self.buf.len();
            let out = &mut self.buf;
            // Writing to a Vec cannot fail.
            let _ = match kind {
                Kind::Invalid(1) => write!(out, "{{"),
                Kind::Invalid(3) => write!(out, "{{\"id\":{id},"),
                _ => write!(out, "{{\"id\":\"u{id}\","),
            };
            let _ = match kind {
                Kind::Invalid(0) => write!(out, "\"ts\":\"{ts}\","),
                _ => write!(out, "\"ts\":{ts},"),
            };
            let _ = write!(
                out,
                "\"name\":\"{} {}\",\"email\":\"{first}.{last}{}@example.com\",",
                capitalized(first),
                capitalized(last),
                id % 1000
            );
            let _ = match kind {
                Kind::Invalid(2) => write!(out, "\"age\":-{age},"),
                _ => write!(out, "\"age\":{age},"),
            };
            let _ = write!(out, "\"city\":\"{city}\",\"pad\":\"");
            // Letters up to the fixed length, from a cheap generator seeded by the record's
            // random bytes (their content only has to differ from record to record).
            let pad = RECORD_LEN.saturating_sub(out.len() - start + 3);
            let mut state = word(3) | 1;
            for _ in 0..pad {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                out.push(b'a' + (state % 26) as u8);
            }
            out.extend_from_slice(b"\"}\n");
            self.counted.records += 1;
            match kind {
                Kind::First => self.counted.distinct_valid_ids += 1,
                Kind::Repeat => self.counted.repeats += 1,
                Kind::Invalid(_) => {
                    self.counted.repeats += 1;
                    self.counted.invalid += 1;
                }
            }
        }
        self.next += count;
    }
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

impl Read for Records {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.next == self.end {
                return Ok(0);
            }
            self.refill();
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::Value;

    use super::*;

    fn generate(seed: u64, n: u64) -> (Vec<u8>, Expected) {
        let mut records = Records::new(seed, 7, n);
        let mut out = Vec::new();
        records.read_to_end(&mut out).expect("read");
        assert_eq!(records.sent().load(Ordering::Relaxed), out.len() as u64);
        (out, records.counted())
    }

    /// What the schema accepts, checked by hand.
    fn valid(v: &Value) -> bool {
        v["id"].is_string() && v["ts"].is_u64() && v["age"].as_i64().is_some_and(|a| a >= 0)
    }

    #[test]
    fn counts_match_the_arithmetic_and_the_records() {
        for n in [0, 1, 9, 10, 99, 100, 101, 12_345] {
            let (bytes, counted) = generate(1, n);
            assert_eq!(counted, Expected::of(n), "n = {n}");
            assert_eq!(bytes.len() as u64, n * RECORD_LEN as u64);
            let mut ids = HashSet::new();
            let mut invalid = 0;
            let mut kinds = HashSet::new();
            for line in bytes.split_inclusive(|&b| b == b'\n') {
                assert_eq!(line.len(), RECORD_LEN);
                let v: Value = serde_json::from_slice(line).expect("every line is JSON");
                if valid(&v) {
                    ids.insert(v["id"].as_str().expect("id").to_string());
                } else {
                    invalid += 1;
                    kinds.insert(if v.get("id").is_none() {
                        "no id"
                    } else if !v["id"].is_string() {
                        "id type"
                    } else if !v["ts"].is_u64() {
                        "ts type"
                    } else {
                        "negative age"
                    });
                }
            }
            assert_eq!(invalid, Expected::of(n).invalid, "n = {n}");
            assert_eq!(ids.len() as u64, Expected::of(n).distinct_valid_ids);
            if n == 12_345 {
                assert_eq!(kinds.len(), 4, "four ways to be invalid: {kinds:?}");
            }
        }
    }

    #[test]
    fn repeats_have_earlier_ids_and_other_timestamps() {
        let (bytes, _) = generate(3, 5_000);
        let lines: Vec<Value> = bytes
            .split_inclusive(|&b| b == b'\n')
            .map(|l| serde_json::from_slice(l).expect("json"))
            .collect();
        let mut first_ts = std::collections::HashMap::new();
        let mut same_ts = 0;
        for (k, v) in lines.iter().enumerate() {
            let Some(id) = v["id"].as_str() else { continue };
            match kind(k as u64) {
                Kind::First => {
                    assert_eq!(id, format!("u{}", k / 10 * 9 + k % 10));
                    first_ts.insert(id.to_string(), v["ts"].clone());
                }
                _ => {
                    let ts = first_ts.get(id).expect("a repeat's id appeared before");
                    same_ts += usize::from(*ts == v["ts"]);
                }
            }
        }
        assert!(same_ts <= 1, "repeats carry their own timestamp");
        assert!(SCHEMA.contains("\"minimum\":0"));
        serde_json::from_str::<Value>(SCHEMA).expect("the schema is JSON");
    }

    #[test]
    fn same_seed_same_bytes_in_any_read_sizes() {
        let (a, _) = generate(1, 3_000);
        let mut small = Vec::new();
        let mut records = Records::new(1, 7, 3_000);
        let mut buf = [0; 333];
        loop {
            let n = records.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            small.extend_from_slice(&buf[..n]);
        }
        assert_eq!(a, small);
        assert_ne!(a, generate(2, 3_000).0);
    }
}
