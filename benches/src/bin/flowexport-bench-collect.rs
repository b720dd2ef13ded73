//! `cargo xtask bench collect`: the collector's decoding and its outputs,
//! side by side with nfdump's nfcapd and pmacct's nfacctd in one run.
//!
//! A generator builds NetFlow v9 and IPFIX packets of 30 records each with
//! flowexport's own exporter (templates every 20 packets), then:
//!
//! 1. in process, one core: decoding (`NetflowDecoder`), and formatting
//!    JSON lines with flowexport's writer and with serde_json;
//! 2. a stream of 3M flows (NetFlow v9) replayed over loopback UDP at fixed
//!    offered rates to each receiver: `flowexport collect` with one worker
//!    (`--discard`; JSON lines to a file; JSON lines to /dev/null, the
//!    formatting without the page cache; Kafka into a local Tansu, at one
//!    lower rate: the broker is the limit there), nfcapd writing its files
//!    and nfacctd's print plugin. Per receiver and rate: the share of flows
//!    decoded (datagrams not dropped at its socket, from /proc/net/udp) and
//!    flows per CPU-second of its processes (utime + stime), and the highest
//!    rate without a socket drop; then flowexport's flows per CPU-second
//!    against nfcapd's at each rate. The JSON file's lines are counted
//!    against the flows decoded.

use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowexport::codec::netflow::encode::ExportProtocol;
use flowexport::codec::netflow::NetflowDecoder;
use flowexport::record::FlowRecord;

use flowexport_benches::util::{cpu_seconds, flows, stream, RECORDS_PER_PACKET};

/// Packets per protocol in the in-process stream.
const PACKETS: usize = 10_000;
/// Packets of the replayed stream: 3M flows.
const REPLAY_PACKETS: usize = 100_000;
/// Offered rates of the replay, flows/s (`--rates`).
const RATES: &str = "500000,1000000,2000000,3000000";

/// `cargo xtask bench collect -- [--rates R,R...] [--receivers NAME,...]`:
/// by default every receiver at every rate, and the in-process and Kafka
/// figures; naming receivers runs only those (to repeat a noisy point).
#[derive(clap::Parser, Debug)]
struct BenchArgs {
    /// Offered rates of the replay, flows per second.
    #[arg(long, value_delimiter = ',', default_value = RATES)]
    rates: Vec<u64>,
    /// Only these receivers (the in-process figures are then left out
    /// too).
    #[arg(long, value_delimiter = ',', value_enum)]
    receivers: Vec<Receiver>,
}

/// The receivers, as `--receivers` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Receiver {
    /// `flowexport collect --discard`.
    Discard,
    /// `flowexport collect`, JSON lines to a file.
    File,
    /// `flowexport collect`, JSON lines to /dev/null.
    Null,
    Nfcapd,
    Nfacctd,
    /// `flowexport collect` into Kafka (one lower rate).
    Kafka,
}

/// The Kafka run: 45k flows (under the sink's buffer) at 120k flows/s.
const KAFKA_PACKETS: usize = 1_500;
const KAFKA_RATE: u64 = 120_000;

fn decode_only(pkts: &[Vec<u8>]) -> f64 {
    let exporter: IpAddr = "192.0.2.1".parse().unwrap();
    let mut d = NetflowDecoder::default();
    let mut out = Vec::with_capacity(64);
    let mut total = 0usize;
    let rounds = 5;
    let t = Instant::now();
    for _ in 0..rounds {
        for p in pkts {
            out.clear();
            d.decode(exporter, p, 1, &mut out).expect("valid packet");
            total += out.len();
        }
    }
    total as f64 / t.elapsed().as_secs_f64()
}

/// Records per second formatted as JSON lines by `format`, one core.
fn json_rate(records: &[FlowRecord], format: &dyn Fn(&mut Vec<u8>, &FlowRecord)) -> f64 {
    let mut out = Vec::with_capacity(1 << 20);
    let rounds = 10;
    let t = Instant::now();
    for _ in 0..rounds {
        for chunk in records.chunks(4096) {
            out.clear();
            for r in chunk {
                format(&mut out, r);
                out.push(b'\n');
            }
            std::hint::black_box(&out);
        }
    }
    (rounds * records.len()) as f64 / t.elapsed().as_secs_f64()
}

/// All processes in process group `pgid` (nfacctd runs a core process and
/// one per plugin; it is started as a group leader).
fn pids_in_group(pgid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        // Field 5 (pgrp) is the third after the comm.
        if after.split_whitespace().nth(2) == Some(&pgid.to_string()) {
            v.push(pid);
        }
    }
    v
}

/// Receive-queue drops of the UDP socket bound to `port` (/proc/net/udp).
fn udp_drops(port: u16) -> u64 {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let hex = format!(":{port:04X}");
    text.lines()
        .skip(1)
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&hex))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// Sends the packets at `flows_per_s` (paced in steps of 16 packets).
fn replay(pkts: &[Vec<u8>], port: u16, flows_per_s: u64) -> Result<()> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(("127.0.0.1", port))?;
    let pps = (flows_per_s / RECORDS_PER_PACKET as u64).max(1);
    let start = Instant::now();
    for (i, p) in pkts.iter().enumerate() {
        if i % 16 == 0 {
            let due = start + Duration::from_nanos(i as u64 * 1_000_000_000 / pps);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        // A full socket buffer on loopback is the receiver's drop, counted
        // in /proc/net/udp; the send itself does not fail.
        s.send(p)?;
    }
    Ok(())
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child (and, for group leaders, the
        // processes it forked).
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGTERM);
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_bound(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let hex = format!(":{port:04X}");
    while !std::fs::read_to_string("/proc/net/udp")?.contains(&hex) {
        if Instant::now() > deadline {
            bail!("nothing bound udp port {port} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// One replay: the share of flows decoded (not dropped at the socket) and
/// flows per CPU-second of the receiver's processes.
struct Run {
    decoded: f64,
    flows: u64,
    per_cpu_s: f64,
}

/// Replays `pkts` at `rate` flows/s to a receiver process set.
fn measure(pkts: &[Vec<u8>], port: u16, rate: u64, pids: &dyn Fn() -> Vec<u32>) -> Result<Run> {
    let ps = pids();
    if ps.is_empty() {
        bail!("receiver not running");
    }
    let cpu0: f64 = ps.iter().map(|p| cpu_seconds(*p)).sum();
    let drops0 = udp_drops(port);
    replay(pkts, port, rate)?;
    // Let the receiver finish what is queued.
    std::thread::sleep(Duration::from_millis(1500));
    let cpu1: f64 = pids().iter().map(|p| cpu_seconds(*p)).sum();
    let drops = udp_drops(port) - drops0;
    let received = (pkts.len() as u64).saturating_sub(drops);
    let flows = received * RECORDS_PER_PACKET as u64;
    Ok(Run {
        decoded: received as f64 / pkts.len() as f64,
        flows,
        per_cpu_s: flows as f64 / (cpu1 - cpu0).max(0.01),
    })
}

fn flowexport_collect(bin: &Path, port: u16, extra: &[&str], stdout: Stdio) -> Result<Proc> {
    use std::os::unix::process::CommandExt;
    let child = Command::new(bin)
        .args([
            "collect",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "1",
        ])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(extra)
        .stdout(stdout)
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting flowexport collect")?;
    Ok(Proc(child))
}

fn nfacctd(dir: &Path, port: u16) -> Result<Proc> {
    let conf = dir.join("nfacctd.conf");
    std::fs::write(
        &conf,
        format!(
            "daemonize: false\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\n\
             plugins: print[p]\naggregate[p]: src_host, dst_host, src_port, dst_port, proto\n\
             print_output[p]: csv\nprint_output_file[p]: {}/out-%s.csv\nprint_refresh_time[p]: 60\n",
            dir.display()
        ),
    )?;
    use std::os::unix::process::CommandExt;
    let child = Command::new("nfacctd")
        .process_group(0)
        .arg("-f")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nfacctd (Debian package pmacct)")?;
    Ok(Proc(child))
}

fn nfcapd(dir: &Path, port: u16) -> Result<Proc> {
    use std::os::unix::process::CommandExt;
    let flows = dir.join("nfcapd");
    std::fs::create_dir_all(&flows)?;
    let child = Command::new("nfcapd")
        .process_group(0)
        .arg("-w")
        .arg(&flows)
        .args(["-b", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nfcapd (Debian package nfdump)")?;
    Ok(Proc(child))
}

fn main() -> Result<()> {
    let args = <BenchArgs as clap::Parser>::parse();
    let bin: PathBuf = flowexport_benches::util::flowexport_bin()?;
    let dir = std::env::temp_dir().join(format!("fe-bench-collect-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, &bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(args: &BenchArgs, bin: &Path, dir: &Path) -> Result<()> {
    let wanted = |r: Receiver| args.receivers.is_empty() || args.receivers.contains(&r);
    println!("## Collector benchmark\n");
    if args.receivers.is_empty() {
        in_process()?;
    }
    let pkts = stream(ExportProtocol::NetflowV9, REPLAY_PACKETS)?;
    replayed(&pkts, &args.rates, &wanted, bin, dir)?;
    if wanted(Receiver::Kafka) {
        kafka(&pkts, bin)?;
    }
    Ok(())
}

/// Decoding and formatting in this process, one core.
fn in_process() -> Result<()> {
    println!("In process, one core ({PACKETS} packets x {RECORDS_PER_PACKET} records):\n");
    println!("| protocol | decode (flows/s) | JSON lines, flowexport's writer (records/s) | JSON lines, serde_json (records/s) | writer / serde_json |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let records = flows(RECORDS_PER_PACKET * PACKETS);
    for (name, proto) in [
        ("NetFlow v9", ExportProtocol::NetflowV9),
        ("IPFIX", ExportProtocol::Ipfix),
    ] {
        let decode = decode_only(&stream(proto, PACKETS)?);
        let ours = json_rate(&records, &flowexport::codec::json::write_record);
        let serde = json_rate(&records, &|out, r| {
            serde_json::to_writer(&mut *out, r).expect("serializes");
        });
        println!(
            "| {name} | {decode:.0} | {ours:.0} | {serde:.0} | {:.1}x |",
            ours / serde
        );
    }
    Ok(())
}

/// `pkts` replayed at each rate to each wanted receiver; the table, then
/// the ratios against nfcapd (nothing when no replayed receiver is wanted).
fn replayed(
    pkts: &[Vec<u8>],
    rates: &[u64],
    wanted: &dyn Fn(Receiver) -> bool,
    bin: &Path,
    dir: &Path,
) -> Result<()> {
    let json_file = dir.join("collect.json");
    type Start<'a> = Box<dyn Fn(u16) -> Result<(Proc, Box<dyn Fn() -> Vec<u32>>)> + 'a>;
    let single = |p: Proc| -> (Proc, Box<dyn Fn() -> Vec<u32>>) {
        let id = p.0.id();
        (p, Box::new(move || vec![id]))
    };
    let group = |p: Proc| -> (Proc, Box<dyn Fn() -> Vec<u32>>) {
        let id = p.0.id();
        (p, Box::new(move || pids_in_group(id)))
    };
    let receivers: Vec<(Receiver, &str, Start)> = vec![
        (
            Receiver::Discard,
            "flowexport collect --discard",
            Box::new(|port| {
                Ok(single(flowexport_collect(
                    bin,
                    port,
                    &["--discard"],
                    Stdio::null(),
                )?))
            }),
        ),
        (
            Receiver::File,
            "flowexport collect, JSON lines to a file",
            Box::new(|port| {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&json_file)?;
                Ok(single(flowexport_collect(bin, port, &[], f.into())?))
            }),
        ),
        (
            Receiver::Null,
            "flowexport collect, JSON lines to /dev/null",
            Box::new(|port| Ok(single(flowexport_collect(bin, port, &[], Stdio::null())?))),
        ),
        (
            Receiver::Nfcapd,
            "nfcapd, binary files",
            Box::new(|port| Ok(group(nfcapd(dir, port)?))),
        ),
        (
            Receiver::Nfacctd,
            "nfacctd, print plugin (CSV)",
            Box::new(|port| Ok(group(nfacctd(dir, port)?))),
        ),
    ];
    let receivers: Vec<_> = receivers.into_iter().filter(|r| wanted(r.0)).collect();
    if receivers.is_empty() {
        return Ok(());
    }
    println!(
        "\nReplayed over loopback UDP: {} flows of NetFlow v9 ({REPLAY_PACKETS} packets) per \
         rate; per receiver: flows decoded (not dropped at its socket), flows per CPU-second.\n",
        REPLAY_PACKETS * RECORDS_PER_PACKET
    );
    let mut header = "| receiver |".to_string();
    for r in rates {
        header += &format!(" {}M flows/s offered |", *r as f64 / 1e6);
    }
    println!("{header} highest rate without a socket drop |");
    println!("| --- |{} --- |", " --- |".repeat(rates.len()));
    // Flows per CPU-second of each receiver at each rate, for the ratios.
    let mut per_cpu_s: Vec<(Receiver, &str, Vec<f64>)> = Vec::new();
    for &(receiver, name, ref start) in &receivers {
        let port = free_udp_port()?;
        let (_proc, pids) = start(port)?;
        wait_bound(port)?;
        let mut row = format!("| {name} |");
        let mut best = "none".to_string();
        let mut per_rate = Vec::new();
        for &rate in rates {
            let _ = std::fs::File::create(&json_file);
            let run = measure(pkts, port, rate, &*pids)?;
            let decoded = if run.decoded == 1.0 {
                "100%".to_string()
            } else {
                format!("{:.2}%", run.decoded * 100.0)
            };
            row += &format!(
                " {decoded} decoded, {:.2}M flows/CPU-s |",
                run.per_cpu_s / 1e6
            );
            per_rate.push(run.per_cpu_s);
            if run.decoded == 1.0 {
                best = format!("{}M flows/s", rate as f64 / 1e6);
            }
            if receiver == Receiver::File {
                let lines = count_lines(&json_file)?;
                if lines != run.flows {
                    eprintln!(
                        "note: {name} at {rate} flows/s: {lines} JSON lines for {} flows decoded",
                        run.flows
                    );
                }
            }
        }
        println!("{row} {best} |");
        per_cpu_s.push((receiver, name, per_rate));
    }
    let _ = std::fs::remove_file(&json_file);
    print_ratios(rates, &per_cpu_s);
    Ok(())
}

/// Kafka: a shorter stream at a lower rate (the local broker is the limit).
fn kafka(pkts: &[Vec<u8>], bin: &Path) -> Result<()> {
    match flowexport_benches::tansu("input") {
        Ok(b) => {
            let port = free_udp_port()?;
            let brokers = b.addr();
            let p = flowexport_collect(
                bin,
                port,
                &["--kafka-brokers", &brokers, "--kafka-topic", "input"],
                Stdio::null(),
            )?;
            wait_bound(port)?;
            let id = p.0.id();
            let run = measure(&pkts[..KAFKA_PACKETS], port, KAFKA_RATE, &|| vec![id])?;
            println!(
                "\nflowexport collect into Kafka (local Tansu), {} flows at {KAFKA_RATE} flows/s: \
                 {:.1}% decoded, {:.2}M flows/CPU-s.",
                KAFKA_PACKETS * RECORDS_PER_PACKET,
                run.decoded * 100.0,
                run.per_cpu_s / 1e6
            );
        }
        Err(e) => eprintln!("no Kafka run: {e:#}"),
    }
    Ok(())
}

/// Each of flowexport's receivers against nfcapd, flows per CPU-second at
/// the same offered rate (issue 15's target: JSON lines to a file at 1.5x).
/// `--discard` and JSON to /dev/null bound what any JSON writer to a file
/// could reach: the decoding alone, and the decoding and the formatting
/// without the page cache.
fn print_ratios(rates: &[u64], runs: &[(Receiver, &str, Vec<f64>)]) {
    let Some((_, _, nfcapd)) = runs.iter().find(|r| r.0 == Receiver::Nfcapd) else {
        return;
    };
    println!("\nFlows per CPU-second against nfcapd's at the same offered rate:\n");
    let mut header = "| receiver |".to_string();
    for r in rates {
        header += &format!(" {}M flows/s |", *r as f64 / 1e6);
    }
    println!("{header}");
    println!("| --- |{}", " ---: |".repeat(rates.len()));
    let ours = [Receiver::Discard, Receiver::File, Receiver::Null];
    for (_, name, rates) in runs.iter().filter(|r| ours.contains(&r.0)) {
        let mut row = format!("| {name} / nfcapd |");
        for (ours, theirs) in rates.iter().zip(nfcapd) {
            row += &format!(" {:.2}x |", ours / theirs);
        }
        println!("{row}");
    }
}

/// Lines in a file (the JSON output so far).
fn count_lines(path: &Path) -> Result<u64> {
    let data = std::fs::read(path)?;
    Ok(data.iter().filter(|b| **b == b'\n').count() as u64)
}
