//! NetFlow v9 (RFC 3954): the packet, its template and options template
//! FlowSets.

use super::*;

impl NetflowDecoder {
    pub(super) fn decode_v9(&mut self, d: Datagram, out: &mut Vec<FlowRecord>) -> Result<()> {
        let mut r = Reader::new(d.bytes);
        r.take(4, "v9 header")?; // version, record count
        let uptime = r.u32("v9 header")?;
        let h = Header::read_tail(&mut r, "v9 header", 9, d.exporter, uptime, d.now_ns)?;
        while r.left() >= 4 {
            let (id, body) = next_set(&mut r, &V9_FLOWSET)?;
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
            let fields = (0..count)
                .map(|_| Field::read(&mut r, "template field", false))
                .collect::<Result<Vec<_>>>()?;
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
                let field = Field::read(&mut r, "options template field", false)?;
                if field.len == 0 {
                    return Err(NetflowError::Template("zero-length options field"));
                }
                fields.push(field);
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
