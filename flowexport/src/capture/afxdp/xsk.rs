//! One AF_XDP socket bound to one RX queue of one interface, receive only:
//! its UMEM (frames it lends the kernel through the fill ring), the fill,
//! completion and RX rings mapped from the kernel, and its statistics.
//! Written over the kernel's ABI (linux/if_xdp.h, through libc) rather than
//! a crate: receive-only needs four rings' worth of code, and it keeps the
//! dependency tree free of C libraries and MSRV bumps.
//!
//! The ring protocol: each ring is a power-of-two array with a producer
//! and a consumer index that only grow (wrapping). We produce into the
//! fill ring (frames the kernel may write into) and consume the RX ring
//! (frames it wrote: address and length). A frame consumed from RX goes
//! straight back to the fill ring once parsed, so all frames are always
//! either the kernel's or in the batch being parsed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::sockopt::Plain;

/// Bytes per UMEM frame: a page, the kernel's default chunk. A longer frame
/// (a jumbo frame) arrives in several, linked by `XDP_PKT_CONTD` (multi-buffer
/// AF_XDP, `XDP_USE_SG`: Linux 6.6+); on a kernel without it the kernel
/// drops such frames and counts them in `rx_dropped`.
pub(crate) const FRAME_SIZE: u32 = 4096;
/// Completion ring entries: the kernel requires one to bind, even for a
/// socket that never transmits.
const COMPLETION_ENTRIES: u32 = 64;

/// `--afxdp-zero-copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Zero-copy where the driver supports it, else copy mode (logged).
    Auto,
    /// Zero-copy or fail.
    On,
    /// Copy mode.
    Off,
}

from_keywords!(ZeroCopy, "zero-copy mode", { "auto" => Auto, "on" => On, "off" => Off });

/// The kernel's drop counters of one socket (`XDP_STATISTICS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskStats {
    /// Frames dropped: no free frame in the fill ring, or longer than a
    /// frame.
    pub rx_dropped: u64,
    /// RX descriptors the kernel found invalid.
    pub rx_invalid_descs: u64,
    /// Frames dropped because the RX ring was full (we read too slowly).
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty (each such frame is also
    /// in `rx_dropped`).
    pub rx_fill_ring_empty_descs: u64,
}

/// A mapped region, unmapped on drop.
struct Mmap {
    ptr: *mut u8,
    len: usize,
}

impl Mmap {
    fn new(len: usize, fd: Option<RawFd>, offset: u64) -> io::Result<Mmap> {
        let (flags, fd) = match fd {
            Some(fd) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
            ),
        };
        // SAFETY: a fresh mapping; the kernel checks fd, offset and length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One mapped ring of `T` entries.
struct Ring<T> {
    _map: Mmap,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    entries: *mut T,
    mask: u32,
}

impl<T> Ring<T> {
    /// Maps the ring of `size` entries at `pgoff`, laid out by `off`.
    fn map(fd: RawFd, off: &RingOffset, size: u32, pgoff: u64) -> io::Result<Ring<T>> {
        let len = off.desc as usize + size as usize * size_of::<T>();
        let map = Mmap::new(len, Some(fd), pgoff)?;
        // SAFETY: the offsets the kernel gave lie inside the mapping; the
        // indices are 4-byte aligned u32s the kernel updates atomically.
        unsafe {
            Ok(Ring {
                producer: map.ptr.add(off.producer as usize).cast(),
                consumer: map.ptr.add(off.consumer as usize).cast(),
                entries: map.ptr.add(off.desc as usize).cast(),
                mask: size - 1,
                _map: map,
            })
        }
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping (see `map`).
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping (see `map`).
        unsafe { &*self.consumer }
    }

    fn entry(&self, index: u32) -> *mut T {
        // SAFETY: masked into the ring's `size` entries.
        unsafe { self.entries.add((index & self.mask) as usize) }
    }
}

/// One bound AF_XDP socket with its UMEM and rings.
pub struct Xsk {
    fd: OwnedFd,
    umem: Mmap,
    fill: Ring<u64>,
    _completion: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    /// Whether the driver runs it in zero-copy mode.
    pub zero_copy: bool,
    /// Whether frames longer than `FRAME_SIZE` come in pieces (bound with
    /// `XDP_USE_SG`) rather than being dropped.
    pub multi_buffer: bool,
    /// The last frame taken off the RX ring had `XDP_PKT_CONTD`: the next
    /// one continues its packet.
    in_packet: bool,
}

// SAFETY: the raw pointers point into mappings the Xsk owns; it is used by
// one thread at a time (moved into its worker).
unsafe impl Send for Xsk {}

fn setsockopt<T>(fd: RawFd, opt: libc::c_int, value: &T) -> io::Result<()> {
    crate::sockopt::set(fd, libc::SOL_XDP, opt, value)
}

fn getsockopt<T: Plain + Default>(fd: RawFd, opt: libc::c_int) -> io::Result<T> {
    let mut value = T::default();
    crate::sockopt::get(fd, libc::SOL_XDP, opt, &mut value)?;
    Ok(value)
}

/// `XDP_STATISTICS` of a socket (any descriptor of it).
pub fn stats(fd: RawFd) -> io::Result<XskStats> {
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Raw {
        rx_dropped: u64,
        rx_invalid_descs: u64,
        tx_invalid_descs: u64,
        rx_ring_full: u64,
        rx_fill_ring_empty_descs: u64,
        tx_ring_empty_descs: u64,
    }
    // SAFETY: u64s only.
    unsafe impl Plain for Raw {}
    let s: Raw = getsockopt(fd, libc::XDP_STATISTICS)?;
    Ok(XskStats {
        rx_dropped: s.rx_dropped,
        rx_invalid_descs: s.rx_invalid_descs,
        rx_ring_full: s.rx_ring_full,
        rx_fill_ring_empty_descs: s.rx_fill_ring_empty_descs,
    })
}

/// The kernel's `struct xdp_ring_offset` and `xdp_mmap_offsets`
/// (libc's have no `Default` for getsockopt to fill).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RingOffset {
    producer: u64,
    consumer: u64,
    desc: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MmapOffsets {
    rx: RingOffset,
    tx: RingOffset,
    fr: RingOffset,
    cr: RingOffset,
}

// SAFETY: u64s only (`RingOffset`s).
unsafe impl Plain for MmapOffsets {}

impl Xsk {
    /// Opens a socket on queue `queue` of interface `ifindex` with `frames`
    /// UMEM frames (a power of two): the fill and RX rings get as many
    /// entries, and every frame starts in the fill ring.
    pub fn open(ifindex: u32, queue: u32, frames: u32, mode: ZeroCopy) -> io::Result<Xsk> {
        match mode {
            ZeroCopy::On => Xsk::open_with(ifindex, queue, frames, libc::XDP_ZEROCOPY),
            ZeroCopy::Off => Xsk::open_with(ifindex, queue, frames, libc::XDP_COPY),
            ZeroCopy::Auto => Xsk::open_with(ifindex, queue, frames, libc::XDP_ZEROCOPY)
                .or_else(|_| Xsk::open_with(ifindex, queue, frames, libc::XDP_COPY)),
        }
    }

    fn open_with(ifindex: u32, queue: u32, frames: u32, bind_flags: u16) -> io::Result<Xsk> {
        // SAFETY: a plain socket call.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let umem = Mmap::new(frames as usize * FRAME_SIZE as usize, None, 0)?;
        let reg = libc::xdp_umem_reg {
            addr: umem.ptr as u64,
            len: umem.len as u64,
            chunk_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(raw, libc::XDP_UMEM_REG, &reg)?;
        setsockopt(raw, libc::XDP_UMEM_FILL_RING, &frames)?;
        setsockopt(raw, libc::XDP_UMEM_COMPLETION_RING, &COMPLETION_ENTRIES)?;
        setsockopt(raw, libc::XDP_RX_RING, &frames)?;
        let off: MmapOffsets = getsockopt(raw, libc::XDP_MMAP_OFFSETS)?;
        let fill: Ring<u64> = Ring::map(raw, &off.fr, frames, libc::XDP_UMEM_PGOFF_FILL_RING)?;
        let completion: Ring<u64> = Ring::map(
            raw,
            &off.cr,
            COMPLETION_ENTRIES,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
        )?;
        let rx: Ring<libc::xdp_desc> =
            Ring::map(raw, &off.rx, frames, libc::XDP_PGOFF_RX_RING as u64)?;
        // Every frame to the kernel before the socket goes live.
        let start = fill.producer().load(Ordering::Relaxed);
        for i in 0..frames {
            // SAFETY: an entry of the fill ring, which we alone produce into.
            unsafe { *fill.entry(start.wrapping_add(i)) = u64::from(i) * u64::from(FRAME_SIZE) };
        }
        fill.producer()
            .store(start.wrapping_add(frames), Ordering::Release);
        let bind = |flags: u16| {
            let sxdp = libc::sockaddr_xdp {
                sxdp_family: libc::AF_XDP as u16,
                sxdp_flags: flags,
                sxdp_ifindex: ifindex,
                sxdp_queue_id: queue,
                sxdp_shared_umem_fd: 0,
            };
            // SAFETY: sxdp is a valid sockaddr_xdp of the size passed.
            let r = unsafe {
                libc::bind(
                    raw,
                    std::ptr::from_ref(&sxdp).cast(),
                    size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // Multi-buffer where the kernel (6.6+) and, for zero-copy, the
        // driver have it; a refused bind changes nothing, so bind again
        // without it.
        let multi_buffer = bind(bind_flags | libc::XDP_USE_SG).is_ok();
        if !multi_buffer {
            bind(bind_flags)?;
        }
        Ok(Xsk {
            fd,
            umem,
            fill,
            _completion: completion,
            rx,
            zero_copy: bind_flags & libc::XDP_ZEROCOPY != 0,
            multi_buffer,
            in_packet: false,
        })
    }

    /// Waits up to `timeout_ms` until the RX ring holds frames: first by
    /// watching the ring for up to `spin` (no system call, and no wake-up
    /// for the kernel to send), then in poll(2). Returns whether frames came
    /// without poll.
    pub fn wait(&self, spin: std::time::Duration, timeout_ms: i32) -> io::Result<bool> {
        let cons = self.rx.consumer().load(Ordering::Relaxed);
        let ready = || self.rx.producer().load(Ordering::Acquire) != cons;
        if ready() {
            return Ok(true);
        }
        if !spin.is_zero() {
            let until = std::time::Instant::now() + spin;
            while std::time::Instant::now() < until {
                for _ in 0..16 {
                    if ready() {
                        return Ok(true);
                    }
                    std::hint::spin_loop();
                }
            }
        }
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, timeout_ms) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(false)
    }

    /// Hands every packet the RX ring holds now to `f` (of a multi-buffer
    /// packet, its first frame: the headers, and the IP lengths the counts
    /// are taken from) and gives the frames back to the kernel. Returns how
    /// many frames there were.
    pub fn receive(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let cons = self.rx.consumer().load(Ordering::Relaxed);
        let prod = self.rx.producer().load(Ordering::Acquire);
        let n = prod.wrapping_sub(cons);
        if n == 0 {
            return 0;
        }
        let fill_prod = self.fill.producer().load(Ordering::Relaxed);
        for i in 0..n {
            // SAFETY: entries between consumer and producer are ours to read
            // (the Acquire load above orders them after the kernel's writes).
            let desc = unsafe { std::ptr::read(self.rx.entry(cons.wrapping_add(i))) };
            let len = desc.len as usize;
            let off = desc.addr as usize;
            // A later frame of a packet (it may continue in a later call).
            let first = !self.in_packet;
            self.in_packet = desc.options & libc::XDP_PKT_CONTD != 0;
            if first && off + len <= self.umem.len {
                // SAFETY: inside the UMEM; the kernel wrote this frame and
                // does not touch it until we return it below.
                let frame = unsafe { std::slice::from_raw_parts(self.umem.ptr.add(off), len) };
                f(frame);
            }
            // The frame's start (a copy-mode frame may begin past it).
            let base = desc.addr - desc.addr % u64::from(FRAME_SIZE);
            // SAFETY: the fill ring has room for every frame we hold.
            unsafe { *self.fill.entry(fill_prod.wrapping_add(i)) = base };
        }
        self.rx
            .consumer()
            .store(cons.wrapping_add(n), Ordering::Release);
        self.fill
            .producer()
            .store(fill_prod.wrapping_add(n), Ordering::Release);
        n as usize
    }

    /// A second descriptor of the socket, for reading its statistics from
    /// another thread.
    pub(crate) fn stats_handle(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
