//! How a shuffle output's chunks are stored: each record-aligned chunk of shuffle lines is cut
//! into blocks of whole lines, and each block is compressed on its own with LZ4, so that a
//! reduce task can read a chunk one block at a time.
//!
//! Shuffle lines are JSON with repeated field names and a key in front; LZ4 shrinks them
//! several times at several hundred MB/s a core. Every byte saved is a byte that is not
//! hashed, written to RocksDB's log and blob files, encrypted, sent over QUIC and decrypted
//! again on the way to the reduce task, which costs more than the compression. Shuffle outputs
//! are internal to a job (the reduce outputs, which make the job's output, are not
//! compressed), so the format can change between versions as long as both ends of one job
//! agree.
//!
//! Why blocks: the map side writes each partition's lines sorted by key, so a reduce task
//! merges its inputs ([`super::processors`]) and needs only the current block of each input
//! unpacked, [`BLOCK`] bytes or so apiece, rather than its whole partition. Unpacking a whole
//! partition (333 MB per reduce task at 10 M records and 6 partitions) into memory the
//! process had never touched cost more CPU in page faults than all the rest of the reduce
//! phase on the benchmark machine.
//!
//! A packed chunk is `[FORMAT] [unpacked length: u32 LE]` followed by blocks, each
//! `[unpacked length: u32 LE] [packed length: u32 LE] [LZ4 block]`. Lengths are checked before
//! anything is allocated: against [`MAX_UNPACKED`], against the bytes that are left, and the
//! blocks' lengths must add up to the chunk's. A packed chunk comes from another node and is
//! verified against its manifest, but that manifest was reported by a worker.

use std::time::Instant;

use bytes::Bytes;

/// First byte of a packed chunk: line-aligned LZ4 blocks, version 2. (Version 1 was one LZ4
/// block per chunk, of lines in input order.)
const FORMAT: u8 = 2;
const HEADER: usize = 5;
const BLOCK_HEADER: usize = 8;
/// Unpacked bytes a block aims at: it ends at the first line end at or past this. A line
/// longer than this makes a block of its own.
pub const BLOCK: usize = 32 << 10;
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
    #[error("a shuffle chunk's block at byte {at} claims {claimed} bytes, more than are left")]
    Truncated { at: usize, claimed: usize },
    #[error("a shuffle chunk's blocks hold {blocks} bytes, its header says {header}")]
    Length { blocks: usize, header: usize },
    #[error("a shuffle chunk does not decompress: {0}")]
    Corrupt(String),
}

/// Compresses one chunk of shuffle lines.
pub fn pack(chunk: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(HEADER + chunk.len() / 2 + 64);
    out.push(FORMAT);
    // The records chunker never cuts a chunk near 4 GiB; saturate rather than wrap anyway, so
    // that unpacking refuses it instead of misreading it.
    out.extend_from_slice(&len_u32(chunk.len()).to_le_bytes());
    let mut rest = chunk;
    while !rest.is_empty() {
        let end = match rest.get(BLOCK - 1..).and_then(|r| memchr::memchr(b'\n', r)) {
            Some(at) => BLOCK + at,
            None => rest.len(),
        };
        let (block, tail) = rest.split_at(end);
        // The block is compressed straight into `out`, after its header; the packed length
        // is filled in once known.
        let header = out.len();
        out.extend_from_slice(&len_u32(block.len()).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let start = out.len();
        out.resize(
            start + lz4_flex::block::get_maximum_output_size(block.len()),
            0,
        );
        let packed = match lz4_flex::block::compress_into(block, &mut out[start..]) {
            Ok(packed) => {
                out.truncate(start + packed);
                packed
            }
            // The room is the crate's own bound, so this does not happen; if it did, the
            // allocating form gives the same bytes.
            Err(_) => {
                out.truncate(start);
                let packed = lz4_flex::block::compress(block);
                out.extend_from_slice(&packed);
                packed.len()
            }
        };
        out[header + 4..start].copy_from_slice(&len_u32(packed).to_le_bytes());
        rest = tail;
    }
    Bytes::from(out)
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Decompresses a whole chunk [`pack`] made.
pub fn unpack(packed: Bytes) -> Result<Vec<u8>, UnpackError> {
    let mut blocks = Blocks::new(packed)?;
    let mut out = Vec::with_capacity(blocks.total);
    while blocks.advance()? {
        out.extend_from_slice(blocks.block());
    }
    Ok(out)
}

/// Reads a packed chunk one block at a time into one reused buffer.
#[derive(Debug)]
pub struct Blocks {
    packed: Bytes,
    /// Where the next block's header is in `packed`.
    at: usize,
    /// The chunk's unpacked length, from its header, and how much of it the blocks so far held.
    total: usize,
    seen: usize,
    /// The current block is `buf[..len]`; `buf` only grows, so it is zeroed once.
    buf: Vec<u8>,
    len: usize,
    nanos: u64,
}

impl Blocks {
    /// Checks the chunk's header; nothing is unpacked yet.
    pub fn new(packed: Bytes) -> Result<Self, UnpackError> {
        let Some(header) = packed.get(..HEADER) else {
            return Err(UnpackError::Short(packed.len()));
        };
        if header[0] != FORMAT {
            return Err(UnpackError::Format(header[0]));
        }
        let total = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if total > MAX_UNPACKED {
            return Err(UnpackError::TooLarge(total));
        }
        Ok(Blocks {
            packed,
            at: HEADER,
            total,
            seen: 0,
            buf: Vec::new(),
            len: 0,
            nanos: 0,
        })
    }

    /// Unpacks the next block; false after the last. The packed bytes are let go then.
    pub fn advance(&mut self) -> Result<bool, UnpackError> {
        let started = Instant::now();
        let result = self.unpack_next();
        self.nanos += u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        result
    }

    fn unpack_next(&mut self) -> Result<bool, UnpackError> {
        self.len = 0;
        if self.at >= self.packed.len() {
            if self.seen != self.total {
                return Err(UnpackError::Length {
                    blocks: self.seen,
                    header: self.total,
                });
            }
            self.packed = Bytes::new();
            self.buf = Vec::new();
            return Ok(false);
        }
        let header =
            self.packed
                .get(self.at..self.at + BLOCK_HEADER)
                .ok_or(UnpackError::Truncated {
                    at: self.at,
                    claimed: BLOCK_HEADER,
                })?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let packed_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let seen = self.seen.saturating_add(len);
        if seen > self.total {
            return Err(UnpackError::Length {
                blocks: seen,
                header: self.total,
            });
        }
        let start = self.at + BLOCK_HEADER;
        let block = start
            .checked_add(packed_len)
            .and_then(|end| self.packed.get(start..end))
            .ok_or(UnpackError::Truncated {
                at: self.at,
                claimed: packed_len,
            })?;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let out = lz4_flex::block::decompress_into(block, &mut self.buf[..len])
            .map_err(|e| UnpackError::Corrupt(e.to_string()))?;
        if out != len {
            return Err(UnpackError::Corrupt(format!(
                "{out} bytes came out of a block, its header says {len}"
            )));
        }
        self.at = start + packed_len;
        self.seen = seen;
        self.len = len;
        Ok(true)
    }

    /// The current block: whole shuffle lines (empty before the first [`Blocks::advance`]).
    pub fn block(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// Time spent unpacking so far.
    pub fn nanos(&self) -> u64 {
        self.nanos
    }
}

impl super::processors::Run for Blocks {
    type Error = UnpackError;

    fn advance(&mut self) -> Result<bool, UnpackError> {
        Blocks::advance(self)
    }

    fn block(&self) -> &[u8] {
        Blocks::block(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpack(packed: &[u8]) -> Result<Vec<u8>, UnpackError> {
        super::unpack(Bytes::copy_from_slice(packed))
    }

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
    fn blocks_hold_whole_lines_and_a_long_line_gets_one_of_its_own() {
        let mut data = lines(3000);
        let long = format!("[\"long\"]\t1\t\"{}\"\n", "y".repeat(3 * BLOCK));
        data.extend_from_slice(long.as_bytes());
        data.extend_from_slice(&lines(10));
        assert!(data.len() > 4 * BLOCK);
        let mut blocks = Blocks::new(pack(&data)).unwrap();
        assert!(blocks.block().is_empty());
        let mut joined = Vec::new();
        let mut count = 0;
        let mut largest = 0;
        while blocks.advance().unwrap() {
            let block = blocks.block();
            assert_eq!(block.last(), Some(&b'\n'), "block {count} ends mid-line");
            // A block stops at the first line end at or past BLOCK.
            let before_last = &block[..block.len() - 1];
            let last_line_start = memchr::memrchr(b'\n', before_last).map_or(0, |i| i + 1);
            assert!(
                last_line_start < BLOCK,
                "block {count} runs past its target"
            );
            largest = largest.max(block.len());
            joined.extend_from_slice(block);
            count += 1;
        }
        assert_eq!(joined, data);
        assert!(count > 4, "{count} blocks");
        assert!(largest > 3 * BLOCK, "the long line is in one block");
        // The end is the end, again and again.
        assert!(!blocks.advance().unwrap());
        assert!(blocks.nanos() > 0);
    }

    #[test]
    fn broken_chunks_are_errors_not_panics() {
        let packed = pack(&lines(400)).to_vec();
        assert!(matches!(unpack(&packed[..3]), Err(UnpackError::Short(3))));
        let mut other = packed.clone();
        other[0] = 1;
        assert!(matches!(unpack(&other), Err(UnpackError::Format(1))));
        let mut huge = packed.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(unpack(&huge), Err(UnpackError::TooLarge(_))));
        // The header claims more than the blocks hold, or less.
        let claimed = u32::from_le_bytes([packed[1], packed[2], packed[3], packed[4]]);
        for wrong in [claimed + 10, claimed - 10] {
            let mut bad = packed.clone();
            bad[1..5].copy_from_slice(&wrong.to_le_bytes());
            assert!(
                matches!(unpack(&bad), Err(UnpackError::Length { .. })),
                "{wrong}"
            );
        }
        // Cut inside a block header and inside a block.
        assert!(matches!(
            unpack(&packed[..HEADER + 3]),
            Err(UnpackError::Truncated { .. })
        ));
        assert!(matches!(
            unpack(&packed[..packed.len() - 7]),
            Err(UnpackError::Truncated { .. })
        ));
        // A block that claims a huge packed length.
        let mut long = packed.clone();
        long[HEADER + 4..HEADER + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(unpack(&long), Err(UnpackError::Truncated { .. })));
        // Every single-byte corruption is an error or other bytes, never a panic.
        for i in 0..packed.len() {
            let mut bad = packed.clone();
            bad[i] ^= 0x5a;
            let _ = unpack(&bad);
        }
    }
}
