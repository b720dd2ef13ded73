//! `#[repr(C)]` types shared by flowexport's kernel programs (`flowexport-ebpf`)
//! and its userspace (`flowexport`). Both sides must agree byte for byte, so
//! every struct here has explicit padding fields that the kernel zeroes: the
//! flow key is hashed as raw bytes, and a stray padding byte would split one
//! flow into several.
#![no_std]

/// Direction of a packet relative to the interface it was seen on.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// One flow-table key: the 5-tuple plus where and how the packet was seen.
///
/// * Addresses: IPv4 in the first 4 bytes (rest zero), IPv6 in all 16.
/// * For ICMP/ICMPv6, `src_port` is 0 and `dst_port` is `type << 8 | code`,
///   as NetFlow encodes them; userspace splits them back into
///   `icmp_type`/`icmp_code`.
/// * Non-first IPv4/IPv6 fragments carry no L4 header: their ports are 0.
/// * `generation` is the flow-table generation the packet was counted in (see
///   the drain scheme in `flowexport/src/capture/drain.rs`).
#[repr(C)]
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
    pub generation: u8,
    pub _pad: [u8; 2],
}

/// Per-CPU counters of one flow in one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub packets: u64,
    /// IP-layer bytes: IPv4 total length, IPv6 payload length + 40.
    pub bytes: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the first and last packet.
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

/// A packet the flow table could not take (the table was full): sent to
/// userspace through the fallback ring buffer with its full key, so the
/// drain still accounts for it exactly.
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
/// and `value.packets` is not 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CacheSlot {
    pub key: FlowKey,
    pub value: FlowValue,
    pub epoch: u32,
    pub _pad: [u8; 4],
}

/// Index of the drain epoch in the `CONTROL` array map. Userspace adds 1 at
/// every drain; its lowest bit is the generation of flow-table keys and the
/// half of `CACHE` in use.
pub const CONTROL_EPOCH: u32 = 0;
pub const CONTROL_LEN: u32 = 1;
/// The kernel object's global holding the cache slots per half of `CACHE`
/// (a power of two; 0 = no cache), set by the loader.
pub const GLOBAL_CACHE_SLOTS: &str = "CACHE_SLOTS";
/// Default cache slots per half (per CPU: 2 x 4096 x 96 bytes = 768 KiB).
pub const DEFAULT_CACHE_SLOTS: u32 = 4096;

/// Indices into the per-CPU `STATS` array. Counters only grow; userspace
/// sums the CPUs and takes differences between reads.
pub const STAT_NON_IP_INGRESS: u32 = 0;
pub const STAT_NON_IP_EGRESS: u32 = 1;
/// Packets whose IP header was cut short (not counted in any flow).
pub const STAT_MALFORMED_INGRESS: u32 = 2;
pub const STAT_MALFORMED_EGRESS: u32 = 3;
/// Packets that found the flow table full and went to the fallback ring.
pub const STAT_FALLBACK_PACKETS: u32 = 4;
/// Packets (and their bytes) that found both the table and the ring full;
/// userspace exports them as one overflow record per direction.
pub const STAT_OVERFLOW_PACKETS_INGRESS: u32 = 5;
pub const STAT_OVERFLOW_BYTES_INGRESS: u32 = 6;
pub const STAT_OVERFLOW_PACKETS_EGRESS: u32 = 7;
pub const STAT_OVERFLOW_BYTES_EGRESS: u32 = 8;
pub const STAT_LEN: u32 = 9;

/// Map and program names, shared so the loader cannot drift from the object.
pub const MAP_FLOWS: &str = "FLOWS";
pub const MAP_CONTROL: &str = "CONTROL";
pub const MAP_STATS: &str = "STATS";
pub const MAP_FALLBACK: &str = "FALLBACK";
pub const MAP_CACHE: &str = "CACHE";
pub const MAP_CLOCK: &str = "CLOCK";
pub const PROG_INGRESS: &str = "flowexport_ingress";
pub const PROG_EGRESS: &str = "flowexport_egress";
/// An XDP program that only returns XDP_PASS: the baseline of `cargo xtask bench xdp`.
pub const PROG_BENCH_PASS: &str = "flowexport_bench_pass";
/// Cost-breakdown programs of `cargo xtask bench xdp`: the parser alone, and
/// the parser plus the clock and generation reads.
pub const PROG_BENCH_PARSE: &str = "flowexport_bench_parse";
pub const PROG_BENCH_PARSE_CLOCK: &str = "flowexport_bench_parse_clock";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are #[repr(C)], contain only integers and byte
    // arrays, and have no implicit padding (explicit `_pad` fields).
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::FallbackEvent {}
    unsafe impl aya::Pod for super::CacheSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 48);
        assert_eq!(size_of::<FlowValue>(), 40);
        assert_eq!(size_of::<FallbackEvent>(), 48 + 32);
        assert_eq!(size_of::<CacheSlot>(), 96);
    }
}
