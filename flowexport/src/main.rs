use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use flowexport::cmd::agent::config::AgentArgs;

/// flowexport: per-flow packet and byte counters from XDP/TC programs, exported
/// as flow records (JSON lines on stdout by default).
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the agent's flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Count flows on interfaces with XDP (ingress) and TC (egress) programs
    /// and export them; runs until SIGINT/SIGTERM, then drains and exits.
    Agent(AgentArgs),
    /// Receive NetFlow v5/v9, IPFIX and sFlow v5 over UDP and publish every
    /// flow to Kafka (or print JSON lines); runs until SIGINT/SIGTERM.
    Collect(flowexport::cmd::collect::CollectArgs),
    /// Read flows from Kafka, add customer ids (CIDR list) and AS numbers
    /// (ASN table), write them to another topic; at least once.
    Enrich(flowexport::cmd::enrich::EnrichArgs),
    /// Read enriched flows from Kafka and write each to a per-customer
    /// topic `<prefix><cid>`; at least once.
    Split(flowexport::cmd::split::SplitArgs),
    /// Read flows from Kafka and serve them as Prometheus counters (by
    /// customer, direction, protocol, application, exporter); also a
    /// drop-in for flow-exporter (--broker, --topic, --asn).
    Dashboard(flowexport::cmd::dashboard::DashboardArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    // "flowexport X.Y.Z (pinned layout N)": the package's preinst reads the
    // layout of the installed version to decide whether an upgrade must
    // detach its pinned state first (deploy/debian/preinst).
    let version: &'static str = Box::leak(
        format!(
            "{} (pinned layout {})",
            env!("CARGO_PKG_VERSION"),
            flowexport_common::LAYOUT_VERSION
        )
        .into_boxed_str(),
    );
    let cli = match Cli::command()
        .version(version)
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Agent(args) => args.resolve().and_then(flowexport::cmd::agent::run),
        Command::Collect(args) => flowexport::cmd::collect::run(args),
        Command::Enrich(args) => flowexport::cmd::enrich::run(args),
        Command::Split(args) => flowexport::cmd::split::run(args),
        Command::Dashboard(args) => flowexport::cmd::dashboard::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", flowexport::cmd::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
