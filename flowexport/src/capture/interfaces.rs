//! Which interfaces the agent watches: `--iface` names and shell-style
//! globs, minus `--exclude-iface` globs, and the interfaces that come and
//! go, from the kernel's netlink link notifications (RTM_NEWLINK /
//! RTM_DELLINK on the RTMGRP_LINK group); and the host's own address, the
//! records' default `sampler_address`.
//!
//! The netlink messages are parsed by a pure function over bytes
//! ([`parse_links`]); the sockets only move bytes.

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `--iface` and `--exclude-iface`, split into plain names and globs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Selection {
    /// Plain names: each must exist at start.
    pub names: Vec<String>,
    /// Globs: every matching interface, now and later (never loopback).
    pub globs: Vec<String>,
    /// Globs (or names) no `--iface` glob may match.
    pub excludes: Vec<String>,
}

/// Whether `s` has a glob's special characters.
pub(crate) fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// fnmatch(3): shell-style matching (`*`, `?`, `[...]`), as the shell does
/// for file names. False for a pattern or name with a NUL byte.
fn fnmatch(pattern: &str, name: &str) -> bool {
    let (Ok(p), Ok(n)) = (CString::new(pattern), CString::new(name)) else {
        return false;
    };
    // SAFETY: two valid NUL-terminated strings.
    unsafe { libc::fnmatch(p.as_ptr(), n.as_ptr(), 0) == 0 }
}

impl Selection {
    /// Splits the `--iface` values into names and globs.
    pub(crate) fn new(ifaces: &[String], excludes: &[String]) -> Selection {
        let (globs, names): (Vec<String>, Vec<String>) =
            ifaces.iter().cloned().partition(|i| is_glob(i));
        Selection {
            names,
            globs,
            excludes: excludes.to_vec(),
        }
    }

    /// Whether an interface that appears (or is there at start) is watched
    /// through a glob: it matches one, no exclusion, and is not loopback.
    /// (Plain names are attached at start, whatever they are.)
    pub(crate) fn glob_matches(&self, link: &Link) -> bool {
        !link.loopback
            && !self.names.contains(&link.name)
            && self.globs.iter().any(|g| fnmatch(g, &link.name))
            && !self.excludes.iter().any(|x| fnmatch(x, &link.name))
    }
}

/// One interface as a netlink link message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
}

/// What a netlink message says about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    /// A link exists (RTM_NEWLINK: new, or changed).
    Present(Link),
    /// A link went away (RTM_DELLINK).
    Gone(Link),
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const IFLA_IFNAME: u16 = 3;
const ARPHRD_LOOPBACK: u16 = 772;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

/// Why a netlink reply could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NetlinkError {
    #[error("netlink message of {0} bytes runs past the datagram")]
    Truncated(usize),
    #[error("the kernel answered the link dump with error {0}")]
    Kernel(i32),
    #[error("the link dump was interrupted by a change; list again")]
    Interrupted,
}

/// Parses one datagram of netlink messages: the link events in it, and
/// whether it ended a dump (NLMSG_DONE). Messages of other types, and link
/// messages of a family other than AF_UNSPEC (the bridge driver's
/// AF_BRIDGE RTM_DELLINK when a port leaves a bridge: the interface stays),
/// are skipped. A dump the kernel interrupted (NLM_F_DUMP_INTR: links
/// changed meanwhile) or ended with an error is an error.
pub(crate) fn parse_links(buf: &[u8]) -> Result<(Vec<LinkEvent>, bool), NetlinkError> {
    let mut out = Vec::new();
    let mut off = 0;
    let mut done = false;
    while off + NLMSG_HDR <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
        let flags = u16::from_ne_bytes(buf[off + 6..off + 8].try_into().expect("2 bytes"));
        if len < NLMSG_HDR || off + len > buf.len() {
            return Err(NetlinkError::Truncated(len));
        }
        let body = &buf[off + NLMSG_HDR..off + len];
        if flags & NLM_F_DUMP_INTR != 0 {
            return Err(NetlinkError::Interrupted);
        }
        match ty {
            NLMSG_DONE => {
                done = true;
                if body.len() >= 4 {
                    let code = i32::from_ne_bytes(body[..4].try_into().expect("4 bytes"));
                    if code != 0 {
                        return Err(NetlinkError::Kernel(code));
                    }
                }
            }
            NLMSG_ERROR if body.len() >= 4 => {
                let code = i32::from_ne_bytes(body[..4].try_into().expect("4 bytes"));
                if code != 0 {
                    return Err(NetlinkError::Kernel(code));
                }
            }
            RTM_NEWLINK | RTM_DELLINK
                if body.len() >= IFINFOMSG && body[0] == libc::AF_UNSPEC as u8 =>
            {
                let kind = u16::from_ne_bytes(body[2..4].try_into().expect("2 bytes"));
                let index = u32::from_ne_bytes(body[4..8].try_into().expect("4 bytes"));
                let mut name = None;
                let mut a = IFINFOMSG;
                while a + 4 <= body.len() {
                    let alen = u16::from_ne_bytes(body[a..a + 2].try_into().expect("2")) as usize;
                    // The type without the nested / byte-order flags.
                    let aty = u16::from_ne_bytes(body[a + 2..a + 4].try_into().expect("2"))
                        & NLA_TYPE_MASK;
                    if alen < 4 || a + alen > body.len() {
                        break;
                    }
                    if aty == IFLA_IFNAME {
                        let v = &body[a + 4..a + alen];
                        let v = v.split(|b| *b == 0).next().unwrap_or_default();
                        name = Some(String::from_utf8_lossy(v).into_owned());
                    }
                    a += alen.div_ceil(4) * 4;
                }
                if let Some(name) = name {
                    let link = Link {
                        index,
                        name,
                        loopback: kind == ARPHRD_LOOPBACK,
                    };
                    out.push(if ty == RTM_NEWLINK {
                        LinkEvent::Present(link)
                    } else {
                        LinkEvent::Gone(link)
                    });
                }
            }
            _ => {}
        }
        off += len.div_ceil(4) * 4;
    }
    Ok((out, done))
}

/// A NETLINK_ROUTE socket, bound to `groups`.
fn route_socket(groups: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is valid; we set family and groups.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: addr is a valid sockaddr_nl of the given size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The interfaces present now (an RTM_GETLINK dump; again if a change
/// interrupted it, up to 10 times).
pub(crate) fn present() -> io::Result<Vec<Link>> {
    let mut tries = 0;
    loop {
        match dump() {
            Err(e)
                if tries < 10
                    && e.get_ref()
                        .and_then(|i| i.downcast_ref::<NetlinkError>())
                        .is_some_and(|n| *n == NetlinkError::Interrupted) =>
            {
                tries += 1;
            }
            r => return r,
        }
    }
}

fn dump() -> io::Result<Vec<Link>> {
    let fd = route_socket(0)?;
    // nlmsghdr (16) + rtgenmsg (family, padded to 4).
    let mut req = [0u8; NLMSG_HDR + 4];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = libc::AF_UNSPEC as u8;
    // SAFETY: req is readable for its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut links = Vec::new();
    loop {
        let n = recv(&fd, &mut buf)?;
        let (events, done) = parse_links(&buf[..n]).map_err(io::Error::other)?;
        links.extend(events.into_iter().filter_map(|e| match e {
            LinkEvent::Present(l) => Some(l),
            LinkEvent::Gone(_) => None,
        }));
        if done || n == 0 {
            return Ok(links);
        }
    }
}

/// A socket that receives the kernel's link notifications.
pub(crate) struct LinkMonitor {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl LinkMonitor {
    /// Subscribes to link notifications. Open it before reading
    /// [`present`], so that no interface appears unseen in between.
    pub(crate) fn open() -> io::Result<LinkMonitor> {
        Ok(LinkMonitor {
            fd: route_socket(libc::RTMGRP_LINK as u32)?,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Waits for the next datagram of notifications. An overrun socket
    /// (ENOBUFS: notifications were lost) is reported as an error; the
    /// caller reads [`present`] again.
    pub(crate) fn wait(&mut self) -> io::Result<Vec<LinkEvent>> {
        let n = recv(&self.fd, &mut self.buf)?;
        parse_links(&self.buf[..n])
            .map(|(events, _)| events)
            .map_err(io::Error::other)
    }
}

/// The interface's driver as ethtool names it (`ethtool -i`: "veth",
/// "virtio_net", "mlx5_core"...), or None if it does not say (no such
/// interface, or a device without ethtool operations).
pub(crate) fn driver(iface: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    /// struct ethtool_drvinfo (linux/ethtool.h): the command, then the
    /// strings; the kernel writes all 196 bytes.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    if iface.len() >= libc::IFNAMSIZ || iface.contains('\0') {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a socket we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL with a NUL-terminated name and ifr_data pointing
    // at a live ethtool_drvinfo, which the kernel fills.
    if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL as _, &mut req) } != 0 {
        return None;
    }
    let name = info.driver.split(|b| *b == 0).next().unwrap_or_default();
    (!name.is_empty()).then(|| String::from_utf8_lossy(name).into_owned())
}

/// The host's first non-loopback, non-link-local address: IPv4 first, then
/// global IPv6. None if the host has none.
pub(crate) fn host_address() -> Option<IpAddr> {
    let mut found: Vec<IpAddr> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur walks the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it names.
            unsafe {
                match (*ifa.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        found.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        found.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    let usable = |a: &IpAddr| match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    };
    found
        .iter()
        .find(|a| a.is_ipv4() && usable(a))
        .or_else(|| found.iter().find(|a| usable(a)))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RTM_NEWLINK/RTM_DELLINK message as the kernel sends it: header,
    /// ifinfomsg, an IFLA_MTU attribute and IFLA_IFNAME.
    fn link_msg(ty: u16, index: u32, kind: u16, name: &str) -> Vec<u8> {
        family_link_msg(0, ty, index, kind, name)
    }

    fn family_link_msg(family: u8, ty: u16, index: u32, kind: u16, name: &str) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG];
        body[0] = family;
        body[2..4].copy_from_slice(&kind.to_ne_bytes());
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&4u16.to_ne_bytes()); // IFLA_MTU
        body.extend_from_slice(&1500u32.to_ne_bytes());
        let alen = 4 + name.len() + 1;
        body.extend_from_slice(&(alen as u16).to_ne_bytes());
        body.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
        let mut m = ((NLMSG_HDR + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn link_messages_parse() {
        let mut buf = link_msg(RTM_NEWLINK, 7, 1, "brq1234");
        buf.extend(link_msg(RTM_DELLINK, 8, 1, "tap0"));
        buf.extend(link_msg(RTM_NEWLINK, 1, ARPHRD_LOOPBACK, "lo"));
        // A port leaving a bridge: AF_BRIDGE, not the interface going away.
        buf.extend(family_link_msg(
            libc::AF_BRIDGE as u8,
            RTM_DELLINK,
            9,
            1,
            "tap1",
        ));
        let (events, done) = parse_links(&buf).unwrap();
        assert!(!done);
        let link = |index, name: &str, loopback| Link {
            index,
            name: name.into(),
            loopback,
        };
        assert_eq!(
            events,
            vec![
                LinkEvent::Present(link(7, "brq1234", false)),
                LinkEvent::Gone(link(8, "tap0", false)),
                LinkEvent::Present(link(1, "lo", true)),
            ]
        );
        let mut done_msg = 20u32.to_ne_bytes().to_vec();
        done_msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done_msg.extend_from_slice(&[0; 14]);
        assert_eq!(parse_links(&done_msg).unwrap(), (vec![], true));
        let mut intr = link_msg(RTM_NEWLINK, 7, 1, "brq1234");
        intr[6..8].copy_from_slice(&NLM_F_DUMP_INTR.to_ne_bytes());
        assert_eq!(parse_links(&intr), Err(NetlinkError::Interrupted));
        let mut failed = done_msg.clone();
        failed[16..20].copy_from_slice(&(-16i32).to_ne_bytes());
        assert_eq!(parse_links(&failed), Err(NetlinkError::Kernel(-16)));
        // Cut short: an error, not a panic.
        assert!(parse_links(&buf[..buf.len() - 3]).is_err());
        assert_eq!(parse_links(&buf[..10]).unwrap(), (vec![], false));
    }

    #[test]
    fn globs_excludes_and_loopback() {
        let s = Selection::new(
            &["brq*".into(), "tap?".into(), "eth0".into()],
            &["brq-mgmt*".into()],
        );
        assert_eq!(s.names, vec!["eth0"]);
        let l = |name: &str, loopback| Link {
            index: 1,
            name: name.into(),
            loopback,
        };
        assert!(s.glob_matches(&l("brq1234", false)));
        assert!(s.glob_matches(&l("tap1", false)));
        assert!(!s.glob_matches(&l("tap12", false)));
        assert!(!s.glob_matches(&l("brq-mgmt0", false)), "excluded");
        assert!(
            !s.glob_matches(&l("eth0", false)),
            "a plain name, not a glob match"
        );
        let all = Selection::new(&["*".into()], &[]);
        assert!(!all.glob_matches(&l("lo", true)), "never loopback");
        assert!(all.glob_matches(&l("veth0", false)));
        assert!(is_glob("eth[01]") && !is_glob("eth0"));
    }

    /// The dump reads this host's (or namespace's) interfaces: loopback at
    /// least, marked as such.
    #[test]
    fn present_lists_loopback() {
        let links = present().unwrap();
        assert!(
            links.iter().any(|l| l.name == "lo" && l.loopback),
            "{links:?}"
        );
    }

    /// `--capture auto`'s choice by driver: TC on veth, XDP first anywhere
    /// else (a driver without native XDP then refuses it, and TC follows);
    /// no driver for a name that is no interface.
    #[test]
    fn auto_capture_by_driver() {
        use crate::capture::loader::auto_hook;
        assert!(auto_hook(Some("veth")).unwrap_err().contains("veth"));
        for other in [Some("virtio_net"), Some("mlx5_core"), Some("bridge"), None] {
            assert_eq!(auto_hook(other), Ok(()), "{other:?}");
        }
        assert_eq!(driver("no-such-if0"), None);
        assert_eq!(driver("a-name-longer-than-ifnamsiz"), None);
    }
}
