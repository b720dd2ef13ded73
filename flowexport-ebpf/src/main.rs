//! flowexport's kernel side: an XDP program on ingress and a TC (TCX) program
//! on egress that count packets and bytes per flow.
//!
//! Both programs only observe: XDP always returns XDP_PASS and TC returns
//! TC_ACT_UNSPEC (== TCX_NEXT), so other programs attached after us still run
//! and the packet continues untouched.
//!
//! Where a packet is counted (see `account`):
//! * **cache hit** (the hot path): a per-CPU direct-mapped cache (`CACHE`, an
//!   array, so its look-up is a few inlined instructions) holds the first
//!   flow to reach each slot in a drain interval; plain adds, no atomics.
//! * **table**: every flow has one slot in the shared flow table (`TABLE`,
//!   open addressing with linear probing in a BPF_F_MMAPABLE array that
//!   userspace reads through a shared mapping, no syscall per flow). Packets
//!   of flows that do not own their cache slot add to the table slot with
//!   atomic instructions. A new flow is inserted under a striped lock, so two
//!   CPUs never insert the same flow twice. Memory grows with flows, not
//!   flows x CPUs.
//! * **fallback**: no slot within `TABLE_MAX_PROBES` (the table is full) or
//!   the insert lock stayed busy: the packet goes to userspace through a ring
//!   buffer with its key; if the ring is full too, into overflow counters.
//!
//! Exact draining: the drain epoch in `CONTROL[0]` (its low bit is the
//! generation) is read once per packet. Table slots keep two generations of
//! counters and cache slots carry the epoch. Userspace advances the epoch,
//! waits for an RCU grace period (so no program still runs with the old
//! value), and only then reads and clears the old generation's counters and
//! the old epoch's cache slots, which nobody writes any more. See
//! `flowexport/src/capture/table.rs` and `drain/mod.rs`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC},
    cty::{c_long, c_void},
    helpers::{
        bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_skb_load_bytes,
        bpf_xdp_load_bytes,
    },
    macros::{classifier, map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, RingBuf, XskMap},
    programs::{TcContext, XdpContext},
};
use core::arch::asm;
use core::cell::{Cell, UnsafeCell};
use core::intrinsics::{atomic_cxchg, atomic_or, atomic_xadd, atomic_xchg, AtomicOrdering};
use core::mem::MaybeUninit;
use flowexport_common::parse::{
    parse, Hdr, Packet, Parsed, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE,
    IPV4_HDR_LEN,
};
use flowexport_common::{
    slot_state, slot_word, table_hash, CacheSlot, ClockWord, FallbackEvent, FilterMasks, FilterSet,
    FlowKey, FlowValue, PendingExport, TableSlot, CLOCK_ACTIVE_ALL, CONTROL_EPOCH, CONTROL_LEN,
    DIR_EGRESS, DIR_INGRESS, FILTER_TRIE_ENTRIES, MISS_RING_BYTES, REPLAY_BATCH,
    REPLAY_CLAIM_OFFSET, SLOT_BUSY, SLOT_EMPTY, SLOT_TOMB, SLOT_VALID, SLOT_WORD_INDEX,
    STAT_FALLBACK_CONTENDED, STAT_FALLBACK_PACKETS, STAT_FILTERED_EGRESS, STAT_FILTERED_INGRESS,
    STAT_LEN, STAT_MALFORMED_EGRESS, STAT_MALFORMED_INGRESS, STAT_NON_IP_EGRESS,
    STAT_NON_IP_INGRESS, STAT_OVERFLOW_BYTES_EGRESS, STAT_OVERFLOW_BYTES_INGRESS,
    STAT_OVERFLOW_PACKETS_EGRESS, STAT_OVERFLOW_PACKETS_INGRESS, STAT_TABLE_BYTES_EGRESS,
    STAT_TABLE_BYTES_INGRESS, STAT_TABLE_PACKETS_EGRESS, STAT_TABLE_PACKETS_INGRESS, TABLE_LOCKS,
    TABLE_LOCK_SPINS, TABLE_MAX_PROBES, TABLE_REGION_SHIFT, XSK_MAX_IFACES, XSK_MAX_QUEUES,
    XSK_MAX_SOCKETS,
};

/// The flow table: one 96-byte `TableSlot` per slot, shared by all CPUs.
///
/// Sizing: the loader sets max_entries to the power of two at or above
/// 2 x `--max-flows` (default 1,048,576 flows: 2,097,152 slots), so at the
/// rated load at most half the slots are used and probe runs stay short
/// (38 slots at most, measured over 1M random keys, against the limit of
/// `TABLE_MAX_PROBES` = 64). Shared, so its memory does not depend on the
/// CPU count: 192 MiB at the default on 2, 16 or 64 CPUs (an array is
/// allocated whole at load). BPF_F_MMAPABLE: the drain reads and clears
/// counters through a shared mapping instead of one syscall per flow.
#[map]
static TABLE: Array<TableSlot> = Array::with_max_entries(TABLE_MIN_ENTRIES, BPF_F_MMAPABLE);
const TABLE_MIN_ENTRIES: u32 = flowexport_common::TABLE_MIN_SLOTS;

/// Table slots minus one (a power of two minus one), set by the loader
/// before the programs are verified.
#[no_mangle]
static TABLE_MASK: u32 = 0;

#[inline(always)]
fn table_mask() -> u32 {
    // SAFETY: a plain read of a read-only global; volatile so the compiler
    // does not fold the default (the loader sets the real value).
    unsafe { core::ptr::read_volatile(&TABLE_MASK) }
}

/// Insert locks (`TABLE_LOCKS` words, 16 KiB, not per CPU): 0 free, 1 held.
/// Only the insert of a new flow takes one; see `table_insert`.
#[map]
static LOCKS: Array<u32> = Array::with_max_entries(TABLE_LOCKS, 0);

/// One bit per region of 2^`TABLE_REGION_SHIFT` slots, set when a program
/// fills a slot there; the drain swaps the words to 0 and so learns where
/// new flows are without scanning the table. Sized by the loader to
/// slots / 64 / 64 words (4 KiB at the default).
#[map]
static DIRTY: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// `CONTROL[0]`: the drain epoch (low bit: the generation), advanced only by
/// userspace.
#[map]
static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_LEN, 0);

/// `CLOCK[0]`: the clock word the agent advances every `--clock-resolution`
/// while traffic flows, through a shared mapping (BPF_F_MMAPABLE), and the
/// activity flags. Read instead of calling bpf_ktime_get_ns() per packet,
/// which costs as much as the rest of the hot path. 0 while the agent's
/// clock rests (no traffic for a while): then the helper is called, and
/// `active` tells the agent to start ticking again. See
/// `flowexport/src/capture/clock.rs`.
#[map]
static CLOCK: Array<ClockWord> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The flow cache: two halves of `CACHE_SLOTS` slots, one per generation, so
/// the drain reads a half nobody writes. The first flow whose key hashes to
/// a slot in an epoch owns it until the drain; a flow that finds its slot
/// owned by another counts in the table for that epoch. No evictions: each
/// packet costs at most one table operation, and the flows that send the
/// most are the likeliest to claim their slot again after every drain.
/// Per-CPU, so no atomics. A slot records its flow's table slot, where the
/// drain folds its counts.
///
/// Sizing: the loader sets max_entries to 2 x `--cache-slots` (default
/// 2048 per half up to 32 possible CPUs, 384 KiB per CPU: 768 KiB on 2
/// CPUs, 6 MiB on 16; above 32 CPUs the default halves so that all CPUs
/// together stay within 12.5 MiB with the tags: 1024 per half, 12 MiB on
/// 64; `flowexport_common::default_cache_slots`). An array look-up is
/// inlined by the verifier, unlike a hash look-up.
/// Cache slots per half of `CACHE` (power of two; 0 = no cache), set by the
/// loader (`--cache-slots`) before the programs are verified.
#[no_mangle]
static CACHE_SLOTS: u32 = 0;

#[map]
static CACHE: PerCpuArray<CacheSlot> = PerCpuArray::with_max_entries(2 * 2048, 0);

/// A 4-byte tag per `CACHE` slot and CPU, written when a flow takes the
/// slot: the epoch and 16 bits of the flow's hash ([`cache_tag`]). Entry
/// `cpu * CACHE_SLOTS + i` holds the tags of slot `i` of both halves
/// (generation 0 in its low 32 bits): array values take 8 bytes each, so
/// one entry per slot pair keeps the array dense. At high flow counts
/// nearly every packet finds its cache slot held by another flow; the tag
/// says so from an array small enough to stay in the CPU's caches, where
/// reading the 96-byte slot itself (384 KiB per CPU, at random) misses
/// them. Only a hint: a tag that does not say "another flow's, this epoch"
/// sends the packet to the slot's full check, and every answer it gives is
/// one the full check could give, so it is not pinned (a new agent starts
/// with zero tags).
///
/// Sizing: the loader sets max_entries to CPUs x `--cache-slots` (possible
/// CPUs): 16 KiB per CPU at 2048 slots (32 KiB on 2 CPUs, 256 KiB on 16;
/// 512 KiB on 64, where the default is 1024). A plain array (one inlined load), not a per-CPU one (a
/// pointer table to read first).
#[map]
static CACHE_TAGS: Array<u64> = Array::with_max_entries(1, 0);

/// The tag of a cache slot a flow with table hash `h` takes in `epoch`: a
/// set top bit (zeroed memory is never a tag), 15 bits of the epoch, and
/// 16 bits of the hash other than the cache index's.
#[inline(always)]
fn cache_tag(epoch: u32, h: u64) -> u32 {
    0x8000_0000 | (epoch & 0x7fff) << 16 | (h >> 48) as u32
}

/// Exports in progress (slot index -> `PendingExport`): written and read
/// only by userspace, which keeps them here, pinned with the rest, so that
/// an agent killed between the two steps of an export leaves them to the
/// next one. Not preallocated: an entry exists only while its export does
/// (none at rest); the loader sets max_entries to the table's slots.
#[map]
static PENDING: HashMap<u32, PendingExport> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// Counters that are not flows (non-IP frames, fallback use, table-path
/// traffic, filtered packets); see the STAT_* indices in flowexport-common.
/// Per-CPU, cumulative, never reset (16 x 8 bytes per CPU: 256 bytes on 2
/// CPUs, 2 KiB on 16, 8 KiB on 64).
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_LEN, 0);

/// Fallback path for packets that find no table slot: one event per packet,
/// with its full key, so userspace still counts it in the right flow. Sized
/// by `--fallback-ring-bytes` (default 1 MiB = ~11k events of 88 bytes
/// between two reads). If the ring is full too, the packet lands in the
/// per-direction overflow counters of `STATS`, so totals stay exact.
#[map]
static FALLBACK: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Packets whose per-CPU cache slot another flow owns (see `account`): one
/// record per packet with its full key, for the agent's drain thread to
/// count in the table from its own CPU (`flowexport_replay`). A ring record
/// costs the receiving CPU ~50 ns; the table slot's random access, ~300 ns
/// at 1M flows on a VM (`cargo xtask bench xdp -- --ring`), is then paid
/// on another CPU. While the ring is full (no agent running, or one that
/// falls behind) the programs count such packets in the table themselves.
/// 16 MiB: ~190k records of 88 bytes, ~0.2 s of misses at 1M packets/s
/// (the agent replays every 10 ms), whatever the CPU count.
#[map]
static MISSES: RingBuf = RingBuf::with_byte_size(MISS_RING_BYTES, 0);

/// `MISSES`' position after the last record `flowexport_replay` counted:
/// an agent killed between a replay and moving the ring's consumer position
/// on leaves it here, and the next agent starts from it (no record counted
/// twice, none lost).
#[map]
static REPLAYED: Array<u64> = Array::with_max_entries(1, 0);

/// 1-in-N sampling (`--sampling`), set by the loader; 0 or 1: every packet.
/// Read-only: with 1, the verifier sees a constant and drops the branch.
#[no_mangle]
static SAMPLING: u32 = 0;

/// The filter rules (`--filter`) as bit masks (`FilterSet`), set by the
/// loader; see `flowexport_filter`. A read-only global: no map look-up per
/// table, and with `count` 0 the verifier drops the whole filter from the
/// programs, so the hot path pays nothing without rules.
#[no_mangle]
static FILTER: FilterSet = FilterSet::EMPTY;

/// `--mirror`, set by the loader: 1 when the interface carries copies of
/// someone else's traffic (a SPAN port, a TAP): the ingress programs drop
/// what they counted, so the stack never processes the copies. Read-only:
/// the verifier keeps only the branch taken.
#[no_mangle]
static MIRROR: u8 = 0;

/// `--capture afxdp`: the AF_XDP sockets, by slot (an interface's RX queue
/// q is slot `XSK_SLOTS[ifindex] + q`). Sizing: XSK_MAX_SOCKETS (1024)
/// entries of 4 bytes, 4 KiB whatever the CPU count (2, 16 or 64). Filled
/// by the agent, not pinned.
#[map]
static XSKS: XskMap = XskMap::with_max_entries(XSK_MAX_SOCKETS, 0);

/// The first XSKS slot of each interface `flowexport_xsk` runs on: at most
/// XSK_MAX_IFACES (16) entries of 8 bytes.
#[map]
static XSK_SLOTS: HashMap<u32, u32> = HashMap::with_max_entries(XSK_MAX_IFACES, 0);

/// Frames `flowexport_xsk` found no socket for (dropped), per CPU: one u64
/// (16 B at 2 CPUs, 512 B at 64).
#[map]
static XSK_MISSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The filter rules' CIDRs, per family: prefix -> which rules' CIDRs
/// contain it (`FilterMasks`). Sizing: `FILTER_TRIE_ENTRIES` (three CIDRs
/// for each of the 32 rules) prefixes of 4 or 16 bytes plus 12-byte values,
/// allocated as used (an LPM trie must not be preallocated): a few KiB at
/// most, whatever the CPU count. Filled by the loader, not pinned.
#[map]
static FILTER_V4: LpmTrie<[u8; 4], FilterMasks> =
    LpmTrie::with_max_entries(FILTER_TRIE_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static FILTER_V6: LpmTrie<[u8; 16], FilterMasks> =
    LpmTrie::with_max_entries(FILTER_TRIE_ENTRIES, BPF_F_NO_PREALLOC);

/// The filter rules' ports: port -> which rules name it (`FilterMasks`).
/// An array, so a look-up is inlined (a hash look-up would cost a helper
/// call). Sizing: the loader makes it 65,536 entries (768 KiB, shared by
/// all CPUs: the same on 2, 16 or 64) only when some rule has a port, else
/// 1 entry. Filled by the loader, not pinned.
#[map]
static FILTER_PORTS: Array<FilterMasks> = Array::with_max_entries(1, 0);

/// XDP: direct packet access, bounds-checked against data_end (the end of
/// the first buffer). `FRAGS`: the program takes multi-buffer frames
/// (jumbo frames on drivers that split them; Linux 5.18+), and a header
/// beyond the first buffer is read with bpf_xdp_load_bytes. Without it the
/// helper is not in the program at all, so kernels before 5.18 load it.
struct XdpPacket<'a, const FRAGS: bool>(&'a XdpContext);

impl<const FRAGS: bool> Packet for XdpPacket<'_, FRAGS> {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<Hdr<N>> {
        let start = self.0.data();
        let end = self.0.data_end();
        if start + off + N > end {
            if !FRAGS {
                return None;
            }
            // SAFETY: the helper writes at most `len` bytes to `dst`.
            return helper_read(|dst, len| unsafe {
                bpf_xdp_load_bytes(self.0.ctx, off as u32, dst, len)
            });
        }
        // SAFETY: the range [start+off, start+off+N) lies inside the packet.
        Some(unsafe { packet_read(start + off) })
    }
}

/// The N bytes at `addr` of packet memory, read with the widest loads that
/// fit (8, then 4, 2, 1 bytes) into an 8-aligned `Hdr`. The loads are
/// written in BPF assembly: LLVM's BPF backend splits every load it cannot
/// prove aligned into single bytes (and a packet header's alignment is
/// unknown), while the kernel allows misaligned packet loads on the
/// architectures the agent runs on (x86-64, arm64: not with
/// BPF_F_STRICT_ALIGNMENT). The verifier checks each load against the
/// caller's bounds check, as any other packet access.
///
/// # Safety
/// `[addr, addr + N)` lies inside the packet (bounds-checked by the caller).
#[inline(always)]
unsafe fn packet_read<const N: usize>(addr: usize) -> Hdr<N> {
    /// One load of the given width (`u64`, `u32`, `u16`) from packet memory.
    macro_rules! load {
        ($width:literal, $at:expr) => {{
            let w: u64;
            asm!(concat!("{w} = *(", $width, " *)({p} + 0)"), w = out(reg) w, p = in(reg) $at,
                 options(pure, readonly, nostack, preserves_flags));
            w
        }};
    }
    let mut v = MaybeUninit::<Hdr<N>>::uninit();
    let dst = v.as_mut_ptr().cast::<u8>();
    let mut i = 0;
    // SAFETY: every load lies in the caller's range; every store lies in
    // `v` (N bytes) at an offset aligned for its width (`v` is 8-aligned
    // and i advances by 8 before the narrower tail); all N bytes are
    // written, and any bit pattern is a valid Hdr.
    unsafe {
        while i + 8 <= N {
            dst.add(i).cast::<u64>().write(load!("u64", addr + i));
            i += 8;
        }
        if i + 4 <= N {
            dst.add(i)
                .cast::<u32>()
                .write(load!("u32", addr + i) as u32);
            i += 4;
        }
        if i + 2 <= N {
            dst.add(i)
                .cast::<u16>()
                .write(load!("u16", addr + i) as u16);
            i += 2;
        }
        if i < N {
            dst.add(i).write(*((addr + i) as *const u8));
        }
        v.assume_init()
    }
}

/// TC: direct packet access to the skb's linear part (where the headers of
/// nearly every packet are: the stack pulls them there before TC sees an
/// skb), bpf_skb_load_bytes for what lies beyond it (paged data). The
/// helper alone would cost a call per header read (three to five per
/// packet); `cargo xtask bench xdp` measures both on the egress program.
///
/// A packet socket's frames (trafgen's, and the skbs some drivers build
/// from pages) carry only the Ethernet header in the linear part. There
/// an IPv4 header is read together with the `SKB_L4_AHEAD` bytes after it
/// in one call, kept in `ahead`, and the L4 read that follows a header
/// without options comes from them: one helper call instead of two.
struct SkbPacket<'a> {
    ctx: &'a TcContext,
    /// Where the L4 bytes in `ahead` start in the packet (0: `ahead`
    /// holds nothing; an L4 header never starts at 0).
    ahead_at: Cell<usize>,
    /// An IPv4 header and the `SKB_L4_AHEAD` bytes after it.
    ahead: UnsafeCell<MaybeUninit<Hdr<{ IPV4_HDR_LEN + SKB_L4_AHEAD }>>>,
}

/// The L4 bytes `SkbPacket` reads with an IPv4 header beyond the linear
/// part: the 14 a key uses (TCP's ports, data offset and flags), rounded
/// up to whole words.
const SKB_L4_AHEAD: usize = 16;

impl<'a> SkbPacket<'a> {
    #[inline(always)]
    fn new(ctx: &'a TcContext) -> Self {
        SkbPacket {
            ctx,
            ahead_at: Cell::new(0),
            ahead: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }
}

impl Packet for SkbPacket<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<Hdr<N>> {
        let start = self.ctx.data();
        let end = self.ctx.data_end();
        if start + off + N <= end {
            // SAFETY: the range [start+off, start+off+N) lies inside the
            // skb's linear data.
            return Some(unsafe { packet_read(start + off) });
        }
        let ahead = self
            .ahead
            .get()
            .cast::<Hdr<{ IPV4_HDR_LEN + SKB_L4_AHEAD }>>();
        let at = self.ahead_at.get();
        if N <= SKB_L4_AHEAD && at != 0 && off == at {
            // The L4 bytes read with the IP header.
            // SAFETY: `ahead_at` is set only once `ahead` holds all its
            // bytes; the N after the header lie inside it (N <= SKB_L4_AHEAD).
            let a = unsafe { &*ahead };
            return a.0[IPV4_HDR_LEN..IPV4_HDR_LEN + N].try_into().ok().map(Hdr);
        }
        if N == IPV4_HDR_LEN {
            // `parse`'s IPv4 header read: the L4 bytes come with it where
            // the packet has them (else one read each, below).
            // SAFETY: the helper writes at most the length given to
            // `ahead`, which has room for it.
            let r = unsafe {
                bpf_skb_load_bytes(
                    self.ctx.skb.skb.cast(),
                    off as u32,
                    ahead.cast(),
                    (IPV4_HDR_LEN + SKB_L4_AHEAD) as u32,
                )
            };
            if r == 0 {
                self.ahead_at.set(off + IPV4_HDR_LEN);
                // SAFETY: the helper filled `ahead`.
                let a = unsafe { &*ahead };
                return a.0[..N].try_into().ok().map(Hdr);
            }
        }
        skb_load_bytes(self.ctx, off)
    }
}

/// The N bytes at `off` of the skb through bpf_skb_load_bytes.
#[inline(always)]
fn skb_load_bytes<const N: usize>(ctx: &TcContext, off: usize) -> Option<Hdr<N>> {
    // SAFETY: the helper writes at most `len` bytes to `dst`.
    helper_read(|dst, len| unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), off as u32, dst, len) })
}

/// N header bytes a load helper copies (`copy(dst, len)`: bpf_skb_load_bytes
/// or bpf_xdp_load_bytes, which writes at most `len` bytes to `dst` and
/// all of them when it returns 0) into an 8-aligned `Hdr` on the stack.
#[inline(always)]
fn helper_read<const N: usize>(copy: impl FnOnce(*mut c_void, u32) -> c_long) -> Option<Hdr<N>> {
    let mut v = MaybeUninit::<Hdr<N>>::uninit();
    // SAFETY: on 0 the helper wrote all N bytes of `v`; any bit pattern is a
    // valid Hdr.
    (copy(v.as_mut_ptr().cast(), N as u32) == 0).then(|| unsafe { v.assume_init() })
}

#[inline(always)]
fn stat_add(index: u32, n: u64) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs do not nest on one CPU for this map.
        unsafe { *c += n };
    }
}

/// Adds to a packets/bytes pair of `STATS` counters laid out as ingress
/// packets (`base`), ingress bytes, egress packets, egress bytes.
#[inline(always)]
fn stat_add_pair(base: u32, direction: u8, packets: u64, bytes: u64) {
    let i = if direction == DIR_INGRESS {
        base
    } else {
        base + 2
    };
    stat_add(i, packets);
    stat_add(i + 1, bytes);
}

// The pairs `stat_add_pair` is used with have that layout.
const _: () = {
    assert!(STAT_TABLE_BYTES_INGRESS == STAT_TABLE_PACKETS_INGRESS + 1);
    assert!(STAT_TABLE_PACKETS_EGRESS == STAT_TABLE_PACKETS_INGRESS + 2);
    assert!(STAT_TABLE_BYTES_EGRESS == STAT_TABLE_PACKETS_INGRESS + 3);
    assert!(STAT_OVERFLOW_BYTES_INGRESS == STAT_OVERFLOW_PACKETS_INGRESS + 1);
    assert!(STAT_OVERFLOW_PACKETS_EGRESS == STAT_OVERFLOW_PACKETS_INGRESS + 2);
    assert!(STAT_OVERFLOW_BYTES_EGRESS == STAT_OVERFLOW_PACKETS_INGRESS + 3);
};

/// Whether two keys' first 44 bytes are equal: all but the last word
/// (`proto` and the pad bytes; in a table slot, the control word, which
/// the caller compares). Five u64 words and a half, aligned loads.
#[inline(always)]
fn same_first44(a: &FlowKey, b: &FlowKey) -> bool {
    let (a, b) = (a.words64(), b.words64());
    (a[0] ^ b[0])
        | (a[1] ^ b[1])
        | (a[2] ^ b[2])
        | (a[3] ^ b[3])
        | (a[4] ^ b[4])
        | ((a[5] ^ b[5]) & 0xffff_ffff)
        == 0
}

/// Whether two keys are equal: six word comparisons (`==` on the arrays
/// would be a `bcmp`, which the BPF backend lowers to a byte loop).
#[inline(always)]
fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    same_first44(a, b) && (a.words64()[5] >> 32) == (b.words64()[5] >> 32)
}

/// A packet's time: CLOCK_MONOTONIC in ns, and in ms (truncated to 32
/// bits) as table slots keep it, when the clock word gave it (else 0).
#[derive(Clone, Copy)]
struct Now {
    ns: u64,
    word_ms: u32,
}

impl Now {
    /// The time in ms, truncated to 32 bits: the clock word's, or computed
    /// from `ns` only where a path needs it (a 64-bit division, which the
    /// cache-hit path would otherwise pay on every packet while the clock
    /// rests). A word whose ms truncates to 0 gives the same 0 by division.
    #[inline(always)]
    fn ms(self) -> u32 {
        if self.word_ms != 0 {
            self.word_ms
        } else {
            (self.ns / 1_000_000) as u32
        }
    }
}

/// This packet's time. Also flags the clock and the drain that traffic
/// came: one store per tick at most, into the line every CPU reads anyway.
#[inline(always)]
fn now() -> Now {
    if let Some(c) = CLOCK.get_ptr_mut(0) {
        // SAFETY: the one value of an array map; the agent writes `ns`
        // and `ms` with aligned 8-byte stores (never torn); `active` is a
        // flag word where a lost race only means one more store.
        unsafe {
            if core::ptr::read_volatile(&(*c).active) != CLOCK_ACTIVE_ALL {
                core::ptr::write_volatile(&mut (*c).active, CLOCK_ACTIVE_ALL);
            }
            // The agent writes `ms` before `ns` when it starts ticking and
            // clears `ns` first when it stops: a non-zero `ns` comes with
            // a current `ms`.
            let ns = core::ptr::read_volatile(&(*c).ns);
            if ns != 0 {
                return Now {
                    ns,
                    word_ms: core::ptr::read_volatile(&(*c).ms) as u32,
                };
            }
        }
    }
    Now {
        // SAFETY: a helper without arguments.
        ns: unsafe { bpf_ktime_get_ns() },
        word_ms: 0,
    }
}

/// Why a packet found no table slot.
enum Miss {
    /// No free slot within `TABLE_MAX_PROBES` of the flow's home slot.
    Full,
    /// The insert lock stayed busy for `TABLE_LOCK_SPINS` reads, or the free
    /// slot was taken between reading and claiming it twice in a row.
    Contended,
}

/// Return values of the table functions below (slot indices are >= 0).
const NOT_FOUND: i64 = -1;
const FULL: i64 = -2;
const RACED: i64 = -3;
const LOCK_BUSY: i64 = -4;
/// Set in a slot index returned by `flowexport_table_claim` (and so
/// `flowexport_table_slot`) when the call claimed the slot for a new flow.
const CLAIMED: i64 = 1 << 32;

/// The slot's control word.
#[inline(always)]
fn slot_word_ptr(s: *mut TableSlot) -> *mut u32 {
    // SAFETY: the control word is the key's last 4-byte aligned word,
    // inside the slot `s` points at (callers pass slots of the table).
    unsafe { (s as *mut u32).add(SLOT_WORD_INDEX) }
}

/// Whether slot `s`, whose control word is `w`, holds the flow `key` (a
/// packet's key: its pad bytes are zero).
#[inline(always)]
fn holds(s: *mut TableSlot, w: u32, key: &FlowKey) -> bool {
    // SAFETY: a slot of the table; its key words do not change while it is
    // VALID (checked first).
    slot_state(w) == SLOT_VALID
        && (w & 0xff) == key.proto as u32
        && same_first44(unsafe { &(*s).key }, key)
}

// The table's look-up and insert are global BPF functions (`#[no_mangle]
// pub extern "C"`, global linkage in BTF): the verifier checks each once,
// on its own, instead of once per path through the parser of each caller
// (their loops, combined with the parser's paths, would exceed the
// verifier's budget of a million instructions). A call costs a few ns.
// Their key argument is a pointer to the caller's 48-byte key on the
// stack; for a global function the verifier treats it as possibly null.

/// The table slot holding `key` (a VALID slot), inserting it if needed;
/// or a negative `Miss` code (FULL, RACED, LOCK_BUSY).
///
/// Look-up without a lock: probe from the home slot until an EMPTY slot
/// (linear probing; tombstones and slots of other flows are passed over),
/// at most `TABLE_MAX_PROBES` slots. Then, only for a flow not found, the
/// insert under the flow's lock: probe again (another CPU may just have
/// inserted it), then claim the first free slot (EMPTY or TOMB) of the run
/// with a compare-and-swap (inserts of other flows, under other locks, may
/// race for it: then once more), write the key, publish the slot VALID and
/// mark its region in `DIRTY`. Every CPU inserting this flow takes the same
/// lock, so a flow is never inserted twice. Bounded: `TABLE_LOCK_SPINS`
/// reads of the lock, `TABLE_MAX_PROBES` slots per probe; a program never
/// waits on userspace (which never takes these locks).
///
/// `h` is `table_hash(key)`, which the caller has computed for the cache.
///
/// # Safety
/// `key` is null or points at a readable `FlowKey`.
#[no_mangle]
#[inline(never)]
pub unsafe extern "C" fn flowexport_table_slot(key: *const FlowKey, h: u64) -> i64 {
    // SAFETY: null or the caller's readable key (the function's contract).
    let Some(key) = (unsafe { key.as_ref() }) else {
        return FULL;
    };
    let mask = table_mask();
    let home = (h as u32) & mask;
    // SAFETY: `key` is the caller's valid key.
    let found = unsafe { flowexport_table_find(key, home) };
    if found != NOT_FOUND {
        return found;
    }
    let lock_idx = ((h >> 40) as u32) & (TABLE_LOCKS - 1);
    if flowexport_table_lock(lock_idx) == 0 {
        return LOCK_BUSY;
    }
    // SAFETY: as above.
    let mut r = unsafe { flowexport_table_claim(key, home) };
    if r == RACED {
        // SAFETY: as above.
        r = unsafe { flowexport_table_claim(key, home) };
    }
    if let Some(lock) = LOCKS.get_ptr_mut(lock_idx) {
        // SAFETY: releasing the lock this program holds; the exchange
        // orders the slot's stores before it.
        unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(lock, 0) };
    }
    r
}

/// The VALID slot holding `key`, probing from `home`; or NOT_FOUND.
///
/// # Safety
/// `key` is null or points at a readable `FlowKey`.
#[no_mangle]
#[inline(never)]
pub unsafe extern "C" fn flowexport_table_find(key: *const FlowKey, home: u32) -> i64 {
    // SAFETY: null or the caller's readable key (the function's contract).
    let Some(key) = (unsafe { key.as_ref() }) else {
        return NOT_FOUND;
    };
    let mask = table_mask();
    for i in 0..TABLE_MAX_PROBES {
        let idx = (home + i) & mask;
        let Some(s) = TABLE.get_ptr_mut(idx) else {
            break;
        };
        // SAFETY: a slot of the shared table; the control word is read
        // once, the key after it.
        let w = unsafe { core::ptr::read_volatile(slot_word_ptr(s)) };
        if slot_state(w) == SLOT_EMPTY {
            break;
        }
        if holds(s, w, key) {
            return idx as i64;
        }
    }
    NOT_FOUND
}

/// Takes insert lock `lock_idx`: 1 when held, 0 when it stayed busy for
/// `TABLE_LOCK_SPINS` reads (test, then test-and-set).
#[no_mangle]
#[inline(never)]
pub extern "C" fn flowexport_table_lock(lock_idx: u32) -> i64 {
    let Some(lock) = LOCKS.get_ptr_mut(lock_idx) else {
        return 0;
    };
    for _ in 0..TABLE_LOCK_SPINS {
        // SAFETY: a u32 of an array map.
        unsafe {
            if core::ptr::read_volatile(lock) == 0
                && atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    lock, 0, 1,
                )
                .1
            {
                return 1;
            }
        }
    }
    0
}

/// One insert attempt, holding the flow's lock (see flowexport_table_slot):
/// the slot, or FULL (no free slot within reach) or RACED (the free slot
/// was claimed by an insert of another flow first).
///
/// # Safety
/// `key` is null or points at a readable `FlowKey`.
#[no_mangle]
#[inline(never)]
pub unsafe extern "C" fn flowexport_table_claim(key: *const FlowKey, home: u32) -> i64 {
    // SAFETY: null or the caller's readable key (the function's contract).
    let Some(key) = (unsafe { key.as_ref() }) else {
        return FULL;
    };
    let mask = table_mask();
    let mut free = mask.wrapping_add(1); // none yet
    let mut free_word = 0u32;
    for i in 0..TABLE_MAX_PROBES {
        let idx = (home + i) & mask;
        let Some(s) = TABLE.get_ptr_mut(idx) else {
            break;
        };
        // SAFETY: as in flowexport_table_find.
        let w = unsafe { core::ptr::read_volatile(slot_word_ptr(s)) };
        if holds(s, w, key) {
            return idx as i64;
        }
        let state = slot_state(w);
        if (state == SLOT_EMPTY || state == SLOT_TOMB) && free > mask {
            free = idx;
            free_word = w;
        }
        if state == SLOT_EMPTY {
            break;
        }
    }
    if free > mask {
        return FULL;
    }
    let Some(s) = TABLE.get_ptr_mut(free) else {
        return FULL;
    };
    // SAFETY: claiming a free slot with a compare-and-swap; only the
    // winner writes the key, then publishes it with an exchange (a full
    // barrier: the key is visible before the slot is VALID). The counters
    // of a free slot are zero (userspace clears them before freeing it).
    unsafe {
        let word = slot_word_ptr(s);
        let (_, won) = atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word,
            free_word,
            slot_word(0, SLOT_BUSY),
        );
        if !won {
            return RACED;
        }
        // The key's first 44 bytes: five u64 words and the u32 before
        // the control word (the slot is 8-aligned, as its key).
        let kw = key.words64();
        let sw = s as *mut u64;
        for (j, w) in kw.iter().enumerate().take(5) {
            core::ptr::write_volatile(sw.add(j), *w);
        }
        core::ptr::write_volatile((s as *mut u32).add(SLOT_WORD_INDEX - 1), kw[5] as u32);
        atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(word, slot_word(key.proto, SLOT_VALID));
    }
    // Who asked for the slot tells the agent about the new flow (see
    // `table_slot`).
    free as i64 | CLAIMED
}

/// Marks the region of slot `idx` in `DIRTY`: the next drain visits it (a
/// flow the programs put there, or a TCP FIN/RST to export soon).
#[inline(always)]
fn mark_dirty(idx: u32) {
    let region = idx >> TABLE_REGION_SHIFT;
    if let Some(d) = DIRTY.get_ptr_mut(region >> 6) {
        let bit = 1u64 << (region & 63);
        // SAFETY: a u64 of an array map, shared with userspace, which swaps
        // it to 0; set with an atomic OR, skipped when already set.
        unsafe {
            if core::ptr::read_volatile(d) & bit == 0 {
                atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(d, bit);
            }
        }
    }
}

/// The table slot of `key`, and whether this call claimed it (a new flow),
/// or why there is none. A caller that claimed a slot must tell the agent:
/// the programs mark its region in `DIRTY`, the replay program returns it
/// to the agent in its frame.
#[inline(always)]
fn table_slot(key: &FlowKey, h: u64) -> Result<(u32, bool), Miss> {
    // SAFETY: a valid key.
    match unsafe { flowexport_table_slot(key, h) } {
        i if i >= 0 => Ok((i as u32, i & CLAIMED != 0)),
        FULL => Err(Miss::Full),
        _ => Err(Miss::Contended),
    }
}

/// Adds a packet (or a GSO super-packet's `packets` segments) to table slot
/// `idx`, generation `gen`, with atomic adds: other CPUs may count the same
/// flow at the same time.
#[inline(always)]
fn table_add(idx: u32, gen: u32, packets: u64, bytes: u64, now_ms: u32, tcp_flags: u8) {
    let Some(s) = TABLE.get_ptr_mut(idx) else {
        return;
    };
    let g = (gen & 1) as usize;
    // SAFETY: a VALID slot of the shared table; the counters of the current
    // generation are only ever added to (atomically) by programs, and read
    // and cleared by userspace only once no program can still write them.
    unsafe {
        // SeqCst, not Relaxed: LLVM's BPF backend turns a Relaxed add
        // whose result is used into a plain XADD, which returns nothing
        // (llvm/llvm-project#210371); SeqCst emits the FETCH form.
        let old =
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&mut (*s).packets[g], packets);
        if old == 0 {
            core::ptr::write_volatile(&mut (*s).first_ms[g], now_ms);
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut (*s).bytes[g], bytes);
        core::ptr::write_volatile(&mut (*s).last_ms[g], now_ms);
        if tcp_flags != 0 {
            let word = slot_word_ptr(s);
            let bits = (tcp_flags as u32) << (16 + 8 * g);
            if core::ptr::read_volatile(word) & bits != bits {
                atomic_or::<u32, u32, { AtomicOrdering::Relaxed }>(word, bits);
                // The end of a TCP connection: export it at the next drains
                // rather than at its idle timeout.
                if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                    mark_dirty(idx);
                }
            }
        }
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Counts one packet (or one GSO super-packet of `packets` segments) in its
/// flow: in the cache when the flow owns (or can take) its slot, else (with
/// `RING`, as the agent's programs run it) as a `MISSES` record for the
/// agent to count, else in the table, else through the fallback ring.
/// Without `RING` (a benchmark's comparison) a miss goes to the table.
#[inline(always)]
fn account<const RING: bool>(key: &FlowKey, packets: u64, bytes: u64, tcp_flags: u8) {
    let now = now();
    let epoch = match CONTROL.get(CONTROL_EPOCH) {
        Some(e) => *e,
        None => 0,
    };
    let gen = epoch & 1;
    // One hash for both levels: its high half indexes the cache, its low
    // bits the table (so flows that share a cache slot are not also
    // neighbours in the table).
    let h = table_hash(key);
    // SAFETY: a plain read of a read-only global; volatile so the compiler
    // does not fold the default: the loader sets the real value, and the
    // verifier sees it as a constant (the branch and mask below fold).
    let slots = unsafe { core::ptr::read_volatile(&CACHE_SLOTS) };
    if slots != 0 {
        // slots is a power of two (the loader checks); the index lands in
        // this generation's half. An index past max_entries only makes the
        // look-up fail (then the table path below counts the packet).
        let home = (h >> 32) as u32 & (slots - 1);
        let idx = gen * slots + home;
        let tag = cache_tag(epoch, h);
        // SAFETY: a helper without arguments.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        // This generation's half of the entry (shifts, not a pointer into
        // it: the verifier refuses arithmetic on a pointer not yet checked
        // for null, which LLVM would hoist).
        let shift = 32 * (gen & 1);
        let tags = CACHE_TAGS.get_ptr_mut(cpu.wrapping_mul(slots).wrapping_add(home));
        let taken = tags.is_some_and(|t| {
            // SAFETY: this CPU's tags; programs do not nest on one CPU.
            let seen = (unsafe { *t } >> shift) as u32;
            seen != tag && seen >> 16 == tag >> 16
        });
        if taken {
            // Another flow took the slot this epoch (its tag says so): the
            // slot itself is not read.
            if RING && to_miss_ring(key, packets, bytes, now.ns, tcp_flags) {
                return;
            }
        } else if let Some(s) = CACHE.get_ptr_mut(idx) {
            // SAFETY: this CPU's slot; programs do not nest on one CPU.
            unsafe {
                let live = (*s).epoch == epoch && (*s).value.packets != 0;
                if live && same_key(&(*s).key, key) {
                    (*s).value.packets += packets;
                    (*s).value.bytes += bytes;
                    (*s).value.last_seen_ns = now.ns;
                    (*s).value.tcp_flags |= tcp_flags;
                    return;
                }
                if !live {
                    // A free slot (or one of an epoch already drained): this
                    // flow owns it until the next drain, once it has its
                    // table slot, where the drain folds these counts.
                    match table_slot(key, h) {
                        Ok((t, claimed)) => {
                            if claimed {
                                mark_dirty(t);
                            }
                            // Seen now, so the drain does not retire the
                            // flow as idle while its counts sit here.
                            if let Some(ts) = TABLE.get_ptr_mut(t) {
                                core::ptr::write_volatile(
                                    &mut (*ts).last_ms[gen as usize & 1],
                                    now.ms(),
                                );
                            }
                            (*s).key = *key;
                            (*s).epoch = epoch;
                            (*s).table_idx = t;
                            if let Some(t) = tags {
                                *t = *t & !(0xffff_ffff << shift) | u64::from(tag) << shift;
                            }
                            write_first(&mut (*s).value, packets, bytes, now.ns, tcp_flags);
                        }
                        Err(miss) => fallback(key, packets, bytes, now.ns, tcp_flags, miss),
                    }
                    return;
                }
                // Another flow owns the slot this epoch: the agent counts
                // the packet in the table (see MISSES), or, while the ring
                // is full, this program does.
                if RING && to_miss_ring(key, packets, bytes, now.ns, tcp_flags) {
                    return;
                }
            }
        }
    }
    if let Some(claimed) = count_in_table(key, h, gen, packets, bytes, now, tcp_flags) {
        mark_dirty(claimed);
    }
}

/// Counts a packet (or `packets` segments) of `key`, whose table hash is
/// `h`, in generation `gen` of its table slot at `now`; without a slot,
/// through the fallback ring. Returns the slot if this call claimed it
/// (see `table_slot`).
#[inline(always)]
fn count_in_table(
    key: &FlowKey,
    h: u64,
    gen: u32,
    packets: u64,
    bytes: u64,
    now: Now,
    tcp_flags: u8,
) -> Option<u32> {
    match table_slot(key, h) {
        Ok((t, claimed)) => {
            table_add(t, gen, packets, bytes, now.ms(), tcp_flags);
            stat_add_pair(STAT_TABLE_PACKETS_INGRESS, key.direction, packets, bytes);
            claimed.then_some(t)
        }
        Err(miss) => {
            fallback(key, packets, bytes, now.ns, tcp_flags, miss);
            None
        }
    }
}

/// `BPF_RB_NO_WAKEUP`: the agent polls `MISSES` on its own schedule, so a
/// record needs no wake-up (which would cost an irq_work).
const RB_NO_WAKEUP: u64 = 1;

/// A `FallbackEvent` record of the packet in `ring`: false when the ring is
/// full.
#[inline(always)]
fn ring_record(
    ring: &RingBuf,
    key: &FlowKey,
    packets: u64,
    bytes: u64,
    now_ns: u64,
    tcp_flags: u8,
    flags: u64,
) -> bool {
    let Some(mut slot) = ring.reserve::<FallbackEvent>(0) else {
        return false;
    };
    // One packet (or GSO super-packet) per record: first = last seen.
    let ev = slot.as_mut_ptr() as *mut u64;
    let kw = key.words64();
    // SAFETY: the reserved record is a FallbackEvent (80 bytes, 8-aligned
    // in the ring): the key's six words, then packets, bytes, the time and
    // the flags word (flags byte and zero padding).
    unsafe {
        for (i, w) in kw.iter().enumerate() {
            core::ptr::write_volatile(ev.add(i), *w);
        }
        core::ptr::write_volatile(ev.add(6), packets);
        core::ptr::write_volatile(ev.add(7), bytes);
        core::ptr::write_volatile(ev.add(8), now_ns);
        core::ptr::write_volatile(ev.add(9), tcp_flags as u64);
    }
    slot.submit(flags);
    true
}

/// A packet that missed its cache slot, to `MISSES` (false: the ring is
/// full; count it in the table).
#[inline(always)]
fn to_miss_ring(key: &FlowKey, packets: u64, bytes: u64, now_ns: u64, tcp_flags: u8) -> bool {
    ring_record(
        &MISSES,
        key,
        packets,
        bytes,
        now_ns,
        tcp_flags,
        RB_NO_WAKEUP,
    )
}

/// A packet without a table slot: to the fallback ring with its key; when
/// that is full too, to the overflow counters.
#[inline(always)]
fn fallback(key: &FlowKey, packets: u64, bytes: u64, now_ns: u64, tcp_flags: u8, miss: Miss) {
    stat_add(STAT_FALLBACK_PACKETS, packets);
    if let Miss::Contended = miss {
        stat_add(STAT_FALLBACK_CONTENDED, packets);
    }
    if ring_record(&FALLBACK, key, packets, bytes, now_ns, tcp_flags, 0) {
        return;
    }
    stat_add_pair(STAT_OVERFLOW_PACKETS_INGRESS, key.direction, packets, bytes);
}

#[inline(always)]
fn empty_key(ifindex: u32, direction: u8) -> FlowKey {
    // Zeroed word by word with volatile stores: LLVM would otherwise trim a
    // zeroing of the whole key (whose address escapes to the table
    // functions) into odd-sized memsets, which the BPF backend turns into
    // calls of a byte-by-byte memset loop.
    let mut k = MaybeUninit::<FlowKey>::uninit();
    let w = k.as_mut_ptr() as *mut u64;
    // SAFETY: six u64 stores cover the 48-byte, 8-aligned-enough key (a
    // stack slot; u64 stores need no alignment in BPF beyond the verifier's
    // stack rules, which 8-aligned slots meet).
    let mut k = unsafe {
        for i in 0..6 {
            core::ptr::write_volatile(w.add(i), 0);
        }
        k.assume_init()
    };
    k.ifindex = ifindex;
    k.direction = direction;
    k
}

/// A cache slot's first counters (`FlowValue::first`), stored field by field
/// so that the zero padding costs one word store, not a memset call.
#[inline(always)]
fn write_first(v: &mut FlowValue, packets: u64, bytes: u64, now: u64, tcp_flags: u8) {
    let w = v as *mut FlowValue as *mut u64;
    // SAFETY: FlowValue is five u64 words: packets, bytes, first, last, and
    // the flags byte with its zero padding.
    unsafe {
        core::ptr::write_volatile(w, packets);
        core::ptr::write_volatile(w.add(1), bytes);
        core::ptr::write_volatile(w.add(2), now);
        core::ptr::write_volatile(w.add(3), now);
        core::ptr::write_volatile(w.add(4), tcp_flags as u64);
    }
}

/// Whether a parsed packet (or GSO super-packet of `packets` segments) is
/// counted: first the filter rules decide (a rejected packet is counted in
/// `STAT_FILTERED_*`, so that figure is exact), then 1-in-`SAMPLING`
/// random sampling. With neither configured, both branches fold away.
#[inline(always)]
fn admit(key: &FlowKey, packets: u64) -> bool {
    // SAFETY: plain reads of read-only globals (volatile: see CACHE_SLOTS).
    let (rules, sampling) = unsafe {
        (
            core::ptr::read_volatile(&FILTER.count),
            core::ptr::read_volatile(&SAMPLING),
        )
    };
    // SAFETY: `key` is the caller's valid key.
    if rules != 0 && unsafe { flowexport_filter(key) } == 0 {
        if key.direction == DIR_INGRESS {
            stat_add(STAT_FILTERED_INGRESS, packets);
        } else {
            stat_add(STAT_FILTERED_EGRESS, packets);
        }
        return false;
    }
    // SAFETY: a helper without arguments.
    sampling <= 1 || unsafe { bpf_get_prandom_u32() } % sampling == 0
}

/// The filter rules' verdict on `key`: 1 to count it, 0 to leave it out.
/// The rules that match are the AND of the masks each of the packet's
/// fields allows (protocol, direction, CIDR tries, port table); the first
/// of them (lowest bit) decides. When none does, the packet is counted
/// unless some rule accepts (`default_reject`). No loop: at most two trie
/// look-ups (only while a rule with a CIDR is a candidate) and two array
/// look-ups (the same for ports), whatever the number of rules. A global
/// function (verified once, on its own).
///
/// # Safety
/// `key` is null or points at a readable `FlowKey`.
#[no_mangle]
#[inline(never)]
pub unsafe extern "C" fn flowexport_filter(key: *const FlowKey) -> i64 {
    // SAFETY: null or the caller's readable key (the function's contract).
    let Some(key) = (unsafe { key.as_ref() }) else {
        return 1;
    };
    // SAFETY: plain reads of a read-only global (volatile: see
    // CACHE_SLOTS); the indices are a u8 and a bit, inside the arrays.
    let f = |field: &u32| unsafe { core::ptr::read_volatile(field) };
    let mut m =
        f(&FILTER.proto[key.proto as usize]) & f(&FILTER.direction[(key.direction & 1) as usize]);
    // The tries only when a rule with a CIDR is still a candidate.
    if m & f(&FILTER.cidr_rules) != 0 {
        let (s, d) = if key.ip_version == 6 {
            (
                FILTER_V6.get(Key::new(128, key.src_addr)).copied(),
                FILTER_V6.get(Key::new(128, key.dst_addr)).copied(),
            )
        } else {
            let mut s4 = [0u8; 4];
            let mut d4 = [0u8; 4];
            s4.copy_from_slice(&key.src_addr[..4]);
            d4.copy_from_slice(&key.dst_addr[..4]);
            (
                FILTER_V4.get(Key::new(32, s4)).copied(),
                FILTER_V4.get(Key::new(32, d4)).copied(),
            )
        };
        let (s, d) = (s.unwrap_or_default(), d.unwrap_or_default());
        m &= (s.either | d.either | f(&FILTER.no_cidr))
            & (s.src | f(&FILTER.no_src_cidr))
            & (d.dst | f(&FILTER.no_dst_cidr));
    }
    if m & f(&FILTER.port_rules) != 0 {
        let with_ports = matches!(
            key.proto,
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP
        );
        if with_ports {
            let s = FILTER_PORTS
                .get(key.src_port as u32)
                .copied()
                .unwrap_or_default();
            let d = FILTER_PORTS
                .get(key.dst_port as u32)
                .copied()
                .unwrap_or_default();
            m &= (s.either | d.either | f(&FILTER.no_port))
                & (s.src | f(&FILTER.no_src_port))
                & (d.dst | f(&FILTER.no_dst_port));
        } else {
            m &= !f(&FILTER.port_rules);
        }
    }
    if m == 0 {
        return (f(&FILTER.default_reject) == 0) as i64;
    }
    // The first matching rule: the lowest bit.
    (m & m.wrapping_neg() & f(&FILTER.accept) != 0) as i64
}

/// The ingress program: multi-buffer aware (`xdp.frags`), so that it
/// attaches in native mode where the MTU needs more than one buffer per
/// frame (veth and many drivers refuse a single-buffer program there).
#[xdp(frags)]
pub(crate) fn flowexport_ingress(ctx: XdpContext) -> u32 {
    ingress::<true>(&ctx)
}

/// The same for kernels without multi-buffer XDP (before 5.18), which
/// refuse `flowexport_ingress`: the loader falls back to this one.
#[xdp]
pub(crate) fn flowexport_ingress_linear(ctx: XdpContext) -> u32 {
    ingress::<false>(&ctx)
}

#[inline(always)]
fn ingress<const FRAGS: bool>(ctx: &XdpContext) -> u32 {
    // SAFETY: ctx.ctx points at the kernel's xdp_md for this packet.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut key = empty_key(ifindex, DIR_INGRESS);
    let mut ip_len = 0u64;
    let mut flags = 0u8;
    let packet = XdpPacket::<FRAGS>(ctx);
    match parse(&packet, &mut key, &mut ip_len, &mut flags, false) {
        Parsed::Flow { .. } => {
            if admit(&key, 1) {
                account::<true>(&key, 1, ip_len, flags);
            }
        }
        Parsed::NonIp => stat_add(STAT_NON_IP_INGRESS, 1),
        Parsed::Malformed => stat_add(STAT_MALFORMED_INGRESS, 1),
    }
    if mirror() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Whether `--mirror` is set (see MIRROR).
#[inline(always)]
fn mirror() -> bool {
    // SAFETY: a plain read of a read-only global (volatile: see CACHE_SLOTS).
    unsafe { core::ptr::read_volatile(&MIRROR) != 0 }
}

/// `--capture afxdp`: hands every frame to the AF_XDP socket of its RX
/// queue, where userspace parses and counts it; a frame with no socket
/// (its queue is not served) is dropped and counted in XSK_MISSED.
/// Multi-buffer aware, as the ingress program (jumbo frames reach sockets
/// bound with XDP_USE_SG in pieces).
#[xdp(frags)]
pub(crate) fn flowexport_xsk(ctx: XdpContext) -> u32 {
    xsk(&ctx)
}

/// The same for kernels without multi-buffer XDP (before 5.18).
#[xdp]
pub(crate) fn flowexport_xsk_linear(ctx: XdpContext) -> u32 {
    xsk(&ctx)
}

#[inline(always)]
fn xsk(ctx: &XdpContext) -> u32 {
    // SAFETY: ctx.ctx points at the kernel's xdp_md for this packet.
    let (ifindex, queue) = unsafe { ((*ctx.ctx).ingress_ifindex, (*ctx.ctx).rx_queue_index) };
    // SAFETY: a look-up of a plain u32 value.
    if let Some(base) = unsafe { XSK_SLOTS.get(ifindex) } {
        // Verifier bound: the slot stays inside this interface's range.
        if queue < XSK_MAX_QUEUES {
            if let Ok(action) = XSKS.redirect(*base + queue, 0) {
                return action;
            }
        }
    }
    if let Some(n) = XSK_MISSED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; no other writer.
        unsafe { *n += 1 };
    }
    xdp_action::XDP_DROP
}

/// Counts a packet a TC program sees, in direction `dir`: egress always;
/// ingress with `--capture tc`.
#[inline(always)]
fn tc_count(ctx: &TcContext, dir: u8) {
    tc_count_from(ctx, &SkbPacket::new(ctx), dir);
}

/// `tc_count`, reading the packet through `packet`.
#[inline(always)]
fn tc_count_from(ctx: &TcContext, packet: &impl Packet, dir: u8) {
    // SAFETY: ctx.skb.skb points at the kernel's __sk_buff for this packet.
    let (ifindex, vlan_present, vlan_tci, gso_segs, skb_len) = unsafe {
        let s = &*ctx.skb.skb;
        (s.ifindex, s.vlan_present, s.vlan_tci, s.gso_segs, s.len)
    };
    let mut key = empty_key(ifindex, dir);
    // A tag the stack keeps out of band (hardware-accelerated VLAN) is the
    // outermost one; tags still in the frame are inner.
    if vlan_present != 0 {
        key.vlan_id = (vlan_tci & 0x0fff) as u16;
    }
    let mut ip_len = 0u64;
    let mut flags = 0u8;
    match parse(packet, &mut key, &mut ip_len, &mut flags, vlan_present != 0) {
        Parsed::Flow { l3_off, l4_hdr_end } => {
            let segs = (gso_segs as u64).max(1);
            if !admit(&key, segs) {
                return;
            }
            if gso_segs > 1 {
                // A GSO super-packet leaves (a GRO one arrived) as
                // `gso_segs` wire packets, each carrying its own copy of the
                // IP and L4 headers.
                let hdrs = (l4_hdr_end - l3_off) as u64;
                let total = (skb_len as u64).saturating_sub(l3_off as u64);
                account::<true>(&key, segs, total + (segs - 1) * hdrs, flags);
            } else {
                account::<true>(&key, 1, ip_len, flags);
            }
        }
        Parsed::NonIp if dir == DIR_EGRESS => stat_add(STAT_NON_IP_EGRESS, 1),
        Parsed::NonIp => stat_add(STAT_NON_IP_INGRESS, 1),
        Parsed::Malformed if dir == DIR_EGRESS => stat_add(STAT_MALFORMED_EGRESS, 1),
        Parsed::Malformed => stat_add(STAT_MALFORMED_INGRESS, 1),
    }
}

#[classifier]
pub(crate) fn flowexport_egress(ctx: TcContext) -> i32 {
    tc_count(&ctx, DIR_EGRESS);
    TC_ACT_UNSPEC
}

/// Ingress through TC (TCX) instead of XDP (`--capture tc`): where an XDP
/// program costs more than the work it does (veth, where native XDP first
/// turns every skb into an XDP buffer; drivers without native XDP), or where
/// the XDP hook belongs to another program. Sees packets after GRO (counted
/// as their segments, as on egress).
#[classifier]
pub(crate) fn flowexport_ingress_tc(ctx: TcContext) -> i32 {
    tc_count(&ctx, DIR_INGRESS);
    if mirror() {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}

/// Counts `MISSES` records in the table: the agent's drain thread runs it
/// with BPF_PROG_TEST_RUN on its own CPU (never attached), a batch of
/// records as the frame: the ring position after the batch (8 bytes), then
/// up to `REPLAY_BATCH` `FallbackEvent`s. Each is counted as the ingress
/// path counts a packet in the table (`table_slot`, `table_add` at the
/// record's time, in the generation of the current epoch: a program run
/// like any other, so a drain's grace period covers it), or through the
/// fallback ring when the table has no room. The slots of new flows go
/// back to the agent in the frame (`REPLAY_CLAIM_OFFSET`), which keeps
/// their deadlines (see the agent's `capture::drain`). Last, the position
/// goes to `REPLAYED`: a run completes even if the agent is killed during
/// the call, so the counts and the position change together.
#[xdp]
pub(crate) fn flowexport_replay(ctx: XdpContext) -> u32 {
    let packet = XdpPacket::<false>(&ctx);
    let Some(end) = packet.load::<8>(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let gen = match CONTROL.get(CONTROL_EPOCH) {
        Some(e) => *e & 1,
        None => 0,
    };
    // First, reads of each record's home slot, results unused: the loads
    // are independent, so the CPU has many of their cache misses (a random
    // line of a table of hundreds of MiB each) under way at once, and the
    // counting below finds the lines in its caches instead of waiting out
    // each miss in turn. Bounded for the verifier by the batch size, as is
    // the loop after it.
    let mask = table_mask();
    let mut touched = 0u64;
    for i in 0..REPLAY_BATCH {
        let Some(h) = packet.load::<48>(8 + i * 80) else {
            break;
        };
        // SAFETY: Hdr<48> and FlowKey are both 48 bytes of plain integers,
        // 8-aligned, and any bit pattern is a valid key.
        let key: FlowKey = unsafe { core::mem::transmute::<Hdr<48>, FlowKey>(h) };
        if let Some(s) = TABLE.get_ptr_mut(table_hash(&key) as u32 & mask) {
            // The slot's first and last 8 bytes: its two cache lines (96
            // bytes, 32-aligned), whatever its place in them.
            let w = s as *const u64;
            // SAFETY: plain reads of words of a slot of the shared table.
            touched ^= unsafe { core::ptr::read_volatile(w) ^ core::ptr::read_volatile(w.add(11)) };
        }
    }
    core::hint::black_box(touched);
    for i in 0..REPLAY_BATCH {
        let Some(h) = packet.load::<80>(8 + i * 80) else {
            break;
        };
        // SAFETY: Hdr<80> and FallbackEvent are both 80 bytes of plain
        // integers, 8-aligned, and any bit pattern is a valid event.
        let ev: FallbackEvent = unsafe { core::mem::transmute::<Hdr<80>, FallbackEvent>(h) };
        let now = Now {
            ns: ev.ts_ns,
            word_ms: 0,
        };
        let claimed = count_in_table(
            &ev.key,
            table_hash(&ev.key),
            gen,
            ev.packets,
            ev.bytes,
            now,
            ev.tcp_flags,
        );
        if let Some(t) = claimed {
            // A new flow: its slot (+ 1) goes back to the agent in the
            // record's last padding word (the frame is copied back), rather
            // than as a `DIRTY` mark that makes the drain read the region.
            let at = ctx.data() + 8 + i * 80 + REPLAY_CLAIM_OFFSET;
            if at + 4 <= ctx.data_end() {
                // SAFETY: 4 bytes inside the frame (checked above), 4-aligned
                // in the 8-aligned record.
                unsafe { core::ptr::write_volatile(at as *mut u32, t + 1) };
            }
        }
    }
    if let Some(r) = REPLAYED.get_ptr_mut(0) {
        // SAFETY: the one value of an array map; only this program writes
        // it, and the agent runs it from one thread.
        unsafe { core::ptr::write_volatile(r, u64::from_ne_bytes(end.0)) };
    }
    xdp_action::XDP_PASS
}

/// Baseline for `cargo xtask bench xdp`: the cheapest possible XDP program.
#[cfg(feature = "bench")]
#[xdp]
pub(crate) fn flowexport_bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Baseline of the TC table of `cargo xtask bench xdp`: the cheapest
/// possible TC program.
#[cfg(feature = "bench")]
#[classifier]
pub(crate) fn flowexport_bench_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// A floor of `cargo xtask bench peers` (`tc-parse`): TC ingress that
/// only parses each packet as the agent's TC programs do (direct reads of
/// the linear part, bpf_skb_load_bytes beyond it), the key kept alive by
/// the return value (TC_ACT_UNSPEC for every real frame). Against
/// `flowexport_bench_tc_pass`: what reading the headers costs the receive
/// path, which receive-only never does.
#[cfg(feature = "bench")]
#[classifier]
pub(crate) fn flowexport_bench_tc_parse(ctx: TcContext) -> i32 {
    let (key, ip_len) = bench_tc_parse(&ctx);
    if key.src_port == 0 && ip_len == 1 {
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}

/// `flowexport_bench_tc_parse` plus the packet's time (`now()`: with no
/// agent ticking, the bpf_ktime_get_ns() helper) and the generation read
/// (`tc-parse-clock`).
#[cfg(feature = "bench")]
#[classifier]
pub(crate) fn flowexport_bench_tc_parse_clock(ctx: TcContext) -> i32 {
    let (key, ip_len) = bench_tc_parse(&ctx);
    if bench_clock_reads(&key, ip_len) {
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}

/// The TC ingress parse of this packet: its key and IP length.
#[cfg(feature = "bench")]
#[inline(always)]
fn bench_tc_parse(ctx: &TcContext) -> (FlowKey, u64) {
    // SAFETY: ctx.skb.skb points at the kernel's __sk_buff for this packet.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    bench_parse_from(&SkbPacket::new(ctx), ifindex)
}

/// The ingress parse of a packet read through `packet` on `ifindex`: its
/// key and IP length (the benchmark programs' parse-only breakdowns).
#[cfg(feature = "bench")]
#[inline(always)]
fn bench_parse_from(packet: &impl Packet, ifindex: u32) -> (FlowKey, u64) {
    let mut key = empty_key(ifindex, DIR_INGRESS);
    let mut ip_len = 0u64;
    let mut flags = 0u8;
    let _ = parse(packet, &mut key, &mut ip_len, &mut flags, false);
    (key, ip_len)
}

/// The egress program as it was before direct packet access: every header
/// read through bpf_skb_load_bytes (the TC table's comparison).
#[cfg(feature = "bench")]
#[classifier]
pub(crate) fn flowexport_bench_tc_helper(ctx: TcContext) -> i32 {
    struct Helper<'a>(&'a TcContext);
    impl Packet for Helper<'_> {
        #[inline(always)]
        fn load<const N: usize>(&self, off: usize) -> Option<Hdr<N>> {
            skb_load_bytes(self.0, off)
        }
    }
    tc_count_from(&ctx, &Helper(&ctx), DIR_EGRESS);
    TC_ACT_UNSPEC
}

/// The ingress program's parse of this packet: its key and IP length.
#[cfg(feature = "bench")]
#[inline(always)]
fn bench_parse(ctx: &XdpContext) -> (FlowKey, u64) {
    // SAFETY: ctx.ctx points at the kernel's xdp_md for this packet.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    bench_parse_from(&XdpPacket::<false>(ctx), ifindex)
}

/// Cost breakdown for `cargo xtask bench xdp`: the ingress parser alone, the
/// key kept alive by the return value (XDP_PASS for every real frame).
#[cfg(feature = "bench")]
#[xdp]
pub(crate) fn flowexport_bench_parse(ctx: XdpContext) -> u32 {
    let (key, ip_len) = bench_parse(&ctx);
    if key.src_port == 0 && ip_len == 1 {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// Cost breakdown for `cargo xtask bench xdp`: the parser plus the clock and
/// generation reads that `account` does before its hash lookup.
#[cfg(feature = "bench")]
#[xdp]
pub(crate) fn flowexport_bench_parse_clock(ctx: XdpContext) -> u32 {
    let (key, ip_len) = bench_parse(&ctx);
    if bench_clock_reads(&key, ip_len) {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// The clock and generation reads `account` does before its hash look-up
/// (the parse+clock breakdowns of `bench xdp` and `bench peers`). True
/// only for a key and time no real frame has: the caller's return value
/// then depends on every read, so none is optimized away.
#[cfg(feature = "bench")]
#[inline(always)]
fn bench_clock_reads(key: &FlowKey, ip_len: u64) -> bool {
    let now_ns = now().ns;
    let gen = match CONTROL.get(CONTROL_EPOCH) {
        Some(g) => *g & 1,
        None => 0,
    };
    key.src_port == 0 && ip_len == now_ns && gen == 7
}

/// `flowexport_bench_rotate`'s state: [the next run's flow, the flow
/// count N], which the benchmark sets before each call.
#[cfg(feature = "bench")]
#[map]
static BENCH_ROTATE: Array<u32> = Array::with_max_entries(2, 0);

/// The miss path for `cargo xtask bench xdp` as a NAPI batch of distinct
/// flows meets it: run i of a BPF_PROG_TEST_RUN call counts the
/// benchmark's flow i mod N (its source port and address written over the
/// parsed key of flow 0's frame, as `frame(i)` in the benchmark carries
/// them) through the ingress program's own `admit` and `account`. One call
/// with repeat N visits every flow once with no syscall between packets (a
/// call per packet also measures the caches and TLB the syscall evicts).
/// Bound: flows up to 256 x `BENCH_PORTS` (the address byte may not carry);
/// the benchmark checks every flow's count afterwards.
#[cfg(feature = "bench")]
#[xdp]
pub(crate) fn flowexport_bench_rotate(ctx: XdpContext) -> u32 {
    bench_rotate_count::<true>(&ctx)
}

/// Counts run i's flow (see `bench_rotate_key`) with `account::<RING>`.
#[cfg(feature = "bench")]
#[inline(always)]
fn bench_rotate_count<const RING: bool>(ctx: &XdpContext) -> u32 {
    let Some((key, ip_len)) = bench_rotate_key(ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    if admit(&key, 1) {
        account::<RING>(&key, 1, ip_len, 0);
    }
    xdp_action::XDP_PASS
}

/// The key of run i of a `BENCH_ROTATE` call: flow 0's frame parsed, its
/// source port and address moved to flow i mod N (see above).
#[cfg(feature = "bench")]
#[inline(always)]
fn bench_rotate_key(ctx: &XdpContext) -> Option<(FlowKey, u64)> {
    let (mut key, ip_len) = bench_parse(ctx);
    let (Some(next), Some(n)) = (BENCH_ROTATE.get_ptr_mut(0), BENCH_ROTATE.get(1)) else {
        return None;
    };
    // SAFETY: a u32 of an array map; BPF_PROG_TEST_RUN runs the repeats
    // one after another on one CPU, and userspace writes it between calls.
    let i = unsafe {
        let i = *next;
        *next = if i + 1 >= *n { 0 } else { i + 1 };
        i
    };
    let hi = (i / flowexport_common::BENCH_PORTS) as u8;
    key.src_port = key
        .src_port
        .wrapping_add((i % flowexport_common::BENCH_PORTS) as u16);
    if key.ip_version == 6 {
        key.src_addr[15] = key.src_addr[15].wrapping_add(hi);
    } else {
        key.src_addr[3] = key.src_addr[3].wrapping_add(hi);
    }
    Some((key, ip_len))
}

/// `flowexport_bench_rotate` with the table path instead of the `MISSES`
/// ring (`account::<false>`): a packet that misses its cache slot is
/// counted in the table on this CPU, as before the ring. For `cargo xtask
/// bench xdp -- --ring`, which compares the two.
#[cfg(feature = "bench")]
#[xdp]
pub(crate) fn flowexport_bench_table(ctx: XdpContext) -> u32 {
    bench_rotate_count::<false>(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
