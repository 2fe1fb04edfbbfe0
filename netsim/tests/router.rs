//! The router through real namespaces and TUN devices. Needs root: without it this test fails
//! (it does not skip), so a CI that lost its privileges says so.

use std::time::Duration;

use mesh_netsim::selftest;

#[test]
fn router_forwards_and_delays_precisely() {
    assert!(
        mesh_netsim::netns::have_privileges(),
        "this test needs root and /dev/net/tun (network namespaces and TUN devices)"
    );
    let report = selftest::run(&selftest::Options {
        phase: Duration::from_millis(500),
        delay: Duration::from_millis(10),
        probes: 1000,
    })
    .expect("selftest runs");
    // Throughput goals are judged by `netsim selftest` on a release build; a debug build only
    // has to forward.
    assert!(report.small_packets_per_sec > 1000.0, "{report:?}");
    assert!(report.large_mb_per_sec > 10.0, "{report:?}");
    assert!(report.probes_received >= 990, "{report:?}");
    // Every probe is held for its delay, never less.
    assert_eq!(report.early_probes, 0, "{report:?}");
    // The typical probe arrives on time: a router that ignored or doubled the delay would be
    // 10 ms off here. The precision goals (p50 and p99 within 1 ms) are a benchmark, judged by
    // `netsim selftest` on a release build and an idle machine: a debug build sharing a busy
    // CI machine has seen a p50 of 0.86 ms and scheduler stalls of 20 ms in its tail, so the
    // tail is not asserted here and the median gets 2 ms.
    assert!(report.delay_error_p50_ms <= 2.0, "{report:?}");
}
