//! `--iface` globs with hotplug: the agent starts before any matching
//! interface exists, attaches to one created afterwards (netlink link
//! notifications), forgets it when it is deleted and attaches again when it
//! comes back; a non-matching and an excluded interface stay untouched.
//! Counts are checked exactly, per ifindex.
//!
//! Needs root (CI runs as root). Namespaces are removed on drop.

use std::time::Duration;

use flowexport_tests::frames::*;
use flowexport_tests::*;

/// A veth pair: `b_dev` in `b`, `a_dev` in `a`, both up.
fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) {
    veth_named(a, a_dev, b, b_dev).unwrap();
}

fn send(ns: &Netns, dev: &str, sport: u16, n: usize) {
    send_one(
        ns,
        dev,
        eth4("10.70.0.1", "10.70.0.2", &L4::udp(sport, 4000, 100)),
        n,
    );
}

/// Waits until the agent's metric `name` reads `want`.
fn wait_metric(agent: &Agent, name: &str, want: f64) {
    let (ok, m) = agent.wait_metrics(9590, Duration::from_secs(10), |m| {
        metric(m, name) == Some(want)
    });
    assert!(ok, "{name}: {:?}, expected {want}", metric(&m, name));
}

#[test]
fn glob_attaches_to_interfaces_that_appear_and_forgets_those_that_go() {
    let (a, b) = (Netns::new().unwrap(), Netns::new().unwrap());
    // A matching interface that another XDP program holds already (here,
    // another agent's): skipped, counted, never replaced.
    veth(&a, "peer5", &b, "watch5");
    let holder = Agent::start(
        &b,
        &[
            "--iface",
            "watch5",
            "--capture",
            "xdp",
            "--metrics-addr",
            "127.0.0.1:9591",
        ],
    )
    .unwrap();
    let agent = Agent::start(
        &b,
        &iface_args(&["watch*"], &["--exclude-iface", "watchx*"]),
    )
    .unwrap();
    assert!(
        agent
            .stderr()
            .contains("no interface matching watch* is attached yet"),
        "{}",
        agent.stderr()
    );
    wait_metric(&agent, "flowexport_interfaces_attached", 0.0);
    wait_metric(
        &agent,
        "flowexport_interface_attach_failures_total{iface=\"watch5\"}",
        1.0,
    );
    send(&a, "peer5", 1005, 10);

    // A matching interface appears, and one that matches no glob, and one
    // that is excluded.
    veth(&a, "peer0", &b, "watch0");
    veth(&a, "peer1", &b, "other0");
    veth(&a, "peer2", &b, "watchx0");
    let first = b.ifindex("watch0").unwrap();
    let created = std::time::Instant::now();
    wait_metric(&agent, "flowexport_interfaces_attached", 1.0);
    eprintln!("watch0 attached {:?} after its creation", created.elapsed());
    send(&a, "peer0", 1000, 40);
    send(&a, "peer1", 1001, 30);
    send(&a, "peer2", 1002, 20);

    // It goes away, and comes back (a new ifindex).
    b.exec(&["ip", "link", "del", "watch0"]).unwrap();
    wait_metric(
        &agent,
        "flowexport_interface_events_total{event=\"detach\"}",
        1.0,
    );
    wait_metric(&agent, "flowexport_interfaces_attached", 0.0);
    veth(&a, "peer0", &b, "watch0");
    let second = b.ifindex("watch0").unwrap();
    assert_ne!(first, second);
    wait_metric(
        &agent,
        "flowexport_interface_events_total{event=\"attach\"}",
        2.0,
    );
    send(&a, "peer0", 1003, 25);

    let out = agent.stop_ok();
    let got: Vec<(FlowId, u64)> = totals(&out.records)
        .into_iter()
        .map(|(id, t)| (id, t.packets))
        .collect();
    let flow =
        |ifindex, sport| FlowId::new(0, ifindex, "10.70.0.1", "10.70.0.2", 17, sport, 4000, 0);
    assert_eq!(got, vec![(flow(first, 1000), 40), (flow(second, 1003), 25)]);
    let held = holder.stop().unwrap();
    let held: Vec<(FlowId, u64)> = totals(&held.records)
        .into_iter()
        .map(|(id, t)| (id, t.packets))
        .collect();
    let watch5 = b.ifindex("watch5").unwrap();
    assert_eq!(
        held,
        vec![(flow(watch5, 1005), 10)],
        "the first program kept counting"
    );
    // Nothing attached to the others.
    for dev in ["other0", "watchx0"] {
        let link = b.exec(&["ip", "-d", "link", "show", "dev", dev]).unwrap();
        assert!(!link.contains("xdp"), "{dev}: {link}");
    }
}
