//! `flowexport agent` settings: command-line flags, an optional TOML file
//! (`--config`) that may set every flag, and the defaults. Flags win over the
//! file, the file over the defaults. Each setting is declared once, in
//! [`AgentArgs`] (its flag, its help and its config key together); a new
//! setting is one field there and its default and check in
//! [`AgentArgs::resolve`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::capture::afxdp::{Decap, Queues, Settings as AfxdpSettings, ZeroCopy, DEFAULT_FRAMES};
use crate::capture::aggregator::Timeouts;
use crate::capture::filter::Rule;
use crate::capture::interfaces::{host_address, is_glob};
use crate::capture::loader::{Capture, XdpModeChoice};
use crate::cmd::flags::{de, layered, ConfigFile, HumanDuration, KafkaArgs, Layer};
use crate::sink::ipfix::{resolve, ExportSettings};
use crate::sink::kafka::KafkaConfig;

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_DRAIN_INTERVAL: Duration = Duration::from_secs(1);
pub use flowexport_common::DEFAULT_MAX_FLOWS;
/// Longest idle or active timeout: times in the kernel's flow table are 32-bit
/// milliseconds, which the drain reads back unambiguously within 24 days.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Largest `--max-flows`: 2^30 flows, 2^31 table slots (192 GiB).
pub const MAX_MAX_FLOWS: u32 = 1 << 30;
pub const DEFAULT_FALLBACK_RING_BYTES: u32 = 1 << 20;
/// Largest `--sampling` (1 in 16M: beyond it, a busy link yields a
/// handful of samples a second, no flow picture).
pub const MAX_SAMPLING: u32 = 1 << 24;
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9590";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flowexport";
pub const DEFAULT_EXPORT_PACKET_SIZE: usize = 1400;
pub const DEFAULT_TEMPLATE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_TEMPLATE_PACKETS: u32 = 20;
/// IPFIX/NetFlow v9 records per second per collector: about 9,000 packets
/// of 1400 bytes (100 Mbit/s); a million flows leave in 4 s.
pub const DEFAULT_EXPORT_RATE: u64 = 250_000;

layered! {
/// Settings of `flowexport agent`: each field is a flag and, under the same
/// name without `--`, a key of the `--config` file (flags win). Every
/// setting is optional here so that the file can fill it; defaults are
/// applied in [`AgentArgs::resolve`].
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default, rename_all = "kebab-case")]
pub struct AgentArgs {
    /// Interface to attach to (repeat for several), or a shell-style glob
    /// (`'brq*'`, `'tap?'`, `'eth[01]'`): every matching interface present
    /// at start and each one that appears later (netlink notifications),
    /// never loopback; one that disappears is forgotten (its last counts are
    /// still exported). A plain name must exist at start; a glob matching
    /// nothing is a log line. Required here or in the config file.
    #[arg(long = "iface", value_name = "IF|GLOB")]
    pub iface: Vec<String>,
    /// Leave out interfaces a --iface glob matches (a glob or a name;
    /// repeatable).
    #[arg(long = "exclude-iface", value_name = "GLOB")]
    pub exclude_iface: Vec<String>,
    /// Where ingress is counted: auto (per interface: native XDP where the
    /// driver runs it on its own buffers, TC on veth, whose native XDP
    /// copies nearly every packet first, on drivers without native XDP, and where
    /// another program holds the XDP hook), xdp (an XDP program; see
    /// --xdp-mode), tc (a TC program, as egress is; it leaves XDP to
    /// others), or afxdp (AF_XDP sockets: every frame of the interface goes
    /// to the agent, which parses and counts it; for a dedicated mirror
    /// port, needs --mirror). [default: auto; xdp when --xdp-mode is given]
    #[arg(long, value_name = "auto|xdp|tc|afxdp")]
    pub capture: Option<Capture>,
    /// The interface carries copies of someone else's traffic (a SPAN or
    /// mirror port, a TAP): the ingress program counts the copies and drops
    /// them (the host's stack never processes them), and no egress program
    /// is attached. Required by --capture afxdp.
    #[arg(long)]
    pub mirror: bool,
    /// --capture afxdp: the RX queues served, all or a list; one AF_XDP
    /// socket and one thread each. [default: all]
    #[arg(long, value_name = "all|N[,N...]")]
    pub afxdp_queues: Option<Queues>,
    /// --capture afxdp: zero-copy where the driver supports it, copy mode
    /// with a log line elsewhere (auto); zero-copy or fail (on); copy mode
    /// (off). [default: auto]
    #[arg(long, value_name = "auto|on|off")]
    pub afxdp_zero_copy: Option<ZeroCopy>,
    /// --capture afxdp: UMEM frames per queue, a power of two from 64 to
    /// 262144, of 4 KiB each (the fill and RX rings get as many entries):
    /// the default costs 16 MiB per queue. A burst longer than the frames
    /// the worker has not returned yet is dropped and counted in
    /// flowexport_afxdp_dropped_packets_total. [default: 4096]
    #[arg(long, value_name = "N")]
    pub afxdp_frames: Option<u32>,
    /// --capture afxdp: count a tunnel's inner flow, with the tunnel's
    /// type, id (VNI, GRE key, ERSPAN session) and outer addresses in the
    /// record (inner: VXLAN, GENEVE, GRE, ERSPAN I/II/III, IPv4/IPv6 in IP;
    /// one level), or the outer packets as the other capture modes do
    /// (none). [default: inner]
    #[arg(long, value_name = "none|inner")]
    pub decap: Option<Decap>,
    /// XDP attach mode: native (driver), skb (generic), or auto = native,
    /// falling back to skb with a log line. Given without --capture, it
    /// means --capture xdp; --capture auto takes only auto (its own choice:
    /// native XDP where it pays, TC elsewhere). [default: auto]
    #[arg(long, value_name = "MODE")]
    pub xdp_mode: Option<XdpModeChoice>,
    /// Export a flow once it has seen no packet for this long. [default: 15s]
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<HumanDuration>,
    /// Export a long-lived flow every DURATION, with the counts since its
    /// last export. [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub active_timeout: Option<HumanDuration>,
    /// How often the kernel table is drained (timeouts are checked then);
    /// at most the smaller timeout. [default: 1s]
    #[arg(long, value_name = "DURATION")]
    pub drain_interval: Option<HumanDuration>,
    /// Kernel flow-table capacity: concurrent flows (from their first
    /// packet until their idle timeout). The table has 2 x N slots (rounded
    /// up to a power of two) of 96 bytes, shared by all CPUs: 192 MiB at
    /// the default, whatever the CPU count. Flows beyond it still count
    /// exactly, through the fallback ring. [default: 1048576]
    #[arg(long, value_name = "N")]
    pub max_flows: Option<u32>,
    /// Size of the fallback ring buffer in bytes (a power of two, at least
    /// the page size). [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub fallback_ring_bytes: Option<u32>,
    /// Per-CPU flow cache in front of the flow table: slots per generation
    /// (a power of two up to 65536; 0 turns the cache off). Costs 2 x N x
    /// 100 bytes per CPU (400 KiB per CPU at 2048: 96-byte slots and their
    /// 4-byte tags). Not given: what a pinned state has, else the default.
    /// [default: 2048 up to 32 possible CPUs, then halved to keep all CPUs'
    /// caches within 12.5 MiB: 1024 at 64 CPUs, 512 at 128]
    #[arg(long, value_name = "N")]
    pub cache_slots: Option<u32>,
    /// Count 1 in N packets, chosen at random in the kernel before the
    /// flow table (1: every packet). Records carry sampling_rate N and the
    /// sampled counts; IPFIX and NetFlow v9 exports send the rate in an
    /// options template. [default: 1]
    #[arg(long, value_name = "N")]
    pub sampling: Option<u32>,
    /// Leave traffic out, or count only some (repeatable, evaluated in
    /// order in the kernel; the first rule that matches decides). RULE is
    /// comma-separated key=value: action=accept|reject (required),
    /// cidr= (either address), src-cidr=, dst-cidr=,
    /// proto=tcp|udp|udplite|icmp|icmpv6|sctp|N, port= (either port),
    /// src-port=, dst-port=, direction=ingress|egress. When any rule
    /// accepts, packets no rule matches are left out. Left-out packets form
    /// no flow and are counted in flowexport_filtered_packets_total. At most
    /// 32 rules. Example: --filter action=reject,proto=tcp,port=22
    #[arg(long, value_name = "RULE", value_parser = Rule::parse)]
    #[serde(deserialize_with = "filter_tables")]
    pub filter: Vec<Rule>,
    /// Resolution of first/last-seen times: how often the agent advances
    /// the clock word the kernel programs read (100us..1s). [default: 1ms]
    #[arg(long, value_name = "DURATION")]
    pub clock_resolution: Option<HumanDuration>,
    /// Prometheus endpoint address (serves /metrics). [default: 127.0.0.1:9590]
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(deserialize_with = "de::socket_addr")]
    pub metrics_addr: Option<SocketAddr>,
    /// `sampler_address` of every record; "none" for empty. [default: the
    /// host's first non-loopback address, IPv4 first]
    #[arg(long, value_name = "IP|none")]
    pub sampler_address: Option<String>,
    /// Load the kernel object from this file instead of the embedded one.
    #[arg(long, value_name = "PATH")]
    pub bpf_object: Option<PathBuf>,
    /// Directory on a BPF filesystem where the maps and the programs'
    /// links are pinned: the counts and the programs outlive the agent (a
    /// crash, a restart, an upgrade) and the next agent adopts them; "none"
    /// pins nothing. [default: /sys/fs/bpf/flowexport]
    #[arg(long, value_name = "DIR|none")]
    pub pin_dir: Option<String>,
    /// At exit, leave the programs counting and the pins in place for the
    /// next agent (restarts and upgrades with no gap) instead of detaching,
    /// exporting everything and removing the pins.
    #[arg(long)]
    pub keep_attached: bool,
    /// Instead of running: adopt what is pinned in --pin-dir (whatever its
    /// sizes), export every flow it holds to the configured sinks, detach
    /// the programs, remove the pins and exit. Ends what --keep-attached
    /// left behind (package removal runs it); with nothing pinned, does
    /// nothing. --iface is not needed.
    #[arg(long, conflicts_with = "keep_attached")]
    #[serde(skip)]
    pub detach: bool,
    /// Also print JSON lines on stdout when another sink is configured
    /// (stdout is the sink when no other is).
    #[arg(long)]
    pub stdout: bool,
    /// Send IPFIX (RFC 7011) over UDP to this collector (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    pub ipfix: Vec<String>,
    /// Send NetFlow v9 (RFC 3954) over UDP to this collector (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    pub netflow9: Vec<String>,
    /// IPFIX observation domain id, also the NetFlow v9 source id. [default: 1]
    #[arg(long, value_name = "ID")]
    pub observation_domain: Option<u32>,
    /// Largest IPFIX/NetFlow v9 packet (UDP payload); keep it under the
    /// path MTU. [default: 1400]
    #[arg(long, value_name = "BYTES")]
    pub export_packet_size: Option<usize>,
    /// Resend IPFIX/NetFlow v9 templates at least this often. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub template_interval: Option<HumanDuration>,
    /// ... and at least every N export packets. [default: 20]
    #[arg(long, value_name = "N")]
    pub template_packets: Option<u32>,
    /// Most IPFIX/NetFlow v9 records per second sent to each collector
    /// (0: no limit): a drain that exports a million flows at once would
    /// otherwise overflow a collector's socket buffer. [default: 250000]
    #[arg(long, value_name = "RECORDS")]
    pub export_rate: Option<u64>,
    /// Kafka producer settings (read from the file by their own part).
    #[command(flatten)]
    #[serde(skip)]
    pub kafka: KafkaArgs,
    /// TOML file with any of these settings (keys as the flag names, e.g.
    /// `idle-timeout = "10s"`, `iface = ["eth0"]`; filter rules as
    /// `[[filter]]` tables, -X properties as a `[kafka-properties]` table).
    /// Flags win.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}
}

/// `[[filter]]` tables of the config file, in order.
fn filter_tables<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Rule>, D::Error> {
    let tables = Vec::<std::collections::BTreeMap<String, toml::Value>>::deserialize(d)?;
    tables
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Rule::from_table(t)
                .map_err(|e| serde::de::Error::custom(format!("[[filter]] number {}: {e}", i + 1)))
        })
        .collect()
}

/// Fully resolved agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `--mirror`: count and drop the copies, no egress program.
    pub mirror: bool,
    /// The `--afxdp-*` settings (used with `--capture afxdp`).
    pub afxdp: AfxdpSettings,
    /// `--iface` names and globs.
    pub ifaces: Vec<String>,
    /// `--exclude-iface` globs.
    pub exclude_ifaces: Vec<String>,
    /// `--capture`: where ingress is counted.
    pub capture: Capture,
    /// `--xdp-mode`: how the XDP program attaches.
    pub xdp_mode: XdpModeChoice,
    /// `--idle-timeout`, `--active-timeout`: when a flow is exported.
    pub idle_timeout: Duration,
    pub active_timeout: Duration,
    /// `--drain-interval`: how often the kernel table is drained.
    pub drain_interval: Duration,
    /// `--max-flows`: the kernel table's capacity (it has 2 x N slots).
    pub max_flows: u32,
    /// `--fallback-ring-bytes`: the ring for packets the table has no room for.
    pub fallback_ring_bytes: u32,
    /// `--cache-slots`: per-CPU cache slots per generation (0: no cache).
    pub cache_slots: u32,
    /// Whether `--cache-slots` was given: if not, a pinned state's cache
    /// size is adopted (the default depends on the CPU count).
    pub cache_slots_given: bool,
    /// 1-in-N packet sampling (1: every packet).
    pub sampling: u32,
    /// `--filter` rules, in order.
    pub filters: Vec<Rule>,
    /// `--clock-resolution`: how often the kernel's clock word advances.
    pub clock_resolution: Duration,
    /// `--metrics-addr`: where /metrics is served.
    pub metrics_addr: SocketAddr,
    /// `--sampler-address`: every record's sampler_address (None: empty).
    pub sampler_address: Option<IpAddr>,
    /// `--bpf-object`: a kernel object to load instead of the embedded one.
    pub bpf_object: Option<PathBuf>,
    /// Where maps and links are pinned (None: nowhere).
    pub pin_dir: Option<PathBuf>,
    /// `--keep-attached`: at exit, leave the programs counting for the next
    /// agent.
    pub keep_attached: bool,
    /// `--detach`: drain and detach the pinned state, then exit.
    pub detach: bool,
    /// Print JSON lines on stdout (always true when no other sink is set).
    pub stdout: bool,
    /// The Kafka sink, when `--kafka-brokers` is set.
    pub kafka: Option<KafkaConfig>,
    /// `--ipfix`, `--netflow9`: collectors to export to over UDP.
    pub ipfix: Vec<SocketAddr>,
    pub netflow9: Vec<SocketAddr>,
    /// How IPFIX/NetFlow v9 exports are built (`--export-*`, sampling).
    pub export: ExportSettings,
}

impl AgentConfig {
    /// The drain's timeouts.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            idle_ns: self.idle_timeout.as_nanos() as u64,
            active_ns: self.active_timeout.as_nanos() as u64,
        }
    }
}

fn parse_sampler(s: &str) -> Result<Option<IpAddr>> {
    if s.eq_ignore_ascii_case("none") || s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .with_context(|| format!("invalid --sampler-address {s:?}: expected an IP address or none"))
}

/// What does not fit with `--capture afxdp`.
fn check_afxdp(a: &AgentArgs, s: &AfxdpSettings) -> Result<()> {
    if !a.mirror {
        bail!(
            "--capture afxdp takes every packet of the interface away from the host: the frames \
             go to the agent's AF_XDP sockets, not to the network stack. It is for a dedicated \
             mirror/SPAN port or TAP: add --mirror to say the interface carries copies, or count \
             this host's own traffic with --capture auto (the default), xdp or tc"
        );
    }
    if a.iface.iter().any(|i| is_glob(i)) {
        bail!("--capture afxdp takes interface names, not globs (no hotplug with AF_XDP yet)");
    }
    if !a.filter.is_empty() || a.sampling.is_some_and(|n| n > 1) {
        bail!(
            "--filter and --sampling run in the kernel programs of --capture auto, xdp and tc; \
             --capture afxdp counts every frame (drop them)"
        );
    }
    if a.keep_attached {
        bail!(
            "--keep-attached: with --capture afxdp the flows live in the agent, which exports \
             them all when it stops; nothing is left attached"
        );
    }
    if !s.frames.is_power_of_two() || !(64..=1 << 18).contains(&s.frames) {
        bail!(
            "--afxdp-frames {} must be a power of two from 64 to 262144",
            s.frames
        );
    }
    Ok(())
}

impl AgentArgs {
    /// The flags over the config file (when `--config` names one).
    fn layered(self) -> Result<AgentArgs> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let mut file = ConfigFile::read(&path)?;
        let mut lower: AgentArgs = file.part()?;
        lower.kafka = file.part()?;
        file.finish()?;
        Ok(self.over(lower))
    }

    /// Merges flags over the config file over the defaults, and validates.
    pub fn resolve(self) -> Result<AgentConfig> {
        let a = self.layered()?;
        // --xdp-mode alone asks for XDP.
        let capture = a.capture.unwrap_or(if a.xdp_mode.is_some() {
            Capture::Xdp
        } else {
            Capture::Auto
        });
        let afxdp = AfxdpSettings {
            queues: a.afxdp_queues.clone().unwrap_or(Queues::All),
            zero_copy: a.afxdp_zero_copy.unwrap_or(ZeroCopy::Auto),
            frames: a.afxdp_frames.unwrap_or(DEFAULT_FRAMES),
            decap: a.decap.unwrap_or(Decap::Inner),
        };
        if capture == Capture::Afxdp {
            check_afxdp(&a, &afxdp)?;
        } else if a.afxdp_queues.is_some()
            || a.afxdp_zero_copy.is_some()
            || a.afxdp_frames.is_some()
            || a.decap.is_some()
        {
            bail!(
                "--afxdp-queues, --afxdp-zero-copy, --afxdp-frames and --decap apply to --capture \
                 afxdp"
            );
        }
        let ifaces = a.iface;
        let exclude_ifaces = a.exclude_iface;
        if ifaces.is_empty() && !a.detach {
            bail!("no interface given: use --iface IF (repeatable) or `iface = [...]` in --config");
        }
        if capture == Capture::Tc && a.xdp_mode.is_some() {
            bail!("--xdp-mode applies to --capture xdp; with --capture tc, drop it");
        }
        if capture == Capture::Auto && a.xdp_mode.is_some_and(|m| m != XdpModeChoice::Auto) {
            bail!(
                "--xdp-mode native or skb asks for XDP on every interface: add --capture xdp \
                 (--capture auto attaches XDP in native mode where it pays, TC elsewhere)"
            );
        }
        let xdp_mode = a.xdp_mode.unwrap_or(XdpModeChoice::Auto);
        let idle_timeout = a.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, Duration::from);
        let active_timeout = a
            .active_timeout
            .map_or(DEFAULT_ACTIVE_TIMEOUT, Duration::from);
        let drain_interval = a.drain_interval.map_or_else(
            || DEFAULT_DRAIN_INTERVAL.min(idle_timeout).min(active_timeout),
            Duration::from,
        );
        if idle_timeout.max(active_timeout) > MAX_TIMEOUT {
            bail!(
                "--idle-timeout ({idle_timeout:?}) and --active-timeout ({active_timeout:?}) must \
                 not exceed 24h"
            );
        }
        if drain_interval > idle_timeout.min(active_timeout) {
            bail!(
                "--drain-interval ({drain_interval:?}) must not exceed the idle ({idle_timeout:?}) \
                 or active ({active_timeout:?}) timeout: timeouts are only checked at drains"
            );
        }
        let max_flows = a.max_flows.unwrap_or(DEFAULT_MAX_FLOWS);
        if max_flows == 0 || max_flows > MAX_MAX_FLOWS {
            bail!("--max-flows {max_flows} must be from 1 to {MAX_MAX_FLOWS}");
        }
        let fallback_ring_bytes = a.fallback_ring_bytes.unwrap_or(DEFAULT_FALLBACK_RING_BYTES);
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
        if !fallback_ring_bytes.is_power_of_two() || fallback_ring_bytes < page {
            bail!(
                "--fallback-ring-bytes {fallback_ring_bytes} must be a power of two and at least \
                 the page size ({page})"
            );
        }
        // Not given: the CPU-scaled default (possible CPUs: per-CPU maps
        // are sized for them), or what a pinned state was made with.
        let cache_slots_given = a.cache_slots.is_some();
        let cache_slots = a.cache_slots.unwrap_or_else(|| {
            let cpus = aya::util::nr_cpus().map_or(1, |n| n as u32);
            flowexport_common::default_cache_slots(cpus)
        });
        // Each drain copies the N slots of one half of every CPU, so N is
        // capped where that stays a few ms.
        if cache_slots != 0 && (!cache_slots.is_power_of_two() || cache_slots > 1 << 16) {
            bail!("--cache-slots {cache_slots} must be 0 (no cache) or a power of two up to 65536");
        }
        let sampling = a.sampling.unwrap_or(1);
        if sampling == 0 || sampling > MAX_SAMPLING {
            bail!("--sampling {sampling} must be from 1 (every packet) to {MAX_SAMPLING}");
        }
        let filters = a.filter;
        // Too many rules is an error of the set: say so now, not at load.
        crate::capture::filter::compile(&filters)?;
        let clock_resolution = a
            .clock_resolution
            .map_or(Duration::from_millis(1), Duration::from);
        if clock_resolution < Duration::from_micros(100)
            || clock_resolution > Duration::from_secs(1)
        {
            bail!("--clock-resolution {clock_resolution:?} must be from 100us to 1s");
        }
        let metrics_addr = a
            .metrics_addr
            .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().expect("valid default"));
        let sampler_address = match a.sampler_address {
            Some(s) => parse_sampler(&s)?,
            None => host_address(),
        };
        let kafka = a.kafka.resolve()?;
        let resolve_all = |list: Vec<String>| -> Result<Vec<SocketAddr>> {
            Ok(list.iter().map(|t| resolve(t)).collect::<Result<_, _>>()?)
        };
        let ipfix = resolve_all(a.ipfix).context("--ipfix")?;
        let netflow9 = resolve_all(a.netflow9).context("--netflow9")?;
        let export = ExportSettings {
            observation_domain: a.observation_domain.unwrap_or(1),
            max_packet: a.export_packet_size.unwrap_or(DEFAULT_EXPORT_PACKET_SIZE),
            template_interval_ms: a
                .template_interval
                .map_or(DEFAULT_TEMPLATE_INTERVAL, Duration::from)
                .as_millis() as u64,
            template_packets: a
                .template_packets
                .unwrap_or(DEFAULT_TEMPLATE_PACKETS)
                .max(1),
            max_rate: a.export_rate.unwrap_or(DEFAULT_EXPORT_RATE),
            sampling,
            segment_ids: capture == Capture::Afxdp && afxdp.decap == Decap::Inner,
        };
        if !(256..=65_000).contains(&export.max_packet) {
            bail!("--export-packet-size must be between 256 and 65000 bytes");
        }
        let other_sinks = kafka.is_some() || !ipfix.is_empty() || !netflow9.is_empty();
        let stdout = a.stdout || !other_sinks;
        let pin_dir = match a.pin_dir.as_deref() {
            Some("none") => None,
            Some("") => bail!("--pin-dir needs a directory (or none)"),
            Some(d) => Some(PathBuf::from(d)),
            None => Some(PathBuf::from(DEFAULT_PIN_DIR)),
        };
        // --detach ends what keep-attached (say, in the file) keeps.
        let keep_attached = !a.detach && a.keep_attached;
        if keep_attached && pin_dir.is_none() {
            bail!("--keep-attached needs a --pin-dir: the programs stay attached through their pinned links");
        }
        if a.detach && pin_dir.is_none() {
            bail!("--detach needs the --pin-dir whose pinned programs and counts it should end");
        }
        Ok(AgentConfig {
            mirror: a.mirror || capture == Capture::Afxdp,
            afxdp,
            pin_dir,
            keep_attached,
            detach: a.detach,
            stdout,
            kafka,
            ipfix,
            netflow9,
            export,
            ifaces,
            exclude_ifaces,
            capture,
            xdp_mode,
            idle_timeout,
            active_timeout,
            drain_interval,
            max_flows,
            fallback_ring_bytes,
            cache_slots,
            cache_slots_given,
            sampling,
            filters,
            clock_resolution,
            metrics_addr,
            sampler_address,
            bpf_object: a.bpf_object,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::kafka::{KafkaFormat, DEFAULT_BUFFER_RECORDS};

    fn args(iface: &[&str]) -> AgentArgs {
        AgentArgs {
            iface: iface.iter().map(ToString::to_string).collect(),
            sampler_address: Some("none".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults() {
        let c = args(&["eth0"]).resolve().unwrap();
        assert_eq!(c.ifaces, vec!["eth0"]);
        assert_eq!(c.xdp_mode, XdpModeChoice::Auto);
        assert_eq!(c.capture, Capture::Auto);
        assert_eq!(c.idle_timeout, Duration::from_secs(15));
        assert_eq!(c.active_timeout, Duration::from_secs(60));
        assert_eq!(c.drain_interval, Duration::from_secs(1));
        assert_eq!(c.max_flows, 1 << 20);
        assert_eq!(c.fallback_ring_bytes, 1 << 20);
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9590");
        assert_eq!(c.sampler_address, None);
    }

    #[test]
    fn file_fills_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("fe-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.toml");
        std::fs::write(
            &p,
            "iface = [\"veth9\"]\nidle-timeout = \"5s\"\nmax-flows = 128\nxdp-mode = \"skb\"\n\
             metrics-addr = \"127.0.0.1:9999\"\nsampler-address = \"192.0.2.7\"\n",
        )
        .unwrap();
        let mut a = args(&[]);
        a.sampler_address = None;
        a.config = Some(p.clone());
        a.max_flows = Some(256);
        let c = a.resolve().unwrap();
        assert_eq!(c.ifaces, vec!["veth9"]);
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.max_flows, 256, "flag wins over file");
        assert_eq!(c.xdp_mode, XdpModeChoice::Skb);
        assert_eq!(c.capture, Capture::Xdp, "an XDP mode alone asks for XDP");
        assert_eq!(c.metrics_addr.port(), 9999);
        assert_eq!(c.sampler_address, Some("192.0.2.7".parse().unwrap()));

        std::fs::write(&p, "iface = [\"a\"]\nidle_timeot = \"5s\"\n").unwrap();
        let mut a = args(&[]);
        a.config = Some(p.clone());
        let err = format!("{:#}", a.resolve().unwrap_err());
        assert!(err.contains("unknown field"), "{err}");

        // Numbers where the flag takes text: as on the command line (a bare
        // duration is seconds).
        std::fs::write(
            &p,
            "iface = [\"a\"]\nidle-timeout = 5\nactive-timeout = 1.5\ncapture = \"afxdp\"\n\
             mirror = true\nafxdp-queues = 0\n",
        )
        .unwrap();
        let mut a = args(&[]);
        a.config = Some(p.clone());
        let c = a.resolve().unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.active_timeout, Duration::from_millis(1500));
        assert_eq!(c.afxdp.queues, Queues::List(vec![0]));
        std::fs::write(&p, "iface = [\"a\"]\nidle-timeout = true\n").unwrap();
        let mut a = args(&[]);
        a.config = Some(p.clone());
        let err = format!("{:#}", a.resolve().unwrap_err());
        assert!(err.contains("expected a string or a number"), "{err}");
        // A bad value says what its flag would: the same parser reads both.
        for (line, flag_err) in [
            ("capture = \"XDP\"", "XDP".parse::<Capture>().unwrap_err()),
            (
                "kafka-flush-timeout = \"3 parsecs\"",
                "3 parsecs".parse::<HumanDuration>().unwrap_err(),
            ),
        ] {
            std::fs::write(&p, format!("iface = [\"a\"]\n{line}\n")).unwrap();
            let mut a = args(&[]);
            a.config = Some(p.clone());
            let err = format!("{:#}", a.resolve().unwrap_err());
            assert!(err.contains(&flag_err), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sampling_and_filters_from_flags_and_file() {
        let dir = std::env::temp_dir().join(format!("fe-cfg-filter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.toml");
        std::fs::write(
            &p,
            "iface = [\"veth9\", \"brq*\"]\nexclude-iface = [\"brq-mgmt*\"]\nsampling = 100\n\n[[filter]]\naction = \"reject\"\n\
             proto = \"tcp\"\nport = 22\n\n[[filter]]\naction = \"accept\"\n\
             cidr = \"10.0.0.0/8\"\n",
        )
        .unwrap();
        let mut a = args(&[]);
        a.config = Some(p.clone());
        let c = a.resolve().unwrap();
        assert_eq!(c.ifaces, vec!["veth9", "brq*"]);
        assert_eq!(c.exclude_ifaces, vec!["brq-mgmt*"]);
        assert_eq!(c.sampling, 100);
        assert_eq!(c.export.sampling, 100);
        assert_eq!(c.filters.len(), 2);
        assert_eq!((c.filters[0].accept, c.filters[0].port), (false, Some(22)));
        assert!(c.filters[1].accept);
        // Flags replace the file's rules.
        let mut a = args(&[]);
        a.config = Some(p.clone());
        a.filter = vec![Rule::parse("action=reject,port=53").unwrap()];
        a.sampling = Some(1);
        let c = a.resolve().unwrap();
        assert_eq!((c.sampling, c.filters.len()), (1, 1));
        assert_eq!(c.filters[0].port, Some(53));
        // A bad rule in the file names the file and the rule.
        std::fs::write(&p, "iface = [\"a\"]\n[[filter]]\naction = \"drop\"\n").unwrap();
        let mut a = args(&[]);
        a.config = Some(p.clone());
        let err = format!("{:#}", a.resolve().unwrap_err());
        assert!(
            err.contains("[[filter]]") && err.contains("\"action=drop\": key action"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        for bad in [0, MAX_SAMPLING + 1] {
            let mut a = args(&["eth0"]);
            a.sampling = Some(bad);
            assert!(format!("{:#}", a.resolve().unwrap_err()).contains("--sampling"));
        }
        let mut a = args(&["eth0"]);
        a.filter = (0..33)
            .map(|i| Rule::parse(&format!("action=reject,port={i}")).unwrap())
            .collect();
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("at most 32 rules"));
    }

    #[test]
    fn rejects_bad_values() {
        let mut a = args(&["eth0"]);
        a.drain_interval = Some(HumanDuration(Duration::from_secs(30)));
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("--drain-interval"));
        let mut a = args(&["eth0"]);
        a.fallback_ring_bytes = Some(5000);
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("power of two"));
        let mut a = args(&["eth0"]);
        a.capture = Some(Capture::Tc);
        assert_eq!(a.clone().resolve().unwrap().capture, Capture::Tc);
        a.xdp_mode = Some(XdpModeChoice::Native);
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("--xdp-mode applies"));
        let mut a = args(&["eth0"]);
        a.capture = Some(Capture::Auto);
        a.xdp_mode = Some(XdpModeChoice::Skb);
        assert!(format!("{:#}", a.clone().resolve().unwrap_err()).contains("add --capture xdp"));
        a.xdp_mode = Some(XdpModeChoice::Auto);
        assert_eq!(a.resolve().unwrap().capture, Capture::Auto);
        for bad in [0, (1 << 30) + 1] {
            let mut a = args(&["eth0"]);
            a.max_flows = Some(bad);
            assert!(format!("{:#}", a.resolve().unwrap_err()).contains("--max-flows"));
        }
        let mut a = args(&["eth0"]);
        a.active_timeout = Some(HumanDuration(Duration::from_secs(25 * 3600)));
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("24h"));
        assert!(args(&[]).resolve().is_err());
        let mut a = args(&["eth0"]);
        a.sampler_address = Some("not-an-ip".into());
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("sampler-address"));
        for bad in [3, 6000, 1 << 17] {
            let mut a = args(&["eth0"]);
            a.cache_slots = Some(bad);
            assert_eq!(
                format!("{:#}", a.resolve().unwrap_err()),
                format!("--cache-slots {bad} must be 0 (no cache) or a power of two up to 65536")
            );
        }
        for bad in [Duration::from_micros(50), Duration::from_secs(2)] {
            let mut a = args(&["eth0"]);
            a.clock_resolution = Some(HumanDuration(bad));
            assert!(format!("{:#}", a.resolve().unwrap_err()).contains("--clock-resolution"));
        }
        let mut a = args(&["eth0"]);
        a.cache_slots = Some(0);
        a.clock_resolution = Some(HumanDuration(Duration::from_millis(10)));
        let c = a.resolve().unwrap();
        assert_eq!(
            (c.cache_slots, c.cache_slots_given, c.clock_resolution),
            (0, true, Duration::from_millis(10))
        );
        let c = args(&["eth0"]).resolve().unwrap();
        // 2048 up to 32 possible CPUs, less above (flowexport-common).
        let cpus = aya::util::nr_cpus().unwrap() as u32;
        assert_eq!(
            (c.cache_slots, c.cache_slots_given, c.clock_resolution),
            (
                flowexport_common::default_cache_slots(cpus),
                false,
                Duration::from_millis(1)
            )
        );
    }

    #[test]
    fn kafka_settings_from_flags_and_file() {
        let c = args(&["eth0"]).resolve().unwrap();
        assert!(c.kafka.is_none());
        assert!(c.stdout, "stdout is the default sink");

        let dir = std::env::temp_dir().join(format!("fe-kcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.toml");
        std::fs::write(
            &p,
            "kafka-brokers = \"k1:9092,k2:9092\"\nkafka-format = \"json\"\n\
             kafka-flush-timeout = \"3s\"\n[kafka-properties]\n\"compression.type\" = \"lz4\"\n",
        )
        .unwrap();
        let mut a = args(&["eth0"]);
        a.config = Some(p);
        a.kafka.kafka_property = vec![("linger.ms".into(), "5".into())];
        a.kafka.kafka_topic = Some("t1".into());
        let c = a.resolve().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let k = c.kafka.unwrap();
        assert!(!c.stdout, "another sink: stdout only with --stdout");
        assert_eq!(k.brokers, "k1:9092,k2:9092");
        assert_eq!(k.topic, "t1");
        assert_eq!(k.format, KafkaFormat::Json);
        assert_eq!(k.flush_timeout, Duration::from_secs(3));
        assert_eq!(
            k.properties,
            vec![
                ("compression.type".to_string(), "lz4".to_string()),
                ("linger.ms".to_string(), "5".to_string())
            ]
        );
        assert_eq!(k.buffer_records, DEFAULT_BUFFER_RECORDS);

        let mut a = args(&["eth0"]);
        a.kafka.kafka_brokers = Some("k:1".into());
        a.kafka.kafka_buffer_records = Some(0);
        assert!(a.resolve().is_err());
        let mut a = args(&["eth0"]);
        a.kafka.kafka_brokers = Some("k:1".into());
        a.stdout = true;
        assert!(a.resolve().unwrap().stdout);

        // A Kafka setting without brokers is an error, not ignored.
        let mut a = args(&["eth0"]);
        a.kafka.kafka_topic = Some("t1".into());
        let err = format!("{:#}", a.resolve().unwrap_err());
        assert!(
            err.contains("--kafka-topic is set but --kafka-brokers is not"),
            "{err}"
        );
        let mut a = args(&["eth0"]);
        a.kafka.kafka_property = vec![("linger.ms".into(), "5".into())];
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("-X is set"));
    }

    #[test]
    fn short_timeouts_shrink_default_drain_interval() {
        let mut a = args(&["eth0"]);
        a.active_timeout = Some(HumanDuration(Duration::from_millis(300)));
        let c = a.resolve().unwrap();
        assert_eq!(c.drain_interval, Duration::from_millis(300));
    }

    /// The packaged /etc/flowexport/agent.toml: every commented key is a
    /// valid key, and the values shown are the defaults.
    #[test]
    fn packaged_config_shows_valid_keys_and_the_defaults() {
        let shipped = include_str!("../../../../deploy/etc/agent.toml");
        let uncommented: String = shipped
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.starts_with([' ', '#']) && !rest.is_empty() => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let dir = std::env::temp_dir().join(format!("flowexport-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (as_shipped, all_set) = (dir.join("shipped.toml"), dir.join("all.toml"));
        std::fs::write(&as_shipped, shipped).unwrap();
        std::fs::write(&all_set, &uncommented).unwrap();
        let resolve = |path: &std::path::Path| {
            AgentArgs {
                config: Some(path.to_path_buf()),
                iface: vec!["eth9".into()],
                ..Default::default()
            }
            .resolve()
        };
        // As shipped: no interface, so the service refuses to start.
        let err = AgentArgs {
            config: Some(as_shipped.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("no interface given"), "{err}");
        let d = resolve(&as_shipped).unwrap();
        let c = resolve(&all_set).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.capture, d.capture);
        assert_eq!(c.idle_timeout, d.idle_timeout);
        assert_eq!(c.active_timeout, d.active_timeout);
        assert_eq!(c.drain_interval, d.drain_interval);
        assert_eq!(c.max_flows, d.max_flows);
        assert_eq!(c.cache_slots, d.cache_slots);
        assert_eq!(c.fallback_ring_bytes, d.fallback_ring_bytes);
        assert_eq!(c.metrics_addr, d.metrics_addr);
        assert_eq!(c.pin_dir, d.pin_dir);
        assert_eq!(c.sampling, d.sampling);
        // The filter and sink examples are examples.
        assert_eq!((c.filters.len(), d.filters.len()), (2, 0));
        assert_eq!(c.ipfix.len(), 1);
        assert_eq!(c.netflow9.len(), 1);
        assert!(c.kafka.is_some() && d.kafka.is_none());
    }
}
