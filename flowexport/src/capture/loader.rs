//! Loads flowexport's kernel programs and attaches them: XDP (or, with
//! `--capture tc`, TC) on ingress, TC (TCX on kernels >= 6.6, clsact before)
//! on egress (not with `--mirror`); with `--capture afxdp`, the XDP program
//! that hands frames to AF_XDP sockets, alone.

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    tc, xdp::XdpLinkId, Link, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use aya::Pod;
use aya::{Ebpf, EbpfError, EbpfLoader};
use flowexport_common::{
    CacheSlot, FilterMasks, GLOBAL_CACHE_SLOTS, GLOBAL_FILTER, GLOBAL_MIRROR, GLOBAL_SAMPLING,
    GLOBAL_TABLE_MASK, MAPS, MAP_CACHE, MAP_CACHE_TAGS, MAP_DIRTY, MAP_FALLBACK, MAP_FILTER_PORTS,
    MAP_FILTER_V4, MAP_FILTER_V6, MAP_PENDING, MAP_TABLE, MISS_RING_BYTES, PROG_EGRESS,
    PROG_INGRESS, PROG_INGRESS_LINEAR, PROG_INGRESS_TC, PROG_REPLAY, PROG_XSK, PROG_XSK_LINEAR,
    STAT_LEN, TABLE_LOCKS,
};

use super::filter::KernelFilter;

use super::pins::PinDir;
use super::table::{dirty_words, slots_for};

/// The kernel object built by `cargo xtask build-ebpf`, embedded at build time.
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("FLOWEXPORT_EBPF_OBJECT"));

/// How `--xdp-mode` asks for the XDP program to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeChoice {
    /// Native (driver) mode: wire packets, fastest. Fails if the driver lacks it.
    Native,
    /// Generic (skb) mode: works everywhere, sees GSO super-packets.
    Skb,
    /// Native, falling back to skb mode with a log line.
    Auto,
}

from_keywords!(XdpModeChoice, "XDP mode", {
    "native" | "drv" | "driver" => Native,
    "skb" | "generic" => Skb,
    "auto" => Auto,
});

/// Where ingress packets are counted (`--capture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// The cheaper hook of each interface (the default): native XDP where
    /// the driver runs it on its own receive buffers, TC where native XDP
    /// would copy every packet first (veth), where the driver has no native
    /// XDP, or where another program holds the XDP hook. See `auto_hook`.
    Auto,
    /// An XDP program (`--xdp-mode` says how it attaches).
    Xdp,
    /// A TC (TCX) program, like egress: cheaper than XDP where the driver
    /// has to build an XDP buffer for it (veth) or has no native XDP, and
    /// it leaves the XDP hook free.
    Tc,
    /// AF_XDP sockets (a dedicated mirror port): an XDP program hands every
    /// frame to userspace, which parses and counts it (`capture::afxdp`).
    Afxdp,
}

from_keywords!(Capture, "capture", {
    "auto" => Auto,
    "xdp" => Xdp,
    "tc" => Tc,
    "afxdp" => Afxdp,
});

/// `--capture auto`'s first choice for an interface whose driver is
/// `driver` (ETHTOOL_GDRVINFO; None if it does not say): native XDP, or TC
/// with the reason. Native XDP is the cheapest hook where the driver runs
/// the program on its own receive buffer, before any skb exists. veth has
/// none: its native XDP turns each skb into an XDP buffer first (a copy,
/// unless the skb is linear, unshared and has 256 bytes of headroom, which
/// a local sender's rarely has) and builds a new skb after XDP_PASS.
/// Measured on a veth pair with trafgen, an empty XDP program nearly
/// doubles the receive path's softirq CPU per packet (1.02-1.30 us against
/// 0.54-0.72), an empty TC program takes 0.60-0.74 (`cargo xtask bench
/// peers`, BENCHMARKS.md).
pub(crate) fn auto_hook(driver: Option<&str>) -> Result<(), &'static str> {
    match driver {
        Some("veth") => Err("veth, whose native XDP copies nearly every packet first"),
        _ => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("interface {0:?} does not exist (see `ip link`)")]
    NoSuchInterface(String),
    #[error(
        "not permitted to load BPF programs ({0}); run as root or grant CAP_BPF, \
         CAP_NET_ADMIN and CAP_PERFMON"
    )]
    NotPermitted(String),
    #[error(
        "cannot read the eBPF object {path}: {source}; build it with `cargo xtask build-ebpf`"
    )]
    ObjectUnreadable { path: PathBuf, source: io::Error },
    #[error(
        "interface {0:?} already has an XDP program attached by someone else; flowexport \
         does not replace it. Detach it first (`ip link set dev {0} xdp off`) or choose \
         another interface"
    )]
    XdpBusy(String),
    #[error("cannot attach XDP to {iface:?} in {mode} mode: {source}{hint}")]
    XdpAttach {
        iface: String,
        mode: &'static str,
        hint: &'static str,
        source: Box<ProgramError>,
    },
    #[error("cannot attach the TC egress program to {iface:?}: {source}")]
    TcAttach {
        iface: String,
        source: Box<ProgramError>,
    },
    #[error("the kernel rejected flowexport's eBPF object: {0}")]
    Load(String),
    #[error("cannot pin at {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("the eBPF object lacks {0}; rebuild it with `cargo xtask build-ebpf`")]
    MissingPart(&'static str),
    #[error(
        "not permitted to load BPF programs: missing {0}. Run as root, or grant exactly \
         CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (e.g. `setpriv --ambient-caps \
         +bpf,+net_admin,+perfmon ...`, or AmbientCapabilities= in a systemd unit)"
    )]
    MissingCapabilities(String),
    #[error(
        "cannot allocate the kernel's flow table: {reason}. --max-flows {max_flows} needs \
         {mib} MiB of kernel memory for the table; lower --max-flows or free memory"
    )]
    NoMemory {
        max_flows: u32,
        mib: u64,
        reason: String,
    },
}

pub struct LoadOptions<'a> {
    /// Where maps and links are pinned (None: nothing outlives the agent).
    pub pins: Option<&'a PinDir>,
    /// Flow-table capacity in concurrent flows; the table gets
    /// [`slots_for`] slots.
    pub max_flows: u32,
    /// Fallback ring buffer size in bytes (power of two, >= page size).
    pub fallback_ring_bytes: u32,
    /// Flow-cache slots per generation (power of two, or 0 for none).
    pub cache_slots: u32,
    /// Load this object instead of the embedded one.
    pub object: Option<PathBuf>,
    /// Which ingress program to load.
    pub capture: Capture,
    /// 1-in-N sampling (1: every packet).
    pub sampling: u32,
    /// The filter rules (default: none).
    pub filter: KernelFilter,
    /// `--mirror`: ingress programs drop what they counted, and no egress
    /// program is attached.
    pub mirror: bool,
}

impl LoadOptions<'_> {
    /// Kernel memory of the maps [`Programs::load`] creates with these
    /// options on a host with `cpus` possible CPUs, in bytes, by the
    /// `map` label of `flowexport_kernel_memory_bytes` (the README's
    /// Memory table). Not counted: `PENDING` (allocated as used: an entry
    /// per export in progress) and the filter's CIDR tries (a few KiB).
    pub fn kernel_memory(&self, cpus: u64) -> [(&'static str, u64); 6] {
        let slots = slots_for(self.max_flows);
        [
            ("table", super::table::table_bytes(slots)),
            (
                // Two halves of slots (`CACHE`) and a 4-byte tag for each
                // slot (`CACHE_TAGS`), per CPU.
                "cache",
                2 * u64::from(self.cache_slots.max(1))
                    * (size_of::<CacheSlot>() + size_of::<u32>()) as u64
                    * cpus,
            ),
            ("ring", u64::from(self.fallback_ring_bytes)),
            ("misses", u64::from(MISS_RING_BYTES)),
            // The port table (one entry until a rule names a port).
            ("filter", self.filter.port_table_bytes()),
            (
                // `TABLE_LOCKS`, the `DIRTY` bitmap, the per-CPU `STATS`.
                "other",
                4 * u64::from(TABLE_LOCKS)
                    + 8 * u64::from(dirty_words(slots))
                    + 8 * u64::from(STAT_LEN) * cpus,
            ),
        ]
    }
}

/// One program attachment.
enum Attachment {
    /// A BPF link we hold; pinned at `pin` when there is a pin directory
    /// (then it outlives us, see `leave_attached`).
    Link {
        iface: String,
        link: FdLink,
        pin: Option<PathBuf>,
    },
    /// XDP program `prog` attached by netlink (kernels without XDP links).
    Xdp {
        iface: String,
        prog: &'static str,
        id: XdpLinkId,
    },
    /// A TC filter by netlink (kernels before 6.6: no TCX).
    Tc {
        iface: String,
        prog: &'static str,
        id: tc::SchedClassifierLinkId,
    },
}

impl Attachment {
    fn iface(&self) -> &str {
        match self {
            Attachment::Link { iface, .. }
            | Attachment::Xdp { iface, .. }
            | Attachment::Tc { iface, .. } => iface,
        }
    }
}

/// Loaded programs and their attachments. Dropping it detaches what is not
/// pinned.
pub struct Programs {
    pub ebpf: Ebpf,
    capture: Capture,
    mirror: bool,
    pins: Option<PathBuf>,
    attached: Vec<Attachment>,
    /// The XDP program loaded: PROG_INGRESS (PROG_XSK with AF_XDP), or on
    /// a kernel without multi-buffer XDP, its single-buffer copy.
    xdp_ingress: &'static str,
}

/// What `--capture auto` attaches to an interface: the TC ingress program.
fn tc_ingress_auto(reason: &str) -> String {
    format!("TC ingress (--capture auto: {reason}; --capture xdp forces XDP)")
}

/// A hook's name in link pins.
const HOOK_XDP: &str = "xdp";
const HOOK_TC_INGRESS: &str = "tc-ingress";
const HOOK_TC_EGRESS: &str = "tc-egress";

fn is_perm(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EPERM)
}

fn program_io_error(e: &ProgramError) -> Option<&io::Error> {
    match e {
        ProgramError::SyscallError(s) => Some(&s.io_error),
        ProgramError::LoadError { io_error, .. } => Some(io_error),
        _ => None,
    }
}

fn map_load_error(e: EbpfError) -> CaptureError {
    let perm = match &e {
        EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. }) => is_perm(io_error),
        EbpfError::ProgramError(p) => program_io_error(p).is_some_and(is_perm),
        _ => false,
    };
    if perm {
        CaptureError::NotPermitted(e.to_string())
    } else {
        CaptureError::Load(e.to_string())
    }
}

/// The interface's index, or a clear error if it does not exist.
pub fn ifindex(iface: &str) -> Result<u32, CaptureError> {
    let c = std::ffi::CString::new(iface)
        .map_err(|_| CaptureError::NoSuchInterface(iface.to_string()))?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(CaptureError::NoSuchInterface(iface.to_string())),
        i => Ok(i),
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, CaptureError> {
    ebpf.program_mut(name)
        .ok_or(CaptureError::MissingPart(name))?
        .try_into()
        .map_err(|_| CaptureError::MissingPart(name))
}

impl Programs {
    /// Loads the object (embedded or `opts.object`) and its programs into the
    /// kernel, without attaching them.
    pub fn load(opts: &LoadOptions) -> Result<Programs, CaptureError> {
        // Name a missing capability now rather than fail on an EPERM later.
        super::privileges::require()?;
        let owned;
        let bytes: &[u8] = match &opts.object {
            Some(path) => {
                owned = read_object(path)?;
                &owned
            }
            None => EMBEDDED_OBJECT,
        };
        let slots = slots_for(opts.max_flows);
        let mask = slots - 1;
        // Possible CPUs: `CACHE_TAGS` has a row of tags for each.
        let cpus = aya::util::nr_cpus().map_or(1, |n| n as u32);
        let mut loader = EbpfLoader::new();
        if let Some(pins) = opts.pins {
            // Maps pinned there are reused (their counts go on); the others
            // are created and pinned.
            for name in MAPS {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader
            .map_max_entries(MAP_TABLE, slots)
            .map_max_entries(MAP_PENDING, slots)
            .map_max_entries(MAP_DIRTY, dirty_words(slots))
            .override_global(GLOBAL_TABLE_MASK, &mask, true)
            .map_max_entries(MAP_FALLBACK, opts.fallback_ring_bytes)
            // Two halves (one per generation); an array needs one entry
            // even when the cache is off.
            .map_max_entries(MAP_CACHE, (2 * opts.cache_slots).max(1))
            .map_max_entries(MAP_CACHE_TAGS, (cpus * opts.cache_slots).max(1))
            .override_global(GLOBAL_CACHE_SLOTS, &opts.cache_slots, true)
            .override_global(GLOBAL_SAMPLING, &opts.sampling, true)
            .override_global(GLOBAL_FILTER, &opts.filter.set, true)
            .override_global(GLOBAL_MIRROR, &u8::from(opts.mirror), true)
            .map_max_entries(MAP_FILTER_PORTS, opts.filter.port_table_entries())
            .load(bytes)
            .map_err(|e| match &e {
                EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if matches!(io_error.raw_os_error(), Some(libc::ENOMEM | libc::E2BIG)) =>
                {
                    CaptureError::NoMemory {
                        max_flows: opts.max_flows,
                        mib: super::table::table_bytes(slots) >> 20,
                        reason: e.to_string(),
                    }
                }
                _ => map_load_error(e),
            })?;
        // The tries before the programs: no packet sees a rule without
        // its CIDRs.
        fill_trie(&mut ebpf, MAP_FILTER_V4, &opts.filter.v4)?;
        fill_trie(&mut ebpf, MAP_FILTER_V6, &opts.filter.v6)?;
        if !opts.filter.ports.is_empty() {
            let map = ebpf
                .map_mut(MAP_FILTER_PORTS)
                .ok_or(CaptureError::MissingPart(MAP_FILTER_PORTS))?;
            let mut ports: Array<&mut MapData, FilterMasks> =
                Array::try_from(map).map_err(|e| map_load_error(e.into()))?;
            for (port, masks) in &opts.filter.ports {
                ports
                    .set(u32::from(*port), *masks, 0)
                    .map_err(|e| map_load_error(e.into()))?;
            }
        }
        let load_xdp = |ebpf: &mut Ebpf, name: &'static str| -> Result<(), CaptureError> {
            let xdp: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(CaptureError::MissingPart(name))?
                .try_into()
                .map_err(|_| CaptureError::MissingPart(name))?;
            xdp.load().map_err(|e| map_load_error(e.into()))
        };
        let mut xdp_ingress = PROG_INGRESS;
        // Auto loads both ingress programs and picks one per interface.
        if matches!(opts.capture, Capture::Auto | Capture::Tc) {
            classifier(&mut ebpf, PROG_INGRESS_TC)?
                .load()
                .map_err(|e| map_load_error(e.into()))?;
        }
        match opts.capture {
            Capture::Tc => {}
            Capture::Auto | Capture::Xdp | Capture::Afxdp => {
                let (prog, linear) = if opts.capture == Capture::Afxdp {
                    (PROG_XSK, PROG_XSK_LINEAR)
                } else {
                    (PROG_INGRESS, PROG_INGRESS_LINEAR)
                };
                xdp_ingress = prog;
                if let Err(e) = load_xdp(&mut ebpf, prog) {
                    // A kernel before 5.18 refuses a multi-buffer program;
                    // the single-buffer copy is the same code otherwise.
                    // Any other cause fails the copy too: then the first
                    // error is the one to report.
                    if load_xdp(&mut ebpf, linear).is_err() {
                        return Err(e);
                    }
                    log::info!(
                        "this kernel has no multi-buffer XDP (Linux 5.18+): loaded {linear}; \
                         native XDP refuses it on an interface whose MTU needs more than one \
                         buffer per frame (--xdp-mode auto then falls back to skb mode; \
                         --capture tc has no such limit)"
                    );
                    xdp_ingress = linear;
                }
            }
        }
        if opts.capture != Capture::Afxdp {
            classifier(&mut ebpf, PROG_EGRESS)?
                .load()
                .map_err(|e| map_load_error(e.into()))?;
            // Never attached: the drain thread runs it (capture::replay).
            load_xdp(&mut ebpf, PROG_REPLAY)?;
        }
        Ok(Programs {
            ebpf,
            capture: opts.capture,
            mirror: opts.mirror,
            pins: opts.pins.map(|p| p.path().to_path_buf()),
            attached: Vec::new(),
            xdp_ingress,
        })
    }

    /// Attaches the ingress program (XDP in `mode`, or TC; with
    /// `--capture auto` the hook `auto_hook` picks for the interface's
    /// driver) and the TC egress program to `iface`. Returns how ingress is
    /// counted, for the log.
    ///
    /// With a pin directory, a link pinned there for the same interface and
    /// hook (left by an earlier agent) is adopted: the program behind it is
    /// replaced by ours in one step, so no packet goes uncounted. New links
    /// are pinned. With `--capture auto` an interface keeps the ingress hook
    /// a pinned link has (switching hooks under traffic would count packets
    /// twice while both are attached).
    pub fn attach(&mut self, iface: &str, mode: XdpModeChoice) -> Result<String, CaptureError> {
        ifindex(iface)?;
        let ingress = match self.capture {
            Capture::Auto => self.attach_auto(iface)?,
            Capture::Xdp => {
                let prog = self.xdp_ingress;
                if self.adopt(iface, HOOK_XDP, prog)? {
                    "XDP ingress (adopted link)".to_string()
                } else {
                    format!("XDP ingress ({} mode)", self.attach_xdp(iface, prog, mode)?)
                }
            }
            Capture::Afxdp => {
                return Ok(format!(
                    "XDP to AF_XDP sockets ({} mode)",
                    self.attach_xdp(iface, self.xdp_ingress, mode)?
                ));
            }
            Capture::Tc => {
                if !self.adopt(iface, HOOK_TC_INGRESS, PROG_INGRESS_TC)? {
                    self.attach_tc(iface, PROG_INGRESS_TC, TcAttachType::Ingress)?;
                }
                "TC ingress".to_string()
            }
        };
        if self.mirror {
            // A mirror port's egress is not traffic of this host.
            return Ok(format!("{ingress}, mirror (copies dropped, no egress)"));
        }
        if !self.adopt(iface, HOOK_TC_EGRESS, PROG_EGRESS)? {
            self.attach_tc(iface, PROG_EGRESS, TcAttachType::Egress)?;
        }
        Ok(format!("{ingress}, TC egress"))
    }

    /// `--capture auto`'s ingress: an adopted link's hook, else native XDP
    /// where [`auto_hook`] allows it and the driver takes it, else TC.
    fn attach_auto(&mut self, iface: &str) -> Result<String, CaptureError> {
        let xdp = self.xdp_ingress;
        if self.adopt(iface, HOOK_XDP, xdp)? {
            return Ok("XDP ingress (adopted link)".to_string());
        }
        if self.adopt(iface, HOOK_TC_INGRESS, PROG_INGRESS_TC)? {
            return Ok("TC ingress (adopted link)".to_string());
        }
        let driver = super::interfaces::driver(iface);
        let driver_name = driver.as_deref().unwrap_or("(unknown)");
        let ingress = match auto_hook(driver.as_deref()) {
            Err(reason) => tc_ingress_auto(reason),
            Ok(()) => match self.attach_xdp(iface, xdp, XdpModeChoice::Native) {
                Ok(_) => {
                    return Ok(format!(
                        "XDP ingress (native mode; --capture auto, driver {driver_name})"
                    ))
                }
                Err(CaptureError::XdpBusy(_)) => {
                    tc_ingress_auto("another program holds the XDP hook")
                }
                Err(e) => {
                    // No native XDP in the driver, or not at this MTU.
                    log::debug!("{e}");
                    tc_ingress_auto(&format!("native XDP refused by driver {driver_name}"))
                }
            },
        };
        self.attach_tc(iface, PROG_INGRESS_TC, TcAttachType::Ingress)?;
        Ok(ingress)
    }

    /// Takes over the link pinned for (`iface`, `hook`), if there is one,
    /// putting program `prog` behind it. False if there is none (or it no
    /// longer works: its interface went away; then its pin is removed).
    fn adopt(&mut self, iface: &str, hook: &str, prog: &'static str) -> Result<bool, CaptureError> {
        let Some(dir) = &self.pins else {
            return Ok(false);
        };
        let path = dir.join(format!("link:{hook}:{iface}"));
        if !path.exists() {
            return Ok(false);
        }
        let replaced = (|| -> Result<FdLink, Box<dyn std::error::Error>> {
            let old = FdLink::from(PinnedLink::from_pin(&path)?);
            Ok(if hook == HOOK_XDP {
                let xdp: &mut Xdp = self
                    .ebpf
                    .program_mut(prog)
                    .ok_or("no program")?
                    .try_into()?;
                let id = xdp.attach_to_link(old.try_into()?)?;
                xdp.take_link(id)?.try_into()?
            } else {
                let tc = classifier(&mut self.ebpf, prog)?;
                let id = tc.attach_to_link(old.try_into()?)?;
                tc.take_link(id)?.try_into()?
            })
        })();
        match replaced {
            Ok(link) => {
                self.attached.push(Attachment::Link {
                    iface: iface.to_string(),
                    link,
                    pin: Some(path),
                });
                Ok(true)
            }
            Err(e) => {
                log::warn!(
                    "the link pinned at {} no longer works ({e}); attaching anew",
                    path.display()
                );
                let _ = std::fs::remove_file(&path);
                Ok(false)
            }
        }
    }

    /// Detaches and unpins the pinned links of interfaces and hooks not in
    /// use now (an interface no longer asked for; a hook of the other
    /// `--capture`). Returns what it detached, for the log.
    pub(crate) fn detach_unused_pins(&mut self) -> Vec<String> {
        let Some(dir) = &self.pins else {
            return Vec::new();
        };
        let used: Vec<PathBuf> = self
            .attached
            .iter()
            .filter_map(|a| match a {
                Attachment::Link { pin: Some(p), .. } => Some(p.clone()),
                _ => None,
            })
            .collect();
        let mut gone = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return gone;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("link:") && !used.contains(&e.path()) {
                // The pin is the last reference: removing it detaches.
                let _ = std::fs::remove_file(e.path());
                gone.push(name);
            }
        }
        gone
    }

    fn attach_tc(
        &mut self,
        iface: &str,
        prog: &'static str,
        at: TcAttachType,
    ) -> Result<(), CaptureError> {
        let hook = if at == TcAttachType::Ingress {
            HOOK_TC_INGRESS
        } else {
            HOOK_TC_EGRESS
        };
        let tc = classifier(&mut self.ebpf, prog)?;
        let id = match tc.attach(iface, at) {
            Ok(l) => l,
            Err(first) => {
                // Kernels before 6.6 have no TCX: netlink needs a clsact qdisc.
                // EEXIST means it is already there, which is fine.
                let _ = tc::qdisc_add_clsact(iface);
                tc.attach(iface, at).map_err(|_| CaptureError::TcAttach {
                    iface: iface.to_string(),
                    source: Box::new(first),
                })?
            }
        };
        // A TCX link we hold (and pin); a netlink filter stays the
        // program's.
        let link = tc.take_link(id).ok().and_then(|l| FdLink::try_from(l).ok());
        match link {
            Some(link) => self.hold(iface, hook, link),
            None => {
                let id = tc.attach(iface, at).map_err(|e| CaptureError::TcAttach {
                    iface: iface.to_string(),
                    source: Box::new(e),
                })?;
                self.attached.push(Attachment::Tc {
                    iface: iface.to_string(),
                    prog,
                    id,
                });
                Ok(())
            }
        }
    }

    /// Keeps a new link, pinned when there is a pin directory.
    fn hold(&mut self, iface: &str, hook: &str, link: FdLink) -> Result<(), CaptureError> {
        let pin = self
            .pins
            .as_ref()
            .map(|d| d.join(format!("link:{hook}:{iface}")));
        let link = match &pin {
            Some(path) => {
                let pinned = link.pin(path).map_err(|e| CaptureError::Pin {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                FdLink::from(pinned)
            }
            None => link,
        };
        self.attached.push(Attachment::Link {
            iface: iface.to_string(),
            link,
            pin,
        });
        Ok(())
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        prog: &'static str,
        mode: XdpModeChoice,
    ) -> Result<&'static str, CaptureError> {
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(prog)
            .ok_or(CaptureError::MissingPart(prog))?
            .try_into()
            .map_err(|_| CaptureError::MissingPart(prog))?;
        let busy = |e: &ProgramError| {
            program_io_error(e)
                .and_then(io::Error::raw_os_error)
                .is_some_and(|c| c == libc::EBUSY || c == libc::EEXIST)
        };
        let attempt = |xdp: &mut Xdp, m: XdpMode, name: &'static str| {
            xdp.attach(iface, m).map_err(|e| {
                if busy(&e) {
                    CaptureError::XdpBusy(iface.to_string())
                } else {
                    CaptureError::XdpAttach {
                        iface: iface.to_string(),
                        mode: name,
                        hint: if name != "native" {
                            ""
                        } else if program_io_error(&e)
                            .and_then(io::Error::raw_os_error)
                            .is_some_and(|c| c == libc::ERANGE)
                        {
                            " (the interface's MTU is larger than this driver's XDP takes; \
                             try --capture tc, or --xdp-mode skb or auto)"
                        } else {
                            " (the driver may lack native XDP; try --xdp-mode skb or auto)"
                        },
                        source: Box::new(e),
                    }
                }
            })
        };
        let (id, used) = match mode {
            XdpModeChoice::Native => (attempt(xdp, XdpMode::Driver, "native")?, "native"),
            XdpModeChoice::Skb => (attempt(xdp, XdpMode::Skb, "skb")?, "skb"),
            XdpModeChoice::Auto => match attempt(xdp, XdpMode::Driver, "native") {
                Ok(l) => (l, "native"),
                Err(e @ CaptureError::XdpBusy(_)) => return Err(e),
                Err(e) => {
                    log::warn!("{e}; falling back to skb (generic) mode on {iface}");
                    (attempt(xdp, XdpMode::Skb, "skb")?, "skb")
                }
            },
        };
        // An XDP link we hold (and pin); a netlink attachment stays the
        // program's.
        let link = xdp
            .take_link(id)
            .map_err(|e| CaptureError::Load(e.to_string()))?;
        match FdLink::try_from(link) {
            Ok(link) => self.hold(iface, HOOK_XDP, link)?,
            Err(_) => {
                // Attached by netlink (no XDP links on this kernel): the
                // attachment goes away with the program; attach it again,
                // owned by the program.
                log::warn!("XDP on {iface} is attached by netlink: it cannot outlive the agent");
                let mode = if used == "native" {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                let id = attempt(xdp, mode, used)?;
                self.attached.push(Attachment::Xdp {
                    iface: iface.to_string(),
                    prog,
                    id,
                });
            }
        }
        Ok(used)
    }

    /// Detaches every program from every interface (and removes the link
    /// pins). Packets already inside a program still finish; wait for a
    /// grace period before the final drain.
    pub(crate) fn detach_all(&mut self) {
        for a in std::mem::take(&mut self.attached) {
            self.detach(a, true);
        }
    }

    /// Detaches (and unpins) the programs of `iface`: an interface that
    /// went away (the kernel has detached them already; then nothing is
    /// logged), or one whose attach failed half-way.
    pub fn forget(&mut self, iface: &str) {
        let (gone, kept) = std::mem::take(&mut self.attached)
            .into_iter()
            .partition(|a| a.iface() == iface);
        self.attached = kept;
        for a in gone {
            self.detach(a, false);
        }
    }

    /// The interfaces with programs attached.
    pub(crate) fn attached_ifaces(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.attached.iter().map(Attachment::iface).collect();
        v.dedup();
        v
    }

    fn detach(&mut self, a: Attachment, log_errors: bool) {
        let report = |what: &str, iface: &str, e: &dyn std::fmt::Display| {
            if log_errors {
                log::warn!("detaching {what}from {iface}: {e}");
            }
        };
        match a {
            Attachment::Link { iface, link, pin } => {
                if let Some(p) = pin {
                    let _ = std::fs::remove_file(p);
                }
                if let Err(e) = link.detach() {
                    report("", &iface, &e);
                }
            }
            Attachment::Xdp { iface, prog, id } => {
                if let Some(Ok(xdp)) = self.ebpf.program_mut(prog).map(<&mut Xdp>::try_from) {
                    if let Err(e) = xdp.detach(id) {
                        report("XDP ", &iface, &e);
                    }
                }
            }
            Attachment::Tc { iface, prog, id } => {
                if let Ok(tc) = classifier(&mut self.ebpf, prog) {
                    if let Err(e) = tc.detach(id) {
                        report("TC ", &iface, &e);
                    }
                }
            }
        }
    }

    /// Leaves the pinned links attached (the programs keep counting into
    /// the pinned maps for the next agent); detaches the rest. Returns how
    /// many stay.
    pub(crate) fn leave_attached(&mut self) -> usize {
        let mut kept = 0;
        for a in std::mem::take(&mut self.attached) {
            match a {
                // Dropping our reference leaves the pin's.
                Attachment::Link { pin: Some(_), .. } => kept += 1,
                other => self.attached.push(other),
            }
        }
        self.detach_all();
        kept
    }
}

/// Inserts the filter rules' prefixes of one family into its trie.
fn fill_trie<A: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(u32, A, FilterMasks)],
) -> Result<(), CaptureError> {
    if entries.is_empty() {
        return Ok(());
    }
    let map = ebpf.map_mut(name).ok_or(CaptureError::MissingPart(name))?;
    let mut trie: LpmTrie<&mut MapData, A, FilterMasks> =
        LpmTrie::try_from(map).map_err(|e| map_load_error(e.into()))?;
    for (len, addr, masks) in entries {
        trie.insert(&Key::new(*len, *addr), *masks, 0)
            .map_err(|e| map_load_error(e.into()))?;
    }
    Ok(())
}

fn read_object(path: &Path) -> Result<Vec<u8>, CaptureError> {
    std::fs::read(path).map_err(|source| CaptureError::ObjectUnreadable {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's Memory table: the defaults' kernel memory at 2, 16
    /// and 64 CPUs, within the 256 MiB bound at 64.
    #[test]
    fn kernel_memory_at_the_defaults_is_the_readmes() {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        for (cpus, total, cache) in [(2, 209.8, 0.78), (16, 215.3, 6.25), (64, 221.5, 12.5)] {
            let opts = LoadOptions {
                pins: None,
                max_flows: flowexport_common::DEFAULT_MAX_FLOWS,
                fallback_ring_bytes: crate::cmd::agent::config::DEFAULT_FALLBACK_RING_BYTES,
                cache_slots: flowexport_common::default_cache_slots(cpus as u32),
                object: None,
                capture: Capture::Xdp,
                sampling: 1,
                filter: KernelFilter::default(),
                mirror: false,
            };
            let m = opts.kernel_memory(cpus);
            let by = |name: &str| m.iter().find(|e| e.0 == name).unwrap().1;
            assert_eq!(by("table"), 192 << 20);
            assert_eq!(by("misses"), 16 << 20);
            assert!(
                (mib(by("cache")) - cache).abs() < 0.005,
                "{cpus} CPUs: {m:?}"
            );
            let sum: u64 = m.iter().map(|e| e.1).sum();
            assert!((mib(sum) - total).abs() < 0.05, "{cpus} CPUs: {}", mib(sum));
            assert!(sum <= 256 << 20);
        }
    }
}
