//! NetFlow v5: a fixed header and 48-byte records, no templates.

use super::*;

impl NetflowDecoder {
    pub(super) fn decode_v5(&mut self, d: Datagram, out: &mut Vec<FlowRecord>) -> Result<()> {
        let Datagram {
            exporter, now_ns, ..
        } = d;
        let mut r = Reader::new(d.bytes);
        r.take(2, "v5 header")?;
        let count = r.u16("v5 header")? as usize;
        let uptime = r.u32("v5 header")?;
        let secs = r.u32("v5 header")? as u64;
        let nsecs = r.u32("v5 header")? as u64;
        let sequence = r.u32("v5 header")?;
        r.take(2, "v5 header")?; // engine type, engine id
        let sampling = (r.u16("v5 header")? & 0x3fff) as u64;
        if count == 0 || count > 30 {
            return Err(NetflowError::Length("v5 record count must be 1..30"));
        }
        if r.left() < count * 48 {
            return Err(NetflowError::Truncated("v5 records"));
        }
        let export_ms = secs * 1000 + nsecs / 1_000_000;
        for _ in 0..count {
            let b = r.take(48, "v5 record")?;
            let mut f = FlowRecord {
                flow_type: FlowType::NetFlowV5,
                time_received_ns: now_ns,
                sequence_num: sequence,
                sampling_rate: sampling,
                sampler_address: Some(exporter),
                src_addr: v4(&b[0..4]).expect("4 bytes"),
                dst_addr: v4(&b[4..8]).expect("4 bytes"),
                in_if: uint(&b[12..14]) as u32,
                out_if: uint(&b[14..16]) as u32,
                packets: uint(&b[16..20]),
                bytes: uint(&b[20..24]),
                time_flow_start_ns: uptime_to_wall_ms(export_ms, uptime, uint(&b[24..28]) as u32)
                    * 1_000_000,
                time_flow_end_ns: uptime_to_wall_ms(export_ms, uptime, uint(&b[28..32]) as u32)
                    * 1_000_000,
                src_port: uint(&b[32..34]) as u16,
                dst_port: uint(&b[34..36]) as u16,
                tcp_flags: b[37],
                proto: b[38],
                ip_tos: b[39],
                src_as: uint(&b[40..42]) as u32,
                dst_as: uint(&b[42..44]) as u32,
                etype: ETYPE_IPV4,
                ..FlowRecord::default()
            };
            icmp_from_port(&mut f, false);
            out.push(f);
        }
        Ok(())
    }
}
