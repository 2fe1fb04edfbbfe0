//! The manifest: the versioned description of an object (name, size, chunker, redundancy,
//! the ordered list of chunks, user metadata, creation time).
//!
//! The encoding is canonical: bincode 2 with its standard configuration, fields in declaration
//! order, metadata in a `BTreeMap`. Equal manifests therefore encode to equal bytes, and the
//! [`ObjectId`] is the BLAKE3 of those bytes. The first field is the format version; a decoder
//! reads it alone before the rest, so a future layout can be recognised and refused with a
//! clear error instead of being misread.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::id::{ChunkId, ObjectId};
use crate::policy::{ChunkerSpec, MAX_CHUNK_LEN, PolicyError, Redundancy};

/// The manifest layout this build writes and reads.
pub const MANIFEST_VERSION: u16 = 1;
/// Largest encoded manifest a decoder accepts: about 7 million chunks, i.e. several TiB at the
/// default chunk size.
pub const MAX_MANIFEST_LEN: usize = 256 * 1024 * 1024;
/// Longest object name.
pub const MAX_NAME_LEN: usize = 4096;
/// Most user metadata entries, and the longest key or value.
pub const MAX_METADATA_ENTRIES: usize = 256;
pub const MAX_METADATA_LEN: usize = 4096;

/// One chunk of an object, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// The description of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_VERSION`] for manifests this build creates.
    pub version: u16,
    pub name: Option<String>,
    /// Total length in bytes: the sum of the chunk lengths.
    pub size: u64,
    pub chunker: ChunkerSpec,
    pub redundancy: Redundancy,
    pub chunks: Vec<ChunkRef>,
    pub metadata: BTreeMap<String, String>,
    /// Milliseconds since the Unix epoch. Part of the identity: two uploads of the same bytes
    /// at different times are different objects that share every chunk.
    pub created_ms: u64,
}

/// Why bytes are not a valid manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "manifest format version {found} is not supported (this build reads version {MANIFEST_VERSION})"
    )]
    UnsupportedVersion { found: u16 },
    #[error("manifest is malformed: {0}")]
    Malformed(String),
    #[error("manifest has {extra} trailing bytes after its end")]
    TrailingBytes { extra: usize },
    #[error("manifest is {len} bytes, more than the {MAX_MANIFEST_LEN} allowed")]
    TooLarge { len: usize },
    #[error("manifest is inconsistent: {0}")]
    Invalid(String),
    #[error("manifest has an invalid chunker: {0}")]
    Chunker(#[from] PolicyError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MANIFEST_LEN>()
}

impl Manifest {
    /// Builds a version-1 manifest and checks it.
    pub fn new(
        name: Option<String>,
        chunker: ChunkerSpec,
        redundancy: Redundancy,
        chunks: Vec<ChunkRef>,
        metadata: BTreeMap<String, String>,
        created_ms: u64,
    ) -> Result<Self, ManifestError> {
        let size = chunks.iter().map(|c| u64::from(c.len)).sum();
        let manifest = Self {
            version: MANIFEST_VERSION,
            name,
            size,
            chunker,
            redundancy,
            chunks,
            metadata,
            created_ms,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail; an error here would be a bug in the
        // types above, so fall back to an empty (and therefore undecodable) encoding.
        bincode::serde::encode_to_vec(self, config()).unwrap_or_default()
    }

    /// The object's id: BLAKE3 of [`Manifest::encode`].
    pub fn object_id(&self) -> ObjectId {
        ObjectId::of(&self.encode())
    }

    /// Decodes and validates; refuses unknown versions, trailing bytes and inconsistencies.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_LEN {
            return Err(ManifestError::TooLarge { len: bytes.len() });
        }
        let (version, _): (u16, usize) = bincode::serde::decode_from_slice(bytes, config())
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if version != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion { found: version });
        }
        let (manifest, read): (Manifest, usize) =
            bincode::serde::decode_from_slice(bytes, config())
                .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if read != bytes.len() {
            return Err(ManifestError::TrailingBytes {
                extra: bytes.len() - read,
            });
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Decodes `bytes` and checks that they hash to `id`.
    pub fn decode_verified(id: &ObjectId, bytes: &[u8]) -> Result<Self, ManifestError> {
        let actual = ObjectId::of(bytes);
        if &actual != id {
            return Err(ManifestError::Invalid(format!(
                "bytes hash to {actual}, not to the requested object {id}"
            )));
        }
        Self::decode(bytes)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if self.version != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion {
                found: self.version,
            });
        }
        self.chunker.validate()?;
        let max = self.chunker.max_chunk_len().min(MAX_CHUNK_LEN);
        let mut total: u64 = 0;
        for (i, chunk) in self.chunks.iter().enumerate() {
            if chunk.len == 0 || chunk.len > max {
                return Err(ManifestError::Invalid(format!(
                    "chunk {i} is {} bytes; chunks are 1 to {max} bytes",
                    chunk.len
                )));
            }
            total += u64::from(chunk.len);
        }
        if total != self.size {
            return Err(ManifestError::Invalid(format!(
                "size is {} but the chunks add up to {total}",
                self.size
            )));
        }
        if self.name.as_ref().is_some_and(|n| n.len() > MAX_NAME_LEN) {
            return Err(ManifestError::Invalid(format!(
                "name is longer than {MAX_NAME_LEN} bytes"
            )));
        }
        if self.metadata.len() > MAX_METADATA_ENTRIES
            || self
                .metadata
                .iter()
                .any(|(k, v)| k.len() > MAX_METADATA_LEN || v.len() > MAX_METADATA_LEN)
        {
            return Err(ManifestError::Invalid(format!(
                "metadata allows {MAX_METADATA_ENTRIES} entries of at most {MAX_METADATA_LEN} bytes"
            )));
        }
        Ok(())
    }

    /// Byte offset of each chunk within the object, in order.
    pub fn chunk_offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> {
        self.chunks.iter().scan(0u64, |offset, chunk| {
            let start = *offset;
            *offset += u64::from(chunk.len);
            Some((start, chunk))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RecordFormat;

    fn sample() -> Manifest {
        let chunks = vec![
            ChunkRef {
                id: ChunkId::of(b"a"),
                len: 300_000,
            },
            ChunkRef {
                id: ChunkId::of(b"b"),
                len: 12,
            },
        ];
        let mut metadata = BTreeMap::new();
        metadata.insert("owner".into(), "ml-team".into());
        Manifest::new(
            Some("train.jsonl".into()),
            ChunkerSpec::records(RecordFormat::Jsonl),
            Redundancy::DEFAULT,
            chunks,
            metadata,
            1_700_000_000_000,
        )
        .unwrap()
    }

    #[test]
    fn round_trips_canonically() {
        let m = sample();
        let bytes = m.encode();
        let back = Manifest::decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.encode(), bytes);
        assert_eq!(m.size, 300_012);
        assert_eq!(m.object_id(), ObjectId::of(&bytes));
        assert_eq!(
            Manifest::decode_verified(&m.object_id(), &bytes).unwrap(),
            m
        );
        let offsets: Vec<u64> = m.chunk_offsets().map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![0, 300_000]);
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut m = sample();
        m.version = 2;
        let bytes = bincode::serde::encode_to_vec(&m, config()).unwrap();
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::UnsupportedVersion { found: 2 })
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = sample().encode();
        bytes.extend_from_slice(b"xx");
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::TrailingBytes { extra: 2 })
        ));
    }

    #[test]
    fn truncated_and_inconsistent_manifests_are_refused() {
        let bytes = sample().encode();
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(Manifest::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut m = sample();
        m.size += 1;
        let bytes = bincode::serde::encode_to_vec(&m, config()).unwrap();
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::Invalid(_))
        ));
        assert!(Manifest::decode_verified(&ObjectId::of(b"other"), &sample().encode()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(0u8.., 0..512)) {
            let _ = Manifest::decode(&bytes);
        }
    }
}
