//! Enrichment (the transform stage of `flowexport enrich`): customer ids
//! from a CIDR list and AS numbers/names from an ASN table, applied to
//! [`FlowRecord`]s in place. Pure: the tables are built from file text by
//! [`files`] and swapped whole on reload.

pub mod files;
pub mod prefix;

use std::path::{Path, PathBuf};

use crate::record::FlowRecord;
use files::{AsInfo, FileError};
use prefix::PrefixTable;

/// The tables one enrichment pass uses.
#[derive(Debug, Default)]
pub struct Enricher {
    customers: PrefixTable<u32>,
    asn: Option<PrefixTable<AsInfo>>,
}

/// Where the tables come from, so they can be read again on SIGHUP.
#[derive(Clone, Debug)]
pub struct Sources {
    pub customers: PathBuf,
    pub asn_csv: Option<PathBuf>,
}

impl Enricher {
    pub fn new(customers: PrefixTable<u32>, asn: Option<PrefixTable<AsInfo>>) -> Enricher {
        Enricher { customers, asn }
    }

    /// Reads every file; any error names the file and line.
    pub fn load(s: &Sources) -> Result<Enricher, FileError> {
        let customers = files::load(&s.customers, files::parse_customers)?;
        let asn = s
            .asn_csv
            .as_deref()
            .map(|p: &Path| files::load(p, files::parse_asn_csv))
            .transpose()?;
        Ok(Enricher { customers, asn })
    }

    pub fn customer_prefixes(&self) -> usize {
        self.customers.len()
    }

    pub fn asn_prefixes(&self) -> usize {
        self.asn.as_ref().map_or(0, |t| t.len())
    }

    /// Sets `src_cid`, `dst_cid` and `cid`, and (with an ASN table) the AS
    /// numbers and names of both ends. Returns whether the flow has a
    /// customer (`cid != 0`).
    ///
    /// The local side (`cid`): the destination of an ingress flow
    /// (`flow_direction` 0, which is also what exporters without a
    /// direction report) and the source of an egress flow (1); when that
    /// side has no customer, the other side's customer. AS numbers from the
    /// table replace the exporter's only where the table has a prefix for
    /// the address; elsewhere the exporter's numbers stay.
    pub fn apply(&self, r: &mut FlowRecord) -> bool {
        r.src_cid = self.customers.get(r.src_addr).copied().unwrap_or(0);
        r.dst_cid = self.customers.get(r.dst_addr).copied().unwrap_or(0);
        let (local, remote) = if r.flow_direction == 1 {
            (r.src_cid, r.dst_cid)
        } else {
            (r.dst_cid, r.src_cid)
        };
        r.cid = if local != 0 { local } else { remote };
        if let Some(t) = &self.asn {
            if let Some(a) = t.get(r.src_addr) {
                r.src_as = a.asn;
                set_name(&mut r.src_as_name, &a.name);
            }
            if let Some(a) = t.get(r.dst_addr) {
                r.dst_as = a.asn;
                set_name(&mut r.dst_as_name, &a.name);
            }
        }
        r.cid != 0
    }
}

fn set_name(dst: &mut String, name: &str) {
    dst.clear();
    dst.push_str(name);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enricher() -> Enricher {
        let c = files::parse_customers(
            Path::new("c"),
            "10.1.0.0/16,1\n10.2.0.0/16,2\n2001:db8:1::/48,3\n",
        )
        .unwrap();
        let a = files::parse_asn_csv(
            Path::new("a"),
            "10.0.0.0/8,64500,EXAMPLE-NET\n198.51.100.0/24,64501\n",
        )
        .unwrap();
        Enricher::new(c, Some(a))
    }

    fn flow(src: &str, dst: &str, dir: u8) -> FlowRecord {
        FlowRecord {
            src_addr: src.parse().unwrap(),
            dst_addr: dst.parse().unwrap(),
            flow_direction: dir,
            src_as: 1,
            dst_as: 2,
            ..FlowRecord::default()
        }
    }

    #[test]
    fn local_side_customer_by_direction() {
        let e = enricher();
        // Ingress 10.1 -> 10.2: local is the destination.
        let mut r = flow("10.1.0.5", "10.2.0.5", 0);
        assert!(e.apply(&mut r));
        assert_eq!((r.src_cid, r.dst_cid, r.cid), (1, 2, 2));
        // Egress: local is the source.
        let mut r = flow("10.1.0.5", "10.2.0.5", 1);
        e.apply(&mut r);
        assert_eq!((r.src_cid, r.dst_cid, r.cid), (1, 2, 1));
        // Ingress from a customer to an outside address: the other side.
        let mut r = flow("2001:db8:1::7", "2001:db8:9::1", 0);
        e.apply(&mut r);
        assert_eq!((r.src_cid, r.dst_cid, r.cid), (3, 0, 3));
        // No customer at all.
        let mut r = flow("192.0.2.1", "192.0.2.2", 0);
        assert!(!e.apply(&mut r));
        assert_eq!((r.src_cid, r.dst_cid, r.cid), (0, 0, 0));
    }

    #[test]
    fn as_numbers_and_names_where_the_table_has_them() {
        let e = enricher();
        let mut r = flow("10.9.9.9", "198.51.100.1", 0);
        e.apply(&mut r);
        assert_eq!(
            (
                r.src_as,
                r.src_as_name.as_str(),
                r.dst_as,
                r.dst_as_name.as_str()
            ),
            (64500, "EXAMPLE-NET", 64501, "")
        );
        // Not in the table: the exporter's numbers stay.
        let mut r = flow("192.0.2.1", "10.0.0.1", 0);
        e.apply(&mut r);
        assert_eq!(
            (r.src_as, r.dst_as, r.dst_as_name.as_str()),
            (1, 64500, "EXAMPLE-NET")
        );
        // Without a table nothing changes.
        let e = Enricher::new(PrefixTable::default(), None);
        let mut r = flow("10.9.9.9", "198.51.100.1", 0);
        e.apply(&mut r);
        assert_eq!((r.src_as, r.dst_as, r.src_as_name.as_str()), (1, 2, ""));
    }
}
