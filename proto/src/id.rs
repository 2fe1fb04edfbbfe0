//! Content addresses: 32-byte BLAKE3 digests, shown as 64 lowercase hex characters.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    #[error("an id is 64 hex characters, got {len} characters")]
    WrongLength { len: usize },
    #[error("an id is 64 hex characters, found {found:?} at position {position}")]
    NotHex { found: char, position: usize },
}

macro_rules! digest_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; DIGEST_LEN]);

        impl $name {
            /// Wraps a digest.
            pub const fn from_bytes(bytes: [u8; DIGEST_LEN]) -> Self {
                Self(bytes)
            }

            /// The digest's bytes.
            pub const fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
                &self.0
            }

            /// The BLAKE3 digest of `data`.
            pub fn of(data: &[u8]) -> Self {
                Self(*blake3::hash(data).as_bytes())
            }

            /// The first 8 hex characters, for logs.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(hash: blake3::Hash) -> Self {
                Self(*hash.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; DIGEST_LEN * 2];
                // Encoding into a buffer of exactly twice the input length cannot fail.
                hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_digest(s).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.collect_str(self)
                } else {
                    self.0.serialize(serializer)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    deserializer.deserialize_str(HexVisitor).map(Self)
                } else {
                    <[u8; DIGEST_LEN]>::deserialize(deserializer).map(Self)
                }
            }
        }
    };
}

digest_id!(
    /// The BLAKE3-256 digest of a chunk's (or erasure shard's) bytes.
    ChunkId
);
digest_id!(
    /// The BLAKE3-256 digest of an object's canonical manifest encoding.
    ObjectId
);
digest_id!(
    /// The BLAKE3-256 digest of a job's canonical spec encoding.
    JobId
);

fn parse_digest(s: &str) -> Result<[u8; DIGEST_LEN], IdParseError> {
    let len = s.chars().count();
    if let Some((position, found)) = s.chars().enumerate().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(IdParseError::NotHex { found, position });
    }
    if len != DIGEST_LEN * 2 {
        return Err(IdParseError::WrongLength { len });
    }
    let mut out = [0u8; DIGEST_LEN];
    hex::decode_to_slice(s.to_ascii_lowercase(), &mut out)
        .map_err(|_| IdParseError::WrongLength { len })?;
    Ok(out)
}

struct HexVisitor;

impl Visitor<'_> for HexVisitor {
    type Value = [u8; DIGEST_LEN];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a 64-character hex digest")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_digest(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_lowercase_hex_and_round_trips() {
        let id = ChunkId::of(b"hello");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert!(
            s.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        assert_eq!(s, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(s.parse::<ChunkId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<ChunkId>().unwrap(), id);
    }

    #[test]
    fn malformed_ids_are_rejected_with_a_reason() {
        assert_eq!(
            "".parse::<ObjectId>(),
            Err(IdParseError::WrongLength { len: 0 })
        );
        assert_eq!(
            "abc".parse::<ObjectId>(),
            Err(IdParseError::WrongLength { len: 3 })
        );
        let long = "a".repeat(65);
        assert_eq!(
            long.parse::<ObjectId>(),
            Err(IdParseError::WrongLength { len: 65 })
        );
        let mut bad = "0".repeat(64);
        bad.replace_range(10..11, "g");
        assert_eq!(
            bad.parse::<ObjectId>(),
            Err(IdParseError::NotHex {
                found: 'g',
                position: 10
            })
        );
        let unicode = format!("{}é", "0".repeat(63));
        assert!(matches!(
            unicode.parse::<ObjectId>(),
            Err(IdParseError::NotHex {
                found: 'é',
                position: 63
            })
        ));
        let msg = "xyz".parse::<ObjectId>().unwrap_err().to_string();
        assert!(msg.contains("64 hex characters"), "{msg}");
    }

    #[test]
    fn json_uses_hex_and_binary_uses_raw_bytes() {
        let id = ObjectId::of(b"x");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<ObjectId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<ObjectId>("\"nothex\"").is_err());

        let cfg = bincode::config::standard();
        let bin = bincode::serde::encode_to_vec(id, cfg).unwrap();
        assert_eq!(bin.len(), DIGEST_LEN);
        let (back, _): (ObjectId, usize) = bincode::serde::decode_from_slice(&bin, cfg).unwrap();
        assert_eq!(back, id);
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_strings_never_panics(s in ".{0,80}") {
            let _ = s.parse::<ChunkId>();
        }

        #[test]
        fn every_digest_round_trips(bytes in proptest::array::uniform32(0u8..)) {
            let id = ChunkId::from_bytes(bytes);
            proptest::prop_assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
        }
    }
}
