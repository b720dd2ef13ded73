//! Loads flowexport's kernel programs and attaches them: XDP (or, with
//! `--capture tc`, TC) on ingress, TC (TCX on kernels >= 6.6, clsact before)
//! on egress.

use std::io;
use std::path::{Path, PathBuf};

use aya::programs::{
    tc, xdp::XdpLinkId, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use aya::{Ebpf, EbpfError, EbpfLoader};
use flowexport_common::{
    GLOBAL_CACHE_SLOTS, GLOBAL_TABLE_MASK, MAP_CACHE, MAP_DIRTY, MAP_FALLBACK, MAP_TABLE,
    PROG_EGRESS, PROG_INGRESS, PROG_INGRESS_TC,
};

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

impl std::str::FromStr for XdpModeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" | "drv" | "driver" => Ok(XdpModeChoice::Native),
            "skb" | "generic" => Ok(XdpModeChoice::Skb),
            "auto" => Ok(XdpModeChoice::Auto),
            other => Err(format!(
                "unknown XDP mode {other:?}: use native, skb or auto"
            )),
        }
    }
}

/// Where ingress packets are counted (`--capture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// An XDP program (`--xdp-mode` says how it attaches); the default.
    Xdp,
    /// A TC (TCX) program, like egress: cheaper than XDP where the driver
    /// has to build an XDP buffer for it (veth) or has no native XDP, and
    /// it leaves the XDP hook free.
    Tc,
}

impl std::str::FromStr for Capture {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "xdp" => Ok(Capture::Xdp),
            "tc" => Ok(Capture::Tc),
            other => Err(format!("unknown capture {other:?}: use xdp or tc")),
        }
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

pub struct LoadOptions {
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
}

/// Loaded programs and their attachments. Dropping it detaches everything.
pub struct Programs {
    pub ebpf: Ebpf,
    capture: Capture,
    xdp_links: Vec<(String, XdpLinkId)>,
    /// (interface, program, link)
    tc_links: Vec<(String, &'static str, tc::SchedClassifierLinkId)>,
}

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
        match super::privileges::effective() {
            Ok(eff) => {
                let missing = super::privileges::missing(eff);
                if !missing.is_empty() {
                    return Err(CaptureError::MissingCapabilities(
                        super::privileges::describe(&missing),
                    ));
                }
            }
            Err(e) => log::debug!("cannot read this process's capabilities: {e}"),
        }
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
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_TABLE, slots)
            .map_max_entries(MAP_DIRTY, dirty_words(slots))
            .override_global(GLOBAL_TABLE_MASK, &mask, true)
            .map_max_entries(MAP_FALLBACK, opts.fallback_ring_bytes)
            // Two halves (one per generation); an array needs one entry
            // even when the cache is off.
            .map_max_entries(MAP_CACHE, (2 * opts.cache_slots).max(1))
            .override_global(GLOBAL_CACHE_SLOTS, &opts.cache_slots, true)
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
        match opts.capture {
            Capture::Xdp => {
                let xdp: &mut Xdp = ebpf
                    .program_mut(PROG_INGRESS)
                    .ok_or(CaptureError::MissingPart(PROG_INGRESS))?
                    .try_into()
                    .map_err(|_| CaptureError::MissingPart(PROG_INGRESS))?;
                xdp.load().map_err(|e| map_load_error(e.into()))?;
            }
            Capture::Tc => classifier(&mut ebpf, PROG_INGRESS_TC)?
                .load()
                .map_err(|e| map_load_error(e.into()))?,
        }
        classifier(&mut ebpf, PROG_EGRESS)?
            .load()
            .map_err(|e| map_load_error(e.into()))?;
        Ok(Programs {
            ebpf,
            capture: opts.capture,
            xdp_links: Vec::new(),
            tc_links: Vec::new(),
        })
    }

    /// Attaches the ingress program (XDP in `mode`, or TC) and the TC egress
    /// program to `iface`. Returns how ingress is counted, for the log.
    pub fn attach(&mut self, iface: &str, mode: XdpModeChoice) -> Result<String, CaptureError> {
        ifindex(iface)?;
        let ingress = match self.capture {
            Capture::Xdp => format!("XDP ingress ({} mode)", self.attach_xdp(iface, mode)?),
            Capture::Tc => {
                self.attach_tc(iface, PROG_INGRESS_TC, TcAttachType::Ingress)?;
                "TC ingress".to_string()
            }
        };
        self.attach_tc(iface, PROG_EGRESS, TcAttachType::Egress)?;
        Ok(format!("{ingress}, TC egress"))
    }

    fn attach_tc(
        &mut self,
        iface: &str,
        prog: &'static str,
        at: TcAttachType,
    ) -> Result<(), CaptureError> {
        let tc = classifier(&mut self.ebpf, prog)?;
        let link = match tc.attach(iface, at) {
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
        self.tc_links.push((iface.to_string(), prog, link));
        Ok(())
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpModeChoice,
    ) -> Result<&'static str, CaptureError> {
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(PROG_INGRESS)
            .ok_or(CaptureError::MissingPart(PROG_INGRESS))?
            .try_into()
            .map_err(|_| CaptureError::MissingPart(PROG_INGRESS))?;
        let busy = |e: &ProgramError| {
            program_io_error(e)
                .and_then(|e| e.raw_os_error())
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
                        hint: if name == "native" {
                            " (the driver may lack native XDP; try --xdp-mode skb or auto)"
                        } else {
                            ""
                        },
                        source: Box::new(e),
                    }
                }
            })
        };
        let (link, used) = match mode {
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
        self.xdp_links.push((iface.to_string(), link));
        Ok(used)
    }

    /// Detaches every program from every interface. Packets already inside a
    /// program still finish; wait for a grace period before the final drain.
    pub fn detach_all(&mut self) {
        if let Some(p) = self.ebpf.program_mut(PROG_INGRESS) {
            if let Ok(xdp) = <&mut Xdp>::try_from(p) {
                for (iface, link) in self.xdp_links.drain(..) {
                    if let Err(e) = xdp.detach(link) {
                        log::warn!("detaching XDP from {iface}: {e}");
                    }
                }
            }
        }
        for (iface, prog, link) in std::mem::take(&mut self.tc_links) {
            if let Ok(tc) = classifier(&mut self.ebpf, prog) {
                if let Err(e) = tc.detach(link) {
                    log::warn!("detaching TC from {iface}: {e}");
                }
            }
        }
    }
}

fn read_object(path: &Path) -> Result<Vec<u8>, CaptureError> {
    std::fs::read(path).map_err(|source| CaptureError::ObjectUnreadable {
        path: path.to_path_buf(),
        source,
    })
}
