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
//!    (see `TableDrain`). Per flow, it decides from the old generation
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
//!    (see `TableDrain::commit`). Every packet is in exactly one export:
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
//! (`capture::replay`). A record is counted once, in one generation, so the
//! scheme above holds for it; while the ring is full the programs count in
//! the table directly.
//!
//! A drain with nothing to do is skipped: no packet since the last one (the
//! programs set a flag word), no export in progress and no timeout due.
//!
//! Records leave in batches through a callback, never as one vector of
//! every due flow.

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
    MAP_STATS, MAP_TABLE, MISS_RING_BYTES, PROG_REPLAY, STAT_FALLBACK_CONTENDED,
    STAT_FALLBACK_PACKETS, STAT_FILTERED_EGRESS, STAT_FILTERED_INGRESS, STAT_LEN,
    STAT_MALFORMED_EGRESS, STAT_MALFORMED_INGRESS, STAT_NON_IP_EGRESS, STAT_NON_IP_INGRESS,
    STAT_OVERFLOW_BYTES_EGRESS, STAT_OVERFLOW_BYTES_INGRESS, STAT_OVERFLOW_PACKETS_EGRESS,
    STAT_OVERFLOW_PACKETS_INGRESS, STAT_TABLE_BYTES_EGRESS, STAT_TABLE_BYTES_INGRESS,
    STAT_TABLE_PACKETS_EGRESS, STAT_TABLE_PACKETS_INGRESS,
};

use super::bpf_sys::{lookup_batch, GracePeriod, SharedMap};
use super::clock::{ClockMap, ClockTicker};
use super::replay::{MissRing, Replay};
use super::table::{dirty_words, table_bytes, FlowTable};
use crate::capture::aggregator::{FlowAggregator, Timeouts};
use crate::capture::flow::FlowCounters;
use crate::timeconv::monotonic_ns;

mod table_drain;
pub(crate) use table_drain::Claim;
use table_drain::{PendingStore, TableDrain};

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

/// Where a drain hands each exported flow (key, counts since its last
/// export); the agent batches them into records for the sinks.
pub type Export<'a> = dyn FnMut(&FlowKey, &FlowCounters) + 'a;

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

/// The pinned `PENDING` map as a `PendingStore`.
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
    /// `TableDrain::commit`.
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
    /// `capture::replay`): how many. The agent calls it between drains
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
