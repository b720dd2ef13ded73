//! IPFIX (RFC 7011): the message, its template and options template sets
//! (variable-length and enterprise fields, withdrawals).

use super::*;

impl NetflowDecoder {
    pub(super) fn decode_ipfix(&mut self, d: Datagram, out: &mut Vec<FlowRecord>) -> Result<()> {
        let p = d.bytes;
        let mut r = Reader::new(p);
        r.take(2, "IPFIX header")?;
        let len = r.u16("IPFIX header")? as usize;
        if len > p.len() {
            return Err(NetflowError::Truncated("IPFIX message"));
        }
        if len < 16 {
            return Err(NetflowError::Length(
                "IPFIX message shorter than its header",
            ));
        }
        let mut r = Reader::new(&p[..len]);
        r.take(4, "IPFIX header")?;
        let h = Header::read_tail(&mut r, "IPFIX header", 10, d.exporter, 0, d.now_ns)?;
        while r.left() > 0 {
            let (id, body) = next_set(&mut r, &IPFIX_SET)?;
            match id {
                2 => self.ipfix_templates(&h, body, false)?,
                3 => self.ipfix_templates(&h, body, true)?,
                4..=255 => {}
                id => self.data_set(&h, id, body, out)?,
                // 0 and 1 are NetFlow v9 ids, not valid in IPFIX.
            }
        }
        Ok(())
    }

    pub(super) fn ipfix_templates(
        &mut self,
        h: &Header,
        body: &[u8],
        options: bool,
    ) -> Result<(), NetflowError> {
        let mut r = Reader::new(body);
        // A withdrawal is 4 bytes (id, count 0) in either set; anything
        // shorter is padding.
        while r.left() >= 4 {
            let id = r.u16("template")?;
            let count = r.u16("template")? as usize;
            if count == 0 {
                // Withdrawal: one template, or all of this kind (id 2 / 3).
                if id == 2 || id == 3 {
                    let (exp, dom) = (h.exporter, h.domain);
                    let want_options = id == 3;
                    self.templates.retain(|k, t| {
                        !(k.exporter == exp
                            && k.domain == dom
                            && k.version == 10
                            && t.options == want_options)
                    });
                } else {
                    self.templates.remove(&Self::key(h, id));
                }
                continue;
            }
            if options {
                let scope = r.u16("options template")? as usize;
                if scope == 0 || scope > count {
                    return Err(NetflowError::Template("bad scope field count"));
                }
            }
            if id < 256 {
                return Err(NetflowError::Template("template id below 256"));
            }
            let mut fields = Vec::with_capacity(count);
            for _ in 0..count {
                let field = Field::read(&mut r, "template field", true)?;
                if field.len == 0 {
                    return Err(NetflowError::Template("zero-length field"));
                }
                fields.push(field);
            }
            self.learn(h, id, fields, options);
            self.replay(h, id);
        }
        Ok(())
    }
}
