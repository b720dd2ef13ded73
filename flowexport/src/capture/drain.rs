//! Draining the kernel's counters exactly, and exporting flows on idle and
//! active timeouts.
//!
//! # The exact-drain scheme
//!
//! `CONTROL[0]` holds the drain epoch; its low bit is the generation. The
//! kernel programs read it once per packet and count the packet in the
//! per-CPU flow cache (`CACHE`: two halves, one per generation; a slot
//! carries the epoch it was filled in and its flow's table slot) or in the
//! flow's slot of the shared table (`TABLE`, see [`super::table`]), in the
//! counters of that generation. A drain:
//!
//! 1. advances `CONTROL[0]`; new packets now count in the other
//!    generation's counters and cache half;
//! 2. waits for an RCU grace period (`bpf_sys::GracePeriod`):
//!    afterwards no program that read the old epoch is still running, so
//!    nothing writes the old generation's counters or old-epoch cache slots
//!    any more;
//! 3. folds the old epoch's cache slots (every CPU's copy, one batched
//!    read) into the old generation of their table slots;
//! 4. looks at the flows that may be due: those whose time has come in a
//!    timing wheel of slots (each at the earliest time it can be due), and
//!    those in the table regions the programs marked in `DIRTY` (new flows
//!    they put there, TCP FIN/RST), where it learns of new flows; the
//!    replay program reports the new flows it puts in the table instead
//!    (see [`TableDrain`]). Per flow, it decides from the old generation
//!    (exact) and the current one (a snapshot) whether it is due: idle for
//!    `--idle-timeout`, active for `--active-timeout` since the first packet
//!    of its slice, or a TCP flow that saw FIN or RST. A flow that is not
//!    due goes back in the wheel; its counts keep adding up in the kernel,
//!    so userspace holds only its slot number and deadline bucket;
//! 5. exports a due flow in two steps, because only one generation can be
//!    read exactly at a time: it takes the old generation now and the other
//!    one at the next drain, when that one is old, and exports the sum.
//!    "Takes" is read now, clear later: the drain first hands its records
//!    to the sinks, then commits (stores the first steps' counts in the
//!    pinned `PENDING` map and clears what it read), so that an agent
//!    killed in between leaves every count in the kernel for the next one
//!    (see [`TableDrain::commit`]). Every packet is in exactly one export:
//!    those counted before this drain in the old generation, those counted
//!    before the next drain in the other, and anything later starts the
//!    next slice. Only an active timeout needs the two steps: a flow that
//!    ends (idle, or a TCP connection that saw FIN or RST) takes one, at
//!    the next drain. Its slot is retired now (programs pass over it from
//!    then on; a new packet of the flow takes a new slot), and once the
//!    next drain's grace period has passed nothing writes either
//!    generation, so that drain reads the slot whole and frees it. Until
//!    then the slot keeps every count, so such an export stores nothing in
//!    `PENDING`;
//! 6. reads the fallback ring buffer (packets that found no table slot,
//!    each with its key) and the overflow counters (packets that found the
//!    ring full too), which go into a userspace [`FlowAggregator`] with the
//!    same timeouts.
//!
//! Packets that miss their cache slot because another flow holds it (nearly
//! all of them at a million flows) are not counted in the table by the
//! receiving CPU: they wait in the `MISSES` ring, and the drain thread
//! counts them in the table itself, every 10 ms while they come and at the
//! start of every drain, in the generation current at that moment
//! ([`super::replay`]). A record is counted once, in one generation, so the
//! scheme above holds for it; while the ring is full the programs count in
//! the table directly.
//!
//! A drain with nothing to do is skipped: no packet since the last one (the
//! programs set a flag word), no export in progress and no timeout due.
//!
//! Records leave in batches through a callback, never as one vector of
//! every due flow.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use aya::Ebpf;
use flowexport_common::{
    CacheSlot, FallbackEvent, FlowKey, PendingExport, CLOCK_ACTIVE_DRAIN, CONTROL_CACHE_SLOTS,
    CONTROL_EPOCH, CONTROL_FOLDED, CONTROL_LAYOUT, CONTROL_OVERFLOW_READ, CONTROL_OWNER_PID,
    CONTROL_RING_BYTES, CONTROL_SLOTS, DIR_EGRESS, DIR_INGRESS, LAYOUT_VERSION, MAP_CACHE,
    MAP_CLOCK, MAP_CONTROL, MAP_DIRTY, MAP_FALLBACK, MAP_MISSES, MAP_PENDING, MAP_REPLAYED,
    MAP_STATS, MAP_TABLE, MISS_RING_BYTES, PROG_REPLAY, SLOT_BUSY, SLOT_RETIRING, SLOT_VALID,
    STAT_FALLBACK_CONTENDED, STAT_FALLBACK_PACKETS, STAT_FILTERED_EGRESS, STAT_FILTERED_INGRESS,
    STAT_LEN, STAT_MALFORMED_EGRESS, STAT_MALFORMED_INGRESS, STAT_NON_IP_EGRESS,
    STAT_NON_IP_INGRESS, STAT_OVERFLOW_BYTES_EGRESS, STAT_OVERFLOW_BYTES_INGRESS,
    STAT_OVERFLOW_PACKETS_EGRESS, STAT_OVERFLOW_PACKETS_INGRESS, STAT_TABLE_BYTES_EGRESS,
    STAT_TABLE_BYTES_INGRESS, STAT_TABLE_PACKETS_EGRESS, STAT_TABLE_PACKETS_INGRESS,
    TABLE_REGION_SHIFT,
};

use super::bpf_sys::{lookup_batch, GracePeriod, SharedMap};
use super::clock::{ClockMap, ClockTicker};
use super::replay::{MissRing, Replay};
use super::table::{dirty_words, prefetch, restore_ms, table_bytes, FlowTable, Regions};
use crate::capture::flow::FlowCounters;
use crate::timeconv::monotonic_ns;

const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("eBPF map {0} is missing from the object; rebuild with `cargo xtask build-ebpf`")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("waiting for the RCU grace period (bpf map-in-map update): {0}")]
    GracePeriod(std::io::Error),
    #[error("mapping eBPF map {name} (BPF_F_MMAPABLE array, Linux 5.5+): {source}")]
    Mmap {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("reading the flow cache (BPF_MAP_LOOKUP_BATCH, Linux 5.6+): {0}")]
    CacheRead(std::io::Error),
    #[error("starting the clock thread: {0}")]
    Clock(std::io::Error),
    #[error("keeping exports in progress in the PENDING map: {0}")]
    Pending(String),
    #[error(
        "counting the packets that missed the flow cache (MISSES ring) with BPF_PROG_TEST_RUN, \
         which needs CAP_BPF: {0}"
    )]
    Replay(std::io::Error),
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DrainError {
    move |source| DrainError::Map { name, source }
}

/// Idle and active timeouts, in nanoseconds of CLOCK_MONOTONIC.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub idle_ns: u64,
    pub active_ns: u64,
}

/// Where a drain hands each exported flow (key, counts since its last
/// export); the agent batches them into records for the sinks.
pub type Export<'a> = dyn FnMut(&FlowKey, &FlowCounters) + 'a;

/// What a flow table keys flows by: the kernel's [`FlowKey`], or a key
/// with more identity around it (AF_XDP's tunnel).
pub trait AggregateKey: Copy + Eq + std::hash::Hash {
    /// The 5-tuple part (for the TCP FIN/RST rule).
    fn flow(&self) -> &FlowKey;
    /// The key with bytes that are not part of the flow cleared.
    fn normalized(self) -> Self;
}

impl AggregateKey for FlowKey {
    fn flow(&self) -> &FlowKey {
        self
    }

    fn normalized(mut self) -> Self {
        self._pad = [0; 3];
        self
    }
}

/// A hash map of flows. Keyed by packets from the network, so hashed with a
/// random seed per map (foldhash): several times cheaper than std's SipHash
/// on a 48-byte key, which the AF_XDP workers paid twice per packet (their
/// batch's map, then the shared table), and still not open to precomputed
/// collisions.
pub type FlowMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Flows counted in userspace between exports: the kernel paths' flows that
/// found no table slot (fallback ring, overflow counters), and every flow
/// of the AF_XDP capture. Counts since the flow's last export.
pub struct FlowAggregator<K = FlowKey> {
    flows: FlowMap<K, FlowCounters>,
}

impl<K> Default for FlowAggregator<K> {
    fn default() -> Self {
        FlowAggregator {
            flows: FlowMap::default(),
        }
    }
}

impl<K: AggregateKey> FlowAggregator<K> {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Takes every flow out, leaving the aggregator empty: an export of
    /// all of them (at exit) that builds its records in batches without
    /// holding whatever guards the aggregator, and without a second copy
    /// of the table.
    pub fn take_all(&mut self) -> impl Iterator<Item = (K, FlowCounters)> {
        std::mem::take(&mut self.flows).into_iter()
    }

    /// Adds counters to a flow. The key's pad bytes are not part of the flow.
    pub fn add(&mut self, key: K, c: &FlowCounters) {
        self.flows.entry(key.normalized()).or_default().merge(c);
    }

    /// Exports every flow that is due: idle for `idle_ns`, active for
    /// `active_ns` since its first packet after the last export, a TCP flow
    /// that saw FIN or RST, or everything if `force` (shutdown). An exported
    /// flow leaves the table; its next packet starts a new slice, so
    /// successive records of a long flow are deltas. Returns how many.
    pub fn expire(
        &mut self,
        now_ns: u64,
        t: Timeouts,
        force: bool,
        out: &mut dyn FnMut(&K, &FlowCounters),
    ) -> usize {
        let mut n = 0;
        self.flows.retain(|k, c| {
            let due = force
                || now_ns.saturating_sub(c.last_seen_ns) >= t.idle_ns
                || now_ns.saturating_sub(c.first_seen_ns) >= t.active_ns
                || (k.flow().proto == IPPROTO_TCP && c.tcp_flags & (TCP_FIN | TCP_RST) != 0);
            if due {
                out(k, c);
                n += 1;
            }
            !due
        });
        n
    }
}

/// What one drain did.
#[derive(Clone, Copy, Debug, Default)]
pub struct DrainReport {
    /// Nothing happened since the last drain and nothing was due: the
    /// kernel was not touched.
    pub skipped: bool,
    /// Flows in the table (slots in use) after the drain.
    pub table_entries: usize,
    /// Old-epoch cache slots folded into the table (one per CPU slot).
    pub cache_entries: usize,
    /// Fallback ring events read.
    pub fallback_events: u64,
    /// `MISSES` records counted in the table at the start of this drain.
    pub replayed: u64,
    /// Packets/bytes counted since the last drain, by direction (index
    /// DIR_INGRESS / DIR_EGRESS).
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Packets that went to the overflow counters in this interval.
    pub overflow_packets: u64,
    /// Records exported.
    pub exported: usize,
    /// Table slots freed (idle flows).
    pub retired: usize,
    /// Table regions read, and flows looked at in them.
    pub regions_visited: usize,
    pub examined: usize,
}

impl DrainReport {
    /// Counts a flow's packets and bytes in its direction's totals.
    fn count(&mut self, key: &FlowKey, c: &FlowCounters) {
        let d = (key.direction == DIR_EGRESS) as usize;
        self.packets[d] += c.packets;
        self.bytes[d] += c.bytes;
    }
}

/// Cumulative kernel counters (sums over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub values: [u64; STAT_LEN as usize],
}

impl KernelStats {
    fn get(&self, i: u32) -> u64 {
        self.values[i as usize]
    }
    fn by_dir(&self, dir: u8, ingress: u32, egress: u32) -> u64 {
        self.get(if dir == DIR_INGRESS { ingress } else { egress })
    }
    pub(crate) fn non_ip(&self, dir: u8) -> u64 {
        self.by_dir(dir, STAT_NON_IP_INGRESS, STAT_NON_IP_EGRESS)
    }
    pub fn malformed(&self, dir: u8) -> u64 {
        self.by_dir(dir, STAT_MALFORMED_INGRESS, STAT_MALFORMED_EGRESS)
    }
    /// Packets a filter rule left out.
    pub fn filtered(&self, dir: u8) -> u64 {
        self.by_dir(dir, STAT_FILTERED_INGRESS, STAT_FILTERED_EGRESS)
    }
    /// Packets that found no table slot (all reasons).
    pub fn fallback_packets(&self) -> u64 {
        self.get(STAT_FALLBACK_PACKETS)
    }
    /// Of those, packets whose insert lock stayed busy.
    pub(crate) fn fallback_contended(&self) -> u64 {
        self.get(STAT_FALLBACK_CONTENDED)
    }
    fn overflow(&self, dir: u8) -> (u64, u64) {
        (
            self.by_dir(
                dir,
                STAT_OVERFLOW_PACKETS_INGRESS,
                STAT_OVERFLOW_PACKETS_EGRESS,
            ),
            self.by_dir(dir, STAT_OVERFLOW_BYTES_INGRESS, STAT_OVERFLOW_BYTES_EGRESS),
        )
    }
    fn set_overflow(&mut self, dir: u8, (packets, bytes): (u64, u64)) {
        let (p, b) = if dir == DIR_INGRESS {
            (STAT_OVERFLOW_PACKETS_INGRESS, STAT_OVERFLOW_BYTES_INGRESS)
        } else {
            (STAT_OVERFLOW_PACKETS_EGRESS, STAT_OVERFLOW_BYTES_EGRESS)
        };
        self.values[p as usize] = packets;
        self.values[b as usize] = bytes;
    }
    fn table_path(&self, dir: u8) -> (u64, u64) {
        (
            self.by_dir(dir, STAT_TABLE_PACKETS_INGRESS, STAT_TABLE_PACKETS_EGRESS),
            self.by_dir(dir, STAT_TABLE_BYTES_INGRESS, STAT_TABLE_BYTES_EGRESS),
        )
    }
}

/// The table side of a drain (steps 4 and 5 of the module docs), apart
/// from the kernel handles so that it can be tested on a table of our own.
///
/// A drain looks only at what may need it: the slots of exports in
/// progress, the regions the programs marked (flows they put in the table,
/// TCP FIN/RST), and the flows whose deadline has come. Every flow this
/// drain knows of is in a timing wheel at the earliest time it can become
/// due (idle or active timeout, a lower bound: packets since only push the
/// idle timeout later, and a look recomputes it). A flow is learned of when
/// its region is read, or from the replay program, which returns the slots
/// it claimed for new flows with their first packet's time, so that at a
/// million flows and tens of thousands of new ones a second, the drain
/// reads a few slots per new flow instead of every region that got one.
pub struct TableDrain {
    table: FlowTable,
    /// Regions to read at the next drain: marked in `DIRTY`, or by the
    /// drain itself (a cached flow's FIN/RST, an adopted table).
    marked: Regions,
    /// Per slot: [`UNTRACKED`], the wheel bucket it waits in plus 1, or
    /// [`IN_PROGRESS`] (taken from the wheel by the drain running).
    sched: Vec<u32>,
    /// The timing wheel: buckets of 2^`WHEEL_SHIFT` ns, each with the
    /// earliest deadline put in it. A slot moved to another bucket leaves
    /// a stale entry behind, passed over when its bucket comes (`sched`
    /// no longer names it).
    wheel: std::collections::BTreeMap<u32, WheelBucket>,
    /// New flows the replay program put in the table, for the next scan
    /// to schedule.
    claims: Vec<Claim>,
    /// Slots tracked (in the table, known to this drain).
    live: usize,
    /// Exports in progress, by table slot: the slot's first taken
    /// generation. Looked up for every slot a drain looks at (up to
    /// millions per drain), so hashed with foldhash, as is `finished_set`:
    /// std's SipHash took ~9% of the drain thread at 1M flows (`perf
    /// record` on the agent, 50k packets/s).
    pending: HashMap<u32, FlowCounters, foldhash::fast::RandomState>,
    /// The earliest time a flow not yet due can become due.
    next_deadline_ns: u64,
    /// The drain epoch now (after the flip), recorded with new exports.
    epoch: u32,
    /// What [`TableDrain::commit`] does once the records of this drain are
    /// out: exports started (to persist, then their generation cleared),
    /// generations read into records (to clear), slots to free, exports
    /// finished (to forget).
    started: Vec<(u32, PendingExport)>,
    to_clear: Vec<(u32, u32)>,
    to_free: Vec<u32>,
    finished: Vec<u32>,
    /// The slots of `finished`: not checked again before the commit (a new
    /// export of one would be deleted with the old one's entry).
    finished_set: std::collections::HashSet<u32, foldhash::fast::RandomState>,
}

/// A new flow the replay program claimed a table slot for: the slot, and
/// its first packet's time in CLOCK_MONOTONIC milliseconds, the low 32 bits
/// as the table keeps times (`table::restore_ms`): 8 bytes a new flow, which
/// at a million new flows between two drains is 8 MiB.
pub(crate) type Claim = (u32, u32);

/// `TableDrain::sched` of a slot the drain does not know of.
const UNTRACKED: u32 = 0;
/// `TableDrain::sched` of a slot taken from the wheel by the running drain.
const IN_PROGRESS: u32 = u32::MAX;
/// Wheel buckets of 2^27 ns (134 ms): a drain takes the buckets whose
/// earliest deadline has come, a few per drain at the default interval.
const WHEEL_SHIFT: u32 = 27;

/// How many slots ahead the drain's loops over slot numbers prefetch what
/// they will read (see `table::prefetch`).
const PREFETCH_AHEAD: usize = 16;

/// Slots waiting in one wheel bucket.
struct WheelBucket {
    /// The earliest deadline of the slots put here (a stale entry's
    /// included: a lower bound).
    first_ns: u64,
    slots: Vec<u32>,
}

/// Where exports in progress are kept so that they outlive the agent: the
/// pinned `PENDING` map (or nothing, in tests and without `--pin-dir`).
pub trait PendingStore {
    fn put(&mut self, entries: &[(u32, PendingExport)]) -> std::io::Result<()>;
    fn delete(&mut self, slots: &[u32]) -> std::io::Result<()>;
}

/// A store that keeps nothing.
pub struct NoStore;

impl PendingStore for NoStore {
    fn put(&mut self, _: &[(u32, PendingExport)]) -> std::io::Result<()> {
        Ok(())
    }
    fn delete(&mut self, _: &[u32]) -> std::io::Result<()> {
        Ok(())
    }
}

/// What one scan of the table did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Flows in the table (slots in use) after the scan.
    pub live: usize,
    pub exported: usize,
    pub retired: usize,
    /// Regions (of 2^`TABLE_REGION_SHIFT` slots) read.
    pub regions_visited: usize,
    /// Flows looked at: in the visited regions, from the wheel, and exports
    /// in progress.
    pub examined: usize,
}

impl TableDrain {
    pub fn new(table: FlowTable) -> TableDrain {
        let marked = Regions::new(table.slots());
        let slots = table.slots() as usize;
        TableDrain {
            table,
            marked,
            sched: vec![UNTRACKED; slots],
            wheel: std::collections::BTreeMap::new(),
            claims: Vec::new(),
            live: 0,
            pending: HashMap::default(),
            next_deadline_ns: u64::MAX,
            epoch: 0,
            started: Vec::new(),
            to_clear: Vec::new(),
            to_free: Vec::new(),
            finished: Vec::new(),
            finished_set: std::collections::HashSet::default(),
        }
    }

    /// Marks every region for a visit at the next drain (adopting a table
    /// whose flows this drain has not seen).
    pub(crate) fn visit_all(&mut self) {
        for r in 0..(self.table.slots() >> TABLE_REGION_SHIFT).max(1) {
            self.marked.insert(r);
        }
        self.next_deadline_ns = 0;
    }

    /// Sets the drain epoch in effect (after this drain's flip).
    pub(crate) fn set_epoch(&mut self, epoch: u32) {
        self.epoch = epoch;
    }

    /// Takes over the exports in progress an earlier agent left in
    /// `PENDING` (`entries`), with the epoch in `CONTROL` now. An export's
    /// first step reads a generation, stores it there, then clears the
    /// generation; if the agent died between the two, the generation still
    /// holds exactly what was stored (nothing writes it until the next
    /// flip): then the entry is dropped (the counts are still in the table)
    /// and returned for deletion. Every other entry is an export whose
    /// second step is due, and makes the next drain run.
    pub(crate) fn adopt_pending(&mut self, entries: Vec<(u32, PendingExport)>) -> Vec<u32> {
        let mut stale = Vec::new();
        for (i, e) in entries {
            if i >= self.table.slots() {
                stale.push(i);
                continue;
            }
            let gen = u32::from(e.gen);
            let still = self.table.peek(i, gen);
            let bytes_still = self.table.read(i, gen, 0).bytes;
            if e.epoch == self.epoch && still.packets == e.packets && bytes_still == e.bytes {
                stale.push(i);
                continue;
            }
            self.pending.insert(
                i,
                FlowCounters {
                    packets: e.packets,
                    bytes: e.bytes,
                    first_seen_ns: e.first_seen_ns,
                    last_seen_ns: e.last_seen_ns,
                    tcp_flags: e.tcp_flags,
                },
            );
            self.visit_soon(i);
        }
        if !self.pending.is_empty() {
            self.next_deadline_ns = 0;
        }
        stale
    }

    /// Second half of a drain, once its records are out (handed to the
    /// sinks): persists the exports it started, then clears what it read
    /// into them and into the records, frees retired slots, and forgets
    /// finished exports. Until this runs, every count it exported is still
    /// in the table (or in `PENDING`): an agent killed before it re-exports
    /// them (duplicates), never loses them.
    pub fn commit(&mut self, store: &mut dyn PendingStore) -> std::io::Result<()> {
        // Finished exports leave PENDING first: an agent killed after this
        // re-exports their second steps' counts (still in the table), never
        // their first steps' (exported, gone from the table) on a slot that
        // was freed and taken by another flow meanwhile.
        if !self.finished.is_empty() {
            store.delete(&self.finished)?;
            self.finished.clear();
            self.finished_set.clear();
        }
        if !self.started.is_empty() {
            store.put(&self.started)?;
            for (i, e) in self.started.drain(..) {
                self.table.clear(i, u32::from(e.gen));
            }
        }
        for (i, gen) in self.to_clear.drain(..) {
            self.table.clear(i, gen);
        }
        for i in std::mem::take(&mut self.to_free) {
            self.table.free(i);
            self.untrack(i);
        }
        Ok(())
    }

    /// Starts an export of slot `i`: its old generation read now (to be
    /// persisted and cleared at commit), the rest at the next drain.
    fn start_export(&mut self, i: u32, old_gen: u32, now_ms: u64) {
        let c = self.table.read(i, old_gen, now_ms);
        self.started.push((
            i,
            PendingExport {
                packets: c.packets,
                bytes: c.bytes,
                first_seen_ns: c.first_seen_ns,
                last_seen_ns: c.last_seen_ns,
                epoch: self.epoch,
                tcp_flags: c.tcp_flags,
                gen: old_gen as u8,
                _pad: [0; 2],
            },
        ));
        self.pending.insert(i, c);
    }

    /// Reads generation `gen` of slot `i` into a record (cleared at commit).
    fn read_out(&mut self, i: u32, gen: u32, now_ms: u64) -> FlowCounters {
        let c = self.table.read(i, gen, now_ms);
        if c.packets != 0 {
            self.to_clear.push((i, gen));
        }
        c
    }

    pub fn table(&self) -> &FlowTable {
        &self.table
    }

    /// Regions the programs marked in `DIRTY` (swapped to 0): read at this
    /// drain.
    pub(crate) fn absorb_dirty(&mut self, dirty: &[AtomicU64]) {
        self.marked.absorb(dirty);
    }

    /// Marks the region of slot `idx` for a visit at this drain (a cached
    /// flow saw FIN or RST).
    pub(crate) fn visit_soon(&mut self, idx: u32) {
        if idx < self.table.slots() {
            self.marked.insert(idx >> TABLE_REGION_SHIFT);
        }
    }

    /// Puts slot `i` in the wheel at `due_ns` (tracking it if it was not).
    fn schedule(&mut self, i: u32, due_ns: u64) {
        let b = (due_ns >> WHEEL_SHIFT).min(u64::from(IN_PROGRESS - 2)) as u32;
        let s = &mut self.sched[i as usize];
        if *s == UNTRACKED {
            self.live += 1;
        }
        *s = b + 1;
        let bucket = self.wheel.entry(b).or_insert_with(|| WheelBucket {
            first_ns: u64::MAX,
            slots: Vec::new(),
        });
        bucket.first_ns = bucket.first_ns.min(due_ns);
        bucket.slots.push(i);
    }

    /// Slot `i` is free: no longer tracked.
    fn untrack(&mut self, i: u32) {
        let s = &mut self.sched[i as usize];
        if *s != UNTRACKED {
            *s = UNTRACKED;
            self.live -= 1;
        }
    }

    /// Starts loading slot `i`'s wheel position into the CPU's caches (a
    /// loop `PREFETCH_AHEAD` slots ahead of its reads; `i` past the table
    /// is harmless: a prefetch never faults).
    #[inline(always)]
    fn prefetch_sched(&self, i: u32) {
        prefetch(self.sched.as_ptr().wrapping_add(i as usize));
    }

    /// Takes the slots of the buckets whose earliest deadline has come out
    /// of the wheel (now [`IN_PROGRESS`]).
    ///
    /// They come in slot order: at a million flows the slots taken are
    /// spread over the whole table, one or two per page, and in address
    /// order the CPU's page walks and prefetches find their page-table
    /// entries in its caches (in arrival order each walk is a cache miss
    /// of its own: `perf` put most of the drain's time there).
    fn take_due(&mut self, now_ns: u64) -> Vec<u32> {
        // (slot, its bucket's `sched` value), sorted as one integer.
        let mut taken: Vec<u64> = Vec::new();
        while let Some(e) = self.wheel.first_entry() {
            if e.get().first_ns > now_ns {
                break;
            }
            let (b, bucket) = e.remove_entry();
            taken.extend(
                bucket
                    .slots
                    .iter()
                    .map(|&i| u64::from(i) << 32 | u64::from(b + 1)),
            );
        }
        taken.sort_unstable();
        let mut due = Vec::with_capacity(taken.len());
        for (k, &t) in taken.iter().enumerate() {
            if let Some(&ahead) = taken.get(k + PREFETCH_AHEAD) {
                self.prefetch_sched((ahead >> 32) as u32);
            }
            let i = (t >> 32) as u32;
            let s = &mut self.sched[i as usize];
            if *s == t as u32 {
                *s = IN_PROGRESS;
                due.push(i);
            }
        }
        due
    }

    /// Whether a drain may be skipped when no packet came since the last
    /// one: no export in progress and no timeout due by `now_ns`.
    pub(crate) fn idle_until(&self, now_ns: u64) -> bool {
        self.pending.is_empty()
            && self.claims.is_empty()
            && self.marked.is_empty()
            && now_ns < self.next_deadline_ns
    }

    /// Folds a cache slot's counters into its table slot's generation `gen`
    /// (quiescent). False if the slot holds no flow (then the caller keeps
    /// the counts some other way).
    pub fn fold(&mut self, idx: u32, gen: u32, c: &FlowCounters) -> bool {
        if idx >= self.table.slots() || !matches!(self.table.state(idx), SLOT_VALID | SLOT_RETIRING)
        {
            return false;
        }
        self.table.fold(idx, gen, c);
        if c.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            self.visit_soon(idx);
        }
        true
    }

    /// Steps 4 and 5: after the flip to generation `1 - old_gen` and its
    /// grace period (`old_gen` is quiescent), or with `final_drain` after the
    /// programs are detached (both generations quiescent: every flow is
    /// exported).
    pub fn scan(
        &mut self,
        old_gen: u32,
        now_ns: u64,
        t: Timeouts,
        final_drain: bool,
        out: &mut Export,
    ) -> ScanReport {
        let now_ms = now_ns / 1_000_000;
        let mut r = ScanReport::default();
        // New flows from the replay program: none can be due before its
        // first packet's time plus the shorter timeout (a FIN/RST marks
        // its region).
        let first_due = t.idle_ns.min(t.active_ns);
        let mut claims = std::mem::take(&mut self.claims);
        // In slot order, as the due slots (see `take_due`).
        claims.sort_unstable_by_key(|c| c.0);
        for (k, &(i, at_ms)) in claims.iter().enumerate() {
            if let Some(&(ahead, _)) = claims.get(k + PREFETCH_AHEAD) {
                self.prefetch_sched(ahead);
            }
            if i < self.table.slots() && self.sched[i as usize] == UNTRACKED {
                // Whole milliseconds: due no later than the first packet's
                // exact time would make it (a lower bound, as the wheel
                // wants).
                let at_ns = restore_ms(at_ms, now_ms) * 1_000_000;
                self.schedule(i, at_ns.saturating_add(first_due));
            }
        }
        // The vector back, for the next replays to fill.
        self.claims = claims;
        self.claims.clear();
        // Exports in progress, started at the last drain: their second step.
        let mut pending: Vec<(u32, FlowCounters)> = self.pending.drain().collect();
        pending.sort_unstable_by_key(|p| p.0);
        r.examined += pending.len();
        for (i, mut c) in pending {
            self.finished.push(i);
            self.finished_set.insert(i);
            match self.table.state(i) {
                SLOT_RETIRING => {
                    // Retired with an export in progress (kept in `PENDING`
                    // by an agent of an earlier version, which took the old
                    // generation first): no program writes it any more.
                    // Its last counts, then free it.
                    c.merge(&self.read_out(i, 0, now_ms));
                    c.merge(&self.read_out(i, 1, now_ms));
                    self.emit(i, &c, out, &mut r);
                    self.to_free.push(i);
                    r.retired += 1;
                }
                SLOT_VALID => {
                    // The generation that was current then (a final drain
                    // takes both).
                    c.merge(&self.read_out(i, old_gen, now_ms));
                    if final_drain {
                        c.merge(&self.read_out(i, old_gen ^ 1, now_ms));
                    }
                    self.emit(i, &c, out, &mut r);
                    // Its next deadline: idle since its last packet, or a
                    // new slice's active timeout (which starts now at the
                    // earliest).
                    let due = self
                        .last_seen(i, now_ms)
                        .saturating_add(t.idle_ns)
                        .min(now_ns.saturating_add(t.active_ns));
                    self.schedule(i, due);
                }
                state => {
                    // Only this drain frees slots, and only RETIRING ones:
                    // an export in progress always finds its slot.
                    log::error!(
                        "table slot {i} changed to state {state} during an export; \
                         {} packets of it are lost",
                        c.packets
                    );
                }
            }
        }
        // The flows whose time has come, taken from the wheel before
        // anything else is scheduled: what this drain schedules waits for
        // the next one.
        let due = if final_drain {
            Vec::new()
        } else {
            self.take_due(now_ns)
        };
        // The marked regions (all of them at the end).
        if final_drain {
            self.visit_all();
        }
        let marked: Vec<u32> = self.marked.iter().collect();
        self.marked.clear();
        for region in marked {
            self.visit(region, old_gen, now_ns, t, final_drain, out, &mut r);
            r.regions_visited += 1;
        }
        for (k, &i) in due.iter().enumerate() {
            if let Some(&ahead) = due.get(k + PREFETCH_AHEAD) {
                self.table.prefetch(ahead);
            }
            self.look(i, old_gen, now_ns, t, out, &mut r);
        }
        self.next_deadline_ns = match self.wheel.first_key_value() {
            _ if !self.pending.is_empty() => 0,
            Some((_, b)) => b.first_ns,
            None => u64::MAX,
        };
        // Less the slots freed at the commit.
        let freeing = self.to_free.iter();
        r.live = self.live
            - freeing
                .filter(|&&i| self.sched[i as usize] != UNTRACKED)
                .count();
        r
    }

    fn emit(&self, i: u32, c: &FlowCounters, out: &mut Export, r: &mut ScanReport) {
        if c.packets != 0 {
            out(&self.table.key(i), c);
            r.exported += 1;
        }
    }

    /// Reads slot `i`'s both generations into one record.
    fn read_whole(&mut self, i: u32, now_ms: u64, out: &mut Export, r: &mut ScanReport) {
        let mut c = self.read_out(i, 0, now_ms);
        c.merge(&self.read_out(i, 1, now_ms));
        self.emit(i, &c, out, r);
    }

    /// Reads slot `i` whole, and frees it at the commit: a RETIRING slot no
    /// program writes any more.
    fn read_retired(&mut self, i: u32, now_ms: u64, out: &mut Export, r: &mut ScanReport) {
        self.read_whole(i, now_ms, out, r);
        self.to_free.push(i);
        r.retired += 1;
    }

    /// Reads one region's slots: learns of the flows it did not know,
    /// looks at the others (a FIN/RST may have marked it), and starts the
    /// exports that are due.
    #[allow(clippy::too_many_arguments)]
    fn visit(
        &mut self,
        region: u32,
        old_gen: u32,
        now_ns: u64,
        t: Timeouts,
        final_drain: bool,
        out: &mut Export,
        r: &mut ScanReport,
    ) {
        let now_ms = now_ns / 1_000_000;
        let start = region << TABLE_REGION_SHIFT;
        for i in start..(start + (1 << TABLE_REGION_SHIFT)).min(self.table.slots()) {
            let sched = self.sched[i as usize];
            if sched == IN_PROGRESS {
                // Taken from the wheel: looked at below.
                continue;
            }
            let (state, flags) = self.table.state_and_flags(i);
            if !final_drain
                && sched != UNTRACKED
                && state == SLOT_VALID
                && flags & (TCP_FIN | TCP_RST) == 0
            {
                // A flow in the wheel, where it waits for the earliest
                // time it can be due (later packets only put that off):
                // nothing to do before then unless its TCP connection
                // ended. The region was marked for a neighbour (a new
                // flow a program put in the table, or an ended one).
                continue;
            }
            if self.finished_set.contains(&i) {
                // Exported at this drain (its counts are cleared, a
                // retired slot freed, at the commit).
                continue;
            }
            match state {
                // Being filled: looked at next time.
                SLOT_BUSY => self.schedule(i, now_ns),
                SLOT_RETIRING if final_drain || sched == UNTRACKED => {
                    // Retired at an earlier drain, by the agent before (the
                    // ones this agent retires wait in the wheel): after
                    // this drain's grace period no program writes it; read
                    // it whole and free it.
                    self.read_retired(i, now_ms, out, r);
                }
                SLOT_VALID => {
                    r.examined += 1;
                    if final_drain {
                        self.read_whole(i, now_ms, out, r);
                    } else if self.pending.contains_key(&i) {
                        // Its export started at this drain; its wheel entry
                        // stands for the second step.
                    } else {
                        self.check(i, old_gen, now_ns, t);
                    }
                }
                _ => {}
            }
        }
    }

    /// Looks at slot `i`, taken from the wheel: reads a slot retired at an
    /// earlier drain, else checks the flow (see `check`).
    fn look(
        &mut self,
        i: u32,
        old_gen: u32,
        now_ns: u64,
        t: Timeouts,
        out: &mut Export,
        r: &mut ScanReport,
    ) {
        if self.sched[i as usize] != IN_PROGRESS {
            // A second entry of the slot in the buckets taken.
            return;
        }
        if self.finished_set.contains(&i) {
            // Exported at this drain: looked at again next time.
            self.schedule(i, now_ns);
            return;
        }
        match self.table.state(i) {
            SLOT_VALID => {
                r.examined += 1;
                if self.pending.contains_key(&i) {
                    self.schedule(i, now_ns);
                } else {
                    self.check(i, old_gen, now_ns, t);
                }
            }
            // Retired at an earlier drain (this drain's wait in the wheel
            // for the next): read whole, freed at the commit.
            SLOT_RETIRING => self.read_retired(i, now_ns / 1_000_000, out, r),
            SLOT_BUSY => self.schedule(i, now_ns),
            _ => {
                // Only this drain frees slots; a slot it tracks stays in
                // use until then.
                log::error!("table slot {i}, tracked, was found free");
                self.untrack(i);
            }
        }
    }

    /// When slot `i`'s flow last saw a packet (ns), as far as the table
    /// knows: the later of the generations' `last_ms`. 0 is "never set" (a
    /// slot the programs just filled sets it with its first packet; a true
    /// 0, once every 49.7 days, only makes a flow look idle early, which
    /// splits its record in two); with neither set, now.
    fn last_seen(&self, i: u32, now_ms: u64) -> u64 {
        [self.table.peek(i, 0).last_ms, self.table.peek(i, 1).last_ms]
            .into_iter()
            .filter(|&ms| ms != 0)
            .map(|ms| restore_ms(ms, now_ms) * 1_000_000)
            .max()
            .unwrap_or(now_ms * 1_000_000)
    }

    /// Looks at slot `i` (VALID, no export in progress) and puts it back in
    /// the wheel: an idle flow or an ended TCP connection is retired (read
    /// whole at the next drain), an active timeout starts the flow's
    /// two-step export (second step at the next drain), else the flow waits
    /// for the time it can become due.
    fn check(&mut self, i: u32, old_gen: u32, now_ns: u64, t: Timeouts) {
        let now_ms = now_ns / 1_000_000;
        let due = self.due(i, old_gen, now_ms, t);
        self.schedule(i, due);
    }

    /// `check`'s decision: when slot `i` is to be looked at again.
    fn due(&mut self, i: u32, old_gen: u32, now_ms: u64, t: Timeouts) -> u64 {
        let now_ns = now_ms * 1_000_000;
        let old = self.table.peek(i, old_gen);
        let cur = self.table.peek(i, old_gen ^ 1);
        let at = |ms: u32| restore_ms(ms, now_ms) * 1_000_000;
        let last = self.last_seen(i, now_ms);
        if now_ns.saturating_sub(last) >= t.idle_ns {
            return self.retire(i, now_ns);
        }
        let idle_due = last.saturating_add(t.idle_ns);
        if old.packets == 0 && cur.packets == 0 {
            // Nothing since its last export: the next slice starts with a
            // packet not yet seen, at least one active timeout from now.
            return idle_due.min(now_ns.saturating_add(t.active_ns));
        }
        // The slice's first packet: the older generation with packets. A
        // current generation that just got its first packet may not have
        // its time yet (0): then the slice began now.
        let mut start = now_ns;
        if old.packets != 0 {
            start = start.min(at(old.first_ms));
        }
        if cur.packets != 0 && cur.first_ms != 0 {
            start = start.min(at(cur.first_ms));
        }
        let tcp_end = (old.tcp_flags | cur.tcp_flags) & (TCP_FIN | TCP_RST) != 0
            && self.table.key(i).proto == IPPROTO_TCP;
        if tcp_end {
            // The connection ended: its flow is over, as an idle one is (a
            // later segment of the same 5-tuple, such as the ACK of the
            // other side's FIN, takes a new slot and record).
            return self.retire(i, now_ns);
        }
        if now_ns.saturating_sub(start) >= t.active_ns {
            self.start_export(i, old_gen, now_ms);
            return now_ns;
        }
        idle_due.min(start.saturating_add(t.active_ns))
    }

    /// Ends slot `i`'s flow (idle, or a TCP connection that ended):
    /// programs pass over the slot from now on. Nothing is taken now: after
    /// the next drain's grace period no program writes either generation,
    /// and that drain reads the slot whole and frees it (`look`). Until
    /// then the retired slot itself keeps every count, so an agent that
    /// dies in between leaves nothing to store in `PENDING`: the next one
    /// reads the slot whole in the same way. Returns when the slot is due
    /// again: now (at the next drain).
    fn retire(&mut self, i: u32, now_ns: u64) -> u64 {
        self.table.retire(i);
        now_ns
    }
}

/// The kernel maps a drain works on, and the drain's state.
pub struct KernelTables {
    table: TableDrain,
    dirty: SharedMap,
    control: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    fallback: RingBuf<MapData>,
    cache: MapData,
    cache_buf: Vec<u8>,
    cpus: usize,
    grace: GracePeriod,
    /// Keeps the programs' clock word current while traffic flows.
    clock: ClockTicker,
    /// The drain epoch written to `CONTROL[0]`; its low bit is the
    /// generation.
    epoch: u32,
    capacity: u32,
    /// Cache slots per generation (0: no cache).
    cache_slots: u32,
    /// Cumulative counters already accounted for.
    last_stats: KernelStats,
    /// Exports in progress, pinned.
    pending: PendingMap,
    /// An epoch whose cache half the last agent did not fold.
    unfolded: Option<u32>,
    /// The packets that missed their cache slot, counted from this thread
    /// (None: the object's replay program is not loaded, as with AF_XDP).
    replay: Option<Replay>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DrainError> {
    let map = ebpf.take_map(name).ok_or(DrainError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Maps the first `len` bytes of an array map of the object.
fn shared(ebpf: &mut Ebpf, name: &'static str, len: usize) -> Result<SharedMap, DrainError> {
    let Some(aya::maps::Map::Array(data)) = ebpf.take_map(name) else {
        return Err(DrainError::MissingMap(name));
    };
    SharedMap::new(data, len).map_err(|source| DrainError::Mmap { name, source })
}

/// The pinned `PENDING` map as a [`PendingStore`].
pub struct PendingMap {
    /// Always `Map::HashMap`.
    map: aya::maps::Map,
}

impl PendingMap {
    fn data(&self) -> &MapData {
        match &self.map {
            aya::maps::Map::HashMap(d) => d,
            _ => unreachable!("PENDING is taken as a hash map"),
        }
    }

    /// Every entry (an earlier agent's exports in progress).
    fn entries(&self) -> Result<Vec<(u32, PendingExport)>, DrainError> {
        let m: aya::maps::HashMap<&MapData, u32, PendingExport> =
            aya::maps::HashMap::try_from(&self.map).map_err(map_err(MAP_PENDING))?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }
}

impl PendingStore for PendingMap {
    fn put(&mut self, entries: &[(u32, PendingExport)]) -> std::io::Result<()> {
        let keys: Vec<u32> = entries.iter().map(|e| e.0).collect();
        let values: Vec<PendingExport> = entries.iter().map(|e| e.1).collect();
        super::bpf_sys::update_batch(self.data().fd().as_fd(), &keys, &values)
    }
    fn delete(&mut self, slots: &[u32]) -> std::io::Result<()> {
        super::bpf_sys::delete_batch(self.data().fd().as_fd(), slots)
    }
}

/// How a drain starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// New maps: epoch 0, nothing in progress.
    Fresh,
    /// Maps an earlier agent left pinned: continue its epoch, finish its
    /// exports in progress, and visit every flow it left.
    Adopted,
}

impl KernelTables {
    /// Takes the maps out of a loaded object (loaded with `slots` table
    /// slots for `capacity` flows, `cache_slots` slots per half of `CACHE`
    /// and a fallback ring of `ring_bytes`) and starts the clock word
    /// (advanced every `clock_resolution` while that pays).
    pub fn new(
        ebpf: &mut Ebpf,
        capacity: u32,
        slots: u32,
        cache_slots: u32,
        ring_bytes: u32,
        clock_resolution: std::time::Duration,
        start: Start,
    ) -> Result<KernelTables, DrainError> {
        let clock = ClockMap::new(shared(
            ebpf,
            MAP_CLOCK,
            size_of::<flowexport_common::ClockWord>(),
        )?);
        let clock =
            ClockTicker::start(Arc::new(clock), clock_resolution).map_err(DrainError::Clock)?;
        let table =
            FlowTable::from_map(shared(ebpf, MAP_TABLE, table_bytes(slots) as usize)?, slots);
        let dirty = shared(ebpf, MAP_DIRTY, dirty_words(slots) as usize * 8)?;
        let mut control: Array<MapData, u32> = take(ebpf, MAP_CONTROL)?;
        let epoch = match start {
            Start::Fresh => 0,
            Start::Adopted => control
                .get(&CONTROL_EPOCH, 0)
                .map_err(map_err(MAP_CONTROL))?,
        };
        // The last agent flipped to `epoch` but died before folding the
        // previous epoch's cache half? Those slots keep their counts until
        // programs of epoch + 1 take them over: the first drain folds them
        // before it flips.
        let unfolded = match start {
            Start::Adopted if epoch > 0 => {
                let folded = control
                    .get(&CONTROL_FOLDED, 0)
                    .map_err(map_err(MAP_CONTROL))?;
                (folded != epoch - 1).then(|| epoch - 1)
            }
            _ => None,
        };
        // The epoch, and what the next agent needs to know about these
        // maps (see capture::pins).
        for (i, v) in [
            (CONTROL_EPOCH, epoch),
            (CONTROL_LAYOUT, LAYOUT_VERSION),
            (CONTROL_SLOTS, slots),
            (CONTROL_CACHE_SLOTS, cache_slots),
            (CONTROL_RING_BYTES, ring_bytes),
            (CONTROL_OWNER_PID, std::process::id()),
        ] {
            control.set(i, v, 0).map_err(map_err(MAP_CONTROL))?;
        }
        let Some(aya::maps::Map::PerCpuArray(cache)) = ebpf.take_map(MAP_CACHE) else {
            return Err(DrainError::MissingMap(MAP_CACHE));
        };
        let Some(pending_map @ aya::maps::Map::HashMap(_)) = ebpf.take_map(MAP_PENDING) else {
            return Err(DrainError::MissingMap(MAP_PENDING));
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DrainError::CacheRead(e))?;
        let mut table = TableDrain::new(table);
        table.set_epoch(epoch);
        let mut pending = PendingMap { map: pending_map };
        if start == Start::Adopted {
            // Every region may hold flows the last agent left: the first
            // drain reads them all.
            table.visit_all();
            let entries = pending.entries()?;
            let n = entries.len();
            let stale = table.adopt_pending(entries);
            pending
                .delete(&stale)
                .map_err(|e| DrainError::Pending(e.to_string()))?;
            log::info!(
                "adopted the pinned flow table at drain epoch {epoch}: {} exports in progress \
                 taken over, {} found not started",
                n - stale.len(),
                stale.len()
            );
        }
        let replay = match ebpf.program(PROG_REPLAY).map(|p| p.fd()) {
            Some(Ok(fd)) => {
                let prog = fd.try_clone().map_err(DrainError::Replay)?;
                let Some(aya::maps::Map::RingBuf(ring)) = ebpf.take_map(MAP_MISSES) else {
                    return Err(DrainError::MissingMap(MAP_MISSES));
                };
                let replayed: Array<MapData, u64> = take(ebpf, MAP_REPLAYED)?;
                let replayed = replayed.get(&0, 0).map_err(map_err(MAP_REPLAYED))?;
                let ring = MissRing::new(ring, MISS_RING_BYTES).map_err(DrainError::Replay)?;
                Some(Replay::new(ring, prog, replayed).map_err(DrainError::Replay)?)
            }
            _ => None,
        };
        let mut tables = KernelTables {
            table,
            dirty,
            control,
            stats: take(ebpf, MAP_STATS)?,
            fallback: take(ebpf, MAP_FALLBACK)?,
            cache,
            cache_buf: Vec::new(),
            cpus,
            grace: GracePeriod::new().map_err(DrainError::GracePeriod)?,
            clock,
            epoch,
            capacity,
            cache_slots,
            last_stats: KernelStats::default(),
            pending,
            unfolded,
            replay,
        };
        if start == Start::Adopted {
            // What earlier agents counted is theirs: continue from the
            // kernel's counters now, except the overflow counters, which
            // continue from what was read into records (CONTROL).
            let mut base = tables.stats()?;
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                base.set_overflow(dir, tables.overflow_read(dir)?);
            }
            tables.last_stats = base;
        }
        Ok(tables)
    }

    /// The overflow counters of `dir` as read into records so far.
    fn overflow_read(&self, dir: u8) -> Result<(u64, u64), DrainError> {
        let at = CONTROL_OVERFLOW_READ + if dir == DIR_INGRESS { 0 } else { 4 };
        let word = |i: u32| -> Result<u64, DrainError> {
            let lo = self
                .control
                .get(&(at + i), 0)
                .map_err(map_err(MAP_CONTROL))?;
            let hi = self
                .control
                .get(&(at + i + 1), 0)
                .map_err(map_err(MAP_CONTROL))?;
            Ok(u64::from(lo) | u64::from(hi) << 32)
        };
        Ok((word(0)?, word(2)?))
    }

    fn set_overflow_read(
        &mut self,
        dir: u8,
        (packets, bytes): (u64, u64),
    ) -> Result<(), DrainError> {
        let at = CONTROL_OVERFLOW_READ + if dir == DIR_INGRESS { 0 } else { 4 };
        for (i, v) in [packets, bytes].into_iter().enumerate() {
            let i = at + 2 * i as u32;
            self.control
                .set(i, v as u32, 0)
                .map_err(map_err(MAP_CONTROL))?;
            self.control
                .set(i + 1, (v >> 32) as u32, 0)
                .map_err(map_err(MAP_CONTROL))?;
        }
        Ok(())
    }

    /// Stops keeping the programs' clock word and sets it to 0, so that the
    /// programs read the kernel clock while no agent runs.
    pub(crate) fn rest_clock(&mut self) {
        self.clock.stop();
    }

    /// Second half of a drain, once its records are out: see
    /// [`TableDrain::commit`].
    pub fn commit(&mut self) -> Result<(), DrainError> {
        self.table
            .commit(&mut self.pending)
            .map_err(|e| DrainError::Pending(e.to_string()))
    }

    /// The table's capacity in flows (`--max-flows`).
    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The table's slots.
    pub fn slots(&self) -> u32 {
        self.table.table().slots()
    }

    /// The programs' clock word.
    pub fn clock(&self) -> &ClockMap {
        self.clock.clock()
    }

    /// The table, as the drain sees it (for benchmarks and tests).
    pub fn table(&self) -> &FlowTable {
        self.table.table()
    }

    /// Waits until no program run that started before this call is running.
    pub(crate) fn wait_grace_period(&self) -> Result<(), DrainError> {
        self.grace.wait().map_err(DrainError::GracePeriod)
    }

    /// Cumulative kernel counters, summed over CPUs.
    pub fn stats(&self) -> Result<KernelStats, DrainError> {
        let mut s = KernelStats::default();
        for (i, slot) in s.values.iter_mut().enumerate() {
            let per_cpu = self.stats.get(&(i as u32), 0).map_err(map_err(MAP_STATS))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(s)
    }

    fn dirty_words(&self) -> &[AtomicU64] {
        // SAFETY: the DIRTY mapping holds dirty_words(slots) u64 words
        // (mapped with that length, page-aligned) and lives as long as self.
        unsafe {
            std::slice::from_raw_parts(
                self.dirty.as_ptr() as *const AtomicU64,
                dirty_words(self.slots()) as usize,
            )
        }
    }

    /// One drain (see the module docs): due flows go to `out`, as do the
    /// due flows of `agg` (the fallback flows).
    ///
    /// With `final_drain`, the programs must already be detached: nothing is
    /// flipped, and every flow is exported.
    pub fn drain(
        &mut self,
        agg: &mut FlowAggregator,
        t: Timeouts,
        final_drain: bool,
        out: &mut Export,
    ) -> Result<DrainReport, DrainError> {
        // The packets that missed their cache slot, counted now in the
        // generation this drain is about to read.
        let mut report = DrainReport {
            replayed: self.replay_misses()?,
            ..DrainReport::default()
        };
        if let Some(e) = self.unfolded.take() {
            // Left unfolded by an agent killed between its flip and its
            // fold (see `new`). Before this drain's flip, that half and its
            // generation are nobody's: programs of epoch e + 2 would take
            // the slots over.
            log::info!("folding the flow cache of epoch {e}, which the last agent left");
            self.wait_grace_period()?;
            self.fold_cache(e, agg, &mut report)?;
            self.control
                .set(CONTROL_FOLDED, e, 0)
                .map_err(map_err(MAP_CONTROL))?;
        }
        if !final_drain {
            let traffic = self.clock.clock().take_activity(CLOCK_ACTIVE_DRAIN);
            if !traffic && agg.is_empty() && self.table.idle_until(monotonic_ns()) {
                report.skipped = true;
                return Ok(report);
            }
            self.epoch = self.epoch.wrapping_add(1);
            self.control
                .set(CONTROL_EPOCH, self.epoch, 0)
                .map_err(map_err(MAP_CONTROL))?;
            self.table.set_epoch(self.epoch);
        }
        self.wait_grace_period()?;
        if final_drain {
            // The programs are detached and none still runs: the last
            // packets that missed their cache slot are in the ring now.
            report.replayed += self.replay_misses()?;
        }
        // The epoch whose counters are now quiescent (a final drain reads
        // the current one: nothing was advanced).
        let old_epoch = if final_drain {
            self.epoch
        } else {
            self.epoch.wrapping_sub(1)
        };
        let old_gen = old_epoch & 1;
        let now = monotonic_ns();
        self.fold_cache(old_epoch, agg, &mut report)?;
        self.control
            .set(CONTROL_FOLDED, old_epoch, 0)
            .map_err(map_err(MAP_CONTROL))?;
        let dirty = self.dirty_words();
        // Split borrows: the words live in `self.dirty`, the regions in
        // `self.table`.
        let dirty: &[AtomicU64] =
            // SAFETY: same memory as above; `self.dirty` is not touched while
            // the slice is in use.
            unsafe { std::slice::from_raw_parts(dirty.as_ptr(), dirty.len()) };
        self.table.absorb_dirty(dirty);
        let scan = self.table.scan(old_gen, now, t, final_drain, out);
        report.table_entries = scan.live;
        report.exported += scan.exported;
        report.retired = scan.retired;
        report.regions_visited = scan.regions_visited;
        report.examined = scan.examined;

        self.read_fallback(agg, now, &mut report)?;
        report.exported += agg.expire(now, t, final_drain, out);
        Ok(report)
    }

    /// Counts the packets waiting in the `MISSES` ring in the table (see
    /// [`super::replay`]): how many. The agent calls it between drains
    /// while traffic flows; every drain calls it first.
    pub fn replay_misses(&mut self) -> Result<u64, DrainError> {
        let Some(r) = &mut self.replay else {
            return Ok(0);
        };
        // The slots it claimed go to the table's next scan.
        r.run(&mut self.table.claims).map_err(DrainError::Replay)
    }

    /// Whether packets wait in the `MISSES` ring.
    pub fn misses_pending(&self) -> bool {
        self.replay.as_ref().is_some_and(Replay::pending)
    }

    /// The `--keep-attached` exit: the programs keep counting into the
    /// pinned maps for the next agent, but what already left the kernel for
    /// this agent's memory (fallback ring events and overflow counts read,
    /// in `agg`) is exported now, whatever its timeouts.
    pub(crate) fn hand_over(
        &mut self,
        agg: &mut FlowAggregator,
        t: Timeouts,
        out: &mut Export,
    ) -> Result<DrainReport, DrainError> {
        let mut report = DrainReport::default();
        let now = monotonic_ns();
        self.read_fallback(agg, now, &mut report)?;
        report.exported += agg.expire(now, t, true, out);
        Ok(report)
    }

    /// Step 6: the fallback ring's events and the overflow counters, into
    /// `agg`; the overflow counters read so far are kept in `CONTROL` for
    /// the next agent.
    fn read_fallback(
        &mut self,
        agg: &mut FlowAggregator,
        now: u64,
        report: &mut DrainReport,
    ) -> Result<(), DrainError> {
        while let Some(item) = self.fallback.next() {
            if item.len() < size_of::<FallbackEvent>() {
                log::warn!("short fallback event ({} bytes) ignored", item.len());
                continue;
            }
            // SAFETY: the ring holds FallbackEvent records written by the
            // kernel program; read_unaligned copes with any alignment.
            let ev: FallbackEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FallbackEvent) };
            let c = FlowCounters {
                packets: ev.packets,
                bytes: ev.bytes,
                first_seen_ns: ev.ts_ns,
                last_seen_ns: ev.ts_ns,
                tcp_flags: ev.tcp_flags,
            };
            report.count(&ev.key, &c);
            agg.add(ev.key, &c);
            report.fallback_events += 1;
        }

        let stats = self.stats()?;
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let (p, b) = stats.overflow(dir);
            let (sp, sb) = self.last_stats.overflow(dir);
            if p > sp {
                // The key is lost for these packets; they become one record
                // per direction with no address family, so totals stay exact.
                let key = FlowKey {
                    direction: dir,
                    ..Default::default()
                };
                let c = FlowCounters {
                    packets: p - sp,
                    bytes: b - sb,
                    first_seen_ns: now,
                    last_seen_ns: now,
                    tcp_flags: 0,
                };
                report.count(&key, &c);
                agg.add(key, &c);
                report.overflow_packets += p - sp;
                self.set_overflow_read(dir, (p, b))?;
            }
            let (p, b) = stats.table_path(dir);
            let (sp, sb) = self.last_stats.table_path(dir);
            report.packets[dir as usize] += p - sp;
            report.bytes[dir as usize] += b - sb;
        }
        self.last_stats = stats;
        Ok(())
    }

    /// Step 3: the old epoch's cache slots of every CPU, read in batches
    /// of [`CACHE_READ_SLOTS`], into their table slots' old generation. A
    /// slot whose table slot is gone (which the insert protocol rules out)
    /// is kept in `agg`.
    fn fold_cache(
        &mut self,
        old_epoch: u32,
        agg: &mut FlowAggregator,
        report: &mut DrainReport,
    ) -> Result<(), DrainError> {
        if self.cache_slots == 0 {
            return Ok(());
        }
        let gen = old_epoch & 1;
        let value_len = size_of::<CacheSlot>().next_multiple_of(8);
        let mut read = 0;
        for start in (0..self.cache_slots).step_by(CACHE_READ_SLOTS as usize) {
            let count = CACHE_READ_SLOTS.min(self.cache_slots - start);
            let n = lookup_batch(
                self.cache.fd().as_fd(),
                gen * self.cache_slots + start,
                count,
                value_len * self.cpus,
                &mut self.cache_buf,
            )
            .map_err(DrainError::CacheRead)?;
            read += n;
            let values = &self.cache_buf[..n as usize * value_len * self.cpus];
            for chunk in values.chunks_exact(value_len) {
                // SAFETY: the kernel wrote CacheSlot values (96 bytes each,
                // a multiple of 8) into the buffer; read_unaligned copes
                // with the Vec's alignment.
                let s: CacheSlot =
                    unsafe { std::ptr::read_unaligned(chunk.as_ptr() as *const CacheSlot) };
                if s.epoch != old_epoch || s.value.packets == 0 {
                    continue;
                }
                let c = FlowCounters {
                    packets: s.value.packets,
                    bytes: s.value.bytes,
                    first_seen_ns: s.value.first_seen_ns,
                    last_seen_ns: s.value.last_seen_ns,
                    tcp_flags: s.value.tcp_flags,
                };
                report.count(&s.key, &c);
                report.cache_entries += 1;
                if !self.table.fold(s.table_idx, gen, &c) {
                    log::warn!(
                        "flow cache slot names table slot {} which holds no flow; kept in \
                         userspace",
                        s.table_idx
                    );
                    agg.add(s.key, &c);
                }
            }
        }
        log::debug!("cache fold: epoch {old_epoch}: {read} keys read");
        Ok(())
    }
}

/// Cache slots (of every CPU) read per `BPF_MAP_LOOKUP_BATCH` call when
/// the drain folds the cache: the buffer holds 256 x 96 bytes per possible
/// CPU (48 KiB at 2 CPUs, 384 KiB at 16, 1.5 MiB at 64), where one call
/// for all 2,048 default slots would need 12 MiB at 64 CPUs; 8 calls a
/// drain at the default instead of one.
const CACHE_READ_SLOTS: u32 = 256;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: u8, sport: u16) -> FlowKey {
        FlowKey {
            ifindex: 3,
            proto,
            ip_version: 4,
            src_port: sport,
            dst_port: 80,
            ..Default::default()
        }
    }

    fn c(packets: u64, first: u64, last: u64, flags: u8) -> FlowCounters {
        FlowCounters {
            packets,
            bytes: packets * 100,
            first_seen_ns: first,
            last_seen_ns: last,
            tcp_flags: flags,
        }
    }

    const T: Timeouts = Timeouts {
        idle_ns: 15_000,
        active_ns: 60_000,
    };

    fn collect(out: &mut Vec<(FlowKey, FlowCounters)>) -> impl FnMut(&FlowKey, &FlowCounters) + '_ {
        |k, c| out.push((*k, *c))
    }

    #[test]
    fn pad_bytes_do_not_split_a_flow() {
        let mut agg = FlowAggregator::default();
        let mut k1 = key(17, 1000);
        k1._pad = [1, 2, 3];
        agg.add(key(17, 1000), &c(2, 10, 20, 0));
        agg.add(k1, &c(3, 30, 40, 0));
        assert_eq!(agg.len(), 1);
        let mut out = Vec::new();
        agg.expire(41, T, true, &mut collect(&mut out));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, c(5, 10, 40, 0));
        assert!(agg.is_empty());
    }

    #[test]
    fn idle_active_and_tcp_end_timeouts() {
        let mut agg = FlowAggregator::default();
        agg.add(key(17, 1), &c(1, 0, 1_000, 0)); // idle since 1_000
        agg.add(key(17, 2), &c(9, 0, 50_000, 0)); // active since 0
        agg.add(key(6, 3), &c(2, 40_000, 50_000, 0x11)); // FIN seen
        agg.add(key(6, 4), &c(2, 40_000, 50_000, 0x10)); // plain ACK
        let mut out = Vec::new();
        agg.expire(15_999, T, false, &mut collect(&mut out));
        assert_eq!(out.len(), 1, "{out:?}"); // idle 14_999 < 15_000: only FIN
        assert_eq!(out[0].0.src_port, 3);
        out.clear();
        agg.expire(16_000, T, false, &mut collect(&mut out));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.src_port, 1);
        out.clear();
        agg.expire(60_000, T, false, &mut collect(&mut out));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.src_port, 2);
        // The active flow's next packets start a new slice (a delta).
        agg.add(key(17, 2), &c(4, 60_500, 61_000, 0));
        out.clear();
        agg.expire(200_000, T, false, &mut collect(&mut out));
        let mut got: Vec<_> = out.iter().map(|(k, c)| (k.src_port, c.packets)).collect();
        got.sort();
        assert_eq!(got, vec![(2, 4), (4, 2)]);
    }

    /// The `PENDING` map, in memory.
    #[derive(Default)]
    struct MemStore(HashMap<u32, PendingExport>);

    impl PendingStore for MemStore {
        fn put(&mut self, entries: &[(u32, PendingExport)]) -> std::io::Result<()> {
            self.0.extend(entries.iter().copied());
            Ok(())
        }
        fn delete(&mut self, slots: &[u32]) -> std::io::Result<()> {
            for s in slots {
                self.0.remove(s);
            }
            Ok(())
        }
    }

    /// A table driven as the programs and the agent drive it: `gen` is the
    /// current generation (epoch & 1); `drain` flips it, scans and commits.
    struct Sim {
        d: TableDrain,
        epoch: u32,
        gen: u32,
        out: Vec<(FlowKey, FlowCounters)>,
        t: Timeouts,
        store: MemStore,
        /// Agents that "died": their table memory must outlive the sharer.
        graveyard: Vec<TableDrain>,
    }

    const MS: u64 = 1_000_000;

    impl Sim {
        /// A drain with these idle and active timeouts (ms).
        fn with_timeouts(idle_ms: u64, active_ms: u64) -> Sim {
            Sim::new(Timeouts {
                idle_ns: idle_ms * MS,
                active_ns: active_ms * MS,
            })
        }

        fn new(t: Timeouts) -> Sim {
            Sim {
                d: TableDrain::new(FlowTable::heap(1 << 12)),
                epoch: 0,
                gen: 0,
                out: Vec::new(),
                t,
                store: MemStore::default(),
                graveyard: Vec::new(),
            }
        }
        /// A packet of flow `sport` at `ms`, counted in the table.
        fn packet(&mut self, sport: u16, ms: u32, flags: u8) -> u32 {
            let k = key(if flags != 0 { 6 } else { 17 }, sport);
            let t = self.d.table();
            let new = t.find(&k).is_none();
            let i = t.insert(&k).unwrap();
            t.add(i, self.gen, 1, 100, ms, flags);
            // As the programs mark DIRTY: for a new flow, and for FIN/RST.
            if new || flags & (TCP_FIN | TCP_RST) != 0 {
                self.d.visit_soon(i);
            }
            i
        }
        /// A packet of UDP flow `sport` at `ms` counted by the replay
        /// program: a new flow's slot is reported, not marked.
        fn replayed(&mut self, sport: u16, ms: u32) -> u32 {
            let k = key(17, sport);
            let t = self.d.table();
            let new = t.find(&k).is_none();
            let i = t.insert(&k).unwrap();
            t.add(i, self.gen, 1, 100, ms, 0);
            if new {
                self.d.claims.push((i, ms));
            }
            i
        }
        /// A drain without its commit (as when the agent dies after it).
        fn scan_only(&mut self, ms: u64) -> ScanReport {
            let old = self.gen;
            self.epoch += 1;
            self.gen = self.epoch & 1;
            self.d.set_epoch(self.epoch);
            let (t, out) = (self.t, &mut self.out);
            self.d
                .scan(old, ms * MS, t, false, &mut |k, c| out.push((*k, *c)))
        }
        fn drain(&mut self, ms: u64) -> ScanReport {
            let r = self.scan_only(ms);
            self.d.commit(&mut self.store).unwrap();
            r
        }
        fn final_drain(&mut self, ms: u64) -> ScanReport {
            let (t, out) = (self.t, &mut self.out);
            let r = self
                .d
                .scan(self.gen, ms * MS, t, true, &mut |k, c| out.push((*k, *c)));
            self.d.commit(&mut self.store).unwrap();
            r
        }
        /// The agent dies (kill -9) and another adopts the table and the
        /// store: the table's memory is the same, the agent's is new.
        fn restart(&mut self) {
            let mut d = TableDrain::new(self.d.table().share());
            d.set_epoch(self.epoch);
            d.visit_all();
            let entries: Vec<_> = self.store.0.iter().map(|(k, v)| (*k, *v)).collect();
            let stale = d.adopt_pending(entries);
            self.store.delete(&stale).unwrap();
            let old = std::mem::replace(&mut self.d, d);
            // The old agent's memory goes; the table stays (owned by the
            // first FlowTable, kept alive here).
            self.graveyard.push(old);
        }
        fn exported(&self, sport: u16) -> Vec<(u64, u64, u64)> {
            self.out
                .iter()
                .filter(|(k, _)| k.src_port == sport)
                .map(|(_, c)| (c.packets, c.first_seen_ns / MS, c.last_seen_ns / MS))
                .collect()
        }
        fn total(&self, sport: u16) -> u64 {
            self.exported(sport).iter().map(|x| x.0).sum()
        }
    }

    #[test]
    fn idle_flow_is_exported_in_two_steps_then_its_slot_freed() {
        let mut s = Sim::with_timeouts(100, 10_000);
        let i = s.packet(1, 1_000, 0);
        s.packet(1, 1_010, 0);
        let r = s.drain(1_020);
        assert_eq!((r.live, r.exported, r.retired), (1, 0, 0));
        // Not idle yet at 1_100 (last packet at 1_010).
        s.drain(1_100);
        assert!(s.out.is_empty());
        assert_eq!(s.d.next_deadline_ns, 1_110 * MS);
        // Idle at 1_110: retired, old generation taken; a packet that a
        // program counted just before the retirement lands in the current
        // generation and is read at the next drain, with the rest.
        s.drain(1_110);
        assert_eq!(s.d.table().state(i), SLOT_RETIRING);
        // Nothing taken yet, so nothing kept for a next agent: the retired
        // slot holds every count until the next drain reads it whole.
        assert!(s.store.0.is_empty() && s.d.pending.is_empty());
        assert_eq!(s.d.table().peek(i, s.gen ^ 1).packets, 2);
        s.d.table().add(i, s.gen, 1, 100, 1_111, 0);
        let r = s.drain(1_200);
        assert_eq!((r.live, r.exported, r.retired), (0, 1, 1));
        assert_eq!(s.exported(1), vec![(3, 1_000, 1_111)]);
        assert_ne!(s.d.table().state(i), SLOT_RETIRING);
        assert!(s.d.marked.is_empty() && s.d.live == 0);
        // The flow comes back: a new slot, a new record.
        s.packet(1, 2_000, 0);
        s.final_drain(2_001);
        assert_eq!(s.exported(1), vec![(3, 1_000, 1_111), (1, 2_000, 2_000)]);
    }

    #[test]
    fn active_slices_are_exact_deltas_across_generations() {
        let mut s = Sim::with_timeouts(10_000, 300);
        let mut sent = 0;
        // One packet every 10 ms for 2 s, a drain every 50 ms.
        for ms in (0..2_000u32).step_by(10) {
            s.packet(7, 10_000 + ms, 0);
            sent += 1;
            if ms % 50 == 40 {
                s.drain(u64::from(10_000 + ms) + 5);
            }
        }
        s.final_drain(12_100);
        let slices = s.exported(7);
        assert_eq!(slices.iter().map(|x| x.0).sum::<u64>(), sent);
        assert!(slices.len() >= 5, "{slices:?}");
        // Slices do not overlap in time and each is at most one active
        // timeout plus two drain intervals long.
        for w in slices.windows(2) {
            assert!(w[0].2 < w[1].1, "{slices:?}");
        }
        for x in &slices[..slices.len() - 1] {
            assert!(x.2 - x.1 <= 400, "{slices:?}");
        }
    }

    #[test]
    fn tcp_fin_exports_at_the_next_drains() {
        let mut s = Sim::new(T);
        s.packet(9, 100, 0x02);
        let i = s.packet(9, 101, 0x11);
        s.drain(102); // FIN seen: the slot is retired, nothing taken
        assert!(s.out.is_empty());
        assert_eq!(s.d.table().state(i), SLOT_RETIRING);
        assert!(s.store.0.is_empty() && s.d.pending.is_empty());
        // A segment after that (the ACK of the other side's FIN) starts a
        // flow of its own.
        let j = s.packet(9, 102, 0x10);
        assert_ne!(i, j);
        s.drain(103);
        assert_eq!(s.out.len(), 1);
        assert_eq!(s.out[0].1.tcp_flags, 0x13);
        assert_eq!(s.out[0].1.packets, 2);
        s.final_drain(104);
        assert_eq!(s.exported(9).len(), 2);
        assert_eq!((s.out[1].1.packets, s.out[1].1.tcp_flags), (1, 0x10));
    }

    #[test]
    fn nothing_due_means_the_next_drain_may_be_skipped() {
        let mut s = Sim::with_timeouts(100, 1_000);
        s.packet(1, 500, 0);
        assert_eq!(s.drain(510).regions_visited, 1);
        // Before its deadline, a drain reads no region at all.
        assert_eq!(s.drain(520).regions_visited, 0);
        // Due at 600 (idle); until then a quiet drain may be skipped.
        assert!(s.d.idle_until(599 * MS));
        assert!(!s.d.idle_until(600 * MS));
        s.drain(600);
        // Retiring: the next drain must run.
        assert!(!s.d.idle_until(601 * MS));
        s.drain(601);
        assert_eq!(s.exported(1), vec![(1, 500, 500)]);
        assert!(s.d.idle_until(u64::MAX - 1));
    }

    /// kill -9 at every point of a drain: before, between the scan and the
    /// commit, after. Every packet is exported at least once; a record is
    /// exported twice at most when the agent died after the scan and before
    /// its commit.
    #[test]
    fn an_agent_killed_anywhere_loses_nothing() {
        for die_after_scan in [false, true] {
            let mut s = Sim::with_timeouts(100, 300);
            let mut sent = [0u64; 3];
            let mut ms = 1_000u32;
            // Three flows: steady (active exports), one going idle, one
            // ending with FIN; a drain every 50 ms, a crash at the 6th.
            for step in 0..40 {
                for f in 0..3u16 {
                    let quiet = f == 1 && (10..30).contains(&step);
                    if !quiet {
                        let flags = if f == 2 && step == 12 {
                            0x11
                        } else if f == 2 {
                            0x10
                        } else {
                            0
                        };
                        s.packet(f, ms, flags);
                        sent[f as usize] += 1;
                    }
                }
                ms += 10;
                if step % 5 == 4 {
                    if step == 24 {
                        if die_after_scan {
                            s.scan_only(u64::from(ms));
                        }
                        s.restart();
                    } else {
                        s.drain(u64::from(ms));
                    }
                }
            }
            s.final_drain(u64::from(ms) + 1);
            for f in 0..3u16 {
                let got = s.total(f);
                assert!(
                    got >= sent[f as usize],
                    "flow {f}: {got} < {}",
                    sent[f as usize]
                );
                if !die_after_scan {
                    assert_eq!(got, sent[f as usize], "flow {f}: {:?}", s.exported(f));
                }
            }
            assert!(s.store.0.is_empty(), "{:?}", s.store.0);
        }
    }

    #[test]
    fn adopt_pending_tells_started_from_unfinished_exports() {
        // An active timeout of 1 ms: the next drain starts an export.
        let mut s = Sim::with_timeouts(15_000, 1);
        let i = s.packet(6, 100, 0);
        // The drain reads the flow's old generation (export started)...
        s.scan_only(101);
        let e = s.d.started[0].1;
        // ...and dies before its commit: the store is empty, the table
        // still holds the counts. Had it stored them and died before
        // clearing, the entry matches the table and is dropped.
        s.store.put(&[(i, e)]).unwrap();
        s.restart();
        assert!(s.store.0.is_empty());
        s.drain(102);
        s.drain(103);
        assert_eq!(s.total(6), 1);
        assert!(s.store.0.is_empty());
    }

    /// A region marked for a neighbour's sake (a new flow, an ended one)
    /// does not look again at the flows already in the wheel; a flow whose
    /// TCP connection ended is looked at, and retired, at once.
    #[test]
    fn marked_regions_look_only_at_new_and_ended_flows() {
        let mut s = Sim::with_timeouts(1_000, 10_000);
        let a = s.packet(1, 100, 0x02);
        let r = s.drain(101);
        assert_eq!((r.regions_visited, r.examined), (1, 1));
        // Another packet of it, and its region marked as for a new flow.
        s.packet(1, 150, 0x10);
        s.d.visit_soon(a);
        let r = s.drain(200);
        assert_eq!((r.regions_visited, r.examined, r.exported), (1, 0, 0));
        // Its FIN: retired at this drain, read whole at the next.
        s.packet(1, 250, 0x11);
        let r = s.drain(300);
        assert_eq!((r.regions_visited, r.examined, r.exported), (1, 1, 0));
        let r = s.drain(301);
        assert_eq!((r.retired, r.exported, r.live), (1, 1, 0));
        assert_eq!(s.total(1), 3);
    }

    /// Flows the replay program reports wait in the wheel: no region is
    /// read for them, each is looked at when it can be due, and exported
    /// exactly on its timeout.
    #[test]
    fn replayed_flows_are_looked_at_only_when_due() {
        let mut s = Sim::with_timeouts(1_000, 5_000);
        // 1,000 new flows over 1 s, a packet each; flow 0 then stays busy.
        for f in 0..1_000u16 {
            s.replayed(f, 10_000 + u32::from(f));
        }
        let r = s.drain(10_999);
        assert_eq!((r.live, r.regions_visited, r.examined), (1_000, 0, 0));
        for ms in (11_000..13_000).step_by(100) {
            s.replayed(0, ms);
        }
        // At 11,500 ms, the flows of up to 10,500 ms are idle (each seen
        // once, as due) and retired; the others are not looked at.
        let r = s.drain(11_500);
        assert_eq!((r.regions_visited, r.exported), (0, 0));
        assert!((501..=550).contains(&r.examined), "{r:?}");
        // Read whole and freed at the next drain, with those idle since.
        let r = s.drain(12_000);
        assert_eq!(r.regions_visited, 0);
        assert_eq!(r.retired, 500);
        let r = s.drain(12_600);
        assert_eq!((r.retired, r.live), (499, 1));
        for f in 1..1_000u16 {
            assert_eq!(
                s.exported(f),
                vec![(1, 10_000 + u64::from(f), 10_000 + u64::from(f))]
            );
        }
        // Flow 0: one slice, then idle.
        let r = s.drain(14_000);
        assert_eq!(r.live, 1);
        s.drain(14_100);
        assert_eq!(s.total(0), 21);
        assert_eq!(s.d.live, 0);
        assert!(s.d.idle_until(u64::MAX - 1));
    }

    /// An agent that dies after the replay program claimed slots (the
    /// claims die with it): the next one finds the flows in its first
    /// reading of every region, and nothing is lost.
    #[test]
    fn replayed_flows_outlive_a_killed_agent() {
        let mut s = Sim::with_timeouts(100, 1_000);
        for f in 0..50u16 {
            s.replayed(f, 1_000);
        }
        s.drain(1_010);
        for f in 50..100u16 {
            s.replayed(f, 1_020);
        }
        s.restart();
        s.drain(1_030);
        assert_eq!(s.d.live, 100);
        s.drain(1_200);
        s.drain(1_300);
        for f in 0..100u16 {
            assert_eq!(s.total(f), 1, "flow {f}");
        }
        assert_eq!(s.d.live, 0);
    }

    #[test]
    fn fold_into_a_freed_slot_is_refused() {
        let mut s = Sim::new(T);
        let c = c(1, 1, 1, 0);
        assert!(!s.d.fold(5, 0, &c));
        assert!(!s.d.fold(1 << 20, 0, &c));
    }
}
