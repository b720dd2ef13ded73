//! Prometheus metrics: the agent's, the helpers every command creates its
//! metrics with, and the `/metrics` server.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every metric the agent exports. Names follow Prometheus conventions:
/// `flowexport_` prefix, `_total` for counters, base units (bytes, seconds).
#[derive(Clone)]
pub(crate) struct AgentMetrics {
    pub registry: Registry,
    pub packets: IntCounterVec,
    pub bytes: IntCounterVec,
    pub flows_exported: IntCounter,
    pub drains: IntCounter,
    pub drain_duration: Histogram,
    pub table_entries: IntGauge,
    pub cache_entries: IntGauge,
    pub table_capacity: IntGauge,
    pub flows_active: IntGauge,
    pub table_slots: IntGauge,
    pub kernel_memory: IntGaugeVec,
    pub drains_idle: IntCounter,
    pub flows_retired: IntCounter,
    pub fallback_packets: IntCounter,
    pub fallback_contended: IntCounter,
    pub replayed_records: IntCounter,
    pub overflow_packets: IntCounter,
    pub non_ip_packets: IntCounterVec,
    pub malformed_packets: IntCounterVec,
    pub filtered_packets: IntCounterVec,
    pub interfaces_attached: IntGauge,
    pub interface_events: IntCounterVec,
    pub interface_attach_failures: IntCounterVec,
    pub sink_errors: IntCounterVec,
}

// Creating and registering a metric, for every command's metrics. A
// metric's name and labels are constants of the program: an invalid or
// duplicate one is a bug, hence the panics.

/// An integer counter with labels, registered in `r`.
pub(crate) fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

/// An integer counter, registered in `r`.
/// `flowexport_sink_errors_total`, which [`Fanout`](crate::sink::Fanout)
/// counts, for every command that sends records to sinks.
pub(crate) fn sink_errors(r: &Registry) -> IntCounterVec {
    counter_vec(
        r,
        "flowexport_sink_errors_total",
        "Batches a sink failed to deliver, by sink.",
        &["sink"],
    )
}

pub(crate) fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help))
}

/// A float counter (seconds), registered in `r`.
pub(crate) fn float_counter(r: &Registry, name: &str, help: &str) -> Counter {
    register(r, Counter::new(name, help))
}

/// An integer gauge with labels, registered in `r`.
pub(crate) fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

/// An integer gauge, registered in `r`.
pub(crate) fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help))
}

fn register<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: prometheus::Result<M>,
) -> M {
    let m = m.expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

impl AgentMetrics {
    pub(crate) fn new() -> AgentMetrics {
        let r = Registry::new();
        let drain_duration = Histogram::with_opts(
            HistogramOpts::new(
                "flowexport_drain_duration_seconds",
                "Time one drain of the kernel's counters took (flip, grace period, cache fold, \
                 table walk, exports); drains skipped for lack of traffic are not observed.",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0, 2.0,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(drain_duration.clone()))
            .expect("unique metric");
        AgentMetrics {
            packets: counter_vec(
                &r,
                "flowexport_packets_total",
                "IP packets counted into flows, by direction (ingress/egress).",
                &["direction"],
            ),
            bytes: counter_vec(
                &r,
                "flowexport_bytes_total",
                "IP-layer bytes counted into flows, by direction.",
                &["direction"],
            ),
            flows_exported: counter(
                &r,
                "flowexport_flows_exported_total",
                "Flow records handed to the sinks.",
            ),
            drains: counter(
                &r,
                "flowexport_drains_total",
                "Drain cycles (every --drain-interval), including those skipped for lack of traffic.",
            ),
            drains_idle: counter(
                &r,
                "flowexport_drains_idle_total",
                "Drain cycles skipped: no packet since the last drain and no timeout due.",
            ),
            flows_retired: counter(
                &r,
                "flowexport_flows_retired_total",
                "Idle flows whose table slot was freed.",
            ),
            drain_duration,
            table_entries: gauge(
                &r,
                "flowexport_flow_table_entries",
                "Flows in the kernel flow table after the last drain (slots in use).",
            ),
            cache_entries: gauge(
                &r,
                "flowexport_flow_cache_entries",
                "Flows the last drain found in the per-CPU flow cache (one per CPU slot).",
            ),
            table_capacity: gauge(
                &r,
                "flowexport_flow_table_capacity",
                "Capacity of the kernel flow table in concurrent flows (--max-flows).",
            ),
            table_slots: gauge(
                &r,
                "flowexport_flow_table_slots",
                "Slots of the kernel flow table (2 x --max-flows, rounded up to a power of two).",
            ),
            kernel_memory: gauge_vec(
                &r,
                "flowexport_kernel_memory_bytes",
                "Kernel memory of the agent's eBPF maps, by map (table: the shared flow table, \
                 grows with --max-flows; cache: the per-CPU flow cache, grows with --cache-slots \
                 and the CPU count; ring: --fallback-ring-bytes; misses: the ring of packets \
                 that missed their cache slot, 16 MiB; other: locks, stats, control).",
                &["map"],
            ),
            flows_active: gauge(
                &r,
                "flowexport_flows_active",
                "Flows waiting for their idle/active timeout: in the kernel table, plus those \
                 held in userspace after taking the fallback ring.",
            ),
            fallback_packets: counter(
                &r,
                "flowexport_table_full_fallback_packets_total",
                "Packets of flows without a slot in the kernel flow table (no free slot within \
                 reach: raise --max-flows), which went through the fallback ring.",
            ),
            fallback_contended: counter(
                &r,
                "flowexport_table_insert_contended_packets_total",
                "Of the fallback packets, those whose flow's insert lock stayed busy.",
            ),
            replayed_records: counter(
                &r,
                "flowexport_replayed_records_total",
                "Packets that missed their per-CPU cache slot (another flow held it), counted in \
                 the kernel flow table by the agent's drain thread instead of by the receiving \
                 CPU (the MISSES ring).",
            ),
            overflow_packets: counter(
                &r,
                "flowexport_fallback_overflow_packets_total",
                "Packets that found the flow table and the fallback ring full; exported as overflow records without addresses.",
            ),
            non_ip_packets: counter_vec(
                &r,
                "flowexport_non_ip_packets_total",
                "Frames that were not IPv4/IPv6 (ARP, LLDP, ...), by direction; not flows.",
                &["direction"],
            ),
            malformed_packets: counter_vec(
                &r,
                "flowexport_malformed_packets_total",
                "IP packets whose headers were cut short, by direction; not flows.",
                &["direction"],
            ),
            filtered_packets: counter_vec(
                &r,
                "flowexport_filtered_packets_total",
                "Packets a --filter rule left out (they form no flow), by direction.",
                &["direction"],
            ),
            interfaces_attached: gauge(
                &r,
                "flowexport_interfaces_attached",
                "Interfaces the programs are attached to.",
            ),
            interface_events: counter_vec(
                &r,
                "flowexport_interface_events_total",
                "Interfaces attached to (a --iface glob's match appeared, or was there at start) \
                 and detached from (it went away), by event.",
                &["event"],
            ),
            interface_attach_failures: counter_vec(
                &r,
                "flowexport_interface_attach_failures_total",
                "Interfaces a --iface glob matched that could not be attached to (e.g. another \
                 XDP program is there), by interface; they are skipped.",
                &["iface"],
            ),
            sink_errors: sink_errors(&r),
            registry: r,
        }
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A registry in the Prometheus text format.
pub(crate) fn render_registry(r: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&r.gather(), &mut buf)
        .expect("text encoding of metrics");
    String::from_utf8(buf).expect("metrics are UTF-8")
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let resp = if req.uri().path() == "/metrics" {
        Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(render())))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from("not found: try /metrics\n")))
    };
    Ok(resp.expect("valid response"))
}

/// Binds `addr` now (so a bad address fails at start) and serves `/metrics`
/// until the runtime shuts down.
pub(crate) async fn serve(
    addr: SocketAddr,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let svc = hyper::service::service_fn(move |req| handle(req, render.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    }))
}
