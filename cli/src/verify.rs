//! End-to-end verification of a download: the byte stream from meshd is cut at the manifest's
//! chunk lengths and each chunk's BLAKE3 is compared with its ChunkId before any of it is
//! released for writing. Pure (no IO), so the awkward cases (frames that straddle chunks,
//! short and long streams) are unit-tested here.
//!
//! Usage: call [`Verifier::take`] with incoming bytes until it has consumed them all; whenever
//! [`Verifier::verified_chunk`] returns a chunk, write it out before the next `take` (or move
//! it out with [`Verifier::take_verified`], and hand a spent buffer back with
//! [`Verifier::recycle`]). At the end, [`Verifier::finish`] checks that nothing is missing. At
//! most one chunk is buffered, and a validated manifest caps a chunk at 16 MiB.

use mesh_proto::{ChunkId, ChunkRef, Manifest};

use crate::error::VerifyError;

#[derive(Debug)]
pub struct Verifier<'m> {
    chunks: &'m [ChunkRef],
    size: u64,
    /// Index of the chunk being assembled (or just completed).
    index: usize,
    /// Offset of that chunk within the object.
    offset: u64,
    buf: Vec<u8>,
    hasher: blake3::Hasher,
    /// `buf` holds the whole current chunk and it verified.
    complete: bool,
}

impl<'m> Verifier<'m> {
    pub fn new(manifest: &'m Manifest) -> Self {
        Self {
            chunks: &manifest.chunks,
            size: manifest.size,
            index: 0,
            offset: 0,
            buf: Vec::new(),
            hasher: blake3::Hasher::new(),
            complete: false,
        }
    }

    /// Consumes bytes up to the end of the current chunk and returns how many it took. When
    /// that completes the chunk, the chunk is verified and [`Self::verified_chunk`] returns it.
    pub fn take(&mut self, data: &[u8]) -> Result<usize, VerifyError> {
        // The chunk completed last time was written from `verified_chunk`: move on, keeping
        // its buffer for the next one.
        if let Some(done) = self.take_verified() {
            self.recycle(done);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let Some(chunk) = self.chunks.get(self.index) else {
            return Err(VerifyError::TooLong { size: self.size });
        };
        let want = chunk.len as usize;
        if self.buf.is_empty() {
            self.buf.reserve(want);
        }
        let n = data.len().min(want - self.buf.len());
        let (part, _) = data.split_at(n);
        self.buf.extend_from_slice(part);
        self.hasher.update(part);
        if self.buf.len() == want {
            let actual = ChunkId::from(self.hasher.finalize());
            if actual != chunk.id {
                return Err(VerifyError::ChunkMismatch {
                    index: self.index,
                    offset: self.offset,
                    len: chunk.len,
                    expected: chunk.id,
                    actual,
                });
            }
            self.complete = true;
        }
        Ok(n)
    }

    /// The chunk that the last [`Self::take`] completed, if it did.
    pub fn verified_chunk(&self) -> Option<&[u8]> {
        self.complete.then_some(self.buf.as_slice())
    }

    /// Moves out the chunk that the last [`Self::take`] completed, if it did, so that it can be
    /// written elsewhere without a copy; the next chunk is assembled in a new buffer (see
    /// [`Self::recycle`]).
    pub fn take_verified(&mut self) -> Option<Vec<u8>> {
        if !self.complete {
            return None;
        }
        let chunk = std::mem::take(&mut self.buf);
        self.offset += chunk.len() as u64;
        self.index += 1;
        self.hasher.reset();
        self.complete = false;
        Some(chunk)
    }

    /// Offers a spent buffer for the next chunk; taken only while no chunk is being
    /// assembled in a buffer of its own.
    pub fn recycle(&mut self, mut spare: Vec<u8>) {
        if self.buf.is_empty() && self.buf.capacity() < spare.capacity() {
            spare.clear();
            self.buf = spare;
        }
    }

    /// Bytes verified so far.
    pub fn verified_bytes(&self) -> u64 {
        if self.complete {
            self.offset + self.buf.len() as u64
        } else {
            self.offset
        }
    }

    /// Checks that the stream carried every chunk; returns the total size.
    pub fn finish(self) -> Result<u64, VerifyError> {
        let verified = self.verified_bytes();
        let all_chunks = if self.complete {
            self.index + 1 == self.chunks.len()
        } else {
            // Every chunk moved out by `take_verified` (or none at all).
            self.index == self.chunks.len()
        };
        if all_chunks && verified == self.size {
            Ok(verified)
        } else {
            let received = self.offset + self.buf.len() as u64;
            Err(VerifyError::Truncated {
                received,
                size: self.size,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_proto::{ChunkerSpec, Redundancy};

    use super::*;

    fn manifest_of(parts: &[&[u8]]) -> Manifest {
        let chunks = parts
            .iter()
            .map(|p| ChunkRef {
                id: ChunkId::of(p),
                len: p.len() as u32,
            })
            .collect();
        Manifest::new(
            None,
            ChunkerSpec::Fixed { size: 4096 },
            Redundancy::DEFAULT,
            chunks,
            BTreeMap::new(),
            0,
        )
        .expect("valid manifest")
    }

    /// Feeds `stream` in frames of `frame` bytes; returns the chunks released, in order.
    fn run(manifest: &Manifest, stream: &[u8], frame: usize) -> Result<Vec<Vec<u8>>, VerifyError> {
        let mut verifier = Verifier::new(manifest);
        let mut out = Vec::new();
        for mut data in stream.chunks(frame) {
            while !data.is_empty() {
                let used = verifier.take(data)?;
                data = &data[used..];
                if let Some(chunk) = verifier.verified_chunk() {
                    out.push(chunk.to_vec());
                }
            }
        }
        verifier.finish()?;
        Ok(out)
    }

    #[test]
    fn releases_each_chunk_whole_whatever_the_framing() {
        let a = vec![1u8; 3000];
        let b = vec![2u8; 1];
        let c = vec![3u8; 4096];
        let manifest = manifest_of(&[&a, &b, &c]);
        let stream = [a.clone(), b.clone(), c.clone()].concat();
        for frame in [1, 2, 7, 1000, 3000, 3001, 4096, 10_000] {
            let out = run(&manifest, &stream, frame).unwrap();
            assert_eq!(out, vec![a.clone(), b.clone(), c.clone()], "frame {frame}");
        }
    }

    #[test]
    fn chunks_moved_out_and_recycled_buffers_give_the_same_stream() {
        let a = vec![1u8; 3000];
        let b = vec![2u8; 1];
        let c = vec![3u8; 4096];
        let manifest = manifest_of(&[&a, &b, &c]);
        let stream = [a.clone(), b.clone(), c.clone()].concat();
        for frame in [1, 7, 3000, 3001, 10_000] {
            let mut verifier = Verifier::new(&manifest);
            let mut out = Vec::new();
            for mut data in stream.chunks(frame) {
                while !data.is_empty() {
                    let used = verifier.take(data).unwrap();
                    data = &data[used..];
                    if let Some(chunk) = verifier.take_verified() {
                        assert_eq!(verifier.verified_chunk(), None);
                        out.push(chunk.clone());
                        // A dirty spare must not leak into the next chunk.
                        verifier.recycle(vec![9u8; 5000]);
                    }
                }
            }
            assert_eq!(verifier.verified_bytes(), stream.len() as u64);
            assert_eq!(verifier.finish().unwrap(), stream.len() as u64);
            assert_eq!(out, vec![a.clone(), b.clone(), c.clone()], "frame {frame}");
        }
    }

    #[test]
    fn a_corrupt_chunk_is_never_released() {
        let a = vec![1u8; 2000];
        let b = vec![2u8; 2000];
        let manifest = manifest_of(&[&a, &b]);
        let mut stream = [a.clone(), b].concat();
        stream[2500] ^= 0xff;

        let mut verifier = Verifier::new(&manifest);
        let mut released = Vec::new();
        let mut data = stream.as_slice();
        let err = loop {
            match verifier.take(data) {
                Ok(used) => data = &data[used..],
                Err(err) => break err,
            }
            if let Some(chunk) = verifier.verified_chunk() {
                released.push(chunk.to_vec());
            }
        };
        assert_eq!(released, vec![a]);
        match err {
            VerifyError::ChunkMismatch {
                index, offset, len, ..
            } => {
                assert_eq!((index, offset, len), (1, 2000, 2000));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("bytes 2000..4000"), "{err}");
    }

    #[test]
    fn short_and_long_streams_are_refused() {
        let a = vec![1u8; 2000];
        let b = vec![2u8; 2000];
        let manifest = manifest_of(&[&a, &b]);
        let whole = [a.clone(), b.clone()].concat();

        assert_eq!(
            run(&manifest, &whole[..3999], 512),
            Err(VerifyError::Truncated {
                received: 3999,
                size: 4000
            })
        );
        assert_eq!(
            run(&manifest, &whole[..2000], 512),
            Err(VerifyError::Truncated {
                received: 2000,
                size: 4000
            })
        );
        assert_eq!(
            run(&manifest, &[], 512),
            Err(VerifyError::Truncated {
                received: 0,
                size: 4000
            })
        );

        let mut long = whole.clone();
        long.push(0);
        assert_eq!(
            run(&manifest, &long, 512),
            Err(VerifyError::TooLong { size: 4000 })
        );
    }

    #[test]
    fn an_empty_object_verifies() {
        let manifest = manifest_of(&[]);
        assert_eq!(run(&manifest, &[], 1), Ok(vec![]));
        assert_eq!(
            run(&manifest, &[0], 1),
            Err(VerifyError::TooLong { size: 0 })
        );
    }
}
