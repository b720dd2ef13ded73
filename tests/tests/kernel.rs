//! The kernel programs run in process with BPF_PROG_TEST_RUN (no interface,
//! no agent): frame layouts that veth pairs cannot produce.
//!
//! Needs root (CI runs as root).

use std::collections::HashMap;
use std::time::Duration;

use aya::programs::{TestRun, TestRunOptions, Xdp};
use flowexport::capture::aggregator::{FlowAggregator, Timeouts};
use flowexport::capture::drain::{KernelTables, Start};
use flowexport::capture::filter::KernelFilter;
use flowexport::capture::loader::{Capture, LoadOptions, Programs};
use flowexport::capture::table::slots_for;
use flowexport_common::{FlowKey, DEFAULT_CACHE_SLOTS, PROG_INGRESS};
use flowexport_tests::frames::*;

/// The XDP programs loaded, unpinned and not attached, with `cache_slots`
/// per generation and a table for `max_flows`, and the agent's drain
/// state over them.
fn load(max_flows: u32, cache_slots: u32) -> (Programs, KernelTables) {
    let mut cap = Programs::load(&LoadOptions {
        pins: None,
        max_flows,
        fallback_ring_bytes: 1 << 16,
        cache_slots,
        object: None,
        capture: Capture::Xdp,
        sampling: 1,
        filter: KernelFilter::default(),
        mirror: false,
    })
    .unwrap();
    let tables = KernelTables::new(
        &mut cap.ebpf,
        max_flows,
        slots_for(max_flows),
        cache_slots,
        1 << 16,
        Duration::from_millis(1),
        Start::Fresh,
    )
    .unwrap();
    (cap, tables)
}

/// A multi-buffer frame whose first buffer holds only its Ethernet header
/// (BPF_PROG_TEST_RUN puts the rest in fragments when the context's
/// `data_end` says so): the XDP program reads the IP and UDP headers with
/// bpf_xdp_load_bytes and counts the flow as for any other frame.
#[test]
fn xdp_reads_headers_beyond_the_first_buffer() {
    let (cap, mut tables) = load(1024, DEFAULT_CACHE_SLOTS);
    let frame = eth4("10.8.0.1", "10.8.0.2", &L4::udp(5555, 6666, 100));
    // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&14u32.to_ne_bytes());
    let prog: &Xdp = cap.ebpf.program(PROG_INGRESS).unwrap().try_into().unwrap();
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(&ctx),
            repeat: 3,
            ..TestRunOptions::default()
        })
        .unwrap();
    assert_eq!(r.return_value, 2, "XDP_PASS");
    let mut got: HashMap<FlowKey, (u64, u64)> = HashMap::new();
    let t = Timeouts {
        idle_ns: u64::MAX,
        active_ns: u64::MAX,
    };
    tables
        .drain(&mut FlowAggregator::default(), t, true, &mut |k, c| {
            let e = got.entry(*k).or_default();
            e.0 += c.packets;
            e.1 += c.bytes;
        })
        .unwrap();
    let flows: Vec<_> = got.iter().collect();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let (k, &(packets, bytes)) = flows[0];
    assert_eq!((k.proto, k.src_port, k.dst_port), (17, 5555, 6666), "{k:?}");
    assert_eq!(&k.src_addr[..4], &[10, 8, 0, 1]);
    assert_eq!((packets, bytes), (3, 3 * 128));
}

/// Packets whose per-CPU cache slot another flow holds go to the MISSES
/// ring, and the drain thread counts them in the table with the replay
/// program: between drains (`replay_misses`) and at a drain, every flow's
/// count is exact, none through the fallback path.
#[test]
fn packets_that_miss_the_cache_are_counted_from_the_ring() {
    // One cache slot per generation: the first flow holds it, every other
    // flow's packets miss it. The cache is per CPU, and a test run runs on
    // the caller's: one CPU, so that one flow holds a slot.
    // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
    let (cap, mut tables) = load(4096, 1);
    let prog: &Xdp = cap.ebpf.program(PROG_INGRESS).unwrap().try_into().unwrap();
    const FLOWS: u16 = 1000;
    let send = |repeat: u32| {
        for i in 0..FLOWS {
            let frame = eth4("10.9.0.1", "10.9.0.2", &L4::udp(1000 + i, 53, 10));
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    repeat,
                    ..TestRunOptions::default()
                })
                .unwrap();
            assert_eq!(r.return_value, 2, "XDP_PASS");
        }
    };
    send(3);
    assert!(tables.misses_pending());
    // Flow 0 holds the cache slot; the others' 3 packets each are records.
    assert_eq!(tables.replay_misses().unwrap(), 3 * u64::from(FLOWS - 1));
    assert!(!tables.misses_pending());
    // More, left in the ring for the drain to count.
    send(2);
    assert!(tables.misses_pending());
    let mut got: HashMap<FlowKey, u64> = HashMap::new();
    let t = Timeouts {
        idle_ns: u64::MAX,
        active_ns: u64::MAX,
    };
    let report = tables
        .drain(&mut FlowAggregator::default(), t, true, &mut |k, c| {
            *got.entry(*k).or_default() += c.packets;
        })
        .unwrap();
    assert_eq!(report.replayed, 2 * u64::from(FLOWS - 1));
    assert_eq!(tables.stats().unwrap().fallback_packets(), 0);
    assert_eq!(got.len(), usize::from(FLOWS), "{got:?}");
    for (k, packets) in &got {
        assert_eq!(*packets, 5, "{k:?}");
        assert_eq!(k.dst_port, 53);
    }
    assert!(!tables.misses_pending());
}
