//! Small pieces the benchmarks share: the release `flowexport` binary, CPU
//! time of a process, and sending a Kafka record while the producer queue
//! is full.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flowexport::codec::netflow::encode::{ExportProtocol, ExportStream};
use flowexport::record::{FlowRecord, FlowType, ETYPE_IPV4};

use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};

use flowexport_tests::kafka::send_retrying;

/// utime + stime of a process and its threads, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm.
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Sends `rec`, waiting 1 ms at a time while the producer's queue is full
/// (a benchmark sends as fast as the broker takes it).
pub fn send_waiting<C, K, P>(p: &ThreadedProducer<C>, rec: BaseRecord<'_, K, P>)
where
    C: ProducerContext<DeliveryOpaque = ()> + 'static,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    send_retrying(p, rec, Duration::from_millis(1));
}

/// The `flowexport` binary the benchmarks run: $FLOWEXPORT_BIN (to measure
/// another build), else the release binary beside this benchmark's (`cargo
/// xtask bench` builds both).
pub fn flowexport_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLOWEXPORT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("flowexport");
    if !bin.is_file() {
        bail!(
            "{} missing: cargo build --release --bin flowexport, or set FLOWEXPORT_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// Records per export packet in the generated streams.
pub const RECORDS_PER_PACKET: usize = 30;

/// Flow `i` of the generated IPv4 flows (UDP and TCP, varied addresses and
/// ports, in on interface 2): its identity, without times or counters.
pub fn base_flow(i: usize) -> FlowRecord {
    FlowRecord {
        flow_type: FlowType::Ebpf,
        src_addr: std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into(),
        dst_addr: std::net::Ipv4Addr::from(0xc0a8_0000 + (i as u32 * 13) % 65536).into(),
        etype: ETYPE_IPV4,
        proto: if i.is_multiple_of(4) { 6 } else { 17 },
        src_port: (1024 + i % 60000) as u16,
        dst_port: [53, 80, 443, 123][i % 4],
        in_if: 2,
        ..FlowRecord::default()
    }
}

/// `n` distinct IPv4 flows, varied counters and ports (UDP and TCP).
pub fn flows(n: usize) -> Vec<FlowRecord> {
    (0..n)
        .map(|i| FlowRecord {
            time_flow_start_ns: 1_763_799_990_000_000_000 + i as u64 * 1_000_000,
            time_flow_end_ns: 1_763_799_999_000_000_000 + i as u64 * 1_000_000,
            bytes: 100 + (i as u64 * 7919) % 100_000,
            packets: 1 + (i as u64 * 31) % 100,
            out_if: 3,
            ..base_flow(i)
        })
        .collect()
}

/// `packets` export packets of [`RECORDS_PER_PACKET`] records each, one
/// protocol, from flowexport's own exporter (templates every 20 packets).
pub fn stream(proto: ExportProtocol, packets: usize) -> Result<Vec<Vec<u8>>> {
    let recs = flows(RECORDS_PER_PACKET * packets);
    let mut s = ExportStream::new(proto, 1, 9000, 60_000, 20, 1_763_799_000_000)?;
    let mut pkts = Vec::with_capacity(packets);
    for chunk in recs.chunks(RECORDS_PER_PACKET) {
        let mut p = s.encode(chunk, 1_763_800_000_000);
        if p.len() != 1 {
            bail!("expected one packet per 30 records");
        }
        pkts.push(p.remove(0));
    }
    Ok(pkts)
}
