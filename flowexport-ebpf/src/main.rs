//! flowexport's kernel side: an XDP program on ingress and a TC (TCX) program
//! on egress that count packets and bytes per flow in one per-CPU hash map.
//!
//! Both programs only observe: XDP always returns XDP_PASS and TC returns
//! TC_ACT_UNSPEC (== TCX_NEXT), so other programs attached after us still run
//! and the packet continues untouched.
//!
//! Hot path: a per-CPU direct-mapped cache (`CACHE`, an array, so its
//! look-up is a few inlined instructions) holds the first flow to reach each
//! slot in a drain interval; only the other flows touch the per-CPU hash
//! `FLOWS`. See `account`.
//!
//! Exact draining: the drain epoch in `CONTROL[0]` (its low bit is the
//! generation) is read once per packet; every table key carries the
//! generation it was counted in and every cache slot the epoch. Userspace
//! advances the epoch, waits for an RCU grace period (so no program still
//! runs with the old value), and only then reads the old generation's table
//! entries (and deletes them) and the old epoch's cache slots, which nobody
//! writes any more. See `flowexport/src/capture/drain.rs`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MMAPABLE, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;
use flowexport_common::{
    CacheSlot, FallbackEvent, FlowKey, FlowValue, CONTROL_EPOCH, CONTROL_LEN, DIR_EGRESS,
    DIR_INGRESS, STAT_FALLBACK_PACKETS, STAT_LEN, STAT_MALFORMED_EGRESS, STAT_MALFORMED_INGRESS,
    STAT_NON_IP_EGRESS, STAT_NON_IP_INGRESS, STAT_OVERFLOW_BYTES_EGRESS,
    STAT_OVERFLOW_BYTES_INGRESS, STAT_OVERFLOW_PACKETS_EGRESS, STAT_OVERFLOW_PACKETS_INGRESS,
};

/// The flow table. Per-CPU so the hot path needs no atomics: each CPU adds to
/// its own slot and userspace sums the slots when it drains.
///
/// Sizing: the loader overrides max_entries with `--max-flows` (default
/// 65536): the number of distinct flows that may appear between two drains
/// (the old generation's entries are deleted within the drain itself). The
/// map is preallocated (no BPF_F_NO_PREALLOC), so an insert never fails for
/// lack of memory, only with E2BIG when the table is full; the cost is
/// max_entries × (key + value × possible CPUs) bytes up front, ~12 MiB for the
/// default on 2 CPUs. A full table is not a loss: see `FALLBACK`.
#[map]
static FLOWS: PerCpuHashMap<FlowKey, FlowValue> = PerCpuHashMap::with_max_entries(65536, 0);

/// `CONTROL[0]`: the drain epoch (low bit: the generation), advanced only by
/// userspace.
#[map]
static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_LEN, 0);

/// `CLOCK[0]`: CLOCK_MONOTONIC in ns, advanced by the agent every
/// `--clock-resolution` through a shared mapping (BPF_F_MMAPABLE); read
/// instead of calling bpf_ktime_get_ns() per packet, which costs as much as
/// the rest of the hot path. 0 until the agent's first tick: then the
/// helper is called. See `flowexport/src/capture/clock.rs`.
#[map]
static CLOCK: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The flow cache: two halves of `CONTROL[1]` slots, one per generation, so
/// the drain reads a half nobody writes. The first flow whose key hashes to
/// a slot in an epoch owns it until the drain; a flow that finds its slot
/// owned by another counts in `FLOWS` for that epoch. No evictions: each
/// packet costs at most one table operation, and the flows that send the
/// most are the likeliest to claim their slot again after every drain.
/// Per-CPU, so no atomics.
///
/// Sizing: the loader sets max_entries to 2 x `--cache-slots` (default
/// 4096 per half: 768 KiB per CPU). An array look-up is inlined by the
/// verifier, unlike a hash look-up, which is most of the hot path's cost.
/// Cache slots per half of `CACHE` (power of two; 0 = no cache), set by the
/// loader (`--cache-slots`) before the programs are verified.
#[no_mangle]
static CACHE_SLOTS: u32 = 0;

#[map]
static CACHE: PerCpuArray<CacheSlot> = PerCpuArray::with_max_entries(2 * 4096, 0);

/// Counters that are not flows (non-IP frames, fallback use); see the STAT_*
/// indices in flowexport-common. Per-CPU, cumulative, never reset.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_LEN, 0);

/// Fallback path for packets that find the flow table full: one event per
/// packet, with its full key, so userspace still counts it in the right flow.
/// Sized by `--fallback-ring-bytes` (default 1 MiB = ~13k events of 80 bytes
/// between two reads). If the ring is full too, the packet lands in the
/// per-direction overflow counters of `STATS`, so totals stay exact.
#[map]
static FALLBACK: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ1: u16 = 0x9100;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

/// Verifier bound: at most two VLAN tags (802.1ad outer + 802.1Q inner) are
/// parsed; a third tag leaves the frame classified by that tag's ethertype
/// (non-IP).
const MAX_VLAN_TAGS: usize = 2;
/// Verifier bound: at most this many IPv6 extension headers are walked. Each
/// is at most 2048 bytes ((255 + 1) × 8), so the L4 offset stays below
/// 14 + 8 + 40 + 6 × 2048 = 12350, well inside the verifier's 64 KiB packet
/// offset limit. A chain longer than this is counted with the next-header
/// value where the walk stopped and no ports.
const MAX_IPV6_EXT_HDRS: usize = 6;

/// Reads a value at a byte offset of the packet, or None past its end.
///
/// Each header is read as one byte array with one bounds check: besides being
/// cheaper, this keeps LLVM from turning a 1-byte check `p + 1 > end` into
/// `p >= end`, a form the verifier does not learn a packet range from.
trait Packet {
    fn load<T: Copy>(&self, off: usize) -> Option<T>;
}

/// XDP: direct packet access, bounds-checked against data_end.
struct XdpPacket<'a>(&'a XdpContext);

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let start = self.0.data();
        let end = self.0.data_end();
        if start + off + size_of::<T>() > end {
            return None;
        }
        // SAFETY: the range [start+off, start+off+size) lies inside the packet.
        Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    }
}

/// TC: bpf_skb_load_bytes, which also reads non-linear (paged) skb data.
struct SkbPacket<'a>(&'a TcContext);

impl Packet for SkbPacket<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        self.0.load::<T>(off).ok()
    }
}

#[inline(always)]
fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

enum Parsed {
    Flow { l3_off: usize, l4_hdr_end: usize },
    NonIp,
    Malformed,
}

/// Parses Ethernet / VLAN / IPv4 / IPv6 / L4 into `key` and `ip_len` (the
/// IP-layer length: IPv4 total length, IPv6 payload length + 40).
#[inline(always)]
fn parse<P: Packet>(
    p: &P,
    key: &mut FlowKey,
    ip_len: &mut u64,
    tcp_flags: &mut u8,
    mut vlan_seen: bool,
) -> Parsed {
    let Some(eth) = p.load::<[u8; ETH_HDR_LEN]>(0) else {
        return Parsed::NonIp;
    };
    let mut etype = be16(&eth, 12);
    let mut off = ETH_HDR_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if etype != ETH_P_8021Q && etype != ETH_P_8021AD && etype != ETH_P_QINQ1 {
            break;
        }
        let Some(tag) = p.load::<[u8; 4]>(off) else {
            return Parsed::Malformed;
        };
        // The key keeps the outermost tag: the one on this link.
        if !vlan_seen {
            key.vlan_id = be16(&tag, 0) & 0x0fff;
            vlan_seen = true;
        }
        etype = be16(&tag, 2);
        off += 4;
    }
    let l3_off = off;
    let mut l4_off: usize;
    let mut has_ports = true;
    let proto;
    match etype {
        ETH_P_IP => {
            let Some(h) = p.load::<[u8; 20]>(off) else {
                return Parsed::Malformed;
            };
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return Parsed::Malformed;
            }
            key.ip_version = 4;
            key.src_addr[..4].copy_from_slice(&h[12..16]);
            key.dst_addr[..4].copy_from_slice(&h[16..20]);
            *ip_len = be16(&h, 2) as u64;
            // Only the first fragment (offset 0) carries the L4 header.
            if be16(&h, 6) & 0x1fff != 0 {
                has_ports = false;
            }
            proto = h[9];
            l4_off = off + ihl;
        }
        ETH_P_IPV6 => {
            let Some(h) = p.load::<[u8; 40]>(off) else {
                return Parsed::Malformed;
            };
            if h[0] >> 4 != 6 {
                return Parsed::Malformed;
            }
            key.ip_version = 6;
            key.src_addr.copy_from_slice(&h[8..24]);
            key.dst_addr.copy_from_slice(&h[24..40]);
            *ip_len = be16(&h, 4) as u64 + 40;
            let mut next = h[6];
            l4_off = off + 40;
            for _ in 0..MAX_IPV6_EXT_HDRS {
                let hdr_len = match next {
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH
                    | IPPROTO_FRAGMENT => 0,
                    _ => break,
                };
                let Some(x) = p.load::<[u8; 4]>(l4_off) else {
                    has_ports = false;
                    break;
                };
                let hdr_len = hdr_len
                    + match next {
                        // Fixed 8 bytes; a non-zero offset means no L4 header.
                        IPPROTO_FRAGMENT => {
                            if be16(&x, 2) & 0xfff8 != 0 {
                                has_ports = false;
                            }
                            8
                        }
                        // AH counts 4-byte units minus 2.
                        IPPROTO_AH => (x[1] as usize + 2) * 4,
                        // The others count 8-byte units after the first 8.
                        _ => (x[1] as usize + 1) * 8,
                    };
                next = x[0];
                l4_off += hdr_len;
            }
            proto = next;
        }
        _ => return Parsed::NonIp,
    }
    key.proto = proto;
    let mut l4_hdr_end = l4_off;
    if has_ports {
        match proto {
            IPPROTO_TCP => {
                if let Some(t) = p.load::<[u8; 14]>(l4_off) {
                    key.src_port = be16(&t, 0);
                    key.dst_port = be16(&t, 2);
                    *tcp_flags = t[13];
                    l4_hdr_end = l4_off + ((t[12] >> 4) as usize) * 4;
                }
            }
            IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP => {
                if let Some(u) = p.load::<[u8; 4]>(l4_off) {
                    key.src_port = be16(&u, 0);
                    key.dst_port = be16(&u, 2);
                    l4_hdr_end = l4_off + 8;
                }
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                if let Some(i) = p.load::<[u8; 2]>(l4_off) {
                    key.dst_port = be16(&i, 0);
                }
            }
            _ => {}
        }
    }
    Parsed::Flow { l3_off, l4_hdr_end }
}

#[inline(always)]
fn stat_add(index: u32, n: u64) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs do not nest on one CPU for this map.
        unsafe { *c += n };
    }
}

/// The key as 12 words (48 bytes, 4-aligned, no implicit padding).
#[inline(always)]
fn words(k: &FlowKey) -> &[u32; 12] {
    // SAFETY: FlowKey is #[repr(C)], 48 bytes, align 4, all plain integers.
    unsafe { &*(k as *const FlowKey as *const [u32; 12]) }
}

/// Cache index of a key: each of its 12 words times its own odd constant,
/// summed, then mixed once. The 12 products do not depend on each other,
/// so the CPU overlaps them (a chained hash would wait for each multiply);
/// written out, with no loop for the verifier to bound.
#[inline(always)]
fn cache_hash(k: &FlowKey) -> u32 {
    let w = words(k);
    let h = w[0]
        .wrapping_mul(0x9e37_79b1)
        .wrapping_add(w[1].wrapping_mul(0x85eb_ca77))
        .wrapping_add(w[2].wrapping_mul(0xc2b2_ae3d))
        .wrapping_add(w[3].wrapping_mul(0x27d4_eb2f))
        .wrapping_add(w[4].wrapping_mul(0x1656_67b1))
        .wrapping_add(w[5].wrapping_mul(0xd3a2_646d))
        .wrapping_add(w[6].wrapping_mul(0xfd70_46c5))
        .wrapping_add(w[7].wrapping_mul(0xb55a_4f09))
        .wrapping_add(w[8].wrapping_mul(0x7feb_352d))
        .wrapping_add(w[9].wrapping_mul(0x846c_a68b))
        .wrapping_add(w[10].wrapping_mul(0x2c1b_3c6d))
        .wrapping_add(w[11].wrapping_mul(0x297a_2d39));
    h ^ (h >> 15)
}

#[inline(always)]
fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    let (a, b) = (words(a), words(b));
    (a[0] ^ b[0])
        | (a[1] ^ b[1])
        | (a[2] ^ b[2])
        | (a[3] ^ b[3])
        | (a[4] ^ b[4])
        | (a[5] ^ b[5])
        | (a[6] ^ b[6])
        | (a[7] ^ b[7])
        | (a[8] ^ b[8])
        | (a[9] ^ b[9])
        | (a[10] ^ b[10])
        | (a[11] ^ b[11])
        == 0
}

/// Adds one packet (or one GSO super-packet of `packets` segments) to its
/// flow: in the cache when the flow owns (or can take) its slot, else in
/// the table.
#[inline(always)]
fn account(key: &mut FlowKey, packets: u64, bytes: u64, tcp_flags: u8) {
    let now = match CLOCK.get(0) {
        Some(t) if *t != 0 => *t,
        _ => unsafe { bpf_ktime_get_ns() },
    };
    let epoch = match CONTROL.get(CONTROL_EPOCH) {
        Some(e) => *e,
        None => 0,
    };
    key.generation = (epoch & 1) as u8;
    // SAFETY: a plain read of a read-only global; volatile so the compiler
    // does not fold the default: the loader sets the real value, and the
    // verifier sees it as a constant (the branch and mask below fold).
    let slots = unsafe { core::ptr::read_volatile(&CACHE_SLOTS) };
    if slots != 0 {
        // slots is a power of two (the loader checks); the index lands in
        // this generation's half. An index past max_entries only makes the
        // look-up fail (then the table path below counts the packet).
        let idx = (epoch & 1) * slots + (cache_hash(key) & (slots - 1));
        if let Some(s) = CACHE.get_ptr_mut(idx) {
            // SAFETY: this CPU's slot; programs do not nest on one CPU.
            unsafe {
                let live = (*s).epoch == epoch && (*s).value.packets != 0;
                if live && same_key(&(*s).key, key) {
                    (*s).value.packets += packets;
                    (*s).value.bytes += bytes;
                    (*s).value.last_seen_ns = now;
                    (*s).value.tcp_flags |= tcp_flags;
                    return;
                }
                if !live {
                    // A free slot (or one of an epoch already drained): this
                    // flow owns it until the next drain.
                    (*s).key = *key;
                    (*s).epoch = epoch;
                    (*s).value = FlowValue::first(packets, bytes, now, tcp_flags);
                    return;
                }
                // Another flow owns the slot this epoch: count in the table.
            }
        }
    }
    table_add(key, &FlowValue::first(packets, bytes, now, tcp_flags));
}

/// Adds one packet's counters (`c`, first = last seen = now) to a flow in
/// the table (`FLOWS`); when the table is full, to the fallback ring; when
/// that is full too, to the overflow counters.
#[inline(always)]
fn table_add(key: &FlowKey, c: &FlowValue) {
    if let Some(v) = FLOWS.get_ptr_mut(*key) {
        // SAFETY: the pointer is this CPU's slot of an existing entry.
        unsafe {
            // Another CPU may have created the entry: then this CPU's slot
            // starts zeroed and these are its first packets.
            if (*v).first_seen_ns == 0 {
                (*v).first_seen_ns = c.first_seen_ns;
            }
            (*v).packets += c.packets;
            (*v).bytes += c.bytes;
            (*v).last_seen_ns = c.last_seen_ns;
            (*v).tcp_flags |= c.tcp_flags;
        }
        return;
    }
    // BPF_ANY: on a per-CPU map this writes only this CPU's slot, so a racing
    // insert of the same key on another CPU loses nothing. It fails only when
    // the table is full (E2BIG).
    if FLOWS.insert(*key, *c, 0).is_ok() {
        return;
    }
    stat_add(STAT_FALLBACK_PACKETS, c.packets);
    if let Some(mut slot) = FALLBACK.reserve::<FallbackEvent>(0) {
        // One packet (or GSO super-packet) per event: first = last seen.
        slot.write(FallbackEvent {
            key: *key,
            packets: c.packets,
            bytes: c.bytes,
            ts_ns: c.last_seen_ns,
            tcp_flags: c.tcp_flags,
            _pad: [0; 7],
        });
        slot.submit(0);
        return;
    }
    if key.direction == DIR_INGRESS {
        stat_add(STAT_OVERFLOW_PACKETS_INGRESS, c.packets);
        stat_add(STAT_OVERFLOW_BYTES_INGRESS, c.bytes);
    } else {
        stat_add(STAT_OVERFLOW_PACKETS_EGRESS, c.packets);
        stat_add(STAT_OVERFLOW_BYTES_EGRESS, c.bytes);
    }
}

#[inline(always)]
fn empty_key(ifindex: u32, direction: u8) -> FlowKey {
    FlowKey {
        src_addr: [0; 16],
        dst_addr: [0; 16],
        ifindex,
        src_port: 0,
        dst_port: 0,
        vlan_id: 0,
        direction,
        ip_version: 0,
        proto: 0,
        generation: 0,
        _pad: [0; 2],
    }
}

#[xdp]
pub fn flowexport_ingress(ctx: XdpContext) -> u32 {
    // SAFETY: ctx.ctx points at the kernel's xdp_md for this packet.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut key = empty_key(ifindex, DIR_INGRESS);
    let mut ip_len = 0u64;
    let mut flags = 0u8;
    match parse(&XdpPacket(&ctx), &mut key, &mut ip_len, &mut flags, false) {
        Parsed::Flow { .. } => account(&mut key, 1, ip_len, flags),
        Parsed::NonIp => stat_add(STAT_NON_IP_INGRESS, 1),
        Parsed::Malformed => stat_add(STAT_MALFORMED_INGRESS, 1),
    }
    xdp_action::XDP_PASS
}

#[classifier]
pub fn flowexport_egress(ctx: TcContext) -> i32 {
    // SAFETY: ctx.skb.skb points at the kernel's __sk_buff for this packet.
    let (ifindex, vlan_present, vlan_tci, gso_segs, skb_len) = unsafe {
        let s = &*ctx.skb.skb;
        (s.ifindex, s.vlan_present, s.vlan_tci, s.gso_segs, s.len)
    };
    let mut key = empty_key(ifindex, DIR_EGRESS);
    // A tag the stack keeps out of band (hardware-accelerated VLAN) is the
    // outermost one; tags still in the frame are inner.
    if vlan_present != 0 {
        key.vlan_id = (vlan_tci & 0x0fff) as u16;
    }
    let mut ip_len = 0u64;
    let mut flags = 0u8;
    match parse(
        &SkbPacket(&ctx),
        &mut key,
        &mut ip_len,
        &mut flags,
        vlan_present != 0,
    ) {
        Parsed::Flow { l3_off, l4_hdr_end } => {
            if gso_segs > 1 {
                // A GSO super-packet leaves as `gso_segs` wire packets, each
                // carrying its own copy of the IP and L4 headers.
                let segs = gso_segs as u64;
                let hdrs = (l4_hdr_end - l3_off) as u64;
                let total = (skb_len as u64).saturating_sub(l3_off as u64);
                account(&mut key, segs, total + (segs - 1) * hdrs, flags)
            } else {
                account(&mut key, 1, ip_len, flags)
            }
        }
        Parsed::NonIp => stat_add(STAT_NON_IP_EGRESS, 1),
        Parsed::Malformed => stat_add(STAT_MALFORMED_EGRESS, 1),
    }
    TC_ACT_UNSPEC
}

/// Baseline for `cargo xtask bench xdp`: the cheapest possible XDP program.
#[xdp]
pub fn flowexport_bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Cost breakdown for `cargo xtask bench xdp`: the ingress parser alone, the
/// key kept alive by the return value (XDP_PASS for every real frame).
#[xdp]
pub fn flowexport_bench_parse(ctx: XdpContext) -> u32 {
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut key = empty_key(ifindex, DIR_INGRESS);
    let mut ip_len = 0u64;
    let mut flags = 0u8;
    let _ = parse(&XdpPacket(&ctx), &mut key, &mut ip_len, &mut flags, false);
    if key.src_port == 0 && ip_len == 1 {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// Cost breakdown for `cargo xtask bench xdp`: the parser plus the clock and
/// generation reads that `account` does before its hash lookup.
#[xdp]
pub fn flowexport_bench_parse_clock(ctx: XdpContext) -> u32 {
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut key = empty_key(ifindex, DIR_INGRESS);
    let mut ip_len = 0u64;
    let mut flags = 0u8;
    let _ = parse(&XdpPacket(&ctx), &mut key, &mut ip_len, &mut flags, false);
    let now = match CLOCK.get(0) {
        Some(t) if *t != 0 => *t,
        _ => unsafe { bpf_ktime_get_ns() },
    };
    key.generation = match CONTROL.get(CONTROL_EPOCH) {
        Some(g) => (*g & 1) as u8,
        None => 0,
    };
    if key.src_port == 0 && ip_len == now && key.generation == 7 {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
