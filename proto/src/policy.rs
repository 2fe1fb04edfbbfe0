//! Storage policies: how many copies of each chunk ([`Redundancy`]) and how a byte stream is
//! cut into chunks ([`ChunkerSpec`]). Both parse from the strings operators type
//! (`rep:3`, `ec:4+2`, `fixed:1MiB`) and validate once, with errors that say what is wrong.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Largest replication factor `rep:N` accepts.
pub const MAX_REPLICAS: u8 = 16;
/// Largest total shard count `K+M` that `ec:K+M` accepts.
pub const MAX_SHARDS: u8 = 64;
/// Upper bound on any chunk's length; every decoder of chunk-carrying data enforces it.
pub const MAX_CHUNK_LEN: u32 = 16 * 1024 * 1024;
/// Lower bound on a fixed chunk size.
pub const MIN_FIXED_CHUNK_LEN: u32 = 1024;

/// FastCDC defaults: min 256 KiB, average 1 MiB, max 4 MiB.
pub const CDC_MIN: u32 = 256 * 1024;
pub const CDC_AVG: u32 = 1024 * 1024;
pub const CDC_MAX: u32 = 4 * 1024 * 1024;

/// Why a policy string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown redundancy policy {0:?}: expected rep:N (e.g. rep:3) or ec:K+M (e.g. ec:4+2)")]
    UnknownRedundancy(String),
    #[error("{input:?}: the replica count must be a number from 1 to {MAX_REPLICAS}")]
    ReplicaCount { input: String },
    #[error(
        "{input:?}: K (data shards) and M (parity shards) must be numbers with K >= 1, M >= 1 and K+M <= {MAX_SHARDS}"
    )]
    ShardCount { input: String },
    #[error("unknown chunker {0:?}: expected cdc or fixed:SIZE (e.g. fixed:1MiB)")]
    UnknownChunker(String),
    #[error(
        "{input:?}: the fixed chunk size must be between {MIN_FIXED_CHUNK_LEN} bytes and {MAX_CHUNK_LEN} bytes"
    )]
    FixedSize { input: String },
    #[error("unknown record format {0:?}: expected jsonl or csv")]
    UnknownRecordFormat(String),
    #[error(
        "cdc sizes must satisfy 64 <= min <= avg <= max <= {MAX_CHUNK_LEN}, got min {min}, avg {avg}, max {max}"
    )]
    CdcBounds { min: u32, avg: u32, max: u32 },
}

/// How many copies of each chunk the mesh keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Redundancy {
    /// `rep:N`: N full copies on N distinct peers.
    Replicas(u8),
    /// `ec:K+M`: each chunk split into K data shards plus M Reed-Solomon parity shards.
    Erasure { data: u8, parity: u8 },
}

impl Redundancy {
    /// The default: three replicas.
    pub const DEFAULT: Redundancy = Redundancy::Replicas(3);

    /// Builds `rep:n`, validating the count.
    pub fn replicas(n: u8) -> Result<Self, PolicyError> {
        if (1..=MAX_REPLICAS).contains(&n) {
            Ok(Self::Replicas(n))
        } else {
            Err(PolicyError::ReplicaCount {
                input: format!("rep:{n}"),
            })
        }
    }

    /// Builds `ec:data+parity`, validating the shape.
    pub fn erasure(data: u8, parity: u8) -> Result<Self, PolicyError> {
        if data >= 1 && parity >= 1 && u16::from(data) + u16::from(parity) <= u16::from(MAX_SHARDS)
        {
            Ok(Self::Erasure { data, parity })
        } else {
            Err(PolicyError::ShardCount {
                input: format!("ec:{data}+{parity}"),
            })
        }
    }

    /// Number of distinct peers that hold a part of each chunk when the object is healthy.
    pub fn width(&self) -> usize {
        match *self {
            Self::Replicas(n) => usize::from(n),
            Self::Erasure { data, parity } => usize::from(data) + usize::from(parity),
        }
    }

    /// Holders that must acknowledge a chunk before a put counts it: a majority of replicas
    /// (2 for `rep:3`), or K+1 shards for `ec:K+M`.
    pub fn default_write_quorum(&self) -> usize {
        match *self {
            Self::Replicas(n) => usize::from(n) / 2 + 1,
            Self::Erasure { data, .. } => (usize::from(data) + 1).min(self.width()),
        }
    }
}

impl Default for Redundancy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for Redundancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Replicas(n) => write!(f, "rep:{n}"),
            Self::Erasure { data, parity } => write!(f, "ec:{data}+{parity}"),
        }
    }
}

impl FromStr for Redundancy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(n) = s.strip_prefix("rep:") {
            let n = n.parse::<u8>().map_err(|_| PolicyError::ReplicaCount {
                input: s.to_owned(),
            })?;
            Self::replicas(n).map_err(|_| PolicyError::ReplicaCount {
                input: s.to_owned(),
            })
        } else if let Some(shape) = s.strip_prefix("ec:") {
            let bad = || PolicyError::ShardCount {
                input: s.to_owned(),
            };
            let (k, m) = shape.split_once('+').ok_or_else(bad)?;
            let k = k.parse::<u8>().map_err(|_| bad())?;
            let m = m.parse::<u8>().map_err(|_| bad())?;
            Self::erasure(k, m).map_err(|_| bad())
        } else {
            Err(PolicyError::UnknownRedundancy(s.to_owned()))
        }
    }
}

impl TryFrom<String> for Redundancy {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Redundancy> for String {
    fn from(r: Redundancy) -> String {
        r.to_string()
    }
}

/// Line-delimited record formats whose records a chunk never splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// One JSON value per line.
    Jsonl,
    /// RFC 4180 CSV: newlines inside double-quoted fields do not end a record.
    Csv,
}

impl fmt::Display for RecordFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Jsonl => "jsonl",
            Self::Csv => "csv",
        })
    }
}

impl FromStr for RecordFormat {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            _ => Err(PolicyError::UnknownRecordFormat(s.to_owned())),
        }
    }
}

/// How an object's bytes were cut into chunks. Recorded in the manifest, because dedup
/// between two uploads only works when both were cut the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkerSpec {
    /// Content-defined chunking (FastCDC 2020, normalization level 1).
    Cdc { min: u32, avg: u32, max: u32 },
    /// Fixed-size chunks; the last one may be shorter.
    Fixed { size: u32 },
    /// Content-defined cut points moved to record boundaries.
    Records {
        format: RecordFormat,
        min: u32,
        avg: u32,
        max: u32,
    },
}

impl ChunkerSpec {
    /// FastCDC with the default sizes.
    pub const DEFAULT_CDC: ChunkerSpec = ChunkerSpec::Cdc {
        min: CDC_MIN,
        avg: CDC_AVG,
        max: CDC_MAX,
    };

    /// Record-aligned chunking with the default sizes.
    pub fn records(format: RecordFormat) -> Self {
        Self::Records {
            format,
            min: CDC_MIN,
            avg: CDC_AVG,
            max: CDC_MAX,
        }
    }

    /// Validates the sizes: what a peer or a stored manifest claims is checked before use.
    pub fn validate(&self) -> Result<(), PolicyError> {
        match *self {
            Self::Fixed { size } => {
                if (MIN_FIXED_CHUNK_LEN..=MAX_CHUNK_LEN).contains(&size) {
                    Ok(())
                } else {
                    Err(PolicyError::FixedSize {
                        input: format!("fixed:{size}"),
                    })
                }
            }
            Self::Cdc { min, avg, max } | Self::Records { min, avg, max, .. } => {
                if 64 <= min && min <= avg && avg <= max && max <= MAX_CHUNK_LEN {
                    Ok(())
                } else {
                    Err(PolicyError::CdcBounds { min, avg, max })
                }
            }
        }
    }

    /// The longest chunk this chunker can produce.
    pub fn max_chunk_len(&self) -> u32 {
        match *self {
            Self::Fixed { size } => size,
            Self::Cdc { max, .. } | Self::Records { max, .. } => max,
        }
    }
}

impl Default for ChunkerSpec {
    fn default() -> Self {
        Self::DEFAULT_CDC
    }
}

impl fmt::Display for ChunkerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Cdc {
                min: CDC_MIN,
                avg: CDC_AVG,
                max: CDC_MAX,
            } => f.write_str("cdc"),
            Self::Cdc { min, avg, max } => write!(f, "cdc:{min}:{avg}:{max}"),
            Self::Fixed { size } => write!(f, "fixed:{size}"),
            Self::Records { format, .. } => write!(f, "records:{format}"),
        }
    }
}

impl FromStr for ChunkerSpec {
    type Err = PolicyError;

    /// Accepts `cdc`, `cdc:MIN:AVG:MAX`, `fixed:SIZE` (SIZE in bytes or with a unit such as
    /// `1MiB`) and `records:jsonl|csv`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let spec = if s == "cdc" {
            Self::DEFAULT_CDC
        } else if let Some(sizes) = s.strip_prefix("cdc:") {
            let parts: Vec<u32> = sizes
                .split(':')
                .map(parse_size)
                .collect::<Option<_>>()
                .ok_or_else(|| PolicyError::UnknownChunker(s.to_owned()))?;
            match parts[..] {
                [min, avg, max] => Self::Cdc { min, avg, max },
                _ => return Err(PolicyError::UnknownChunker(s.to_owned())),
            }
        } else if let Some(size) = s.strip_prefix("fixed:") {
            let size = parse_size(size).ok_or_else(|| PolicyError::FixedSize {
                input: s.to_owned(),
            })?;
            Self::Fixed { size }
        } else if let Some(format) = s.strip_prefix("records:") {
            Self::records(format.parse()?)
        } else {
            return Err(PolicyError::UnknownChunker(s.to_owned()));
        };
        spec.validate().map_err(|e| match e {
            PolicyError::FixedSize { .. } => PolicyError::FixedSize {
                input: s.to_owned(),
            },
            other => other,
        })?;
        Ok(spec)
    }
}

fn parse_size(s: &str) -> Option<u32> {
    let bytes = s.trim().parse::<bytesize::ByteSize>().ok()?.as_u64();
    u32::try_from(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redundancy_parses_and_displays() {
        assert_eq!("rep:3".parse(), Ok(Redundancy::Replicas(3)));
        assert_eq!("rep:1".parse(), Ok(Redundancy::Replicas(1)));
        assert_eq!("rep:16".parse(), Ok(Redundancy::Replicas(16)));
        assert_eq!(
            "ec:4+2".parse(),
            Ok(Redundancy::Erasure { data: 4, parity: 2 })
        );
        assert_eq!(
            "ec:60+4".parse(),
            Ok(Redundancy::Erasure {
                data: 60,
                parity: 4
            })
        );
        for s in ["rep:3", "ec:8+3", "rep:1"] {
            assert_eq!(s.parse::<Redundancy>().unwrap().to_string(), s);
        }
        assert_eq!(Redundancy::DEFAULT.default_write_quorum(), 2);
        assert_eq!(Redundancy::Replicas(1).default_write_quorum(), 1);
        assert_eq!(
            Redundancy::Erasure { data: 4, parity: 2 }.default_write_quorum(),
            5
        );
    }

    #[test]
    fn redundancy_errors_say_what_is_wrong() {
        for (input, want) in [
            ("rep:0", "from 1 to 16"),
            ("rep:17", "from 1 to 16"),
            ("rep:x", "from 1 to 16"),
            ("rep:300", "from 1 to 16"),
            ("ec:0+2", "K >= 1"),
            ("ec:4+0", "M >= 1"),
            ("ec:60+5", "K+M <= 64"),
            ("ec:4", "K+M"),
            ("ec:4-2", "K+M"),
            ("raid5", "expected rep:N"),
            ("", "expected rep:N"),
        ] {
            let err = input.parse::<Redundancy>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
    }

    #[test]
    fn redundancy_serializes_as_its_string() {
        let json = serde_json::to_string(&Redundancy::Erasure { data: 4, parity: 2 }).unwrap();
        assert_eq!(json, "\"ec:4+2\"");
        assert!(serde_json::from_str::<Redundancy>("\"rep:99\"").is_err());
    }

    #[test]
    fn chunker_specs_parse_and_validate() {
        assert_eq!("cdc".parse(), Ok(ChunkerSpec::DEFAULT_CDC));
        assert_eq!(
            "fixed:1MiB".parse(),
            Ok(ChunkerSpec::Fixed { size: 1 << 20 })
        );
        assert_eq!(
            "fixed:65536".parse(),
            Ok(ChunkerSpec::Fixed { size: 65536 })
        );
        assert_eq!(
            "records:csv".parse(),
            Ok(ChunkerSpec::records(RecordFormat::Csv))
        );
        assert_eq!(
            "cdc:64KiB:128KiB:512KiB".parse(),
            Ok(ChunkerSpec::Cdc {
                min: 64 << 10,
                avg: 128 << 10,
                max: 512 << 10
            })
        );
        assert!(matches!(
            "fixed:10".parse::<ChunkerSpec>(),
            Err(PolicyError::FixedSize { .. })
        ));
        assert!(matches!(
            "fixed:1GiB".parse::<ChunkerSpec>(),
            Err(PolicyError::FixedSize { .. })
        ));
        assert!(matches!(
            "fixed:lots".parse::<ChunkerSpec>(),
            Err(PolicyError::FixedSize { .. })
        ));
        assert!(matches!(
            "cdc:4:2:1".parse::<ChunkerSpec>(),
            Err(PolicyError::CdcBounds { .. })
        ));
        assert!(matches!(
            "rabin".parse::<ChunkerSpec>(),
            Err(PolicyError::UnknownChunker(_))
        ));
        assert!(matches!(
            "records:xml".parse::<ChunkerSpec>(),
            Err(PolicyError::UnknownRecordFormat(_))
        ));
        for s in ["cdc", "fixed:1048576", "records:jsonl"] {
            assert_eq!(s.parse::<ChunkerSpec>().unwrap().to_string(), s);
        }
    }
}
