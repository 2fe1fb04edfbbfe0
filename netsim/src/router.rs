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
//!   when due, sleeping until the next release time otherwise.
//!
//! Buffers circulate: egress hands written buffers back to ingress through a bounded free
//! list, so a steady flow allocates nothing. Packets of at most [`SMALL_BUF`] bytes (all of
//! QUIC's) are copied into small buffers; larger ones keep the 64 KiB read buffer they arrived
//! in. How many packets may wait is bounded ([`MAX_QUEUED`]); beyond it packets are dropped
//! and counted, like a router out of buffer space.

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
use tun_rs::SyncDevice;

use crate::link::{self, Dice, DropReason, Model, Verdict};
use crate::timer::TimerQueue;

/// Packets read from one TUN before moving to the next, so one busy node cannot starve others.
pub const READ_BATCH: usize = 64;
/// Packets up to this size are copied into a small buffer.
pub const SMALL_BUF: usize = 2048;
/// Size of a read buffer: a whole TUN packet.
pub const BIG_BUF: usize = 65_536;
/// Most packets waiting in the router at once.
pub const MAX_QUEUED: usize = 131_072;
/// Most packets larger than [`SMALL_BUF`] waiting at once (each holds 64 KiB).
pub const MAX_QUEUED_BIG: usize = 4096;
/// How often idle threads look at the stop flag and control messages.
const IDLE_TICK: Duration = Duration::from_millis(20);

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

#[derive(Debug, Default)]
pub struct Stats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub dropped_partition: AtomicU64,
    pub dropped_loss: AtomicU64,
    pub dropped_queue: AtomicU64,
    /// No router buffer free ([`MAX_QUEUED`]).
    pub dropped_overflow: AtomicU64,
    /// Not IPv4, or not to an attached address.
    pub dropped_no_route: AtomicU64,
    pub write_errors: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub dropped_partition: u64,
    pub dropped_loss: u64,
    pub dropped_queue: u64,
    pub dropped_overflow: u64,
    pub dropped_no_route: u64,
    pub write_errors: u64,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            dropped_partition: get(&self.dropped_partition),
            dropped_loss: get(&self.dropped_loss),
            dropped_queue: get(&self.dropped_queue),
            dropped_overflow: get(&self.dropped_overflow),
            dropped_no_route: get(&self.dropped_no_route),
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
    len: u32,
    buf: Box<[u8]>,
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
                    if let Some(p) = self.route(src, &mut read_buf, len) {
                        batch.push(p);
                    }
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

    /// Decides what happens to the packet in `read_buf[..len]` from endpoint `src`; returns it
    /// ready for the timer queue, or `None` if it was dropped. May swap `read_buf` for a fresh
    /// buffer when the packet keeps the one it arrived in.
    fn route(&mut self, src: usize, read_buf: &mut Box<[u8]>, len: usize) -> Option<Packet> {
        let stats = &self.stats;
        stats.rx_packets.fetch_add(1, Ordering::Relaxed);
        stats.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        let packet = &read_buf[..len];
        if len < 20 || packet[0] >> 4 != 4 || packet[16..18] != NET_PREFIX {
            stats.dropped_no_route.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let dst = self.table[usize::from(u16::from_be_bytes([packet[18], packet[19]]))];
        if dst == u16::MAX || usize::from(dst) == src {
            stats.dropped_no_route.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let n = self.endpoints.len();
        let (from, to) = (
            self.endpoints[src].region,
            self.endpoints[usize::from(dst)].region,
        );
        let link_index = from * self.regions + to;
        let model = self.links[link_index];
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
            &mut self.queues[link_index],
            &mut self.flows[src * n + usize::from(dst)],
            now,
            len,
            self.partitioned[link_index],
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
                counter.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        if self.queued.load(Ordering::Relaxed) >= MAX_QUEUED {
            stats.dropped_overflow.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let buf = if len <= SMALL_BUF {
            let mut small = self
                .free_small
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; SMALL_BUF].into_boxed_slice());
            small[..len].copy_from_slice(&read_buf[..len]);
            small
        } else {
            if self.queued_big.load(Ordering::Relaxed) >= MAX_QUEUED_BIG {
                stats.dropped_overflow.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            self.queued_big.fetch_add(1, Ordering::Relaxed);
            let fresh = self
                .free_big
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; BIG_BUF].into_boxed_slice());
            std::mem::replace(read_buf, fresh)
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        Some(Packet {
            at,
            dst,
            len: len as u32,
            buf,
        })
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
        let mut queue: TimerQueue<Packet> = TimerQueue::with_capacity(4096);
        while !self.stop.load(Ordering::Relaxed) {
            let now = self.clock.now();
            let wait = match queue.next_due() {
                Some(at) => Duration::from_nanos(at.saturating_sub(now)).min(IDLE_TICK),
                None => IDLE_TICK,
            };
            if !wait.is_zero() {
                match self.input.recv_timeout(wait) {
                    Ok(batch) => self.enqueue(&mut queue, batch),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
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
        match self.endpoints[usize::from(packet.dst)]
            .device
            .send(&packet.buf[..len])
        {
            Ok(_) => {
                self.stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                self.stats.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
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
