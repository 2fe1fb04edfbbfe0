//! mesh-netsim: a wide-area network emulator and cluster harness for real `meshd` processes.
//!
//! What it owns, and how data flows:
//! - [`topology`] reads a TOML topology (regions, nodes, links, scripted events) and validates
//!   it once; everything else takes the validated [`topology::Topology`].
//! - [`link`] and [`timer`] are the pure core of the router: what a link does to one packet
//!   (partition, loss, bandwidth, delay, jitter) and the queue packets wait in until released.
//! - [`router`] is the data path: every node's namespace has a TUN device; one thread reads IP
//!   packets from all TUNs, asks the link model when each may arrive, and hands it to a second
//!   thread that writes it into the destination TUN at that time.
//! - [`netns`] creates and deletes the namespaces and TUNs; [`state`] records everything a run
//!   created in its run directory, so `down`, Ctrl-C, or the next `up` after a crash removes it.
//! - [`cluster`] starts `mesh-bootstrap` and `meshd` inside the namespaces (or on loopback) and
//!   owns the child processes; [`control`] is the Unix socket through which `netsim kill`,
//!   `partition`, `status`, ... talk to the running `netsim up`.
//! - [`selftest`] measures the router itself (throughput, packets/s, delay precision), and
//!   [`shaping`] checks that it applies bandwidth, loss and partitions to real traffic;
//!   [`demo`] drives a three-cloud mesh through `netsim up` and `meshctl` for a newcomer;
//!   [`bench`] runs whole-system benchmarks the same way. Both start and stop runs through
//!   [`driver`].

pub mod bench;
pub mod cluster;
pub mod control;
pub mod demo;
pub mod driver;
pub mod link;
pub mod netns;
pub mod router;
pub mod selftest;
pub mod shaping;
pub mod state;
pub mod timer;
pub mod topology;
