//! `flowexport agent`: load and attach the kernel programs, drain them on a
//! timer into flow records, hand the records to the sinks, serve metrics, and
//! on SIGINT/SIGTERM detach, drain one last time and flush.

mod afxdp;
pub mod config;

use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result};
use flowexport_common::{DIR_EGRESS, DIR_INGRESS};

use crate::capture::aggregator::{FlowAggregator, Timeouts};
use crate::capture::drain::{DrainReport, KernelStats, KernelTables, Start};
use crate::capture::flow::{to_record, RecordContext};
use crate::capture::interfaces::{self, Link, LinkEvent, LinkMonitor, Selection};
use crate::capture::loader::{Capture, LoadOptions, Programs, XdpModeChoice};
use crate::capture::pins::{Layout, PinDir};
use crate::codec::netflow::encode::ExportProtocol;
use crate::metrics::AgentMetrics;
use crate::record::FlowRecord;
use crate::sink::ipfix::IpfixSink;
use crate::sink::kafka::KafkaSink;
use crate::sink::stdout::{JsonLinesSink, OnBrokenPipe};
use crate::sink::{Fanout, Sink};
use crate::timeconv::{wall_ns, ClockOffset};
use config::AgentConfig;

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

/// Records handed to the sinks per call: a drain that exports a million
/// flows builds and sends them in batches of this many, not all at once.
pub(super) const EXPORT_BATCH: usize = 4096;

/// A drain's records on their way to the sinks, [`EXPORT_BATCH`] at a
/// time (both capture modes): counts them in
/// `flowexport_flows_exported_total` and the time spent in the sinks.
pub(super) struct Batches<'a> {
    batch: &'a mut Vec<FlowRecord>,
    sinks: &'a mut Fanout,
    exported: &'a prometheus::IntCounter,
    /// Records sent so far.
    pub(super) sent: usize,
    /// Time spent in the sinks, apart from the drain's own work.
    pub(super) in_sinks: std::time::Duration,
}

impl<'a> Batches<'a> {
    /// `batch` is the buffer (empty) the records gather in.
    pub(super) fn new(
        batch: &'a mut Vec<FlowRecord>,
        sinks: &'a mut Fanout,
        metrics: &'a AgentMetrics,
    ) -> Batches<'a> {
        Batches {
            batch,
            sinks,
            exported: &metrics.flows_exported,
            sent: 0,
            in_sinks: std::time::Duration::ZERO,
        }
    }

    pub(super) fn push(&mut self, record: FlowRecord) {
        self.batch.push(record);
        if self.batch.len() == EXPORT_BATCH {
            self.flush();
        }
    }

    /// Sends what is gathered (call it at the end of a drain).
    pub(super) fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let t = Instant::now();
        let n = self.batch.len();
        self.sinks.send(self.batch);
        self.exported.inc_by(n as u64);
        self.sent += n;
        self.in_sinks += t.elapsed();
    }
}

/// How often, at most, the log says that flows found the table full.
const TABLE_FULL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// How often the drain thread counts the packets that missed their cache
/// slot while they come (capture::replay): the `MISSES` ring (16 MiB, ~190k
/// records) then holds 10 ms of 19M misses a second, and a drain finds
/// little left to count before it flips.
const REPLAY_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// The longest the drain thread waits between looks at the `MISSES` ring
/// while traffic flows but no misses come (the wait doubles from
/// `REPLAY_EVERY` up to this): a burst of new flows is found within 100 ms,
/// before the ring fills at 1.9M misses a second. Without traffic (the
/// clock word at rest) it waits for the next drain: an idle agent wakes no
/// more often than before.
const REPLAY_IDLE_MAX: std::time::Duration = std::time::Duration::from_millis(100);

/// What the drain thread is told between drains.
enum Msg {
    /// SIGINT/SIGTERM (or `--detach`): the last drain, then exit.
    Stop,
    /// A link notification (with `--iface` globs).
    Link(LinkEvent),
    /// Link notifications were lost (the socket overran): list again.
    Relist,
}

/// The interfaces `--iface` globs match: attached when they appear (or at
/// start), forgotten when they go. Their flows stay in the table and are
/// exported on their timeouts like any other. Keyed by ifindex: a name can
/// go and come back as another interface, and an interface can be renamed.
struct Hotplug {
    selection: Selection,
    mode: XdpModeChoice,
    /// Attached through a glob: ifindex -> name.
    attached: std::collections::HashMap<u32, String>,
    /// Whose attach failed (not retried while the interface lives).
    failed: std::collections::HashSet<u32>,
    metrics: AgentMetrics,
}

impl Hotplug {
    fn handle(&mut self, capture: &mut Programs, ev: LinkEvent) {
        match ev {
            LinkEvent::Present(link) => self.present(capture, &link),
            LinkEvent::Gone(link) => self.gone(capture, link.index),
        }
        self.metrics
            .interfaces_attached
            .set(capture.attached_ifaces().len() as i64);
    }

    fn present(&mut self, capture: &mut Programs, link: &Link) {
        match self.attached.get(&link.index) {
            Some(name) if *name == link.name => return,
            // Renamed: its attachments (and pins) carry the old name; the
            // new name may not match any more.
            Some(_) => self.gone(capture, link.index),
            None => {}
        }
        // The name may still be held by an interface that went away
        // unheard (notifications lost): it is gone.
        let stale: Vec<u32> = self
            .attached
            .iter()
            .filter(|(_, n)| **n == link.name)
            .map(|(i, _)| *i)
            .collect();
        for i in stale {
            self.gone(capture, i);
        }
        if !self.selection.glob_matches(link) || self.failed.contains(&link.index) {
            return;
        }
        match capture.attach(&link.name, self.mode) {
            Ok(how) => {
                log::info!("attached to {} (matches --iface): {how}", link.name);
                self.attached.insert(link.index, link.name.clone());
                self.metrics
                    .interface_events
                    .with_label_values(&["attach"])
                    .inc();
            }
            Err(e) => {
                log::warn!("skipping {}: {e}", link.name);
                capture.forget(&link.name);
                self.failed.insert(link.index);
                self.metrics
                    .interface_attach_failures
                    .with_label_values(&[&link.name])
                    .inc();
            }
        }
    }

    fn gone(&mut self, capture: &mut Programs, index: u32) {
        self.failed.remove(&index);
        if let Some(name) = self.attached.remove(&index) {
            capture.forget(&name);
            log::info!("{name} went away: detached (its flows are exported as they time out)");
            self.metrics
                .interface_events
                .with_label_values(&["detach"])
                .inc();
        }
    }

    /// Reconciles with the interfaces present now.
    fn relist(&mut self, capture: &mut Programs) {
        match interfaces::present() {
            Ok(links) => {
                let known: Vec<u32> = self.attached.keys().copied().collect();
                for index in known {
                    if !links.iter().any(|l| l.index == index) {
                        self.gone(capture, index);
                    }
                }
                for link in links {
                    self.handle(capture, LinkEvent::Present(link));
                }
            }
            Err(e) => log::error!("listing interfaces: {e}"),
        }
    }
}

/// Forwards link notifications to the drain thread until it is gone.
fn watch_links(mut monitor: LinkMonitor, tx: mpsc::Sender<Msg>) {
    loop {
        let msgs = match monitor.wait() {
            Ok(events) => events.into_iter().map(Msg::Link).collect(),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                log::warn!("link notifications were lost (socket overrun): listing again");
                vec![Msg::Relist]
            }
            // A notification it could not read: list instead.
            Err(e) if e.raw_os_error().is_none() => {
                log::warn!("unreadable link notification ({e}): listing again");
                vec![Msg::Relist]
            }
            Err(e) => {
                log::error!("link notifications stopped: {e}; interfaces that appear from now on are not attached");
                return;
            }
        };
        for m in msgs {
            if tx.send(m).is_err() {
                return;
            }
        }
    }
}

/// The drain loop's state: kernel tables, fallback flows, sinks, metrics.
struct Drainer {
    tables: KernelTables,
    agg: FlowAggregator,
    timeouts: Timeouts,
    sinks: Fanout,
    metrics: AgentMetrics,
    sampler_address: Option<std::net::IpAddr>,
    /// The records' sampling_rate (see `RecordContext`).
    sampling_rate: u64,
    last_stats: KernelStats,
    /// Fallback packets since the last "table full" log line, and when that was.
    full_since_log: (u64, u64),
    full_logged: Option<Instant>,
    batch: Vec<FlowRecord>,
    /// When the last drain cycle ran (for the packet rate the clock uses).
    last_cycle: Instant,
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
        if !report.skipped {
            m.table_entries.set(report.table_entries as i64);
            m.cache_entries.set(report.cache_entries as i64);
            m.flows_active
                .set((report.table_entries + self.agg.len()) as i64);
        }
        m.overflow_packets.inc_by(report.overflow_packets);
        m.replayed_records.inc_by(report.replayed);
        m.flows_retired.inc_by(report.retired as u64);
        let stats = self.tables.stats()?;
        for (dir, name) in DIRS {
            m.non_ip_packets
                .with_label_values(&[name])
                .inc_by(stats.non_ip(dir) - self.last_stats.non_ip(dir));
            m.malformed_packets
                .with_label_values(&[name])
                .inc_by(stats.malformed(dir) - self.last_stats.malformed(dir));
            m.filtered_packets
                .with_label_values(&[name])
                .inc_by(stats.filtered(dir) - self.last_stats.filtered(dir));
        }
        let fallback = stats.fallback_packets() - self.last_stats.fallback_packets();
        let contended = stats.fallback_contended() - self.last_stats.fallback_contended();
        m.fallback_packets.inc_by(fallback);
        m.fallback_contended.inc_by(contended);
        self.last_stats = stats;
        self.full_since_log.0 += fallback;
        self.full_since_log.1 += contended;
        if self.full_since_log.0 > 0
            && self
                .full_logged
                .is_none_or(|t| t.elapsed() >= TABLE_FULL_LOG_EVERY)
        {
            let (n, busy) = self.full_since_log;
            let slots = self.tables.slots();
            let mib = crate::capture::table::table_bytes(slots) >> 20;
            log::warn!(
                "flow table full: {n} packets of flows without a table slot went through the \
                 fallback ring{} (still counted exactly, in their flows, while the ring keeps up). \
                 The table holds --max-flows {} concurrent flows ({slots} slots, {mib} MiB of \
                 kernel memory); raise --max-flows (each doubling adds {mib} MiB)",
                if busy > 0 {
                    format!(" ({busy} of them because the insert lock stayed busy)")
                } else {
                    String::new()
                },
                self.tables.capacity()
            );
            self.full_since_log = (0, 0);
            self.full_logged = Some(Instant::now());
        }
        Ok(())
    }

    /// Drains the kernel, exports every flow that is due (all of them if
    /// `last`) in batches, and returns how many records went out.
    fn cycle(&mut self, last: bool) -> Result<usize> {
        self.export(if last { Cycle::Final } else { Cycle::Periodic })
    }

    /// Counts the packets waiting in the `MISSES` ring (between drains):
    /// how many.
    fn replay(&mut self) -> Result<u64> {
        let n = self.tables.replay_misses()?;
        self.metrics.replayed_records.inc_by(n);
        Ok(n)
    }

    /// At a `--keep-attached` exit: exports what this agent holds in memory
    /// (the kernel's tables stay for the next agent).
    fn hand_over(&mut self) -> Result<usize> {
        self.export(Cycle::HandOver)
    }

    fn export(&mut self, kind: Cycle) -> Result<usize> {
        let started = Instant::now();
        let ctx = RecordContext {
            sampler_address: self.sampler_address,
            sampling_rate: self.sampling_rate,
            clock: ClockOffset::now(),
            time_received_ns: wall_ns(),
        };
        let Drainer {
            tables,
            agg,
            timeouts,
            sinks,
            metrics,
            batch,
            ..
        } = self;
        let mut out = Batches::new(batch, sinks, metrics);
        let mut emit = |k: &flowexport_common::FlowKey, c: &crate::capture::flow::FlowCounters| {
            out.push(to_record(k, c, &ctx));
        };
        let report = match kind {
            Cycle::Periodic => tables.drain(agg, *timeouts, false, &mut emit)?,
            Cycle::Final => tables.drain(agg, *timeouts, true, &mut emit)?,
            Cycle::HandOver => tables.hand_over(agg, *timeouts, &mut emit)?,
        };
        out.flush();
        let in_sinks = out.in_sinks;
        // The records are out: now the kernel's copies of their counts may
        // go (an agent killed before this re-exports them, never loses
        // them; see capture::drain).
        let committing = Instant::now();
        if !report.skipped && kind != Cycle::HandOver {
            tables.commit()?;
        }
        let in_commit = committing.elapsed();
        // The packet rate since the last cycle: the clock thread keeps the
        // programs' clock word only while that pays (capture::clock).
        let since = std::mem::replace(&mut self.last_cycle, Instant::now());
        let packets = report.packets[0] + report.packets[1];
        self.tables
            .clock()
            .set_rate((packets as f64 / since.elapsed().as_secs_f64().max(1e-3)) as u64);
        self.metrics.drains.inc();
        if report.skipped {
            self.metrics.drains_idle.inc();
        } else {
            let took = started.elapsed().as_secs_f64();
            self.metrics.drain_duration.observe(took);
            log::debug!(
                target: "flowexport::drain",
                "drain {:.3} ms: {} records, {} flows examined in {} regions, {} cache slots, \
                 {} flows in the table; {:.3} ms of it in the sinks, {:.3} ms in the commit",
                took * 1e3,
                report.exported,
                report.examined,
                report.regions_visited,
                report.cache_entries,
                report.table_entries,
                in_sinks.as_secs_f64() * 1e3,
                in_commit.as_secs_f64() * 1e3
            );
        }
        self.update_metrics(&report)?;
        Ok(report.exported)
    }
}

/// What a drain cycle does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cycle {
    /// Flows whose timeouts are due.
    Periodic,
    /// Everything (the programs are detached).
    Final,
    /// What left the kernel for this agent (`--keep-attached` exit).
    HandOver,
}

/// The sinks the configuration asks for. Fails on bad sink settings (for
/// example an unknown `-X` property) before anything is attached.
fn build_sinks(
    cfg: &AgentConfig,
    metrics: &AgentMetrics,
    stdout_closed: &OnBrokenPipe,
) -> Result<Fanout> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(k) = &cfg.kafka {
        sinks.push(Box::new(KafkaSink::new(k.clone(), &metrics.registry)?));
    }
    for (proto, targets) in [
        (ExportProtocol::Ipfix, &cfg.ipfix),
        (ExportProtocol::NetflowV9, &cfg.netflow9),
    ] {
        for t in targets {
            let sink = IpfixSink::new(proto, *t, &cfg.export)?;
            log::info!("exporting {} to {t}", sink.name());
            sinks.push(Box::new(sink));
        }
    }
    if cfg.stdout {
        sinks.push(Box::new(JsonLinesSink::stdout(stdout_closed.clone())));
    }
    Ok(Fanout::new(sinks, metrics.sink_errors.clone()))
}

/// Runs the agent until SIGINT/SIGTERM (with `--detach`: drains and
/// detaches the pinned state, then returns).
pub fn run(mut cfg: AgentConfig) -> Result<()> {
    if cfg.detach {
        // Nothing pinned: nothing to do, and nothing needed for it (no
        // capability, not even the directory: a package is removable on a
        // host where the agent never ran).
        let dir = cfg.pin_dir.as_deref().unwrap_or(Path::new(""));
        if !dir.join(flowexport_common::MAP_CONTROL).exists() {
            log::info!("nothing pinned in {}: nothing to detach", dir.display());
            return Ok(());
        }
    }
    let metrics = AgentMetrics::new();
    // A reader of stdout that goes away (`flowexport agent … | head`) stops
    // the agent as SIGTERM would, as a pipeline's writer does.
    let stdout_closed = OnBrokenPipe::default();
    let sinks = build_sinks(&cfg, &metrics, &stdout_closed)?;
    if cfg.capture == Capture::Afxdp && !cfg.detach {
        return afxdp::run(cfg, metrics, sinks, &stdout_closed);
    }
    raise_memlock();
    // Name a missing capability before touching the pin directory.
    crate::capture::privileges::require()?;
    let pins = match &cfg.pin_dir {
        Some(dir) => Some(PinDir::open(dir)?),
        None => None,
    };
    let start = match &pins {
        Some(p) if cfg.detach => {
            let Some(found) = p.layout()? else {
                log::info!(
                    "nothing pinned in {}: nothing to detach",
                    p.path().display()
                );
                p.clear();
                return Ok(());
            };
            // Adopt it whatever its sizes (the version must be ours).
            p.check(
                Some(found),
                &Layout {
                    version: flowexport_common::LAYOUT_VERSION,
                    ..found
                },
            )?;
            cfg.max_flows = found.slots / 2;
            cfg.cache_slots = found.cache_slots;
            cfg.fallback_ring_bytes = found.ring_bytes;
            cfg.ifaces.clear();
            log::info!("detaching the pinned state in {}", p.path().display());
            Start::Adopted
        }
        Some(p) => {
            let mut asked = Layout {
                version: flowexport_common::LAYOUT_VERSION,
                slots: crate::capture::table::slots_for(cfg.max_flows),
                cache_slots: cfg.cache_slots,
                ring_bytes: cfg.fallback_ring_bytes,
            };
            let found = p.layout()?;
            // The cache's default depends on the CPU count (and has
            // changed between versions): without --cache-slots, a pinned
            // state keeps the size it was made with.
            if let Some(found) = found.filter(|_| !cfg.cache_slots_given) {
                // (Another layout version is refused below, whatever it says.)
                if found.version == asked.version && found.cache_slots != asked.cache_slots {
                    log::info!(
                        "--cache-slots not given: the pinned state's {} cache slots are kept",
                        found.cache_slots
                    );
                    asked.cache_slots = found.cache_slots;
                    cfg.cache_slots = found.cache_slots;
                }
            }
            if p.check(found, &asked)? {
                log::info!("adopting the pinned state in {}", p.path().display());
                Start::Adopted
            } else {
                Start::Fresh
            }
        }
        None => Start::Fresh,
    };
    let slots = crate::capture::table::slots_for(cfg.max_flows);
    let load = LoadOptions {
        pins: pins.as_ref(),
        max_flows: cfg.max_flows,
        fallback_ring_bytes: cfg.fallback_ring_bytes,
        cache_slots: cfg.cache_slots,
        object: cfg.bpf_object.clone(),
        capture: cfg.capture,
        sampling: cfg.sampling,
        filter: crate::capture::filter::compile(&cfg.filters)?,
        mirror: cfg.mirror,
    };
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
    let kernel_memory = load.kernel_memory(cpus);
    let mut capture = Programs::load(&load)?;
    let tables = KernelTables::new(
        &mut capture.ebpf,
        cfg.max_flows,
        slots,
        cfg.cache_slots,
        cfg.fallback_ring_bytes,
        cfg.clock_resolution,
        start,
    )?;
    let selection = Selection::new(&cfg.ifaces, &cfg.exclude_ifaces);
    if selection.globs.is_empty() && !selection.excludes.is_empty() {
        log::warn!(
            "--exclude-iface {} has nothing to leave out: it applies to the matches of --iface \
             globs, and no --iface is a glob",
            selection.excludes.join(", ")
        );
    }
    for iface in &selection.names {
        // On error `capture` is dropped, which detaches what was attached
        // (pinned links stay for the next agent).
        let how = capture.attach(iface, cfg.xdp_mode)?;
        log::info!("attached to {iface}: {how}");
    }
    // Globs: subscribe to link notifications first, then take what is
    // there, so that no interface appears unseen in between.
    let (msg_tx, msg_rx) = mpsc::channel::<Msg>();
    let mut hotplug = Hotplug {
        selection: selection.clone(),
        mode: cfg.xdp_mode,
        attached: Default::default(),
        failed: Default::default(),
        metrics: metrics.clone(),
    };
    if !selection.globs.is_empty() {
        let monitor = LinkMonitor::open().context("subscribing to link notifications")?;
        for link in interfaces::present().context("listing interfaces")? {
            hotplug.handle(&mut capture, LinkEvent::Present(link));
        }
        if hotplug.attached.is_empty() {
            log::info!(
                "no interface matching {} is attached yet: attaching when one appears",
                selection.globs.join(", ")
            );
        }
        let tx = msg_tx.clone();
        std::thread::Builder::new()
            .name("links".into())
            .spawn(move || watch_links(monitor, tx))
            .context("spawning the link watcher")?;
    }
    metrics
        .interfaces_attached
        .set(capture.attached_ifaces().len() as i64);
    for gone in capture.detach_unused_pins() {
        log::info!("detached {gone}: that interface or hook is no longer asked for");
    }

    metrics.table_capacity.set(tables.capacity() as i64);
    metrics.table_slots.set(slots as i64);
    for (map, bytes) in kernel_memory {
        metrics
            .kernel_memory
            .with_label_values(&[map])
            .set(bytes as i64);
    }
    // Metrics and signals (not for --detach, which runs to its end).
    let runtime = if cfg.detach {
        None
    } else {
        Some(crate::runtime::start(
            cfg.metrics_addr,
            &metrics.registry,
            false,
            "shutting down",
        )?)
    };

    // The kernel's counters at start (an adopted state's are what earlier
    // agents counted): the metrics count from here.
    let start_stats = tables.stats().unwrap_or_default();
    let mut drainer = Drainer {
        tables,
        agg: FlowAggregator::default(),
        timeouts: cfg.timeouts(),
        sinks,
        metrics,
        sampler_address: cfg.sampler_address,
        sampling_rate: if cfg.sampling > 1 {
            cfg.sampling.into()
        } else {
            0
        },
        last_stats: start_stats,
        full_since_log: (0, 0),
        full_logged: None,
        batch: Vec::with_capacity(EXPORT_BATCH),
        last_cycle: Instant::now(),
    };
    let interval = cfg.drain_interval;
    let keep_attached = cfg.keep_attached;
    let pin_dir = cfg.pin_dir.clone();
    let drain_thread = std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || -> Result<()> {
            // Drains every `interval`; link events are handled in between,
            // and never hold a due drain back. In between, too, the packets
            // that missed their cache slot are counted (capture::replay):
            // every REPLAY_EVERY while some came, less often while none did.
            let mut next = Instant::now() + interval;
            let mut replay_wait = REPLAY_EVERY;
            loop {
                if Instant::now() >= next {
                    drainer.cycle(false)?;
                    next = Instant::now() + interval;
                }
                let wait = next
                    .saturating_duration_since(Instant::now())
                    .min(replay_wait);
                match msg_rx.recv_timeout(wait) {
                    Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Ok(Msg::Link(ev)) => hotplug.handle(&mut capture, ev),
                    Ok(Msg::Relist) => hotplug.relist(&mut capture),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        replay_wait = if drainer.replay()? > 0 {
                            REPLAY_EVERY
                        } else if drainer.tables.clock().ticking() {
                            (replay_wait * 2).min(REPLAY_IDLE_MAX)
                        } else {
                            interval
                        };
                    }
                }
            }
            if keep_attached {
                // Restart or upgrade: the programs go on counting into the
                // pinned maps, exports in progress are in PENDING; the next
                // agent takes it all over.
                let kept = capture.leave_attached();
                drainer.tables.rest_clock();
                let n = drainer.hand_over()?;
                if n > 0 {
                    log::info!("exported {n} flows held in memory (fallback and overflow)");
                }
                drainer.sinks.flush();
                log::info!(
                    "left {kept} links attached and the counts pinned in {} for the next agent",
                    pin_dir
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
                return Ok(());
            }
            // Shutdown: stop counting, wait out programs still running, then
            // take everything that is left and flush.
            capture.detach_all();
            let n = drainer.cycle(true)?;
            drainer.sinks.flush();
            if let Some(p) = &pins {
                p.clear();
            }
            log::info!("detached; final drain exported {n} flows");
            Ok(())
        })
        .context("spawning the drain thread")?;

    let Some(runtime) = runtime else {
        // --detach: the last drain, then the end.
        let _ = msg_tx.send(Msg::Stop);
        return match drain_thread.join() {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("drain thread panicked")),
        };
    };
    stdout_closed.set(runtime.stopper("stdout has no reader any more"));
    log::info!(
        "flowexport agent running on {} (metrics on http://{}/metrics)",
        cfg.ifaces.join(","),
        cfg.metrics_addr
    );
    let result = runtime.runtime.block_on(async {
        let drain_done = tokio::task::spawn_blocking(move || drain_thread.join());
        tokio::pin!(drain_done);
        tokio::select! {
            _ = runtime.stopped() => {}
            r = &mut drain_done => {
                // The drain loop only ends on its own after an error.
                return match r {
                    Ok(Ok(Err(e))) => Err(e.context("drain failed")),
                    _ => Err(anyhow::anyhow!("drain thread ended unexpectedly")),
                };
            }
        }
        let _ = msg_tx.send(Msg::Stop);
        match drain_done.await {
            Ok(Ok(r)) => r,
            _ => Err(anyhow::anyhow!("drain thread panicked")),
        }
    });
    runtime.runtime.shutdown_background();
    result?;
    Ok(stdout_closed.result()?)
}
