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
//!   or without `ts`, the record whose compact JSON is greatest byte-wise. The choice depends
//!   only on the set of records, not on their order or on how they were partitioned.
//! - The reduce output lists the kept records sorted by key (byte-wise on the key encoding).

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::input::Record;
use super::value::{self, FieldPath};

/// A parsed `dedup` stage.
#[derive(Debug)]
pub(crate) struct Dedup {
    key: Vec<FieldPath>,
    ts: Option<FieldPath>,
    /// The top-level fields that the key and the timestamp read.
    fields: BTreeSet<String>,
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
        let fields = key
            .iter()
            .chain(&ts)
            .filter_map(|path| path.first().cloned())
            .collect();
        Ok(Self { key, ts, fields })
    }

    /// Parses a record of the reduce input keeping only the top-level fields that the key and
    /// the timestamp read; the rest is checked for syntax and skipped, not built.
    pub fn parse_needed(&self, line: &[u8]) -> Result<Value, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(line);
        let fields = Needed(&self.fields).deserialize(&mut de)?;
        de.end()?;
        Ok(Value::Object(fields))
    }

    /// Writes the key of `record` to `out` (cleared first).
    pub fn write_key(&self, record: &Value, out: &mut Vec<u8>) {
        out.clear();
        out.push(b'[');
        for (i, path) in self.key.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            value::write_json(out, value::lookup(record, path).unwrap_or(&Value::Null));
        }
        out.push(b']');
    }

    /// The reduce partition of each record (`partitions` must be at least 1).
    pub fn partition(&self, records: &[Record], partitions: u32) -> Vec<u32> {
        let mut key = Vec::with_capacity(64);
        records
            .iter()
            .map(|r| {
                self.write_key(&r.value, &mut key);
                partition_of(&key, partitions)
            })
            .collect()
    }

    /// The timestamp of `record`.
    fn ts<'v>(&self, record: &'v Value) -> Option<&'v Value> {
        self.ts
            .as_ref()
            .and_then(|path| value::lookup(record, path))
    }
}

/// Reads an object, building only the fields in the set.
struct Needed<'a>(&'a BTreeSet<String>);

impl<'de> DeserializeSeed<'de> for Needed<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Needed<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(wanted) = map.next_key_seed(Wanted(self.0))? {
            match wanted {
                Some(name) => {
                    out.insert(name, map.next_value()?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

/// A key of the object: its name if it is wanted (no allocation for the others).
struct Wanted<'a>(&'a BTreeSet<String>);

impl<'de> DeserializeSeed<'de> for Wanted<'_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Wanted<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.0.contains(name).then(|| name.to_owned()))
    }
}

/// The partition of a key: BLAKE3, first 8 bytes little-endian, modulo `partitions`.
pub(crate) fn partition_of(key: &[u8], partitions: u32) -> u32 {
    let hash = blake3::hash(key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(first) % u64::from(partitions.max(1))) as u32
}

/// The reduce side: the best record seen so far for each key. Records are borrowed lines of
/// the reduce input, which are the compact JSON the map side wrote.
#[derive(Debug, Default)]
pub(crate) struct Latest<'a> {
    best: HashMap<Vec<u8>, Best<'a>>,
    key: Vec<u8>,
}

#[derive(Debug)]
struct Best<'a> {
    ts: Option<Value>,
    line: &'a [u8],
}

impl<'a> Latest<'a> {
    /// Offers a record (`value` parsed from `line`).
    pub fn offer(&mut self, dedup: &Dedup, value: &Value, line: &'a [u8]) {
        dedup.write_key(value, &mut self.key);
        let ts = dedup.ts(value);
        if let Some(best) = self.best.get_mut(self.key.as_slice()) {
            let newer = value::cmp_ts(ts, best.ts.as_ref()).then_with(|| line.cmp(best.line));
            if newer == Ordering::Greater {
                *best = Best {
                    ts: ts.cloned(),
                    line,
                };
            }
        } else {
            self.best.insert(
                self.key.clone(),
                Best {
                    ts: ts.cloned(),
                    line,
                },
            );
        }
    }

    /// Number of keys seen.
    pub fn len(&self) -> usize {
        self.best.len()
    }

    /// The kept records, sorted by key.
    pub fn into_sorted(self) -> Vec<&'a [u8]> {
        let mut kept: Vec<(Vec<u8>, &[u8])> =
            self.best.into_iter().map(|(k, b)| (k, b.line)).collect();
        kept.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        kept.into_iter().map(|(_, line)| line).collect()
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
        let partial = Dedup::new("user.id", Some("ts"))
            .unwrap()
            .parse_needed(br#"{"big":[1,{"x":"\u00e9"}],"user":{"id":3,"n":"a"},"ts":5,"z":null}"#)
            .unwrap();
        assert_eq!(partial, json!({"user": {"id": 3, "n": "a"}, "ts": 5}));
        let d = Dedup::new("id", None).unwrap();
        assert!(d.parse_needed(b"[1]").is_err());
        assert!(d.parse_needed(br#"{"id":1} x"#).is_err());
        assert!(d.parse_needed(br#"{"id":1,"x":[}"#).is_err());
        assert!(Dedup::new("a", Some("")).unwrap_err().0 == "ts");
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
        ]
        .iter()
        .map(value::encode)
        .collect();
        let mut latest = Latest::default();
        for line in lines.iter().rev() {
            let v: Value = serde_json::from_slice(line).unwrap();
            latest.offer(&d, &v, line);
        }
        let kept: Vec<Value> = latest
            .into_sorted()
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(
            kept,
            vec![
                json!({"id": 1, "ts": 9, "v": "b"}),
                json!({"id": 2, "ts": 1, "v": "x"}),
                json!({"id": 3, "ts": "2024-01-02", "v": "q"}),
            ]
        );
    }
}
