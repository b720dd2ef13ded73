//! The clock word the kernel programs read instead of calling
//! `bpf_ktime_get_ns()` on every packet, kept only while it pays.
//!
//! The helper call costs the receiving CPU more than the rest of the hot
//! path together (~75 ns on a veth at full rate, see [`HELPER_NS`]), so at high
//! packet rates the agent keeps CLOCK_MONOTONIC (in ns and in ms) in the one
//! value of an array map created with BPF_F_MMAPABLE and advances it every
//! `--clock-resolution` (default 1 ms) through a shared mapping, with
//! aligned 8-byte stores: the programs read it with one inlined array
//! look-up and never see a torn value. First- and last-seen times then have
//! that resolution, which NetFlow and IPFIX millisecond timestamps do not go
//! below. While the word is 0 the programs call the helper (exact times).
//!
//! Ticking is not free either: each tick is a timer wake-up of the clock
//! thread (measured here, in a VM: ~45 us of CPU each). So the word is kept
//! only while it saves more than it costs:
//!
//! * **Rate**: the drain reports the packet rate ([`ClockMap::set_rate`]);
//!   the thread measures its own CPU time per tick and ticks only while
//!   `rate x HELPER_NS` exceeds its ticks' cost (with hysteresis). At
//!   50k packets/s the helper costs ~4 ms of CPU a second, a 1 kHz ticker
//!   tens of ms (20-45 us a tick in a VM): a break-even of some 300k
//!   packets/s there.
//! * **Activity**: the programs set the `active` word whenever it is not
//!   already set; every [`REST_WINDOW`] the ticker clears its bit and, if no
//!   packet set it again during the next window, rests at once (without
//!   waiting for the next drain's rate).
//!
//! A resting thread sleeps until something can make ticks pay again: while
//! the last rate the drain reported is high enough, it looks for packets
//! every [`REST_POLL`]; below that (an idle host, or a low rate), it waits
//! for the drain to report a rate that is ([`ClockMap::set_rate`] wakes it),
//! and costs no wake-up at all.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowexport_common::{ClockWord, CLOCK_ACTIVE_TICKER};

use super::bpf_sys::SharedMap;
use crate::timeconv::monotonic_ns;

/// After a window this long without a packet, the ticker rests.
pub(crate) const REST_WINDOW: Duration = Duration::from_millis(100);
/// How often a resting ticker looks for traffic while the packet rate is
/// high enough for ticks to pay.
pub(crate) const REST_POLL: Duration = Duration::from_millis(100);
/// What the receiving CPU pays per packet for `bpf_ktime_get_ns()` instead
/// of the clock word: ~75 ns of softirq, measured on the receive path
/// (`cargo xtask bench peers` at full rate, 1 and 1M flows, the agent
/// with the word against without it, alternating, nine runs and six:
/// 0.74-0.88 against 0.78-0.97 CPU-s of softirq per Mpkt, ~0.08 apart on
/// average; BENCHMARKS.md). A loop of BPF_PROG_TEST_RUN calls (`cargo
/// xtask bench xdp`'s parse+clock breakdown) shows only ~27 ns: there the
/// helper's code and data stay in the CPU's caches.
pub(crate) const HELPER_NS: f64 = 75.0;
/// The cost of one tick assumed until the thread has measured its own.
const DEFAULT_TICK_NS: f64 = 20_000.0;

/// The `CLOCK` map's value, through its shared mapping, and the packet rate
/// the drain last saw.
pub struct ClockMap {
    word: *mut ClockWord,
    /// Packets per second (ingress + egress) at the last drain.
    rate: AtomicU64,
    /// The lowest rate at which a resting ticker starts again, published by
    /// the ticker thread (`u64::MAX` until it runs): [`ClockMap::set_rate`]
    /// wakes the thread only for a rate above it.
    start_rate: AtomicU64,
    /// The ticker thread, once started: what `set_rate` and `wake` wake.
    ticker: Mutex<Option<std::thread::Thread>>,
    _memory: Memory,
}

/// What lives behind the word; held only to keep it alive.
#[allow(dead_code)]
enum Memory {
    Map(SharedMap),
    #[cfg(test)]
    Heap(Box<ClockWord>),
}

// SAFETY: the word is shared memory, accessed only through atomics.
unsafe impl Send for ClockMap {}
// SAFETY: as above.
unsafe impl Sync for ClockMap {}

impl ClockMap {
    /// Wraps the mapping of the `CLOCK` map (at least one `ClockWord`).
    pub fn new(map: SharedMap) -> ClockMap {
        assert!(map.len() >= size_of::<ClockWord>());
        ClockMap {
            word: map.as_ptr() as *mut ClockWord,
            rate: AtomicU64::new(0),
            start_rate: AtomicU64::new(u64::MAX),
            ticker: Mutex::new(None),
            _memory: Memory::Map(map),
        }
    }

    /// A word of our own, for tests.
    #[cfg(test)]
    fn heap() -> ClockMap {
        let mut b = Box::new(ClockWord::default());
        ClockMap {
            word: &mut *b,
            rate: AtomicU64::new(0),
            start_rate: AtomicU64::new(u64::MAX),
            ticker: Mutex::new(None),
            _memory: Memory::Heap(b),
        }
    }

    fn word(&self) -> *mut ClockWord {
        self.word
    }

    fn ns(&self) -> &AtomicU64 {
        // SAFETY: the mapping holds a ClockWord (checked in new), 8-aligned
        // (page-aligned mapping); lives as long as self.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.word()).ns) }
    }

    fn ms(&self) -> &AtomicU64 {
        // SAFETY: as in ns().
        unsafe { AtomicU64::from_ptr(&raw mut (*self.word()).ms) }
    }

    /// The activity flags the programs set (`CLOCK_ACTIVE_*`).
    pub fn active(&self) -> &AtomicU32 {
        // SAFETY: as in ns(); 4-aligned.
        unsafe { AtomicU32::from_ptr(&raw mut (*self.word()).active) }
    }

    /// Clears `bit` of the activity flags; returns whether it was set, i.e.
    /// whether a packet came since the last call for this bit.
    pub(crate) fn take_activity(&self, bit: u32) -> bool {
        self.active().fetch_and(!bit, Ordering::SeqCst) & bit != 0
    }

    /// Sets the word to now: `ms` first, so that a non-zero `ns` always
    /// comes with a current `ms`.
    fn tick(&self) {
        let now = monotonic_ns();
        self.ms().store(now / 1_000_000, Ordering::Release);
        self.ns().store(now, Ordering::Release);
    }

    /// Sets the word to 0 (`ns` first): the programs call the helper.
    fn rest(&self) {
        self.ns().store(0, Ordering::Release);
        self.ms().store(0, Ordering::Release);
    }

    /// The packet rate (ingress + egress, per second) the drain measured:
    /// the ticker keeps the word only while it is high enough to pay for
    /// the ticks. A rate that is wakes a resting ticker.
    pub fn set_rate(&self, packets_per_sec: u64) {
        self.rate.store(packets_per_sec, Ordering::Relaxed);
        if packets_per_sec > self.start_rate.load(Ordering::Relaxed) && !self.ticking() {
            self.unpark_ticker();
        }
    }

    /// Sets every activity flag, as a packet does, and wakes a resting
    /// ticker: it starts again if the rate pays for ticks (benchmarks use it
    /// to measure the programs with the word kept, as under traffic).
    pub fn wake(&self) {
        self.active()
            .fetch_or(flowexport_common::CLOCK_ACTIVE_ALL, Ordering::SeqCst);
        self.unpark_ticker();
    }

    fn unpark_ticker(&self) {
        if let Some(t) = &*self.ticker.lock().expect("clock ticker") {
            t.unpark();
        }
    }

    /// Whether the ticker is keeping the word (it is not 0).
    pub fn ticking(&self) -> bool {
        self.ns().load(Ordering::Acquire) != 0
    }
}

/// Keeps the clock word current while traffic flows, until dropped.
pub(crate) struct ClockTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    clock: Arc<ClockMap>,
}

impl ClockTicker {
    /// Sets the word now and starts a thread that advances it every
    /// `period` while packets come (see the module docs).
    pub(crate) fn start(clock: Arc<ClockMap>, period: Duration) -> std::io::Result<ClockTicker> {
        clock.tick();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c) = (stop.clone(), clock.clone());
        let thread = std::thread::Builder::new()
            .name("flowexport-clock".into())
            .spawn(move || run(&c, &s, period))?;
        // A wake-up before this is not lost: the thread looks at the rate
        // before it first rests.
        *clock.ticker.lock().expect("clock ticker") = Some(thread.thread().clone());
        Ok(ClockTicker {
            stop,
            thread: Some(thread),
            clock,
        })
    }

    pub(crate) fn clock(&self) -> &Arc<ClockMap> {
        &self.clock
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The packet rate above which ticks at `period`, each costing `tick_ns`
/// of CPU, save more than they cost (`rate x HELPER_NS` against the ticks'
/// CPU a second); `ticking` adds hysteresis (keep going down to 0.8 of the
/// break-even, start only above 1.25 of it).
fn pays_above(tick_ns: f64, period: Duration, ticking: bool) -> f64 {
    let cost = tick_ns / period.as_secs_f64();
    cost / HELPER_NS * if ticking { 0.8 } else { 1.25 }
}

/// Whether ticks pay at `rate` packets/s (see [`pays_above`]).
fn worth_ticking(rate: u64, tick_ns: f64, period: Duration, ticking: bool) -> bool {
    rate as f64 > pays_above(tick_ns, period, ticking)
}

/// The rate above which a resting ticker starts, rounded down: what
/// [`ClockMap::set_rate`] compares (an integer rate is above it exactly
/// when it is above the unrounded one).
fn start_rate(tick_ns: f64, period: Duration) -> u64 {
    pays_above(tick_ns, period, false) as u64
}

fn run(clock: &ClockMap, stop: &AtomicBool, period: Duration) {
    let mut ticking = true;
    let mut window = Instant::now();
    // The thread's CPU per tick, measured over every 1000 ticks.
    let mut tick_ns = DEFAULT_TICK_NS;
    let (mut ticks, mut cpu0) = (0u32, thread_cpu());
    clock
        .start_rate
        .store(start_rate(tick_ns, period), Ordering::Relaxed);
    clock.take_activity(CLOCK_ACTIVE_TICKER);
    while !stop.load(Ordering::Relaxed) {
        if ticking {
            std::thread::park_timeout(period);
            clock.tick();
            ticks += 1;
            if ticks == 1000 {
                let cpu = thread_cpu();
                tick_ns = (cpu - cpu0).as_nanos() as f64 / f64::from(ticks);
                (ticks, cpu0) = (0, cpu);
                clock
                    .start_rate
                    .store(start_rate(tick_ns, period), Ordering::Relaxed);
            }
            if window.elapsed() >= REST_WINDOW {
                window = Instant::now();
                let rate = clock.rate.load(Ordering::Relaxed);
                let active = clock.take_activity(CLOCK_ACTIVE_TICKER);
                if !active || !worth_ticking(rate, tick_ns, period, true) {
                    ticking = false;
                    clock.rest();
                }
            }
        } else {
            if worth_ticking(clock.rate.load(Ordering::Relaxed), tick_ns, period, false) {
                // Ticks would pay at this rate: look for packets.
                std::thread::park_timeout(REST_POLL);
            } else {
                // They would not: sleep until a drain reports a rate at
                // which they do (`set_rate`), `wake`, or `stop`.
                std::thread::park();
            }
            // The rate as it is now, after the wait.
            let rate = clock.rate.load(Ordering::Relaxed);
            if clock.take_activity(CLOCK_ACTIVE_TICKER)
                && worth_ticking(rate, tick_ns, period, false)
            {
                ticking = true;
                window = Instant::now();
                (ticks, cpu0) = (0, thread_cpu());
                clock.tick();
            }
        }
    }
}

impl ClockTicker {
    /// Stops the thread and sets the word to 0: the programs read the
    /// kernel clock from now on (they may outlive the agent).
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.clock.rest();
    }
}

impl Drop for ClockTicker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowexport_common::CLOCK_ACTIVE_ALL;

    fn wait(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn ticks_while_packets_come_and_rests_without_them() {
        let clock = Arc::new(ClockMap::heap());
        // A packet rate at which ticking pays.
        clock.set_rate(100_000_000);
        let ticker = ClockTicker::start(clock.clone(), Duration::from_millis(1)).unwrap();
        // Ticking: the word moves, ms follows ns.
        let first = clock.ns().load(Ordering::Acquire);
        assert_ne!(first, 0);
        assert!(wait(|| clock.ns().load(Ordering::Acquire) > first));
        // No packet sets `active`: within two windows it rests (0).
        let started = Instant::now();
        assert!(wait(|| !clock.ticking()));
        assert!(
            started.elapsed() < REST_WINDOW * 3,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(clock.ms().load(Ordering::Acquire), 0);
        // A packet (as the programs do it) wakes it within a poll.
        clock.active().store(CLOCK_ACTIVE_ALL, Ordering::Release);
        let woken = Instant::now();
        assert!(wait(|| clock.ticking()));
        assert!(woken.elapsed() < REST_POLL * 3, "{:?}", woken.elapsed());
        let ms = clock.ms().load(Ordering::Acquire);
        let ns = clock.ns().load(Ordering::Acquire);
        assert!(ns / 1_000_000 >= ms && ns / 1_000_000 - ms <= 2);
        // Packets keep it ticking past a window.
        for _ in 0..30 {
            clock.active().store(CLOCK_ACTIVE_ALL, Ordering::Release);
            std::thread::sleep(Duration::from_millis(10));
            assert!(clock.ticking());
        }
        // The drain's bit is its own: the ticker leaves it set.
        assert!(clock.take_activity(flowexport_common::CLOCK_ACTIVE_DRAIN));
        // At a rate where the helper costs less than the ticks, it rests
        // even while packets come, and does not start again.
        clock.set_rate(1_000);
        assert!(wait(|| {
            clock.active().store(CLOCK_ACTIVE_ALL, Ordering::Release);
            !clock.ticking()
        }));
        for _ in 0..30 {
            clock.active().store(CLOCK_ACTIVE_ALL, Ordering::Release);
            std::thread::sleep(Duration::from_millis(10));
            assert!(!clock.ticking());
        }
        // Resting at that rate, the thread does not wake at all (it used to
        // look every REST_POLL), packets or not...
        let switches = ticker_wakeups();
        std::thread::sleep(REST_POLL * 4);
        assert_eq!(ticker_wakeups(), switches);
        // ... until a drain reports a rate at which ticks pay.
        clock.set_rate(100_000_000);
        assert!(wait(|| clock.ticking()));
        drop(ticker);
        // Without any rate (an idle host) it rests without waking too.
        let clock = Arc::new(ClockMap::heap());
        let ticker = ClockTicker::start(clock.clone(), Duration::from_millis(1)).unwrap();
        assert!(wait(|| !clock.ticking()));
        // (Its going to sleep, just after the word went to 0, is a switch.)
        std::thread::sleep(Duration::from_millis(50));
        let switches = ticker_wakeups();
        std::thread::sleep(REST_POLL * 4);
        assert_eq!(ticker_wakeups(), switches);
        // `wake` (a benchmark's) starts it at a rate that pays.
        clock.set_rate(100_000_000);
        clock.wake();
        assert!(wait(|| clock.ticking()));
        drop(ticker);
    }

    /// Voluntary context switches of the clock threads of this process
    /// (only the test above starts one in this test binary): each is a
    /// wake-up from a sleep.
    fn ticker_wakeups() -> u64 {
        let mut n = 0;
        for t in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = t.unwrap().path();
            if std::fs::read_to_string(dir.join("comm")).unwrap_or_default() != "flowexport-cloc\n"
            {
                continue;
            }
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            n += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .map_or(0, |v| v.trim().parse::<u64>().unwrap());
        }
        n
    }

    #[test]
    fn ticking_pays_above_the_break_even_rate() {
        let ms = Duration::from_millis(1);
        // 20 us a tick, 1000 ticks/s = 20 ms/s; the helper: 75 ns a packet.
        // Break-even: 266,667 packets/s; it starts above 1.25 times that
        // (333,333) and stops below 0.8 times (213,333).
        assert!(!worth_ticking(250_000, 20_000.0, ms, false));
        assert!(!worth_ticking(330_000, 20_000.0, ms, false));
        assert!(worth_ticking(340_000, 20_000.0, ms, false));
        assert!(worth_ticking(250_000, 20_000.0, ms, true));
        assert!(worth_ticking(220_000, 20_000.0, ms, true));
        assert!(!worth_ticking(210_000, 20_000.0, ms, true));
        // A coarser resolution ticks less often: pays earlier.
        assert!(worth_ticking(
            100_000,
            20_000.0,
            Duration::from_millis(10),
            false
        ));
    }
}
