//! `netsim selftest`: measures the router itself, so that a benchmark run through netsim can
//! trust that the emulator is not what it measures.
//!
//! Two namespaces, `a` (10.77.1.1) and `b` (10.77.2.1), each with its TUN, and a router
//! between them. A sender thread in `a` sends UDP datagrams to a receiver thread in `b`:
//! - **packets/s**: QUIC-sized datagrams (1200 bytes of payload) as fast as the sender can,
//!   over an ideal link; the rate is what the router wrote into `b`'s TUN.
//! - **GSO batches**: the same 1200-byte datagrams sent as quinn sends them, [`GSO_BATCH`] to a
//!   `sendmsg` with `UDP_SEGMENT`, which the offloading TUN hands to the router as one
//!   super-packet; packets/s counts the datagrams (segments).
//! - **MB/s**: the same with 60,000-byte datagrams (the TUN MTU is 65,000), and the MB/s the
//!   other runs reached.
//! - **delay precision**: the link gets a one-way delay; the sender timestamps probes at a
//!   steady rate and the receiver compares each probe's one-way time with the configured delay
//!   (both threads read the same monotonic clock). The error includes both kernels' UDP paths.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::link::{self, Model};
use crate::netns;
use crate::router::{self, Control, Endpoint, Router};

#[derive(Debug, Clone)]
pub struct Options {
    /// Length of each throughput phase.
    pub phase: Duration,
    /// One-way delay the precision phase configures.
    pub delay: Duration,
    /// Probes sent in the precision phase.
    pub probes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            phase: Duration::from_secs(3),
            delay: Duration::from_millis(20),
            probes: 3000,
        }
    }
}

/// What the router must reach.
pub const GOAL_MB_PER_SEC: f64 = 200.0;
pub const GOAL_PACKETS_PER_SEC: f64 = 100_000.0;
pub const GOAL_P99_ERROR: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub small_datagram_bytes: usize,
    pub small_packets_per_sec: f64,
    pub small_mb_per_sec: f64,
    pub small_delivered_fraction: f64,
    /// Datagrams per `sendmsg` in the GSO run (of `small_datagram_bytes` each).
    pub gso_batch: usize,
    pub gso_packets_per_sec: f64,
    pub gso_mb_per_sec: f64,
    pub gso_delivered_fraction: f64,
    pub large_datagram_bytes: usize,
    pub large_packets_per_sec: f64,
    pub large_mb_per_sec: f64,
    pub configured_delay_ms: f64,
    pub probes_sent: usize,
    pub probes_received: usize,
    pub delay_error_p50_ms: f64,
    pub delay_error_p99_ms: f64,
    pub delay_error_max_ms: f64,
    /// Probes that arrived sooner than the configured delay: the router must never do that.
    pub early_probes: usize,
    /// How late the router itself released the probes (write time less due time), p50 and
    /// p99, to 10 µs: the router's share of the delay error; the rest is the two kernels'
    /// UDP paths and the wake-ups of the probe's threads.
    pub router_late_p50_ms: f64,
    pub router_late_p99_ms: f64,
    pub router_drops: u64,
    pub passed: bool,
    pub failures: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the selftest needs root and /dev/net/tun (it creates network namespaces and TUN devices); run it as root"
    )]
    NotRoot,
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error(transparent)]
    Router(#[from] router::Error),
    #[error("probe socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// Deletes a lab's namespaces however its measurement ends.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = netns::delete(name);
        }
    }
}

/// Nodes in namespaces of their own, each with its TUN, and a router between them: what the
/// router's own measurements run on. Dropping it stops the router, then deletes the
/// namespaces.
pub(crate) struct Lab {
    pub(crate) router: Router,
    /// Declared after the router, so dropped after it has closed the TUNs.
    names: Namespaces,
    addrs: Vec<Ipv4Addr>,
}

/// Tells apart the labs of one process, e.g. two tests running side by side.
static LABS_STARTED: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Starts node `i` in region `regions[i]`, with ideal links between all regions.
    /// `label` goes into the namespace names, with the pid and a per-lab number.
    pub(crate) fn start(label: &str, regions: &[usize]) -> Result<Lab, Error> {
        if !netns::have_privileges() {
            return Err(Error::NotRoot);
        }
        let lab = LABS_STARTED.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("netsim-{label}-{}-{lab}", std::process::id());
        let region_count = regions.iter().max().map_or(0, |r| r + 1);
        let mut names = Namespaces(Vec::with_capacity(regions.len()));
        let mut addrs = Vec::with_capacity(regions.len());
        let mut endpoints = Vec::with_capacity(regions.len());
        let mut slots = vec![0; region_count];
        for (i, &region) in regions.iter().enumerate() {
            slots[region] += 1;
            let addr = router::address(region, slots[region]);
            let name = format!("{prefix}-{i}");
            // Recorded first, so that a half-made namespace is deleted too.
            names.0.push(name.clone());
            netns::create(&name)?;
            endpoints.push(Endpoint {
                device: netns::create_tun(&name, addr)?,
                addr,
                region,
            });
            addrs.push(addr);
        }
        let router = Router::start(
            endpoints,
            vec![vec![Model::ideal(); region_count]; region_count],
        )?;
        Ok(Lab {
            router,
            names,
            addrs,
        })
    }

    pub(crate) fn addr(&self, node: usize) -> Ipv4Addr {
        self.addrs[node]
    }

    /// A UDP socket in `node`'s namespace, bound to its address and `port` (0 for any).
    pub(crate) fn bind(&self, node: usize, port: u16) -> Result<UdpSocket, Error> {
        let addr = self.addrs[node];
        Ok(netns::run_in(&self.names.0[node], move || {
            UdpSocket::bind((addr, port))
        })??)
    }
}

const PORT: u16 = 9_000;
/// Bytes the throughput sender lets be in flight before it waits for the receiver.
const WINDOW_BYTES: u64 = 4 << 20;
const SMALL: usize = 1200;
const LARGE: usize = 60_000;
/// Datagrams per GSO send; quinn sends up to 64 (a QUIC connection's whole burst).
pub const GSO_BATCH: usize = 40;

pub fn run(options: &Options) -> Result<Report, Error> {
    let lab = Lab::start("selftest", &[0, 1])?;
    let router = &lab.router;
    let sender = lab.bind(0, 0)?;
    sender.connect(SocketAddrV4::new(lab.addr(1), PORT))?;
    let receiver = lab.bind(1, PORT)?;
    receiver.set_read_timeout(Some(Duration::from_millis(50)))?;
    let sender = Arc::new(sender);
    let receiver = Arc::new(receiver);

    let small = throughput(router, &sender, &receiver, SMALL, 1, options.phase)?;
    let gso_sender = lab.bind(0, 0)?;
    gso_sender.connect(SocketAddrV4::new(lab.addr(1), PORT))?;
    nix::sys::socket::setsockopt(
        &gso_sender,
        nix::sys::socket::sockopt::UdpGsoSegment,
        &(SMALL as i32),
    )
    .map_err(std::io::Error::from)?;
    let gso = throughput(
        router,
        &Arc::new(gso_sender),
        &receiver,
        SMALL,
        GSO_BATCH,
        options.phase,
    )?;
    let large = throughput(router, &sender, &receiver, LARGE, 1, options.phase)?;

    let delay = Model {
        delay_ns: link::duration_ns(options.delay),
        ..Model::ideal()
    };
    router.control(Control::SetLink {
        from: 0,
        to: 1,
        model: delay,
    });
    let precision = precision(router, &sender, &receiver, options)?;
    let late = |q| {
        router::Lateness::quantile(&precision.late_before, &precision.late_after, q)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let drops = router.stats();
    drop(lab);

    // The goals are judged on traffic shaped like the mesh's: quinn sends GSO batches of
    // QUIC-sized packets. The one-datagram-per-send run is reported beside it.
    let mut failures = Vec::new();
    if gso.packets_per_sec < GOAL_PACKETS_PER_SEC {
        failures.push(format!(
            "{:.0} packets/s of {SMALL}-byte datagrams in GSO batches of {GSO_BATCH} is below the goal of {GOAL_PACKETS_PER_SEC:.0}",
            gso.packets_per_sec
        ));
    }
    let best_mb = gso.mb_per_sec.max(large.mb_per_sec);
    if best_mb < GOAL_MB_PER_SEC {
        failures.push(format!(
            "{best_mb:.0} MB/s is below the goal of {GOAL_MB_PER_SEC:.0} MB/s"
        ));
    }
    let p99 = percentile(&precision.errors_ns, 0.99);
    if p99 > link::duration_ns(GOAL_P99_ERROR) {
        failures.push(format!(
            "p99 delay error {:.3} ms is above the goal of {:.3} ms",
            ms(p99),
            GOAL_P99_ERROR.as_secs_f64() * 1e3
        ));
    }
    if precision.errors_ns.len() < options.probes * 99 / 100 {
        failures.push(format!(
            "only {} of {} delay probes arrived",
            precision.errors_ns.len(),
            options.probes
        ));
    }
    if precision.early > 0 {
        failures.push(format!(
            "{} probes arrived before their configured delay",
            precision.early
        ));
    }
    Ok(Report {
        small_datagram_bytes: SMALL,
        small_packets_per_sec: small.packets_per_sec,
        small_mb_per_sec: small.mb_per_sec,
        small_delivered_fraction: small.delivered_fraction,
        gso_batch: GSO_BATCH,
        gso_packets_per_sec: gso.packets_per_sec,
        gso_mb_per_sec: gso.mb_per_sec,
        gso_delivered_fraction: gso.delivered_fraction,
        large_datagram_bytes: LARGE,
        large_packets_per_sec: large.packets_per_sec,
        large_mb_per_sec: large.mb_per_sec,
        configured_delay_ms: options.delay.as_secs_f64() * 1e3,
        probes_sent: options.probes,
        probes_received: precision.errors_ns.len(),
        delay_error_p50_ms: ms(percentile(&precision.errors_ns, 0.5)),
        delay_error_p99_ms: ms(p99),
        delay_error_max_ms: ms(precision.errors_ns.iter().copied().max().unwrap_or(0)),
        early_probes: precision.early,
        router_late_p50_ms: late(0.5),
        router_late_p99_ms: late(0.99),
        router_drops: drops.dropped_overflow + drops.dropped_queue + drops.write_errors,
        passed: failures.is_empty(),
        failures,
    })
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The `q` quantile of `values` (unsorted), 0 for none.
pub fn percentile(values: &[u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Throughput {
    packets_per_sec: f64,
    mb_per_sec: f64,
    delivered_fraction: f64,
}

/// Sends `size`-byte datagrams for `phase`, `batch` to a send (a socket with `UDP_SEGMENT`
/// set to `size` when more than one), and measures what the router forwarded.
fn throughput(
    router: &Router,
    sender: &Arc<UdpSocket>,
    receiver: &Arc<UdpSocket>,
    size: usize,
    batch: usize,
    phase: Duration,
) -> Result<Throughput, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let rx = {
        let (receiver, stop, received) = (receiver.clone(), stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                if receiver.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let sent = Arc::new(AtomicU64::new(0));
    let tx = {
        let (sender, stop, sent, received) =
            (sender.clone(), stop.clone(), sent.clone(), received.clone());
        std::thread::spawn(move || {
            let payload = vec![0x5au8; size * batch];
            let window = (WINDOW_BYTES / size as u64).max(8 * batch as u64);
            // Datagrams given up as lost, and when the receiver last made progress.
            let (mut lost, mut last_received, mut stalled_since) = (0u64, 0u64, Instant::now());
            while !stop.load(Ordering::Relaxed) {
                // A window, as a transport would keep: a sender that runs far ahead only burns
                // the CPU the router needs on packets the TUN queue then drops.
                let got = received.load(Ordering::Relaxed);
                // Late arrivals of datagrams given up as lost can make this negative.
                let in_flight = sent.load(Ordering::Relaxed).saturating_sub(got + lost);
                if got != last_received {
                    (last_received, stalled_since) = (got, Instant::now());
                }
                if in_flight > window {
                    if stalled_since.elapsed() > Duration::from_millis(5) {
                        lost += in_flight; // nothing arrives: what is out there was dropped
                    }
                    std::thread::yield_now();
                    continue;
                }
                for _ in 0..64usize.div_ceil(batch) {
                    if sender.send(&payload).is_ok() {
                        sent.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    // Let queues fill before measuring.
    std::thread::sleep(Duration::from_millis(300));
    let before = router.stats();
    let start = Instant::now();
    std::thread::sleep(phase);
    let after = router.stats();
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = tx.join();
    let _ = rx.join();
    let packets = (after.tx_packets - before.tx_packets) as f64;
    let bytes = (after.tx_bytes - before.tx_bytes) as f64;
    let sent = sent.load(Ordering::Relaxed).max(1) as f64;
    Ok(Throughput {
        packets_per_sec: packets / elapsed,
        mb_per_sec: bytes / elapsed / 1e6,
        delivered_fraction: received.load(Ordering::Relaxed) as f64 / sent,
    })
}

struct Precision {
    /// |measured one-way delay - configured|, per probe received.
    errors_ns: Vec<u64>,
    /// How many probes arrived before their configured delay had passed.
    early: usize,
    /// The router's release-lateness counts when the probes started and when they ended.
    late_before: Vec<u64>,
    late_after: Vec<u64>,
}

fn precision(
    router: &Router,
    sender: &Arc<UdpSocket>,
    receiver: &Arc<UdpSocket>,
    options: &Options,
) -> Result<Precision, Error> {
    let epoch = Instant::now();
    let configured = link::duration_ns(options.delay);
    let probes = options.probes;
    let interval = Duration::from_micros(500);
    // Drain whatever the throughput phases left in the socket.
    let mut buf = [0u8; 65_536];
    receiver.set_read_timeout(Some(Duration::from_millis(10)))?;
    while receiver.recv(&mut buf).is_ok() {}
    receiver.set_read_timeout(Some(options.delay * 4 + Duration::from_millis(200)))?;
    let late_before = router.lateness();

    let tx = {
        let sender = sender.clone();
        std::thread::spawn(move || {
            let mut next = Instant::now();
            for seq in 0..probes as u64 {
                let mut probe = [0u8; 64];
                probe[..8].copy_from_slice(&seq.to_be_bytes());
                let sent_at = link::duration_ns(epoch.elapsed());
                probe[8..16].copy_from_slice(&sent_at.to_be_bytes());
                let _ = sender.send(&probe);
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };
    let mut errors_ns = Vec::with_capacity(probes);
    let mut early = 0;
    while errors_ns.len() < probes {
        let Ok(len) = receiver.recv(&mut buf) else {
            break; // timed out: the rest were lost
        };
        let arrived = link::duration_ns(epoch.elapsed());
        if len != 64 {
            continue;
        }
        let mut stamp = [0u8; 8];
        stamp.copy_from_slice(&buf[8..16]);
        let one_way = arrived.saturating_sub(u64::from_be_bytes(stamp));
        if one_way < configured {
            early += 1;
        }
        errors_ns.push(one_way.abs_diff(configured));
    }
    let _ = tx.join();
    Ok(Precision {
        errors_ns,
        early,
        late_before,
        late_after: router.lateness(),
    })
}

/// Prints the report as a short table.
pub fn print(report: &Report) {
    println!("netsim router selftest (2 namespaces, UDP through the user-space router)");
    println!(
        "  {:>6}-byte datagrams: {:>9.0} packets/s  {:>7.1} MB/s  ({:.1}% of sent delivered)",
        report.small_datagram_bytes,
        report.small_packets_per_sec,
        report.small_mb_per_sec,
        report.small_delivered_fraction * 100.0
    );
    println!(
        "  {:>6}-byte datagrams, GSO batches of {}: {:>9.0} packets/s  {:>7.1} MB/s  ({:.1}% of sent delivered)",
        report.small_datagram_bytes,
        report.gso_batch,
        report.gso_packets_per_sec,
        report.gso_mb_per_sec,
        report.gso_delivered_fraction * 100.0
    );
    println!(
        "  {:>6}-byte datagrams: {:>9.0} packets/s  {:>7.1} MB/s",
        report.large_datagram_bytes, report.large_packets_per_sec, report.large_mb_per_sec
    );
    println!(
        "  delay {:.1} ms one way: error p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} of {} probes, {} early)",
        report.configured_delay_ms,
        report.delay_error_p50_ms,
        report.delay_error_p99_ms,
        report.delay_error_max_ms,
        report.probes_received,
        report.probes_sent,
        report.early_probes
    );
    println!(
        "  of which the router's own release lateness: p50 <= {:.2} ms, p99 <= {:.2} ms",
        report.router_late_p50_ms, report.router_late_p99_ms
    );
    println!(
        "  goals (packets/s on GSO batches, as quinn sends): >= {GOAL_PACKETS_PER_SEC:.0} packets/s, >= {GOAL_MB_PER_SEC:.0} MB/s, p99 error <= {} ms",
        GOAL_P99_ERROR.as_millis()
    );
    if report.passed {
        println!("  PASS");
    } else {
        for f in &report.failures {
            println!("  FAIL: {f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.99), 7);
    }
}
