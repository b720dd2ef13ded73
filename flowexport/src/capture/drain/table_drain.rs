//! [`TableDrain`]: which of the table's flows are due, and their exports in
//! two steps, kept in `PENDING` in between (steps 4 and 5 of the scheme in
//! [`super`]).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use flowexport_common::{PendingExport, SLOT_BUSY, SLOT_RETIRING, SLOT_VALID, TABLE_REGION_SHIFT};

use super::Export;
use crate::capture::aggregator::{Timeouts, IPPROTO_TCP, TCP_FIN, TCP_RST};
use crate::capture::flow::FlowCounters;
use crate::capture::table::{prefetch, restore_ms, FlowTable, Regions};

/// The table side of a drain, apart from the kernel handles so that it can
/// be tested on a table of our own.
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
pub(super) struct TableDrain {
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
    pub(super) claims: Vec<Claim>,
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
/// `PENDING` map ([`PendingMap`](super::PendingMap)), or memory in tests.
pub(super) trait PendingStore {
    fn put(&mut self, entries: &[(u32, PendingExport)]) -> std::io::Result<()>;
    fn delete(&mut self, slots: &[u32]) -> std::io::Result<()>;
}

/// What one scan of the table did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ScanReport {
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
    pub(super) fn new(table: FlowTable) -> TableDrain {
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
    pub(super) fn commit(&mut self, store: &mut dyn PendingStore) -> std::io::Result<()> {
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

    pub(super) fn table(&self) -> &FlowTable {
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
    pub(super) fn fold(&mut self, idx: u32, gen: u32, c: &FlowCounters) -> bool {
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
    pub(super) fn scan(
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

#[cfg(test)]
mod tests {
    use super::*;
    use flowexport_common::FlowKey;

    use crate::capture::aggregator::tests::{c, key, T};

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
