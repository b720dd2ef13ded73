//! The clock word the kernel programs read instead of calling
//! `bpf_ktime_get_ns()` on every packet.
//!
//! The helper call costs about as much as the rest of the hot path together
//! (a call through a retpoline on this kind of machine), so the agent keeps
//! CLOCK_MONOTONIC in a one-entry array map created with BPF_F_MMAPABLE and
//! advances it every `--clock-resolution` (default 1 ms) through a shared
//! mapping, with one aligned 8-byte store: the programs read it with one
//! inlined array look-up and one load, and never see a torn value. First-
//! and last-seen times then have that resolution, which NetFlow and IPFIX
//! millisecond timestamps do not go below. While the word is 0 (before the
//! first tick) the programs call the helper.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::MapData;

use crate::timeconv::monotonic_ns;

/// Keeps the clock word current until dropped.
pub struct ClockTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: usize,
    len: usize,
    _map: MapData,
}

impl ClockTicker {
    /// Maps the CLOCK map's value page, sets it now, and starts a thread
    /// that advances it every `period`.
    pub fn start(map: MapData, period: Duration) -> std::io::Result<ClockTicker> {
        // SAFETY: sysconf has no preconditions.
        let len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        // SAFETY: mapping a BPF_F_MMAPABLE array map's fd, one page, shared;
        // the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = p as usize;
        let word = move || {
            // SAFETY: the page stays mapped until the ticker is dropped,
            // after the thread has been joined; offset 0 is the array's
            // first (8-aligned) value.
            unsafe { &*(addr as *const AtomicU64) }
        };
        word().store(monotonic_ns(), Ordering::Release);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("flowexport-clock".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(period);
                    word().store(monotonic_ns(), Ordering::Release);
                }
            })?;
        Ok(ClockTicker {
            stop,
            thread: Some(thread),
            addr,
            len,
            _map: map,
        })
    }
}

impl Drop for ClockTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: unmapping what start() mapped, after the thread is gone.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
