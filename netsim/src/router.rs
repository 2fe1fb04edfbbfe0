//! The user-space router: moves IP packets between the nodes' TUN devices, applying the link
//! model on the way.
//!
//! Two threads, so reading and writing run on both cores:
//! - **ingress** polls every TUN, reads up to [`READ_BATCH`] packets from each ready one, finds
//!   the destination from the IPv4 header (`10.77.R.N` indexes a table directly), asks
//!   [`link::decide`] when the packet may arrive, and passes the round's packets to egress in
//!   one batch (one channel operation and at most one wake-up per round, not per packet). It
//!   also owns the link states and partitions, and applies [`Control`] messages between rounds:
//!   one [`link::Queue`] per directed region link, so a link's bandwidth is shared by all the
//!   traffic that crosses it, and one [`link::Flow`] per ordered node pair, so that no packet
//!   overtakes an earlier one of the same pair.
//! - **egress** keeps the packets in a [`TimerQueue`] and writes each into its destination TUN
//!   when due. It sleeps until shortly before the next release time and spins the rest, within
//!   a budget of 1/8 of its wall time (a sleeping thread wakes tens of microseconds late).
//!
//! Buffers circulate: egress hands written buffers back to ingress through a bounded free
//! list, so a steady flow allocates nothing. Packets of at most [`SMALL_BUF`] bytes are copied
//! into small buffers; larger ones keep the 64 KiB read buffer they arrived in. How many
//! packets may wait is bounded ([`MAX_QUEUED`]); beyond it packets are dropped and counted,
//! like a router out of buffer space.
//!
//! **Segmentation offload.** The TUNs are made with `IFF_VNET_HDR` and UDP and TCP
//! segmentation offload (see [`crate::netns::create_tun`]), so every read starts with a
//! virtio-net header, and a sender's GSO batch (quinn sends up to 64 QUIC packets in one
//! `sendmsg` with `UDP_SEGMENT`) reaches the router as one super-packet instead of one read
//! per packet. The router forwards it whole, header and all, and the receiving kernel
//! segments it again, so the per-packet cost is paid once per batch. Counters count the
//! packets on the emulated wire (segments), not reads. On a link with loss or a bandwidth
//! limit a super-packet is first split into its segments (checksums completed), so that each
//! segment is lost on its own and serialised one after another, as on a real link; delay and
//! jitter apply to a whole batch, which its sender emitted at one instant anyway.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tun_rs::{SyncDevice, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP_L4, VirtioNetHdr};

use crate::link::{self, Dice, DropReason, Model, Verdict};
use crate::timer::TimerQueue;

/// Packets read from one TUN before moving to the next, so one busy node cannot starve others.
pub const READ_BATCH: usize = 64;
/// Packets up to this size (virtio-net header included) are copied into a small buffer.
pub const SMALL_BUF: usize = 2048;
/// Length of the virtio-net header in front of every packet read from or written to a TUN.
pub const VNET_HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Size of a read buffer: the header and the largest IPv4 packet.
pub const BIG_BUF: usize = VNET_HDR + 65_535;
/// Most segments in one super-packet; the kernel's own limit (`UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 128;
/// The virtio-net "no segmentation" type, and the flag bit for ECN on a TCP super-packet.
const GSO_NONE: u8 = 0;
const GSO_ECN: u8 = 0x80;
/// Most packets waiting in the router at once.
pub const MAX_QUEUED: usize = 131_072;
/// Most packets larger than [`SMALL_BUF`] waiting at once (each holds 64 KiB).
pub const MAX_QUEUED_BIG: usize = 4096;
/// How often idle threads look at the stop flag and control messages.
const IDLE_TICK: Duration = Duration::from_millis(20);
/// Egress sleeps until this long before the next packet is due and spins the rest: a
/// sleeping thread wakes tens of microseconds late on an idle machine, and later on a VM.
const SPIN_AHEAD_NS: u64 = 150_000;
/// Spinning may take at most 1/`SPIN_SHARE` of egress's wall time, so that a steady stream
/// of packets due a little apart does not turn egress into a busy loop that holds a core.
const SPIN_SHARE: u64 = 8;
/// Most spin credit saved up while idle.
const SPIN_CREDIT_MAX_NS: u64 = 2_000_000;

/// First two bytes of every emulated address: 10.77.0.0/16.
pub const NET_PREFIX: [u8; 2] = [10, 77];

/// The address of node `slot` (1..=254) in region `region` (0-based).
pub fn address(region: usize, slot: usize) -> Ipv4Addr {
    Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], (region + 1) as u8, slot as u8)
}

/// One attached TUN device and where it sits.
pub struct Endpoint {
    pub device: SyncDevice,
    pub addr: Ipv4Addr,
    pub region: usize,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Changes applied to a running router.
#[derive(Debug, Clone)]
pub enum Control {
    /// Replace the model of the link from region `from` to region `to`.
    SetLink {
        from: usize,
        to: usize,
        model: Model,
    },
    /// Drop everything between any region of `regions` and any region of `from`.
    Partition {
        regions: Vec<usize>,
        from: Vec<usize>,
    },
    Heal,
}

/// Packets and bytes are those of the emulated wire: a super-packet of 40 segments counts 40
/// packets, and the IP and transport headers of each.
#[derive(Debug, Default)]
pub struct Stats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// TUN reads: fewer than `rx_packets` when senders batch with GSO.
    pub rx_reads: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TUN writes.
    pub tx_writes: AtomicU64,
    /// Super-packets split into segments for a link with loss or a bandwidth limit.
    pub split: AtomicU64,
    pub dropped_partition: AtomicU64,
    pub dropped_loss: AtomicU64,
    pub dropped_queue: AtomicU64,
    /// No router buffer free ([`MAX_QUEUED`]).
    pub dropped_overflow: AtomicU64,
    /// Not IPv4, or not to an attached address.
    pub dropped_no_route: AtomicU64,
    /// A virtio-net header the router cannot follow (a segmentation it does not know, too
    /// many segments, headers past the end).
    pub dropped_malformed: AtomicU64,
    pub write_errors: AtomicU64,
    /// How late egress wrote packets after their release time: [`LATENESS_BUCKETS`] buckets
    /// of [`LATENESS_BUCKET_NS`], the last one for everything later.
    pub lateness: Lateness,
}

/// Width of a lateness bucket.
pub const LATENESS_BUCKET_NS: u64 = 10_000;
/// Lateness buckets: 10 µs each up to 10 ms, then one for the rest.
pub const LATENESS_BUCKETS: usize = 1001;

/// A histogram of release lateness, written by egress only.
#[derive(Debug)]
pub struct Lateness(Box<[AtomicU64]>);

impl Default for Lateness {
    fn default() -> Self {
        Lateness((0..LATENESS_BUCKETS).map(|_| AtomicU64::new(0)).collect())
    }
}

impl Lateness {
    fn record(&self, late_ns: u64) {
        let bucket = usize::try_from(late_ns / LATENESS_BUCKET_NS)
            .unwrap_or(usize::MAX)
            .min(LATENESS_BUCKETS - 1);
        self.0[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now, to subtract an earlier copy from.
    pub fn counts(&self) -> Vec<u64> {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// The upper edge of the bucket that holds the `q` quantile of the packets counted between
    /// `before` and `after` (two [`Lateness::counts`]), or `None` if none were.
    pub fn quantile(before: &[u64], after: &[u64], q: f64) -> Option<Duration> {
        let diff: Vec<u64> = after
            .iter()
            .zip(before.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let total: u64 = diff.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, n) in diff.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_nanos((i as u64 + 1) * LATENESS_BUCKET_NS));
            }
        }
        None
    }
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Snapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_reads: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_writes: u64,
    pub split: u64,
    pub dropped_partition: u64,
    pub dropped_loss: u64,
    pub dropped_queue: u64,
    pub dropped_overflow: u64,
    pub dropped_no_route: u64,
    pub dropped_malformed: u64,
    pub write_errors: u64,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_reads: get(&self.rx_reads),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_writes: get(&self.tx_writes),
            split: get(&self.split),
            dropped_partition: get(&self.dropped_partition),
            dropped_loss: get(&self.dropped_loss),
            dropped_queue: get(&self.dropped_queue),
            dropped_overflow: get(&self.dropped_overflow),
            dropped_no_route: get(&self.dropped_no_route),
            dropped_malformed: get(&self.dropped_malformed),
            write_errors: get(&self.write_errors),
        }
    }
}

/// The router's clock: nanoseconds since it started.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> u64 {
        link::duration_ns(self.0.elapsed())
    }
}

struct Packet {
    at: u64,
    dst: u16,
    /// Segments on the wire, and their bytes (IP packets, headers included).
    segments: u16,
    wire_bytes: u32,
    /// Bytes of `buf` to write: the virtio-net header and the packet.
    len: u32,
    buf: Box<[u8]>,
}

/// How a packet read from a TUN travels on the wire.
#[derive(Debug, Clone, Copy)]
struct Shape {
    segments: u16,
    wire_bytes: usize,
    /// The header with `hdr_len` recomputed from the packet itself (the kernel may report the
    /// whole linear part there); only used to split.
    hdr: VirtioNetHdr,
}

/// What a packet of `ip` bytes with virtio-net header `hdr` is on the wire, or `None` for a
/// header the router cannot follow.
fn shape(hdr: VirtioNetHdr, ip: &[u8]) -> Option<Shape> {
    if hdr.gso_type == GSO_NONE {
        return Some(Shape {
            segments: 1,
            wire_bytes: ip.len(),
            hdr,
        });
    }
    let l3 = usize::from(hdr.csum_start);
    let gso_size = usize::from(hdr.gso_size);
    if l3 < 20 || gso_size == 0 {
        return None;
    }
    let l4 = match hdr.gso_type & !GSO_ECN {
        VIRTIO_NET_HDR_GSO_UDP_L4 => 8,
        VIRTIO_NET_HDR_GSO_TCPV4 => {
            let offset = usize::from(*ip.get(l3 + 12)? >> 4) * 4;
            if !(20..=60).contains(&offset) {
                return None;
            }
            offset
        }
        _ => return None, // IPv6 or legacy UFO: never routed here
    };
    let headers = l3 + l4;
    let payload = ip.len().checked_sub(headers)?;
    let segments = payload.div_ceil(gso_size).max(1);
    if segments > MAX_SEGMENTS {
        return None;
    }
    let mut fixed = hdr;
    fixed.hdr_len = u16::try_from(headers).ok()?;
    Some(Shape {
        segments: segments as u16,
        wire_bytes: ip.len() + (segments - 1) * headers,
        hdr: fixed,
    })
}

/// A running router; dropping it stops the threads (and, with the endpoints, the TUNs).
#[derive(Debug)]
pub struct Router {
    control: Sender<Control>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("two endpoints have address {0}")]
    DuplicateAddress(Ipv4Addr),
    #[error("endpoint address {0} is outside 10.77.0.0/16")]
    OutsideNetwork(Ipv4Addr),
    #[error("endpoint region {region} but only {regions} link regions")]
    UnknownRegion { region: usize, regions: usize },
    #[error("cannot start a router thread: {0}")]
    Spawn(#[source] std::io::Error),
}

impl Router {
    /// Starts routing between `endpoints`; `links[a][b]` is the model from region `a` to `b`.
    pub fn start(endpoints: Vec<Endpoint>, links: Vec<Vec<Model>>) -> Result<Router, Error> {
        let regions = links.len();
        let mut table = vec![u16::MAX; 1 << 16];
        for (i, e) in endpoints.iter().enumerate() {
            let o = e.addr.octets();
            if o[..2] != NET_PREFIX {
                return Err(Error::OutsideNetwork(e.addr));
            }
            if e.region >= regions {
                return Err(Error::UnknownRegion {
                    region: e.region,
                    regions,
                });
            }
            let slot = &mut table[usize::from(u16::from_be_bytes([o[2], o[3]]))];
            if *slot != u16::MAX {
                return Err(Error::DuplicateAddress(e.addr));
            }
            *slot = i as u16;
        }
        let flat: Vec<Model> = links.into_iter().flatten().collect();
        let endpoints = Arc::new(endpoints);
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let clock = Clock(Instant::now());
        let queued = Arc::new(AtomicUsize::new(0));
        let queued_big = Arc::new(AtomicUsize::new(0));
        let (control_tx, control_rx) = crossbeam_channel::bounded(256);
        let (batch_tx, batch_rx) = crossbeam_channel::bounded::<Vec<Packet>>(1024);
        let (empty_tx, empty_rx) = crossbeam_channel::bounded::<Vec<Packet>>(1024);
        let (free_small_tx, free_small_rx) = crossbeam_channel::bounded::<Box<[u8]>>(MAX_QUEUED);
        let (free_big_tx, free_big_rx) = crossbeam_channel::bounded::<Box<[u8]>>(MAX_QUEUED_BIG);

        let n = endpoints.len();
        let ingress = Ingress {
            endpoints: endpoints.clone(),
            table,
            regions,
            links: flat,
            queues: vec![link::Queue::default(); regions * regions],
            flows: vec![link::Flow::default(); n * n],
            partitioned: vec![false; regions * regions],
            control: control_rx,
            out: batch_tx,
            empty: empty_rx,
            free_small: free_small_rx,
            free_big: free_big_rx,
            queued: queued.clone(),
            queued_big: queued_big.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
            clock,
            rng: SmallRng::from_os_rng(),
            split_bufs: Vec::new(),
        };
        let egress = Egress {
            endpoints,
            input: batch_rx,
            empty: empty_tx,
            free_small: free_small_tx,
            free_big: free_big_tx,
            queued,
            queued_big,
            stats: stats.clone(),
            stop: stop.clone(),
            clock,
        };
        let mut threads = Vec::new();
        threads.push(
            std::thread::Builder::new()
                .name("router-ingress".into())
                .spawn(move || ingress.run())
                .map_err(Error::Spawn)?,
        );
        let spawned = std::thread::Builder::new()
            .name("router-egress".into())
            .spawn(move || egress.run());
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Err(Error::Spawn(e));
            }
        }
        Ok(Router {
            control: control_tx,
            stats,
            stop,
            threads,
        })
    }

    /// Applies a change; it takes effect for the next packet read.
    pub fn control(&self, change: Control) {
        // The ingress thread only goes away when the router stops; nothing to do then.
        let _ = self.control.send(change);
    }

    pub fn stats(&self) -> Snapshot {
        self.stats.snapshot()
    }

    /// The release-lateness histogram's counts now (see [`Lateness::quantile`]).
    pub fn lateness(&self) -> Vec<u64> {
        self.stats.lateness.counts()
    }

    /// Stops both threads and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Ingress {
    endpoints: Arc<Vec<Endpoint>>,
    /// Endpoint index by the last two bytes of the address; `u16::MAX` for none.
    table: Vec<u16>,
    regions: usize,
    /// `links[from_region * regions + to_region]`.
    links: Vec<Model>,
    /// `queues[from_region * regions + to_region]`, like `links`.
    queues: Vec<link::Queue>,
    /// `flows[src_endpoint * n + dst_endpoint]`.
    flows: Vec<link::Flow>,
    partitioned: Vec<bool>,
    control: Receiver<Control>,
    out: Sender<Vec<Packet>>,
    empty: Receiver<Vec<Packet>>,
    free_small: Receiver<Box<[u8]>>,
    free_big: Receiver<Box<[u8]>>,
    queued: Arc<AtomicUsize>,
    queued_big: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    clock: Clock,
    rng: SmallRng,
    /// Scratch buffers for the segments of a split super-packet.
    split_bufs: Vec<Vec<u8>>,
}

impl Ingress {
    fn run(mut self) {
        let endpoints = self.endpoints.clone();
        let mut fds: Vec<PollFd> = endpoints
            .iter()
            .map(|e| PollFd::new(e.device.as_fd(), PollFlags::POLLIN))
            .collect();
        let mut read_buf: Box<[u8]> = vec![0u8; BIG_BUF].into_boxed_slice();
        let tick = PollTimeout::try_from(IDLE_TICK).unwrap_or(PollTimeout::MAX);
        let mut batch: Vec<Packet> = Vec::with_capacity(READ_BATCH * endpoints.len());
        while !self.stop.load(Ordering::Relaxed) {
            match poll(&mut fds, tick) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => {
                    // A poll error on TUN fds is not recoverable by retrying hot.
                    std::thread::sleep(IDLE_TICK);
                    continue;
                }
            }
            // After the wait, so a change made before a packet was sent applies to that packet.
            self.apply_control();
            for (src, fd) in fds.iter().enumerate() {
                let ready = fd
                    .revents()
                    .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR));
                if !ready {
                    continue;
                }
                for _ in 0..READ_BATCH {
                    let len = match endpoints[src].device.recv(&mut read_buf) {
                        Ok(len) => len,
                        Err(_) => break, // EAGAIN: drained
                    };
                    self.route(src, &mut read_buf, len, &mut batch);
                }
            }
            if !batch.is_empty() {
                let next = self
                    .empty
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(batch.capacity()));
                let full = std::mem::replace(&mut batch, next);
                if self.out.send(full).is_err() {
                    return; // egress is gone: the router is stopping
                }
            }
        }
    }

    fn apply_control(&mut self) {
        loop {
            match self.control.try_recv() {
                Ok(Control::SetLink { from, to, model }) => {
                    if from < self.regions && to < self.regions {
                        self.links[from * self.regions + to] = model;
                    }
                }
                Ok(Control::Partition { regions, from }) => {
                    for &a in &regions {
                        for &b in &from {
                            if a < self.regions && b < self.regions {
                                self.partitioned[a * self.regions + b] = true;
                                self.partitioned[b * self.regions + a] = true;
                            }
                        }
                    }
                }
                Ok(Control::Heal) => self.partitioned.iter_mut().for_each(|p| *p = false),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Decides what happens to the packet in `read_buf[..len]` (virtio-net header first) from
    /// endpoint `src`, and pushes what may go on to `out`: the packet, its segments, or
    /// nothing. May swap `read_buf` for a fresh buffer when the packet keeps the one it
    /// arrived in.
    fn route(&mut self, src: usize, read_buf: &mut Box<[u8]>, len: usize, out: &mut Vec<Packet>) {
        let stats = &self.stats;
        stats.rx_reads.fetch_add(1, Ordering::Relaxed);
        if len < VNET_HDR + 20 {
            stats.dropped_no_route.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(hdr) = VirtioNetHdr::decode(&read_buf[..VNET_HDR]) else {
            stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let packet = &read_buf[VNET_HDR..len];
        let Some(shape) = shape(hdr, packet) else {
            stats.rx_packets.fetch_add(1, Ordering::Relaxed);
            stats
                .rx_bytes
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
            stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let segments = u64::from(shape.segments);
        stats.rx_packets.fetch_add(segments, Ordering::Relaxed);
        stats
            .rx_bytes
            .fetch_add(shape.wire_bytes as u64, Ordering::Relaxed);
        if packet[0] >> 4 != 4 || packet[16..18] != NET_PREFIX {
            stats
                .dropped_no_route
                .fetch_add(segments, Ordering::Relaxed);
            return;
        }
        let dst = self.table[usize::from(u16::from_be_bytes([packet[18], packet[19]]))];
        if dst == u16::MAX || usize::from(dst) == src {
            stats
                .dropped_no_route
                .fetch_add(segments, Ordering::Relaxed);
            return;
        }
        let hop = Hop {
            src,
            dst,
            link: self.endpoints[src].region * self.regions
                + self.endpoints[usize::from(dst)].region,
        };
        let model = &self.links[hop.link];
        if shape.segments > 1 && (model.loss > 0.0 || model.bytes_per_sec > 0) {
            self.split(hop, shape, &mut read_buf[VNET_HDR..len], out);
            return;
        }
        self.admit(
            hop,
            shape.segments,
            shape.wire_bytes,
            Bytes::Read(read_buf, len),
            out,
        );
    }

    /// Splits a super-packet into its segments, each with a plain virtio-net header and its
    /// checksums complete, and admits them one by one.
    fn split(&mut self, hop: Hop, shape: Shape, ip: &mut [u8], out: &mut Vec<Packet>) {
        let segments = usize::from(shape.segments);
        let segment_len = usize::from(shape.hdr.hdr_len) + usize::from(shape.hdr.gso_size);
        let mut bufs = std::mem::take(&mut self.split_bufs);
        if bufs.len() < segments {
            bufs.resize_with(segments, Vec::new);
        }
        for b in &mut bufs[..segments] {
            if b.len() < VNET_HDR + segment_len {
                b.resize(VNET_HDR + segment_len, 0);
            }
        }
        let mut sizes = [0usize; MAX_SEGMENTS];
        match tun_rs::gso_split(
            ip,
            shape.hdr,
            &mut bufs[..segments],
            &mut sizes[..segments],
            VNET_HDR,
            false,
        ) {
            Ok(n) => {
                self.stats.split.fetch_add(1, Ordering::Relaxed);
                for (b, &size) in bufs[..n].iter_mut().zip(&sizes[..n]) {
                    // The segment is complete: no offload left for the receiving kernel.
                    let _ = VirtioNetHdr::default().encode(&mut b[..VNET_HDR]);
                    self.admit(hop, 1, size, Bytes::Copy(&b[..VNET_HDR + size]), out);
                }
            }
            Err(_) => {
                self.stats
                    .dropped_malformed
                    .fetch_add(u64::from(shape.segments), Ordering::Relaxed);
            }
        }
        self.split_bufs = bufs;
    }

    /// Runs the link model on one packet (or unsplit super-packet of `segments` packets,
    /// `wire_bytes` on the wire) and queues it for egress.
    fn admit(
        &mut self,
        hop: Hop,
        segments: u16,
        wire_bytes: usize,
        bytes: Bytes<'_>,
        out: &mut Vec<Packet>,
    ) {
        let stats = &self.stats;
        let Hop { src, dst, link } = hop;
        let counted = u64::from(segments);
        let n = self.endpoints.len();
        let model = self.links[link];
        let dice = if model.loss > 0.0 || model.jitter_ns > 0 {
            Dice {
                loss: self.rng.random::<f64>(),
                jitter: self.rng.random_range(-1.0..=1.0),
            }
        } else {
            Dice::NONE
        };
        let now = self.clock.now();
        let verdict = link::decide(
            &model,
            &mut self.queues[link],
            &mut self.flows[src * n + usize::from(dst)],
            now,
            wire_bytes,
            self.partitioned[link],
            dice,
        );
        let at = match verdict {
            Verdict::Deliver { at } => at,
            Verdict::Drop(reason) => {
                let counter = match reason {
                    DropReason::Partitioned => &stats.dropped_partition,
                    DropReason::Loss => &stats.dropped_loss,
                    DropReason::QueueFull => &stats.dropped_queue,
                };
                counter.fetch_add(counted, Ordering::Relaxed);
                return;
            }
        };
        if self.queued.load(Ordering::Relaxed) >= MAX_QUEUED {
            stats.dropped_overflow.fetch_add(counted, Ordering::Relaxed);
            return;
        }
        let data: &[u8] = match &bytes {
            Bytes::Read(read_buf, len) => &read_buf[..*len],
            Bytes::Copy(data) => data,
        };
        let len = data.len();
        let buf = if len <= SMALL_BUF {
            let mut small = self
                .free_small
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; SMALL_BUF].into_boxed_slice());
            small[..len].copy_from_slice(data);
            small
        } else {
            if self.queued_big.load(Ordering::Relaxed) >= MAX_QUEUED_BIG {
                stats.dropped_overflow.fetch_add(counted, Ordering::Relaxed);
                return;
            }
            self.queued_big.fetch_add(1, Ordering::Relaxed);
            let mut fresh = self
                .free_big
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; BIG_BUF].into_boxed_slice());
            match bytes {
                Bytes::Read(read_buf, _) => std::mem::swap(read_buf, &mut fresh),
                Bytes::Copy(data) => fresh[..len].copy_from_slice(data),
            }
            fresh
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        out.push(Packet {
            at,
            dst,
            segments,
            wire_bytes: wire_bytes as u32,
            len: len as u32,
            buf,
        });
    }
}

/// A packet's way through the router: its endpoints and the directed region link between
/// them (`from_region * regions + to_region`), worked out once per packet read.
#[derive(Debug, Clone, Copy)]
struct Hop {
    src: usize,
    dst: u16,
    link: usize,
}

/// Where the bytes of a packet to admit are.
enum Bytes<'a> {
    /// `len` bytes of the read buffer, which a large packet takes over (a fresh one replaces it).
    Read(&'a mut Box<[u8]>, usize),
    /// Bytes to copy (a segment of a split super-packet).
    Copy(&'a [u8]),
}

/// How much egress may spin: credit accrues at 1/[`SPIN_SHARE`] of wall time, up to
/// [`SPIN_CREDIT_MAX_NS`], and spinning spends it.
#[derive(Debug)]
struct SpinBudget {
    credit: u64,
    last: u64,
}

impl SpinBudget {
    fn new(now: u64) -> Self {
        Self {
            credit: SPIN_CREDIT_MAX_NS,
            last: now,
        }
    }

    fn refill(&mut self, now: u64) {
        let earned = now.saturating_sub(self.last) / SPIN_SHARE;
        self.credit = (self.credit + earned).min(SPIN_CREDIT_MAX_NS);
        self.last = now;
    }

    /// Whether to spin the `ns` left until the next packet is due.
    fn covers(&self, ns: u64) -> bool {
        ns <= SPIN_AHEAD_NS && ns <= self.credit
    }

    /// How long to sleep when the next packet is due in `ns` (and is not spun for): until
    /// the spin window opens if there is credit to spin it, else until the due time.
    fn sleep_for(&self, ns: u64) -> u64 {
        if self.credit >= SPIN_AHEAD_NS {
            ns.saturating_sub(SPIN_AHEAD_NS)
        } else {
            ns
        }
    }

    fn spend(&mut self, ns: u64) {
        self.credit = self.credit.saturating_sub(ns);
    }
}

struct Egress {
    endpoints: Arc<Vec<Endpoint>>,
    input: Receiver<Vec<Packet>>,
    empty: Sender<Vec<Packet>>,
    free_small: Sender<Box<[u8]>>,
    free_big: Sender<Box<[u8]>>,
    queued: Arc<AtomicUsize>,
    queued_big: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    clock: Clock,
}

impl Egress {
    fn run(self) {
        // The kernel may delay a sleeper's wake-up by its timer slack (50 µs by default) to
        // batch timers; egress wants its deadlines kept.
        let _ = nix::sys::prctl::set_timerslack(1);
        let mut queue: TimerQueue<Packet> = TimerQueue::with_capacity(4096);
        let mut spin = SpinBudget::new(self.clock.now());
        while !self.stop.load(Ordering::Relaxed) {
            let now = self.clock.now();
            spin.refill(now);
            let until_due = queue.next_due().map(|at| at.saturating_sub(now));
            match until_due {
                Some(0) => {}
                Some(ns) if spin.covers(ns) => {
                    // Close enough: spin to the due time, taking in new batches meanwhile.
                    let due = now + ns;
                    loop {
                        while let Ok(batch) = self.input.try_recv() {
                            self.enqueue(&mut queue, batch);
                        }
                        if self.clock.now() >= due {
                            break;
                        }
                        std::hint::spin_loop();
                    }
                    spin.spend(self.clock.now().saturating_sub(now));
                }
                _ => {
                    let sleep = until_due.map_or(IDLE_TICK, |ns| {
                        Duration::from_nanos(spin.sleep_for(ns)).min(IDLE_TICK)
                    });
                    match self.input.recv_timeout(sleep) {
                        Ok(batch) => self.enqueue(&mut queue, batch),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
            while let Ok(batch) = self.input.try_recv() {
                self.enqueue(&mut queue, batch);
            }
            let now = self.clock.now();
            while let Some((_, packet)) = queue.pop_due(now) {
                self.write(packet);
            }
        }
        queue.drain(|p| self.recycle(p.buf));
    }

    fn enqueue(&self, queue: &mut TimerQueue<Packet>, mut batch: Vec<Packet>) {
        for p in batch.drain(..) {
            queue.push(p.at, p);
        }
        let _ = self.empty.try_send(batch);
    }

    fn write(&self, packet: Packet) {
        let len = packet.len as usize;
        self.stats
            .lateness
            .record(self.clock.now().saturating_sub(packet.at));
        match self.endpoints[usize::from(packet.dst)]
            .device
            .send(&packet.buf[..len])
        {
            Ok(_) => {
                let stats = &self.stats;
                stats.tx_writes.fetch_add(1, Ordering::Relaxed);
                stats
                    .tx_packets
                    .fetch_add(u64::from(packet.segments), Ordering::Relaxed);
                stats
                    .tx_bytes
                    .fetch_add(u64::from(packet.wire_bytes), Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.recycle(packet.buf);
    }

    fn recycle(&self, buf: Box<[u8]>) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        if buf.len() > SMALL_BUF {
            self.queued_big.fetch_sub(1, Ordering::Relaxed);
            let _ = self.free_big.try_send(buf);
        } else {
            let _ = self.free_small.try_send(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spinning_is_bounded_by_its_share_of_wall_time() {
        let mut spin = SpinBudget::new(0);
        // Idle: full credit, so a packet due within the window is spun for, and one further
        // out is slept for until the window opens.
        assert!(spin.covers(SPIN_AHEAD_NS));
        assert!(!spin.covers(SPIN_AHEAD_NS + 1));
        assert_eq!(spin.sleep_for(1_000_000), 1_000_000 - SPIN_AHEAD_NS);
        // Spinning back to back spends the credit, then egress sleeps to the due time.
        let mut now = 0;
        let mut spun = 0;
        for _ in 0..1000 {
            now += SPIN_AHEAD_NS;
            spin.refill(now);
            if spin.covers(SPIN_AHEAD_NS) {
                spin.spend(SPIN_AHEAD_NS);
                spun += SPIN_AHEAD_NS;
            }
        }
        assert!(!spin.covers(SPIN_AHEAD_NS));
        assert_eq!(spin.sleep_for(SPIN_AHEAD_NS), SPIN_AHEAD_NS);
        assert!(
            spun <= now / SPIN_SHARE + SPIN_CREDIT_MAX_NS,
            "spun {spun} ns of {now}"
        );
        // Credit comes back with idle time, up to its cap.
        spin.refill(now + 100 * SPIN_CREDIT_MAX_NS);
        assert_eq!(spin.credit, SPIN_CREDIT_MAX_NS);
    }

    fn gso(gso_type: u8, gso_size: u16, hdr_len: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: 1,
            gso_type,
            hdr_len,
            gso_size,
            csum_start: 20,
            csum_offset: if gso_type == VIRTIO_NET_HDR_GSO_UDP_L4 {
                6
            } else {
                16
            },
        }
    }

    #[test]
    fn a_plain_packet_is_one_segment() {
        let s = shape(VirtioNetHdr::default(), &[0x45; 1228]).expect("plain");
        assert_eq!((s.segments, s.wire_bytes), (1, 1228));
    }

    #[test]
    fn a_udp_batch_counts_its_segments_and_their_headers() {
        // 3000 bytes of payload in 1200-byte segments: 1200 + 1200 + 600.
        let ip = vec![0u8; 20 + 8 + 3000];
        // The kernel may report the whole linear part as hdr_len; the shape recomputes it.
        let s = shape(gso(VIRTIO_NET_HDR_GSO_UDP_L4, 1200, 700), &ip).expect("udp");
        assert_eq!(s.segments, 3);
        assert_eq!(s.wire_bytes, ip.len() + 2 * 28);
        assert_eq!(s.hdr.hdr_len, 28);
    }

    #[test]
    fn a_tcp_batch_reads_its_header_length_from_the_packet() {
        let mut ip = vec![0u8; 20 + 32 + 2000];
        ip[20 + 12] = 8 << 4; // data offset: 8 words
        let s = shape(gso(VIRTIO_NET_HDR_GSO_TCPV4 | GSO_ECN, 1000, 0), &ip).expect("tcp");
        assert_eq!((s.segments, s.hdr.hdr_len), (2, 52));
        assert_eq!(s.wire_bytes, ip.len() + 52);
        ip[20 + 12] = 2 << 4; // 8 bytes: no TCP header is that short
        assert!(shape(gso(VIRTIO_NET_HDR_GSO_TCPV4, 1000, 0), &ip).is_none());
    }

    #[test]
    fn headers_the_router_cannot_follow_are_refused() {
        let ip = vec![0u8; 20 + 8 + 3000];
        // Legacy UFO, IPv6 TCP, no segment size, headers before the IP header ends.
        assert!(shape(gso(3, 1200, 0), &ip).is_none());
        assert!(shape(gso(4, 1200, 0), &ip).is_none());
        assert!(shape(gso(VIRTIO_NET_HDR_GSO_UDP_L4, 0, 0), &ip).is_none());
        let mut short_l3 = gso(VIRTIO_NET_HDR_GSO_UDP_L4, 1200, 0);
        short_l3.csum_start = 10;
        assert!(shape(short_l3, &ip).is_none());
        // More segments than the kernel ever makes, and a packet shorter than its headers.
        assert!(shape(gso(VIRTIO_NET_HDR_GSO_UDP_L4, 10, 0), &ip).is_none());
        assert!(shape(gso(VIRTIO_NET_HDR_GSO_UDP_L4, 1200, 0), &ip[..24]).is_none());
    }

    #[test]
    fn lateness_quantiles_come_from_the_packets_between_two_copies() {
        let l = Lateness::default();
        l.record(5_000); // before the first copy: not counted
        let before = l.counts();
        for _ in 0..98 {
            l.record(3_000);
        }
        l.record(25_000);
        l.record(u64::MAX);
        let after = l.counts();
        let q = |q| Lateness::quantile(&before, &after, q);
        assert_eq!(q(0.5), Some(Duration::from_micros(10)));
        assert_eq!(q(0.98), Some(Duration::from_micros(10)));
        assert_eq!(q(0.99), Some(Duration::from_micros(30)));
        assert_eq!(
            q(1.0),
            Some(Duration::from_nanos(
                LATENESS_BUCKETS as u64 * LATENESS_BUCKET_NS
            ))
        );
        assert_eq!(Lateness::quantile(&after, &after, 0.99), None);
    }

    proptest! {
        #[test]
        fn shape_never_panics_and_stays_in_bounds(
            header in proptest::collection::vec(any::<u8>(), VNET_HDR),
            ip in proptest::collection::vec(any::<u8>(), 0..4000),
        ) {
            let Ok(hdr) = VirtioNetHdr::decode(&header) else {
                return Err(TestCaseError::fail("a header of the right length decodes"));
            };
            if let Some(s) = shape(hdr, &ip) {
                prop_assert!(usize::from(s.segments) <= MAX_SEGMENTS);
                prop_assert!(s.wire_bytes >= ip.len());
            }
        }
    }
}
