//! One measured run: a fresh veth pair between two namespaces, an exporter
//! on the receiving end, trafgen sending N flows from the other, and what it
//! cost and what came out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowexport_tests::trafgen::{self, Flows};
use flowexport_tests::{fetch_metrics, metric, v4, wait_until, Link};

use crate::exporters::{self, Kind, Output, Running, Usage};
use crate::procstat;

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcome {
    /// Frames that reached the receiving interface (sent minus veth drops).
    pub delivered: u64,
    pub elapsed: Duration,
    /// Packets of the generated flows the exporter reported, and how many
    /// flows had exactly their packets.
    pub reported: u64,
    pub flows_exact: u64,
    /// Userspace CPU of the exporter for the whole run (children, start-up
    /// and shutdown included), its CPU while it processed the traffic (from
    /// the first frame until it had caught up), and the system's softirq
    /// time during the traffic.
    pub usage: Usage,
    pub traffic_cpu: Duration,
    pub softirq: Duration,
    /// Agent only: anonymous RSS before stopping, kernel map memory, drain
    /// durations (s) and flows examined per periodic drain, and the final
    /// drain.
    pub rss_anon: u64,
    pub kernel_memory: u64,
    pub drains: Vec<(f64, u64, u64)>,
    pub final_drain: Option<(f64, u64)>,
    /// Datagrams the collector's socket dropped (NetFlow outputs).
    pub rcvbuf_drops: u64,
}

impl Outcome {
    pub(crate) fn pps(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
    pub(crate) fn accuracy(&self) -> f64 {
        if self.delivered == 0 {
            return 0.0;
        }
        self.reported as f64 / self.delivered as f64
    }
    /// CPU seconds per million delivered packets, for the whole run.
    pub(crate) fn cpu_per_mpkt(&self) -> f64 {
        self.usage.cpu.as_secs_f64() * 1e6 / self.delivered.max(1) as f64
    }
    /// The same, while processing the traffic only.
    pub(crate) fn traffic_cpu_per_mpkt(&self) -> f64 {
        self.traffic_cpu.as_secs_f64() * 1e6 / self.delivered.max(1) as f64
    }
    pub(crate) fn softirq_per_mpkt(&self) -> f64 {
        self.softirq.as_secs_f64() * 1e6 / self.delivered.max(1) as f64
    }
}

/// The generated flows of a run with `n` flows.
pub(crate) fn flows(n: u32) -> Flows {
    Flows::new(v4("10.64.0.0"), n, v4("10.201.200.1"))
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "fe-bench-{}-{}",
        std::process::id(),
        flowexport_tests::unique(name)
    ))
}

/// Sends `packets` frames of `n` flows (at `rate_pps`, or as fast as
/// possible) to `kind` and measures it. The agent writes JSON lines (or,
/// with `nfcapd`, NetFlow v9 like the others); the others NetFlow.
pub(crate) fn run(
    kind: &Kind,
    n: u32,
    packets: u64,
    rate_pps: Option<u64>,
    nfcapd: bool,
) -> Result<Outcome> {
    let link = Link::new()?;
    let dir = scratch("run");
    let result = run_in(&link, &dir, kind, n, packets, rate_pps, nfcapd);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    link: &Link,
    dir: &Path,
    kind: &Kind,
    n: u32,
    packets: u64,
    rate_pps: Option<u64>,
    use_nfcapd: bool,
) -> Result<Outcome> {
    let is_agent = matches!(kind, Kind::Agent(_));
    let netflow = !kind.is_baseline() && (use_nfcapd || !is_agent);
    let port = 9995;
    let collector = if netflow {
        Some(exporters::nfcapd(&link.b, &dir.join("nfcapd"), port)?)
    } else {
        None
    };
    let out = if netflow {
        Output::Nfcapd(port)
    } else {
        Output::Stdout
    };
    let mut exp = Running::start(kind.clone(), &link.b, &link.b_dev, out, &dir.join("exp"))?;
    let (atx0, arx0) = link.a.drops(&link.a_dev)?;
    let (btx0, brx0) = link.b.drops(&link.b_dev)?;
    let rcvbuf0 = exporters::udp_rcvbuf_errors(&link.b);
    let flows = flows(n);
    let cpu0 = exp.pid().map(procstat::tree_cpu).unwrap_or_default();
    let soft0 = procstat::softirq();
    let t0 = Instant::now();
    trafgen::send(&link.a, &link.a_dev, &flows, packets, rate_pps)?;
    let elapsed = t0.elapsed();
    let (atx1, arx1) = link.a.drops(&link.a_dev)?;
    let (btx1, brx1) = link.b.drops(&link.b_dev)?;
    let dropped = (atx1 - atx0) + (arx1 - arx0) + (btx1 - btx0) + (brx1 - brx0);
    let delivered = packets - dropped;
    let mut o = Outcome {
        delivered,
        elapsed,
        ..Default::default()
    };
    if is_agent {
        // The agent counts at each drain: wait until it has them all, or
        // (AF_XDP) until what it has not counted is in its drop counters
        // (then the accuracy column shows the loss).
        let mut m = String::new();
        let counted = wait_until(Duration::from_secs(60), || {
            m = fetch_metrics(&link.b, 9590).unwrap_or_default();
            let sum = |prefix: &str| -> f64 {
                m.lines()
                    .filter(|l| l.starts_with(prefix))
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .sum()
            };
            let counted =
                metric(&m, "flowexport_packets_total{direction=\"ingress\"}").unwrap_or(0.0);
            let lost = sum("flowexport_afxdp_dropped_packets_total{")
                + sum("flowexport_afxdp_no_socket_packets_total");
            counted + lost >= delivered as f64
        });
        if !counted {
            bail!("the agent did not count the {delivered} packets:\n{m}");
        }
        o.kernel_memory = m
            .lines()
            .filter(|l| l.starts_with("flowexport_kernel_memory_bytes{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64;
    } else if !kind.is_baseline() {
        // pcap readers work behind the receive path: let them catch up
        // (their CPU time stops growing).
        let pid = exp.pid().context("no pid")?;
        let mut last = procstat::tree_cpu(pid);
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(300));
            let now = procstat::tree_cpu(pid);
            if now - last < Duration::from_millis(20) {
                break;
            }
            last = now;
        }
    }
    o.softirq = procstat::softirq().saturating_sub(soft0);
    if let Some(pid) = exp.pid() {
        o.rss_anon = procstat::tree_rss_anon(pid);
        o.traffic_cpu = procstat::tree_cpu(pid).saturating_sub(cpu0);
    }
    o.usage = exp.stop()?;
    let want = packets / u64::from(n);
    let exact_possible = packets.is_multiple_of(u64::from(n));
    if let Some(c) = collector {
        let nf = exporters::finish_nfcapd(&link.b, c, &dir.join("nfcapd"), port)?;
        o.rcvbuf_drops = exporters::udp_rcvbuf_errors(&link.b) - rcvbuf0;
        let dst = flows.dst.to_string();
        let mut per_src: HashMap<&str, u64> = HashMap::new();
        for ((src, d, sp, dp, _), (p, _, _, _)) in &nf {
            if *d == dst && *sp == u64::from(flows.sport) && *dp == u64::from(flows.dport) {
                *per_src.entry(src.as_str()).or_default() += p;
            }
        }
        o.reported = per_src.values().sum();
        if exact_possible {
            o.flows_exact = per_src.values().filter(|&&p| p == want).count() as u64;
        }
    } else if is_agent {
        let (reported, exact) = read_json(&dir.join("exp/stdout"), &flows, want)?;
        o.reported = reported;
        o.flows_exact = if exact_possible { exact } else { 0 };
    }
    if is_agent {
        let (drains, last) = read_drains(&dir.join("exp/stderr"))?;
        o.drains = drains;
        o.final_drain = last;
    }
    Ok(o)
}

/// The generated flows' packets in the agent's JSON lines, and how many
/// flows had exactly `want` packets.
fn read_json(path: &Path, flows: &Flows, want: u64) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(path)?;
    let dst = flows.dst.to_string();
    let mut per_src: HashMap<String, u64> = HashMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["dst_addr"] == dst.as_str()
            && v["src_port"] == u64::from(flows.sport)
            && v["dst_port"] == u64::from(flows.dport)
        {
            *per_src
                .entry(v["src_addr"].as_str().unwrap_or("").to_string())
                .or_default() += v["packets"].as_u64().unwrap_or(0);
        }
    }
    Ok((
        per_src.values().sum(),
        per_src.values().filter(|&&p| p == want).count() as u64,
    ))
}

/// The agent's drain log lines (`flowexport::drain` at debug level): per
/// periodic drain (seconds, not counting the sinks' share; records; flows
/// examined); and the last one (the final drain at shutdown: seconds,
/// records).
#[allow(clippy::type_complexity)]
fn read_drains(path: &Path) -> Result<(Vec<(f64, u64, u64)>, Option<(f64, u64)>)> {
    let text = std::fs::read_to_string(path)?;
    let mut v = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.split("] drain ").nth(1) else {
            continue;
        };
        let num = |s: &str| -> f64 { s.trim().parse().unwrap_or(0.0) };
        let ms = num(rest.split(" ms:").next().unwrap_or(""));
        let records = num(rest
            .split(" ms: ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or(""));
        let examined = num(rest
            .split(" records, ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or(""));
        // The sinks' share (serializing and sending records) is theirs,
        // not the drain's.
        let sinks = num(rest
            .split("; ")
            .nth(1)
            .and_then(|r| r.split(" ms").next())
            .unwrap_or(""));
        v.push(((ms - sinks) / 1e3, records as u64, examined as u64));
    }
    let last = v.pop().map(|(s, r, _)| (s, r));
    Ok((v, last))
}

/// The agent's CPU use with no traffic at all: started on a fresh veth pair,
/// given `settle`, then measured over `window`. Returns the share of one
/// core.
pub(crate) fn idle_cpu(settle: Duration, window: Duration) -> Result<f64> {
    let link = Link::new()?;
    let dir = scratch("idle");
    let mut exp = Running::start(
        Kind::Agent(Vec::new()),
        &link.b,
        &link.b_dev,
        Output::Stdout,
        &dir,
    )?;
    std::thread::sleep(settle);
    let pid = exp.pid().context("no pid")?;
    let c0 = procstat::tree_cpu(pid);
    std::thread::sleep(window);
    let c1 = procstat::tree_cpu(pid);
    exp.stop()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((c1 - c0).as_secs_f64() / window.as_secs_f64())
}
