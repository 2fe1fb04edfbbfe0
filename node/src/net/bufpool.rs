//! Reused buffers for received payloads (chunks, shards, manifests).
//!
//! Every chunk a node receives used to land in a newly allocated, zeroed buffer. The C
//! library returns freed buffers of that size to the kernel, so each new one faulted in and
//! zeroed fresh pages: in a profile of a 1 GiB get, that was a third of the receiving node's
//! CPU time (`clear_page_erms` under the codec's allocation). A payload is now read into a
//! buffer from this pool, and dropping the last `Bytes` that refers to it puts the buffer
//! back. The pool keeps at most [`POOL_BYTES`] of buffers; payloads under [`MIN_POOLED`] are
//! allocated as before.

use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

/// Most capacity the pool keeps (about four fetch windows of 1 MiB chunks).
pub const POOL_BYTES: usize = 64 << 20;
/// Smaller payloads are not pooled (the allocator serves them from memory it keeps).
pub const MIN_POOLED: usize = 64 << 10;
/// Pooled buffers are allocated in multiples of this, so that the spare buffer of one
/// content-defined chunk fits most others of about its size.
const GRANULE: usize = 256 << 10;

/// A bounded set of spare buffers.
#[derive(Debug)]
pub struct Pool {
    state: Mutex<State>,
    limit: usize,
}

#[derive(Debug, Default)]
struct State {
    spare: Vec<Vec<u8>>,
    bytes: usize,
}

/// The process's pool, used by the codec.
pub static POOL: Pool = Pool::new(POOL_BYTES);

impl Pool {
    pub const fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                spare: Vec::new(),
                bytes: 0,
            }),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A zeroed buffer of `len` bytes: the smallest spare one that fits, else a new one.
    pub fn take(&'static self, len: usize) -> PooledBuf {
        let reused = if len >= MIN_POOLED {
            let mut state = self.lock();
            let best = state
                .spare
                .iter()
                .enumerate()
                // Not one much larger than needed: the payload holds it as long as it lives.
                .filter(|(_, b)| b.capacity() >= len && b.capacity() <= 2 * len + GRANULE)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| {
                let buf = state.spare.swap_remove(i);
                state.bytes -= buf.capacity();
                buf
            })
        } else {
            None
        };
        let mut buf = match reused {
            Some(buf) => buf,
            None if len >= MIN_POOLED => Vec::with_capacity(len.div_ceil(GRANULE) * GRANULE),
            None => Vec::new(),
        };
        buf.clear();
        buf.resize(len, 0);
        PooledBuf { buf, pool: self }
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < MIN_POOLED || cap > self.limit {
            return;
        }
        let mut state = self.lock();
        if state.bytes + cap <= self.limit {
            buf.clear();
            state.bytes += cap;
            state.spare.push(buf);
        }
    }

    /// Capacity kept in spare buffers.
    pub fn spare_bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// A buffer that returns to its pool when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: &'static Pool,
}

impl PooledBuf {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Shares the buffer as `Bytes`; it returns to the pool when the last clone is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(limit: usize) -> &'static Pool {
        Box::leak(Box::new(Pool::new(limit)))
    }

    #[test]
    fn a_dropped_payload_buffer_is_reused_zeroed() {
        let pool = pool(8 << 20);
        let mut first = pool.take(1 << 20);
        first.as_mut_slice().fill(7);
        let addr = first.as_ref().as_ptr();
        let bytes = first.freeze();
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(pool.spare_bytes(), 0, "a clone still refers to the buffer");
        drop(clone);
        assert!(pool.spare_bytes() >= 1 << 20);

        let again = pool.take(600_000);
        assert_eq!(
            again.as_ref().as_ptr(),
            addr,
            "the spare buffer was not reused"
        );
        assert_eq!(again.as_ref().len(), 600_000);
        assert!(again.as_ref().iter().all(|b| *b == 0), "stale bytes leaked");
        assert_eq!(pool.spare_bytes(), 0);
    }

    #[test]
    fn the_pool_is_bounded_and_small_payloads_skip_it() {
        let pool = pool(3 << 20);
        let bufs: Vec<PooledBuf> = (0..5).map(|_| pool.take(1 << 20)).collect();
        drop(bufs);
        assert!(pool.spare_bytes() <= 3 << 20);
        assert!(pool.spare_bytes() >= 2 << 20);

        let small = pool.take(100);
        assert_eq!(small.as_ref(), &[0u8; 100][..]);
        let before = pool.spare_bytes();
        drop(small);
        assert_eq!(pool.spare_bytes(), before);
    }

    #[test]
    fn the_smallest_fitting_buffer_is_chosen() {
        let pool = pool(64 << 20);
        let big = pool.take(8 << 20);
        let small = pool.take(1 << 20);
        let small_addr = small.as_ref().as_ptr();
        drop(big);
        drop(small);
        let next = pool.take(512 << 10);
        assert_eq!(next.as_ref().as_ptr(), small_addr);
        // Far larger than needed: a new buffer, and the 8 MiB one stays spare.
        let tiny = pool.take(MIN_POOLED);
        assert_ne!(tiny.as_ref().as_ptr(), small_addr);
        assert!(pool.spare_bytes() >= 8 << 20);
    }
}
