//! NetFlow v9 (RFC 3954): the packet, its template and options template
//! FlowSets.

use super::*;

impl NetflowDecoder {
    pub(super) fn decode_v9(
        &mut self,
        exporter: IpAddr,
        r: &mut Reader<'_>,
        now_ns: u64,
        out: &mut Vec<FlowRecord>,
    ) -> Result<(), NetflowError> {
        let _count = r.u16("v9 header")?;
        let uptime = r.u32("v9 header")?;
        let h = Header::read_tail(r, "v9 header", 9, exporter, uptime, now_ns)?;
        while r.left() >= 4 {
            let id = r.u16("flowset header")?;
            let len = r.u16("flowset header")? as usize;
            if len < 4 {
                return Err(NetflowError::Length("flowset shorter than its header"));
            }
            let body = r.take(len - 4, "flowset")?;
            match id {
                0 => self.v9_templates(&h, body)?,
                1 => self.v9_options_templates(&h, body)?,
                2..=255 => {} // reserved
                id => self.data_set(&h, id, body, out)?,
            }
        }
        Ok(())
    }

    pub(super) fn v9_templates(&mut self, h: &Header, body: &[u8]) -> Result<(), NetflowError> {
        let mut r = Reader::new(body);
        while r.left() >= 4 {
            let id = r.u16("template")?;
            let count = r.u16("template")? as usize;
            if id < 256 {
                return Err(NetflowError::Template("template id below 256"));
            }
            let mut fields = Vec::with_capacity(count);
            for _ in 0..count {
                let fid = r.u16("template field")?;
                let len = r.u16("template field")?;
                fields.push(Field {
                    id: fid,
                    pen: 0,
                    len,
                });
            }
            if fields.is_empty() || fields.iter().any(|f| f.len == 0 || f.len == VARLEN) {
                return Err(NetflowError::Template(
                    "v9 fields need a fixed, non-zero length",
                ));
            }
            self.learn(h, id, fields, false);
            self.replay(h, id);
        }
        Ok(())
    }

    pub(super) fn v9_options_templates(
        &mut self,
        h: &Header,
        body: &[u8],
    ) -> Result<(), NetflowError> {
        let mut r = Reader::new(body);
        while r.left() >= 6 {
            let id = r.u16("options template")?;
            let scope_len = r.u16("options template")? as usize;
            let opt_len = r.u16("options template")? as usize;
            if id < 256 || !scope_len.is_multiple_of(4) || !opt_len.is_multiple_of(4) {
                return Err(NetflowError::Template("bad v9 options template header"));
            }
            let mut fields = Vec::new();
            for _ in 0..(scope_len + opt_len) / 4 {
                let fid = r.u16("options template field")?;
                let len = r.u16("options template field")?;
                if len == 0 {
                    return Err(NetflowError::Template("zero-length options field"));
                }
                fields.push(Field {
                    id: fid,
                    pen: 0,
                    len,
                });
            }
            if fields.is_empty() {
                return Err(NetflowError::Template("options template without fields"));
            }
            self.learn(h, id, fields, true);
            self.replay(h, id);
        }
        Ok(())
    }
}
