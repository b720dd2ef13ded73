//! The template cache (per exporter, domain and version) and the data held
//! until its template arrives (bounded in count and age).

use super::*;

impl NetflowDecoder {
    pub(super) fn key(h: &Header, id: u16) -> TemplateKey {
        TemplateKey {
            exporter: h.exporter,
            version: h.version,
            domain: h.domain,
            id,
        }
    }

    pub(super) fn learn(&mut self, h: &Header, id: u16, fields: Vec<Field>, options: bool) {
        let min_len = fields
            .iter()
            .map(|f| if f.len == VARLEN { 1 } else { f.len as usize })
            .sum();
        let key = Self::key(h, id);
        self.templates.insert(
            key,
            Arc::new(Template {
                layout: fields::Layout::new(fields),
                options,
                min_len,
            }),
        );
    }

    /// Decodes held data sets for the template just learned. Their flows go
    /// to the replay buffer, collected by the caller of `decode`.
    pub(super) fn replay(&mut self, h: &Header, id: u16) {
        let key = Self::key(h, id);
        if !self.pending.iter().any(|p| p.key == key) {
            return;
        }
        let mut keep = VecDeque::with_capacity(self.pending.len());
        let mut ready = Vec::new();
        for p in self.pending.drain(..) {
            if p.key == key {
                self.pending_bytes -= p.data.len();
                ready.push(p);
            } else {
                keep.push_back(p);
            }
        }
        self.pending = keep;
        for p in ready {
            let mut flows = Vec::new();
            if self.data_set(&p.header, id, &p.data, &mut flows).is_ok() {
                self.counters.pending_decoded += 1;
            }
            self.replayed.extend(flows);
        }
    }

    pub(super) fn expire_pending(&mut self, now_ns: u64) {
        while let Some(p) = self.pending.front() {
            if now_ns.saturating_sub(p.since_ns) < self.pending_ttl_ns {
                break;
            }
            self.pending_bytes -= p.data.len();
            self.pending.pop_front();
            self.counters.pending_expired += 1;
        }
    }

    pub(super) fn hold(&mut self, h: &Header, id: u16, data: &[u8]) {
        while self.pending_bytes + data.len() > self.pending_max_bytes {
            match self.pending.pop_front() {
                Some(p) => {
                    self.pending_bytes -= p.data.len();
                    self.counters.pending_expired += 1;
                }
                None => {
                    // Larger than the whole holding area.
                    self.counters.pending_expired += 1;
                    return;
                }
            }
        }
        self.pending_bytes += data.len();
        self.counters.pending_held += 1;
        self.pending.push_back(Pending {
            key: Self::key(h, id),
            header: *h,
            data: data.to_vec(),
            since_ns: h.time_received_ns,
        });
    }
}
