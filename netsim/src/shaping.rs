//! Checks that the router shapes real traffic as the link model says: bandwidth, loss and
//! partitions, measured with UDP sockets in network namespaces. [`crate::link`]'s tests prove
//! the rules; this proves the router applies them to the right packets, with the right
//! state (a link's bandwidth shared by everything that crosses it) and the right counters.
//!
//! Four nodes: `a1` and `a2` in region 0, `b1` and `b2` in region 1. Each phase sets the model
//! of the link from region 0 to region 1 and uses sockets of its own, so nothing one phase
//! left in flight is counted by the next:
//! - **bandwidth**: `a1 -> b1` and `a2 -> b2` each offer twice the link's bandwidth; what the
//!   two receivers get together, after the link's queue has filled, is measured over a window.
//! - **loss**: `a1 -> b1`, small datagrams paced well below anything that could queue; the
//!   fraction delivered, and the router's loss counter for the rest.
//! - **partition**: datagrams `a1 -> b1` while the regions are partitioned, then after heal.
//! - **segmentation offload**: `a1 -> b1` in GSO batches (`UDP_SEGMENT`), as quinn sends,
//!   first over an ideal link, where the router must forward each batch whole (fewer TUN
//!   reads than packets), then over a lossy one, where it must split batches so that segments
//!   are lost one by one. Every segment carries its sequence number and a pattern the
//!   receiver checks, so a segment cut, merged or with a wrong checksum (the kernel drops
//!   those) shows.
//!
//! Receivers get a large socket buffer, so a receiver thread that the scheduler stalls does not
//! lose datagrams that the router delivered.

use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::link::Model;
use crate::router::{Control, Router, Snapshot};
use crate::selftest::{Error, Lab};

#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes per second of the link in the bandwidth phase.
    pub bandwidth: u64,
    /// How long the bandwidth phase measures, after the link's queue has filled.
    pub window: Duration,
    /// Fraction the link loses in the loss phase.
    pub loss: f64,
    /// Datagrams sent in the loss phase.
    pub loss_datagrams: u64,
    /// Datagrams sent while partitioned, and again after heal.
    pub partition_datagrams: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bandwidth: 4_000_000,
            window: Duration::from_secs(1),
            loss: 0.2,
            loss_datagrams: 5000,
            partition_datagrams: 200,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    /// The bandwidth phase's limit, bytes per second.
    pub bandwidth: u64,
    /// IP bytes per second each of the two flows received during the window.
    pub flow_bytes_per_sec: [f64; 2],
    /// Both flows together.
    pub total_bytes_per_sec: f64,
    pub loss: f64,
    pub loss_sent: u64,
    pub loss_received: u64,
    /// The router's `dropped_loss` during the loss phase.
    pub loss_dropped: u64,
    pub partitioned_sent: u64,
    pub partitioned_received: u64,
    /// The router's `dropped_partition` during the partition.
    pub partitioned_dropped: u64,
    pub healed_sent: u64,
    pub healed_received: u64,
    pub gso_ideal: GsoDelivery,
    pub gso_lossy: GsoDelivery,
}

/// What one offload phase sent and what arrived.
#[derive(Debug, Clone, Copy, Default)]
pub struct GsoDelivery {
    /// Segments per send, and sends.
    pub batch: u64,
    pub batches: u64,
    /// Segments sent and received intact.
    pub sent: u64,
    pub received: u64,
    /// Datagrams whose length or contents were not what was sent.
    pub corrupt: u64,
    /// Batches of which some segments arrived and some did not.
    pub partial_batches: u64,
    /// The router during the phase: TUN reads, packets (segments) read, batches split, and
    /// segments lost to the link's loss.
    pub reads: u64,
    pub packets: u64,
    pub split: u64,
    pub dropped_loss: u64,
}

/// Payload of the bandwidth phase's datagrams: few packets per second for the bytes, so the
/// router's CPU is not what limits the rate.
const BULK: usize = 8000;
/// Payload of the loss and partition phases' datagrams.
const SMALL: usize = 100;
/// IPv4 and UDP headers: the link counts whole IP packets.
const HEADERS: usize = 28;
/// How long the bandwidth phase runs before measuring: the link's 100 ms queue fills first.
const WARM_UP: Duration = Duration::from_millis(250);
/// Datagrams per second of the loss and partition phases.
const GENTLE_RATE: u64 = 5000;
/// Longest wait for datagrams still on their way once a phase has sent its last.
const SETTLE: Duration = Duration::from_secs(2);
/// Receive buffer of every receiving socket: two seconds of the bandwidth phase's traffic.
const RECEIVE_BUFFER: usize = 8 << 20;
const PORT: u16 = 9_100;

/// Runs the three phases on a lab of its own; needs root.
pub fn run(options: &Options) -> Result<Report, Error> {
    let lab = Lab::start("shaping", &[0, 0, 1, 1])?;
    let (a1, a2, b1, b2) = (0, 1, 2, 3);
    let (flow_bytes_per_sec, total_bytes_per_sec) = bandwidth(&lab, [(a1, b1), (a2, b2)], options)?;
    let (lossy, loss_dropped) = loss(&lab, (a1, b1), options)?;
    let partition = partition(&lab, (a1, b1), options.partition_datagrams)?;
    let gso_ideal = offload(&lab, (a1, b1), Model::ideal(), PORT + 3)?;
    let gso_lossy = offload(
        &lab,
        (a1, b1),
        Model {
            loss: options.loss,
            ..Model::ideal()
        },
        PORT + 4,
    )?;
    Ok(Report {
        bandwidth: options.bandwidth,
        flow_bytes_per_sec,
        total_bytes_per_sec,
        loss: options.loss,
        loss_sent: lossy.sent,
        loss_received: lossy.received,
        loss_dropped,
        partitioned_sent: partition.partitioned.sent,
        partitioned_received: partition.partitioned.received,
        partitioned_dropped: partition.partitioned_dropped,
        healed_sent: partition.healed.sent,
        healed_received: partition.healed.received,
        gso_ideal,
        gso_lossy,
    })
}

/// Segments per GSO send in the offload phases, their size, and how many sends.
const GSO_BATCH: usize = 16;
const GSO_SEGMENT: usize = 1200;
const GSO_SENDS: u64 = 300;
/// GSO sends per second: far below anything that could queue.
const GSO_RATE: u64 = 500;

/// The contents of segment `seq`: its number, then bytes derived from it.
fn segment_bytes(seq: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in out[8..].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
}

/// [`GSO_SENDS`] batches of [`GSO_BATCH`] segments `from -> to` across a link with `model`.
fn offload(
    lab: &Lab,
    (from, to): (usize, usize),
    model: Model,
    port: u16,
) -> Result<GsoDelivery, Error> {
    set_link(&lab.router, model);
    let (sender, receiver) = pair(lab, from, to, port)?;
    setsockopt(&sender, sockopt::UdpGsoSegment, &(GSO_SEGMENT as i32))
        .map_err(std::io::Error::from)?;
    let before = lab.router.stats();
    let seen = std::sync::Mutex::new(vec![false; GSO_SENDS as usize * GSO_BATCH]);
    let corrupt = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut buf = vec![0u8; 65_536];
            let mut expect = vec![0u8; GSO_SEGMENT];
            while !stop.load(Ordering::Relaxed) {
                let Ok(len) = receiver.recv(&mut buf) else {
                    continue;
                };
                let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                segment_bytes(seq, &mut expect);
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                match seen.get_mut(seq as usize) {
                    Some(slot) if len == GSO_SEGMENT && buf[..len] == expect[..] && !*slot => {
                        *slot = true;
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        corrupt.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        let mut payload = vec![0u8; GSO_BATCH * GSO_SEGMENT];
        let gap = Duration::from_secs(1) / GSO_RATE as u32;
        let mut due = Instant::now();
        let mut sent = 0u64;
        for batch in 0..GSO_SENDS {
            for (i, segment) in payload.chunks_mut(GSO_SEGMENT).enumerate() {
                segment_bytes(batch * GSO_BATCH as u64 + i as u64, segment);
            }
            due += gap;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if sender.send(&payload).is_ok() {
                sent += GSO_BATCH as u64;
            }
        }
        let deadline = Instant::now() + SETTLE;
        while Instant::now() < deadline {
            let lost = lab.router.stats().dropped_loss - before.dropped_loss;
            if received.load(Ordering::Relaxed) + lost >= sent {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        sent
    });
    let after = lab.router.stats();
    let seen = seen.into_inner().unwrap_or_else(|e| e.into_inner());
    let partial_batches = seen
        .chunks(GSO_BATCH)
        .filter(|b| b.iter().any(|&s| s) && !b.iter().all(|&s| s))
        .count() as u64;
    Ok(GsoDelivery {
        batch: GSO_BATCH as u64,
        batches: GSO_SENDS,
        sent,
        received: received.into_inner(),
        corrupt: corrupt.into_inner(),
        partial_batches,
        reads: after.rx_reads - before.rx_reads,
        packets: after.rx_packets - before.rx_packets,
        split: after.split - before.split,
        dropped_loss: after.dropped_loss - before.dropped_loss,
    })
}

/// Two flows across a link limited to `options.bandwidth`: IP bytes per second each flow
/// received during the window, and both together.
fn bandwidth(
    lab: &Lab,
    flows: [(usize, usize); 2],
    options: &Options,
) -> Result<([f64; 2], f64), Error> {
    set_link(
        &lab.router,
        Model {
            bytes_per_sec: options.bandwidth,
            ..Model::ideal()
        },
    );
    let mut sockets = Vec::with_capacity(flows.len());
    for &(from, to) in &flows {
        sockets.push(pair(lab, from, to, PORT)?);
    }
    // Each flow alone offers twice what the link carries.
    let per_sec = 2 * options.bandwidth / (BULK + HEADERS) as u64;
    let offered = (WARM_UP + options.window).as_secs_f64() * per_sec as f64;
    let arrivals: [Arrivals; 2] = Default::default();
    let stop = &AtomicBool::new(false);
    let (before, after, elapsed) = std::thread::scope(|scope| {
        for ((sender, receiver), arrivals) in sockets.iter().zip(&arrivals) {
            scope.spawn(move || receive(receiver, arrivals, stop));
            scope.spawn(move || send_paced(sender, BULK, per_sec, offered.ceil() as u64, stop));
        }
        std::thread::sleep(WARM_UP);
        let before = arrivals.each_ref().map(Arrivals::bytes);
        let start = Instant::now();
        std::thread::sleep(options.window);
        let after = arrivals.each_ref().map(Arrivals::bytes);
        let elapsed = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        (before, after, elapsed)
    });
    let rates = [0, 1].map(|i| (after[i] - before[i]) as f64 / elapsed);
    Ok((rates, rates.iter().sum()))
}

/// `options.loss_datagrams` across a link losing `options.loss`, and the router's loss drops
/// meanwhile.
fn loss(
    lab: &Lab,
    (from, to): (usize, usize),
    options: &Options,
) -> Result<(Delivery, u64), Error> {
    set_link(
        &lab.router,
        Model {
            loss: options.loss,
            ..Model::ideal()
        },
    );
    let (sender, receiver) = pair(lab, from, to, PORT + 1)?;
    let before = lab.router.stats();
    let dropped = || lab.router.stats().dropped_loss - before.dropped_loss;
    let delivery = deliver(
        &sender,
        &receiver,
        options.loss_datagrams,
        |arrivals, sent| arrivals.datagrams() + dropped() >= sent,
    );
    Ok((delivery, dropped()))
}

struct Partition {
    partitioned: Delivery,
    partitioned_dropped: u64,
    healed: Delivery,
}

/// `count` datagrams while region 0 is partitioned from region 1, then `count` after heal.
fn partition(lab: &Lab, (from, to): (usize, usize), count: u64) -> Result<Partition, Error> {
    let router = &lab.router;
    set_link(router, Model::ideal());
    let (sender, receiver) = pair(lab, from, to, PORT + 2)?;
    // The router applies a change before it reads the packets sent after it.
    router.control(Control::Partition {
        regions: vec![0],
        from: vec![1],
    });
    let before = router.stats();
    let dropped = |now: &Snapshot| now.dropped_partition - before.dropped_partition;
    // Once the router has dropped them all, none can be on its way any more.
    let partitioned = deliver(&sender, &receiver, count, |_, sent| {
        dropped(&router.stats()) >= sent
    });
    let partitioned_dropped = dropped(&router.stats());
    router.control(Control::Heal);
    let healed = deliver(&sender, &receiver, count, |arrivals, sent| {
        arrivals.datagrams() >= sent
    });
    Ok(Partition {
        partitioned,
        partitioned_dropped,
        healed,
    })
}

/// Sets the model of the link from region 0 to region 1.
fn set_link(router: &Router, model: Model) {
    router.control(Control::SetLink {
        from: 0,
        to: 1,
        model,
    });
}

/// A sender in `from` connected to a receiver in `to` on `port`.
fn pair(lab: &Lab, from: usize, to: usize, port: u16) -> Result<(UdpSocket, UdpSocket), Error> {
    let receiver = lab.bind(to, port)?;
    receiver.set_read_timeout(Some(Duration::from_millis(20)))?;
    // Root may exceed net.core.rmem_max.
    setsockopt(&receiver, sockopt::RcvBufForce, &RECEIVE_BUFFER).map_err(std::io::Error::from)?;
    let sender = lab.bind(from, 0)?;
    sender.connect(SocketAddrV4::new(lab.addr(to), port))?;
    Ok((sender, receiver))
}

/// Datagrams and IP bytes that arrived on one socket.
#[derive(Debug, Default)]
struct Arrivals {
    datagrams: AtomicU64,
    bytes: AtomicU64,
}

impl Arrivals {
    fn datagrams(&self) -> u64 {
        self.datagrams.load(Ordering::Relaxed)
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Counts what arrives on `socket` (which has a read timeout) until `stop`.
fn receive(socket: &UdpSocket, arrivals: &Arrivals, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok(len) = socket.recv(&mut buf) {
            arrivals.datagrams.fetch_add(1, Ordering::Relaxed);
            arrivals
                .bytes
                .fetch_add((len + HEADERS) as u64, Ordering::Relaxed);
        }
    }
}

/// Sends `count` datagrams of `size` bytes, `per_sec` a second on average (catching up after a
/// stall), or fewer if `stop` is set first; returns how many the kernel took.
///
/// The gaps are random: two senders on a fixed beat would lock in phase with the link's full
/// queue, and the one whose datagrams come just after each slot frees would take nearly all
/// of them, whichever way the link shared its bandwidth.
fn send_paced(socket: &UdpSocket, size: usize, per_sec: u64, count: u64, stop: &AtomicBool) -> u64 {
    let payload = vec![0x5au8; size];
    let mean_gap = 1.0 / per_sec as f64;
    let mut rng = SmallRng::from_os_rng();
    let mut due = Instant::now();
    let mut sent = 0;
    for _ in 0..count {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        due += Duration::from_secs_f64(mean_gap * rng.random_range(0.0..2.0));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if socket.send(&payload).is_ok() {
            sent += 1;
        }
    }
    sent
}

#[derive(Debug, Clone, Copy)]
struct Delivery {
    sent: u64,
    received: u64,
}

/// Sends `count` small datagrams at [`GENTLE_RATE`] while counting arrivals, then waits until
/// `settled(arrivals, sent)` says nothing more is on its way, at most [`SETTLE`].
fn deliver(
    sender: &UdpSocket,
    receiver: &UdpSocket,
    count: u64,
    settled: impl Fn(&Arrivals, u64) -> bool,
) -> Delivery {
    let arrivals = Arrivals::default();
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|scope| {
        scope.spawn(|| receive(receiver, &arrivals, &stop));
        let sent = send_paced(sender, SMALL, GENTLE_RATE, count, &stop);
        let deadline = Instant::now() + SETTLE;
        while !settled(&arrivals, sent) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        sent
    });
    Delivery {
        sent,
        received: arrivals.datagrams(),
    }
}
