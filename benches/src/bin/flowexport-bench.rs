//! `cargo xtask bench xdp`: the XDP ingress program's cost per packet,
//! measured with BPF_PROG_TEST_RUN beside an empty XDP_PASS program
//! (`flowexport_bench_pass`, compiled with the `bench` feature into a copy
//! of the kernel object that only the benchmark loads) in the same run.
//!
//! For IPv4 and IPv6 64-byte UDP frames and flow tables holding 1, 10k, 100k and
//! 1M flows:
//!
//! * **hot**: one existing flow's frame, `repeat` times in one
//!   BPF_PROG_TEST_RUN call (default 1M): the per-packet cost of updating a
//!   flow that is already in the table, with the table at that size. The
//!   kernel reports the mean ns per run. The same frame goes through the
//!   empty program with the same repeat; best of `--rounds` for each.
//! * **breakdown**: the same hot frame through two cut-down copies of the
//!   ingress program (parser only; parser + clock word and epoch reads), so
//!   the cost of the flow update (cache slot, or hash table) shows on its
//!   own.
//! * **new**: the first packet of each of the N flows (one call per frame,
//!   repeat 1): the insert path.
//! * **rotating**: one more packet of each of the N flows, in order, one call
//!   per frame: every packet misses the per-CPU cache (another flow holds
//!   its slot) and becomes a `MISSES` record, which the benchmark counts in
//!   the table every 100,000 packets as the agent's drain thread does
//!   (untimed: another CPU's work). Single runs include the kernel's timer
//!   reads, so compare them only with the empty program measured the same
//!   way.
//! * **in one call** (new and rotating again, on a fresh table): calls
//!   with repeat N through `flowexport_bench_rotate`, which counts flow
//!   i mod N on run i with the ingress program's own flow update: the
//!   packets of N distinct flows back to back, as a NAPI batch brings them,
//!   with no syscall between them (a call per packet also pays for the
//!   caches and TLB entries the syscall evicts); at most 100,000 runs per
//!   call, the ring counted between calls. The rotating calls go round the
//!   N flows until they have sent `--repeat` packets (best of `--rounds`).
//!   Compared with the empty program's hot figure. Every flow's count is
//!   checked afterwards.
//! * **--ring**: the same in one call with the table path instead
//!   (`flowexport_bench_table`: a missed packet counted in the table on the
//!   receiving CPU, as before the `MISSES` ring), and what the drain thread
//!   pays per record to count the ring's records in the table through
//!   `flowexport_replay` (a batch per BPF_PROG_TEST_RUN call, syscalls
//!   included): both sides of the ring.
//! * **memory floor**: this host's cost of one random access over the
//!   largest table measured (a pointer chase, 4 KiB and 2 MiB pages), the
//!   floor under any miss that reads a slot of that table.
//!
//! The table is filled by the real program (the "new" pass), then the run
//! checks that no packet went to the fallback path and that the hot flow's
//! packet count equals what was sent, so the numbers are for the path the
//! agent really takes.
//!
//! * **TC**: the same hot frame through the egress program (TC; the
//!   `--capture tc` ingress program is the same code), through a copy of it
//!   that reads every header with bpf_skb_load_bytes (as it did before it
//!   read the skb's linear data directly), and through an empty TC program.

use std::net::{Ipv4Addr, Ipv6Addr};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::programs::{Program, SchedClassifier, TestRun, TestRunOptions, Xdp};
use clap::Parser;
use flowexport::capture::aggregator::{FlowAggregator, Timeouts};
use flowexport::capture::drain::{KernelTables, Start};
use flowexport::capture::filter::{compile, KernelFilter, Rule};
use flowexport::capture::loader::{Capture, LoadOptions, Programs};
use flowexport::capture::table::{slots_for, table_bytes};
use flowexport_common::{
    FallbackEvent, FlowKey, BENCH_PORTS, DEFAULT_CACHE_SLOTS, DIR_EGRESS, DIR_INGRESS,
    MAP_BENCH_ROTATE, PROG_BENCH_PARSE, PROG_BENCH_PARSE_CLOCK, PROG_BENCH_PASS, PROG_BENCH_ROTATE,
    PROG_BENCH_TABLE, PROG_BENCH_TC_HELPER, PROG_BENCH_TC_PASS, PROG_EGRESS, PROG_INGRESS,
    PROG_REPLAY, REPLAY_BATCH,
};

#[derive(Parser)]
#[command(about = "XDP ingress program vs an empty XDP program, via BPF_PROG_TEST_RUN")]
struct Args {
    /// What to benchmark (only `xdp`).
    what: String,
    /// Repeat count of each hot-path BPF_PROG_TEST_RUN call.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Hot-path rounds per program; the best round is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Table sizes (flows) to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10000,100000,1000000")]
    flows: Vec<u32>,
    /// Flow-cache slots per generation, as the agent's --cache-slots (0:
    /// no cache, every packet goes to the hash table).
    #[arg(long, default_value_t = DEFAULT_CACHE_SLOTS)]
    cache_slots: u32,
    /// The kernel object built with the benchmark programs (`cargo xtask
    /// bench xdp` builds it; the production object has none of them).
    #[arg(long, default_value = flowexport_benches::BENCH_OBJECT)]
    bpf_object: std::path::PathBuf,
    /// Also measure the miss path with the table path instead of the
    /// MISSES ring (`flowexport_bench_table`, as before the ring), and what
    /// counting the ring's records costs the agent's drain thread.
    #[arg(long)]
    ring: bool,
}

const FRAME_LEN: usize = 64;
/// The ifindex BPF_PROG_TEST_RUN gives XDP programs: the loopback device.
const TEST_RUN_IFINDEX: u32 = 1;

#[derive(Clone, Copy, PartialEq)]
enum Family {
    V4,
    V6,
}

/// The i-th flow: source address and port vary, destination fixed.
/// (`flowexport_bench_rotate` derives the same from flow 0's frame.)
fn flow_tuple(i: u32) -> (u32, u16) {
    (i / BENCH_PORTS, (1024 + i % BENCH_PORTS) as u16)
}

/// A 64-byte Ethernet frame carrying UDP, IP lengths consistent with it.
fn frame(family: Family, i: u32) -> Vec<u8> {
    let (hi, sport) = flow_tuple(i);
    let mut f = Vec::with_capacity(FRAME_LEN);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
    match family {
        Family::V4 => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let total = (FRAME_LEN - 14) as u16;
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
            f.extend_from_slice(&(Ipv4Addr::new(10, 1, 0, 0).to_bits() + hi).to_be_bytes());
            f.extend_from_slice(&Ipv4Addr::new(10, 2, 0, 1).octets());
        }
        Family::V6 => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            let payload = (FRAME_LEN - 14 - 40) as u16;
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&payload.to_be_bytes());
            f.extend_from_slice(&[17, 64]);
            let src: Ipv6Addr = "2001:db8:1::".parse().unwrap();
            f.extend_from_slice(&(src.to_bits() + hi as u128).to_be_bytes());
            let dst: Ipv6Addr = "2001:db8:2::1".parse().unwrap();
            f.extend_from_slice(&dst.octets());
        }
    }
    let udp_len = (FRAME_LEN - f.len()) as u16;
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&4739u16.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(FRAME_LEN, 0xab);
    f
}

/// The key the ingress program builds for flow `i` (generation 0).
fn key(family: Family, i: u32) -> FlowKey {
    let (hi, sport) = flow_tuple(i);
    let mut k = FlowKey {
        ifindex: TEST_RUN_IFINDEX,
        src_port: sport,
        dst_port: 4739,
        direction: DIR_INGRESS,
        proto: 17,
        ..FlowKey::default()
    };
    match family {
        Family::V4 => {
            k.ip_version = 4;
            k.src_addr[..4]
                .copy_from_slice(&(Ipv4Addr::new(10, 1, 0, 0).to_bits() + hi).to_be_bytes());
            k.dst_addr[..4].copy_from_slice(&Ipv4Addr::new(10, 2, 0, 1).octets());
        }
        Family::V6 => {
            k.ip_version = 6;
            let src: Ipv6Addr = "2001:db8:1::".parse().unwrap();
            k.src_addr = (src.to_bits() + hi as u128).to_be_bytes();
            k.dst_addr = "2001:db8:2::1".parse::<Ipv6Addr>().unwrap().octets();
        }
    }
    k
}

fn run(prog: &Xdp, data: &[u8], repeat: u32) -> Result<f64> {
    test_run(prog, data, repeat, 2, "XDP_PASS")
}

/// One BPF_PROG_TEST_RUN call of `prog` on `data`, `repeat` times: the mean
/// ns per run, after checking the program returned `want` (`name`).
fn test_run<P>(prog: &P, data: &[u8], repeat: u32, want: u32, name: &str) -> Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(data),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN failed (needs root and CAP_BPF)")?;
    if r.return_value != want {
        bail!(
            "program returned {} instead of {name} ({want})",
            r.return_value
        );
    }
    Ok(r.duration.as_nanos() as f64)
}

/// Mean ns per frame over one call per frame.
fn run_each(prog: &Xdp, frames: &[Vec<u8>], tables: &mut KernelTables) -> Result<f64> {
    let mut total = 0.0;
    for (i, f) in frames.iter().enumerate() {
        total += run(prog, f, 1)?;
        if (i + 1) % REPLAY_EVERY as usize == 0 {
            tables.replay_misses()?;
        }
    }
    tables.replay_misses()?;
    Ok(total / frames.len() as f64)
}

/// Packets between two (untimed) counts of the `MISSES` ring, as the agent
/// counts it every 10 ms: fewer than the ring holds (~190k records), so the
/// programs take the agent's path throughout, not the full ring's.
const REPLAY_EVERY: u32 = 100_000;

/// `repeat` runs of `prog` on `frame` in calls of at most `REPLAY_EVERY`,
/// the `MISSES` ring counted between them (untimed): mean ns per run.
fn run_chunked(prog: &Xdp, frame: &[u8], repeat: u32, tables: &mut KernelTables) -> Result<f64> {
    let mut left = repeat;
    let mut total = 0.0;
    while left > 0 {
        let n = left.min(REPLAY_EVERY);
        total += run(prog, frame, n)? * f64::from(n);
        tables.replay_misses()?;
        left -= n;
    }
    Ok(total / f64::from(repeat))
}

struct Row {
    family: &'static str,
    flows: u32,
    hot: f64,
    hot_empty: f64,
    hot_parse: f64,
    hot_parse_clock: f64,
    new: Option<(f64, f64)>,
    rotating: Option<(f64, f64)>,
    /// (new, rotating) ns per packet in one call of repeat N.
    one_call: Option<(f64, f64)>,
    /// `--ring`: (new, rotating) ns per packet in one call with the table
    /// path instead of the ring.
    table: Option<(f64, f64)>,
    /// `--ring`: (new, rotating) ns per record replayed into the table.
    replay: Option<(f64, f64)>,
}

/// The programs and the agent's drain state and clock word, as the agent
/// runs them, with the benchmark programs loaded too.
fn load(
    args: &Args,
    max_flows: u32,
    sampling: u32,
    filter: KernelFilter,
) -> Result<(Programs, KernelTables)> {
    let mut cap = Programs::load(&LoadOptions {
        pins: None,
        max_flows,
        fallback_ring_bytes: 1 << 16,
        cache_slots: args.cache_slots,
        object: Some(args.bpf_object.clone()),
        capture: Capture::Xdp,
        sampling,
        filter,
        mirror: false,
    })?;
    for name in [
        PROG_BENCH_PASS,
        PROG_BENCH_PARSE,
        PROG_BENCH_PARSE_CLOCK,
        PROG_BENCH_ROTATE,
        PROG_BENCH_TABLE,
        PROG_BENCH_TC_PASS,
        PROG_BENCH_TC_HELPER,
    ] {
        match cap
            .ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object lacks {name}; rebuild it"))?
        {
            Program::Xdp(p) => p.load()?,
            Program::SchedClassifier(p) => p.load()?,
            _ => bail!("{name} is neither an XDP nor a TC program"),
        }
    }
    let tables = KernelTables::new(
        &mut cap.ebpf,
        max_flows,
        slots_for(max_flows),
        args.cache_slots,
        1 << 16,
        Duration::from_millis(1),
        Start::Fresh,
    )?;
    Ok((cap, tables))
}

/// The clock word rests when no packet came for 100 ms, or when the packet
/// rate is too low for ticks to pay; every measured run starts with it
/// ticking, as it does under heavy traffic.
fn ticking(tables: &KernelTables) -> Result<()> {
    tables.clock().set_rate(u64::MAX);
    tables.clock().wake();
    let deadline = Instant::now() + Duration::from_secs(1);
    while !tables.clock().ticking() {
        if Instant::now() > deadline {
            bail!("the clock thread did not resume");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Ten `--filter` rules none of the benchmark's frames match: every packet
/// is checked against all ten (two trie look-ups, ten rules), then counted.
const TEN_RULES: [&str; 10] = [
    "action=reject,cidr=10.99.0.0/16",
    "action=reject,src-cidr=192.0.2.0/24",
    "action=reject,dst-cidr=198.51.100.0/24",
    "action=reject,cidr=2001:db8:99::/48",
    "action=reject,proto=tcp,port=22",
    "action=reject,proto=udp,dst-port=53",
    "action=reject,direction=egress,proto=udp,port=4739",
    "action=reject,proto=47",
    "action=reject,src-port=7",
    "action=reject,proto=icmp",
];

/// The hot path (one flow's frame, repeated) of the ingress program loaded
/// without options, with `TEN_RULES`, with `--sampling 100`, and with the
/// ten rules but no CIDR (the trie look-ups' share), beside the empty
/// program: (plain, ten rules, sampling 100, rules without CIDRs, empty) ns
/// per packet, best of `--rounds`, interleaved.
fn selection(args: &Args, family: Family) -> Result<[f64; 5]> {
    let parse = |rules: &[&str]| -> Result<Vec<Rule>> {
        Ok(rules
            .iter()
            .map(|r| Rule::parse(r))
            .collect::<Result<_, _>>()?)
    };
    let rules = parse(&TEN_RULES)?;
    // The same, with the four CIDR rules replaced by port rules.
    let mut no_cidr = vec![
        "action=reject,port=1",
        "action=reject,port=2",
        "action=reject,port=3",
        "action=reject,port=4",
    ];
    no_cidr.extend_from_slice(&TEN_RULES[4..]);
    let variants = [
        (1, KernelFilter::default()),
        (1, compile(&rules)?),
        (100, KernelFilter::default()),
        (1, compile(&parse(&no_cidr)?)?),
    ];
    let mut loaded: Vec<(Programs, KernelTables)> = variants
        .into_iter()
        .map(|(sampling, filter)| load(args, 1024, sampling, filter))
        .collect::<Result<_>>()?;
    let frame = frame(family, 0);
    let mut best = [f64::MAX; 5];
    for _ in 0..args.rounds {
        for (i, (cap, tables)) in loaded.iter().enumerate() {
            ticking(tables)?;
            let p: &Xdp = cap.ebpf.program(PROG_INGRESS).unwrap().try_into()?;
            best[i] = best[i].min(run(p, &frame, args.repeat)?);
        }
        let pass: &Xdp = loaded[0]
            .0
            .ebpf
            .program(PROG_BENCH_PASS)
            .unwrap()
            .try_into()?;
        best[4] = best[4].min(run(pass, &frame, args.repeat)?);
    }
    // The rules must have let every packet through.
    let filtered = loaded[1].1.stats()?.filtered(DIR_INGRESS);
    if filtered != 0 {
        bail!("{filtered} packets were filtered: the rules match the benchmark's frame");
    }
    // Sampling must have kept about 1 in 100 (within 5 standard deviations).
    let kept: u64 = final_drain(&mut loaded[2].1)?.values().sum();
    let sent = f64::from(args.rounds) * f64::from(args.repeat);
    let (want, sd) = (sent / 100.0, (sent * 0.01 * 0.99).sqrt());
    if (kept as f64 - want).abs() > 5.0 * sd {
        bail!(
            "--sampling 100 kept {kept} of {sent} packets, expected {want:.0} +- {:.0}",
            5.0 * sd
        );
    }
    eprintln!(
        "{}: --sampling 100 kept {kept} of {sent} packets",
        fam_name(family)
    );
    Ok(best)
}

/// TC_ACT_UNSPEC (-1) as BPF_PROG_TEST_RUN reports it.
const TC_ACT_UNSPEC: u32 = u32::MAX;

/// The TC programs' hot path (the egress program; `--capture tc` ingress
/// is the same code), one flow's frame repeated: (egress, the same with
/// every header read through bpf_skb_load_bytes, empty TC program) ns per
/// packet, best of `--rounds`, interleaved. Both counting programs count
/// into the one flow, which the drain must then hold with every packet.
fn tc(args: &Args, family: Family) -> Result<[f64; 3]> {
    let (cap, mut tables) = load(args, 1024, 1, KernelFilter::default())?;
    let prog =
        |name| -> Result<&SchedClassifier> { Ok(cap.ebpf.program(name).unwrap().try_into()?) };
    let progs = [
        prog(PROG_EGRESS)?,
        prog(PROG_BENCH_TC_HELPER)?,
        prog(PROG_BENCH_TC_PASS)?,
    ];
    let frame = frame(family, 0);
    let mut best = [f64::MAX; 3];
    for _ in 0..args.rounds {
        for (b, p) in best.iter_mut().zip(progs) {
            ticking(&tables)?;
            *b = b.min(test_run(
                p,
                &frame,
                args.repeat,
                TC_ACT_UNSPEC,
                "TC_ACT_UNSPEC",
            )?);
        }
    }
    let got = final_drain(&mut tables)?;
    let want = 2 * u64::from(args.rounds) * u64::from(args.repeat);
    let k = FlowKey {
        direction: DIR_EGRESS,
        ..key(family, 0)
    };
    let counted = got.get(&k).copied().unwrap_or(0);
    if counted != want || got.len() != 1 {
        bail!(
            "TC: the flow counted {counted} packets in {} flows, expected {want} in 1",
            got.len()
        );
    }
    Ok(best)
}

fn measure(args: &Args, family: Family, n: u32) -> Result<Row> {
    // The agent's sizing rule: a table of at least twice the flows.
    let max_flows = n.max(1024);
    let (cap, mut tables) = load(args, max_flows, 1, KernelFilter::default())?;
    let ingress: &Xdp = cap.ebpf.program(PROG_INGRESS).unwrap().try_into()?;
    let pass: &Xdp = cap.ebpf.program(PROG_BENCH_PASS).unwrap().try_into()?;
    let parse: &Xdp = cap.ebpf.program(PROG_BENCH_PARSE).unwrap().try_into()?;
    let parse_clock: &Xdp = cap
        .ebpf
        .program(PROG_BENCH_PARSE_CLOCK)
        .unwrap()
        .try_into()?;

    eprintln!("{}: {n} flows: filling the table", fam_name(family));
    let frames: Vec<Vec<u8>> = (0..n).map(|i| frame(family, i)).collect();
    ticking(&tables)?;
    let new = run_each(ingress, &frames, &mut tables)?;
    let new_empty = run_each(pass, &frames, &mut tables)?;
    let rotating = if n > 1 {
        ticking(&tables)?;
        let r = run_each(ingress, &frames, &mut tables)?;
        let e = run_each(pass, &frames, &mut tables)?;
        Some((r, e))
    } else {
        None
    };

    let mut hot = f64::MAX;
    let mut hot_empty = f64::MAX;
    let mut hot_parse = f64::MAX;
    let mut hot_parse_clock = f64::MAX;
    for _ in 0..args.rounds {
        ticking(&tables)?;
        hot = hot.min(run(ingress, &frames[0], args.repeat)?);
        hot_empty = hot_empty.min(run(pass, &frames[0], args.repeat)?);
        hot_parse = hot_parse.min(run(parse, &frames[0], args.repeat)?);
        ticking(&tables)?;
        hot_parse_clock = hot_parse_clock.min(run(parse_clock, &frames[0], args.repeat)?);
    }

    // The numbers are only worth printing if the real path was taken.
    let stats = tables.stats()?;
    eprintln!(
        "{}: {n} flows: {} packets counted through the table (not the cache)",
        fam_name(family),
        stats.values[flowexport_common::STAT_TABLE_PACKETS_INGRESS as usize]
    );
    if stats.fallback_packets() != 0 {
        bail!(
            "{} packets went to the fallback path: the table was too small",
            stats.fallback_packets()
        );
    }
    // What the agent's final drain exports: every flow once, the hot flow
    // with every packet sent.
    let started = Instant::now();
    let got = final_drain(&mut tables)?;
    let drain_ms = started.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "{}: {n} flows: final drain {drain_ms:.1} ms",
        fam_name(family)
    );
    let want = 1 + u64::from(n > 1) + u64::from(args.rounds) * u64::from(args.repeat);
    let hot_got = got.get(&key(family, 0)).copied().unwrap_or(0);
    if hot_got != want {
        bail!("hot flow counted {hot_got} packets, expected {want} (has the key layout drifted?)");
    }
    if got.len() != n as usize {
        bail!("the drain exported {} flows, expected {n}", got.len());
    }
    Ok(Row {
        family: fam_name(family),
        flows: n,
        hot,
        hot_empty,
        hot_parse,
        hot_parse_clock,
        new: (n > 1).then_some((new, new_empty)),
        rotating,
        one_call: None,
        table: None,
        replay: None,
    })
}

/// New and rotating flows in one call each (see the module docs), on a
/// fresh table of the same size, through `prog` (`flowexport_bench_rotate`:
/// the agent's path; `flowexport_bench_table`: the table path): (new,
/// rotating) ns per packet.
fn one_call(args: &Args, family: Family, n: u32, prog: &str) -> Result<(f64, f64)> {
    if n > 256 * BENCH_PORTS {
        bail!("at most {} flows", 256 * BENCH_PORTS);
    }
    let (mut cap, mut tables) = load(args, n.max(1024), 1, KernelFilter::default())?;
    start_rotation(&mut cap, n)?;
    let rotate: &Xdp = cap.ebpf.program(prog).unwrap().try_into()?;
    let frame = frame(family, 0);
    ticking(&tables)?;
    let new = run_chunked(rotate, &frame, n, &mut tables)?;
    // Rotating: every flow `laps` times, at least `--repeat` packets in
    // all, so the call's fixed cost (tens of microseconds) is spread thin.
    let laps = args.repeat.div_ceil(n);
    let mut rotating = f64::MAX;
    for _ in 0..args.rounds {
        ticking(&tables)?;
        rotating = rotating.min(run_chunked(
            rotate,
            &frame,
            n.saturating_mul(laps),
            &mut tables,
        )?);
    }
    // Every flow counted once per call: the program rotated through
    // exactly the benchmark's flows.
    let want = 1 + u64::from(args.rounds) * u64::from(laps);
    check_table(&mut tables, family, n, want, prog)?;
    Ok((new, rotating))
}

/// That no packet took the fallback path (the table was large enough) and
/// that the final drain exports exactly the benchmark's first `n` flows,
/// each with `want` packets.
fn check_table(
    tables: &mut KernelTables,
    family: Family,
    n: u32,
    want: u64,
    what: &str,
) -> Result<()> {
    if tables.stats()?.fallback_packets() != 0 {
        bail!("{what}: packets went to the fallback path: the table was too small");
    }
    check_each(&final_drain(tables)?, family, n, want, what)
}

/// That the drain exported exactly the benchmark's first `n` flows of
/// `family`, each with `want` packets (`what`: the measurement, for the
/// error).
fn check_each(
    got: &HashMap<FlowKey, u64>,
    family: Family,
    n: u32,
    want: u64,
    what: &str,
) -> Result<()> {
    for i in 0..n {
        let c = got.get(&key(family, i)).copied().unwrap_or(0);
        if c != want {
            bail!("{what}: flow {i} counted {c} packets, expected {want}");
        }
    }
    if got.len() != n as usize {
        bail!(
            "{what}: the drain exported {} flows, expected {n}",
            got.len()
        );
    }
    Ok(())
}

/// `--ring`, the userspace half: the benchmark's N flows as ring records
/// handed back to a fresh table of the same size through
/// the agent's `flowexport_replay`, `REPLAY_BATCH` records per
/// BPF_PROG_TEST_RUN call: every flow once (the inserts), then laps over
/// the N flows of at least `--repeat` records (updates, best of
/// `--rounds`). Wall-clock ns per record on the calling CPU, the syscalls
/// included: (new, rotating). Every flow's count is checked afterwards.
fn replay_call(args: &Args, family: Family, n: u32) -> Result<(f64, f64)> {
    let (cap, mut tables) = load(args, n.max(1024), 1, KernelFilter::default())?;
    let replay: &Xdp = cap.ebpf.program(PROG_REPLAY).unwrap().try_into()?;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let ts_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    let records: Vec<FallbackEvent> = (0..n)
        .map(|i| FallbackEvent {
            key: key(family, i),
            packets: 1,
            bytes: FRAME_LEN as u64 - 14,
            ts_ns,
            ..FallbackEvent::default()
        })
        .collect();
    let mut frame = Vec::with_capacity(8 + REPLAY_BATCH * size_of::<FallbackEvent>());
    let mut pass = || -> Result<()> {
        for batch in records.chunks(REPLAY_BATCH) {
            // The ring position the program stores in REPLAYED: none here.
            frame.clear();
            frame.extend_from_slice(&0u64.to_ne_bytes());
            // SAFETY: FallbackEvent is #[repr(C)] integers with explicit
            // padding fields (no implicit padding): its bytes are defined.
            frame.extend_from_slice(unsafe {
                std::slice::from_raw_parts(batch.as_ptr().cast::<u8>(), size_of_val(batch))
            });
            run(replay, &frame, 1)?;
        }
        Ok(())
    };
    ticking(&tables)?;
    let t = Instant::now();
    pass()?;
    let new = t.elapsed().as_nanos() as f64 / f64::from(n);
    let laps = args.repeat.div_ceil(n);
    let mut rotating = f64::MAX;
    for _ in 0..args.rounds {
        ticking(&tables)?;
        let t = Instant::now();
        for _ in 0..laps {
            pass()?;
        }
        rotating = rotating.min(t.elapsed().as_nanos() as f64 / (f64::from(n) * f64::from(laps)));
    }
    let want = 1 + u64::from(args.rounds) * u64::from(laps);
    check_table(&mut tables, family, n, want, "replayed")?;
    Ok((new, rotating))
}

/// Sets `BENCH_ROTATE` so that the next call's runs start at flow 0 and
/// go round `n` flows.
fn start_rotation(cap: &mut Programs, n: u32) -> Result<()> {
    let mut state: aya::maps::Array<_, u32> = cap
        .ebpf
        .map_mut(MAP_BENCH_ROTATE)
        .with_context(|| format!("the eBPF object lacks {MAP_BENCH_ROTATE}; rebuild it"))?
        .try_into()?;
    state.set(0, 0, 0)?;
    state.set(1, n, 0)?;
    Ok(())
}

/// This host's cost of one random memory access over `bytes`, the size of
/// a table: a pointer chase through 64-byte lines in one random cycle
/// (each load's address is the previous load's value, as a packet's slot
/// is unknown until its hash), on 4 KiB pages as BPF maps have them
/// (vmalloc) or on 2 MiB pages (`huge`). ns per access, best of `rounds`.
fn memory_floor(bytes: usize, huge: bool, rounds: u32) -> Result<f64> {
    const STEPS: u32 = 1_000_000;
    let lines = bytes / 64;
    if lines < 2 {
        bail!("{bytes} bytes is too small for a pointer chase");
    }
    // SAFETY: a new anonymous private mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap of {bytes} bytes: {}", std::io::Error::last_os_error());
    }
    let advice = if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: the mapping above, whole. The advice is only a hint: where
    // the kernel has no transparent huge pages, both figures are 4 KiB's.
    unsafe { libc::madvise(p, bytes, advice) };
    // SAFETY: the mapping is `bytes` long, readable, writable and zeroed,
    // and lives until the munmap below; this slice is its only user.
    let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), bytes / 8) };
    // Sattolo's shuffle: a permutation that is a single cycle, so the
    // chase visits every line before it repeats.
    let mut next: Vec<u32> = (0..lines as u32).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..lines).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        next.swap(i, (x % i as u64) as usize);
    }
    for (line, n) in next.iter().enumerate() {
        mem[line * 8] = u64::from(*n);
    }
    let mut best = f64::MAX;
    let mut at = 0usize;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..STEPS {
            at = mem[at * 8] as usize;
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(STEPS));
    }
    std::hint::black_box(at);
    // SAFETY: the mapping above; `mem` is not used after this.
    unsafe { libc::munmap(p, bytes) };
    Ok(best)
}

/// No timeouts: a final drain exports every flow.
const FOREVER: Timeouts = Timeouts {
    idle_ns: u64::MAX,
    active_ns: u64::MAX,
};

/// What the agent's final drain exports: every flow's packets, by key.
fn final_drain(tables: &mut KernelTables) -> Result<HashMap<FlowKey, u64>> {
    let mut got: HashMap<FlowKey, u64> = HashMap::new();
    tables.drain(
        &mut FlowAggregator::default(),
        FOREVER,
        true,
        &mut |k, c| {
            *got.entry(*k).or_default() += c.packets;
        },
    )?;
    Ok(got)
}

fn fam_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.what != "xdp" {
        bail!("unknown benchmark {:?}: this binary runs `xdp`", args.what);
    }
    if args.repeat == 0 || args.rounds == 0 || args.flows.contains(&0) {
        bail!("--repeat, --rounds and every --flows value must be at least 1");
    }
    let mut rows = Vec::new();
    let mut selections = Vec::new();
    let mut tcs = Vec::new();
    for family in [Family::V4, Family::V6] {
        eprintln!("{}: TC programs", fam_name(family));
        tcs.push((fam_name(family), tc(&args, family)?));
        for &n in &args.flows {
            let mut row = measure(&args, family, n)?;
            if n > 1 {
                eprintln!("{}: {n} flows: in one call", fam_name(family));
                row.one_call = Some(one_call(&args, family, n, PROG_BENCH_ROTATE)?);
                if args.ring {
                    eprintln!("{}: {n} flows: the table path", fam_name(family));
                    row.table = Some(one_call(&args, family, n, PROG_BENCH_TABLE)?);
                    eprintln!("{}: {n} flows: replayed into the table", fam_name(family));
                    row.replay = Some(replay_call(&args, family, n)?);
                }
            }
            rows.push(row);
        }
        eprintln!("{}: filter rules and sampling", fam_name(family));
        selections.push((fam_name(family), selection(&args, family)?));
    }
    // The largest table measured: the memory a miss at that size reaches.
    let largest = args.flows.iter().copied().max().unwrap_or(1);
    let largest_bytes = table_bytes(slots_for(largest)) as usize;
    eprintln!("memory floor over {} MiB", largest_bytes >> 20);
    let floor = [
        memory_floor(largest_bytes, false, args.rounds)?,
        memory_floor(largest_bytes, true, args.rounds)?,
    ];
    println!(
        "XDP ingress vs empty XDP_PASS, BPF_PROG_TEST_RUN, {FRAME_LEN}-byte UDP frames; \
         hot: repeat {} (best of {}); new/rotating: one call per flow",
        args.repeat, args.rounds
    );
    println!(
        "| family | flows | hot ns/pkt | empty ns/pkt | hot ratio | new ns (empty) | new ratio | rotating ns (empty) | rotating ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let pair = |p: Option<(f64, f64)>| match p {
        Some((a, b)) => (format!("{a:.1} ({b:.1})"), format!("{:.2}×", a / b)),
        None => ("–".into(), "–".into()),
    };
    for r in &rows {
        let (new, new_ratio) = pair(r.new);
        let (rot, rot_ratio) = pair(r.rotating);
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2}× | {new} | {new_ratio} | {rot} | {rot_ratio} |",
            r.family,
            r.flows,
            r.hot,
            r.hot_empty,
            r.hot / r.hot_empty
        );
    }
    println!();
    println!(
        "Miss path in one call (the N flows back to back, as a NAPI batch brings them, no \
         syscall between packets; fresh table; new: repeat N; rotating: round the N flows for \
         {} packets or more, best of {}); added = minus the empty program (hot)",
        args.repeat, args.rounds
    );
    println!("| family | flows | empty | new ns/pkt | added | rotating ns/pkt | added |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        if let Some((new, rot)) = r.one_call {
            println!(
                "| {} | {} | {:.1} | {new:.1} | {:+.1} | {rot:.1} | {:+.1} |",
                r.family,
                r.flows,
                r.hot_empty,
                new - r.hot_empty,
                rot - r.hot_empty
            );
        }
    }
    if args.ring {
        println!();
        println!(
            "--ring: the miss path in one call as above (the agent's: a packet that misses its \
             cache slot becomes a MISSES record), beside the table path (the packet counted in \
             the table on the receiving CPU, as before the ring), on the receiving CPU; added = \
             minus the empty program (hot). Then what the agent's drain thread pays per record \
             on its own CPU to count the records in the table ({REPLAY_BATCH} records per \
             BPF_PROG_TEST_RUN call of flowexport_replay, syscalls included)"
        );
        println!(
            "| family | flows | empty | agent: new | added | agent: rotating | added | table path: new | added | table path: rotating | added | replayed: new | replayed: rotating |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            if let (Some((new, rot)), Some((t_new, t_rot)), Some((r_new, r_rot))) =
                (r.one_call, r.table, r.replay)
            {
                let e = r.hot_empty;
                println!(
                    "| {} | {} | {e:.1} | {new:.1} | {:+.1} | {rot:.1} | {:+.1} | {t_new:.1} | \
                     {:+.1} | {t_rot:.1} | {:+.1} | {r_new:.1} | {r_rot:.1} |",
                    r.family,
                    r.flows,
                    new - e,
                    rot - e,
                    t_new - e,
                    t_rot - e
                );
            }
        }
    }
    println!();
    println!(
        "This host's memory floor: one random access over the table of {largest} flows ({} \
         MiB), a pointer chase through 64-byte lines, best of {}: {:.1} ns on 4 KiB pages (as \
         BPF maps have them), {:.1} ns on 2 MiB pages. A miss at that size reads its table slot \
         at such an address.",
        largest_bytes >> 20,
        args.rounds,
        floor[0],
        floor[1]
    );
    println!();
    println!(
        "Hot-path breakdown (ns/pkt, same frame and repeat): empty program; + parser; \
         + clock word and epoch reads; + flow update in the cache or table (the real program); \
         cache slots: {}",
        args.cache_slots
    );
    println!("| family | flows | empty | parse | parse+clock | full | update share |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0}% |",
            r.family,
            r.flows,
            r.hot_empty,
            r.hot_parse,
            r.hot_parse_clock,
            r.hot,
            100.0 * (r.hot - r.hot_parse_clock) / r.hot
        );
    }
    println!();
    println!(
        "Filter rules and sampling, hot path (ns/pkt, one flow, same frame and repeat, best of \
         {}): the program without options; with 10 --filter rules that all miss (two CIDR trie \
         look-ups and ten rules, then counted); the same rules without CIDRs (no trie look-up); \
         with --sampling 100 (99 in 100 packets skip the flow update); added = minus the \
         program without options",
        args.rounds
    );
    println!(
        "| family | empty | plain | 10 rules | added | 10 rules, no CIDR | added | sampling 100 | added |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (fam, [plain, rules, sampled, no_cidr, empty]) in &selections {
        println!(
            "| {fam} | {empty:.1} | {plain:.1} | {rules:.1} | {:+.1} | {no_cidr:.1} | {:+.1} | \
             {sampled:.1} | {:+.1} |",
            rules - plain,
            no_cidr - plain,
            sampled - plain
        );
    }
    println!();
    println!(
        "TC programs, hot path (ns/pkt, one flow, same frame and repeat, best of {}): the \
         egress program (`--capture tc` ingress is the same code), headers read straight from \
         the skb's linear data; the same with every header read through bpf_skb_load_bytes; \
         an empty TC program; added = minus the empty program",
        args.rounds
    );
    println!("| family | empty | egress | added | all through bpf_skb_load_bytes | added |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (fam, [direct, helper, empty]) in &tcs {
        println!(
            "| {fam} | {empty:.1} | {direct:.1} | {:+.1} | {helper:.1} | {:+.1} |",
            direct - empty,
            helper - empty
        );
    }
    Ok(())
}
