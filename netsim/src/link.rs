//! The link model: what happens to one packet on one directed link.
//!
//! Pure: the router passes in the time and two random numbers, and gets back a verdict, so
//! every rule here is unit- and property-tested without a network. Times are nanoseconds on
//! the router's monotonic clock.
//!
//! Order of the rules, as on a real path: a partition drops everything; random loss drops a
//! fraction; the bandwidth limit serialises packets one after another (a packet waits for the
//! ones before it, and a packet that would wait longer than the queue limit is tail-dropped);
//! then the propagation delay, plus or minus jitter, applies. A packet is never released
//! before the one its sender sent ahead of it to the same receiver: jitter varies the delay,
//! it does not reorder, because real paths rarely reorder and QUIC treats reordering as loss.
//!
//! The two memories have different owners. The bandwidth is the link's capacity in one
//! direction, so its [`Queue`] is shared by every node pair whose packets cross the link (two
//! pairs across a 1 Gbit/s link get 1 Gbit/s together, not each). The no-reordering rule is
//! about one conversation, so each node pair has its own [`Flow`]: a pair is never held back
//! by another pair's jitter.

use std::time::Duration;

use crate::topology::LinkParams;

/// Backlog allowed behind a bandwidth limit before packets are dropped.
pub const DEFAULT_QUEUE_LIMIT: Duration = Duration::from_millis(100);

/// A link's parameters in the units the router works in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    pub delay_ns: u64,
    pub jitter_ns: u64,
    pub loss: f64,
    /// Bytes per second; 0 is unlimited.
    pub bytes_per_sec: u64,
    pub queue_limit_ns: u64,
}

impl Model {
    pub fn from_params(params: &LinkParams) -> Model {
        Model {
            delay_ns: duration_ns(params.one_way_delay()),
            jitter_ns: duration_ns(params.jitter).min(duration_ns(params.one_way_delay())),
            loss: params.loss,
            bytes_per_sec: params.bandwidth.unwrap_or(0),
            queue_limit_ns: duration_ns(DEFAULT_QUEUE_LIMIT),
        }
    }

    /// A link that forwards at once and loses nothing.
    pub fn ideal() -> Model {
        Model {
            delay_ns: 0,
            jitter_ns: 0,
            loss: 0.0,
            bytes_per_sec: 0,
            queue_limit_ns: duration_ns(DEFAULT_QUEUE_LIMIT),
        }
    }
}

pub fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a directed link remembers between packets, whoever sent them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queue {
    /// When the link has finished serialising the packets queued so far.
    busy_until: u64,
}

/// What one node pair's packets on a link remember between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// Release time of the pair's last packet let through, so that none overtakes it.
    last_release: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write the packet to its destination at this time.
    Deliver {
        at: u64,
    },
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Partitioned,
    Loss,
    QueueFull,
}

/// The random numbers one decision uses, drawn by the caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dice {
    /// Uniform in [0, 1): the packet is lost when below the loss rate.
    pub loss: f64,
    /// Uniform in [-1, 1]: scales the jitter.
    pub jitter: f64,
}

impl Dice {
    pub const NONE: Dice = Dice {
        loss: 1.0,
        jitter: 0.0,
    };
}

/// Decides the fate of a packet of `len` bytes of `flow` entering the link at `now`; `queue`
/// is the link's, shared with every other flow on it.
pub fn decide(
    model: &Model,
    queue: &mut Queue,
    flow: &mut Flow,
    now: u64,
    len: usize,
    partitioned: bool,
    dice: Dice,
) -> Verdict {
    if partitioned {
        return Verdict::Drop(DropReason::Partitioned);
    }
    if model.loss > 0.0 && dice.loss < model.loss {
        return Verdict::Drop(DropReason::Loss);
    }
    let sent = if model.bytes_per_sec == 0 {
        now
    } else {
        let start = queue.busy_until.max(now);
        if start - now > model.queue_limit_ns {
            return Verdict::Drop(DropReason::QueueFull);
        }
        let serialise = (len as u128 * 1_000_000_000 / u128::from(model.bytes_per_sec)) as u64;
        queue.busy_until = start.saturating_add(serialise);
        queue.busy_until
    };
    let jitter = (model.jitter_ns as f64 * dice.jitter.clamp(-1.0, 1.0)) as i64;
    let delay = (model.delay_ns as i64).saturating_add(jitter).max(0) as u64;
    let at = sent.saturating_add(delay).max(flow.last_release);
    flow.last_release = at;
    Verdict::Deliver { at }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model(delay_ms: u64, jitter_ms: u64, loss: f64, bytes_per_sec: u64) -> Model {
        Model {
            delay_ns: delay_ms * 1_000_000,
            jitter_ns: jitter_ms * 1_000_000,
            loss,
            bytes_per_sec,
            queue_limit_ns: 100_000_000,
        }
    }

    #[test]
    fn delay_is_added() {
        let (mut q, mut f) = (Queue::default(), Flow::default());
        let v = decide(
            &model(15, 0, 0.0, 0),
            &mut q,
            &mut f,
            1_000,
            1200,
            false,
            Dice::NONE,
        );
        assert_eq!(v, Verdict::Deliver { at: 15_001_000 });
    }

    #[test]
    fn partition_and_loss_drop() {
        let (mut q, mut f) = (Queue::default(), Flow::default());
        let m = model(1, 0, 0.5, 0);
        assert_eq!(
            decide(&m, &mut q, &mut f, 0, 1, true, Dice::NONE),
            Verdict::Drop(DropReason::Partitioned)
        );
        let lost = Dice {
            loss: 0.2,
            jitter: 0.0,
        };
        assert_eq!(
            decide(&m, &mut q, &mut f, 0, 1, false, lost),
            Verdict::Drop(DropReason::Loss)
        );
        let kept = Dice {
            loss: 0.7,
            jitter: 0.0,
        };
        assert!(matches!(
            decide(&m, &mut q, &mut f, 0, 1, false, kept),
            Verdict::Deliver { .. }
        ));
    }

    #[test]
    fn bandwidth_serialises_and_tail_drops() {
        // 1 MB/s: a 1000-byte packet takes 1 ms on the wire.
        let m = model(0, 0, 0.0, 1_000_000);
        let (mut q, mut f) = (Queue::default(), Flow::default());
        let mut last = 0;
        for i in 1..=100u64 {
            match decide(&m, &mut q, &mut f, 0, 1000, false, Dice::NONE) {
                Verdict::Deliver { at } => {
                    assert_eq!(at, i * 1_000_000);
                    last = at;
                }
                v => panic!("packet {i}: {v:?}"),
            }
        }
        assert_eq!(last, 100_000_000);
        // The queue now holds 100 ms: the next packet is over the limit.
        let _ = decide(&m, &mut q, &mut f, 0, 1000, false, Dice::NONE);
        assert_eq!(
            decide(&m, &mut q, &mut f, 0, 1000, false, Dice::NONE),
            Verdict::Drop(DropReason::QueueFull)
        );
    }

    #[test]
    fn flows_share_the_bandwidth_and_each_keeps_its_order() {
        // 1 MB/s: a 1000-byte packet takes 1 ms on the wire, whichever flow sent it.
        let m = model(10, 5, 0.0, 1_000_000);
        let mut q = Queue::default();
        let (mut a, mut b) = (Flow::default(), Flow::default());
        let late = Dice {
            loss: 1.0,
            jitter: 1.0,
        };
        let early = Dice {
            loss: 1.0,
            jitter: -1.0,
        };
        // a's packet is serialised first, then b's behind it: 2 ms for both, not 1 ms each.
        assert_eq!(
            decide(&m, &mut q, &mut a, 0, 1000, false, late),
            Verdict::Deliver { at: 16_000_000 }
        );
        assert_eq!(
            decide(&m, &mut q, &mut b, 0, 1000, false, early),
            Verdict::Deliver { at: 7_000_000 }
        );
        // b may arrive before a's earlier packet (another pair), but a's next packet may not.
        assert_eq!(
            decide(&m, &mut q, &mut a, 0, 1000, false, early),
            Verdict::Deliver { at: 16_000_000 }
        );
        // The queue is shared: 97 more packets fill it to its 100 ms, whoever sends them.
        for i in 0..97 {
            let flow = if i % 2 == 0 { &mut a } else { &mut b };
            assert!(matches!(
                decide(&m, &mut q, flow, 0, 1000, false, Dice::NONE),
                Verdict::Deliver { .. }
            ));
        }
        assert_eq!(
            decide(&m, &mut q, &mut b, 0, 1000, false, Dice::NONE),
            Verdict::Deliver { at: 111_000_000 }
        );
        assert_eq!(
            decide(&m, &mut q, &mut b, 0, 1000, false, Dice::NONE),
            Verdict::Drop(DropReason::QueueFull)
        );
    }

    proptest! {
        #[test]
        fn releases_keep_order_and_stay_within_jitter(
            delay_ms in 0u64..200,
            jitter_frac in 0.0f64..1.0,
            packets in prop::collection::vec((0u64..5_000_000, 1usize..65_000, -1.0f64..=1.0), 1..200),
        ) {
            let jitter_ms = (delay_ms as f64 * jitter_frac) as u64;
            let m = model(delay_ms, jitter_ms, 0.0, 0);
            let (mut q, mut f) = (Queue::default(), Flow::default());
            let mut now = 0u64;
            let mut previous = 0u64;
            for (gap, len, j) in packets {
                now += gap;
                let Verdict::Deliver { at } = decide(&m, &mut q, &mut f, now, len, false, Dice { loss: 1.0, jitter: j }) else {
                    panic!("an ideal link dropped a packet");
                };
                prop_assert!(at >= previous, "reordered");
                prop_assert!(at >= now + m.delay_ns - m.jitter_ns);
                // Only the no-overtaking rule may hold a packet past delay + jitter.
                prop_assert!(at <= (now + m.delay_ns + m.jitter_ns).max(previous));
                previous = at;
            }
        }

        /// However many flows share the link, together they get its bandwidth.
        #[test]
        fn bandwidth_is_never_exceeded(
            bytes_per_sec in 10_000u64..1_000_000_000,
            packets in prop::collection::vec((0u64..2_000_000, 1usize..9_000, 0usize..4), 1..300),
        ) {
            let m = model(5, 0, 0.0, bytes_per_sec);
            let mut q = Queue::default();
            let mut flows = [Flow::default(); 4];
            let mut now = 0u64;
            let mut first: Option<u64> = None;
            let mut last = 0u64;
            let mut bytes = 0u128;
            for (gap, len, flow) in packets {
                now += gap;
                if let Verdict::Deliver { at } = decide(&m, &mut q, &mut flows[flow], now, len, false, Dice::NONE) {
                    // The first packet's own serialisation happens before its release.
                    let start = at - m.delay_ns - (len as u128 * 1_000_000_000 / u128::from(bytes_per_sec)) as u64;
                    first.get_or_insert(start);
                    last = at - m.delay_ns;
                    bytes += len as u128;
                }
            }
            if let Some(first) = first {
                let elapsed = u128::from(last - first);
                // bytes delivered in [first, last] cannot exceed the rate (rounding: 1 ns per packet).
                prop_assert!(bytes * 1_000_000_000 <= (elapsed + 300) * u128::from(bytes_per_sec));
            }
        }

        #[test]
        fn loss_rate_is_respected(loss in 0.0f64..1.0, draws in prop::collection::vec(0.0f64..1.0, 1..500)) {
            let m = model(1, 0, loss, 0);
            let (mut q, mut f) = (Queue::default(), Flow::default());
            for d in draws {
                let v = decide(&m, &mut q, &mut f, 0, 100, false, Dice { loss: d, jitter: 0.0 });
                prop_assert_eq!(matches!(v, Verdict::Drop(DropReason::Loss)), loss > 0.0 && d < loss);
            }
        }
    }
}
