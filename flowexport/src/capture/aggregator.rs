//! Flows counted in userspace between exports, and expired on the same
//! timeouts as the kernel table's: the kernel paths' flows that found no
//! table slot (fallback ring, overflow counters), and every flow of the
//! AF_XDP capture.

use std::collections::HashMap;

use flowexport_common::FlowKey;

use super::flow::FlowCounters;

pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_RST: u8 = 0x04;

/// Idle and active timeouts, in nanoseconds of CLOCK_MONOTONIC.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub idle_ns: u64,
    pub active_ns: u64,
}

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

#[cfg(test)]
/// Also the keys, counters and timeouts of `drain::table_drain`'s tests.
pub(crate) mod tests {
    use super::*;

    pub(crate) fn key(proto: u8, sport: u16) -> FlowKey {
        FlowKey {
            ifindex: 3,
            proto,
            ip_version: 4,
            src_port: sport,
            dst_port: 80,
            ..Default::default()
        }
    }

    pub(crate) fn c(packets: u64, first: u64, last: u64, flags: u8) -> FlowCounters {
        FlowCounters {
            packets,
            bytes: packets * 100,
            first_seen_ns: first,
            last_seen_ns: last,
            tcp_flags: flags,
        }
    }

    pub(crate) const T: Timeouts = Timeouts {
        idle_ns: 15_000,
        active_ns: 60_000,
    };

    pub(crate) fn collect(
        out: &mut Vec<(FlowKey, FlowCounters)>,
    ) -> impl FnMut(&FlowKey, &FlowCounters) + '_ {
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
}
