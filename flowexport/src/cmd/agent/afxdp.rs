//! `flowexport agent --capture afxdp --mirror`: the AF_XDP capture source
//! (`capture::afxdp`) with the agent's timeouts, records and sinks. The
//! flows live in the agent's memory (nothing is pinned): at exit it
//! detaches the program, reads what the sockets still hold and exports
//! everything.

use std::time::Instant;

use anyhow::Result;
use prometheus::{IntCounter, IntCounterVec};

use super::config::AgentConfig;
use super::{Batches, EXPORT_BATCH};
use crate::capture::afxdp::xsk::XskStats;
use crate::capture::afxdp::{AfXdp, XskKey};
use crate::capture::aggregator::Timeouts;
use crate::capture::flow::{to_record, FlowCounters, RecordContext};
use crate::capture::loader::{Capture, LoadOptions, Programs};
use crate::metrics::AgentMetrics;
use crate::record::FlowRecord;
use crate::sink::stdout::OnBrokenPipe;
use crate::sink::Fanout;
use crate::timeconv::{wall_ns, ClockOffset};

/// The AF_XDP metrics (registered only in this mode).
struct Metrics {
    /// Frames the kernel could not hand to a socket, by reason.
    dropped: IntCounterVec,
    /// Frames the program found no socket for.
    no_socket: IntCounter,
    /// Times the kernel found the fill ring empty (those frames are in
    /// `rx_dropped`).
    fill_ring_empty: IntCounterVec,
}

/// The kernel's counts at the last look, per socket, and the missed
/// frames: the metrics add what changed.
struct Seen {
    stats: Vec<XskStats>,
    missed: u64,
    counted: [u64; 4],
}

/// What one drain hands to the sinks: every due flow (all if `force`).
fn export(
    capture: &AfXdp,
    cfg: &AgentConfig,
    timeouts: Timeouts,
    force: bool,
    sinks: &mut Fanout,
    metrics: &AgentMetrics,
) -> usize {
    let ctx = RecordContext {
        sampler_address: cfg.sampler_address,
        sampling_rate: 0,
        clock: ClockOffset::now(),
        time_received_ns: wall_ns(),
    };
    let now = crate::timeconv::monotonic_ns();
    // Taken out under the lock, turned into records and sent without it (the
    // workers go on counting), in batches of EXPORT_BATCH records: at exit
    // the whole table at once (nothing is copied), otherwise the due flows'
    // keys and counters (128 bytes each; a million flows that fall idle
    // together are 128 MB, not a million records).
    let mut due: Vec<(XskKey, FlowCounters)> = Vec::new();
    let (all, active) = {
        let mut flows = capture.flows.lock().expect("flow table lock");
        if force {
            (Some(flows.take_all()), 0)
        } else {
            flows.expire(now, timeouts, false, &mut |k, c| due.push((*k, *c)));
            (None, flows.len())
        }
    };
    let mut batch: Vec<FlowRecord> = Vec::with_capacity(EXPORT_BATCH);
    let mut out = Batches::new(&mut batch, sinks, metrics);
    for (k, c) in all.into_iter().flatten().chain(due) {
        let mut r = to_record(&k.flow, &c, &ctx);
        if let Some(t) = k.tunnel {
            r.tunnel_type = Some(t.kind);
            r.tunnel_id = t.id;
            r.outer_src_addr = Some(t.outer_src);
            r.outer_dst_addr = Some(t.outer_dst);
        }
        out.push(r);
    }
    out.flush();
    metrics.flows_active.set(active as i64);
    out.sent
}

fn update_metrics(
    capture: &AfXdp,
    programs: &Programs,
    seen: &mut Seen,
    m: &Metrics,
    metrics: &AgentMetrics,
) {
    for (s, last) in capture.sockets.iter().zip(seen.stats.iter_mut()) {
        let Ok(now) = s.stats() else { continue };
        let q = s.queue.to_string();
        for (reason, n, before) in [
            ("rx_dropped", now.rx_dropped, last.rx_dropped),
            ("rx_ring_full", now.rx_ring_full, last.rx_ring_full),
            (
                "rx_invalid_descs",
                now.rx_invalid_descs,
                last.rx_invalid_descs,
            ),
        ] {
            m.dropped
                .with_label_values(&[&s.iface, &q, reason])
                .inc_by(n.saturating_sub(before));
        }
        m.fill_ring_empty.with_label_values(&[&s.iface, &q]).inc_by(
            now.rx_fill_ring_empty_descs
                .saturating_sub(last.rx_fill_ring_empty_descs),
        );
        *last = now;
    }
    let missed = AfXdp::missed(programs);
    m.no_socket.inc_by(missed.saturating_sub(seen.missed));
    seen.missed = missed;
    let c = &capture.counted;
    let now = [
        c.packets.load(std::sync::atomic::Ordering::Relaxed),
        c.bytes.load(std::sync::atomic::Ordering::Relaxed),
        c.non_ip.load(std::sync::atomic::Ordering::Relaxed),
        c.malformed.load(std::sync::atomic::Ordering::Relaxed),
    ];
    let d = |i: usize| now[i] - seen.counted[i];
    metrics.packets.with_label_values(&["ingress"]).inc_by(d(0));
    metrics.bytes.with_label_values(&["ingress"]).inc_by(d(1));
    metrics
        .non_ip_packets
        .with_label_values(&["ingress"])
        .inc_by(d(2));
    metrics
        .malformed_packets
        .with_label_values(&["ingress"])
        .inc_by(d(3));
    seen.counted = now;
}

/// Runs the AF_XDP agent until SIGINT/SIGTERM.
pub(super) fn run(
    cfg: AgentConfig,
    metrics: AgentMetrics,
    mut sinks: Fanout,
    stdout_closed: &OnBrokenPipe,
) -> Result<()> {
    debug_assert_eq!(cfg.capture, Capture::Afxdp);
    super::raise_memlock();
    // The flow table of the kernel paths is not used: the smallest one.
    let mut programs = Programs::load(&LoadOptions {
        pins: None,
        max_flows: 1,
        fallback_ring_bytes: 4096,
        cache_slots: 0,
        object: cfg.bpf_object.clone(),
        capture: Capture::Afxdp,
        sampling: 1,
        filter: crate::capture::filter::compile(&[])?,
        mirror: true,
    })?;
    let mut capture = AfXdp::start(&mut programs, &cfg.ifaces, &cfg.afxdp, cfg.xdp_mode)?;
    metrics
        .interfaces_attached
        .set(programs.attached_ifaces().len() as i64);
    let m = Metrics {
        dropped: crate::metrics::counter_vec(
            &metrics.registry,
            "flowexport_afxdp_dropped_packets_total",
            "Frames of the capture interface the kernel could not hand to the agent's AF_XDP \
             socket, by interface, RX queue and reason: rx_dropped (no free frame in the fill \
             ring, or a frame longer than 4 KiB), rx_ring_full (the RX ring was full: the \
             worker fell behind), rx_invalid_descs.",
            &["iface", "queue", "reason"],
        ),
        no_socket: crate::metrics::counter(
            &metrics.registry,
            "flowexport_afxdp_no_socket_packets_total",
            "Frames dropped because no AF_XDP socket serves their RX queue (see --afxdp-queues).",
        ),
        fill_ring_empty: crate::metrics::counter_vec(
            &metrics.registry,
            "flowexport_afxdp_fill_ring_empty_total",
            "Times a frame arrived while the socket's fill ring was empty (XDP_STATISTICS \
             rx_fill_ring_empty_descs; those frames are counted in rx_dropped): the worker \
             returned frames too slowly, raise --afxdp-frames.",
            &["iface", "queue"],
        ),
    };
    let mut seen = Seen {
        stats: capture
            .sockets
            .iter()
            .map(|s| s.stats().unwrap_or_default())
            .collect(),
        missed: 0,
        counted: [0; 4],
    };
    let runtime =
        crate::runtime::start(cfg.metrics_addr, &metrics.registry, false, "shutting down")?;
    stdout_closed.set(runtime.stopper("stdout has no reader any more"));
    log::info!(
        "flowexport agent running on {} with AF_XDP ({} sockets; metrics on http://{}/metrics)",
        cfg.ifaces.join(","),
        capture.sockets.len(),
        cfg.metrics_addr
    );
    let timeouts = cfg.timeouts();
    let mut next = Instant::now() + cfg.drain_interval;
    while !runtime.stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(
            next.saturating_duration_since(Instant::now())
                .min(std::time::Duration::from_millis(100)),
        );
        if Instant::now() >= next {
            let started = Instant::now();
            export(&capture, &cfg, timeouts, false, &mut sinks, &metrics);
            update_metrics(&capture, &programs, &mut seen, &m, &metrics);
            metrics.drains.inc();
            metrics
                .drain_duration
                .observe(started.elapsed().as_secs_f64());
            next = Instant::now() + cfg.drain_interval;
        }
    }
    // No new frames, then what the rings still hold, then everything.
    programs.detach_all();
    capture.stop();
    update_metrics(&capture, &programs, &mut seen, &m, &metrics);
    let n = export(&capture, &cfg, timeouts, true, &mut sinks, &metrics);
    sinks.flush();
    log::info!("detached; final drain exported {n} flows");
    runtime.runtime.shutdown_background();
    Ok(stdout_closed.result()?)
}
