//! The shared flow table, seen from userspace: the drain reads and clears
//! counters and retires idle flows through a mapping of the kernel's `TABLE`
//! array, without a syscall per flow.
//!
//! # The table
//!
//! One [`TableSlot`] per slot (96 bytes: key, times, two generations of
//! counters), `2^k` slots, at least twice `--max-flows`. A flow lives in the
//! first usable slot at or after its home slot (`table_hash & mask`), at most
//! [`TABLE_MAX_PROBES`] slots on (linear probing). Each slot's control word
//! (the key's last word) holds its state, the flow's protocol and the TCP
//! flags of each generation:
//!
//! ```text
//!  EMPTY --(program: CAS under the flow's insert lock)--> BUSY --(key written)--> VALID
//!  VALID --(drain: idle)--> RETIRING --(next drain: last read)--> TOMB
//!  TOMB  --(program: CAS)--> BUSY ...           TOMB --(drain: next slot EMPTY)--> EMPTY
//! ```
//!
//! * **Look-up** (programs, no lock): from the home slot until an EMPTY slot
//!   or the probe limit; a VALID slot with the same key is the flow's.
//! * **Insert** (programs, only for a flow not found): under one of
//!   [`flowexport_common::TABLE_LOCKS`] locks chosen by the flow's hash, so
//!   two CPUs inserting the same new flow serialize and the second finds the
//!   first's slot; the first free slot (EMPTY or TOMB) of the run is claimed
//!   with a compare-and-swap (inserts of other flows may race for it), the
//!   key written, the slot published VALID. The drain learns of the new
//!   flow from whoever asked: an attached program marks its region in
//!   `DIRTY`, the replay program returns the slot in its frame.
//!   Userspace never inserts and never takes these locks, so a program never
//!   waits on a process that may be descheduled.
//! * **Counting** (programs): atomic adds into the current generation's
//!   counters. The drain reads and clears the other generation once no
//!   program can still write it (see `drain/mod.rs`).
//! * **Retiring** (drain): an idle flow's slot becomes RETIRING: programs
//!   pass over it (a new packet of the flow inserts a new slot). Programs
//!   that looked the slot up before may still count in it until the next
//!   drain's grace period; that drain reads it a last time and makes it a
//!   TOMB, which look-ups pass over and inserts reuse.
//! * **Tombstones** become EMPTY again (shortening later look-ups) when the
//!   slot after them is EMPTY: then no flow's probe run crosses them. This
//!   holds under concurrent inserts too: an insert takes the first free slot
//!   of its run, so a flow whose run reaches a tombstone lands on it or
//!   before it, never after it.
//!
//! Times in the slot are CLOCK_MONOTONIC milliseconds truncated to 32 bits;
//! `restore_ms` gives back the full value.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use flowexport_common::{
    slot_state, slot_tcp_flags, slot_word, table_hash, FlowKey, TableSlot, SLOT_EMPTY,
    SLOT_RETIRING, SLOT_TOMB, SLOT_VALID, SLOT_WORD_INDEX, TABLE_MAX_PROBES, TABLE_MIN_SLOTS,
    TABLE_REGION_SHIFT,
};

use super::bpf_sys::SharedMap;
use crate::capture::aggregator::AggregateKey;
use crate::capture::flow::FlowCounters;

/// Asks the CPU to start loading the cache line of `p`, a hint with no
/// other effect (none on targets other than x86-64). The drain's loops over
/// lists of slot numbers read memory at random, a cache miss each; a loop
/// that prefetches a few iterations ahead has several misses under way at
/// once instead of waiting out each in turn.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and changes nothing, whatever the
    // address (SSE, which it needs, is part of x86-64).
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Slots in the table for a capacity of `max_flows` concurrent flows: twice
/// as many, rounded up to a power of two, at least [`TABLE_MIN_SLOTS`].
pub fn slots_for(max_flows: u32) -> u32 {
    (u64::from(max_flows) * 2)
        .next_power_of_two()
        .clamp(u64::from(TABLE_MIN_SLOTS), 1 << 31) as u32
}

/// Kernel memory of a table of `slots` slots, in bytes.
pub fn table_bytes(slots: u32) -> u64 {
    u64::from(slots) * size_of::<TableSlot>() as u64
}

/// 64-bit words of the `DIRTY` bitmap for a table of `slots` slots.
pub(crate) fn dirty_words(slots: u32) -> u32 {
    (slots >> TABLE_REGION_SHIFT).div_ceil(64).max(1)
}

/// The full CLOCK_MONOTONIC millisecond value of a 32-bit one, given the
/// current time: the nearest value (within ±24 days) with those low bits.
pub(crate) fn restore_ms(stored: u32, now_ms: u64) -> u64 {
    let delta = (now_ms as u32).wrapping_sub(stored) as i32;
    now_ms.wrapping_sub(delta as i64 as u64)
}

/// What lives behind the table's slots; held only to keep it alive.
#[allow(dead_code)]
enum Memory {
    /// The kernel's `TABLE` map, mapped.
    Map(SharedMap),
    /// A table of our own (unit tests).
    #[cfg(test)]
    Heap(Vec<TableSlot>),
    /// Another FlowTable's memory (unit tests).
    #[cfg(test)]
    Borrowed,
}

/// The mapped flow table. Every access is atomic where the programs may
/// write at the same time; see the module docs for who writes what.
pub struct FlowTable {
    base: *mut TableSlot,
    slots: u32,
    _memory: Memory,
}

// SAFETY: the table is shared memory accessed through atomics (or, for a
// quiescent generation, by the one drain thread that owns the FlowTable).
unsafe impl Send for FlowTable {}

/// What `FlowTable::peek` reads of one generation, without clearing it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenPeek {
    pub packets: u64,
    pub first_ms: u32,
    pub last_ms: u32,
    pub tcp_flags: u8,
}

impl FlowTable {
    /// The table behind a mapping of the `TABLE` map of `slots` slots.
    pub(crate) fn from_map(map: SharedMap, slots: u32) -> FlowTable {
        assert!(slots.is_power_of_two());
        assert!(map.len() >= table_bytes(slots) as usize);
        FlowTable {
            base: map.as_ptr() as *mut TableSlot,
            slots,
            _memory: Memory::Map(map),
        }
    }

    /// Another view of the same table (tests: a restarted agent's); the
    /// first must outlive it.
    #[cfg(test)]
    pub fn share(&self) -> FlowTable {
        FlowTable {
            base: self.base,
            slots: self.slots,
            _memory: Memory::Borrowed,
        }
    }

    /// An empty table of our own, for tests.
    #[cfg(test)]
    pub fn heap(slots: u32) -> FlowTable {
        assert!(slots.is_power_of_two() && slots >= TABLE_MIN_SLOTS);
        let mut v = vec![TableSlot::default(); slots as usize];
        FlowTable {
            base: v.as_mut_ptr(),
            slots,
            _memory: Memory::Heap(v),
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn mask(&self) -> u32 {
        self.slots - 1
    }

    fn slot(&self, i: u32) -> *mut TableSlot {
        assert!(i < self.slots);
        // SAFETY: in bounds (checked above).
        unsafe { self.base.add(i as usize) }
    }

    /// Starts loading slot `i` (both of its cache lines) into the CPU's
    /// caches, for a loop that will read it a few iterations later; an
    /// index out of range is ignored.
    pub(crate) fn prefetch(&self, i: u32) {
        if i < self.slots {
            // SAFETY: in bounds (checked above).
            let s = unsafe { self.base.add(i as usize) }.cast::<u8>();
            prefetch(s);
            prefetch(s.wrapping_add(64));
        }
    }

    fn word(&self, i: u32) -> &AtomicU32 {
        // SAFETY: the control word is the slot's 12th 4-aligned u32.
        unsafe { AtomicU32::from_ptr((self.slot(i) as *mut u32).add(SLOT_WORD_INDEX)) }
    }

    fn u64_at(&self, p: *mut u64) -> &AtomicU64 {
        // SAFETY: p points at an 8-aligned u64 inside a slot of the table
        // (slots are 96 bytes from a page-aligned base), alive as self.
        unsafe { AtomicU64::from_ptr(p) }
    }

    fn u32_at(&self, p: *mut u32) -> &AtomicU32 {
        // SAFETY: as u64_at, 4-aligned.
        unsafe { AtomicU32::from_ptr(p) }
    }

    fn packets(&self, i: u32, gen: u32) -> &AtomicU64 {
        // SAFETY: a field of slot i.
        self.u64_at(unsafe { &raw mut (*self.slot(i)).packets[(gen & 1) as usize] })
    }

    fn bytes(&self, i: u32, gen: u32) -> &AtomicU64 {
        // SAFETY: a field of slot i.
        self.u64_at(unsafe { &raw mut (*self.slot(i)).bytes[(gen & 1) as usize] })
    }

    fn first_ms(&self, i: u32, gen: u32) -> &AtomicU32 {
        // SAFETY: a field of slot i.
        self.u32_at(unsafe { &raw mut (*self.slot(i)).first_ms[(gen & 1) as usize] })
    }

    fn last_ms(&self, i: u32, gen: u32) -> &AtomicU32 {
        // SAFETY: a field of slot i.
        self.u32_at(unsafe { &raw mut (*self.slot(i)).last_ms[(gen & 1) as usize] })
    }

    /// The slot's state (`SLOT_*`).
    pub fn state(&self, i: u32) -> u32 {
        slot_state(self.word(i).load(Ordering::Acquire))
    }

    /// The slot's state and the TCP flags of both generations, from one
    /// read of its control word.
    pub(crate) fn state_and_flags(&self, i: u32) -> (u32, u8) {
        let word = self.word(i).load(Ordering::Acquire);
        (
            slot_state(word),
            slot_tcp_flags(word, 0) | slot_tcp_flags(word, 1),
        )
    }

    /// The flow key of a VALID or RETIRING slot (its control word cleared).
    pub fn key(&self, i: u32) -> FlowKey {
        // SAFETY: a slot of the table, 8-aligned; the key words of a
        // VALID/RETIRING slot do not change (read after its state, with
        // Acquire). Read as six words (a volatile read of the struct would
        // be 48 byte loads).
        let w = unsafe { std::ptr::read(self.slot(i) as *const [u64; 6]) };
        // SAFETY: FlowKey is 48 bytes of plain integers, any bit pattern.
        let k: FlowKey = unsafe { std::mem::transmute(w) };
        k.normalized()
    }

    /// One generation's counters as they are now. Exact for a quiescent
    /// generation; for the current one, a snapshot the programs may be
    /// adding to (good for decisions, not for counting).
    pub(crate) fn peek(&self, i: u32, gen: u32) -> GenPeek {
        GenPeek {
            packets: self.packets(i, gen).load(Ordering::Relaxed),
            first_ms: self.first_ms(i, gen).load(Ordering::Relaxed),
            last_ms: self.last_ms(i, gen).load(Ordering::Relaxed),
            tcp_flags: slot_tcp_flags(self.word(i).load(Ordering::Relaxed), gen),
        }
    }

    /// Reads one generation's counters, which no program may be writing
    /// (the drain's old generation, or any after the programs are
    /// detached). Times come back in ns (see `restore_ms`).
    pub fn read(&self, i: u32, gen: u32, now_ms: u64) -> FlowCounters {
        // Plain loads: nobody else writes these counters now (the grace
        // period the caller waited for is a full barrier).
        let packets = self.packets(i, gen).load(Ordering::Relaxed);
        if packets == 0 {
            return FlowCounters::default();
        }
        let bytes = self.bytes(i, gen).load(Ordering::Relaxed);
        let first = self.first_ms(i, gen).load(Ordering::Relaxed);
        let last = self.last_ms(i, gen).load(Ordering::Relaxed);
        let word = self.word(i).load(Ordering::Relaxed);
        FlowCounters {
            packets,
            bytes,
            first_seen_ns: restore_ms(first, now_ms) * 1_000_000,
            last_seen_ns: restore_ms(last, now_ms) * 1_000_000,
            tcp_flags: slot_tcp_flags(word, gen),
        }
    }

    /// Clears one generation's counters (quiescent, as for [`read`]).
    /// `last_ms` is left as is: it dates the flow's last packet for the
    /// idle timeout.
    ///
    /// [`read`]: FlowTable::read
    pub fn clear(&self, i: u32, gen: u32) {
        let p = self.packets(i, gen);
        if p.load(Ordering::Relaxed) == 0 {
            return;
        }
        p.store(0, Ordering::Relaxed);
        self.bytes(i, gen).store(0, Ordering::Relaxed);
        self.first_ms(i, gen).store(0, Ordering::Relaxed);
        // Only the control word is shared with the programs (which may OR
        // in the other generation's flags): its byte is cleared atomically.
        let mask = 0xffu32 << (16 + 8 * (gen & 1));
        if self.word(i).load(Ordering::Relaxed) & mask != 0 {
            self.word(i).fetch_and(!mask, Ordering::AcqRel);
        }
    }

    /// [`read`](FlowTable::read), then [`clear`](FlowTable::clear).
    pub fn take(&self, i: u32, gen: u32, now_ms: u64) -> FlowCounters {
        let c = self.read(i, gen, now_ms);
        self.clear(i, gen);
        c
    }

    /// Adds counters (from the flow cache) to one generation that no program
    /// may be writing: counts add, times widen, flags OR.
    pub fn fold(&self, i: u32, gen: u32, c: &FlowCounters) {
        if c.packets == 0 {
            return;
        }
        let first = (c.first_seen_ns / 1_000_000) as u32;
        let last = (c.last_seen_ns / 1_000_000) as u32;
        let had = self.packets(i, gen).fetch_add(c.packets, Ordering::AcqRel);
        self.bytes(i, gen).fetch_add(c.bytes, Ordering::AcqRel);
        let f = self.first_ms(i, gen);
        // Times within 24 days of each other compare by wrapping difference.
        if had == 0 || (first.wrapping_sub(f.load(Ordering::Relaxed)) as i32) < 0 {
            f.store(first, Ordering::Release);
        }
        let l = self.last_ms(i, gen);
        if (last.wrapping_sub(l.load(Ordering::Relaxed)) as i32) > 0 || had == 0 {
            l.store(last, Ordering::Release);
        }
        if c.tcp_flags != 0 {
            self.word(i).fetch_or(
                u32::from(c.tcp_flags) << (16 + 8 * (gen & 1)),
                Ordering::AcqRel,
            );
        }
    }

    /// VALID -> RETIRING (programs stop finding the flow here). False if the
    /// slot is not VALID.
    pub(crate) fn retire(&self, i: u32) -> bool {
        let w = self.word(i);
        let mut cur = w.load(Ordering::Acquire);
        loop {
            if slot_state(cur) != SLOT_VALID {
                return false;
            }
            let new = (cur & !0xff00) | (SLOT_RETIRING << 8);
            match w.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                // A program OR-ed in TCP flags meanwhile: try again.
                Err(now) => cur = now,
            }
        }
    }

    /// Frees a RETIRING slot whose counters have been read for the last time
    /// (no program can write them any more): clears it, makes it a TOMB,
    /// then turns it and the tombstones before it EMPTY where the rule in
    /// the module docs allows. Returns how many slots became EMPTY.
    pub fn free(&self, i: u32) -> u32 {
        for gen in 0..2 {
            self.packets(i, gen).store(0, Ordering::Relaxed);
            self.bytes(i, gen).store(0, Ordering::Relaxed);
            self.first_ms(i, gen).store(0, Ordering::Relaxed);
            self.last_ms(i, gen).store(0, Ordering::Relaxed);
        }
        // Release: the cleared counters are visible before the slot is free.
        self.word(i)
            .store(slot_word(0, SLOT_TOMB), Ordering::Release);
        self.sweep_tombstones(i)
    }

    /// From TOMB slot `i` backwards: while the slot after is EMPTY, turn the
    /// tombstone EMPTY (a compare-and-swap: a program may be claiming it).
    fn sweep_tombstones(&self, mut i: u32) -> u32 {
        let mask = self.mask();
        let mut emptied = 0;
        for _ in 0..TABLE_MAX_PROBES {
            let next = (i + 1) & mask;
            if self.state(next) != SLOT_EMPTY {
                break;
            }
            let tomb = slot_word(0, SLOT_TOMB);
            if self
                .word(i)
                .compare_exchange(tomb, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                break;
            }
            emptied += 1;
            i = i.wrapping_sub(1) & mask;
            if self.state(i) != SLOT_TOMB {
                break;
            }
        }
        emptied
    }

    /// The slot of `key` if it is VALID in the table (the programs' look-up,
    /// for tests and benchmarks).
    pub fn find(&self, key: &FlowKey) -> Option<u32> {
        let mask = self.mask();
        let home = (table_hash(key) as u32) & mask;
        for d in 0..TABLE_MAX_PROBES {
            let i = (home + d) & mask;
            match self.state(i) {
                SLOT_EMPTY => return None,
                SLOT_VALID if same_key(&self.key(i), key) => return Some(i),
                _ => {}
            }
        }
        None
    }

    /// The programs' insert (`table_insert` in flowexport-ebpf), for unit
    /// tests of the drain's side of the protocol. Single-threaded: no lock.
    #[cfg(test)]
    pub fn insert(&self, key: &FlowKey) -> Option<u32> {
        use flowexport_common::SLOT_BUSY;
        if let Some(i) = self.find(key) {
            return Some(i);
        }
        let mask = self.mask();
        let home = (table_hash(key) as u32) & mask;
        for d in 0..TABLE_MAX_PROBES {
            let i = (home + d) & mask;
            let w = self.word(i).load(Ordering::Acquire);
            if matches!(slot_state(w), SLOT_EMPTY | SLOT_TOMB) {
                self.word(i)
                    .compare_exchange(
                        w,
                        slot_word(0, SLOT_BUSY),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .ok()?;
                let mut k = *key;
                k._pad = [0; 3];
                // SAFETY: our claimed slot; the control word is stored next.
                unsafe { std::ptr::write_volatile(&raw mut (*self.slot(i)).key, k) };
                self.word(i)
                    .store(slot_word(key.proto, SLOT_VALID), Ordering::Release);
                return Some(i);
            }
        }
        None
    }

    /// The programs' count (`table_add`), for unit tests.
    #[cfg(test)]
    pub fn add(&self, i: u32, gen: u32, packets: u64, bytes: u64, now_ms: u32, flags: u8) {
        if self.packets(i, gen).fetch_add(packets, Ordering::AcqRel) == 0 {
            self.first_ms(i, gen).store(now_ms, Ordering::Release);
        }
        self.bytes(i, gen).fetch_add(bytes, Ordering::AcqRel);
        self.last_ms(i, gen).store(now_ms, Ordering::Release);
        self.word(i)
            .fetch_or(u32::from(flags) << (16 + 8 * (gen & 1)), Ordering::AcqRel);
    }
}

/// Two keys name the same flow (the pad bytes are not part of it).
pub(crate) fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    a.normalized() == b.normalized()
}

/// A set of table regions (2^`TABLE_REGION_SHIFT` slots each): those the
/// next drain reads, from the programs' `DIRTY` bits and the drain's own
/// marks.
pub struct Regions {
    bits: Vec<u64>,
}

impl Regions {
    pub fn new(slots: u32) -> Regions {
        Regions {
            bits: vec![0; dirty_words(slots) as usize],
        }
    }

    /// Adds the regions set in `dirty` (the programs' bitmap, swapped to
    /// 0).
    pub(crate) fn absorb(&mut self, dirty: &[AtomicU64]) {
        for (b, d) in self.bits.iter_mut().zip(dirty) {
            if d.load(Ordering::Relaxed) != 0 {
                *b |= d.swap(0, Ordering::AcqRel);
            }
        }
    }

    pub fn clear(&mut self) {
        self.bits.fill(0);
    }

    pub fn insert(&mut self, region: u32) {
        self.bits[(region / 64) as usize] |= 1 << (region % 64);
    }

    /// The regions in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| (w * 64 + b) as u32)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&b| b == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> FlowKey {
        let mut k = FlowKey {
            ifindex: 2,
            proto: 17,
            ip_version: 4,
            dst_port: 53,
            ..Default::default()
        };
        k.src_addr[..4].copy_from_slice(&i.to_be_bytes());
        k
    }

    /// Keys whose home slot is `home` in a table of `slots` slots.
    fn keys_at(home: u32, slots: u32, n: usize) -> Vec<FlowKey> {
        (0..u32::MAX)
            .map(key)
            .filter(|k| table_hash(k) as u32 & (slots - 1) == home)
            .take(n)
            .collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(slots_for(1 << 20), 1 << 21);
        assert_eq!(slots_for(16), 64);
        assert_eq!(slots_for(100_000), 262_144);
        assert_eq!(table_bytes(1 << 21), 192 << 20);
        assert_eq!(dirty_words(1 << 21), 512);
        assert_eq!(dirty_words(64), 1);
    }

    #[test]
    fn restore_ms_across_the_32_bit_wrap() {
        let now = (1u64 << 32) + 5;
        assert_eq!(restore_ms(3, now), (1 << 32) + 3);
        assert_eq!(restore_ms(u32::MAX - 1, now), (1 << 32) - 2);
        // Slightly ahead of `now` (a program's clock word read later).
        assert_eq!(restore_ms(7, now), (1 << 32) + 7);
        assert_eq!(restore_ms(1000, 1000), 1000);
    }

    #[test]
    fn colliding_keys_probe_linearly_up_to_the_limit() {
        let t = FlowTable::heap(256);
        let ks = keys_at(250, 256, TABLE_MAX_PROBES as usize + 1);
        for (d, k) in ks.iter().take(TABLE_MAX_PROBES as usize).enumerate() {
            // Runs wrap around the end of the table.
            assert_eq!(t.insert(k), Some((250 + d as u32) & 255));
        }
        // The 65th flow with the same home slot has no slot within reach.
        assert_eq!(t.insert(&ks[TABLE_MAX_PROBES as usize]), None);
        for (d, k) in ks.iter().take(TABLE_MAX_PROBES as usize).enumerate() {
            assert_eq!(t.find(k), Some((250 + d as u32) & 255));
        }
    }

    #[test]
    fn retired_slots_are_passed_over_then_reused_and_swept() {
        let t = FlowTable::heap(64);
        let ks = keys_at(10, 64, 3);
        let (a, b, c) = (
            t.insert(&ks[0]).unwrap(),
            t.insert(&ks[1]).unwrap(),
            t.insert(&ks[2]).unwrap(),
        );
        assert_eq!((a, b, c), (10, 11, 12));
        // Retiring b: look-ups of c pass over it; b is not found.
        assert!(t.retire(b));
        assert!(!t.retire(b));
        assert_eq!(t.find(&ks[2]), Some(12));
        assert_eq!(t.find(&ks[1]), None);
        // A new packet of b's flow inserts it again, after c (the RETIRING
        // slot is not free yet).
        assert_eq!(t.insert(&ks[1]), Some(13));
        // Freed, b's old slot is a tombstone (c is after it): look-ups still
        // reach c, and the next insert reuses the tombstone.
        assert_eq!(t.free(b), 0);
        assert_eq!(t.state(11), SLOT_TOMB);
        assert_eq!(t.find(&ks[2]), Some(12));
        let d = keys_at(10, 64, 4)[3];
        assert_eq!(t.insert(&d), Some(11));
        // Retire and free the end of the run: the slots turn EMPTY back to
        // the last live one.
        for i in [13, 12, 11] {
            assert!(t.retire(i));
            t.free(i);
        }
        assert_eq!(t.state(13), SLOT_EMPTY);
        assert_eq!(t.state(12), SLOT_EMPTY);
        assert_eq!(t.state(11), SLOT_EMPTY);
        assert_eq!(t.state(10), SLOT_VALID);
        // With a VALID slot after it, a tombstone stays.
        assert!(t.retire(10));
        assert_eq!(t.free(10), 1);
        assert_eq!(t.state(10), SLOT_EMPTY);
    }

    #[test]
    fn take_reads_and_clears_one_generation() {
        let t = FlowTable::heap(64);
        let i = t.insert(&key(1)).unwrap();
        t.add(i, 0, 2, 200, 1_000, 0x02);
        t.add(i, 0, 1, 60, 1_005, 0x10);
        t.add(i, 1, 5, 500, 1_010, 0x01);
        let now_ms = 1_020;
        let c = t.take(i, 0, now_ms);
        assert_eq!(
            c,
            FlowCounters {
                packets: 3,
                bytes: 260,
                first_seen_ns: 1_000_000_000,
                last_seen_ns: 1_005_000_000,
                tcp_flags: 0x12
            }
        );
        assert_eq!(t.take(i, 0, now_ms), FlowCounters::default());
        // The other generation is untouched; last_ms survives the take.
        assert_eq!(t.peek(i, 1).packets, 5);
        assert_eq!(t.peek(i, 0).last_ms, 1_005);
        assert_eq!(t.take(i, 1, now_ms).tcp_flags, 0x01);
        assert_eq!(t.key(i), key(1));
    }

    #[test]
    fn fold_adds_cache_counts() {
        let t = FlowTable::heap(64);
        let i = t.insert(&key(2)).unwrap();
        let c = FlowCounters {
            packets: 4,
            bytes: 400,
            first_seen_ns: 2_000_400_000,
            last_seen_ns: 2_009_000_000,
            tcp_flags: 0x10,
        };
        // The programs counted one packet in the table (first seen 1999 ms)
        // before the drain folds the cache's counts in.
        t.add(i, 1, 1, 50, 1_999, 0x02);
        t.fold(i, 1, &c);
        t.fold(
            i,
            1,
            &FlowCounters {
                packets: 1,
                bytes: 10,
                first_seen_ns: 2_005_000_000,
                last_seen_ns: 2_012_000_000,
                tcp_flags: 0,
            },
        );
        let got = t.take(i, 1, 2_100);
        assert_eq!(
            got,
            FlowCounters {
                packets: 6,
                bytes: 460,
                first_seen_ns: 1_999_000_000,
                last_seen_ns: 2_012_000_000,
                tcp_flags: 0x12
            }
        );
    }

    #[test]
    fn regions_absorb_the_dirty_bitmap() {
        let mut r = Regions::new(1 << 14);
        let dirty: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        dirty[0].store(0b101, Ordering::Relaxed);
        dirty[3].store(1 << 63, Ordering::Relaxed);
        r.insert(7);
        r.absorb(&dirty);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![0, 2, 7, 255]);
        assert!(dirty.iter().all(|d| d.load(Ordering::Relaxed) == 0));
        r.clear();
        assert!(r.is_empty());
    }
}
