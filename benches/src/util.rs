//! Small pieces the benchmarks share: the release `flowexport` binary, CPU
//! time of a process, and sending a Kafka record while the producer queue
//! is full.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};

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
pub fn send_waiting<C, K, P>(p: &ThreadedProducer<C>, mut rec: BaseRecord<'_, K, P>)
where
    C: ProducerContext<DeliveryOpaque = ()> + 'static,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, r)) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// The release `flowexport` binary beside this benchmark's (`cargo xtask
/// bench` builds it first).
pub fn flowexport_bin() -> Result<PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("flowexport");
    if !bin.is_file() {
        bail!(
            "{} missing: cargo build --release --bin flowexport",
            bin.display()
        );
    }
    Ok(bin)
}
