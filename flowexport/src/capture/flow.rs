//! The kernel's side of a flow, turned into the shared record: a
//! [`FlowKey`] (the kernel's 5-tuple, interface and direction) with its
//! [`FlowCounters`] becomes a [`FlowRecord`]. Every capture source that
//! counts into `FlowKey`s (the kernel tables today) builds its records here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flowexport_common::parse::{IPPROTO_ICMP, IPPROTO_ICMPV6};
use flowexport_common::{FlowKey, DIR_EGRESS};

use crate::record::{FlowRecord, FlowType, ETYPE_IPV4, ETYPE_IPV6};

/// Counters of one flow, summed over CPUs, with kernel (CLOCK_MONOTONIC) times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub packets: u64,
    pub bytes: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub tcp_flags: u8,
}

impl FlowCounters {
    /// Adds `other` into `self`: counts add, times widen, flags OR.
    pub(crate) fn merge(&mut self, other: &FlowCounters) {
        if self.packets == 0 {
            *self = *other;
            return;
        }
        if other.packets == 0 {
            return;
        }
        self.packets += other.packets;
        self.bytes += other.bytes;
        // 0 means "not known" (never a real CLOCK_MONOTONIC reading).
        self.first_seen_ns = match (self.first_seen_ns, other.first_seen_ns) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.last_seen_ns = self.last_seen_ns.max(other.last_seen_ns);
        self.tcp_flags |= other.tcp_flags;
    }
}

/// What every record of one drain shares.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordContext {
    pub sampler_address: Option<IpAddr>,
    /// The records' `sampling_rate`: N of `--sampling` when the kernel
    /// samples 1 in N, 0 (not sampled) when it counts every packet.
    pub sampling_rate: u64,
    pub clock: crate::timeconv::ClockOffset,
    pub time_received_ns: u64,
}

/// The address in a key as an `IpAddr` (IPv4 sits in the first 4 bytes).
pub(crate) fn key_addr(bytes: &[u8; 16], ip_version: u8) -> IpAddr {
    if ip_version == 6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// Builds the record for one kernel flow key and its counters.
pub(crate) fn to_record(key: &FlowKey, c: &FlowCounters, ctx: &RecordContext) -> FlowRecord {
    let (etype, src_addr, dst_addr) = match key.ip_version {
        6 => (
            ETYPE_IPV6,
            key_addr(&key.src_addr, 6),
            key_addr(&key.dst_addr, 6),
        ),
        4 => (
            ETYPE_IPV4,
            key_addr(&key.src_addr, 4),
            key_addr(&key.dst_addr, 4),
        ),
        // Overflow records (see capture::drain) carry no address family.
        _ => (
            0,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ),
    };
    let is_icmp = matches!(
        (key.ip_version, key.proto),
        (4, IPPROTO_ICMP) | (6, IPPROTO_ICMPV6)
    );
    let (src_port, dst_port, icmp_type, icmp_code) = if is_icmp {
        (0, 0, (key.dst_port >> 8) as u8, key.dst_port as u8)
    } else {
        (key.src_port, key.dst_port, 0, 0)
    };
    let egress = key.direction == DIR_EGRESS;
    FlowRecord {
        flow_type: FlowType::Ebpf,
        time_received_ns: ctx.time_received_ns,
        sequence_num: 0,
        sampling_rate: ctx.sampling_rate,
        sampler_address: ctx.sampler_address,
        time_flow_start_ns: ctx.clock.to_wall_ns(c.first_seen_ns),
        time_flow_end_ns: ctx.clock.to_wall_ns(c.last_seen_ns),
        bytes: c.bytes,
        packets: c.packets,
        src_addr,
        dst_addr,
        etype,
        proto: key.proto,
        src_port,
        dst_port,
        in_if: if egress { 0 } else { key.ifindex },
        out_if: if egress { key.ifindex } else { 0 },
        vlan_id: key.vlan_id,
        tcp_flags: c.tcp_flags,
        icmp_type,
        icmp_code,
        flow_direction: key.direction,
        ..FlowRecord::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeconv::ClockOffset;
    use flowexport_common::DIR_INGRESS;

    fn ctx() -> RecordContext {
        RecordContext {
            sampler_address: Some("192.0.2.1".parse().unwrap()),
            sampling_rate: 0,
            // wall = mono + 1_700_000_000_000_000_000
            clock: ClockOffset::from_pair(1_000, 1_700_000_000_000_001_000),
            time_received_ns: 1_700_000_000_500_000_000,
        }
    }

    fn v4_key(direction: u8, proto: u8, sp: u16, dp: u16) -> FlowKey {
        let mut k = FlowKey {
            ifindex: 7,
            direction,
            ip_version: 4,
            proto,
            src_port: sp,
            dst_port: dp,
            vlan_id: 100,
            ..Default::default()
        };
        k.src_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.dst_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        k
    }

    #[test]
    fn ingress_udp_record_fields() {
        let c = FlowCounters {
            packets: 3,
            bytes: 3 * 128,
            first_seen_ns: 5_000,
            last_seen_ns: 9_000,
            tcp_flags: 0,
        };
        let r = to_record(&v4_key(DIR_INGRESS, 17, 4000, 53), &c, &ctx());
        assert_eq!(r.in_if, 7);
        assert_eq!(r.out_if, 0);
        assert_eq!(r.etype, 0x800);
        assert_eq!(r.src_addr.to_string(), "10.0.0.1");
        assert_eq!(r.time_flow_start_ns, 1_700_000_000_000_005_000);
        assert_eq!(r.time_flow_end_ns, 1_700_000_000_000_009_000);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["type"], "EBPF");
        assert_eq!(v["sampler_address"], "192.0.2.1");
        assert_eq!(v["src_port"], 4000);
        assert_eq!(v["dst_port"], 53);
        assert_eq!(v["bytes"], 384);
        assert_eq!(v["packets"], 3);
        assert_eq!(v["flow_direction"], 0);
        assert_eq!(v["vlan_id"], 100);
        assert_eq!(v["time_received_ns"], 1_700_000_000_500_000_000u64);
    }

    #[test]
    fn egress_icmp_splits_type_and_code() {
        let c = FlowCounters {
            packets: 1,
            bytes: 84,
            first_seen_ns: 1,
            last_seen_ns: 1,
            tcp_flags: 0,
        };
        let r = to_record(&v4_key(DIR_EGRESS, 1, 0, 8 << 8 | 3), &c, &ctx());
        assert_eq!((r.icmp_type, r.icmp_code), (8, 3));
        assert_eq!((r.src_port, r.dst_port), (0, 0));
        assert_eq!((r.in_if, r.out_if), (0, 7));
        assert_eq!(r.flow_direction, 1);
    }

    #[test]
    fn ipv6_and_empty_sampler() {
        let mut k = v4_key(DIR_INGRESS, 6, 1, 2);
        k.ip_version = 6;
        k.src_addr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        k.dst_addr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets();
        let mut cx = ctx();
        cx.sampler_address = None;
        let r = to_record(&k, &FlowCounters::default(), &cx);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["etype"], 0x86dd);
        assert_eq!(v["src_addr"], "2001:db8::1");
        assert_eq!(v["sampler_address"], "");
    }

    #[test]
    fn merge_widens_times_and_ors_flags() {
        let mut a = FlowCounters {
            packets: 2,
            bytes: 100,
            first_seen_ns: 50,
            last_seen_ns: 60,
            tcp_flags: 0x02,
        };
        a.merge(&FlowCounters {
            packets: 1,
            bytes: 40,
            first_seen_ns: 40,
            last_seen_ns: 70,
            tcp_flags: 0x10,
        });
        assert_eq!(
            a,
            FlowCounters {
                packets: 3,
                bytes: 140,
                first_seen_ns: 40,
                last_seen_ns: 70,
                tcp_flags: 0x12
            }
        );
        let mut z = FlowCounters::default();
        z.merge(&a);
        assert_eq!(z, a);
        // A per-CPU slot created by another CPU may lack its first-seen time.
        z.merge(&FlowCounters {
            packets: 1,
            bytes: 1,
            first_seen_ns: 0,
            last_seen_ns: 80,
            tcp_flags: 0,
        });
        assert_eq!((z.first_seen_ns, z.last_seen_ns), (40, 80));
    }
}
