//! Streaming chunker: cuts any `AsyncRead` into chunks with bounded memory.
//!
//! The cut decision is a pure function of the bytes ahead ([`Cutter::cut`]); [`Chunker`] only
//! keeps a window of at most a few maximum chunk lengths buffered and hands out each chunk as
//! shared [`Bytes`] without copying it again.
//!
//! - `cdc`: FastCDC 2020 (normalization level 1). An insertion shifts at most the chunks around
//!   it, so an edited re-upload deduplicates against the original.
//! - `fixed:SIZE`: every chunk is SIZE bytes except the last.
//! - `records:jsonl|csv`: the FastCDC cut point moved to a record boundary (preferring the last
//!   boundary at or before it, then the first after it), so that a processing task never sees
//!   half a record. CSV tracks double quotes, so a newline inside a quoted field is not a
//!   boundary. A record longer than the maximum chunk length is an error naming its byte
//!   offset: chunks keep their size bound, which the wire protocol and the store rely on.
//!   Chunks can be shorter than the minimum when records are almost that long.

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::{self, Normalization};
use mesh_proto::{ChunkerSpec, RecordFormat};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why chunking failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("reading the input failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the record starting at byte {offset} is longer than the maximum chunk size of {max} bytes"
    )]
    RecordTooLarge { offset: u64, max: u32 },
}

/// The pure cut-point logic for one [`ChunkerSpec`].
#[derive(Debug, Clone)]
pub struct Cutter {
    spec: ChunkerSpec,
    mask_s: u64,
    mask_l: u64,
}

impl Cutter {
    pub fn new(spec: ChunkerSpec) -> Self {
        let avg = match spec {
            ChunkerSpec::Cdc { avg, .. } | ChunkerSpec::Records { avg, .. } => avg,
            ChunkerSpec::Fixed { size } => size,
        };
        let (mask_s, mask_l) = v2020::select_masks(avg as usize, Normalization::Level1);
        Self {
            spec,
            mask_s,
            mask_l,
        }
    }

    /// Bytes the cutter wants to see before it decides (unless the input ends first).
    pub fn lookahead(&self) -> usize {
        self.spec.max_chunk_len() as usize
    }

    /// Length of the next chunk at the start of `window`. `window` holds at least
    /// [`Cutter::lookahead`] bytes unless `eof` says the input ends with it. `offset` is the
    /// stream position of `window[0]`, for error messages.
    pub fn cut(&self, window: &[u8], eof: bool, offset: u64) -> Result<usize, ChunkError> {
        let rest_fits = eof && window.len() <= self.lookahead();
        let window = &window[..window.len().min(self.lookahead())];
        match self.spec {
            ChunkerSpec::Fixed { size } => Ok(window.len().min(size as usize)),
            ChunkerSpec::Cdc { min, avg, max } => Ok(self.cdc(window, min, avg, max)),
            ChunkerSpec::Records {
                format,
                min,
                avg,
                max,
            } => {
                if rest_fits && window.len() <= min as usize {
                    return Ok(window.len());
                }
                let target = self.cdc(window, min, avg, max);
                let (before, after) = match format {
                    RecordFormat::Jsonl => jsonl_boundaries(window, target),
                    RecordFormat::Csv => csv_boundaries(window, target),
                };
                let min = min as usize;
                match (before, after) {
                    (Some(b), _) if b >= min => Ok(b),
                    (_, Some(a)) => Ok(a),
                    (Some(b), None) => Ok(b),
                    // The rest of the input is one final record without a line ending.
                    (None, None) if rest_fits => Ok(window.len()),
                    (None, None) => Err(ChunkError::RecordTooLarge { offset, max }),
                }
            }
        }
    }

    fn cdc(&self, window: &[u8], min: u32, avg: u32, max: u32) -> usize {
        let (_, len) = v2020::cut(
            window,
            min as usize,
            avg as usize,
            max as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len.max(1).min(window.len())
    }
}

/// The last line boundary at or before `target` and the first after it (each the index just
/// past a `\n`).
fn jsonl_boundaries(window: &[u8], target: usize) -> (Option<usize>, Option<usize>) {
    let before = memchr::memrchr(b'\n', &window[..target]).map(|p| p + 1);
    let after = memchr::memchr(b'\n', &window[target..]).map(|p| target + p + 1);
    (before, after)
}

/// Like [`jsonl_boundaries`], but a newline inside a double-quoted field does not count. The
/// window starts at a record boundary, so the quote state starts closed.
fn csv_boundaries(window: &[u8], target: usize) -> (Option<usize>, Option<usize>) {
    let mut in_quotes = false;
    let mut before = None;
    for pos in memchr::memchr2_iter(b'"', b'\n', window) {
        if window[pos] == b'"' {
            in_quotes = !in_quotes;
        } else if !in_quotes {
            let boundary = pos + 1;
            if boundary <= target {
                before = Some(boundary);
            } else {
                return (before, Some(boundary));
            }
        }
    }
    (before, None)
}

/// Reads an `AsyncRead` and yields its chunks in order.
#[derive(Debug)]
pub struct Chunker<R> {
    reader: R,
    cutter: Cutter,
    buf: BytesMut,
    /// Bytes buffered before compacting: a few chunks' worth, so that the bytes left over at a
    /// refill (less than one maximum chunk) are copied rarely.
    capacity: usize,
    offset: u64,
    eof: bool,
}

/// Where a put takes its chunks from: a [`Chunker`] over a byte stream, or chunks cut before
/// ([`PreCut`], for task outputs whose chunk boundaries are decided by the task).
pub trait ChunkSource: Send {
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, ChunkError>> + Send;
}

impl<R: AsyncRead + Unpin + Send> ChunkSource for Chunker<R> {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ChunkError> {
        Chunker::next_chunk(self).await
    }
}

/// Chunks already cut, handed out in order.
#[derive(Debug, Default)]
pub struct PreCut(pub std::collections::VecDeque<Bytes>);

impl ChunkSource for PreCut {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ChunkError> {
        Ok(self.0.pop_front())
    }
}

/// Cuts an in-memory buffer with `spec` (the same cuts a [`Chunker`] makes over a stream of
/// the same bytes).
pub fn cut_all(data: &Bytes, spec: ChunkerSpec) -> Result<Vec<Bytes>, ChunkError> {
    let cutter = Cutter::new(spec);
    let mut chunks = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let window = &data[at..];
        let eof = window.len() <= cutter.lookahead();
        let len = cutter.cut(window, eof, at as u64)?;
        if len == 0 {
            break;
        }
        chunks.push(data.slice(at..at + len));
        at += len;
    }
    Ok(chunks)
}

impl<R: AsyncRead + Unpin> Chunker<R> {
    pub fn new(reader: R, spec: ChunkerSpec) -> Self {
        let cutter = Cutter::new(spec);
        let capacity = (cutter.lookahead() * 2).max(8 * 1024 * 1024);
        Self {
            reader,
            cutter,
            buf: BytesMut::new(),
            capacity,
            offset: 0,
            eof: false,
        }
    }

    /// Stream offset of the next chunk.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next chunk, or `None` at the end of the input.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ChunkError> {
        let want = self.cutter.lookahead();
        if self.buf.len() < want && !self.eof {
            if self.buf.capacity() < want {
                // Start a fresh buffer: the old one may still be shared by handed-out chunks.
                let mut fresh = BytesMut::with_capacity(self.capacity);
                fresh.extend_from_slice(&self.buf);
                self.buf = fresh;
            }
            while self.buf.len() < want && !self.eof {
                if self.reader.read_buf(&mut self.buf).await? == 0 {
                    self.eof = true;
                }
            }
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        let len = self.cutter.cut(&self.buf, self.eof, self.offset)?;
        self.offset += len as u64;
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use proptest::prelude::*;
    use rand::{Rng, RngCore, SeedableRng};
    use tokio::io::ReadBuf;

    use super::*;

    #[tokio::test]
    async fn cutting_a_buffer_makes_the_cuts_the_stream_chunker_makes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = Vec::new();
        while data.len() < 3 << 20 {
            let n = rng.random_range(10..400);
            data.extend(std::iter::repeat_n(b'a' + (n % 26) as u8, n));
            data.push(b'\n');
        }
        let spec = ChunkerSpec::Records {
            format: RecordFormat::Jsonl,
            min: 64 * 1024,
            avg: 256 * 1024,
            max: 1024 * 1024,
        };
        let data = Bytes::from(data);
        let cut = cut_all(&data, spec).unwrap();
        let mut chunker = Chunker::new(&data[..], spec);
        let mut streamed = Vec::new();
        while let Some(c) = chunker.next_chunk().await.unwrap() {
            streamed.push(c);
        }
        assert!(cut.len() > 3);
        assert_eq!(cut, streamed);
    }

    /// A reader that hands out its data in reads of random sizes.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        rng: rand::rngs::StdRng,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let left = self.data.len() - self.pos;
            let n = left
                .min(buf.remaining())
                .min(self.rng.random_range(1..=200_000));
            let start = self.pos;
            buf.put_slice(&self.data[start..start + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    fn chunk_all(data: &[u8], spec: ChunkerSpec, seed: u64) -> Result<Vec<Bytes>, ChunkError> {
        let reader = Trickle {
            data: data.to_vec(),
            pos: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut chunker = Chunker::new(reader, spec);
            let mut out = Vec::new();
            while let Some(chunk) = chunker.next_chunk().await? {
                out.push(chunk);
            }
            Ok(out)
        })
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut data = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        data
    }

    const SMALL_CDC: ChunkerSpec = ChunkerSpec::Cdc {
        min: 4096,
        avg: 16384,
        max: 65536,
    };

    fn spec_strategy() -> impl Strategy<Value = ChunkerSpec> {
        prop_oneof![
            Just(ChunkerSpec::DEFAULT_CDC),
            Just(SMALL_CDC),
            (1024u32..200_000).prop_map(|size| ChunkerSpec::Fixed { size }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn chunks_concatenate_to_the_input_and_respect_bounds(
            len in 0usize..12_000_000, seed in any::<u64>(), spec in spec_strategy()
        ) {
            let data = random(len, seed);
            let chunks = chunk_all(&data, spec, seed).unwrap();
            prop_assert_eq!(chunks.concat(), data);
            let (min, max) = match spec {
                ChunkerSpec::Cdc { min, max, .. } => (min as usize, max as usize),
                ChunkerSpec::Fixed { size } => (size as usize, size as usize),
                ChunkerSpec::Records { .. } => unreachable!(),
            };
            if let Some((_, body)) = chunks.split_last() {
                for c in body {
                    prop_assert!(c.len() >= min && c.len() <= max, "chunk of {} outside {min}..={max}", c.len());
                }
            }
            prop_assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= max));
        }

        #[test]
        fn jsonl_chunks_end_at_record_boundaries(records in 1usize..4000, seed in any::<u64>()) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut data = Vec::new();
            for i in 0..records {
                let pad = "x".repeat(rng.random_range(0..300));
                data.extend_from_slice(format!("{{\"id\":{i},\"pad\":\"{pad}\"}}\n").as_bytes());
            }
            let spec = ChunkerSpec::Records { format: RecordFormat::Jsonl, min: 4096, avg: 16384, max: 65536 };
            let chunks = chunk_all(&data, spec, seed).unwrap();
            prop_assert_eq!(chunks.concat(), data);
            for c in &chunks {
                prop_assert_eq!(c.last(), Some(&b'\n'));
                prop_assert!(c.len() <= 65536);
            }
        }

        #[test]
        fn csv_chunks_never_split_a_quoted_newline(records in 1usize..3000, seed in any::<u64>()) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut data = b"id,text\n".to_vec();
            for i in 0..records {
                let lines = rng.random_range(0..4);
                let text = vec!["line \"\"quoted\"\""; lines + 1].join("\n");
                data.extend_from_slice(format!("{i},\"{text}\"\r\n").as_bytes());
            }
            let spec = ChunkerSpec::Records { format: RecordFormat::Csv, min: 2048, avg: 8192, max: 32768 };
            let chunks = chunk_all(&data, spec, seed).unwrap();
            prop_assert_eq!(chunks.concat(), data);
            for c in &chunks {
                // Every chunk holds whole records: its quotes balance and it ends a line.
                let quotes = c.iter().filter(|b| **b == b'"').count();
                prop_assert_eq!(quotes % 2, 0);
                prop_assert_eq!(c.last(), Some(&b'\n'));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3))]

        #[test]
        fn an_insertion_near_the_start_keeps_most_chunks(
            seed in any::<u64>(), at in 0usize..1_000_000, inserted in proptest::collection::vec(any::<u8>(), 1..5000)
        ) {
            let original = random(64 << 20, seed);
            let mut edited = original.clone();
            edited.splice(at..at, inserted);
            let spec = ChunkerSpec::DEFAULT_CDC;
            let before: Vec<_> = chunk_all(&original, spec, 1).unwrap().iter().map(|c| blake3::hash(c)).collect();
            let after: HashSet<_> = chunk_all(&edited, spec, 2).unwrap().iter().map(|c| blake3::hash(c)).collect();
            let kept = before.iter().filter(|h| after.contains(*h)).count();
            prop_assert!(kept * 10 >= before.len() * 9, "only {kept} of {} chunks unchanged", before.len());
        }
    }

    #[test]
    fn a_record_longer_than_the_maximum_is_an_error_naming_its_offset() {
        let spec = ChunkerSpec::Records {
            format: RecordFormat::Jsonl,
            min: 1024,
            avg: 2048,
            max: 4096,
        };
        let mut data = b"{\"a\":1}\n".repeat(100);
        let offset = data.len() as u64;
        data.extend(std::iter::repeat_n(b'x', 10_000));
        data.push(b'\n');
        data.extend_from_slice(b"{\"b\":2}\n");
        let err = chunk_all(&data, spec, 7).unwrap_err();
        match err {
            ChunkError::RecordTooLarge { offset: at, max } => {
                assert_eq!(max, 4096);
                assert_eq!(at, offset);
            }
            other => panic!("unexpected {other}"),
        }
        assert!(
            ChunkError::RecordTooLarge {
                offset: 5,
                max: 4096
            }
            .to_string()
            .contains("byte 5")
        );
    }

    #[test]
    fn a_final_record_without_newline_is_kept() {
        let spec = ChunkerSpec::Records {
            format: RecordFormat::Jsonl,
            min: 1024,
            avg: 2048,
            max: 4096,
        };
        let data = b"{\"a\":1}\n{\"b\":2}".to_vec();
        let chunks = chunk_all(&data, spec, 3).unwrap();
        assert_eq!(chunks.concat(), data);
    }

    #[test]
    fn empty_input_has_no_chunks() {
        assert!(
            chunk_all(&[], ChunkerSpec::DEFAULT_CDC, 0)
                .unwrap()
                .is_empty()
        );
    }
}
