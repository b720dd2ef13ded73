//! `cargo xtask bench peers`: the agent beside softflowd, fprobe and
//! pmacctd (nfprobe), and the receive path alone, on the same veth pair
//! and traffic, at 1, 10k, 100k and 1M flows, at 50k packets/s and at full
//! rate. Every exporter sends NetFlow (fprobe v5, the others v9) to nfcapd;
//! accuracy is nfdump's packets of the generated flows over the packets
//! delivered to the interface.

use anyhow::Result;
use clap::Args;

use crate::exporters::{Floor, Kind};
use crate::procstat::range;
use crate::run::{self, Outcome};

#[derive(Args, Debug)]
pub(crate) struct PeersArgs {
    /// Flow counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10000,100000,1000000")]
    flows: Vec<u32>,
    /// Rates in packets/s, comma-separated; 0 is the full rate.
    #[arg(long, value_delimiter = ',', default_value = "50000,0")]
    rates: Vec<u64>,
    /// Exporters, comma-separated (receive-only is always measured):
    /// flowexport (the defaults: `--capture auto`, TC ingress on veth),
    /// flowexport-xdp (`--xdp-mode native`: XDP ingress), flowexport-tc
    /// (`--capture tc`), flowexport-mirror (`--mirror`: XDP counts and drops, as on a SPAN
    /// port), flowexport-afxdp (`--capture afxdp --mirror`), xdp-empty and
    /// tc-empty (an empty program on the agent's ingress hook, nothing
    /// else: the floor of any program there), tc-parse (TC ingress that
    /// only parses the headers, as the agent does), tc-parse-clock
    /// (tc-parse plus the clock helper), softflowd, fprobe, pmacctd.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "flowexport,flowexport-xdp,xdp-empty,tc-empty,softflowd,fprobe,pmacctd"
    )]
    exporters: Vec<String>,
    /// Runs of each point; exporters alternate within a repetition.
    #[arg(long, default_value_t = 2)]
    repeat: u32,
    /// Extra flags for the agent.
    #[arg(long, allow_hyphen_values = true)]
    agent_args: Vec<String>,
}

fn kind(name: &str, agent_args: &[String]) -> Result<Kind> {
    // The agent with `lead` before the extra flags.
    let agent = |lead: &[&str]| {
        let mut a: Vec<String> = lead.iter().map(ToString::to_string).collect();
        a.extend_from_slice(agent_args);
        Kind::Agent(a)
    };
    Ok(match name {
        // The defaults: `--capture auto`, which is TC on veth.
        "flowexport" => agent(&[]),
        // Ingress counted by XDP in native mode, or by the TC program.
        "flowexport-xdp" => agent(&["--xdp-mode", "native"]),
        "flowexport-tc" => agent(&["--capture", "tc"]),
        // A mirror port: the copies are counted and dropped, in the XDP
        // program or after AF_XDP hands them to the agent's workers.
        "flowexport-mirror" => agent(&["--mirror", "--xdp-mode", "native"]),
        "flowexport-afxdp" => agent(&["--capture", "afxdp", "--mirror"]),
        "xdp-empty" => Kind::Floor(Floor::XdpEmpty),
        "tc-empty" => Kind::Floor(Floor::TcEmpty),
        "tc-parse" => Kind::Floor(Floor::TcParse),
        "tc-parse-clock" => Kind::Floor(Floor::TcParseClock),
        "softflowd" => Kind::Softflowd,
        "fprobe" => Kind::Fprobe,
        "pmacctd" => Kind::Pmacctd,
        other => {
            anyhow::bail!(
                "unknown exporter {other:?}: use flowexport, flowexport-xdp, flowexport-tc, \
                 flowexport-mirror, flowexport-afxdp, xdp-empty, tc-empty, tc-parse, \
                 tc-parse-clock, softflowd, fprobe, pmacctd"
            )
        }
    })
}

/// Frames per run: at a set rate ~10 s (at least one per flow); at full
/// rate 3 per flow, at least 3 million.
fn frames(n: u32, rate: u64) -> u64 {
    if rate > 0 {
        (rate * 10).max(u64::from(n))
    } else {
        (3 * u64::from(n)).max(3_000_000)
    }
}

pub(crate) fn run(a: &PeersArgs) -> Result<()> {
    let mut kinds = vec![Kind::ReceiveOnly];
    for e in &a.exporters {
        kinds.push(kind(e, &a.agent_args)?);
    }
    println!(
        "Peers: the same veth pair and trafgen traffic (64-byte UDP frames, N flows round \
         robin); {} run(s) per point, ranges over the runs; CPU-s per million delivered \
         packets: the exporter's processes while they process the traffic (until they \
         caught up) and over the whole run (start-up and the final export included), and \
         the system's softirq during the traffic (the receive path, where XDP runs)",
        a.repeat
    );
    for &rate in &a.rates {
        println!();
        println!(
            "### {}",
            if rate == 0 {
                "Full rate".to_string()
            } else {
                format!("{rate} packets/s")
            }
        );
        println!();
        println!(
            "| flows | exporter | delivered pps | vs receive-only | accuracy | flows exact | userspace CPU-s/Mpkt: traffic (whole run) | softirq CPU-s/Mpkt | peak RSS (MiB) | collector socket drops |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &n in &a.flows {
            let packets = frames(n, rate);
            let mut results: Vec<Vec<Outcome>> = vec![Vec::new(); kinds.len()];
            for i in 0..a.repeat {
                for (k, kind) in kinds.iter().enumerate() {
                    eprintln!(
                        "peers: {} at {}, {n} flows, {packets} frames, run {}",
                        kind.name(),
                        if rate == 0 {
                            "full rate".into()
                        } else {
                            format!("{rate} pps")
                        },
                        i + 1
                    );
                    results[k].push(run::run(
                        kind,
                        n,
                        packets,
                        (rate > 0).then_some(rate),
                        true,
                    )?);
                }
            }
            let rx: Vec<f64> = results[0].iter().map(Outcome::pps).collect();
            for (k, kind) in kinds.iter().enumerate() {
                let os = &results[k];
                let f = |xs: Vec<f64>, d: usize| range(&xs, |x| format!("{x:.d$}"));
                let pps: Vec<f64> = os.iter().map(Outcome::pps).collect();
                let ratio: Vec<f64> = pps.iter().zip(&rx).map(|(p, r)| p / r).collect();
                let is_rx = *kind == Kind::ReceiveOnly;
                // Baselines export nothing: only their rate and softirq.
                let base = kind.is_baseline();
                println!(
                    "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    kind.name(),
                    f(pps, 0),
                    if is_rx { "1".into() } else { f(ratio, 2) },
                    if base {
                        "–".into()
                    } else {
                        f(os.iter().map(Outcome::accuracy).collect(), 4)
                    },
                    if base {
                        "–".into()
                    } else {
                        f(os.iter().map(|o| o.flows_exact as f64).collect(), 0)
                    },
                    if base {
                        "–".into()
                    } else {
                        format!(
                            "{} ({})",
                            f(os.iter().map(Outcome::traffic_cpu_per_mpkt).collect(), 3),
                            f(os.iter().map(Outcome::cpu_per_mpkt).collect(), 3)
                        )
                    },
                    f(os.iter().map(Outcome::softirq_per_mpkt).collect(), 3),
                    if base {
                        "–".into()
                    } else {
                        f(
                            os.iter()
                                .map(|o| o.usage.max_rss as f64 / 1048576.0)
                                .collect(),
                            0,
                        )
                    },
                    if base {
                        "–".into()
                    } else {
                        f(os.iter().map(|o| o.rcvbuf_drops as f64).collect(), 0)
                    },
                );
            }
        }
    }
    Ok(())
}
