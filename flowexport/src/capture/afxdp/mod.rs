//! The AF_XDP capture source (`--capture afxdp`), for a dedicated mirror
//! port (SPAN, TAP, remote mirror sessions): the kernel program
//! `flowexport_xsk` hands every frame of the interface to the AF_XDP
//! socket of its RX queue, one socket and one worker thread per queue
//! ([`xsk`]); each worker parses its frames with the kernel programs' own
//! parser ([`flowexport_common::parse`]) and counts them into the flow
//! table every capture path shares ([`FlowAggregator`]), which the agent
//! drains on the same idle and active timeouts into the same records.
//! With `--decap inner` (the default), a frame carrying a tunnel (VXLAN,
//! GENEVE, GRE, ERSPAN, IP-in-IP, see [`mod@decap`]) counts as its inner flow,
//! keyed and recorded with the tunnel.
//!
//! Nothing is dropped silently: frames no socket took (`XSK_MISSED`) and
//! the kernel's per-socket drops (`XDP_STATISTICS`) are metrics.

pub mod decap;
pub mod xsk;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, XskMap};
use flowexport_common::parse::{parse, Frame, Parsed};
use flowexport_common::{
    FlowKey, DIR_INGRESS, MAP_XSKS, MAP_XSK_MISSED, MAP_XSK_SLOTS, XSK_MAX_IFACES, XSK_MAX_QUEUES,
};
pub use xsk::ZeroCopy;
use xsk::{Xsk, XskStats};

use decap::{decap, Tunnel};

use super::aggregator::{AggregateKey, FlowAggregator, FlowMap, Timeouts};
use super::flow::FlowCounters;
use super::loader::{ifindex, CaptureError, Programs};

/// Default UMEM frames per queue: 4096 frames of 4 KiB, 16 MiB per queue.
pub const DEFAULT_FRAMES: u32 = 4096;

/// `--afxdp-queues`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Queues {
    /// Every RX queue of the interface.
    All,
    /// These queues.
    List(Vec<u32>),
}

impl std::str::FromStr for Queues {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Queues::All);
        }
        let list = s
            .split(',')
            .map(|q| q.trim().parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("{s:?}: use all or queue numbers like 0,1,2"))?;
        if let Some(q) = list.iter().find(|q| **q >= XSK_MAX_QUEUES) {
            return Err(format!(
                "queue {q}: at most {XSK_MAX_QUEUES} queues per interface"
            ));
        }
        Ok(Queues::List(list))
    }
}

/// `--decap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decap {
    /// Count the outer packets, as the kernel paths do.
    None,
    /// Count a tunnel's inner flow, with the tunnel (one level).
    Inner,
}

from_keywords!(Decap, "--decap", { "none" => None, "inner" => Inner });

/// The AF_XDP settings of the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub queues: Queues,
    pub zero_copy: ZeroCopy,
    /// UMEM frames per queue (a power of two).
    pub frames: u32,
    pub decap: Decap,
}

/// A flow of the AF_XDP capture: the kernel's key, and the tunnel it came
/// in (decapsulated flows only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct XskKey {
    pub flow: FlowKey,
    pub tunnel: Option<Tunnel>,
}

impl AggregateKey for XskKey {
    fn flow(&self) -> &FlowKey {
        &self.flow
    }

    fn normalized(mut self) -> Self {
        self.flow = self.flow.normalized();
        self
    }
}

/// The AF_XDP capture's flow table. Flows that came in no tunnel (nearly
/// all, and all with `--decap none`) are keyed by the 48-byte [`FlowKey`]
/// alone: with its counters, an entry of 88 bytes instead of the 128 of an
/// [`XskKey`] entry (which decapsulated flows keep, with their tunnel). At
/// a million flows that is ~190 MB of table instead of ~270 MB.
#[derive(Default)]
pub struct XskFlows {
    plain: FlowAggregator<FlowKey>,
    tunneled: FlowAggregator<XskKey>,
}

impl XskFlows {
    /// Adds counters to a flow.
    pub fn add(&mut self, key: XskKey, c: &FlowCounters) {
        match key.tunnel {
            None => self.plain.add(key.flow, c),
            Some(_) => self.tunneled.add(key, c),
        }
    }

    pub fn len(&self) -> usize {
        self.plain.len() + self.tunneled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.tunneled.is_empty()
    }

    /// Takes every flow out ([`FlowAggregator::take_all`]).
    pub fn take_all(&mut self) -> impl Iterator<Item = (XskKey, FlowCounters)> {
        let plain = self.plain.take_all();
        let tunneled = self.tunneled.take_all();
        plain
            .map(|(flow, c)| (XskKey { flow, tunnel: None }, c))
            .chain(tunneled)
    }

    /// Exports every flow that is due ([`FlowAggregator::expire`]).
    pub fn expire(
        &mut self,
        now_ns: u64,
        t: Timeouts,
        force: bool,
        out: &mut dyn FnMut(&XskKey, &FlowCounters),
    ) -> usize {
        let plain = self.plain.expire(now_ns, t, force, &mut |flow, c| {
            out(
                &XskKey {
                    flow: *flow,
                    tunnel: None,
                },
                c,
            );
        });
        plain + self.tunneled.expire(now_ns, t, force, out)
    }
}

/// What the workers counted, for the metrics (cumulative).
#[derive(Default)]
pub struct Counted {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub non_ip: AtomicU64,
    pub malformed: AtomicU64,
}

/// One socket as the metrics see it.
pub struct Socket {
    pub iface: String,
    pub queue: u32,
    pub zero_copy: bool,
    stats: OwnedFd,
}

impl Socket {
    /// The kernel's drop counters of this socket.
    pub fn stats(&self) -> std::io::Result<XskStats> {
        xsk::stats(self.stats.as_raw_fd())
    }
}

/// The running capture: sockets, workers, and the flows they counted.
pub struct AfXdp {
    pub sockets: Vec<Socket>,
    pub counted: Arc<Counted>,
    /// The flow table the workers count into and the agent drains.
    pub flows: Arc<Mutex<XskFlows>>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

/// The RX queues of `iface` (`/sys/class/net/IF/queues/rx-N`).
fn rx_queues(iface: &str) -> std::io::Result<Vec<u32>> {
    let mut qs: Vec<u32> = std::fs::read_dir(format!("/sys/class/net/{iface}/queues"))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("rx-")?
                .parse()
                .ok()
        })
        .collect();
    qs.sort_unstable();
    Ok(qs)
}

/// The IRQ of `iface`'s RX queue `queue`, from /proc/interrupts' names
/// (`eth0-TxRx-3`, `eth0-rx-3`, `eth0-3`, ...; drivers name them so), if
/// one is there.
fn queue_irq(interrupts: &str, iface: &str, queue: u32) -> Option<u32> {
    let q = queue.to_string();
    interrupts.lines().find_map(|line| {
        let (irq, rest) = line.trim_start().split_once(':')?;
        let irq: u32 = irq.parse().ok()?;
        let name = rest.split_whitespace().last()?;
        let tail = name.strip_prefix(iface)?.strip_prefix(['-', '_'])?;
        let parts: Vec<&str> = tail.split(['-', '_']).collect();
        let kind_ok = match parts.as_slice() {
            [n] => *n == q,
            [kind, n] => {
                *n == q
                    && ["txrx", "rxtx", "rx", "combined"]
                        .contains(&kind.to_ascii_lowercase().as_str())
            }
            _ => false,
        };
        kind_ok.then_some(irq)
    })
}

/// The CPUs of a list like `0-3,8` (`smp_affinity_list`).
fn cpu_list(text: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.parse::<usize>().ok()),
        }
    }
    cpus
}

/// Pins the calling thread to the CPUs serving `iface`'s queue `queue`
/// interrupts, where they are known; returns them.
fn pin_to_queue_irq(iface: &str, queue: u32) -> Option<Vec<usize>> {
    let interrupts = std::fs::read_to_string("/proc/interrupts").ok()?;
    let irq = queue_irq(&interrupts, iface, queue)?;
    let list = std::fs::read_to_string(format!("/proc/irq/{irq}/smp_affinity_list")).ok()?;
    let cpus = cpu_list(&list);
    if cpus.is_empty() {
        return None;
    }
    // SAFETY: a zeroed cpu_set_t filled with CPU_SET, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in &cpus {
            libc::CPU_SET(*c, &mut set);
        }
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return None;
        }
    }
    Some(cpus)
}

/// Errors of the AF_XDP capture.
#[derive(Debug, thiserror::Error)]
pub enum AfXdpError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("--capture afxdp serves at most {XSK_MAX_IFACES} interfaces")]
    TooManyInterfaces,
    #[error("cannot list the RX queues of {iface}: {source}")]
    Queues {
        iface: String,
        source: std::io::Error,
    },
    #[error("{iface} has no RX queue {queue} (it has {have:?})")]
    NoSuchQueue {
        iface: String,
        queue: u32,
        have: Vec<u32>,
    },
    #[error("{iface} has {n} RX queues; --capture afxdp serves at most {XSK_MAX_QUEUES}: pick some with --afxdp-queues")]
    TooManyQueues { iface: String, n: usize },
    #[error("cannot open an AF_XDP socket on {iface} queue {queue}: {source}{hint}")]
    Socket {
        iface: String,
        queue: u32,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("the kernel object has no usable {0} map")]
    Map(&'static str),
    #[error("cannot update the {name} map: {source}")]
    MapUpdate {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot start a capture thread: {0}")]
    Thread(std::io::Error),
}

fn socket_hint(e: &std::io::Error, mode: ZeroCopy) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => " (AF_XDP sockets need CAP_NET_RAW)",
        Some(libc::EOPNOTSUPP) if mode == ZeroCopy::On => {
            " (the driver has no zero-copy AF_XDP: use --afxdp-zero-copy auto or off)"
        }
        Some(libc::EBUSY) => " (another AF_XDP socket holds this queue)",
        _ => "",
    }
}

impl AfXdp {
    /// Opens a socket on each asked queue of each interface, registers them
    /// with the kernel program, attaches it (XDP in `mode`) and starts the
    /// workers. On error, what was attached is detached when `programs`
    /// drops.
    pub fn start(
        programs: &mut Programs,
        ifaces: &[String],
        settings: &Settings,
        mode: super::loader::XdpModeChoice,
    ) -> Result<AfXdp, AfXdpError> {
        if ifaces.len() > XSK_MAX_IFACES as usize {
            return Err(AfXdpError::TooManyInterfaces);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counted = Arc::new(Counted::default());
        let flows = Arc::new(Mutex::new(XskFlows::default()));
        let mut sockets = Vec::new();
        let mut workers = Vec::new();
        let mut opened: Vec<(String, u32, u32, Xsk)> = Vec::new();
        for (i, iface) in ifaces.iter().enumerate() {
            let index = ifindex(iface)?;
            let have = rx_queues(iface).map_err(|source| AfXdpError::Queues {
                iface: iface.clone(),
                source,
            })?;
            let queues = match &settings.queues {
                Queues::All => {
                    if have.len() > XSK_MAX_QUEUES as usize {
                        return Err(AfXdpError::TooManyQueues {
                            iface: iface.clone(),
                            n: have.len(),
                        });
                    }
                    have.clone()
                }
                Queues::List(l) => l.clone(),
            };
            for q in queues {
                if !have.contains(&q) {
                    return Err(AfXdpError::NoSuchQueue {
                        iface: iface.clone(),
                        queue: q,
                        have: have.clone(),
                    });
                }
                let xsk =
                    Xsk::open(index, q, settings.frames, settings.zero_copy).map_err(|source| {
                        AfXdpError::Socket {
                            iface: iface.clone(),
                            queue: q,
                            hint: socket_hint(&source, settings.zero_copy),
                            source,
                        }
                    })?;
                let slot = i as u32 * XSK_MAX_QUEUES + q;
                opened.push((iface.clone(), index, slot, xsk));
            }
            // The interface's first slot, before its program runs.
            let map = programs
                .ebpf
                .map_mut(MAP_XSK_SLOTS)
                .ok_or(AfXdpError::Map(MAP_XSK_SLOTS))?;
            let mut slots: BpfHashMap<&mut MapData, u32, u32> =
                BpfHashMap::try_from(map).map_err(|_| AfXdpError::Map(MAP_XSK_SLOTS))?;
            slots
                .insert(index, i as u32 * XSK_MAX_QUEUES, 0)
                .map_err(|source| AfXdpError::MapUpdate {
                    name: MAP_XSK_SLOTS,
                    source,
                })?;
        }
        {
            let map = programs
                .ebpf
                .map_mut(MAP_XSKS)
                .ok_or(AfXdpError::Map(MAP_XSKS))?;
            let mut xsks: XskMap<&mut MapData> =
                XskMap::try_from(map).map_err(|_| AfXdpError::Map(MAP_XSKS))?;
            for (_, _, slot, xsk) in &opened {
                xsks.set(*slot, xsk.fd(), 0)
                    .map_err(|source| AfXdpError::MapUpdate {
                        name: MAP_XSKS,
                        source,
                    })?;
            }
        }
        for (iface, index, slot, xsk) in opened {
            let queue = slot % XSK_MAX_QUEUES;
            let stats = xsk.stats_handle().map_err(|source| AfXdpError::Socket {
                iface: iface.clone(),
                queue,
                source,
                hint: "",
            })?;
            log::info!(
                "AF_XDP socket on {iface} queue {queue}: {} mode, {} frames of {} bytes, {}",
                if xsk.zero_copy { "zero-copy" } else { "copy" },
                settings.frames,
                xsk::FRAME_SIZE,
                if xsk.multi_buffer {
                    "longer frames in several"
                } else {
                    "longer frames dropped (counted in rx_dropped; multi-buffer AF_XDP needs \
                     Linux 6.6+)"
                }
            );
            sockets.push(Socket {
                iface: iface.clone(),
                queue,
                zero_copy: xsk.zero_copy,
                stats,
            });
            let worker = Worker {
                xsk,
                iface: iface.clone(),
                queue,
                decap: settings.decap,
                ifindex: index,
                flows: flows.clone(),
                counted: counted.clone(),
                stop: stop.clone(),
            };
            workers.push(
                std::thread::Builder::new()
                    .name(format!("afxdp-{iface}-{queue}"))
                    .spawn(move || worker.run())
                    .map_err(AfXdpError::Thread)?,
            );
        }
        for iface in ifaces {
            let how = programs.attach(iface, mode)?;
            log::info!("attached to {iface}: {how}");
        }
        Ok(AfXdp {
            sockets,
            counted,
            flows,
            stop,
            workers,
        })
    }

    /// Frames the kernel program found no socket for (all interfaces).
    pub(crate) fn missed(programs: &Programs) -> u64 {
        let Some(map) = programs.ebpf.map(MAP_XSK_MISSED) else {
            return 0;
        };
        let Ok(missed) = PerCpuArray::<&MapData, u64>::try_from(map) else {
            return 0;
        };
        missed.get(&0, 0).map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Stops the workers once they have read what their rings hold (call
    /// after detaching the program, so that nothing more arrives).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for AfXdp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// When a worker watches its ring before it sleeps in poll(2), and for how
/// long. A worker that sleeps is woken by the kernel for its next frames,
/// from the CPU that received them, and makes a system call per batch.
/// Watching the ring for a few microseconds after a batch catches the next
/// frames at high rates without either (`cargo xtask bench peers`, a veth:
/// the receiving CPU 0.2-0.7 us less per frame, +20-30% frames delivered
/// at full rate; at 50k frames/s up to a quarter more CPU in all). It backs
/// off when watching does not pay: after a watch that saw nothing, the next
/// [`SPIN_BACKOFF`] waits sleep at once; an idle worker (an empty batch)
/// sleeps at once.
#[derive(Default)]
struct Spin {
    /// The last batch had frames.
    busy: bool,
    /// Waits left that sleep at once.
    backoff: u32,
}

/// How long a worker watches its ring: about what a system call and a
/// wake-up cost, so a watch that sees nothing at most doubles that cost.
const SPIN: std::time::Duration = std::time::Duration::from_micros(4);
/// Waits that sleep at once after a watch that saw nothing: where watching
/// never pays (frames evenly more than 4 us apart), one wait in three
/// watches.
const SPIN_BACKOFF: u32 = 2;

impl Spin {
    /// How long the next wait watches the ring.
    fn next(&self) -> std::time::Duration {
        if self.busy && self.backoff == 0 {
            SPIN
        } else {
            std::time::Duration::ZERO
        }
    }

    /// After a wait: whether frames came without poll(2).
    fn waited(&mut self, without_poll: bool) {
        if !self.next().is_zero() && !without_poll {
            self.backoff = SPIN_BACKOFF;
        } else {
            self.backoff = self.backoff.saturating_sub(1);
        }
    }

    /// After a batch of `n` frames.
    fn batch(&mut self, n: usize) {
        self.busy = n > 0;
    }
}

/// One queue's reader.
struct Worker {
    xsk: Xsk,
    iface: String,
    queue: u32,
    decap: Decap,
    ifindex: u32,
    flows: Arc<Mutex<XskFlows>>,
    counted: Arc<Counted>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn run(mut self) {
        // Beside the queue's interrupt, where the frames are warm.
        match pin_to_queue_irq(&self.iface, self.queue) {
            Some(cpus) => log::info!(
                "AF_XDP worker of {} queue {} on CPUs {cpus:?} (its IRQ's)",
                self.iface,
                self.queue
            ),
            None => log::debug!(
                "AF_XDP worker of {} queue {}: the queue's IRQ is not known; not pinned",
                self.iface,
                self.queue
            ),
        }
        let mut local: FlowMap<XskKey, FlowCounters> = FlowMap::default();
        let mut scratch = Vec::new();
        let mut spin = Spin::default();
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            // When stopping, read what is left without waiting.
            if !stopping {
                match self.xsk.wait(spin.next(), 100) {
                    Ok(without_poll) => spin.waited(without_poll),
                    Err(e) => {
                        log::error!("AF_XDP poll on {} queue {}: {e}", self.iface, self.queue);
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
            // First/last-seen times: when the batch was taken off the ring.
            let now = crate::timeconv::monotonic_ns();
            let (mut packets, mut bytes, mut non_ip, mut malformed) = (0u64, 0u64, 0u64, 0u64);
            let (ifindex, decap_inner) = (self.ifindex, self.decap == Decap::Inner);
            let n = self.xsk.receive(|frame| {
                let mut key = FlowKey {
                    ifindex,
                    direction: DIR_INGRESS,
                    ..FlowKey::default()
                };
                let (tunnel, frame) = match decap_inner.then(|| decap(frame, &mut scratch)) {
                    Some(Some((t, inner))) => (Some(t), inner),
                    _ => (None, frame),
                };
                let (mut ip_len, mut tcp_flags) = (0u64, 0u8);
                match parse(&Frame(frame), &mut key, &mut ip_len, &mut tcp_flags, false) {
                    Parsed::Flow { .. } => {
                        packets += 1;
                        bytes += ip_len;
                        let key = XskKey { flow: key, tunnel };
                        local.entry(key).or_default().merge(&FlowCounters {
                            packets: 1,
                            bytes: ip_len,
                            first_seen_ns: now,
                            last_seen_ns: now,
                            tcp_flags,
                        });
                    }
                    Parsed::NonIp => non_ip += 1,
                    Parsed::Malformed => malformed += 1,
                }
            });
            spin.batch(n);
            if !local.is_empty() {
                let mut flows = self.flows.lock().expect("flow table lock");
                for (k, c) in local.drain() {
                    flows.add(k, &c);
                }
            }
            let c = &self.counted;
            c.packets.fetch_add(packets, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
            c.non_ip.fetch_add(non_ip, Ordering::Relaxed);
            c.malformed.fetch_add(malformed, Ordering::Relaxed);
            if stopping && n == 0 {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_watches_its_ring_only_while_busy_and_backs_off() {
        let mut s = Spin::default();
        // Idle: sleeps at once.
        assert!(s.next().is_zero());
        s.batch(0);
        assert!(s.next().is_zero());
        // Busy: watches, and keeps watching while frames come without poll.
        s.batch(12);
        assert_eq!(s.next(), SPIN);
        s.waited(true);
        assert_eq!(s.next(), SPIN);
        // A watch that saw nothing: the next SPIN_BACKOFF waits sleep at once.
        s.waited(false);
        for _ in 0..SPIN_BACKOFF {
            assert!(s.next().is_zero());
            s.waited(false);
        }
        assert_eq!(s.next(), SPIN);
        // An empty batch stops it.
        s.batch(0);
        assert!(s.next().is_zero());
    }

    #[test]
    fn flows_with_and_without_a_tunnel_keep_apart_and_all_come_out() {
        let key = |port: u16| FlowKey {
            ifindex: 7,
            src_port: port,
            proto: 17,
            ..FlowKey::default()
        };
        let tunnel = Tunnel {
            kind: crate::record::TunnelType::Vxlan,
            id: 42,
            outer_src: "192.0.2.1".parse().unwrap(),
            outer_dst: "192.0.2.2".parse().unwrap(),
        };
        let at = |t: u64, packets: u64| FlowCounters {
            packets,
            bytes: 100 * packets,
            first_seen_ns: t,
            last_seen_ns: t,
            tcp_flags: 0,
        };
        let xk = |port: u16, tunnel: Option<Tunnel>| XskKey {
            flow: key(port),
            tunnel,
        };
        let mut f = XskFlows::default();
        // The same 5-tuple inside a tunnel is another flow.
        for (k, c) in [
            (xk(1, None), at(10, 1)),
            (xk(1, None), at(20, 2)),
            (xk(1, Some(tunnel)), at(20, 5)),
            (xk(2, None), at(5_000, 1)),
        ] {
            f.add(k, &c);
        }
        assert_eq!(f.len(), 3);
        let t = Timeouts {
            idle_ns: 1_000,
            active_ns: 60_000,
        };
        // At 1,500 ns the two flows last seen at 20 are idle.
        let mut due = Vec::new();
        assert_eq!(f.expire(1_500, t, false, &mut |k, c| due.push((*k, *c))), 2);
        due.sort_by_key(|(k, _)| k.tunnel.is_some());
        assert_eq!(due[0].0, xk(1, None));
        assert_eq!((due[0].1.packets, due[0].1.first_seen_ns), (3, 10));
        assert_eq!(due[1].0, xk(1, Some(tunnel)));
        assert_eq!(due[1].1.packets, 5);
        assert_eq!(f.len(), 1);
        let all: Vec<_> = f.take_all().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, xk(2, None));
        assert!(f.is_empty());
    }

    #[test]
    fn queue_irqs_from_proc_interrupts() {
        let text = "           CPU0       CPU1
  24:          0          0   PCI-MSIX-0000:00:03.0   0-edge      eth0-TxRx-0
  25:        310          9   PCI-MSIX-0000:00:03.0   1-edge      eth0-TxRx-1
  26:          1          0   PCI-MSIX-0000:00:03.0   2-edge      eth10-rx-1
  27:          1          0   PCI-MSIX-0000:00:03.0   3-edge      eth1-1
  28:          1          0   PCI-MSIX-0000:00:03.0   4-edge      eth1-tx-2
 NMI:          0          0   Non-maskable interrupts
";
        assert_eq!(queue_irq(text, "eth0", 1), Some(25));
        assert_eq!(queue_irq(text, "eth0", 0), Some(24));
        assert_eq!(queue_irq(text, "eth10", 1), Some(26));
        assert_eq!(queue_irq(text, "eth1", 1), Some(27));
        assert_eq!(queue_irq(text, "eth1", 2), None, "a TX queue's");
        assert_eq!(queue_irq(text, "veth0", 0), None);
        assert_eq!(cpu_list("0-2,5\n"), vec![0, 1, 2, 5]);
        assert_eq!(cpu_list("3"), vec![3]);
    }

    #[test]
    fn queue_lists() {
        assert_eq!("all".parse::<Queues>(), Ok(Queues::All));
        assert_eq!("0,2".parse::<Queues>(), Ok(Queues::List(vec![0, 2])));
        assert!("x".parse::<Queues>().is_err());
        assert!("64".parse::<Queues>().is_err());
    }
}
