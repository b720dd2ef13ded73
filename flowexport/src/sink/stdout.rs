//! The embedded default sink: one JSON object per line on stdout.

use std::io::Write;

use super::{Sink, SinkError};
use crate::record::FlowRecord;

/// Writes JSON lines to any writer (stdout in the agent).
pub struct JsonLinesSink<W: Write + Send> {
    out: W,
    line: Vec<u8>,
}

impl<W: Write + Send> JsonLinesSink<W> {
    pub fn new(out: W) -> Self {
        JsonLinesSink {
            out,
            line: Vec::with_capacity(64 * 1024),
        }
    }
}

impl JsonLinesSink<std::io::Stdout> {
    pub fn stdout() -> Self {
        Self::new(std::io::stdout())
    }
}

impl<W: Write + Send> Sink for JsonLinesSink<W> {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        self.line.clear();
        for r in records {
            serde_json::to_writer(&mut self.line, r).expect("FlowRecord serializes to JSON");
            self.line.push(b'\n');
        }
        // One write per batch keeps lines whole even if stdout is a pipe
        // shared with nobody else; flush so a reader sees records promptly.
        let io = |source| SinkError::Io {
            sink: "stdout",
            source,
        };
        self.out.write_all(&self.line).map_err(io)?;
        self.out.flush().map_err(io)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|source| SinkError::Io {
            sink: "stdout",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::FlowType;

    #[test]
    fn writes_one_line_per_record() {
        let rec = FlowRecord {
            flow_type: FlowType::Ebpf,
            time_received_ns: 1,
            sequence_num: 0,
            sampling_rate: 0,
            sampler_address: None,
            time_flow_start_ns: 2,
            time_flow_end_ns: 3,
            bytes: 60,
            packets: 1,
            src_addr: "10.1.1.1".parse().unwrap(),
            dst_addr: "10.1.1.2".parse().unwrap(),
            etype: 0x800,
            proto: 6,
            src_port: 1,
            dst_port: 2,
            in_if: 4,
            out_if: 0,
            vlan_id: 0,
            tcp_flags: 2,
            flow_direction: 0,
            ..FlowRecord::default()
        };
        let mut sink = JsonLinesSink::new(Vec::new());
        sink.send(&[rec.clone(), rec]).unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["src_addr"], "10.1.1.1");
        assert_eq!(v["tcp_flags"], 2);
        assert!(text.ends_with('\n'));
    }
}
