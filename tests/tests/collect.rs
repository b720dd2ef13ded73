//! `flowexport collect` fed by real exporters from Debian: softflowd (NetFlow
//! v5, v9, IPFIX), fprobe (v5) and pmacctd's nfprobe plugin (v9, IPFIX)
//! export known traffic. nfcapd (nfdump's collector) receives each export and
//! repeats every datagram unchanged to flowexport's collector, so both decode
//! the same bytes: per flow, the collector's packets and bytes must equal the
//! traffic sent, and nfdump must agree.
//!
//! pmacctd and fprobe capture the traffic live on a veth pair. softflowd
//! 1.1.0 never processes live packets on a quiet interface here (libpcap
//! holds them: `softflowctl statistics` shows packets received by libpcap
//! but 0 processed, irino/softflowd#71), so it reads the same frames from a
//! pcap file the test writes (`softflowd -r`), which exercises the same
//! flow tracking and export code. fprobe has the same hold-back but does
//! process once enough packets arrive, so after the known traffic the test
//! sends a burst of filler frames on a separate flow, which is left out of
//! the comparison.
//!
//! sFlow v5 comes from a real agent too: pmacctd's sfprobe plugin, sampling
//! every packet, sends straight to the collector's sFlow port; each sample
//! is one packet, so the per-flow sums must equal the traffic sent. sfprobe
//! flushes its last, partly filled datagram only when a packet arrives in a
//! later second (and drops it on SIGINT), so filler frames follow the
//! traffic until the collector has every sample.
//!
//! Two runs publish to a real broker instead of stdout (Tansu in the test's
//! namespace): protobuf FlowMessages and JSON, read back by a consumer and
//! held to the same per-flow totals. Sampled runs (softflowd `-s 4`) check
//! that the rate from the options records reaches every flow.
//!
//! Bytes are IP-layer lengths (IPv4 total length, IPv6 payload + 40), which
//! is what all three exporters count.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use flowexport::codec::protobuf;
use flowexport_tests::frames::*;
use flowexport_tests::kafka::Broker;
use flowexport_tests::tools::*;
use flowexport_tests::*;
use serde_json::Value;

/// (src, dst, proto, src_port, dst_port)
type Key = (String, String, u64, u64, u64);
/// Per flow: (packets, bytes).
type Flows = BTreeMap<Key, (u64, u64)>;
/// Frames, how often each is sent, and the flow each belongs to.
type Frames = Vec<(Vec<u8>, u64, Key)>;

/// Only the test's own addresses reach the exporters (the veth also carries
/// IPv6 neighbour discovery).
const FILTER: &str = "net 10.60.0.0/16 or net 2001:db8:60::/48";

#[derive(Clone, Copy, Debug)]
enum Exporter {
    /// softflowd `-v 5|9|10`, with `-s N` (1 in N periodic sampling) when
    /// N > 1.
    Softflowd(&'static str, u64),
    /// fprobe, NetFlow v5.
    Fprobe,
    /// pmacctd with the nfprobe plugin, `nfprobe_version: 9|10`.
    Pmacctd(u8),
    /// pmacctd with the sfprobe plugin: sFlow v5, every packet sampled
    /// (rate 1), straight to the collector's sFlow port (nfcapd does not
    /// take sFlow).
    PmacctdSflow,
}

/// The sFlow agent address pmacctd's sfprobe is given.
const SFLOW_AGENT: &str = "192.0.2.9";

impl Exporter {
    fn carries_ipv6(self) -> bool {
        !matches!(self, Exporter::Softflowd("5", _) | Exporter::Fprobe)
    }

    /// The sampling rate the collector must report: softflowd's v9/IPFIX
    /// state theirs in an options record (1 when unsampled); v5 headers
    /// from softflowd and fprobe, and pmacctd's nfprobe, state none (0).
    fn sampling_rate(self) -> u64 {
        match self {
            Exporter::Softflowd("9" | "10", n) => n,
            Exporter::PmacctdSflow => 1,
            _ => 0,
        }
    }

    fn record_type(self) -> &'static str {
        match self {
            Exporter::Softflowd("5", _) | Exporter::Fprobe => "NETFLOW_V5",
            Exporter::Softflowd("9", _) | Exporter::Pmacctd(9) => "NETFLOW_V9",
            Exporter::PmacctdSflow => "SFLOW_5",
            _ => "IPFIX",
        }
    }

    /// Starts a live exporter in `ns`, capturing `dev`, exporting to
    /// 127.0.0.1:`port`, and waits until its capture socket is open. Files go
    /// to `dir`.
    fn start_live(self, ns: &Netns, dev: &str, port: u16, dir: &Path) -> Proc {
        let target = format!("127.0.0.1:{port}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name]);
        match self {
            Exporter::Softflowd(..) => unreachable!("softflowd reads a pcap file"),
            Exporter::Fprobe => {
                // `-l 2`: log to stderr, which also keeps it in the foreground.
                cmd.args(["fprobe", "-l", "2", "-i", dev, "-f", FILTER, &target]);
            }
            Exporter::Pmacctd(v) => {
                let conf = dir.join("pmacctd.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "daemonize: false\npcap_interface: {dev}\npcap_filter: {FILTER}\n\
                         plugins: nfprobe\nnfprobe_receiver: {target}\nnfprobe_version: {v}\n\
                         pidfile: {}\n",
                        dir.join("pmacctd.pid").display()
                    ),
                )
                .unwrap();
                cmd.arg("pmacctd").arg("-f").arg(&conf);
            }
            Exporter::PmacctdSflow => {
                let conf = dir.join("pmacctd.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "daemonize: false\npcap_interface: {dev}\npcap_filter: {FILTER}\n\
                         plugins: sfprobe\nsfprobe_receiver: {target}\n\
                         sfprobe_agentip: {SFLOW_AGENT}\nsfprobe_sampling_rate: 1\n\
                         pidfile: {}\n",
                        dir.join("pmacctd.pid").display()
                    ),
                )
                .unwrap();
                cmd.arg("pmacctd").arg("-f").arg(&conf);
            }
        }
        let p = Proc::spawn(
            &mut cmd,
            "fprobe and pmacct must be installed: scripts/setup.sh --test",
        );
        assert!(
            wait_until(Duration::from_secs(10), || {
                ns.exec(&["ss", "-H", "-0", "-a"])
                    .is_ok_and(|o| o.contains(dev))
            }),
            "{self:?} opened no capture socket on {dev}"
        );
        // The filter is attached after the socket opens.
        std::thread::sleep(Duration::from_millis(500));
        p
    }
}

/// Writes `frames` (each repeated its count of times, 1 ms apart, starting
/// now) as a classic pcap file.
fn write_pcap(path: &Path, frames: &Frames) {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]); // thiszone, sigfigs
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let mut t = Duration::ZERO;
    for (frame, n, _) in frames {
        for _ in 0..*n {
            let ts = start + t;
            out.extend_from_slice(&(ts.as_secs() as u32).to_le_bytes());
            out.extend_from_slice(&ts.subsec_micros().to_le_bytes());
            out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            out.extend_from_slice(frame);
            t += Duration::from_millis(1);
        }
    }
    std::fs::write(path, out).unwrap();
}

/// The test's traffic: frames, how often each is sent, and the flow it
/// belongs to with its expected (packets, bytes).
fn traffic(ipv6: bool) -> (Frames, Flows) {
    let mut frames = Vec::new();
    let mut want = BTreeMap::new();
    let mut add = |ip: Vec<u8>, v6: bool, key: Key, n: u64| {
        want.insert(key.clone(), (n, n * ip.len() as u64));
        frames.push((if v6 { eth_ipv6(ip) } else { eth_ipv4(ip) }, n, key));
    };
    for i in 0..6u64 {
        let l4 = L4::udp(5000 + i as u16, 53, 60 + 10 * i as usize);
        add(
            ipv4(v4("10.60.0.1"), v4("10.60.0.2"), &l4),
            false,
            ("10.60.0.1".into(), "10.60.0.2".into(), 17, 5000 + i, 53),
            1 + 3 * i,
        );
    }
    let tcp = L4::tcp(40000, 80, TCP_ACK | TCP_PSH, 500);
    add(
        ipv4(v4("10.60.1.1"), v4("10.60.1.2"), &tcp),
        false,
        ("10.60.1.1".into(), "10.60.1.2".into(), 6, 40000, 80),
        7,
    );
    if ipv6 {
        let udp = L4::udp(6000, 4739, 100);
        add(
            ipv6_pkt("2001:db8:60::1", "2001:db8:60::2", &udp),
            true,
            (
                "2001:db8:60::1".into(),
                "2001:db8:60::2".into(),
                17,
                6000,
                4739,
            ),
            5,
        );
        add(
            ipv6_pkt("2001:db8:60::3", "2001:db8:60::4", &tcp),
            true,
            (
                "2001:db8:60::3".into(),
                "2001:db8:60::4".into(),
                6,
                40000,
                80,
            ),
            9,
        );
    }
    (frames, want)
}

/// Filler traffic (fprobe, sfprobe): its own flow, excluded from the
/// comparison.
const FILLER_SRC: &str = "10.60.255.1";
const FILLER_FRAMES: usize = 4000;

/// What softflowd's periodic sampler (`-s N`) keeps: the first packet it
/// sees and every Nth after it, counted over all packets in the order sent.
fn sampled(frames: &Frames, n: u64) -> Flows {
    let mut out = Flows::new();
    let mut k = 0u64;
    for (frame, count, key) in frames {
        let kept = (k..k + count).filter(|i| i % n == 0).count() as u64;
        k += count;
        if kept > 0 {
            let ip_len = (frame.len() - 14) as u64;
            let e = out.entry(key.clone()).or_insert((0, 0));
            e.0 += kept;
            e.1 += kept * ip_len;
        }
    }
    out
}

fn send_all(l: &Link, frames: &Frames) {
    for (f, n, _) in frames {
        let sent = send_frames(
            &l.a,
            &l.a_dev,
            vec![f.clone()],
            *n as usize,
            32,
            Duration::from_millis(1),
        )
        .unwrap();
        assert_eq!(sent, *n);
    }
}

fn ipv6_pkt(src: &str, dst: &str, l4: &L4) -> Vec<u8> {
    ipv6(v6(src), v6(dst), l4)
}

fn collector_flows(c: &Agent, port: u16) -> u64 {
    c.metrics(port).map_or(0, |m| {
        m.lines()
            .filter(|l| l.starts_with("flowexport_collector_flows_total"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64
    })
}

/// Where the collector sends its flows.
#[derive(Clone, Copy, PartialEq)]
enum Output {
    Stdout,
    /// A real broker (Tansu) in the test's namespace, with this
    /// `--kafka-format`.
    Kafka(&'static str),
}

fn run_to(exporter: Exporter, output: Output) {
    let l = Link::new().unwrap();
    let dir = std::env::temp_dir().join(unique("fe-col-"));
    std::fs::create_dir_all(&dir).unwrap();
    let (p_nfcapd, p_collect) = (free_udp_port(&l.b), free_udp_port(&l.b));
    let metrics_port = free_tcp_port(&l.b);
    let broker = match output {
        Output::Stdout => None,
        Output::Kafka(_) => Some(Broker::start_with(&l.b, &[("input", 2)]).unwrap()),
    };
    let listen = format!("127.0.0.1:{p_collect}");
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let sflow = matches!(exporter, Exporter::PmacctdSflow);
    let listen_flag = if sflow { "--sflow-listen" } else { "--listen" };
    let mut args = vec![listen_flag, &listen, "--metrics-addr", &metrics_addr];
    let brokers = broker.as_ref().map(Broker::addr).unwrap_or_default();
    if let Output::Kafka(format) = output {
        args.extend([
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            "input",
            "--kafka-format",
            format,
        ]);
    }
    let collector = Agent::collector(&l.b, &args).unwrap();
    // The exporter sends to nfcapd, which repeats to the collector; sFlow
    // goes to the collector directly.
    let (mut nfcapd, p_export) = if sflow {
        (None, p_collect)
    } else {
        let n = nfcapd(&l.b, &dir.join("nfcapd"), p_nfcapd, Some(p_collect));
        (Some(n), p_nfcapd)
    };

    let (frames, mut want) = traffic(exporter.carries_ipv6());
    let sampling = match exporter {
        Exporter::Softflowd(_, n) => n,
        _ => 1,
    };
    match exporter {
        Exporter::Softflowd(v, sampling) => {
            let pcap = dir.join("traffic.pcap");
            write_pcap(&pcap, &frames);
            let ctl = dir.join("softflowd.ctl");
            let mut exp = Proc::spawn(
                Command::new("ip")
                    .args(["netns", "exec", &l.b.name, "softflowd", "-d", "-r"])
                    .arg(&pcap)
                    .args(["-n", &format!("127.0.0.1:{p_export}"), "-v", v])
                    .args(if sampling > 1 {
                        vec!["-s".to_string(), sampling.to_string()]
                    } else {
                        vec![]
                    })
                    .arg("-p")
                    .arg(dir.join("softflowd.pid"))
                    .arg("-c")
                    .arg(&ctl),
                "softflowd must be installed: scripts/setup.sh --test",
            );
            // After the file's end softflowd either exports everything and
            // exits (with -s), or waits on its control socket: then, once it
            // has processed every frame, `shutdown` makes it expire and
            // export all flows, and exit.
            let total: u64 = frames.iter().map(|(_, n, _)| n).sum();
            let softflowctl = |cmd: &str| {
                l.b.exec(&["softflowctl", "-c", ctl.to_str().unwrap(), cmd])
                    .unwrap_or_default()
            };
            let mut exited = || exp.0.as_mut().unwrap().try_wait().unwrap().is_some();
            assert!(
                wait_until(Duration::from_secs(10), || exited()
                    || softflowctl("statistics")
                        .contains(&format!("Packets processed: {total}\n"))),
                "softflowd did not process the {total} frames: {}",
                softflowctl("statistics")
            );
            if !exited() {
                softflowctl("shutdown");
            }
            assert!(
                wait_until(Duration::from_secs(10), &mut exited),
                "softflowd did not exit after shutdown"
            );
            exp.term();
        }
        Exporter::Fprobe | Exporter::Pmacctd(_) | Exporter::PmacctdSflow => {
            let mut exp = exporter.start_live(&l.b, &l.b_dev, p_export, &dir);
            send_all(&l, &frames);
            let filler = |n: u64| {
                let frame = eth4(FILLER_SRC, "10.60.255.2", &L4::udp(9, 9, 10));
                let key = (FILLER_SRC.into(), "10.60.255.2".into(), 17, 9, 9);
                send_all(&l, &vec![(frame, n, key)]);
            };
            match exporter {
                Exporter::Fprobe => filler(FILLER_FRAMES as u64),
                Exporter::PmacctdSflow => {
                    // sfprobe sends a datagram when it is full and flushes
                    // the rest only on a tick, which runs when captured
                    // packets wake it in a later second than its last tick
                    // (and it drops what it holds on SIGINT). So after the
                    // traffic, one filler frame every 1.1 s until the
                    // collector has every sample: datagrams keep their
                    // order, so once all but the newest filler are in,
                    // every sample of the traffic is.
                    let want: u64 = frames.iter().map(|(_, n, _)| n).sum();
                    let mut fillers = 0;
                    let all_in = wait_until(Duration::from_secs(20), || {
                        if collector_flows(&collector, metrics_port) + 1 >= want + fillers.max(1) {
                            return true;
                        }
                        filler(1);
                        fillers += 1;
                        std::thread::sleep(Duration::from_millis(1100));
                        false
                    });
                    assert!(
                        all_in,
                        "sfprobe exported {} samples after {fillers} filler frames, {} expected",
                        collector_flows(&collector, metrics_port),
                        want + fillers - 1,
                    );
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(500));
            // Both expire and export every flow they hold when stopped:
            // fprobe on SIGTERM, pmacctd's plugins on SIGINT.
            exp.stop_with(if matches!(exporter, Exporter::Fprobe) {
                libc::SIGTERM
            } else {
                libc::SIGINT
            });
        }
    }
    if sampling > 1 {
        want = sampled(&frames, sampling);
    }
    // NetFlow/IPFIX: one record per flow. sFlow (1-in-1 sampling): one
    // record per packet, and the exporter may send its last samples a
    // while after the first of every flow arrived, so wait for all.
    let expected = if sflow {
        want.values().map(|(p, _)| p).sum::<u64>()
    } else {
        want.len() as u64
    };
    assert!(
        wait_until(Duration::from_secs(20), || collector_flows(
            &collector,
            metrics_port
        ) >= expected),
        "{exporter:?}: the collector decoded {} records, {expected} were expected",
        collector_flows(&collector, metrics_port),
    );
    // Let a late export datagram (if any) arrive before stopping.
    std::thread::sleep(Duration::from_millis(500));
    if let Some(n) = nfcapd.as_mut() {
        n.term();
    }
    let out = collector.stop_ok();
    let records: Vec<Value> = match (output, &broker) {
        (Output::Kafka(format), Some(b)) => {
            assert!(
                out.records.is_empty(),
                "stdout is off when Kafka is the sink"
            );
            b.consume_all("input")
                .unwrap()
                .iter()
                .map(|m| match format {
                    "json" => serde_json::from_slice(&m.payload).expect("JSON record"),
                    _ => serde_json::to_value(
                        protobuf::decode(&m.payload, false).expect("a goflow2 FlowMessage"),
                    )
                    .unwrap(),
                })
                .collect()
        }
        _ => out.records,
    };

    let mut got = Flows::new();
    for r in &records {
        let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
        let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
        if s("src_addr") == FILLER_SRC {
            continue;
        }
        assert_eq!(s("type"), exporter.record_type(), "{r}");
        // NetFlow/IPFIX: the datagram's source (nfcapd's repeater); sFlow:
        // the agent address in the datagram.
        let sampler = if sflow { SFLOW_AGENT } else { "127.0.0.1" };
        assert_eq!(s("sampler_address"), sampler, "{r}");
        assert_eq!(n("sampling_rate"), exporter.sampling_rate(), "{r}");
        // Same host, same clock: the flow ended within the test's run and
        // not after the collector received it (exporters stamp whole ms or
        // seconds, hence the slack).
        let (start, end, recv) = (
            n("time_flow_start_ns"),
            n("time_flow_end_ns"),
            n("time_received_ns"),
        );
        assert!(start <= end, "{r}");
        assert!(end <= recv + 2_000_000_000, "flow ends after receipt: {r}");
        assert!(
            recv.saturating_sub(start) < 120_000_000_000,
            "flow starts too early: {r}"
        );
        let e = got
            .entry((
                s("src_addr"),
                s("dst_addr"),
                n("proto"),
                n("src_port"),
                n("dst_port"),
            ))
            .or_default();
        e.0 += n("packets");
        e.1 += n("bytes");
    }
    assert_eq!(got, want, "{exporter:?}: flowexport collect's flows");
    if sflow {
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }

    let nf: Flows = nfdump(&dir.join("nfcapd"))
        .into_iter()
        .filter(|((sa, ..), _)| sa != FILLER_SRC)
        .map(|((sa, da, sp, dp, pr), (p, b, _, _))| {
            let proto = match pr.as_str() {
                "UDP" => 17,
                "TCP" => 6,
                other => panic!("unexpected protocol {other}"),
            };
            ((sa, da, proto, sp, dp), (p, b))
        })
        .collect();
    assert_eq!(nf, want, "{exporter:?}: nfdump's flows");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One test per exporter (and output): `name: exporter[, output]`.
macro_rules! collect_tests {
    ($($name:ident: $exporter:expr $(, $output:expr)?;)*) => {
        $(
            #[test]
            fn $name() {
                run_to($exporter, collect_tests!(@output $($output)?));
            }
        )*
    };
    (@output) => { Output::Stdout };
    (@output $output:expr) => { $output };
}

collect_tests! {
    softflowd_netflow5: Exporter::Softflowd("5", 1);
    softflowd_netflow9: Exporter::Softflowd("9", 1);
    softflowd_ipfix: Exporter::Softflowd("10", 1);
    fprobe_netflow5: Exporter::Fprobe;
    pmacctd_nfprobe_netflow9: Exporter::Pmacctd(9);
    pmacctd_nfprobe_ipfix: Exporter::Pmacctd(10);
    softflowd_ipfix_sampled: Exporter::Softflowd("10", 4);
    softflowd_netflow9_sampled: Exporter::Softflowd("9", 4);
    softflowd_ipfix_into_kafka_protobuf: Exporter::Softflowd("10", 4), Output::Kafka("protobuf");
    pmacctd_netflow9_into_kafka_json: Exporter::Pmacctd(9), Output::Kafka("json");
    pmacctd_sfprobe_sflow5: Exporter::PmacctdSflow;
}

/// `flowexport collect` on 127.0.0.1:`port` in `ns`, one worker, its
/// stdout a pipe the test reads (or not); killed when dropped.
struct PipedCollector {
    child: std::process::Child,
    ns: Netns,
    port: u16,
    metrics_port: u16,
}

impl PipedCollector {
    fn start() -> (PipedCollector, std::process::ChildStdout) {
        Self::start_with(&[])
    }

    /// A collector with `extra` flags besides its listen address, one
    /// worker and its metrics address.
    fn start_with(extra: &[&str]) -> (PipedCollector, std::process::ChildStdout) {
        let ns = Netns::new().unwrap();
        ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
        let port = free_tcp_port(&ns);
        let metrics_port = free_tcp_port(&ns);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(flowexport_bin())
            .args(["collect", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--workers", "1", "--metrics-addr"])
            .arg(format!("127.0.0.1:{metrics_port}"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let c = PipedCollector {
            child,
            ns,
            port,
            metrics_port,
        };
        assert!(wait_until(Duration::from_secs(20), || fetch_metrics(
            &c.ns,
            c.metrics_port
        )
        .is_ok()));
        (c, stdout)
    }

    /// A metric's value (None: not exposed).
    fn metric(&self, name: &str) -> Option<f64> {
        fetch_metrics(&self.ns, self.metrics_port)
            .ok()
            .and_then(|m| metric(&m, name))
    }

    /// `flowexport_collector_socket_drops_total` of the listen address.
    fn socket_drops(&self) -> Option<f64> {
        self.metric(&format!(
            "flowexport_collector_socket_drops_total{{listen=\"127.0.0.1:{}\"}}",
            self.port
        ))
    }

    /// Sends NetFlow v9 datagrams of 30 flows each, `n` flows in all, each
    /// flow with its own byte count (1,000,000 + its index), in bursts of 20
    /// datagrams `pause` apart.
    fn send_flows(&self, n: u64, pause: Duration) {
        use flowexport::codec::netflow::encode::{ExportProtocol, ExportStream};
        use flowexport::record::{FlowRecord, FlowType, ETYPE_IPV4};
        let mut stream = ExportStream::new(
            ExportProtocol::NetflowV9,
            1,
            9000,
            60_000,
            20,
            1_763_799_000_000,
        )
        .unwrap();
        let mut datagrams: Vec<Vec<u8>> = Vec::new();
        for first in (0..n).step_by(30) {
            let flows: Vec<FlowRecord> = (first..n.min(first + 30))
                .map(|i| FlowRecord {
                    flow_type: FlowType::Ebpf,
                    time_flow_start_ns: 1_763_799_990_000_000_000,
                    time_flow_end_ns: 1_763_799_999_000_000_000,
                    bytes: 1_000_000 + i,
                    packets: 1,
                    src_addr: std::net::Ipv4Addr::from(0x0a3c_0000 + i as u32).into(),
                    dst_addr: "10.61.0.1".parse().unwrap(),
                    etype: ETYPE_IPV4,
                    proto: 17,
                    src_port: 1024,
                    dst_port: 53,
                    ..FlowRecord::default()
                })
                .collect();
            datagrams.extend(stream.encode(&flows, 1_763_800_000_000));
        }
        let port = self.port;
        self.ns
            .run(move || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                for (i, d) in datagrams.iter().enumerate() {
                    s.send_to(d, ("127.0.0.1", port)).unwrap();
                    if i % 20 == 19 {
                        std::thread::sleep(pause);
                    }
                }
            })
            .unwrap();
    }
}

impl Drop for PipedCollector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reader of the collector's stdout that stalls: decoding goes on (every
/// flow counted, no socket drop), the records wait in the stdout queue
/// (`flowexport_stdout_records_waiting`), and once the reader resumes every
/// record arrives exactly once.
#[test]
fn stalled_stdout_reader_loses_and_duplicates_nothing() {
    use std::io::Read;

    let (c, mut stdout) = PipedCollector::start();
    let gauge = |name: &str| c.metric(name).unwrap_or(0.0) as u64;
    // 30,000 flows (about 13 MB of JSON, far more than a pipe holds).
    c.send_flows(30_000, Duration::from_millis(2));

    // Nobody reads stdout: every flow is decoded all the same, and what
    // the pipe cannot take waits in the queue.
    assert!(
        wait_until(Duration::from_secs(20), || gauge(
            "flowexport_collector_flows_total{type=\"NETFLOW_V9\"}"
        ) == 30_000),
        "decoded {}",
        gauge("flowexport_collector_flows_total{type=\"NETFLOW_V9\"}")
    );
    std::thread::sleep(Duration::from_millis(300));
    let waiting = gauge("flowexport_stdout_records_waiting");
    assert!(waiting > 20_000, "{waiting} records waiting");
    // Not a datagram dropped at the socket, and the collector says so.
    assert_eq!(c.socket_drops(), Some(0.0));
    assert_eq!(udp_drops(&c.ns, c.port), Some(0));

    // The reader resumes.
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        stdout.read_to_end(&mut all).unwrap();
        all
    });
    assert!(wait_until(Duration::from_secs(20), || gauge(
        "flowexport_stdout_records_waiting"
    ) == 0));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(c.child.id() as i32, libc::SIGTERM) };
    let all = reader.join().unwrap();
    let mut bytes: Vec<u64> = String::from_utf8(all)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["bytes"]
                .as_u64()
                .unwrap()
        })
        .collect();
    bytes.sort_unstable();
    assert_eq!(bytes, (1_000_000..1_030_000).collect::<Vec<u64>>());
}

/// A reader that never reads: the stdout queue fills (32,768 records), the
/// worker waits for room, its socket's buffer fills and the kernel drops
/// datagrams. `flowexport_collector_socket_drops_total` is the kernel's
/// count for the socket (what `ss` shows), read while the worker is still
/// blocked.
#[test]
fn socket_drops_are_the_kernels_count() {
    let (c, _stdout) = PipedCollector::start();
    // 600,000 flows in 20,000 datagrams of ~1.4 KB: the queue takes ~1,100
    // datagrams' records, an 8 MiB socket buffer ~7,000 datagrams.
    c.send_flows(600_000, Duration::ZERO);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let kernel = udp_drops(&c.ns, c.port);
            kernel > Some(0) && c.socket_drops() == kernel.map(|d| d as f64)
        }),
        "metric {:?}, kernel {:?}",
        c.socket_drops(),
        udp_drops(&c.ns, c.port)
    );
    // Scraped again: the same count, not added twice.
    assert_eq!(c.socket_drops(), udp_drops(&c.ns, c.port).map(|d| d as f64));
    // The worker is still waiting for room in the queue, and the time it
    // has waited shows (counted every 100 ms while it waits).
    assert!(wait_until(Duration::from_secs(5), || c
        .metric("flowexport_stdout_blocked_seconds_total")
        > Some(0.0)));
}

/// A reader of stdout that goes away (`flowexport collect | head`): the
/// collector stops as on SIGTERM and exits with an error, as a pipeline's
/// writer does, instead of decoding on for nobody and logging each lost
/// write.
#[test]
fn a_reader_that_goes_away_stops_the_collector() {
    let (mut c, stdout) = PipedCollector::start();
    drop(stdout);
    c.send_flows(3_000, Duration::from_millis(2));
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            status = c.child.try_wait().unwrap();
            status.is_some()
        }),
        "the collector still runs with nobody reading its stdout"
    );
    assert_eq!(status.unwrap().code(), Some(1), "{status:?}");
}

/// A second collector on a port one already serves is refused (with
/// SO_REUSEPORT, the two would otherwise split the datagrams between them
/// silently), and so is an address given twice.
#[test]
fn a_port_in_use_or_given_twice_is_refused() {
    let (c, _stdout) = PipedCollector::start();
    // Bounded: one that is wrongly accepted runs until `timeout` ends it.
    let run = |args: &[String]| {
        Command::new("timeout")
            .args(["10", "ip", "netns", "exec", &c.ns.name])
            .arg(flowexport_bin())
            .arg("collect")
            .args(args)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .output()
            .unwrap()
    };
    let port = c.port;
    for (args, says) in [
        (
            vec!["--listen".to_string(), format!("127.0.0.1:{port}")],
            "another program holds the port",
        ),
        (
            vec!["--listen".to_string(), format!("0.0.0.0:{port}")],
            "another program holds the port",
        ),
        (
            vec![
                "--listen".to_string(),
                "127.0.0.1:9".to_string(),
                "--sflow-listen".to_string(),
                "127.0.0.1:9".to_string(),
            ],
            "is given twice",
        ),
    ] {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // The first collector still has its port to itself.
    assert_eq!(c.socket_drops(), Some(0.0));
}

/// `--receive-buffer`: each socket gets the buffer asked for (forced, as
/// root), and a size out of range is refused before anything listens.
#[test]
fn the_receive_buffer_is_what_the_flag_asks() {
    let (c, _stdout) = PipedCollector::start();
    // The default: 8 MiB, which the kernel doubles for its accounting.
    assert_eq!(udp_skmem(&c.ns, c.port, "rb"), Some(2 * (8 << 20)));
    let (c, _stdout) = PipedCollector::start_with(&["--receive-buffer", "262144"]);
    assert_eq!(udp_skmem(&c.ns, c.port, "rb"), Some(2 * 262_144));
    for (value, says) in [
        ("1000", "1000 bytes is outside 65536..=1073741824"),
        ("32M", "is not a number of bytes"),
    ] {
        let out = Command::new("timeout")
            .args(["10", "ip", "netns", "exec", &c.ns.name])
            .arg(flowexport_bin())
            .args([
                "collect",
                "--listen",
                "127.0.0.1:9",
                "--receive-buffer",
                value,
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {stderr}");
        assert!(stderr.contains(says), "{value}: {stderr}");
    }
}
