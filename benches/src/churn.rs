//! `cargo xtask bench churn`: N distinct flows cycling at the veth's full
//! rate into the agent with its default settings, beside the receive path
//! alone, in the same run: delivered packets/s, accuracy, drain durations,
//! drain throughput, agent CPU and memory, kernel map memory, and the
//! agent's CPU use with no traffic.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::exporters::Kind;
use crate::procstat::{quantile, range};
use crate::run::{self, Outcome};

#[derive(Args, Debug)]
pub(crate) struct ChurnArgs {
    /// Flow counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    flows: Vec<u32>,
    /// Frames per run (default: 6 per flow, at least 6 million).
    #[arg(long)]
    packets: Option<u64>,
    /// Runs of each point (receive-only and agent alternate).
    #[arg(long, default_value_t = 2)]
    repeat: u32,
    /// Seconds of the idle measurement (0: skip it).
    #[arg(long, default_value_t = 20)]
    idle_seconds: u64,
    /// Extra flags for the agent (default: none, its defaults).
    #[arg(long, allow_hyphen_values = true)]
    agent_args: Vec<String>,
}

pub(crate) fn run(a: &ChurnArgs) -> Result<()> {
    let agent = Kind::Agent(a.agent_args.clone());
    let mut rows = Vec::new();
    for &n in &a.flows {
        let packets = a
            .packets
            .unwrap_or_else(|| (6 * u64::from(n)).max(6_000_000));
        let mut rx = Vec::new();
        let mut ag: Vec<Outcome> = Vec::new();
        for i in 0..a.repeat {
            eprintln!("churn: {n} flows, {packets} frames, run {}", i + 1);
            rx.push(run::run(&Kind::ReceiveOnly, n, packets, None, false)?);
            ag.push(run::run(&agent, n, packets, None, false)?);
        }
        rows.push((n, packets, rx, ag));
    }
    let idle = if a.idle_seconds > 0 {
        eprintln!("churn: idle agent, {} s", a.idle_seconds);
        Some(run::idle_cpu(
            Duration::from_secs(3),
            Duration::from_secs(a.idle_seconds),
        )?)
    } else {
        None
    };

    println!(
        "Churn: N distinct flows cycling at the veth's full rate (trafgen, 64-byte UDP frames), \
         agent {}; {} run(s) per point, ranges over the runs",
        if a.agent_args.is_empty() {
            "with its defaults (--capture auto: TC ingress on veth)".to_string()
        } else {
            a.agent_args.join(" ")
        },
        a.repeat
    );
    println!(
        "| flows | frames | receive-only pps | agent pps | agent/receive-only | accuracy | flows exact | \
         drain p50 / p99 (ms) | final drain | flows drained/s/core | agent CPU-s per Mpkt | softirq CPU-s per Mpkt (receive-only) | agent peak RSS / anon | kernel maps |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    const MIB: f64 = 1048576.0;
    for (n, packets, rx, ag) in &rows {
        let f = |xs: &[f64], d: usize| range(xs, |x| format!("{x:.d$}"));
        // The range of `value` over the runs `os`, with `d` decimals.
        let col = |os: &[Outcome], value: &dyn Fn(&Outcome) -> f64, d: usize| {
            f(&os.iter().map(value).collect::<Vec<_>>(), d)
        };
        let ratio: Vec<f64> = ag.iter().zip(rx).map(|(a, r)| a.pps() / r.pps()).collect();
        let durations: Vec<f64> = ag
            .iter()
            .flat_map(|o| o.drains.iter().map(|d| d.0 * 1e3))
            .collect();
        let finals: Vec<f64> = ag
            .iter()
            .filter_map(|o| o.final_drain.map(|f| f.0))
            .collect();
        // Flows handled per second of drain time: the final drain reads and
        // exports every flow.
        let rate: Vec<f64> = ag
            .iter()
            .filter_map(|o| o.final_drain.map(|(s, r)| r as f64 / s.max(1e-9)))
            .collect();
        println!(
            "| {n} | {packets} | {} | {} | {} | {} | {} / {n} | {:.1} / {:.1} | {} s ({} records) | {}M | {} | {} ({}) | {} / {} MiB | {} MiB |",
            col(rx, &Outcome::pps, 0),
            col(ag, &Outcome::pps, 0),
            f(&ratio, 2),
            col(ag, &Outcome::accuracy, 4),
            col(ag, &|o| o.flows_exact as f64, 0),
            quantile(&durations, 0.5),
            quantile(&durations, 0.99),
            f(&finals, 2),
            ag.first().and_then(|o| o.final_drain).map_or(0, |f| f.1),
            range(&rate, |x| format!("{:.2}", x / 1e6)),
            col(ag, &Outcome::cpu_per_mpkt, 3),
            col(ag, &Outcome::softirq_per_mpkt, 3),
            col(rx, &Outcome::softirq_per_mpkt, 3),
            col(ag, &|o| o.usage.max_rss as f64 / MIB, 0),
            col(ag, &|o| o.rss_anon as f64 / MIB, 0),
            col(ag, &|o| o.kernel_memory as f64 / MIB, 1),
        );
    }
    if let Some(idle) = idle {
        println!();
        println!(
            "Idle: the agent with no traffic for {} s used {:.3}% of one core.",
            a.idle_seconds,
            idle * 100.0
        );
    }
    Ok(())
}
