//! Scale benchmarks of the flowexport agent (see BENCHMARKS.md): `churn`
//! (many flows at full rate, against the receive path alone) and `peers`
//! (against softflowd, fprobe and pmacctd). Run through `cargo xtask bench
//! churn|peers`, as root: each run creates its own namespaces and veth pair
//! and sends traffic only across it.

mod churn;
mod exporters;
mod peers;
mod procstat;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "flowexport scale benchmarks (root; own namespaces and veth pairs)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Many distinct flows at full rate: the agent against receive-only.
    Churn(churn::ChurnArgs),
    /// The agent against softflowd, fprobe and pmacctd.
    Peers(peers::PeersArgs),
}

fn main() -> Result<()> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        anyhow::bail!("the scale benchmarks need root (namespaces, veth pairs, XDP)");
    }
    match Cli::parse().cmd {
        Cmd::Churn(a) => churn::run(&a),
        Cmd::Peers(a) => peers::run(&a),
    }
}
