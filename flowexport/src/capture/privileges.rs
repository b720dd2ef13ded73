//! The capabilities the agent needs, checked before it touches the kernel,
//! so that a missing one is named instead of surfacing as a bare EPERM from
//! some `bpf()` call.
//!
//! Exactly three, none of them root (Linux 5.8+): CAP_BPF (create maps, load
//! programs), CAP_PERFMON (the verifier's rules for trusted programs: the
//! pointer arithmetic of the flow table and the packet parser), and
//! CAP_NET_ADMIN (attach XDP and TC programs to interfaces). CAP_SYS_ADMIN
//! stands in for the first two on older kernels.

use std::io;

pub(crate) const CAP_NET_ADMIN: u32 = 12;
pub(crate) const CAP_SYS_ADMIN: u32 = 21;
pub(crate) const CAP_PERFMON: u32 = 38;
pub(crate) const CAP_BPF: u32 = 39;

/// A capability the agent needs, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Needed {
    pub name: &'static str,
    pub cap: u32,
    /// Also satisfied by CAP_SYS_ADMIN (kernels before 5.8).
    pub sys_admin_will_do: bool,
    pub why: &'static str,
}

pub(crate) const NEEDED: [Needed; 3] = [
    Needed {
        name: "CAP_BPF",
        cap: CAP_BPF,
        sys_admin_will_do: true,
        why: "create BPF maps and load programs",
    },
    Needed {
        name: "CAP_PERFMON",
        cap: CAP_PERFMON,
        sys_admin_will_do: true,
        why: "load programs the verifier checks as trusted",
    },
    Needed {
        name: "CAP_NET_ADMIN",
        cap: CAP_NET_ADMIN,
        sys_admin_will_do: false,
        why: "attach XDP and TC programs to interfaces",
    },
];

/// The capabilities missing from an effective set (a bit mask).
pub(crate) fn missing(effective: u64) -> Vec<Needed> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    NEEDED
        .iter()
        .filter(|n| !(has(n.cap) || (n.sys_admin_will_do && has(CAP_SYS_ADMIN))))
        .copied()
        .collect()
}

/// The effective capability set of this process (`CapEff` in
/// /proc/self/status).
pub(crate) fn effective() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&status)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no CapEff in /proc/self/status"))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Fails, naming each missing capability, when this process lacks one.
pub(crate) fn require() -> Result<(), super::loader::CaptureError> {
    match effective() {
        Ok(eff) => {
            let m = missing(eff);
            if m.is_empty() {
                Ok(())
            } else {
                Err(super::loader::CaptureError::MissingCapabilities(describe(
                    &m,
                )))
            }
        }
        Err(e) => {
            log::debug!("cannot read this process's capabilities: {e}");
            Ok(())
        }
    }
}

/// "CAP_BPF (create BPF maps and load programs), ..." for an error message.
pub(crate) fn describe(missing: &[Needed]) -> String {
    missing
        .iter()
        .map(|n| format!("{} ({})", n.name, n.why))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_capabilities_or_root() {
        let all = (1u64 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        assert!(missing(all).is_empty());
        assert!(missing(u64::MAX).is_empty());
        let names = |m: Vec<Needed>| m.iter().map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(names(missing(all & !(1 << CAP_BPF))), vec!["CAP_BPF"]);
        assert_eq!(
            names(missing(0)),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, not for
        // CAP_NET_ADMIN.
        assert_eq!(names(missing(1 << CAP_SYS_ADMIN)), vec!["CAP_NET_ADMIN"]);
        assert_eq!(
            describe(&missing(all & !(1 << CAP_NET_ADMIN))),
            "CAP_NET_ADMIN (attach XDP and TC programs to interfaces)"
        );
    }

    #[test]
    fn reads_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0xc0_0000_1000));
        assert!(missing(0xc0_0000_1000).is_empty());
        assert_eq!(parse_cap_eff("Name: x\n"), None);
        assert!(effective().is_ok());
    }
}
