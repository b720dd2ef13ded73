//! `flowexport agent`: load and attach the kernel programs, drain them on a
//! timer into flow records, hand the records to the sinks, serve metrics, and
//! on SIGINT/SIGTERM detach, drain one last time and flush.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use flowexport_common::{DIR_EGRESS, DIR_INGRESS};

use crate::capture::drain::{DrainReport, FlowAggregator, KernelStats, KernelTables, Timeouts};
use crate::capture::loader::{Capture, LoadOptions};
use crate::codec::export::ExportProtocol;
use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::record::{ExportContext, FlowRecord};
use crate::sink::kafka::KafkaSink;
use crate::sink::netflow::FlowExportSink;
use crate::sink::stdout::JsonLinesSink;
use crate::sink::Sink;
use crate::timeconv::{monotonic_ns, wall_ns, ClockOffset};

const DIRS: [(u8, &str); 2] = [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")];

/// Lets BPF maps be created on kernels that still charge them to
/// RLIMIT_MEMLOCK (before 5.11); harmless elsewhere.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit call with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The drain loop's state: kernel tables, userspace flows, sinks, metrics.
struct Drainer {
    tables: KernelTables,
    agg: FlowAggregator,
    timeouts: Timeouts,
    sinks: Vec<Box<dyn Sink>>,
    metrics: AgentMetrics,
    sampler_address: Option<std::net::IpAddr>,
    last_stats: KernelStats,
    due: Vec<(flowexport_common::FlowKey, crate::record::FlowCounters)>,
}

impl Drainer {
    fn update_metrics(&mut self, report: &DrainReport) -> Result<()> {
        let m = &self.metrics;
        for (dir, name) in DIRS {
            m.packets
                .with_label_values(&[name])
                .inc_by(report.packets[dir as usize]);
            m.bytes
                .with_label_values(&[name])
                .inc_by(report.bytes[dir as usize]);
        }
        m.table_entries.set(report.table_entries as i64);
        m.cache_entries.set(report.cache_entries as i64);
        m.overflow_packets.inc_by(report.overflow_packets);
        let stats = self.tables.stats()?;
        for (dir, name) in DIRS {
            m.non_ip_packets
                .with_label_values(&[name])
                .inc_by(stats.non_ip(dir) - self.last_stats.non_ip(dir));
            m.malformed_packets
                .with_label_values(&[name])
                .inc_by(stats.malformed(dir) - self.last_stats.malformed(dir));
        }
        m.fallback_packets
            .inc_by(stats.fallback_packets() - self.last_stats.fallback_packets());
        self.last_stats = stats;
        Ok(())
    }

    /// Drains the kernel, exports every flow that is due (all of them if
    /// `last`), and returns how many records went out.
    fn cycle(&mut self, last: bool) -> Result<usize> {
        let started = Instant::now();
        let report = self.tables.drain(&mut self.agg, last)?;
        self.metrics.drains.inc();
        self.update_metrics(&report)?;
        self.due.clear();
        self.agg
            .expire(monotonic_ns(), self.timeouts, last, &mut self.due);
        self.metrics.flows_active.set(self.agg.len() as i64);
        self.metrics
            .drain_duration
            .observe(started.elapsed().as_secs_f64());
        if self.due.is_empty() {
            return Ok(0);
        }
        let ctx = ExportContext {
            sampler_address: self.sampler_address,
            clock: ClockOffset::now(),
            time_received_ns: wall_ns(),
        };
        let records: Vec<FlowRecord> = self
            .due
            .iter()
            .map(|(k, c)| FlowRecord::from_kernel(k, c, &ctx))
            .collect();
        for sink in &mut self.sinks {
            if let Err(e) = sink.send(&records) {
                self.metrics
                    .sink_errors
                    .with_label_values(&[sink.name()])
                    .inc();
                log::error!("{} records not delivered: {e}", records.len());
            }
        }
        self.metrics.flows_exported.inc_by(records.len() as u64);
        Ok(records.len())
    }
}

/// The sinks the configuration asks for. Fails on bad sink settings (for
/// example an unknown `-X` property) before anything is attached.
fn build_sinks(cfg: &AgentConfig, metrics: &AgentMetrics) -> Result<Vec<Box<dyn Sink>>> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(k) = &cfg.kafka {
        sinks.push(Box::new(KafkaSink::new(k.clone(), &metrics.registry)?));
    }
    for (proto, targets) in [
        (ExportProtocol::Ipfix, &cfg.ipfix),
        (ExportProtocol::NetflowV9, &cfg.netflow9),
    ] {
        for t in targets {
            let sink = FlowExportSink::new(proto, *t, &cfg.export).map_err(anyhow::Error::msg)?;
            log::info!("exporting {} to {t}", sink.name());
            sinks.push(Box::new(sink));
        }
    }
    if cfg.stdout {
        sinks.push(Box::new(JsonLinesSink::stdout()));
    }
    Ok(sinks)
}

/// Runs the agent until SIGINT/SIGTERM.
pub fn run(cfg: AgentConfig) -> Result<()> {
    let metrics = AgentMetrics::new();
    let sinks = build_sinks(&cfg, &metrics)?;
    raise_memlock();
    let mut capture = Capture::load(&LoadOptions {
        max_flows: cfg.max_flows,
        fallback_ring_bytes: cfg.fallback_ring_bytes,
        cache_slots: cfg.cache_slots,
        object: cfg.bpf_object.clone(),
    })?;
    let tables = KernelTables::new(
        &mut capture.ebpf,
        cfg.max_flows,
        cfg.cache_slots,
        cfg.clock_resolution,
    )?;
    for iface in &cfg.ifaces {
        // On error `capture` is dropped, which detaches what was attached.
        let mode = capture.attach(iface, cfg.xdp_mode)?;
        log::info!("attached to {iface}: XDP ingress ({mode} mode), TC egress");
    }

    metrics.table_capacity.set(tables.capacity() as i64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let m2 = metrics.clone();
    runtime
        .block_on(crate::metrics::serve(
            cfg.metrics_addr,
            Arc::new(move || m2.render()),
        ))
        .with_context(|| {
            format!(
                "cannot serve metrics on {} (in use? choose another with --metrics-addr)",
                cfg.metrics_addr
            )
        })?;

    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let mut drainer = Drainer {
        tables,
        agg: FlowAggregator::default(),
        timeouts: Timeouts {
            idle_ns: cfg.idle_timeout.as_nanos() as u64,
            active_ns: cfg.active_timeout.as_nanos() as u64,
        },
        sinks,
        metrics,
        sampler_address: cfg.sampler_address,
        last_stats: KernelStats::default(),
        due: Vec::new(),
    };
    let interval = cfg.drain_interval;
    let drain_thread = std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || -> Result<()> {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(interval) {
                drainer.cycle(false)?;
            }
            // Shutdown: stop counting, wait out programs still running, then
            // take everything that is left and flush.
            capture.detach_all();
            let n = drainer.cycle(true)?;
            for sink in &mut drainer.sinks {
                if let Err(e) = sink.flush() {
                    log::error!("flushing {}: {e}", sink.name());
                }
            }
            log::info!("detached; final drain exported {n} flows");
            Ok(())
        })
        .context("spawning the drain thread")?;

    log::info!(
        "flowexport agent running on {} (metrics on http://{}/metrics)",
        cfg.ifaces.join(","),
        cfg.metrics_addr
    );
    let result = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let drain_done = tokio::task::spawn_blocking(move || drain_thread.join());
        tokio::pin!(drain_done);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => log::info!("SIGINT: shutting down"),
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
            r = &mut drain_done => {
                // The drain loop only ends on its own after an error.
                return match r {
                    Ok(Ok(Err(e))) => Err(e.context("drain failed")),
                    _ => Err(anyhow::anyhow!("drain thread ended unexpectedly")),
                };
            }
        }
        let _ = stop_tx.send(());
        match drain_done.await {
            Ok(Ok(r)) => r,
            _ => Err(anyhow::anyhow!("drain thread panicked")),
        }
    });
    runtime.shutdown_background();
    result
}
