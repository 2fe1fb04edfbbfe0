//! The router's timer queue: packets waiting for their release time.
//!
//! A binary heap keyed by (release time, arrival sequence): pushing and popping are
//! O(log n) whatever the mix of links, and two packets due at the same nanosecond leave in
//! the order they came. Pure and generic, so it is tested without packets.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug)]
pub struct TimerQueue<T> {
    heap: BinaryHeap<Entry<T>>,
    next_seq: u64,
}

#[derive(Debug)]
struct Entry<T> {
    at: u64,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // Reversed: BinaryHeap is a max-heap and the earliest entry must be on top.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<T> TimerQueue<T> {
    pub fn with_capacity(capacity: usize) -> Self {
        TimerQueue {
            heap: BinaryHeap::with_capacity(capacity),
            next_seq: 0,
        }
    }

    pub fn push(&mut self, at: u64, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Entry { at, seq, item });
    }

    /// The earliest release time, if anything is queued.
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|e| e.at)
    }

    /// Removes and returns the earliest item if it is due at `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<(u64, T)> {
        if self.heap.peek()?.at > now {
            return None;
        }
        self.heap.pop().map(|e| (e.at, e.item))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Empties the queue, handing every item to `f` (to return buffers to their pool).
    pub fn drain(&mut self, mut f: impl FnMut(T)) {
        for e in self.heap.drain() {
            f(e.item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nothing_leaves_early() {
        let mut q = TimerQueue::default();
        q.push(10, "a");
        q.push(5, "b");
        assert_eq!(q.next_due(), Some(5));
        assert_eq!(q.pop_due(4), None);
        assert_eq!(q.pop_due(5), Some((5, "b")));
        assert_eq!(q.pop_due(9), None);
        assert_eq!(q.pop_due(100), Some((10, "a")));
        assert!(q.is_empty());
    }

    proptest! {
        #[test]
        fn pops_in_time_order_fifo_on_ties(times in prop::collection::vec(0u64..50, 0..300)) {
            let mut q = TimerQueue::default();
            for (i, t) in times.iter().enumerate() {
                q.push(*t, i);
            }
            let mut out = Vec::new();
            while let Some((at, i)) = q.pop_due(u64::MAX) {
                out.push((at, i));
            }
            let mut expected: Vec<(u64, usize)> = times.iter().copied().zip(0..).collect();
            expected.sort(); // stable on (time, arrival index)
            prop_assert_eq!(out, expected);
        }
    }
}
