//! The capped aggregator: flows into Prometheus counters, one handle per
//! series looked up once, then incremented directly.

use std::collections::HashMap;

use prometheus::{IntCounter, IntCounterVec, Registry};

use super::labels::{app_index, app_name, direction_label, ip_version_label, proto_label};
use crate::record::{FlowSummary, Host};

/// A hasher for keys that are already well-spread integers (one
/// multiply instead of SipHash): the per-record series look-ups.
#[derive(Default)]
struct SpreadKeyHasher(u64);

impl std::hash::Hasher for SpreadKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

type SpreadKeys = std::hash::BuildHasherDefault<SpreadKeyHasher>;

/// The traffic series of a flow, packed: cid (bit 32 set: over the cap,
/// `other`), direction, IP version, protocol number (256: unknown) and
/// application index.
fn traffic_key(cid: Option<u32>, f: &FlowSummary, app: u8) -> u64 {
    let cid = cid.map_or(1 << 32, |c| c as u64);
    let dir = f.direction.map_or(3, |d| d.min(2) as u64);
    let ipv = match f.ip_version {
        Some(4) => 1,
        Some(6) => 2,
        _ => 0,
    };
    let proto = f.proto.map_or(256, |p| p as u64);
    cid | dir << 33 | ipv << 35 | proto << 37 | (app as u64) << 46
}

/// Bytes, packets and flows by the same labels.
struct Totals {
    bytes: IntCounterVec,
    packets: IntCounterVec,
    flows: IntCounterVec,
}

impl Totals {
    fn series(&self, labels: &[&str]) -> Series {
        Series {
            bytes: self.bytes.with_label_values(labels),
            packets: self.packets.with_label_values(labels),
            flows: self.flows.with_label_values(labels),
        }
    }
}

/// One label set's bytes, packets and flows.
struct Series {
    bytes: IntCounter,
    packets: IntCounter,
    flows: IntCounter,
}

impl Series {
    fn add(&self, f: &FlowSummary) {
        self.bytes.inc_by(f.bytes);
        self.packets.inc_by(f.packets);
        self.flows.inc_by(f.flows);
    }
}

/// The counters and their per-series handles (looked up once per series,
/// then incremented directly).
pub struct Dashboard {
    traffic_totals: Totals,
    host_totals: Totals,
    transmit: IntCounterVec,
    receive: IntCounterVec,
    asn: Option<u32>,
    names: HashMap<u32, String>,
    traffic: HashMap<u64, Series, SpreadKeys>,
    hosts: HashMap<Host, Series>,
    as_series: HashMap<(bool, u32, u32, Host), IntCounter>,
    /// Customer ids with their own label (at most max_customers).
    cids: std::collections::HashSet<u32>,
    max_customers: usize,
    max_hosts: usize,
    max_as_pairs: usize,
}

impl Dashboard {
    pub fn new(
        r: &Registry,
        asn: Option<u32>,
        names: HashMap<u32, String>,
        max_customers: usize,
        max_hosts: usize,
        max_as_pairs: usize,
    ) -> Dashboard {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            crate::metrics::counter_vec(r, name, help, labels)
        };
        let t = &["cid", "direction", "ip_version", "proto", "app"];
        let as_labels = &[
            "source_as",
            "source_as_name",
            "destination_as",
            "destination_as_name",
            "hostname",
        ];
        Dashboard {
            traffic_totals: Totals {
                bytes: vec(
                    "flowexport_dashboard_bytes_total",
                    "Bytes of the flows read, scaled by their sampling rate.",
                    t,
                ),
                packets: vec(
                    "flowexport_dashboard_packets_total",
                    "Packets of the flows read, scaled by their sampling rate.",
                    t,
                ),
                flows: vec("flowexport_dashboard_flows_total", "Flow records read.", t),
            },
            host_totals: Totals {
                bytes: vec(
                    "flowexport_dashboard_host_bytes_total",
                    "Bytes by exporter (sampler_address, or pmacct's label), scaled by sampling rate.",
                    &["host"],
                ),
                packets: vec(
                    "flowexport_dashboard_host_packets_total",
                    "Packets by exporter, scaled by sampling rate.",
                    &["host"],
                ),
                flows: vec(
                    "flowexport_dashboard_host_flows_total",
                    "Flow records by exporter.",
                    &["host"],
                ),
            },
            transmit: vec("flow_transmit_bytes_total", "Bytes transferred.", as_labels),
            receive: vec("flow_receive_bytes_total", "Bytes received.", as_labels),
            asn,
            names,
            traffic: HashMap::default(),
            hosts: HashMap::new(),
            as_series: HashMap::new(),
            cids: std::collections::HashSet::new(),
            max_customers,
            max_hosts,
            max_as_pairs,
        }
    }

    /// Counts one flow.
    pub fn add(&mut self, f: &FlowSummary) {
        let cid = if f.cid == 0 || self.cids.contains(&f.cid) {
            Some(f.cid)
        } else if self.cids.len() < self.max_customers {
            self.cids.insert(f.cid);
            Some(f.cid)
        } else {
            None
        };
        let app = app_index(f);
        let key = traffic_key(cid, f, app);
        let counters = match self.traffic.get(&key) {
            Some(c) => c,
            None => {
                let cid = match cid {
                    Some(0) => "none".to_string(),
                    Some(c) => c.to_string(),
                    None => "other".to_string(),
                };
                let l = [
                    cid.as_str(),
                    direction_label(f.direction),
                    ip_version_label(f.ip_version),
                    proto_label(f.proto),
                    app_name(app),
                ];
                let c = self.traffic_totals.series(&l);
                self.traffic.entry(key).or_insert(c)
            }
        };
        counters.add(f);

        // Hosts past the cap share the `other` entry (the map holds at
        // most max_hosts + 1 keys).
        let h = match self.hosts.get(&f.host) {
            Some(h) => h,
            None => {
                let host = if self.hosts.len() < self.max_hosts {
                    f.host.clone()
                } else {
                    Host::Label("other".into())
                };
                let text = host.to_string();
                let l = [text.as_str()];
                let c = self.host_totals.series(&l);
                self.hosts.entry(host).or_insert(c)
            }
        };
        h.add(f);

        // flow-exporter: transmit when the monitored AS is the source,
        // else receive when it is the destination.
        if let Some(asn) = self.asn {
            let tx = if f.src_as == asn {
                true
            } else if f.dst_as == asn {
                false
            } else {
                return;
            };
            let k = (tx, f.src_as, f.dst_as, f.host.clone());
            if let Some(c) = self.as_series.get(&k) {
                c.inc_by(f.bytes);
                return;
            }
            let full = self.as_series.len() >= self.max_as_pairs;
            let name = |a: u32, carried: &'_ str| -> String {
                self.names
                    .get(&a)
                    .cloned()
                    .unwrap_or_else(|| carried.to_string())
            };
            let (sn, dn) = (
                name(f.src_as, &f.src_as_name),
                name(f.dst_as, &f.dst_as_name),
            );
            let (sa, da) = (f.src_as.to_string(), f.dst_as.to_string());
            let host = f.host.to_string();
            let l: [&str; 5] = if full {
                // Keep the monitored side, lump the other.
                if tx {
                    [&sa, &sn, "other", "", &host]
                } else {
                    ["other", "", &da, &dn, &host]
                }
            } else {
                [&sa, &sn, &da, &dn, &host]
            };
            let c = if tx {
                self.transmit.with_label_values(&l)
            } else {
                self.receive.with_label_values(&l)
            };
            c.inc_by(f.bytes);
            if !full {
                self.as_series.insert(k, c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::render_registry;
    use crate::record::{FlowRecord, ETYPE_IPV4};

    fn scrape(r: &Registry) -> String {
        render_registry(r)
    }

    #[test]
    fn flow_exporter_metrics_by_monitored_asn() {
        let r = Registry::new();
        let names = HashMap::from([(15169, "GOOGLE".to_string()), (6939, "HURRICANE".into())]);
        let mut d = Dashboard::new(&r, Some(15169), names, 10, 10, 100);
        let flow = |s, dst, b| FlowSummary {
            host: "bdr1".into(),
            src_as: s,
            dst_as: dst,
            bytes: b,
            flows: 1,
            ..FlowSummary::default()
        };
        d.add(&flow(15169, 6939, 100));
        d.add(&flow(15169, 6939, 50));
        d.add(&flow(6939, 15169, 30));
        d.add(&flow(1, 2, 999)); // neither side is the monitored AS
        let s = scrape(&r);
        assert!(s.contains(
            "flow_transmit_bytes_total{destination_as=\"6939\",destination_as_name=\"HURRICANE\",hostname=\"bdr1\",source_as=\"15169\",source_as_name=\"GOOGLE\"} 150"
        ), "{s}");
        assert!(s.contains(
            "flow_receive_bytes_total{destination_as=\"15169\",destination_as_name=\"GOOGLE\",hostname=\"bdr1\",source_as=\"6939\",source_as_name=\"HURRICANE\"} 30"
        ), "{s}");
        assert_eq!(s.matches("flow_receive_bytes_total{").count(), 1);
        assert_eq!(s.matches("flow_transmit_bytes_total{").count(), 1);
    }

    #[test]
    fn traffic_labels_are_bounded_and_scaled() {
        let r = Registry::new();
        let mut d = Dashboard::new(&r, None, HashMap::new(), 2, 1, 100);
        let rec = |cid, sport, dport, proto, rate| FlowRecord {
            sampler_address: Some("192.0.2.1".parse().unwrap()),
            src_addr: "10.0.0.1".parse().unwrap(),
            dst_addr: "10.0.0.2".parse().unwrap(),
            etype: ETYPE_IPV4,
            proto,
            src_port: sport,
            dst_port: dport,
            bytes: 100,
            packets: 2,
            sampling_rate: rate,
            flow_direction: 1,
            cid,
            ..FlowRecord::default()
        };
        d.add(&FlowSummary::from_record(&rec(1, 40000, 443, 6, 0)));
        d.add(&FlowSummary::from_record(&rec(1, 443, 40001, 6, 10)));
        d.add(&FlowSummary::from_record(&rec(2, 53, 123, 17, 1)));
        d.add(&FlowSummary::from_record(&rec(3, 1, 2, 17, 1))); // third cid: other
        d.add(&FlowSummary::from_record(&rec(0, 0, 0, 1, 1)));
        d.add(&FlowSummary::from_record(&rec(0, 0, 0, 250, 1)));
        let mut h = rec(0, 0, 0, 1, 1);
        h.sampler_address = Some("192.0.2.2".parse().unwrap()); // second host: other
        d.add(&FlowSummary::from_record(&h));
        let s = scrape(&r);
        let has = |line: &str| assert!(s.contains(line), "missing {line}\n{s}");
        has("flowexport_dashboard_bytes_total{app=\"https\",cid=\"1\",direction=\"egress\",ip_version=\"4\",proto=\"tcp\"} 1100");
        has("flowexport_dashboard_packets_total{app=\"https\",cid=\"1\",direction=\"egress\",ip_version=\"4\",proto=\"tcp\"} 22");
        has("flowexport_dashboard_flows_total{app=\"https\",cid=\"1\",direction=\"egress\",ip_version=\"4\",proto=\"tcp\"} 2");
        has("flowexport_dashboard_bytes_total{app=\"dns\",cid=\"2\",direction=\"egress\",ip_version=\"4\",proto=\"udp\"} 100");
        has("flowexport_dashboard_bytes_total{app=\"other\",cid=\"other\",direction=\"egress\",ip_version=\"4\",proto=\"udp\"} 100");
        has("flowexport_dashboard_bytes_total{app=\"none\",cid=\"none\",direction=\"egress\",ip_version=\"4\",proto=\"icmp\"} 200");
        has("flowexport_dashboard_bytes_total{app=\"none\",cid=\"none\",direction=\"egress\",ip_version=\"4\",proto=\"other\"} 100");
        has("flowexport_dashboard_host_bytes_total{host=\"192.0.2.1\"} 1500");
        has("flowexport_dashboard_host_bytes_total{host=\"other\"} 100");
        has("flowexport_dashboard_host_flows_total{host=\"192.0.2.1\"} 6");
    }
}
