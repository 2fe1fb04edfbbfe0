//! Erasure coding of chunks for `ec:K+M`: a chunk becomes K data shards and M parity shards of
//! equal length, any K of which rebuild it.
//!
//! Layout (part of the storage format, since shard ids are hashes of shard bytes): the chunk
//! is cut into K pieces of `shard_len(len, K)` bytes, the last one zero-padded; the M parity
//! shards follow. The chunk's length comes from the manifest, so the padding is dropped on
//! decode. Every node must encode identically, which is why the codec is fixed per build
//! rather than chosen per node.
//!
//! The codec is part of the storage format too. Two are built, behind [`Codec`]:
//! `reed-solomon-erasure` (GF(2^8)) and `reed-solomon-simd` (GF(2^16)). They are different codes
//! and write different parity shards, so shards written with one cannot be read with the
//! other. Switching [`Backend::DEFAULT`] would need the codec recorded with each object, so
//! that existing objects keep theirs. `shard_bytes_are_pinned` fails if a crate upgrade
//! changes the bytes.
//!
//! The default is `reed-solomon-erasure`. `benches/erasure.rs` compares the two (figures and
//! command in the README, "Erasure coding codecs"). On the 2-core development VM, one core,
//! medians of three runs: for 1 MiB chunks at ec:4+2 the codec alone encodes at 11.4 GiB/s
//! and rebuilds two lost data shards at 8.0 GiB/s, where reed-solomon-simd manages 7.6 and
//! 1.0 GiB/s; the module's `encode` and `decode` (two data shards lost) run at 8.0 and
//! 6.7 GiB/s, against 6.3 and 1.2 GiB/s. It is ahead at every shape and shard size measured
//! (4+2, 8+3, 10+4; 64 KiB to 1 MiB shards): 1.1x to 1.8x on encode, 2.8x to 14x on
//! reconstruct. reed-solomon-simd's FFT costs the same per byte however few shards are lost,
//! which pays off only with many shards (its README puts the break-even for decoding at about
//! 42 recovery shards), while `ec:K+M` allows K+M <= 64 and the shapes in use have M of 2 to
//! 4. One caveat: reed-solomon-erasure's build script compiles its C kernels with
//! `-march=haswell` (AVX2, no run-time dispatch; `RUST_REED_SOLOMON_ERASURE_ARCH` overrides
//! it), so nodes need an AVX2 CPU although the rest of the build targets x86-64-v2;
//! reed-solomon-simd picks AVX2, SSSE3 or plain Rust at run time.
//!
//! Data flow: [`encode`] copies the chunk once into one buffer holding all K+M shards and
//! hands them out as slices of one [`Bytes`]; [`decode`] assembles the chunk in place,
//! copying the present data shards and reconstructing the missing ones straight into their
//! place; [`rebuild`] passes present shards through and reconstructs only the missing ones.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

/// Shards are padded to a multiple of this: SIMD kernels work on whole vectors.
pub const SHARD_ALIGN: usize = 64;

/// Working space kept per codec for reuse (`reed-solomon-simd` encoders and decoders,
/// `reed-solomon-erasure` scratch buffers; each about one or two chunks' worth); more concurrent
/// calls than this allocate throwaway ones.
const POOL_SIZE: usize = 4;

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

/// The Reed-Solomon implementations a build can encode with. They are different codes over
/// different fields, so their parity shards differ: shards written with one cannot be read
/// with the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `reed-solomon-erasure`: GF(2^8), a Vandermonde-derived matrix, C SIMD kernels;
    /// O(K·M) per byte.
    RsErasure,
    /// `reed-solomon-simd`: GF(2^16), Leopard-style FFT, runtime-selected AVX2/SSSE3/NEON;
    /// the cost per byte grows with the logarithm of the shard count, not with K·M.
    RsSimd,
}

impl Backend {
    /// The codec this build stores shards with (the module comment says why).
    pub const DEFAULT: Backend = Backend::RsErasure;
    /// Every backend, for benchmarks and tests.
    pub const ALL: [Backend; 2] = [Backend::RsErasure, Backend::RsSimd];

    /// The crate's name.
    pub fn name(self) -> &'static str {
        match self {
            Backend::RsErasure => "reed-solomon-erasure",
            Backend::RsSimd => "reed-solomon-simd",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Reed-Solomon code of one shape.
pub trait Codec: Send + Sync {
    fn backend(&self) -> Backend;
    fn data(&self) -> usize;
    fn parity(&self) -> usize;
    /// Computes the M parity shards from the K data shards. Every shard has the same length,
    /// a non-zero multiple of [`SHARD_ALIGN`].
    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), ErasureError>;
    /// Fills the shards `wanted` names (shard index, buffer of the shard length) from any K
    /// present ones among the K+M `shards` (`None` = missing). Asking for data shards only is
    /// cheaper: no parity is computed then.
    fn reconstruct(
        &self,
        shards: &[Option<&[u8]>],
        wanted: &mut [(usize, &mut [u8])],
    ) -> Result<(), ErasureError>;
}

fn codec_error(e: impl fmt::Debug) -> ErasureError {
    ErasureError::Codec(format!("{e:?}"))
}

/// A shard length a codec accepts: non-zero and aligned.
fn check_aligned(index: usize, len: usize) -> Result<(), ErasureError> {
    if len == 0 || !len.is_multiple_of(SHARD_ALIGN) {
        return Err(ErasureError::ShardLength {
            index,
            len,
            expected: len.div_ceil(SHARD_ALIGN).max(1) * SHARD_ALIGN,
        });
    }
    Ok(())
}

/// Checks what [`Codec::encode`] is given.
fn check_encode(
    codec: &dyn Codec,
    data: &[&[u8]],
    parity: &[&mut [u8]],
) -> Result<(), ErasureError> {
    if data.len() != codec.data() || parity.len() != codec.parity() {
        return Err(ErasureError::ShardCount {
            expected: codec.data() + codec.parity(),
            got: data.len() + parity.len(),
        });
    }
    let len = data.first().map_or(0, |shard| shard.len());
    check_aligned(0, len)?;
    let lens = data
        .iter()
        .map(|s| s.len())
        .chain(parity.iter().map(|s| s.len()));
    for (index, got) in lens.enumerate() {
        if got != len {
            return Err(ErasureError::ShardLength {
                index,
                len: got,
                expected: len,
            });
        }
    }
    Ok(())
}

/// Checks what [`Codec::reconstruct`] is given; returns the shard length.
fn check_reconstruct(
    codec: &dyn Codec,
    shards: &[Option<&[u8]>],
    wanted: &[(usize, &mut [u8])],
) -> Result<usize, ErasureError> {
    let (data, parity) = (codec.data(), codec.parity());
    let len = shards
        .iter()
        .flatten()
        .next()
        .map_or(0, |shard| shard.len());
    check_slots(data, parity, shards, len)?;
    check_aligned(0, len)?;
    for (index, buf) in wanted {
        if *index >= data + parity {
            return Err(ErasureError::Codec(format!(
                "shard {index} asked for, but ec:{data}+{parity} has {} shards",
                data + parity
            )));
        }
        if buf.len() != len {
            return Err(ErasureError::ShardLength {
                index: *index,
                len: buf.len(),
                expected: len,
            });
        }
    }
    Ok(len)
}

/// `reed-solomon-erasure` (GF(2^8), Vandermonde-derived matrix, C SIMD kernels).
struct RsErasure {
    inner: reed_solomon_erasure::galois_8::ReedSolomon,
    scratch: Pool<Vec<u8>>,
}

impl RsErasure {
    fn new(data: usize, parity: usize) -> Result<Self, ErasureError> {
        let inner =
            reed_solomon_erasure::galois_8::ReedSolomon::new(data, parity).map_err(|e| {
                ErasureError::Shape {
                    data,
                    parity,
                    reason: format!("{e:?}"),
                }
            })?;
        Ok(Self {
            inner,
            scratch: Pool::new(),
        })
    }
}

impl Codec for RsErasure {
    fn backend(&self) -> Backend {
        Backend::RsErasure
    }

    fn data(&self) -> usize {
        self.inner.data_shard_count()
    }

    fn parity(&self) -> usize {
        self.inner.parity_shard_count()
    }

    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), ErasureError> {
        check_encode(self, data, parity)?;
        self.inner.encode_sep(data, parity).map_err(codec_error)
    }

    fn reconstruct(
        &self,
        shards: &[Option<&[u8]>],
        wanted: &mut [(usize, &mut [u8])],
    ) -> Result<(), ErasureError> {
        let len = check_reconstruct(self, shards, wanted)?;
        let data = self.data();
        // Wanted shards that are present are copied; the others are computed in place.
        let mut outs: Vec<Option<&mut [u8]>> = shards.iter().map(|_| None).collect();
        for (index, buf) in wanted.iter_mut() {
            match shards[*index] {
                Some(shard) => buf.copy_from_slice(shard),
                None => outs[*index] = Some(&mut **buf),
            }
        }
        let with_parity = outs[data..].iter().any(Option::is_some);
        // This crate reconstructs in place, so every shard it reads or writes must be mutable:
        // the present shards it reads are copied to scratch space, and so is any missing shard
        // it must compute that no one asked for. Without parity it reads only the first K
        // present shards and computes only data shards. Scratch contents need no zeroing: the
        // codec overwrites what it computes.
        let mut reads = 0;
        let needs_scratch: Vec<bool> = shards
            .iter()
            .zip(&outs)
            .enumerate()
            .map(|(index, (shard, out))| match shard {
                _ if out.is_some() => false,
                Some(_) if with_parity || reads < data => {
                    reads += 1;
                    true
                }
                Some(_) => false,
                None => with_parity || index < data,
            })
            .collect();
        let mut scratch = self.scratch.take().unwrap_or_default();
        scratch.resize(needs_scratch.iter().filter(|&&s| s).count() * len, 0);
        let mut spare = scratch.chunks_exact_mut(len);
        let mut slots: Vec<(&mut [u8], bool)> = Vec::with_capacity(shards.len());
        for ((out, shard), needs_scratch) in outs.into_iter().zip(shards).zip(needs_scratch) {
            let slot = match (out, needs_scratch.then(|| spare.next()).flatten()) {
                (Some(out), _) => (out, false),
                (None, Some(buf)) => {
                    if let Some(shard) = shard {
                        buf.copy_from_slice(shard);
                    }
                    (buf, shard.is_some())
                }
                (None, None) => (&mut [] as &mut [u8], false),
            };
            slots.push(slot);
        }
        let result = if with_parity {
            self.inner.reconstruct(&mut slots)
        } else {
            self.inner.reconstruct_data(&mut slots)
        };
        self.scratch.put(scratch);
        result.map_err(codec_error)
    }
}

/// Reusable working space, so a call neither allocates nor faults in fresh pages.
struct Pool<T>(Mutex<Vec<T>>);

impl<T> Pool<T> {
    fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    fn take(&self) -> Option<T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).pop()
    }

    fn put(&self, item: T) {
        let mut pool = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOL_SIZE {
            pool.push(item);
        }
    }
}

/// The `reed-solomon-simd` encoder and decoder, which are built and reset alike.
trait SimdCoder: Sized {
    fn build(data: usize, parity: usize, len: usize) -> Result<Self, reed_solomon_simd::Error>;
    fn reset_to(
        &mut self,
        data: usize,
        parity: usize,
        len: usize,
    ) -> Result<(), reed_solomon_simd::Error>;
}

// Both have inherent `new` and `reset` of the same signature.
macro_rules! impl_simd_coder {
    ($($coder:ty),*) => {$(
        impl SimdCoder for $coder {
            fn build(
                data: usize,
                parity: usize,
                len: usize,
            ) -> Result<Self, reed_solomon_simd::Error> {
                Self::new(data, parity, len)
            }

            fn reset_to(
                &mut self,
                data: usize,
                parity: usize,
                len: usize,
            ) -> Result<(), reed_solomon_simd::Error> {
                self.reset(data, parity, len)
            }
        }
    )*};
}

impl_simd_coder!(ReedSolomonEncoder, ReedSolomonDecoder);

impl<T: SimdCoder> Pool<T> {
    /// A pooled coder reset for `ec:data+parity` and shards of `len` bytes, or a new one.
    fn coder(&self, data: usize, parity: usize, len: usize) -> Result<T, ErasureError> {
        match self.take() {
            Some(mut coder) => {
                coder.reset_to(data, parity, len).map_err(codec_error)?;
                Ok(coder)
            }
            None => T::build(data, parity, len).map_err(codec_error),
        }
    }
}

/// `reed-solomon-simd` (GF(2^16), FFT-based, AVX2/SSSE3/NEON chosen at run time). Its
/// encoders and decoders are stateful, so they are pooled.
struct RsSimd {
    data: usize,
    parity: usize,
    encoders: Pool<ReedSolomonEncoder>,
    decoders: Pool<ReedSolomonDecoder>,
}

impl RsSimd {
    fn new(data: usize, parity: usize) -> Result<Self, ErasureError> {
        if data == 0 || parity == 0 || !ReedSolomonEncoder::supports(data, parity) {
            return Err(ErasureError::Shape {
                data,
                parity,
                reason: "reed-solomon-simd needs K >= 1, M >= 1 and K + M rounded up to a \
                         power of two at most 65536"
                    .into(),
            });
        }
        Ok(Self {
            data,
            parity,
            encoders: Pool::new(),
            decoders: Pool::new(),
        })
    }

    /// Computes the parity of `data` and hands each `wanted` parity shard (by index among
    /// the parity shards) its bytes.
    fn encode_into<'a>(
        &self,
        data: &[&[u8]],
        wanted: impl Iterator<Item = (usize, &'a mut [u8])>,
    ) -> Result<(), ErasureError> {
        let len = data.first().map_or(0, |shard| shard.len());
        let mut encoder = self.encoders.coder(self.data, self.parity, len)?;
        for shard in data {
            encoder.add_original_shard(shard).map_err(codec_error)?;
        }
        {
            let result = encoder.encode().map_err(codec_error)?;
            for (index, buf) in wanted {
                let recovery = result.recovery(index).ok_or_else(|| {
                    ErasureError::Codec(format!("parity shard {index} was not computed"))
                })?;
                buf.copy_from_slice(recovery);
            }
        }
        self.encoders.put(encoder);
        Ok(())
    }
}

impl Codec for RsSimd {
    fn backend(&self) -> Backend {
        Backend::RsSimd
    }

    fn data(&self) -> usize {
        self.data
    }

    fn parity(&self) -> usize {
        self.parity
    }

    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), ErasureError> {
        check_encode(self, data, parity)?;
        self.encode_into(data, parity.iter_mut().map(|buf| &mut **buf).enumerate())
    }

    fn reconstruct(
        &self,
        shards: &[Option<&[u8]>],
        wanted: &mut [(usize, &mut [u8])],
    ) -> Result<(), ErasureError> {
        let len = check_reconstruct(self, shards, wanted)?;
        let k = self.data;
        let missing = |index: &usize| shards[*index].is_none();
        let wants_missing = wanted.iter().any(|(index, _)| missing(index));
        let data_missing = (0..k).any(|index| missing(&index));
        // Missing data shards come from the decoder, given exactly K shards (data first).
        let mut decoder = None;
        if wants_missing && data_missing {
            let mut coder = self.decoders.coder(self.data, self.parity, len)?;
            let mut given = 0;
            for (index, shard) in shards.iter().enumerate() {
                let Some(shard) = shard else { continue };
                if given == k {
                    break;
                }
                let added = if index < k {
                    coder.add_original_shard(index, shard)
                } else {
                    coder.add_recovery_shard(index - k, shard)
                };
                added.map_err(codec_error)?;
                given += 1;
            }
            decoder = Some(coder);
        }
        {
            let restored = match decoder.as_mut() {
                Some(coder) => Some(coder.decode().map_err(codec_error)?),
                None => None,
            };
            let data_shard = |index: usize| {
                shards[index].or_else(|| restored.as_ref()?.restored_original(index))
            };
            let mut parity_wanted = Vec::new();
            for (index, buf) in wanted.iter_mut() {
                match shards[*index] {
                    Some(shard) => buf.copy_from_slice(shard),
                    None if *index < k => {
                        let shard = data_shard(*index).ok_or_else(|| {
                            ErasureError::Codec(format!("data shard {index} was not restored"))
                        })?;
                        buf.copy_from_slice(shard);
                    }
                    None => parity_wanted.push((*index - k, &mut **buf)),
                }
            }
            // Missing parity shards: encode again from the (now complete) data shards.
            if !parity_wanted.is_empty() {
                let data: Vec<&[u8]> = (0..k).filter_map(data_shard).collect();
                if data.len() != k {
                    return Err(ErasureError::Codec("data shards were not restored".into()));
                }
                self.encode_into(&data, parity_wanted.into_iter())?;
            }
        }
        if let Some(coder) = decoder {
            self.decoders.put(coder);
        }
        Ok(())
    }
}

/// Codecs built so far, by backend and shape.
type Codecs = Mutex<HashMap<(Backend, usize, usize), Arc<dyn Codec>>>;

/// The codec of `backend` for shape `ec:data+parity`, built on first use and shared.
/// Shards must be read with the backend that wrote them; nodes use [`codec`].
pub fn codec_with(
    backend: Backend,
    data: usize,
    parity: usize,
) -> Result<Arc<dyn Codec>, ErasureError> {
    static CACHE: OnceLock<Codecs> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(codec) = cache.get(&(backend, data, parity)) {
        return Ok(Arc::clone(codec));
    }
    let codec: Arc<dyn Codec> = match backend {
        Backend::RsErasure => Arc::new(RsErasure::new(data, parity)?),
        Backend::RsSimd => Arc::new(RsSimd::new(data, parity)?),
    };
    cache.insert((backend, data, parity), Arc::clone(&codec));
    Ok(codec)
}

/// The codec of shape `ec:data+parity` with this build's [`Backend::DEFAULT`].
pub fn codec(data: usize, parity: usize) -> Result<Arc<dyn Codec>, ErasureError> {
    codec_with(Backend::DEFAULT, data, parity)
}

/// Length of every shard of a chunk of `chunk_len` bytes cut into `data` pieces.
pub fn shard_len(chunk_len: usize, data: usize) -> usize {
    let piece = chunk_len.div_ceil(data.max(1)).max(1);
    piece.div_ceil(SHARD_ALIGN) * SHARD_ALIGN
}

/// The K+M shards of `chunk`. They are slices of one buffer, freed when the last is dropped.
pub fn encode(data: usize, parity: usize, chunk: &[u8]) -> Result<Vec<Bytes>, ErasureError> {
    encode_with(codec(data, parity)?.as_ref(), chunk)
}

/// [`encode`] with a given codec.
pub fn encode_with(codec: &dyn Codec, chunk: &[u8]) -> Result<Vec<Bytes>, ErasureError> {
    let (data, total) = (codec.data(), codec.data() + codec.parity());
    let len = shard_len(chunk.len(), data);
    // The data shards are the chunk itself plus zero padding; only padding and parity are
    // zeroed before the codec writes the parity.
    let mut buf = Vec::with_capacity(total * len);
    buf.extend_from_slice(chunk);
    buf.resize(total * len, 0);
    let (data_part, parity_part) = buf.split_at_mut(data * len);
    let data_shards: Vec<&[u8]> = data_part.chunks_exact(len).collect();
    let mut parity_shards: Vec<&mut [u8]> = parity_part.chunks_exact_mut(len).collect();
    codec.encode(&data_shards, &mut parity_shards)?;
    let buf = Bytes::from(buf);
    Ok((0..total)
        .map(|i| buf.slice(i * len..(i + 1) * len))
        .collect())
}

/// Checks the shard slots of a chunk whose shards are `len` bytes; returns how many are
/// present.
fn check_slots<S: AsRef<[u8]>>(
    data: usize,
    parity: usize,
    shards: &[Option<S>],
    len: usize,
) -> Result<usize, ErasureError> {
    if shards.len() != data + parity {
        return Err(ErasureError::ShardCount {
            expected: data + parity,
            got: shards.len(),
        });
    }
    let present = shards.iter().flatten().count();
    if present < data {
        return Err(ErasureError::TooFewShards {
            present,
            needed: data,
        });
    }
    for (index, shard) in shards.iter().enumerate() {
        if let Some(shard) = shard
            && shard.as_ref().len() != len
        {
            return Err(ErasureError::ShardLength {
                index,
                len: shard.as_ref().len(),
                expected: len,
            });
        }
    }
    Ok(present)
}

/// Every shard, rebuilding the missing ones from any K present (each `shard_len` long).
pub fn rebuild(
    data: usize,
    parity: usize,
    shards: Vec<Option<Bytes>>,
    chunk_len: usize,
) -> Result<Vec<Bytes>, ErasureError> {
    rebuild_with(codec(data, parity)?.as_ref(), shards, chunk_len)
}

/// [`rebuild`] with a given codec. Present shards are passed through; the rebuilt ones are
/// slices of one new buffer.
pub fn rebuild_with(
    codec: &dyn Codec,
    shards: Vec<Option<Bytes>>,
    chunk_len: usize,
) -> Result<Vec<Bytes>, ErasureError> {
    let (data, parity) = (codec.data(), codec.parity());
    let len = shard_len(chunk_len, data);
    let present = check_slots(data, parity, &shards, len)?;
    if present == data + parity {
        return Ok(shards.into_iter().flatten().collect());
    }
    let missing: Vec<usize> = (0..shards.len()).filter(|&i| shards[i].is_none()).collect();
    let mut buf = vec![0; missing.len() * len];
    let slots: Vec<Option<&[u8]>> = shards.iter().map(Option::as_deref).collect();
    let mut wanted: Vec<(usize, &mut [u8])> = missing
        .iter()
        .copied()
        .zip(buf.chunks_exact_mut(len))
        .collect();
    codec.reconstruct(&slots, &mut wanted)?;
    let buf = Bytes::from(buf);
    let mut rebuilt = buf.chunks_exact(len).map(|part| buf.slice_ref(part));
    shards
        .into_iter()
        .map(|shard| {
            shard.or_else(|| rebuilt.next()).ok_or_else(|| {
                ErasureError::Codec("a shard is still missing after reconstruction".into())
            })
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
    decode_with(codec(data, parity)?.as_ref(), shards, chunk_len)
}

/// [`decode`] with a given codec.
pub fn decode_with(
    codec: &dyn Codec,
    shards: Vec<Option<Bytes>>,
    chunk_len: usize,
) -> Result<Bytes, ErasureError> {
    let (data, parity) = (codec.data(), codec.parity());
    let len = shard_len(chunk_len, data);
    let have_all_data = shards.len() == data + parity && shards[..data].iter().all(Option::is_some);
    if have_all_data {
        // Only the data shards are read, so only they are checked.
        for (index, shard) in shards[..data].iter().flatten().enumerate() {
            if shard.len() != len {
                return Err(ErasureError::ShardLength {
                    index,
                    len: shard.len(),
                    expected: len,
                });
            }
        }
        if data == 1 {
            return Ok(shards[0]
                .as_ref()
                .map_or_else(Bytes::new, |s| s.slice(..chunk_len)));
        }
        let mut out = Vec::with_capacity(chunk_len);
        for shard in shards[..data].iter().flatten() {
            let take = (chunk_len - out.len()).min(len);
            out.extend_from_slice(&shard[..take]);
        }
        return Ok(Bytes::from(out));
    }
    check_slots(data, parity, &shards, len)?;
    // The chunk is assembled in place: present data shards are copied in, missing ones are
    // reconstructed straight into their place (zeroed first: the codec writes into them).
    let mut out = Vec::with_capacity(data * len);
    for shard in &shards[..data] {
        match shard {
            Some(shard) => out.extend_from_slice(shard),
            None => out.resize(out.len() + len, 0),
        }
    }
    let slots: Vec<Option<&[u8]>> = shards.iter().map(Option::as_deref).collect();
    let mut wanted: Vec<(usize, &mut [u8])> = out
        .chunks_exact_mut(len)
        .enumerate()
        .filter(|(index, _)| shards[*index].is_none())
        .collect();
    codec.reconstruct(&slots, &mut wanted)?;
    out.truncate(chunk_len);
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_chunk(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

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
    fn the_default_backend_encodes() {
        let chunk = sample_chunk(10_000);
        let default = codec_with(Backend::DEFAULT, 4, 2).unwrap();
        assert_eq!(codec(4, 2).unwrap().backend(), Backend::DEFAULT);
        assert_eq!(
            encode(4, 2, &chunk).unwrap(),
            encode_with(default.as_ref(), &chunk).unwrap()
        );
    }

    /// Shard bytes are part of the storage format: a codec or crate upgrade that changes them
    /// must fail here, not on a reader in the field.
    #[test]
    fn shard_bytes_are_pinned() {
        let chunk = sample_chunk(300_000);
        for (backend, expected) in [
            (
                Backend::RsErasure,
                "7ab1bb3bbc35fc8df596cbd2e1c0e308e1cb2dc55e7e04e1e9c01561d07151e4",
            ),
            (
                Backend::RsSimd,
                "d9367b26f49bcdfd6d7470f02c952c0a158bdd8b6b50651bc6b820b2f7cdd991",
            ),
        ] {
            let codec = codec_with(backend, 4, 2).unwrap();
            let mut hasher = blake3::Hasher::new();
            for shard in encode_with(codec.as_ref(), &chunk).unwrap() {
                hasher.update(&shard);
            }
            assert_eq!(hasher.finalize().to_hex().as_str(), expected, "{backend}");
        }
    }

    #[test]
    fn both_backends_round_trip_and_differ_only_in_parity() {
        let chunk = sample_chunk((1 << 20) + 13);
        for (data, parity) in [(4, 2), (8, 3), (10, 4)] {
            let mut encoded = Vec::new();
            for backend in Backend::ALL {
                let codec = codec_with(backend, data, parity).unwrap();
                let shards = encode_with(codec.as_ref(), &chunk).unwrap();
                // Worst case: lose M data shards; then lose M parity shards; then a mix.
                let losses: [Vec<usize>; 3] = [
                    (0..parity).collect(),
                    (data..data + parity).collect(),
                    (0..parity)
                        .map(|i| if i % 2 == 0 { i } else { data + i })
                        .collect(),
                ];
                for lost in losses {
                    let mut slots: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
                    for &i in &lost {
                        slots[i] = None;
                    }
                    let back = decode_with(codec.as_ref(), slots.clone(), chunk.len()).unwrap();
                    assert_eq!(
                        &back[..],
                        &chunk[..],
                        "{backend} ec:{data}+{parity} {lost:?}"
                    );
                    let all = rebuild_with(codec.as_ref(), slots, chunk.len()).unwrap();
                    assert_eq!(all, shards, "{backend} ec:{data}+{parity} {lost:?}");
                }
                encoded.push(shards);
            }
            assert_eq!(encoded[0][..data], encoded[1][..data]);
            assert_ne!(encoded[0][data..], encoded[1][data..]);
        }
    }

    /// Scratch space and coders are pooled: what one call leaves there must not reach the next.
    #[test]
    fn pooled_working_space_does_not_leak_between_calls() {
        let first = sample_chunk(200_000);
        let second: Vec<u8> = first.iter().map(|b| b ^ 0x5a).collect();
        for backend in Backend::ALL {
            let codec = codec_with(backend, 4, 2).unwrap();
            for chunk in [&first, &second, &first] {
                let shards = encode_with(codec.as_ref(), chunk).unwrap();
                let mut slots: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
                slots[1] = None;
                slots[4] = None;
                let back = decode_with(codec.as_ref(), slots.clone(), chunk.len()).unwrap();
                assert_eq!(&back[..], &chunk[..], "{backend}");
                assert_eq!(
                    rebuild_with(codec.as_ref(), slots, chunk.len()).unwrap(),
                    shards
                );
            }
        }
    }

    #[test]
    fn codecs_reject_bad_arguments() {
        for backend in Backend::ALL {
            assert!(matches!(
                codec_with(backend, 0, 2),
                Err(ErasureError::Shape { .. })
            ));
            assert!(matches!(
                codec_with(backend, 4, 0),
                Err(ErasureError::Shape { .. })
            ));
            let codec = codec_with(backend, 2, 1).unwrap();
            let (a, b) = ([1u8; 64], [2u8; 64]);
            let mut p = [0u8; 64];
            let mut odd = [0u8; 63];
            assert!(matches!(
                codec.encode(&[&a[..], &b[..]], &mut [&mut odd[..]]),
                Err(ErasureError::ShardLength { index: 2, .. })
            ));
            assert!(matches!(
                codec.encode(&[&a[..]], &mut [&mut p[..]]),
                Err(ErasureError::ShardCount { .. })
            ));
            codec.encode(&[&a[..], &b[..]], &mut [&mut p[..]]).unwrap();
            let shards = [None, Some(&b[..]), Some(&p[..])];
            let mut out = [0u8; 64];
            assert!(matches!(
                codec.reconstruct(&shards, &mut [(3, &mut out[..])]),
                Err(ErasureError::Codec(_))
            ));
            assert!(matches!(
                codec.reconstruct(&shards, &mut [(0, &mut odd[..])]),
                Err(ErasureError::ShardLength { index: 0, .. })
            ));
            codec
                .reconstruct(&shards, &mut [(0, &mut out[..])])
                .unwrap();
            assert_eq!(out, a, "{backend}");
        }
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
            for backend in Backend::ALL {
                let codec = codec_with(backend, data, parity).unwrap();
                let shards = encode_with(codec.as_ref(), &chunk).unwrap();
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
                let back = decode_with(codec.as_ref(), slots.clone(), chunk.len()).unwrap();
                prop_assert_eq!(&back[..], &chunk[..]);
                let all = rebuild_with(codec.as_ref(), slots, chunk.len()).unwrap();
                prop_assert_eq!(all, shards);
            }
        }
    }
}
