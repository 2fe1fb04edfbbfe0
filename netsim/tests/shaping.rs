//! Bandwidth, loss, partitions and GSO batches through the real router, namespaces, TUN devices and UDP
//! sockets. Needs root: without it this test fails (it does not skip), so a CI that lost its
//! privileges says so.

use mesh_netsim::shaping;

#[test]
fn router_shapes_real_traffic() {
    assert!(
        mesh_netsim::netns::have_privileges(),
        "this test needs root and /dev/net/tun (network namespaces and TUN devices)"
    );
    let options = shaping::Options::default();
    let r = shaping::run(&options).expect("the shaping lab runs");
    eprintln!("{r:#?}");

    // Two flows that each offer twice the link's bandwidth share it: together they get the
    // link's rate (a little more is the 100 ms queue's burst; less is a busy machine), not
    // one link's rate each.
    let limit = r.bandwidth as f64;
    let total = r.total_bytes_per_sec;
    assert!(
        (0.6 * limit..=1.15 * limit).contains(&total),
        "two flows got {total:.0} B/s together across a link of {limit:.0} B/s ({:.2}x); flows: {:?}",
        total / limit,
        r.flow_bytes_per_sec
    );
    for (i, flow) in r.flow_bytes_per_sec.iter().enumerate() {
        assert!(
            *flow >= 0.25 * total,
            "flow {i} got {flow:.0} of {total:.0} B/s: the other starved it; flows: {:?}",
            r.flow_bytes_per_sec
        );
    }

    // Loss: the delivered fraction is the configured one (5000 draws: 0.04 is 7 standard
    // deviations), and the router counted every datagram that did not arrive.
    assert_eq!(r.loss_sent, options.loss_datagrams, "{r:?}");
    assert_loss_near(r.loss_received, r.loss_sent, r.loss, "datagrams");
    let missing = r.loss_sent - r.loss_received;
    assert!(
        missing.abs_diff(r.loss_dropped) <= 3,
        "{missing} datagrams did not arrive but the router counted {} lost",
        r.loss_dropped
    );

    // Partition: nothing crosses, and the router says why; after heal everything does.
    assert_eq!(r.partitioned_sent, options.partition_datagrams, "{r:?}");
    assert_eq!(
        r.partitioned_received, 0,
        "{} of {} datagrams crossed a partition",
        r.partitioned_received, r.partitioned_sent
    );
    assert!(
        r.partitioned_dropped >= r.partitioned_sent,
        "the router counted {} partition drops for {} datagrams sent",
        r.partitioned_dropped,
        r.partitioned_sent
    );
    assert_eq!(
        r.healed_received, r.healed_sent,
        "after heal {} of {} datagrams arrived",
        r.healed_received, r.healed_sent
    );
    assert_eq!(r.healed_sent, options.partition_datagrams, "{r:?}");

    // Segmentation offload: batches cross an ideal link whole and intact, and a lossy link
    // loses segments one by one.
    let ideal = r.gso_ideal;

    assert_eq!(ideal.sent, ideal.batch * ideal.batches, "{ideal:?}");
    assert_eq!(
        ideal.corrupt, 0,
        "segments arrived cut or changed: {ideal:?}"
    );
    assert_eq!(
        ideal.received, ideal.sent,
        "an ideal link lost segments: {ideal:?}"
    );
    assert_eq!(ideal.split, 0, "an ideal link split batches: {ideal:?}");
    // Each batch is one TUN read (a few other packets, such as neighbour discovery, may add
    // reads); without offload every segment would be a read of its own.
    assert!(
        ideal.packets >= ideal.sent && ideal.reads * 4 <= ideal.packets,
        "batches were not forwarded whole: {} reads for {} packets",
        ideal.reads,
        ideal.packets
    );

    let lossy = r.gso_lossy;
    assert_eq!(
        lossy.corrupt, 0,
        "split segments arrived cut or changed: {lossy:?}"
    );
    assert!(
        lossy.split >= lossy.batches * 9 / 10,
        "batches were not split: {lossy:?}"
    );
    // 4800 draws: 0.04 is 7 standard deviations.
    assert_loss_near(lossy.received, lossy.sent, options.loss, "segments");
    assert_eq!(
        lossy.sent - lossy.received,
        lossy.dropped_loss,
        "every missing segment is a counted loss: {lossy:?}"
    );
    // With each segment lost on its own (p = 0.2, 16 to a batch), a batch arrives whole or
    // not at all with probability 0.028; losing whole batches would make every batch so.
    assert!(
        lossy.partial_batches >= lossy.batches / 2,
        "losses came in whole batches: {lossy:?}"
    );
}

/// `received` of `sent` is within 0.04 of what a link losing `loss` delivers.
fn assert_loss_near(received: u64, sent: u64, loss: f64, what: &str) {
    let delivered = received as f64 / sent as f64;
    assert!(
        (delivered - (1.0 - loss)).abs() <= 0.04,
        "{delivered:.3} of {sent} {what} arrived over a link losing {loss}"
    );
}
