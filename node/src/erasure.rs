//! Erasure coding of chunks for `ec:K+M`: a chunk becomes K data shards and M parity shards of
//! equal length, any K of which rebuild it.
//!
//! Layout (part of the storage format, since shard ids are hashes of shard bytes): the chunk
//! is cut into K pieces of `shard_len(len, K)` bytes, the last one zero-padded; the M parity
//! shards follow. The chunk's length comes from the manifest, so the padding is dropped on
//! decode. Every node must encode identically, which is why the codec is fixed per build
//! rather than chosen per node.
//!
//! The codec itself sits behind [`Codec`], one instance per shape, built once and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

/// Shards are padded to a multiple of this: SIMD kernels work on whole vectors.
pub const SHARD_ALIGN: usize = 64;

/// Why encoding or decoding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErasureError {
    #[error("ec:{data}+{parity} is not a valid shape: {reason}")]
    Shape {
        data: usize,
        parity: usize,
        reason: String,
    },
    #[error("only {present} of the {needed} shards needed to rebuild the chunk are present")]
    TooFewShards { present: usize, needed: usize },
    #[error("shard {index} is {len} bytes, expected {expected}")]
    ShardLength {
        index: usize,
        len: usize,
        expected: usize,
    },
    #[error("expected {expected} shard slots, got {got}")]
    ShardCount { expected: usize, got: usize },
    #[error("erasure codec failed: {0}")]
    Codec(String),
}

/// A Reed-Solomon code of one shape.
pub trait Codec: Send + Sync {
    fn data(&self) -> usize;
    fn parity(&self) -> usize;
    /// Fills the parity shards (`shards[K..]`) from the data shards; all have equal length.
    fn encode(&self, shards: &mut [Vec<u8>]) -> Result<(), ErasureError>;
    /// Fills every missing shard from any K present ones.
    fn reconstruct(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), ErasureError>;
}

/// `reed-solomon-erasure` (GF(2^8), Vandermonde-derived matrix, C SIMD kernels).
struct RsErasure {
    inner: reed_solomon_erasure::galois_8::ReedSolomon,
}

impl Codec for RsErasure {
    fn data(&self) -> usize {
        self.inner.data_shard_count()
    }

    fn parity(&self) -> usize {
        self.inner.parity_shard_count()
    }

    fn encode(&self, shards: &mut [Vec<u8>]) -> Result<(), ErasureError> {
        self.inner
            .encode(shards)
            .map_err(|e| ErasureError::Codec(format!("{e:?}")))
    }

    fn reconstruct(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), ErasureError> {
        self.inner
            .reconstruct(shards)
            .map_err(|e| ErasureError::Codec(format!("{e:?}")))
    }
}

/// Codecs built so far, by shape.
type Codecs = Mutex<HashMap<(usize, usize), Arc<dyn Codec>>>;

/// The codec of shape `ec:data+parity`, built on first use and shared.
pub fn codec(data: usize, parity: usize) -> Result<Arc<dyn Codec>, ErasureError> {
    static CACHE: OnceLock<Codecs> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(codec) = cache.get(&(data, parity)) {
        return Ok(Arc::clone(codec));
    }
    let inner = reed_solomon_erasure::galois_8::ReedSolomon::new(data, parity).map_err(|e| {
        ErasureError::Shape {
            data,
            parity,
            reason: format!("{e:?}"),
        }
    })?;
    let codec: Arc<dyn Codec> = Arc::new(RsErasure { inner });
    cache.insert((data, parity), Arc::clone(&codec));
    Ok(codec)
}

/// Length of every shard of a chunk of `chunk_len` bytes cut into `data` pieces.
pub fn shard_len(chunk_len: usize, data: usize) -> usize {
    let piece = chunk_len.div_ceil(data.max(1)).max(1);
    piece.div_ceil(SHARD_ALIGN) * SHARD_ALIGN
}

/// The K+M shards of `chunk`.
pub fn encode(data: usize, parity: usize, chunk: &[u8]) -> Result<Vec<Bytes>, ErasureError> {
    let codec = codec(data, parity)?;
    let len = shard_len(chunk.len(), data);
    let mut shards: Vec<Vec<u8>> = (0..data + parity)
        .map(|i| {
            let start = (i * len).min(chunk.len());
            let end = ((i + 1) * len).min(chunk.len());
            let mut shard = Vec::with_capacity(len);
            if i < data {
                shard.extend_from_slice(&chunk[start..end]);
            }
            shard.resize(len, 0);
            shard
        })
        .collect();
    codec.encode(&mut shards)?;
    Ok(shards.into_iter().map(Bytes::from).collect())
}

/// Every shard, rebuilding the missing ones from any K present (each `shard_len` long).
pub fn rebuild(
    data: usize,
    parity: usize,
    shards: Vec<Option<Bytes>>,
    chunk_len: usize,
) -> Result<Vec<Bytes>, ErasureError> {
    let expected = shard_len(chunk_len, data);
    if shards.len() != data + parity {
        return Err(ErasureError::ShardCount {
            expected: data + parity,
            got: shards.len(),
        });
    }
    let present = shards.iter().filter(|s| s.is_some()).count();
    if present < data {
        return Err(ErasureError::TooFewShards {
            present,
            needed: data,
        });
    }
    for (index, shard) in shards.iter().enumerate() {
        if let Some(shard) = shard
            && shard.len() != expected
        {
            return Err(ErasureError::ShardLength {
                index,
                len: shard.len(),
                expected,
            });
        }
    }
    if present == data + parity {
        return Ok(shards.into_iter().flatten().collect());
    }
    let codec = codec(data, parity)?;
    let mut slots: Vec<Option<Vec<u8>>> =
        shards.into_iter().map(|s| s.map(|b| b.to_vec())).collect();
    codec.reconstruct(&mut slots)?;
    slots
        .into_iter()
        .enumerate()
        .map(|(index, s)| {
            s.map(Bytes::from).ok_or(ErasureError::Codec(format!(
                "shard {index} still missing after reconstruction"
            )))
        })
        .collect()
}

/// The chunk of `chunk_len` bytes, from any K of its shards (`None` = missing).
pub fn decode(
    data: usize,
    parity: usize,
    shards: Vec<Option<Bytes>>,
    chunk_len: usize,
) -> Result<Bytes, ErasureError> {
    let len = shard_len(chunk_len, data);
    let have_all_data = shards.len() == data + parity && shards[..data].iter().all(Option::is_some);
    let shards = if have_all_data {
        shards
    } else {
        rebuild(data, parity, shards, chunk_len)?
            .into_iter()
            .map(Some)
            .collect()
    };
    let mut out = Vec::with_capacity(data * len);
    for (index, shard) in shards.into_iter().take(data).enumerate() {
        let shard = shard.ok_or(ErasureError::TooFewShards {
            present: index,
            needed: data,
        })?;
        if shard.len() != len {
            return Err(ErasureError::ShardLength {
                index,
                len: shard.len(),
                expected: len,
            });
        }
        out.extend_from_slice(&shard);
    }
    out.truncate(chunk_len);
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shards_are_aligned_and_cover_the_chunk() {
        assert_eq!(shard_len(0, 4), SHARD_ALIGN);
        assert_eq!(shard_len(1, 4), SHARD_ALIGN);
        assert_eq!(shard_len(1 << 20, 4), 1 << 18);
        assert_eq!(shard_len((1 << 20) + 1, 4), (1 << 18) + SHARD_ALIGN);
        for len in [0, 1, 63, 64, 1000, 1 << 20] {
            for k in [1, 2, 4, 8, 10] {
                assert!(shard_len(len, k) * k >= len);
                assert_eq!(shard_len(len, k) % SHARD_ALIGN, 0);
            }
        }
    }

    #[test]
    fn encoding_is_deterministic() {
        let chunk: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(encode(4, 2, &chunk).unwrap(), encode(4, 2, &chunk).unwrap());
    }

    #[test]
    fn bad_shapes_and_short_inputs_are_errors() {
        assert!(matches!(codec(0, 2), Err(ErasureError::Shape { .. })));
        let shards = encode(4, 2, b"hello").unwrap();
        let mut missing: Vec<Option<Bytes>> = shards.into_iter().map(Some).collect();
        for slot in missing.iter_mut().take(3) {
            *slot = None;
        }
        assert_eq!(
            decode(4, 2, missing, 5).unwrap_err(),
            ErasureError::TooFewShards {
                present: 3,
                needed: 4
            }
        );
        let wrong = vec![Some(Bytes::from_static(b"x")); 6];
        assert!(matches!(
            decode(4, 2, wrong, 5),
            Err(ErasureError::ShardLength { .. })
        ));
        assert!(matches!(
            rebuild(4, 2, vec![None; 5], 5),
            Err(ErasureError::ShardCount { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_k_shards_rebuild_the_chunk_and_every_shard(
            chunk in proptest::collection::vec(any::<u8>(), 0..20_000),
            (data, parity) in (1usize..9, 1usize..5),
            lose_seed in any::<u64>(),
        ) {
            let shards = encode(data, parity, &chunk).unwrap();
            prop_assert_eq!(shards.len(), data + parity);
            // Lose `parity` shards chosen by the seed.
            let mut slots: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
            let mut seed = lose_seed;
            for _ in 0..parity {
                let present: Vec<usize> =
                    (0..slots.len()).filter(|&i| slots[i].is_some()).collect();
                let victim = present[(seed % present.len() as u64) as usize];
                slots[victim] = None;
                seed = seed.rotate_left(13) ^ 0x9e37_79b9_7f4a_7c15;
            }
            let back = decode(data, parity, slots.clone(), chunk.len()).unwrap();
            prop_assert_eq!(&back[..], &chunk[..]);
            let all = rebuild(data, parity, slots, chunk.len()).unwrap();
            prop_assert_eq!(all, shards);
        }
    }
}
