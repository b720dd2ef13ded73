//! Draining the kernel flow table exactly, and turning counters into flows on
//! idle/active timeouts.
//!
//! # The exact-drain scheme
//!
//! `CONTROL[0]` holds the drain epoch; its low bit is the generation. The
//! kernel programs read it once per packet and count the packet either in
//! the per-CPU flow cache (`CACHE`: two halves, one per generation; a slot
//! carries the epoch it was filled in) or in the per-CPU hash table
//! (`FLOWS`; every key carries the generation). A drain:
//!
//! 1. advances `CONTROL[0]`; new packets now use the other generation's
//!    table entries and cache half;
//! 2. waits for an RCU grace period ([`super::rcu::GracePeriod`]): afterwards
//!    no program that read the old epoch is still running, so nothing
//!    writes an old-generation entry or an old-epoch slot any more;
//! 3. reads every old-generation table entry (summing the per-CPU slots) and
//!    deletes it. Since nobody writes these entries, the read and the delete
//!    see the same values: no packet is lost between them and none is
//!    counted twice;
//! 4. reads the old epoch's cache slots (every CPU's copy). They are not
//!    cleared: when the generation comes back, the slots carry an older
//!    epoch, which the programs treat as free and the next drain skips;
//! 5. reads the fallback ring buffer (packets that found the table full, each
//!    with its key) and the overflow counters (packets that found the ring
//!    full too), which are cumulative and read as differences.
//!
//! The counters then go into a userspace [`FlowAggregator`], which applies the
//! idle and active timeouts: the kernel table only ever holds the traffic of
//! one drain interval.

use std::collections::HashMap;

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::Ebpf;
use flowexport_common::{
    CacheSlot, FallbackEvent, FlowKey, FlowValue, CONTROL_EPOCH, DIR_EGRESS, DIR_INGRESS,
    MAP_CACHE, MAP_CLOCK, MAP_CONTROL, MAP_FALLBACK, MAP_FLOWS, MAP_STATS, STAT_FALLBACK_PACKETS,
    STAT_LEN, STAT_MALFORMED_EGRESS, STAT_MALFORMED_INGRESS, STAT_NON_IP_EGRESS,
    STAT_NON_IP_INGRESS, STAT_OVERFLOW_BYTES_EGRESS, STAT_OVERFLOW_BYTES_INGRESS,
    STAT_OVERFLOW_PACKETS_EGRESS, STAT_OVERFLOW_PACKETS_INGRESS,
};

use super::rcu::GracePeriod;
use crate::record::FlowCounters;

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
    #[error("mapping the programs' clock word (BPF_F_MMAPABLE array, Linux 5.5+): {0}")]
    Clock(std::io::Error),
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

/// Userspace flow state between exports: counts since the flow's last export.
#[derive(Default)]
pub struct FlowAggregator {
    flows: HashMap<FlowKey, FlowCounters>,
}

impl FlowAggregator {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Adds counters to a flow. The key's generation is not part of the flow.
    pub fn add(&mut self, mut key: FlowKey, c: &FlowCounters) {
        key.generation = 0;
        self.flows.entry(key).or_default().merge(c);
    }

    /// Moves every flow that is due into `out`:
    /// idle for `idle_ns`, active for `active_ns` since its first packet after
    /// the last export, a TCP flow that saw FIN or RST, or everything if
    /// `force` (shutdown). An exported flow leaves the table; its next packet
    /// starts a new slice, so successive records of a long flow are deltas.
    pub fn expire(
        &mut self,
        now_ns: u64,
        t: Timeouts,
        force: bool,
        out: &mut Vec<(FlowKey, FlowCounters)>,
    ) {
        self.flows.retain(|k, c| {
            let due = force
                || now_ns.saturating_sub(c.last_seen_ns) >= t.idle_ns
                || now_ns.saturating_sub(c.first_seen_ns) >= t.active_ns
                || (k.proto == IPPROTO_TCP && c.tcp_flags & (TCP_FIN | TCP_RST) != 0);
            if due {
                out.push((*k, *c));
            }
            !due
        });
    }
}

/// What one drain read from the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct DrainReport {
    /// Old-generation entries read (and deleted) from the flow table.
    pub table_entries: usize,
    /// Old-epoch flows read from the per-CPU cache (one per CPU slot).
    pub cache_entries: usize,
    /// Fallback ring events read.
    pub fallback_events: u64,
    /// Packets/bytes seen, by direction (index DIR_INGRESS / DIR_EGRESS).
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Packets that went to the overflow counters in this interval.
    pub overflow_packets: u64,
}

/// Cumulative kernel counters (sums over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub values: [u64; STAT_LEN as usize],
}

impl KernelStats {
    pub fn non_ip(&self, dir: u8) -> u64 {
        self.values[if dir == DIR_INGRESS {
            STAT_NON_IP_INGRESS
        } else {
            STAT_NON_IP_EGRESS
        } as usize]
    }
    pub fn malformed(&self, dir: u8) -> u64 {
        self.values[if dir == DIR_INGRESS {
            STAT_MALFORMED_INGRESS
        } else {
            STAT_MALFORMED_EGRESS
        } as usize]
    }
    pub fn fallback_packets(&self) -> u64 {
        self.values[STAT_FALLBACK_PACKETS as usize]
    }
    fn overflow(&self, dir: u8) -> (u64, u64) {
        let (p, b) = if dir == DIR_INGRESS {
            (STAT_OVERFLOW_PACKETS_INGRESS, STAT_OVERFLOW_BYTES_INGRESS)
        } else {
            (STAT_OVERFLOW_PACKETS_EGRESS, STAT_OVERFLOW_BYTES_EGRESS)
        };
        (self.values[p as usize], self.values[b as usize])
    }
    pub fn overflow_packets(&self) -> u64 {
        self.overflow(DIR_INGRESS).0 + self.overflow(DIR_EGRESS).0
    }
}

/// The kernel maps one drain works on.
pub struct KernelTables {
    flows: PerCpuHashMap<MapData, FlowKey, FlowValue>,
    control: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    fallback: RingBuf<MapData>,
    cache: PerCpuArray<MapData, CacheSlot>,
    grace: GracePeriod,
    /// The drain epoch written to `CONTROL[0]`; its low bit is the
    /// generation.
    epoch: u32,
    capacity: u32,
    /// Cache slots per generation (0: no cache).
    cache_slots: u32,
    /// Keeps the programs' clock word current.
    _clock: super::clock::ClockTicker,
    /// Overflow counters already turned into records.
    overflow_seen: [(u64, u64); 2],
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DrainError> {
    let map = ebpf.take_map(name).ok_or(DrainError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Sums one flow's per-CPU slots (CPUs that never saw it hold zeros).
fn sum_cpus(values: &[FlowValue]) -> FlowCounters {
    let mut c = FlowCounters::default();
    for v in values {
        c.merge(&FlowCounters {
            packets: v.packets,
            bytes: v.bytes,
            first_seen_ns: v.first_seen_ns,
            last_seen_ns: v.last_seen_ns,
            tcp_flags: v.tcp_flags,
        });
    }
    c
}

impl KernelTables {
    /// Takes the maps out of a loaded object (loaded with `cache_slots`
    /// slots per half of `CACHE`) and starts the clock word (advanced every
    /// `clock_resolution`). Epoch 0 (generation 0) is current.
    pub fn new(
        ebpf: &mut Ebpf,
        capacity: u32,
        cache_slots: u32,
        clock_resolution: std::time::Duration,
    ) -> Result<KernelTables, DrainError> {
        let clock = match ebpf.take_map(MAP_CLOCK) {
            Some(aya::maps::Map::Array(d)) => d,
            _ => return Err(DrainError::MissingMap(MAP_CLOCK)),
        };
        let clock =
            super::clock::ClockTicker::start(clock, clock_resolution).map_err(DrainError::Clock)?;
        let mut control: Array<MapData, u32> = take(ebpf, MAP_CONTROL)?;
        control
            .set(CONTROL_EPOCH, 0, 0)
            .map_err(map_err(MAP_CONTROL))?;
        Ok(KernelTables {
            flows: take(ebpf, MAP_FLOWS)?,
            control,
            stats: take(ebpf, MAP_STATS)?,
            fallback: take(ebpf, MAP_FALLBACK)?,
            cache: take(ebpf, MAP_CACHE)?,
            grace: GracePeriod::new().map_err(DrainError::GracePeriod)?,
            epoch: 0,
            capacity,
            cache_slots,
            _clock: clock,
            overflow_seen: [(0, 0); 2],
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Waits until no program run that started before this call is running.
    pub fn wait_grace_period(&self) -> Result<(), DrainError> {
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

    /// One exact drain (see the module docs) into `agg`.
    ///
    /// With `final_drain`, the programs must already be detached: both
    /// generations are read, after a grace period, without flipping.
    pub fn drain(
        &mut self,
        agg: &mut FlowAggregator,
        final_drain: bool,
    ) -> Result<DrainReport, DrainError> {
        let old_epoch = self.epoch;
        let old = (old_epoch & 1) as u8;
        if !final_drain {
            self.epoch = self.epoch.wrapping_add(1);
            self.control
                .set(CONTROL_EPOCH, self.epoch, 0)
                .map_err(map_err(MAP_CONTROL))?;
        }
        self.wait_grace_period()?;

        let mut report = DrainReport::default();
        let count = |report: &mut DrainReport, key: &FlowKey, c: &FlowCounters| {
            let d = (key.direction == DIR_EGRESS) as usize;
            report.packets[d] += c.packets;
            report.bytes[d] += c.bytes;
        };

        // Collect first, delete after: deleting while walking with
        // get_next_key would restart the walk.
        let mut done = Vec::new();
        for item in self.flows.iter() {
            let (key, values) = item.map_err(map_err(MAP_FLOWS))?;
            if !final_drain && key.generation != old {
                continue;
            }
            let c = sum_cpus(&values);
            count(&mut report, &key, &c);
            agg.add(key, &c);
            done.push(key);
        }
        for key in &done {
            match self.flows.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_FLOWS)(e)),
            }
        }
        report.table_entries = done.len();

        // The old epoch's cache slots (its half of CACHE), which no program
        // writes any more. Slots of older epochs were read at earlier drains
        // and are skipped; the kernel overwrites them, so nothing is reset.
        // A final drain reads the current epoch (nothing was advanced).
        if self.cache_slots != 0 {
            let half = old as u32 * self.cache_slots;
            for i in half..half + self.cache_slots {
                let per_cpu = self.cache.get(&i, 0).map_err(map_err(MAP_CACHE))?;
                for s in per_cpu.iter() {
                    if s.epoch != old_epoch || s.value.packets == 0 {
                        continue;
                    }
                    let c = sum_cpus(std::slice::from_ref(&s.value));
                    count(&mut report, &s.key, &c);
                    agg.add(s.key, &c);
                    report.cache_entries += 1;
                }
            }
        }

        while let Some(item) = self.fallback.next() {
            if item.len() < std::mem::size_of::<FallbackEvent>() {
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
            count(&mut report, &ev.key, &c);
            agg.add(ev.key, &c);
            report.fallback_events += 1;
        }

        let stats = self.stats()?;
        let now = crate::timeconv::monotonic_ns();
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let (p, b) = stats.overflow(dir);
            let (sp, sb) = self.overflow_seen[dir as usize];
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
                count(&mut report, &key, &c);
                agg.add(key, &c);
                report.overflow_packets += p - sp;
            }
            self.overflow_seen[dir as usize] = (p, b);
        }
        Ok(report)
    }
}

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

    #[test]
    fn generations_merge_into_one_flow() {
        let mut agg = FlowAggregator::default();
        let mut k1 = key(17, 1000);
        k1.generation = 1;
        agg.add(key(17, 1000), &c(2, 10, 20, 0));
        agg.add(k1, &c(3, 30, 40, 0));
        assert_eq!(agg.len(), 1);
        let mut out = Vec::new();
        agg.expire(41, T, true, &mut out);
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
        agg.expire(15_999, T, false, &mut out);
        assert_eq!(out.len(), 1, "{out:?}"); // idle 14_999 < 15_000: only FIN
        assert_eq!(out[0].0.src_port, 3);
        out.clear();
        agg.expire(16_000, T, false, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.src_port, 1);
        out.clear();
        agg.expire(60_000, T, false, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.src_port, 2);
        // The active flow's next packets start a new slice (a delta).
        agg.add(key(17, 2), &c(4, 60_500, 61_000, 0));
        out.clear();
        agg.expire(200_000, T, false, &mut out);
        let mut got: Vec<_> = out.iter().map(|(k, c)| (k.src_port, c.packets)).collect();
        got.sort();
        assert_eq!(got, vec![(2, 4), (4, 2)]);
    }

    #[test]
    fn per_cpu_slots_sum() {
        let a = FlowValue {
            packets: 2,
            bytes: 200,
            first_seen_ns: 50,
            last_seen_ns: 90,
            tcp_flags: 0x02,
            _pad: [0; 7],
        };
        let b = FlowValue {
            packets: 1,
            bytes: 60,
            first_seen_ns: 40,
            last_seen_ns: 60,
            tcp_flags: 0x10,
            _pad: [0; 7],
        };
        let got = sum_cpus(&[a, FlowValue::default(), b]);
        assert_eq!(
            got,
            FlowCounters {
                packets: 3,
                bytes: 260,
                first_seen_ns: 40,
                last_seen_ns: 90,
                tcp_flags: 0x12
            }
        );
    }
}
