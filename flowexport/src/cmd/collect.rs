//! `flowexport collect`: receive NetFlow v5/v9, IPFIX (and sFlow v5) over
//! UDP, decode every flow into a [`FlowRecord`] and hand it to the sinks
//! (Kafka, or JSON lines on stdout).
//!
//! Scaling: each `--listen` address gets `--workers` UDP sockets bound with
//! SO_REUSEPORT, one thread each. The kernel spreads datagrams over the
//! sockets by a hash of the sender's address and port, so one exporter always
//! lands on the same worker (which keeps that exporter's templates), while
//! many exporters spread over all cores.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};

use crate::cmd::flags::{parse_duration, KafkaArgs};
use crate::codec::netflow::NetflowDecoder;
use crate::codec::sflow;
use crate::rate_limited_log::RateLimitedLog;
use crate::record::{FlowRecord, FlowType};
use crate::sink::kafka::KafkaSink;
use crate::sink::stdout::{OnBrokenPipe, QueuedJsonLines};
use crate::sink::{Fanout, Sink};
use crate::timeconv::wall_ns;

mod udp;
use udp::{
    parse_receive_buffer, receive_buffer, reuseport_socket, Datagrams, SocketDrops, RECEIVE_BUFFER,
};

#[derive(Args, Debug, Clone)]
pub struct CollectArgs {
    /// Receive NetFlow v5/v9 and IPFIX on this UDP address (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Receive sFlow v5 on this UDP address (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    pub sflow_listen: Vec<SocketAddr>,
    /// Sockets (and threads) per listen address, bound with SO_REUSEPORT.
    /// [default: number of CPUs]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// How long data may wait for its template before it is dropped
    /// (and counted). [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub template_wait: Option<Duration>,
    /// Receive buffer of each socket, in bytes (64 KiB to 1 GiB): datagrams
    /// wait there while their worker is busy, and what does not fit is
    /// dropped (flowexport_collector_socket_drops_total). Forced with
    /// CAP_NET_ADMIN, else capped by net.core.rmem_max (said at start).
    /// Memory is taken only while datagrams wait, up to this per socket.
    /// [default: 8388608, ~7,000 export packets of 1,400 bytes]
    #[arg(long, value_name = "BYTES", value_parser = parse_receive_buffer)]
    pub receive_buffer: Option<usize>,
    /// Prometheus endpoint address (serves /metrics). [default: 127.0.0.1:9591]
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9591")]
    pub metrics_addr: SocketAddr,
    /// Also print JSON lines on stdout when Kafka is configured (stdout is
    /// the sink when it is not).
    #[arg(long)]
    pub stdout: bool,
    /// Decode and count only, export nothing (dry runs, benchmarks).
    #[arg(long, conflicts_with_all = ["stdout", "kafka_brokers"])]
    pub discard: bool,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Collector metrics.
#[derive(Clone)]
pub struct CollectMetrics {
    pub registry: Registry,
    pub packets: IntCounterVec,
    pub flows: IntCounterVec,
    pub errors: IntCounterVec,
    pub templates: IntGauge,
    pub pending_expired: IntCounter,
    pub sflow_counter_samples: IntCounter,
    pub socket_drops: SocketDrops,
    pub sink_errors: IntCounterVec,
}

impl CollectMetrics {
    fn new() -> CollectMetrics {
        let r = Registry::new();
        let vec = |name: &str, help: &str, labels: &[&str]| {
            crate::metrics::counter_vec(&r, name, help, labels)
        };
        let templates = crate::metrics::gauge(
            &r,
            "flowexport_collector_templates",
            "NetFlow v9/IPFIX templates currently known (all workers).",
        );
        let counter = |name: &str, help: &str| crate::metrics::counter(&r, name, help);
        CollectMetrics {
            packets: vec(
                "flowexport_collector_packets_total",
                "Datagrams received, by exporter address.",
                &["exporter"],
            ),
            flows: vec(
                "flowexport_collector_flows_total",
                "Flow records decoded, by record type (NETFLOW_V5, NETFLOW_V9, IPFIX, SFLOW_5).",
                &["type"],
            ),
            errors: vec(
                "flowexport_collector_decode_errors_total",
                "Datagrams (or their rest) that could not be decoded, by exporter and reason.",
                &["exporter", "reason"],
            ),
            templates,
            pending_expired: counter(
                "flowexport_collector_template_wait_expired_total",
                "Data sets dropped because their template did not arrive within --template-wait.",
            ),
            sflow_counter_samples: counter(
                "flowexport_collector_sflow_counter_samples_total",
                "sFlow counter samples received (counted, not exported).",
            ),
            socket_drops: SocketDrops::new(&r),
            sink_errors: crate::metrics::sink_errors(&r),
            registry: r,
        }
    }
}

/// What a listening socket receives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// NetFlow v5/v9 and IPFIX (`--listen`).
    Netflow,
    /// sFlow v5 (`--sflow-listen`).
    Sflow,
}

struct Worker {
    socket: UdpSocket,
    protocol: Protocol,
    netflow: NetflowDecoder,
    metrics: CollectMetrics,
    /// This worker's own senders: into the stdout queue, and over the
    /// shared Kafka producer; no lock between workers.
    sinks: Fanout,
    errors: Arc<RateLimitedLog<(IpAddr, &'static str)>>,
    stop: Arc<AtomicBool>,
    templates_reported: i64,
    expired_reported: u64,
    /// Per-exporter packet counters, looked up once per exporter.
    packet_counters: HashMap<IpAddr, IntCounter>,
    /// Flow counters by record type, looked up once per type.
    flow_counters: Vec<(FlowType, IntCounter)>,
}

impl Worker {
    fn run(mut self) {
        let mut datagrams = Datagrams::new();
        let mut flows: Vec<FlowRecord> = Vec::with_capacity(64);
        while !self.stop.load(Ordering::Relaxed) {
            match datagrams.recv(&self.socket) {
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut
                        || e.kind() == std::io::ErrorKind::Interrupted =>
                {
                    continue;
                }
                Err(e) => {
                    log::error!("receiving: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            // The flows of all the datagrams go to the sinks as one batch.
            flows.clear();
            for (from, datagram) in datagrams.iter() {
                if let Some(exporter) = from {
                    self.decode(exporter.to_canonical(), datagram, &mut flows);
                }
            }
            if !flows.is_empty() {
                // Taken by the stdout queue, not copied (`Sink::take`).
                self.sinks.send(&mut flows);
            }
        }
    }

    /// Decodes one datagram from `exporter`, appending its flows to `flows`.
    fn decode(&mut self, exporter: IpAddr, datagram: &[u8], flows: &mut Vec<FlowRecord>) {
        let before = flows.len();
        let metrics = &self.metrics;
        self.packet_counters
            .entry(exporter)
            .or_insert_with(|| metrics.packets.with_label_values(&[&exporter.to_string()]))
            .inc();
        let now = wall_ns();
        let result = match self.protocol {
            Protocol::Netflow => self
                .netflow
                .decode(exporter, datagram, now, flows)
                .map_err(|e| (e.reason(), e.to_string())),
            Protocol::Sflow => sflow::decode(exporter, datagram, now, flows)
                .map(|counters| self.metrics.sflow_counter_samples.inc_by(counters))
                .map_err(|e| (e.reason(), e.to_string())),
        };
        if let Err((reason, msg)) = result {
            self.metrics
                .errors
                .with_label_values(&[&exporter.to_string(), reason])
                .inc();
            self.errors.warn_for((exporter, reason), || {
                format!("malformed packet from {exporter} ({reason}): {msg}")
            });
        }
        if self.protocol == Protocol::Netflow {
            let known = self.netflow.templates_known() as i64;
            self.metrics.templates.add(known - self.templates_reported);
            self.templates_reported = known;
            let expired = self.netflow.counters.pending_expired;
            self.metrics
                .pending_expired
                .inc_by(expired - self.expired_reported);
            self.expired_reported = expired;
        }
        // One datagram carries one record type.
        let Some(first) = flows.get(before) else {
            return;
        };
        let ty = first.flow_type;
        let counter = match self.flow_counters.iter().find(|(t, _)| *t == ty) {
            Some((_, c)) => c,
            None => {
                let c = metrics.flows.with_label_values(&[ty.as_str()]);
                self.flow_counters.push((ty, c));
                &self.flow_counters[self.flow_counters.len() - 1].1
            }
        };
        counter.inc_by((flows.len() - before) as u64);
    }
}

/// The worker threads: stopped and joined when dropped.
struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn run(args: CollectArgs) -> Result<()> {
    if args.listen.is_empty() && args.sflow_listen.is_empty() {
        bail!("nothing to listen on: give --listen ADDR:PORT and/or --sflow-listen ADDR:PORT");
    }
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    if workers == 0 || workers > 256 {
        bail!("--workers must be between 1 and 256");
    }
    let mut addrs: Vec<SocketAddr> = args.listen.clone();
    addrs.extend(&args.sflow_listen);
    for (i, a) in addrs.iter().enumerate() {
        if a.port() == 0 {
            bail!("udp {a}: give a port (port 0 would give each worker a port of its own)");
        }
        if addrs[..i].contains(a) {
            bail!(
                "udp {a} is given twice (--listen, --sflow-listen): an address takes one protocol, \
                 once"
            );
        }
        // Before any of our own sockets exist (0.0.0.0:P and [::]:P may
        // both be given).
        udp::ensure_free(*a).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                format!(
                    " (another program holds the port: `ss -ulpn 'sport = :{}'` shows which)",
                    a.port()
                )
            } else {
                String::new()
            };
            anyhow::anyhow!("cannot listen on udp {a}: {e}{hint}")
        })?;
    }
    let metrics = CollectMetrics::new();
    let kafka = args.kafka.resolve()?;
    let stdout = !args.discard && (args.stdout || kafka.is_none());
    let kafka = kafka
        .map(|k| KafkaSink::new(k, &metrics.registry))
        .transpose()?;
    // Formatted and written by a thread of its own, fed by the workers: a
    // slow reader of stdout shows in the queue's metrics.
    let stdout_closed = OnBrokenPipe::default();
    let stdout = if stdout {
        Some(
            QueuedJsonLines::stdout(&metrics.registry, stdout_closed.clone())
                .context("starting the stdout writer thread")?,
        )
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Malformed input: at most one line per exporter and reason per 10 s.
    let errors = Arc::new(RateLimitedLog::with_target(module_path!()));
    let wait_ns = args
        .template_wait
        .unwrap_or(Duration::from_secs(60))
        .as_nanos() as u64;
    let rcvbuf = args.receive_buffer.unwrap_or(RECEIVE_BUFFER);

    // Declared after `stdout`, so dropped before it: on any early return
    // the workers stop (and stop sending) before the stdout writer ends.
    let mut running = Workers {
        stop: stop.clone(),
        threads: Vec::new(),
    };
    let listeners = args
        .listen
        .iter()
        .map(|a| (*a, Protocol::Netflow))
        .chain(args.sflow_listen.iter().map(|a| (*a, Protocol::Sflow)));
    for (addr, protocol) in listeners {
        for i in 0..workers {
            let socket = reuseport_socket(addr, rcvbuf)
                .with_context(|| format!("cannot listen on udp {addr} (in use? permission?)"))?;
            socket.set_read_timeout(Some(Duration::from_millis(200)))?;
            metrics
                .socket_drops
                .watch(addr, &socket)
                .context("duplicating a socket's descriptor for its drop count")?;
            if i == 0 {
                let got = receive_buffer(&socket).context("reading SO_RCVBUF")?;
                if got < rcvbuf {
                    log::warn!(
                        "udp {addr}: receive buffers of {} KiB, not the {} KiB asked for \
                         (net.core.rmem_max caps them without CAP_NET_ADMIN): they hold \
                         fewer datagrams while a worker is busy, and what does not fit is \
                         dropped (counted in flowexport_collector_socket_drops_total); \
                         raise the cap with `sysctl -w net.core.rmem_max={rcvbuf}`",
                        got >> 10,
                        rcvbuf >> 10
                    );
                }
            }
            let w = Worker {
                socket,
                protocol,
                netflow: NetflowDecoder::new(wait_ns, 4 << 20),
                metrics: metrics.clone(),
                sinks: {
                    let mut own: Vec<Box<dyn Sink>> = Vec::new();
                    if let Some(k) = &kafka {
                        own.push(Box::new(k.handle()));
                    }
                    if let Some(s) = &stdout {
                        own.push(Box::new(s.handle()));
                    }
                    Fanout::new(own, metrics.sink_errors.clone())
                },
                errors: errors.clone(),
                stop: stop.clone(),
                templates_reported: 0,
                expired_reported: 0,
                packet_counters: HashMap::new(),
                flow_counters: Vec::new(),
            };
            running.threads.push(
                std::thread::Builder::new()
                    .name(format!("collect-{}-{i}", addr.port()))
                    .spawn(move || w.run())?,
            );
        }
        log::info!(
            "listening for {} on udp {addr} ({workers} workers)",
            if protocol == Protocol::Sflow {
                "sFlow v5"
            } else {
                "NetFlow v5/v9/IPFIX"
            }
        );
    }

    let runtime =
        crate::runtime::start(args.metrics_addr, &metrics.registry, false, "shutting down")?;
    log::info!(
        "flowexport collector running (metrics on http://{}/metrics)",
        args.metrics_addr
    );
    // A reader of stdout that went away (`collect | head`) ends the
    // collector as SIGTERM would: the convention of a pipeline's writer.
    stdout_closed.set(runtime.stopper("stdout has no reader any more"));
    runtime.wait_for_stop();
    drop(running);
    // The workers' handles are gone; flush the sinks they shared.
    let mut last: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(k) = kafka {
        last.push(Box::new(k));
    }
    if let Some(s) = stdout {
        last.push(Box::new(s));
    }
    let mut last = Fanout::new(last, metrics.sink_errors.clone());
    last.flush();
    drop(last);
    runtime.runtime.shutdown_background();
    Ok(stdout_closed.result()?)
}
