//! The collector's UDP side: sockets bound with SO_REUSEPORT, and
//! [`Datagrams`], which takes up to [`BATCH`] datagrams per system call.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// The receive buffer asked for each socket unless `--receive-buffer` says
/// otherwise. The kernel accounts twice this against the datagrams' memory
/// (~2.3 KiB for a 1,400-byte export packet): ~7,000 export packets, about
/// 100 ms of a worker's stall at 2M flows/s (67,000 datagrams of 30 flows a
/// second). Memory is taken only while datagrams wait.
pub(super) const RECEIVE_BUFFER: usize = 8 << 20;

/// `--receive-buffer`'s range: from what one worker's batch of 16 export
/// packets needs, to 1 GiB (SO_RCVBUF is an int that the kernel doubles).
pub(super) const RECEIVE_BUFFER_MIN: usize = 64 << 10;
pub(super) const RECEIVE_BUFFER_MAX: usize = 1 << 30;

/// `--receive-buffer BYTES`: a number of bytes in [`RECEIVE_BUFFER_MIN`,
/// `RECEIVE_BUFFER_MAX`].
pub(super) fn parse_receive_buffer(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes (e.g. 33554432 for 32 MiB)"))?;
    if !(RECEIVE_BUFFER_MIN..=RECEIVE_BUFFER_MAX).contains(&n) {
        return Err(format!(
            "{n} bytes is outside {RECEIVE_BUFFER_MIN}..={RECEIVE_BUFFER_MAX} (64 KiB to 1 GiB)"
        ));
    }
    Ok(n)
}

/// A UDP socket on `addr` that other sockets may share (SO_REUSEPORT: the
/// kernel spreads datagrams over them by the sender's address and port),
/// with a receive buffer of `rcvbuf` bytes: forced with CAP_NET_ADMIN, else
/// as much as net.core.rmem_max allows (see [`receive_buffer`]).
pub(super) fn reuseport_socket(addr: SocketAddr, rcvbuf: usize) -> io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    let domain = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: socket() has no preconditions.
    let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    set_option(&sock, libc::SO_REUSEPORT, 1)?;
    set_option(&sock, libc::SO_REUSEADDR, 1)?;
    // At most RECEIVE_BUFFER_MAX (the flag's parser): fits an int.
    let rcvbuf = rcvbuf.min(RECEIVE_BUFFER_MAX) as libc::c_int;
    if set_option(&sock, libc::SO_RCVBUFFORCE, rcvbuf).is_err() {
        set_option(&sock, libc::SO_RCVBUF, rcvbuf)?;
    }
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` holds a socket address of `len` bytes.
    if unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Fails if another socket holds `addr` (or the wildcard address on its
/// port): the workers' SO_REUSEPORT sockets would otherwise share the port
/// with it (another collector started by mistake, run by the same user),
/// and each would silently get part of the datagrams. A plain bind, without
/// SO_REUSEPORT or SO_REUSEADDR, conflicts with any of them.
pub(super) fn ensure_free(addr: SocketAddr) -> io::Result<()> {
    UdpSocket::bind(addr).map(drop)
}

/// Sets the SOL_SOCKET option `opt` of `socket` to `value`.
fn set_option(socket: &UdpSocket, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    crate::sockopt::set(socket.as_raw_fd(), libc::SOL_SOCKET, opt, &value)
}

/// Reads the SOL_SOCKET option `opt` of `socket` into `value`; returns the
/// bytes the kernel wrote.
fn get_option<T: crate::sockopt::Plain>(
    socket: &UdpSocket,
    opt: libc::c_int,
    value: &mut T,
) -> io::Result<usize> {
    crate::sockopt::get(socket.as_raw_fd(), libc::SOL_SOCKET, opt, value)
}

/// The receive buffer `socket` got, in the bytes asked for (the kernel
/// doubles the request for its bookkeeping and reports the doubled value).
pub(super) fn receive_buffer(socket: &UdpSocket) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    get_option(socket, libc::SO_RCVBUF, &mut value)?;
    Ok(value as usize / 2)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the family's fields.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            (ss, size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            (ss, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// The sender's address in `ss` (None for a family other than IPv4/IPv6).
fn sender(ss: &libc::sockaddr_storage) -> Option<IpAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(
                sin.sin_addr.s_addr.to_ne_bytes(),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// Datagrams the kernel has dropped at `socket` since it was opened
/// (its receive buffer was full: the worker fell behind), as the kernel
/// counts them for /proc/net/udp (32 bits, wrapping).
fn socket_drops(socket: &UdpSocket) -> io::Result<u32> {
    // SK_MEMINFO_VARS is 9 since Linux 4.x; room for more.
    let mut info = [0u32; 16];
    let len = get_option(socket, libc::SO_MEMINFO, &mut info)?;
    if len <= libc::SK_MEMINFO_DROPS as usize * 4 {
        return Err(io::Error::other("SO_MEMINFO has no drop count"));
    }
    Ok(info[libc::SK_MEMINFO_DROPS as usize])
}

/// `flowexport_collector_socket_drops_total{listen}`: what the kernel
/// dropped at the listening sockets, read from each socket when /metrics is
/// scraped, so it is current even while a worker is blocked (a full stdout
/// queue) and costs the workers nothing.
#[derive(Clone)]
pub struct SocketDrops(Arc<DropsInner>);

struct DropsInner {
    counters: IntCounterVec,
    /// Each socket (a duplicate of the worker's descriptor), its listen
    /// address's counter, and the kernel's count already added to it.
    sockets: Mutex<Vec<(UdpSocket, IntCounter, u32)>>,
}

impl SocketDrops {
    /// Registers the metric in `registry`.
    pub(super) fn new(registry: &Registry) -> SocketDrops {
        let counters = IntCounterVec::new(
            Opts::new(
                "flowexport_collector_socket_drops_total",
                "Datagrams the kernel dropped at a listening socket, its receive buffer full (a \
                 worker fell behind), by listen address: what /proc/net/udp counts as drops.",
            ),
            &["listen"],
        )
        .expect("a valid metric definition");
        let drops = SocketDrops(Arc::new(DropsInner {
            counters,
            sockets: Mutex::new(Vec::new()),
        }));
        registry
            .register(Box::new(drops.clone()))
            .expect("flowexport_collector_socket_drops_total registered once");
        drops
    }

    /// Counts `socket`'s drops under `listen`.
    pub(super) fn watch(&self, listen: SocketAddr, socket: &UdpSocket) -> io::Result<()> {
        let counter = self.0.counters.with_label_values(&[&listen.to_string()]);
        let mut sockets = self
            .0
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sockets.push((socket.try_clone()?, counter, 0));
        Ok(())
    }
}

impl Collector for SocketDrops {
    fn desc(&self) -> Vec<&Desc> {
        self.0.counters.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut sockets = self
            .0
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (socket, counter, counted) in sockets.iter_mut() {
            // SO_MEMINFO is Linux 4.6+; on error the count stays as it was.
            if let Ok(drops) = socket_drops(socket) {
                counter.inc_by(u64::from(drops.wrapping_sub(*counted)));
                *counted = drops;
            }
        }
        self.0.counters.collect()
    }
}

/// Datagrams taken per system call. An exporter sends a burst of export
/// packets at a time (a million-flow drain is ~35,000 of them); one
/// `recvmmsg` for up to 16 of them spares 15 system calls' fixed cost,
/// while the 16 buffers stay small enough per worker (below).
pub(super) const BATCH: usize = 16;

/// Room for any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6):
/// nothing is cut. The
/// buffers are allocated zeroed, so the kernel backs only the pages that
/// datagrams have touched: about 16 x 1.5 KiB per worker for typical
/// export packets, 1 MiB at most.
const MAX_DATAGRAM: usize = 65_536;

/// Up to [`BATCH`] datagrams and their senders, filled by [`Datagrams::recv`].
pub(super) struct Datagrams {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    lens: [usize; BATCH],
    received: usize,
}

impl Datagrams {
    pub(super) fn new() -> Datagrams {
        Datagrams {
            bufs: vec![0; BATCH * MAX_DATAGRAM],
            // SAFETY: an all-zero sockaddr_storage is valid (family 0).
            names: vec![unsafe { std::mem::zeroed() }; BATCH],
            lens: [0; BATCH],
            received: 0,
        }
    }

    /// Waits for a datagram (up to the socket's read timeout: then
    /// `WouldBlock`/`TimedOut`), then takes it and whatever else is queued,
    /// up to [`BATCH`]; returns how many.
    pub(super) fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received = 0;
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.bufs[i * MAX_DATAGRAM..].as_mut_ptr().cast(),
            iov_len: MAX_DATAGRAM,
        });
        // SAFETY: an all-zero mmsghdr is valid (no name, no iovecs).
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, h) in headers.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = &mut iovecs[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at its own name storage and one iovec
        // over its own MAX_DATAGRAM bytes of `bufs`, all alive and not
        // otherwise borrowed during the call. MSG_WAITFORONE: block (up to
        // SO_RCVTIMEO) for the first datagram only.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = n as usize;
        for (len, h) in self.lens.iter_mut().zip(&headers[..self.received]) {
            *len = h.msg_len as usize;
        }
        Ok(self.received)
    }

    /// The datagrams of the last [`Datagrams::recv`]: sender (None: not an
    /// IP sender, which a UDP socket never has) and payload.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Option<IpAddr>, &[u8])> {
        (0..self.received).map(|i| {
            let at = i * MAX_DATAGRAM;
            (sender(&self.names[i]), &self.bufs[at..at + self.lens[i]])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn takes_queued_datagrams_in_order_with_their_senders() {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let rx = match reuseport_socket(local.parse().unwrap(), RECEIVE_BUFFER) {
                Ok(rx) => rx,
                Err(_) if local.starts_with('[') => continue, // no IPv6 on this host
                Err(e) => panic!("{local}: {e}"),
            };
            rx.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let to = rx.local_addr().unwrap();
            let tx = UdpSocket::bind(SocketAddr::new(to.ip(), 0)).unwrap();
            // More than a batch, the last the largest UDP payload (a few
            // hundred KiB in all: under the default rmem_max).
            let mut sizes: Vec<usize> = (0..BATCH + 2).map(|i| [1, 1500, 4000][i % 3]).collect();
            sizes.push(65_507);
            for (i, &n) in sizes.iter().enumerate() {
                tx.send_to(&vec![i as u8; n], to).unwrap();
            }
            let mut d = Datagrams::new();
            let mut got = Vec::new();
            while got.len() < sizes.len() {
                assert!(d.recv(&rx).unwrap() >= 1);
                for (from, bytes) in d.iter() {
                    assert_eq!(from, Some(tx.local_addr().unwrap().ip()));
                    got.push((bytes.len(), bytes.iter().all(|&b| b == got.len() as u8)));
                }
            }
            let want: Vec<_> = sizes.iter().map(|&n| (n, true)).collect();
            assert_eq!(got, want, "{local}");
            // Nothing left: the read timeout, as an error.
            let e = d.recv(&rx).unwrap_err().kind();
            assert!(
                matches!(e, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
                "{e:?}"
            );
        }
    }

    #[test]
    fn receive_buffer_as_asked_or_as_rmem_max_allows() {
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        for asked in [RECEIVE_BUFFER, RECEIVE_BUFFER_MIN, 3 << 20] {
            let s = reuseport_socket("127.0.0.1:0".parse().unwrap(), asked).unwrap();
            // All of it with CAP_NET_ADMIN (SO_RCVBUFFORCE), else what
            // rmem_max allows.
            let got = receive_buffer(&s).unwrap();
            assert!(
                got == asked || got == asked.min(max),
                "asked {asked}: {got} bytes (rmem_max {max})"
            );
        }
    }

    #[test]
    fn receive_buffer_flag_is_bytes_in_range() {
        assert_eq!(parse_receive_buffer("33554432"), Ok(32 << 20));
        assert_eq!(parse_receive_buffer("65536"), Ok(RECEIVE_BUFFER_MIN));
        assert_eq!(parse_receive_buffer("1073741824"), Ok(RECEIVE_BUFFER_MAX));
        assert_eq!(
            parse_receive_buffer("65535").unwrap_err(),
            "65535 bytes is outside 65536..=1073741824 (64 KiB to 1 GiB)"
        );
        assert!(parse_receive_buffer("1073741825").is_err());
        assert_eq!(
            parse_receive_buffer("32M").unwrap_err(),
            "\"32M\" is not a number of bytes (e.g. 33554432 for 32 MiB)"
        );
    }

    #[test]
    fn drops_are_what_the_full_buffer_did_not_take() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_option(&rx, libc::SO_RCVBUF, 64 << 10).unwrap();
        assert_eq!(socket_drops(&rx).unwrap(), 0);
        // Far more than a 64 KiB receive buffer (the kernel makes it 128)
        // holds.
        let sent = 2_000;
        for _ in 0..sent {
            tx.send_to(&[0; 1400], rx.local_addr().unwrap()).unwrap();
        }
        let mut d = Datagrams::new();
        let mut received = 0;
        while let Ok(n) = d.recv(&rx) {
            received += n as u32;
        }
        let drops = socket_drops(&rx).unwrap();
        assert!(drops > 0, "the buffer took all {sent}");
        assert_eq!(received + drops, sent);
        // The metric, as a scrape reads it: the kernel's count, once.
        let registry = Registry::new();
        let metric = SocketDrops::new(&registry);
        let listen = rx.local_addr().unwrap();
        metric.watch(listen, &rx).unwrap();
        for _ in 0..2 {
            let families = registry.gather();
            let m = &families[0].get_metric()[0];
            assert_eq!(
                families[0].name(),
                "flowexport_collector_socket_drops_total"
            );
            assert_eq!(m.get_label()[0].value(), listen.to_string());
            assert_eq!(m.get_counter().get_value(), f64::from(drops));
        }
    }
}
