//! Developer tasks: `cargo xtask build-ebpf`, `cargo xtask deb`, `cargo xtask
//! bench xdp|kafka|collect|consumers|churn|peers`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel programs (flowexport-ebpf) with nightly for
    /// bpfel-unknown-none into target/bpfel-unknown-none/release/flowexport.
    BuildEbpf {
        /// Build without optimizations (the verifier may reject it).
        #[arg(long)]
        debug: bool,
    },
    /// Build the Debian package target/debian/flowexport_VERSION_ARCH.deb
    /// (the release binary with the kernel object embedded, the systemd unit,
    /// the commented /etc/flowexport/agent.toml, the Prometheus and Grafana
    /// files); needs cargo-deb (scripts/setup.sh --test installs it).
    Deb,
    /// The integration tests (crate tests/): the real agent on veth pairs
    /// in network namespaces, real third-party tools. They need root (plain
    /// `cargo test` leaves them out and runs as any user); the package test
    /// needs `cargo xtask deb` first (scripts/test.sh does both).
    IntegrationTest {
        /// Extra arguments for `cargo test` (a test name, `--nocapture`...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks; see BENCHMARKS.md.
    Bench {
        /// What to benchmark: xdp, kafka, collect, consumers, churn, peers.
        what: String,
        /// Extra arguments for the benchmark binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `cargo` run in the workspace's root.
fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn build_ebpf(debug: bool) -> Result<()> {
    build_ebpf_into(debug, false)
}

/// The kernel object with the benchmark-only programs (feature `bench`),
/// into target/ebpf-bench/bpfel-unknown-none/release/flowexport, apart from
/// the production object.
fn build_bench_ebpf() -> Result<()> {
    build_ebpf_into(false, true)
}

fn build_ebpf_into(debug: bool, bench: bool) -> Result<()> {
    let root = root();
    let target = if bench {
        root.join("target/ebpf-bench")
    } else {
        root.join("target")
    };
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("flowexport-ebpf"))
        // Whatever toolchain runs xtask, the kernel crate needs nightly
        // (-Z build-std, set in flowexport-ebpf/.cargo/config.toml).
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .args(["+nightly", "build", "--target-dir"])
        .arg(&target);
    if !debug {
        cmd.arg("--release");
    }
    if bench {
        cmd.args(["--features", "bench"]);
    }
    run(&mut cmd).context(
        "building the eBPF object failed; it needs the nightly toolchain with rust-src and \
         bpf-linker (scripts/setup.sh installs both)",
    )?;
    let profile = if debug { "debug" } else { "release" };
    println!(
        "eBPF object: {}",
        target
            .join("bpfel-unknown-none")
            .join(profile)
            .join("flowexport")
            .display()
    );
    Ok(())
}

/// `cargo deb` over the release build; the package's contents are listed in
/// flowexport/Cargo.toml ([package.metadata.deb]).
fn deb() -> Result<()> {
    let has_cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_deb {
        bail!(
            "cargo-deb is not installed: run `scripts/setup.sh --test` or \
             `cargo install cargo-deb --version 3.8.0 --locked`"
        );
    }
    build_ebpf(false)?;
    let out = root().join("target/debian");
    run(cargo()
        .args(["deb", "-p", "flowexport", "--strip", "--output"])
        .arg(&out))
}

/// The release `flowexport` binary, which the benchmarks run as a process.
fn build_release_agent() -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "flowexport",
        "--bin",
        "flowexport",
    ]))
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf { debug } => build_ebpf(debug),
        Cmd::Deb => deb(),
        Cmd::IntegrationTest { args } => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                bail!(
                    "the integration tests need root (they create network namespaces and load BPF \
                     programs): run `sudo -E cargo xtask integration-test`, or as root. \
                     Plain `cargo test` runs the unit tests as any user"
                );
            }
            build_ebpf(false)?;
            run(cargo().args(["build", "--workspace", "--bins"]))?;
            run(cargo().args(["test", "-p", "flowexport-tests"]).args(&args))
        }
        Cmd::Bench { what, args } => {
            build_ebpf(false)?;
            // Benchmark binary, its leading arguments, and whether it runs
            // the `flowexport` binary itself (which is then built first).
            let (bin, lead, needs_flowexport): (&str, &[&str], bool) = match what.as_str() {
                "xdp" => ("flowexport-bench", &["xdp"], false),
                "kafka" => ("flowexport-bench-kafka", &[], false),
                "collect" => ("flowexport-bench-collect", &[], true),
                "consumers" => ("flowexport-bench-consumers", &[], true),
                // The scale benchmarks run the release agent against the
                // receive path and its peers (crate benches/).
                "churn" | "peers" => ("flowexport-scale-bench", &[what.as_str()], true),
                other => {
                    bail!(
                        "unknown benchmark {other:?}: available: xdp, kafka, collect, consumers, \
                         churn, peers"
                    )
                }
            };
            if needs_flowexport {
                build_release_agent()?;
            }
            // bench xdp's programs; bench peers' empty-program baselines.
            if what == "xdp" || what == "peers" {
                build_bench_ebpf()?;
            }
            run(cargo()
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "flowexport-benches",
                    "--bin",
                    bin,
                    "--",
                ])
                .args(lead)
                .args(&args))
        }
    }
}
