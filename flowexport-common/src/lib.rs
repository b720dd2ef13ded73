//! `#[repr(C)]` types shared by flowexport's kernel programs (`flowexport-ebpf`)
//! and its userspace (`flowexport`). Both sides must agree byte for byte, so
//! every struct here has explicit padding fields that the kernel zeroes: the
//! flow key is hashed and compared as raw words, and a stray padding byte
//! would split one flow into several.
//!
//! The flow table's layout, hash and probing rules live here too, so the
//! kernel (which inserts) and userspace (which drains and retires) cannot
//! drift apart; `flowexport/src/capture/table.rs` explains the scheme.
#![cfg_attr(not(test), no_std)]

pub mod parse;

/// Direction of a packet relative to the interface it was seen on.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// One flow's key: the 5-tuple plus where and how the packet was seen.
///
/// * Addresses: IPv4 in the first 4 bytes (rest zero), IPv6 in all 16.
/// * For ICMP/ICMPv6, `src_port` is 0 and `dst_port` is `type << 8 | code`,
///   as NetFlow encodes them; userspace splits them back into
///   `icmp_type`/`icmp_code`.
/// * Non-first IPv4/IPv6 fragments carry no L4 header: their ports are 0.
/// * `_pad` is always zero in a packet's key. In a [`TableSlot`]'s copy, the
///   last word (`proto` and `_pad`) is the slot's control word (see
///   [`slot_word`]).
///
/// 8-aligned (the layout is the same as with `#[repr(C)]` alone: 48 bytes,
/// every field at its offset): the kernel programs read a key as six u64
/// words ([`FlowKey::words64`]), which BPF loads only when the address is
/// known to be aligned; an unaligned read is split into 48 byte loads.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub ifindex: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub vlan_id: u16,
    pub direction: u8,
    pub ip_version: u8,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The key as six u64 words (aligned loads: see the type's docs).
    #[inline(always)]
    pub fn words64(&self) -> &[u64; 6] {
        // SAFETY: FlowKey is #[repr(C, align(8))], 48 bytes of plain
        // integers with no implicit padding: six aligned u64 words.
        unsafe { &*(self as *const FlowKey as *const [u64; 6]) }
    }
}

const _: () = assert!(size_of::<FlowKey>() == 48 && align_of::<FlowKey>() == 8);

/// Per-CPU counters of one flow in one flow-cache slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub packets: u64,
    /// IP-layer bytes: IPv4 total length, IPv6 payload length + 40.
    pub bytes: u64,
    /// CLOCK_MONOTONIC ns of the first and last packet.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// OR of the TCP flags byte (FIN=0x01 … CWR=0x80) of every packet.
    pub tcp_flags: u8,
    pub _pad: [u8; 7],
}

impl FlowValue {
    /// A flow's first counters: `packets` packets (one packet, or one GSO
    /// super-packet's segments) of `bytes`, seen at `now`.
    #[inline(always)]
    pub const fn first(packets: u64, bytes: u64, now: u64, tcp_flags: u8) -> FlowValue {
        FlowValue {
            packets,
            bytes,
            first_seen_ns: now,
            last_seen_ns: now,
            tcp_flags,
            _pad: [0; 7],
        }
    }
}

/// A packet of a flow the table could not take (no free slot within the
/// probe limit, or the insert lock stayed busy): sent to userspace through
/// the fallback ring buffer with its full key, so it still counts exactly,
/// in its own flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FallbackEvent {
    pub key: FlowKey,
    pub packets: u64,
    pub bytes: u64,
    pub ts_ns: u64,
    pub tcp_flags: u8,
    pub _pad: [u8; 7],
}

/// One slot of the per-CPU flow cache (`CACHE`) in front of the flow table:
/// a flow's key and counters, valid while `epoch` is the current drain epoch
/// and `value.packets` is not 0. `table_idx` is the flow's slot in the
/// shared table, where the drain folds these counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CacheSlot {
    pub key: FlowKey,
    pub value: FlowValue,
    pub epoch: u32,
    pub table_idx: u32,
}

/// One slot of the shared flow table (`TABLE`, a BPF_F_MMAPABLE array that
/// userspace reads and writes through a shared mapping). 96 bytes: the key
/// and the times share the first 64, the counters the next 32.
///
/// Two generations of counters (index = drain epoch & 1): the programs add
/// to the current one with atomic instructions, userspace reads (and
/// clears) the other once no program can still write it.
///
/// Times are CLOCK_MONOTONIC in milliseconds, truncated to 32 bits
/// (userspace restores the high bits: every time it reads is less than
/// 49 days old). `last_ms` survives an export: it dates the flow's last
/// packet for the idle timeout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TableSlot {
    /// The flow's key; its last word is the control word ([`slot_word`]).
    pub key: FlowKey,
    pub first_ms: [u32; 2],
    pub last_ms: [u32; 2],
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

/// Byte offset of a slot's control word: the key's last word, `proto` in its
/// low byte, then the state ([`SLOT_EMPTY`] ...), then the TCP flags of
/// generation 0 and of generation 1.
pub const SLOT_WORD_OFFSET: usize = 44;
/// Index of the control word among the key's twelve 32-bit words.
pub const SLOT_WORD_INDEX: usize = 11;

/// Slot states (bits 8..16 of the control word).
/// Never used, or freed with nothing after it in its probe run: a lookup
/// stops here.
pub const SLOT_EMPTY: u32 = 0;
/// Being filled by the program that claimed it (under the insert lock).
pub const SLOT_BUSY: u32 = 1;
/// Holds a flow; programs count into it.
pub const SLOT_VALID: u32 = 2;
/// Idle; userspace reads it one last time at the next drain. Programs skip
/// it (a new packet of the flow claims another slot).
pub const SLOT_RETIRING: u32 = 3;
/// Freed; lookups go on past it, inserts may reuse it.
pub const SLOT_TOMB: u32 = 4;

/// The control word of a slot holding `proto` in `state`, no TCP flags.
#[inline(always)]
pub const fn slot_word(proto: u8, state: u32) -> u32 {
    proto as u32 | state << 8
}

/// The state in a control word.
#[inline(always)]
pub const fn slot_state(word: u32) -> u32 {
    (word >> 8) & 0xff
}

/// The TCP flags of generation `gen` in a control word.
#[inline(always)]
pub const fn slot_tcp_flags(word: u32, gen: u32) -> u8 {
    (word >> (16 + 8 * (gen & 1))) as u8
}

/// Verifier bound and table invariant: a flow lives at most this many slots
/// after its home slot (linear probing), so a lookup reads at most this many
/// slots. At the default load (at most half the slots in use) the longest
/// run measured over 1M random keys was 38 slots.
pub const TABLE_MAX_PROBES: u32 = 64;
/// The smallest table (slots), so a probe run never wraps onto itself.
pub const TABLE_MIN_SLOTS: u32 = TABLE_MAX_PROBES;
/// Insert locks: a new flow is inserted holding lock
/// `(hash >> 40) % TABLE_LOCKS`, so two CPUs inserting the same new flow
/// serialize and the second finds the first's slot. 16 KiB.
pub const TABLE_LOCKS: u32 = 4096;
/// Verifier bound: how many times a program reads a busy insert lock before
/// giving up (the packet then takes the fallback ring). A holder runs for
/// well under a microsecond, without being preempted (XDP and TC run with
/// bottom halves off); reads of a line another CPU holds cost ~1-2 ns.
pub const TABLE_LOCK_SPINS: u32 = 256;
/// Slots per bit of `DIRTY`: an attached program that fills a slot sets its
/// region's bit (as it does for a TCP FIN/RST), so a drain finds new flows
/// without scanning the whole table. (The replay program returns the slots
/// it fills instead: `REPLAY_CLAIM_OFFSET`.)
pub const TABLE_REGION_SHIFT: u32 = 6;
/// Default table capacity in concurrent flows (`--max-flows`); the table
/// has twice as many slots, so probe runs stay short.
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 20;

/// The table hash of a key: the first 44 bytes (the control word is not
/// part of the key) and `proto`, each 64-bit word times its own odd
/// constant, summed, then MurmurHash3's 64-bit finalizer. The products are
/// independent (the CPU overlaps them); the finalizer spreads keys that
/// differ only in a few high bits (sequential addresses) over every bit.
/// The home slot is the low bits; the insert lock the bits from 40; the
/// kernel's per-CPU cache index the bits from 32 (one hash per packet).
#[inline(always)]
pub fn table_hash(k: &FlowKey) -> u64 {
    let w = k.words64();
    // Word 5: vlan_id, direction, ip_version, proto (bytes 40..45); the
    // control-word bytes 45..48 are masked out.
    let h = w[0]
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(w[1].wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
        .wrapping_add(w[2].wrapping_mul(0x1656_67b1_9e37_79f9))
        .wrapping_add(w[3].wrapping_mul(0x85eb_ca77_c2b2_ae63))
        .wrapping_add(w[4].wrapping_mul(0x27d4_eb2f_1656_67c5))
        .wrapping_add((w[5] & 0xff_ffff_ffff).wrapping_mul(0xd6e8_feb8_6659_fd93));
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The `CLOCK` map's one value, shared with the agent through a mapping.
/// The agent advances `ns` and `ms` while traffic flows and sets both to 0
/// when it has been quiet (then the programs call the kernel clock); the
/// programs set `active` to [`CLOCK_ACTIVE_ALL`] whenever it is not, which
/// tells the clock and the drain that packets came.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClockWord {
    pub ns: u64,
    pub ms: u64,
    pub active: u32,
    pub _pad: u32,
}

/// `ClockWord::active` bits: one for the clock thread, one for the drain;
/// each clears its own bit and reads it back later.
pub const CLOCK_ACTIVE_TICKER: u32 = 1;
pub const CLOCK_ACTIVE_DRAIN: u32 = 2;
pub const CLOCK_ACTIVE_ALL: u32 = CLOCK_ACTIVE_TICKER | CLOCK_ACTIVE_DRAIN;

/// Index of the drain epoch in the `CONTROL` array map. Userspace adds 1 at
/// every drain; its lowest bit is the generation of the table's counters
/// and the half of `CACHE` in use. The programs read only this entry.
pub const CONTROL_EPOCH: u32 = 0;
/// The rest of `CONTROL` describes the pinned state for the next agent
/// (`--pin-dir`): the layout version of the maps, their sizes, and the PID
/// of the agent that holds them.
pub const CONTROL_LAYOUT: u32 = 1;
pub const CONTROL_SLOTS: u32 = 2;
pub const CONTROL_CACHE_SLOTS: u32 = 3;
pub const CONTROL_RING_BYTES: u32 = 4;
pub const CONTROL_OWNER_PID: u32 = 5;
/// The last epoch whose half of `CACHE` the drain folded into the table: an
/// agent killed between a flip and its fold leaves the previous epoch's
/// cache counts to the next agent (programs of a later epoch would take
/// those slots over).
pub const CONTROL_FOLDED: u32 = 6;
/// 8 words from here: the overflow counters (`STATS`) as far as agents have
/// read them into flow records, as 4 little-endian u64s (packets, bytes of
/// ingress, then of egress). The next agent continues from these, so that
/// no overflow packet is read twice or skipped across restarts.
pub const CONTROL_OVERFLOW_READ: u32 = 8;
pub const CONTROL_LEN: u32 = 16;

/// The version of the maps' layout (every `#[repr(C)]` type and map here):
/// an agent adopts pinned maps only of its own version. Bump it with any
/// change a previous agent's maps could not be read with.
/// 1: the first pinned layout; 2: `CONTROL` grew to 16 words
/// (`CONTROL_OVERFLOW_READ`); 3: `STATS` grew to 16 counters (filtered
/// packets); 4: `MISSES` and `REPLAYED` (packets that miss their cache slot
/// are counted in the table by the agent).
pub const LAYOUT_VERSION: u32 = 4;

/// An export in progress, kept in the `PENDING` map (userspace only) so that
/// it survives the agent: the counts its first step took out of the table,
/// which generation and at which drain epoch (see
/// `flowexport/src/capture/drain/`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingExport {
    pub packets: u64,
    pub bytes: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub epoch: u32,
    pub tcp_flags: u8,
    pub gen: u8,
    pub _pad: [u8; 2],
}
/// The kernel object's globals, set by the loader before verification:
/// cache slots per half of `CACHE` (a power of two; 0 = no cache), table
/// slots minus one (a power of two minus one), and the probe limit
/// (`min(TABLE_MAX_PROBES, slots)`).
pub const GLOBAL_CACHE_SLOTS: &str = "CACHE_SLOTS";
pub const GLOBAL_TABLE_MASK: &str = "TABLE_MASK";
/// 1-in-N sampling (`--sampling`; 0 and 1: every packet).
pub const GLOBAL_SAMPLING: &str = "SAMPLING";
/// The filter rules (`--filter`), a [`FilterSet`].
pub const GLOBAL_FILTER: &str = "FILTER";
/// `--mirror` (a u8, 0 or 1): the interface carries copies of someone
/// else's traffic; ingress programs drop what they counted.
pub const GLOBAL_MIRROR: &str = "MIRROR";

/// Most filter rules: each is one bit of the u32 masks below.
pub const FILTER_MAX_RULES: usize = 32;

/// The filter rules (`--filter`) as the kernel evaluates them, without a
/// loop over rules: every table gives, as a bit mask, the rules a packet's
/// field can satisfy; their AND is the set of matching rules, and the
/// lowest bit the first of them (which decides). A read-only global of
/// the kernel object (1,076 bytes, whatever the CPU count).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterSet {
    /// Rules in use (0: no filtering; the programs skip it entirely).
    pub count: u32,
    /// The rules whose action is accept.
    pub accept: u32,
    /// 1 when a packet no rule matches is rejected (some rule accepts).
    pub default_reject: u32,
    /// Rules with any CIDR key: only when one of them is still a
    /// candidate are the `FILTER_V4`/`FILTER_V6` tries looked up.
    pub cidr_rules: u32,
    /// Rules without a `cidr` / `src-cidr` / `dst-cidr` key.
    pub no_cidr: u32,
    pub no_src_cidr: u32,
    pub no_dst_cidr: u32,
    /// Rules without a `port` / `src-port` / `dst-port` key.
    pub no_port: u32,
    pub no_src_port: u32,
    pub no_dst_port: u32,
    /// Rules with any port key: they match only TCP, UDP, UDP-Lite and
    /// SCTP packets; only when one of them is still a candidate is
    /// `FILTER_PORTS` looked up.
    pub port_rules: u32,
    /// By direction (`DIR_INGRESS`, `DIR_EGRESS`): the rules that allow it.
    pub direction: [u32; 2],
    /// By IP protocol number: the rules that allow it.
    pub proto: [u32; 256],
}

impl FilterSet {
    /// No rules (the kernel object's initial value).
    pub const EMPTY: FilterSet = FilterSet {
        count: 0,
        accept: 0,
        default_reject: 0,
        cidr_rules: 0,
        no_cidr: 0,
        no_src_cidr: 0,
        no_dst_cidr: 0,
        no_port: 0,
        no_src_port: 0,
        no_dst_port: 0,
        port_rules: 0,
        direction: [0; 2],
        proto: [0; 256],
    };
}

impl Default for FilterSet {
    fn default() -> Self {
        FilterSet::EMPTY
    }
}

/// A value of the filter's look-up tables: bit i is set when rule i's
/// `cidr` / `src-cidr` / `dst-cidr` contains the trie entry's prefix, or
/// when rule i's `port` / `src-port` / `dst-port` is the `FILTER_PORTS`
/// entry's port. The longest prefix that matches an address therefore
/// gives exactly the rules whose CIDRs contain the address (each such CIDR
/// contains that prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FilterMasks {
    pub either: u32,
    pub src: u32,
    pub dst: u32,
}
/// Default cache slots per half up to 32 CPUs (per CPU: 2 x 2048 x 96
/// bytes = 384 KiB, and 4-byte tags); with more CPUs the default shrinks so
/// that all CPUs' caches stay within [`CACHE_BUDGET_BYTES`]
/// (`default_cache_slots`).
pub const DEFAULT_CACHE_SLOTS: u32 = 2048;

/// What the default cache may cost, all CPUs together: 32 CPUs' worth of
/// [`DEFAULT_CACHE_SLOTS`] (2 x 2048 slots of 100 bytes each), 12.5 MiB.
pub const CACHE_BUDGET_BYTES: u64 = 32 * 2 * 2048 * 100;

/// The default `--cache-slots` for `cpus` possible CPUs: 2048 up to 32
/// CPUs, then the largest power of two that keeps every CPU's cache within
/// [`CACHE_BUDGET_BYTES`] (1024 at 64 CPUs, 512 at 128), at least 128.
/// Kernel memory then grows with flows, not with CPUs.
pub const fn default_cache_slots(cpus: u32) -> u32 {
    let cpus = if cpus == 0 { 1 } else { cpus as u64 };
    let fit = CACHE_BUDGET_BYTES / (2 * 100 * cpus);
    let mut slots = DEFAULT_CACHE_SLOTS;
    while slots > 128 && slots as u64 > fit {
        slots /= 2;
    }
    slots
}

/// Indices into the per-CPU `STATS` array. Counters only grow; userspace
/// sums the CPUs and takes differences between reads.
pub const STAT_NON_IP_INGRESS: u32 = 0;
pub const STAT_NON_IP_EGRESS: u32 = 1;
/// Packets whose IP header was cut short (not counted in any flow).
pub const STAT_MALFORMED_INGRESS: u32 = 2;
pub const STAT_MALFORMED_EGRESS: u32 = 3;
/// Packets that found no table slot and went to the fallback ring (or, if
/// that was full, to the overflow counters).
pub const STAT_FALLBACK_PACKETS: u32 = 4;
/// Packets (and their bytes) that found both the table and the ring full;
/// userspace exports them as one overflow record per direction.
pub const STAT_OVERFLOW_PACKETS_INGRESS: u32 = 5;
pub const STAT_OVERFLOW_BYTES_INGRESS: u32 = 6;
pub const STAT_OVERFLOW_PACKETS_EGRESS: u32 = 7;
pub const STAT_OVERFLOW_BYTES_EGRESS: u32 = 8;
/// Packets and bytes counted straight into the table (not through the
/// cache, whose counts the drain folds in), for the traffic metrics.
pub const STAT_TABLE_PACKETS_INGRESS: u32 = 9;
pub const STAT_TABLE_BYTES_INGRESS: u32 = 10;
pub const STAT_TABLE_PACKETS_EGRESS: u32 = 11;
pub const STAT_TABLE_BYTES_EGRESS: u32 = 12;
/// Of `STAT_FALLBACK_PACKETS`: packets whose insert found the lock busy for
/// the whole spin (not a full table).
pub const STAT_FALLBACK_CONTENDED: u32 = 13;
/// Packets a filter rule (`--filter`) rejected: they form no flow.
pub const STAT_FILTERED_INGRESS: u32 = 14;
pub const STAT_FILTERED_EGRESS: u32 = 15;
pub const STAT_LEN: u32 = 16;

/// Map and program names, shared so the loader cannot drift from the object.
pub const MAP_TABLE: &str = "TABLE";
pub const MAP_LOCKS: &str = "LOCKS";
pub const MAP_DIRTY: &str = "DIRTY";
pub const MAP_CONTROL: &str = "CONTROL";
pub const MAP_STATS: &str = "STATS";
pub const MAP_FALLBACK: &str = "FALLBACK";
pub const MAP_CACHE: &str = "CACHE";
/// One tag per `CACHE` slot and CPU (not pinned: a hint, see the kernel
/// object's `CACHE_TAGS`).
pub const MAP_CACHE_TAGS: &str = "CACHE_TAGS";
pub const MAP_CLOCK: &str = "CLOCK";
pub const MAP_PENDING: &str = "PENDING";
/// Packets that missed their cache slot, for the agent to count in the
/// table (a ring buffer of `MISS_RING_BYTES`), and the ring position after
/// the last record it counted.
pub const MAP_MISSES: &str = "MISSES";
pub const MAP_REPLAYED: &str = "REPLAYED";
pub const MISS_RING_BYTES: u32 = 16 << 20;
/// The program that counts `MISSES` records in the table, run by the agent
/// with BPF_PROG_TEST_RUN (never attached); a batch is its frame: the ring
/// position after it (8 bytes), then up to `REPLAY_BATCH` 80-byte
/// `FallbackEvent`s, as many as a linear XDP test-run frame holds (3,520
/// bytes: a 4 KiB page less the 256-byte XDP headroom and the 320-byte
/// skb_shared_info).
pub const PROG_REPLAY: &str = "flowexport_replay";
pub const REPLAY_BATCH: usize = 43;
/// Where, in each record of a replayed frame, the program leaves the slot
/// it claimed for a new flow, plus 1 (a `u32`; 0: none): the last four
/// bytes of `FallbackEvent::_pad`, which the ring's records carry as 0.
pub const REPLAY_CLAIM_OFFSET: usize = 76;
/// Filter look-up tables (not pinned: each agent loads its own rules).
pub const MAP_FILTER_V4: &str = "FILTER_V4";
pub const MAP_FILTER_V6: &str = "FILTER_V6";
pub const MAP_FILTER_PORTS: &str = "FILTER_PORTS";
/// Prefixes per filter trie: three CIDRs per rule.
pub const FILTER_TRIE_ENTRIES: u32 = 3 * FILTER_MAX_RULES as u32;
/// Every map of the object, as pinned under `--pin-dir`.
pub const MAPS: [&str; 11] = [
    MAP_TABLE,
    MAP_LOCKS,
    MAP_DIRTY,
    MAP_CONTROL,
    MAP_STATS,
    MAP_FALLBACK,
    MAP_CACHE,
    MAP_CLOCK,
    MAP_PENDING,
    MAP_MISSES,
    MAP_REPLAYED,
];
/// AF_XDP (`--capture afxdp`): the sockets by slot, each interface's first
/// slot, and the frames no socket took (not pinned: the sockets live and
/// die with the agent).
pub const MAP_XSKS: &str = "XSKS";
pub const MAP_XSK_SLOTS: &str = "XSK_SLOTS";
pub const MAP_XSK_MISSED: &str = "XSK_MISSED";
/// Interfaces and RX queues per interface `--capture afxdp` serves: an
/// interface's queue q goes to socket slot `XSK_SLOTS[ifindex] + q`.
pub const XSK_MAX_IFACES: u32 = 16;
pub const XSK_MAX_QUEUES: u32 = 64;
pub const XSK_MAX_SOCKETS: u32 = XSK_MAX_IFACES * XSK_MAX_QUEUES;
/// The XDP ingress program (multi-buffer aware: Linux 5.18+).
pub const PROG_INGRESS: &str = "flowexport_ingress";
/// The same program for kernels without multi-buffer XDP.
pub const PROG_INGRESS_LINEAR: &str = "flowexport_ingress_linear";
pub const PROG_EGRESS: &str = "flowexport_egress";
/// The TC program that counts ingress with `--capture tc`.
pub const PROG_INGRESS_TC: &str = "flowexport_ingress_tc";
/// The XDP program of `--capture afxdp`: every frame to its queue's socket.
pub const PROG_XSK: &str = "flowexport_xsk";
/// The same program for kernels without multi-buffer XDP.
pub const PROG_XSK_LINEAR: &str = "flowexport_xsk_linear";
/// An XDP program that only returns XDP_PASS: the baseline of `cargo xtask bench xdp`.
pub const PROG_BENCH_PASS: &str = "flowexport_bench_pass";
/// A TC program that only returns TC_ACT_UNSPEC: the baseline of the TC
/// (egress, `--capture tc`) table of `cargo xtask bench xdp`.
pub const PROG_BENCH_TC_PASS: &str = "flowexport_bench_tc_pass";
/// The egress program with every header read through bpf_skb_load_bytes:
/// the comparison in the TC table of `cargo xtask bench xdp`.
pub const PROG_BENCH_TC_HELPER: &str = "flowexport_bench_tc_helper";
/// Cost-breakdown programs of `cargo xtask bench xdp`: the parser alone, and
/// the parser plus the clock and generation reads.
pub const PROG_BENCH_PARSE: &str = "flowexport_bench_parse";
pub const PROG_BENCH_PARSE_CLOCK: &str = "flowexport_bench_parse_clock";
/// The miss-path program of `cargo xtask bench xdp`: the ingress program's
/// flow update for a different flow on every run of one
/// BPF_PROG_TEST_RUN call, and its map (next flow, flow count).
pub const PROG_BENCH_ROTATE: &str = "flowexport_bench_rotate";
pub const MAP_BENCH_ROTATE: &str = "BENCH_ROTATE";
/// The same with the table path instead of the `MISSES` ring, for
/// `flowexport-bench xdp --ring`'s comparison (the bench feature).
pub const PROG_BENCH_TABLE: &str = "flowexport_bench_table";
/// Flows per source address in `cargo xtask bench xdp`: the i-th flow has
/// source port 1024 + i % `BENCH_PORTS` and its source address's last byte
/// raised by i / `BENCH_PORTS`.
pub const BENCH_PORTS: u32 = 60_000;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are #[repr(C)], contain only integers and byte
    // arrays, and have no implicit padding (explicit `_pad` fields).
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FallbackEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CacheSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TableSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClockWord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingExport {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FilterSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FilterMasks {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 48);
        assert_eq!(size_of::<FlowValue>(), 40);
        assert_eq!(size_of::<FallbackEvent>(), 48 + 32);
        assert_eq!(size_of::<CacheSlot>(), 96);
        assert_eq!(size_of::<TableSlot>(), 96);
        assert_eq!(size_of::<ClockWord>(), 24);
        assert_eq!(size_of::<PendingExport>(), 40);
        assert_eq!(size_of::<FilterSet>(), 1076);
        assert_eq!(size_of::<FilterMasks>(), 12);
        assert_eq!(offset_of!(FlowKey, proto), SLOT_WORD_OFFSET);
        assert_eq!(SLOT_WORD_OFFSET, SLOT_WORD_INDEX * 4);
        assert_eq!(offset_of!(TableSlot, packets), 64);
    }

    #[test]
    fn the_default_cache_stays_within_its_budget_from_32_cpus_on() {
        for (cpus, slots) in [
            (0, 2048),
            (1, 2048),
            (2, 2048),
            (16, 2048),
            (32, 2048),
            (33, 1024),
            (64, 1024),
            (65, 512),
            (128, 512),
            (256, 256),
            (512, 128),
            (4096, 128),
        ] {
            assert_eq!(default_cache_slots(cpus), slots, "{cpus} CPUs");
        }
        for cpus in 1..=1024u64 {
            let slots = u64::from(default_cache_slots(cpus as u32));
            assert!(slots.is_power_of_two());
            assert!(slots == 128 || 2 * slots * 100 * cpus <= CACHE_BUDGET_BYTES);
        }
    }

    #[test]
    fn hash_ignores_the_control_word_and_spreads_sequential_addresses() {
        let mut a = FlowKey {
            proto: 17,
            ..Default::default()
        };
        let h = table_hash(&a);
        a._pad = [3, 0xff, 0x12];
        assert_eq!(table_hash(&a), h);
        a.proto = 6;
        assert_ne!(table_hash(&a), h);
        // 2^16 sequential IPv4 sources fill nearly as many distinct home
        // slots of a 2^17-slot table as random keys would (1 - 1/e^0.5
        // of the table for 2^16 keys: ~39.3% of 2^17 = 51.6k).
        let mut seen = [0u64; (1 << 17) / 64];
        let mut distinct = 0;
        for i in 0..(1u32 << 16) {
            let mut k = FlowKey {
                proto: 17,
                ..Default::default()
            };
            k.src_addr[..4].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
            let slot = (table_hash(&k) & ((1 << 17) - 1)) as usize;
            if seen[slot / 64] & (1 << (slot % 64)) == 0 {
                distinct += 1;
                seen[slot / 64] |= 1 << (slot % 64);
            }
        }
        assert!(distinct > 50_000, "{distinct} distinct home slots");
    }

    #[test]
    fn control_word_fields() {
        let w = slot_word(17, SLOT_VALID) | 0x12 << 16 | 0x04 << 24;
        assert_eq!(w & 0xff, 17);
        assert_eq!(slot_state(w), SLOT_VALID);
        assert_eq!(slot_tcp_flags(w, 0), 0x12);
        assert_eq!(slot_tcp_flags(w, 1), 0x04);
    }
}
