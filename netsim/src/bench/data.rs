//! Reproducible benchmark data: the BLAKE3 extendable output keyed by (seed, stream), so the
//! same seed gives the same bytes on every machine and with every version of `rand`, and
//! distinct streams give independent contents. It is as fast as a good RNG, so even the
//! 1 GiB input of the throughput scenario takes about a second.

use std::io::Write;
use std::path::Path;

const CONTEXT: &str = "mesh netsim bench 2026-11 reproducible data";

/// A reader of the data of (seed, stream).
pub fn stream(seed: u64, stream: u64) -> blake3::OutputReader {
    let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
    hasher.update(&seed.to_le_bytes());
    hasher.update(&stream.to_le_bytes());
    hasher.finalize_xof()
}

/// The first `len` bytes of (seed, stream).
pub fn bytes(seed: u64, stream_id: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    stream(seed, stream_id).fill(&mut out);
    out
}

/// Writes `len` bytes of (seed, stream) to `path`; returns their BLAKE3. `progress` is called
/// with the bytes written so far after every block.
pub fn write_file(
    path: &Path,
    seed: u64,
    stream_id: u64,
    len: u64,
    mut progress: impl FnMut(u64),
) -> std::io::Result<blake3::Hash> {
    const BLOCK: usize = 4 << 20;
    let mut file = std::fs::File::create(path)?;
    let mut reader = stream(seed, stream_id);
    let mut hasher = blake3::Hasher::new();
    let mut block = vec![0; BLOCK];
    let mut written = 0u64;
    while written < len {
        let n = (len - written).min(BLOCK as u64) as usize;
        reader.fill(&mut block[..n]);
        hasher.update(&block[..n]);
        file.write_all(&block[..n])?;
        written += n as u64;
        progress(written);
    }
    file.sync_all()?;
    Ok(hasher.finalize())
}

/// BLAKE3 of a file, read in blocks.
pub fn hash_file(path: &Path) -> std::io::Result<(blake3::Hash, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path)?;
    let len = std::io::copy(&mut file, &mut hasher)?;
    Ok((hasher.finalize(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_other_stream_other_bytes() {
        let a = bytes(1, 0, 4096);
        assert_eq!(a, bytes(1, 0, 4096));
        assert_ne!(a, bytes(1, 1, 4096));
        assert_ne!(a, bytes(2, 0, 4096));
        // A prefix is a prefix: lengths do not change the contents.
        assert_eq!(bytes(1, 0, 100)[..], a[..100]);
    }

    #[test]
    fn file_matches_bytes_and_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let len = (4 << 20) + 123;
        let mut calls = 0;
        let hash = write_file(&path, 7, 3, len, |_| calls += 1).expect("write");
        let expected = bytes(7, 3, len as usize);
        assert_eq!(std::fs::read(&path).expect("read"), expected);
        assert_eq!(hash, blake3::hash(&expected));
        assert_eq!(hash_file(&path).expect("hash"), (hash, len));
        assert_eq!(calls, 2);
    }
}
