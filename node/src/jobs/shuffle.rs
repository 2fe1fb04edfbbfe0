//! How a shuffle output's chunks are stored: each record-aligned chunk of shuffle lines is
//! compressed on its own with LZ4, so that a reduce task can unpack any one chunk.
//!
//! Shuffle lines are JSON with repeated field names and a key in front; LZ4 shrinks them two
//! to four times at several hundred MB/s a core. Every byte saved is a byte that is not hashed,
//! written to RocksDB's log and blob files, encrypted, sent over QUIC and decrypted again on
//! the way to the reduce task, which costs more than the compression. Shuffle outputs are
//! internal to a job (the reduce outputs, which make the job's output, are not compressed), so
//! the format can change between versions as long as both ends of one job agree.
//!
//! A packed chunk is `[FORMAT] [unpacked length: u32 LE] [LZ4 block]`. The length is checked
//! against [`MAX_UNPACKED`] before anything is allocated: a packed chunk comes from another
//! node and is verified against its manifest, but that manifest was reported by a worker.

use bytes::Bytes;

/// First byte of a packed chunk: LZ4 block format, version 1.
const FORMAT: u8 = 1;
const HEADER: usize = 5;
/// Largest unpacked chunk accepted: far above the records chunker's largest chunk.
pub const MAX_UNPACKED: usize = 64 << 20;

/// Why a packed chunk cannot be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("a shuffle chunk of {0} bytes is too short for its header")]
    Short(usize),
    #[error("a shuffle chunk has format {0}, not {FORMAT}: written by another version of meshd")]
    Format(u8),
    #[error("a shuffle chunk claims {0} unpacked bytes, more than the {MAX_UNPACKED} allowed")]
    TooLarge(usize),
    #[error("a shuffle chunk does not decompress: {0}")]
    Corrupt(String),
}

/// Compresses one chunk of shuffle lines.
pub fn pack(chunk: &[u8]) -> Bytes {
    let mut out =
        Vec::with_capacity(HEADER + lz4_flex::block::get_maximum_output_size(chunk.len()));
    out.push(FORMAT);
    // The records chunker never cuts a chunk near 4 GiB; saturate rather than wrap anyway, so
    // that unpack refuses it instead of misreading it.
    let len = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&lz4_flex::block::compress(chunk));
    Bytes::from(out)
}

/// Decompresses a chunk [`pack`] made.
pub fn unpack(packed: &[u8]) -> Result<Vec<u8>, UnpackError> {
    let Some((header, block)) = packed.split_at_checked(HEADER) else {
        return Err(UnpackError::Short(packed.len()));
    };
    if header[0] != FORMAT {
        return Err(UnpackError::Format(header[0]));
    }
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_UNPACKED {
        return Err(UnpackError::TooLarge(len));
    }
    let out =
        lz4_flex::block::decompress(block, len).map_err(|e| UnpackError::Corrupt(e.to_string()))?;
    if out.len() != len {
        return Err(UnpackError::Corrupt(format!(
            "{} bytes came out, the header says {len}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            out.extend_from_slice(
                format!(
                    "[\"id-{i:08}\"]\t{i}\t{{\"age\":{},\"id\":\"id-{i:08}\",\"ts\":{i}}}\n",
                    i % 90
                )
                .as_bytes(),
            );
        }
        out
    }

    #[test]
    fn packs_small_and_unpacks_the_same_bytes() {
        for data in [Vec::new(), b"x".to_vec(), lines(5000)] {
            let packed = pack(&data);
            assert_eq!(unpack(&packed).unwrap(), data);
            if data.len() > 1000 {
                assert!(
                    packed.len() * 2 < data.len(),
                    "{} of {} bytes",
                    packed.len(),
                    data.len()
                );
            }
        }
    }

    #[test]
    fn broken_chunks_are_errors_not_panics() {
        let packed = pack(&lines(100)).to_vec();
        assert!(matches!(unpack(&packed[..3]), Err(UnpackError::Short(3))));
        let mut other = packed.clone();
        other[0] = 9;
        assert!(matches!(unpack(&other), Err(UnpackError::Format(9))));
        let mut huge = packed.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(unpack(&huge), Err(UnpackError::TooLarge(_))));
        let mut longer = packed.clone();
        let claimed = u32::from_le_bytes([packed[1], packed[2], packed[3], packed[4]]) + 10;
        longer[1..5].copy_from_slice(&claimed.to_le_bytes());
        assert!(unpack(&longer).is_err());
        let truncated = &packed[..packed.len() - 7];
        assert!(unpack(truncated).is_err());
        // Every single-byte corruption of the block is an error or other bytes, never a panic.
        for i in HEADER..packed.len() {
            let mut bad = packed.clone();
            bad[i] ^= 0x5a;
            let _ = unpack(&bad);
        }
    }
}
