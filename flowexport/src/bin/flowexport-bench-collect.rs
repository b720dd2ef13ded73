//! `cargo xtask bench collect`: how fast the collector decodes, measured side
//! by side with pmacct's nfacctd in one run.
//!
//! A generator builds NetFlow v9 and IPFIX packets of 30 records each with
//! flowexport's own exporter (templates every 20 packets), then:
//!
//! 1. decode only, in process, one core: flows/s through `NetflowDecoder`;
//! 2. the same stream replayed over loopback UDP to `flowexport collect`
//!    (one worker; JSON lines to /dev/null; and, if a Tansu broker can be
//!    started, decode + Kafka publish) and to `nfacctd` with its print plugin
//!    writing CSV to a file. Each receiver gets the stream at a rate it can
//!    take without socket drops (checked in /proc/net/udp), and is charged
//!    the CPU time its processes used (utime + stime from /proc): flows per
//!    CPU-second is flows/s per core, comparable between the two.

use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowexport::codec::export::{ExportProtocol, ExportStream};
use flowexport::codec::netflow::NetflowDecoder;
use flowexport::record::{FlowRecord, FlowType, ETYPE_IPV4};

#[path = "bench-support/tansu.rs"]
mod tansu;
#[path = "bench-support/util.rs"]
mod util;
use util::cpu_seconds;

const RECORDS_PER_PACKET: usize = 30;
/// Packets per protocol in the stream.
const PACKETS: usize = 10_000;
/// Offered rate for the process comparison (packets/s), low enough that
/// both receivers keep up without socket drops.
const RATE_PPS: u64 = 4_000;
/// Packets of the decode + Kafka run: 45k flows, under the sink's buffer.
const KAFKA_PACKETS: usize = 1_500;

fn flows(n: usize) -> Vec<FlowRecord> {
    (0..n)
        .map(|i| FlowRecord {
            flow_type: FlowType::Ebpf,
            time_flow_start_ns: 1_763_799_990_000_000_000 + i as u64 * 1_000_000,
            time_flow_end_ns: 1_763_799_999_000_000_000 + i as u64 * 1_000_000,
            bytes: 100 + (i as u64 * 7919) % 100_000,
            packets: 1 + (i as u64 * 31) % 100,
            src_addr: std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into(),
            dst_addr: std::net::Ipv4Addr::from(0xc0a8_0000 + (i as u32 * 13) % 65536).into(),
            etype: ETYPE_IPV4,
            proto: if i % 4 == 0 { 6 } else { 17 },
            src_port: (1024 + i % 60000) as u16,
            dst_port: [53, 80, 443, 123][i % 4],
            in_if: 2,
            out_if: 3,
            ..FlowRecord::default()
        })
        .collect()
}

/// PACKETS packets of RECORDS_PER_PACKET records for one protocol.
fn stream(proto: ExportProtocol) -> Result<Vec<Vec<u8>>> {
    let recs = flows(RECORDS_PER_PACKET * PACKETS);
    let mut s = ExportStream::new(proto, 1, 9000, 60_000, 20, 1_763_799_000_000)?;
    let mut pkts = Vec::with_capacity(PACKETS);
    for chunk in recs.chunks(RECORDS_PER_PACKET) {
        let mut p = s.encode(chunk, 1_763_800_000_000);
        if p.len() != 1 {
            bail!("expected one packet per 30 records");
        }
        pkts.push(p.remove(0));
    }
    Ok(pkts)
}

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

fn replay(pkts: &[Vec<u8>], port: u16) -> Result<()> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    let gap = Duration::from_nanos(1_000_000_000 / RATE_PPS);
    let start = Instant::now();
    for (i, p) in pkts.iter().enumerate() {
        let due = start + gap * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        s.send_to(p, ("127.0.0.1", port))?;
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

/// Replays the stream to a receiver process set and returns flows per
/// CPU-second (and checks there were no socket drops).
fn measure(pkts: &[Vec<u8>], port: u16, pids: &dyn Fn() -> Vec<u32>) -> Result<f64> {
    let ps = pids();
    if ps.is_empty() {
        bail!("receiver not running");
    }
    let cpu0: f64 = ps.iter().map(|p| cpu_seconds(*p)).sum();
    let drops0 = udp_drops(port);
    replay(pkts, port)?;
    // Let the receiver finish what is queued.
    std::thread::sleep(Duration::from_millis(1500));
    let cpu1: f64 = pids().iter().map(|p| cpu_seconds(*p)).sum();
    let drops = udp_drops(port) - drops0;
    if drops > 0 {
        eprintln!("note: {drops} datagrams dropped by the receiver's socket at {RATE_PPS} pkt/s");
    }
    let received = (pkts.len() as u64).saturating_sub(drops) as usize;
    Ok((received * RECORDS_PER_PACKET) as f64 / (cpu1 - cpu0).max(0.01))
}

fn flowexport_collect(bin: &Path, port: u16, extra: &[&str]) -> Result<Proc> {
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
        .stdout(Stdio::null())
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

fn main() -> Result<()> {
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("flowexport");
    if !bin.is_file() {
        bail!(
            "{} missing: cargo build --release --bin flowexport",
            bin.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("fe-bench-collect-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("## Collector benchmark\n");
    println!(
        "{PACKETS} packets x {RECORDS_PER_PACKET} records per protocol; process runs replayed at {RATE_PPS} packets/s over loopback.\n"
    );
    let broker = tansu::Tansu::start("input")
        .map_err(|e| eprintln!("no Kafka column: {e:#}"))
        .ok();
    println!("| protocol | decode only, in process (flows/s, 1 core) | collect --discard: decode only (flows per CPU-second) | collect, decode + Kafka publish | collect, decode + JSON to /dev/null | nfacctd, print plugin (flows per CPU-second) | decode only / nfacctd |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, proto) in [
        ("NetFlow v9", ExportProtocol::NetflowV9),
        ("IPFIX", ExportProtocol::Ipfix),
    ] {
        let pkts = stream(proto)?;
        let decode = decode_only(&pkts);
        let run_ours = |extra: &[&str]| -> Result<f64> {
            let port = free_udp_port()?;
            let p = flowexport_collect(&bin, port, extra)?;
            wait_bound(port)?;
            let id = p.0.id();
            measure(&pkts, port, &|| vec![id])
        };
        let discard = run_ours(&["--discard"])?;
        let json = run_ours(&[])?;
        // Kafka: a shorter stream, below the producer's buffer bound at the
        // local broker's speed, so nothing is dropped.
        let kafka = match &broker {
            Some(b) => {
                let port = free_udp_port()?;
                let brokers = b.brokers();
                let p = flowexport_collect(
                    &bin,
                    port,
                    &["--kafka-brokers", &brokers, "--kafka-topic", "input"],
                )?;
                wait_bound(port)?;
                let id = p.0.id();
                format!(
                    "{:.0}",
                    measure(&pkts[..KAFKA_PACKETS], port, &|| vec![id])?
                )
            }
            None => "n/a (no tansu)".to_string(),
        };
        let port = free_udp_port()?;
        let theirs = {
            let p = nfacctd(&dir, port)?;
            wait_bound(port)?;
            let pgid = p.0.id();
            measure(&pkts, port, &|| pids_in_group(pgid))?
        };
        println!(
            "| {name} | {decode:.0} | {discard:.0} | {kafka} | {json:.0} | {theirs:.0} | {:.1}x |",
            discard / theirs
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
