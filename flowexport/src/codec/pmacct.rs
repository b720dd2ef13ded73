//! pmacct's JSON flow objects (print and kafka plugins), as
//! neptune-networks/flow-exporter reads them: `label`, `as_src`, `as_dst`,
//! `bytes`, and when present `packets`, `ip_src`, `ip_dst`, `ip_proto`,
//! `port_src`, `port_dst`, `sampling_rate`.

use std::net::IpAddr;

use serde::Deserialize;

use crate::record::{ip_proto_number, ip_version, FlowSummary, Host};

/// pmacct's JSON object; `bytes` is required, the rest optional.
#[derive(Deserialize)]
struct PmacctFlow {
    #[serde(default)]
    label: String,
    #[serde(default)]
    as_src: u32,
    #[serde(default)]
    as_dst: u32,
    bytes: u64,
    packets: Option<u64>,
    ip_src: Option<String>,
    ip_dst: Option<String>,
    ip_proto: Option<serde_json::Value>,
    #[serde(default)]
    port_src: u16,
    #[serde(default)]
    port_dst: u16,
    sampling_rate: Option<u64>,
}

/// Decodes one pmacct JSON object into the counted fields, scaled by its
/// sampling rate; the exporter is its `label`.
pub fn decode(bytes: &[u8]) -> Result<FlowSummary, serde_json::Error> {
    let p: PmacctFlow = serde_json::from_slice(bytes)?;
    let scale = p.sampling_rate.unwrap_or(1).max(1);
    let addr = p
        .ip_src
        .as_deref()
        .or(p.ip_dst.as_deref())
        .and_then(|a| a.parse::<IpAddr>().ok());
    let proto = match &p.ip_proto {
        Some(serde_json::Value::String(s)) => ip_proto_number(s).or(s.parse().ok()),
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u8::try_from(n).ok()),
        _ => None,
    };
    Ok(FlowSummary {
        host: Host::Label(p.label),
        src_as: p.as_src,
        dst_as: p.as_dst,
        bytes: p.bytes.saturating_mul(scale),
        packets: p.packets.unwrap_or(0).saturating_mul(scale),
        flows: 1,
        proto,
        src_port: p.port_src,
        dst_port: p.port_dst,
        ip_version: addr.map(|a| ip_version(0, a)),
        direction: None,
        cid: 0,
        src_as_name: String::new(),
        dst_as_name: String::new(),
    })
}
