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
use crate::record::FlowRecord;
use crate::sink::kafka::KafkaSink;
use crate::sink::stdout::QueuedJsonLines;
use crate::sink::{Fanout, Sink};
use crate::timeconv::wall_ns;

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
            sink_errors: vec(
                "flowexport_sink_errors_total",
                "Batches a sink failed to deliver, by sink.",
                &["sink"],
            ),
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

fn reuseport_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    let domain = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket/setsockopt/bind calls; the fd is owned by the
    // returned UdpSocket.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = UdpSocket::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEPORT, libc::SO_REUSEADDR] {
            if libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &one as *const _ as *const libc::c_void,
                size_of::<libc::c_int>() as u32,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        let rcvbuf: libc::c_int = 8 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &rcvbuf as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as u32,
        );
        let (sa, len) = sockaddr(addr);
        if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(sock)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the family's fields.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            (ss, size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            (ss, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
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
}

impl Worker {
    fn run(mut self) {
        let mut buf = vec![0u8; 65_536];
        let mut flows: Vec<FlowRecord> = Vec::with_capacity(64);
        while !self.stop.load(Ordering::Relaxed) {
            let (n, from) = match self.socket.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue;
                }
                Err(e) => {
                    log::error!("receiving: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let exporter = from.ip().to_canonical();
            let metrics = &self.metrics;
            self.packet_counters
                .entry(exporter)
                .or_insert_with(|| metrics.packets.with_label_values(&[&exporter.to_string()]))
                .inc();
            flows.clear();
            let now = wall_ns();
            let result = match self.protocol {
                Protocol::Netflow => self
                    .netflow
                    .decode(exporter, &buf[..n], now, &mut flows)
                    .map_err(|e| (e.reason(), e.to_string())),
                Protocol::Sflow => sflow::decode(exporter, &buf[..n], now, &mut flows)
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
            if flows.is_empty() {
                continue;
            }
            // One datagram carries one record type.
            self.metrics
                .flows
                .with_label_values(&[flows[0].flow_type.as_str()])
                .inc_by(flows.len() as u64);
            self.sinks.send(&flows);
        }
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
    let metrics = CollectMetrics::new();
    let kafka = args.kafka.resolve()?;
    let stdout = !args.discard && (args.stdout || kafka.is_none());
    let kafka = kafka
        .map(|k| KafkaSink::new(k, &metrics.registry))
        .transpose()?;
    // Formatted in the workers, written by a thread of its own: a slow
    // reader of stdout shows in the queue's metrics.
    let stdout = if stdout {
        Some(
            QueuedJsonLines::stdout(&metrics.registry)
                .context("starting the stdout writer thread")?,
        )
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Malformed input: at most one line per exporter and reason per 10 s.
    let errors = Arc::new(RateLimitedLog::default());
    let wait_ns = args
        .template_wait
        .unwrap_or(Duration::from_secs(60))
        .as_nanos() as u64;

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
            let socket = reuseport_socket(addr)
                .with_context(|| format!("cannot listen on udp {addr} (in use? permission?)"))?;
            socket.set_read_timeout(Some(Duration::from_millis(200)))?;
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
    Ok(())
}
