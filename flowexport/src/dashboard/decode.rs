//! One Kafka message into a [`FlowSummary`], in any of the formats the
//! dashboard reads.

use crate::record::FlowSummary;

/// Message format on the topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// goflow2 FlowMessage (proto/flow.proto), as collect/agent/enrich write.
    Protobuf,
    /// flowexport's JSON records (`--kafka-format json`).
    Json,
    /// pmacct's JSON (print/kafka plugins): `label`, `as_src`, `as_dst`,
    /// `bytes`, and when present `packets`, `ip_src`, `ip_dst`, `ip_proto`,
    /// `port_src`, `port_dst`, `sampling_rate`.
    PmacctJson,
}

/// Why a message could not be counted (the `reason` label).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a FlowMessage: {0}")]
    Protobuf(&'static str),
    #[error("not JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Protobuf(_) => "protobuf",
            DecodeError::Json(_) => "json",
        }
    }
}

/// Decodes one message.
pub fn decode(format: InputFormat, bytes: &[u8]) -> Result<FlowSummary, DecodeError> {
    match format {
        InputFormat::Protobuf => {
            crate::codec::protobuf::scan::scan(bytes).map_err(DecodeError::Protobuf)
        }
        InputFormat::Json => {
            // The same reader (and the same required fields) as enrich and
            // split use for `--in-format json`.
            let r = crate::record::from_json(bytes)?;
            Ok(FlowSummary::from_record(&r))
        }
        InputFormat::PmacctJson => Ok(crate::codec::pmacct::decode(bytes)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pmacct_json_as_flow_exporter_reads_it() {
        let f = decode(
            InputFormat::PmacctJson,
            br#"{"label":"bdr1.ny1","as_src":15169,"as_dst":6939,"bytes":52,"packets":1,"ip_src":"8.8.8.8","ip_dst":"192.0.2.1","ip_proto":"udp","port_src":53,"port_dst":40000}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            FlowSummary {
                host: "bdr1.ny1".into(),
                src_as: 15169,
                dst_as: 6939,
                bytes: 52,
                packets: 1,
                flows: 1,
                proto: Some(17),
                src_port: 53,
                dst_port: 40000,
                ip_version: Some(4),
                direction: None,
                cid: 0,
                src_as_name: String::new(),
                dst_as_name: String::new(),
            }
        );
        // flow-exporter's minimal schema.
        let f = decode(
            InputFormat::PmacctJson,
            br#"{"label": "r", "as_src": 1, "as_dst": 2, "bytes": 7}"#,
        )
        .unwrap();
        assert_eq!(
            (f.bytes, f.packets, f.proto, f.ip_version),
            (7, 0, None, None)
        );
        for bad in [
            &b"not json"[..],
            br#"{"label":"r"}"#,
            br#"{"bytes":"many"}"#,
        ] {
            assert_eq!(
                decode(InputFormat::PmacctJson, bad).unwrap_err().reason(),
                "json"
            );
        }
    }

    #[test]
    fn our_json_records_read_as_enrich_reads_them() {
        let mut r = crate::record::tests::sample();
        r.sampling_rate = 10;
        let f = decode(InputFormat::Json, r.to_json().as_bytes()).unwrap();
        assert_eq!(
            (f.bytes, f.packets, f.flows, f.cid),
            (r.bytes * 10, r.packets * 10, 1, r.cid)
        );
        assert_eq!(f.host.to_string(), r.sampler_address.unwrap().to_string());
        assert_eq!((f.src_as, f.dst_as), (r.src_as, r.dst_as));
        // The required fields of record::from_json: a record without its
        // counters or addresses is counted as undecodable.
        for bad in [
            &br#"{"src_addr":"10.0.0.1","dst_addr":"10.0.0.2","packets":1}"#[..],
            br#"{"dst_addr":"10.0.0.2","bytes":1,"packets":1}"#,
            b"{}",
        ] {
            assert_eq!(decode(InputFormat::Json, bad).unwrap_err().reason(), "json");
        }
    }
}
