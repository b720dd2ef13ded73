//! `FlowRecord`: the one flow record every stage of flowexport passes along,
//! from the agent's drain and the collector's decoders to every sink.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::{IpAddr, Ipv4Addr};

/// Where a record came from, as goflow2's `FlowMessage.type` names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlowType {
    #[default]
    Unknown,
    SFlow5,
    NetFlowV5,
    NetFlowV9,
    Ipfix,
    Ebpf,
}

impl FlowType {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowType::Unknown => "FLOWUNKNOWN",
            FlowType::SFlow5 => "SFLOW_5",
            FlowType::NetFlowV5 => "NETFLOW_V5",
            FlowType::NetFlowV9 => "NETFLOW_V9",
            FlowType::Ipfix => "IPFIX",
            FlowType::Ebpf => "EBPF",
        }
    }
}

impl Serialize for FlowType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FlowType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "SFLOW_5" => FlowType::SFlow5,
            "NETFLOW_V5" => FlowType::NetFlowV5,
            "NETFLOW_V9" => FlowType::NetFlowV9,
            "IPFIX" => FlowType::Ipfix,
            "EBPF" => FlowType::Ebpf,
            _ => FlowType::Unknown,
        })
    }
}

/// Ethertypes as goflow2 reports them in `etype`.
pub const ETYPE_IPV4: u16 = 0x0800;
pub const ETYPE_IPV6: u16 = 0x86dd;

/// One flow (or one active-timeout slice of a long flow). Field names are
/// goflow2's JSON names; times are wall-clock nanoseconds since the epoch.
/// Reads back from that JSON ([`from_json`]): `src_addr`, `dst_addr`,
/// `bytes` and `packets` are required (a record without them is malformed,
/// not a zero flow); any other missing field is 0/empty, unknown fields are
/// ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    #[serde(default, rename = "type")]
    pub flow_type: FlowType,
    #[serde(default)]
    pub time_received_ns: u64,
    #[serde(default)]
    pub sequence_num: u32,
    #[serde(default)]
    pub sampling_rate: u64,
    #[serde(default, with = "addr_text")]
    pub sampler_address: Option<IpAddr>,
    #[serde(default)]
    pub time_flow_start_ns: u64,
    #[serde(default)]
    pub time_flow_end_ns: u64,
    pub bytes: u64,
    pub packets: u64,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    #[serde(default)]
    pub etype: u16,
    #[serde(default)]
    pub proto: u8,
    #[serde(default)]
    pub src_port: u16,
    #[serde(default)]
    pub dst_port: u16,
    #[serde(default)]
    pub in_if: u32,
    #[serde(default)]
    pub out_if: u32,
    #[serde(default)]
    pub vlan_id: u16,
    #[serde(default)]
    pub tcp_flags: u8,
    #[serde(default)]
    pub icmp_type: u8,
    #[serde(default)]
    pub icmp_code: u8,
    /// 0 = ingress, 1 = egress (as goflow2's `flow_direction`).
    #[serde(default)]
    pub flow_direction: u8,
    #[serde(default)]
    pub ip_tos: u8,
    #[serde(default)]
    pub src_as: u32,
    #[serde(default)]
    pub dst_as: u32,
    /// MAC addresses in the low 48 bits, as goflow2 carries them.
    #[serde(default)]
    pub src_mac: u64,
    #[serde(default)]
    pub dst_mac: u64,
    /// IPFIX observation domain / NetFlow v9 source id of the exporter.
    #[serde(default)]
    pub observation_domain_id: u32,
    /// Customer ids set by `flowexport enrich` (0 = none): of the source,
    /// the destination, and the local side. Left out of JSON when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub src_cid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dst_cid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cid: u32,
    /// AS names from enrich's ASN database. Left out of JSON when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub src_as_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dst_as_name: String,
    /// A flow that came out of a tunnel (`--capture afxdp`, decapsulated):
    /// the tunnel, its VNI / GRE key / ERSPAN session id, and the outer
    /// addresses. Left out of JSON when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_type: Option<TunnelType>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tunnel_id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "addr_text")]
    pub outer_src_addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "addr_text")]
    pub outer_dst_addr: Option<IpAddr>,
}

/// The tunnel a decapsulated flow came in (`tunnel_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelType {
    /// VXLAN (UDP 4789); the id is the VNI.
    Vxlan,
    /// GENEVE (UDP 6081); the id is the VNI.
    Geneve,
    /// GRE carrying Ethernet or IP; the id is the GRE key (0 without one).
    Gre,
    /// ERSPAN type I, II or III (GRE 0x88BE / 0x22EB); the id is the
    /// session id.
    Erspan,
    /// IPv4 or IPv6 in IP (protocol 4 / 41); no id.
    Ipip,
}

impl TunnelType {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelType::Vxlan => "vxlan",
            TunnelType::Geneve => "geneve",
            TunnelType::Gre => "gre",
            TunnelType::Erspan => "erspan",
            TunnelType::Ipip => "ipip",
        }
    }

    pub const ALL: [TunnelType; 5] = [
        TunnelType::Vxlan,
        TunnelType::Geneve,
        TunnelType::Gre,
        TunnelType::Erspan,
        TunnelType::Ipip,
    ];

    /// The tunnel `as_str` names `s`.
    pub fn from_name(s: &str) -> Option<TunnelType> {
        TunnelType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Default for FlowRecord {
    fn default() -> Self {
        FlowRecord {
            flow_type: FlowType::Unknown,
            time_received_ns: 0,
            sequence_num: 0,
            sampling_rate: 0,
            sampler_address: None,
            time_flow_start_ns: 0,
            time_flow_end_ns: 0,
            bytes: 0,
            packets: 0,
            src_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            etype: 0,
            proto: 0,
            src_port: 0,
            dst_port: 0,
            in_if: 0,
            out_if: 0,
            vlan_id: 0,
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
            flow_direction: 0,
            ip_tos: 0,
            src_as: 0,
            dst_as: 0,
            src_mac: 0,
            dst_mac: 0,
            observation_domain_id: 0,
            src_cid: 0,
            dst_cid: 0,
            cid: 0,
            src_as_name: String::new(),
            dst_as_name: String::new(),
            tunnel_type: None,
            tunnel_id: 0,
            outer_src_addr: None,
            outer_dst_addr: None,
        }
    }
}

/// A record from its JSON line (the stdout sink's and `--kafka-format
/// json`'s object).
pub fn from_json(bytes: &[u8]) -> Result<FlowRecord, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// An optional address as text, "" for none (goflow2's JSON).
mod addr_text {
    use super::*;

    pub(super) fn serialize<S: Serializer>(a: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

/// IP protocol numbers by name (pmacct's `ip_proto` names, `--filter
/// proto=`), case-insensitive.
pub fn ip_proto_number(name: &str) -> Option<u8> {
    Some(match name.to_ascii_lowercase().as_str() {
        "icmp" => 1,
        "igmp" => 2,
        "tcp" => 6,
        "udp" => 17,
        "ipv6" => 41,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "ipv6-icmp" | "icmpv6" => 58,
        "ospf" => 89,
        "pim" => 103,
        "sctp" => 132,
        "udplite" | "udp-lite" => 136,
        _ => return None,
    })
}

impl FlowRecord {
    /// One JSON object, goflow2 field names, no trailing newline.
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(512);
        crate::codec::json::write_record(&mut out, self);
        String::from_utf8(out).expect("JSON is UTF-8")
    }
}

/// The part of a flow that counting needs (the dashboard's input), with
/// its counters already scaled by the sampling rate. Read straight off the
/// wire by [`crate::codec::protobuf::scan`] and [`crate::codec::pmacct`],
/// or taken from a [`FlowRecord`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowSummary {
    /// The exporter: sampler_address, or pmacct's `label`.
    pub host: Host,
    /// AS numbers (0: unknown).
    pub src_as: u32,
    pub dst_as: u32,
    /// Counts scaled by the sampling rate.
    pub bytes: u64,
    pub packets: u64,
    /// Flows this record stands for (1; the sampling rate does not apply).
    pub flows: u64,
    /// IP protocol; None when the source does not say.
    pub proto: Option<u8>,
    /// Ports (0 for protocols without them): the `app` label.
    pub src_port: u16,
    pub dst_port: u16,
    /// 4 or 6; None when the source does not say.
    pub ip_version: Option<u8>,
    /// 0 ingress, 1 egress; None when the source does not say.
    pub direction: Option<u8>,
    /// Customer id (0: none).
    pub cid: u32,
    /// AS names the record carries (enrich sets them); used when the
    /// dashboard's own name files do not know the AS.
    pub src_as_name: String,
    pub dst_as_name: String,
}

/// An exporter as the dashboard labels it; an address is turned into text
/// only when its series is created, not per record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Addr(Option<IpAddr>),
    Label(String),
}

impl Default for Host {
    fn default() -> Host {
        Host::Addr(None)
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Addr(Some(a)) => write!(f, "{a}"),
            Host::Addr(None) => Ok(()),
            Host::Label(l) => f.write_str(l),
        }
    }
}

impl From<&str> for Host {
    fn from(s: &str) -> Host {
        Host::Label(s.to_string())
    }
}

impl FlowSummary {
    pub fn from_record(r: &FlowRecord) -> FlowSummary {
        let scale = r.sampling_rate.max(1);
        FlowSummary {
            host: Host::Addr(r.sampler_address),
            src_as: r.src_as,
            dst_as: r.dst_as,
            bytes: r.bytes.saturating_mul(scale),
            packets: r.packets.saturating_mul(scale),
            flows: 1,
            proto: Some(r.proto),
            src_port: r.src_port,
            dst_port: r.dst_port,
            ip_version: Some(ip_version(r.etype, r.src_addr)),
            direction: Some(r.flow_direction),
            cid: r.cid,
            src_as_name: r.src_as_name.clone(),
            dst_as_name: r.dst_as_name.clone(),
        }
    }
}

/// 4 or 6: from the ethertype, else from the source address's family.
pub fn ip_version(etype: u16, src: IpAddr) -> u8 {
    match etype {
        ETYPE_IPV4 => 4,
        ETYPE_IPV6 => 6,
        _ if src.is_ipv4() => 4,
        _ => 6,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn tunnel_names_read_back() {
        for t in TunnelType::ALL {
            assert_eq!(TunnelType::from_name(t.as_str()), Some(t));
            // The same name as serde's (JSON records).
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{}\"", t.as_str())
            );
        }
        assert_eq!(TunnelType::from_name("VXLAN"), None);
    }

    /// A record with every field set (IPv6, a tunnel, AS names), for the
    /// codecs' and sinks' tests.
    pub(crate) fn sample() -> FlowRecord {
        FlowRecord {
            flow_type: FlowType::Ebpf,
            time_received_ns: 1_763_800_000_000_000_000,
            sequence_num: 7,
            sampling_rate: 0,
            sampler_address: Some("192.0.2.1".parse().unwrap()),
            time_flow_start_ns: 1_763_799_999_000_000_000,
            time_flow_end_ns: 1_763_799_999_500_000_000,
            bytes: 1500,
            packets: 3,
            src_addr: "2001:db8::1".parse().unwrap(),
            dst_addr: "2001:db8::2".parse().unwrap(),
            etype: 0x86dd,
            proto: 6,
            src_port: 443,
            dst_port: 50000,
            in_if: 0,
            out_if: 4,
            vlan_id: 10,
            tcp_flags: 0x18,
            icmp_type: 0,
            icmp_code: 0,
            flow_direction: 1,
            ip_tos: 0x2e,
            src_as: 64500,
            dst_as: 64501,
            src_mac: 0x0200_0000_00aa,
            dst_mac: 0x0200_0000_00bb,
            observation_domain_id: 9,
            src_cid: 0,
            dst_cid: 17,
            cid: 17,
            src_as_name: "EXAMPLE-AS".into(),
            dst_as_name: String::new(),
            tunnel_type: Some(TunnelType::Vxlan),
            tunnel_id: 4242,
            outer_src_addr: Some("192.0.2.100".parse().unwrap()),
            outer_dst_addr: Some("2001:db8::100".parse().unwrap()),
        }
    }

    #[test]
    fn json_reads_back_what_it_wrote() {
        // Every field set (the protobuf tests' sample lists them all).
        let full = sample();
        let mut none = full.clone();
        none.sampler_address = None;
        none.flow_type = FlowType::Unknown;
        for r in [full, none] {
            assert_eq!(from_json(r.to_json().as_bytes()).unwrap(), r);
        }
        // Optional fields missing are zero, unknown ones ignored; bad
        // addresses and wrong types are errors.
        let r =
            from_json(br#"{"src_addr":"10.1.1.1","dst_addr":"::1","bytes":5,"packets":2,"x":[1]}"#)
                .unwrap();
        assert_eq!(
            (r.bytes, r.packets, r.proto, r.sampler_address),
            (5, 2, 0, None)
        );
        assert!(
            from_json(br#"{"src_addr":"10.1.1","dst_addr":"::1","bytes":5,"packets":2}"#).is_err()
        );
        assert!(from_json(
            br#"{"src_addr":"10.1.1.1","dst_addr":"::1","bytes":"five","packets":2}"#
        )
        .is_err());
        // The addresses and counters are required: without them a record is
        // malformed, not a zero flow.
        for missing in ["src_addr", "dst_addr", "bytes", "packets"] {
            let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
            v.as_object_mut().unwrap().remove(missing);
            let e = from_json(v.to_string().as_bytes()).unwrap_err().to_string();
            assert!(e.contains(&format!("missing field `{missing}`")), "{e}");
        }
        assert!(from_json(b"not json").is_err());
    }
}
