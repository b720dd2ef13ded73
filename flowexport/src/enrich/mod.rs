//! Enrichment (the transform stage of `flowexport enrich`): customer ids
//! from a CIDR list and AS numbers/names from an ASN table, applied to
//! [`FlowRecord`]s in place. Pure: the tables are built from file text by
//! [`files`] and swapped whole on reload.

pub mod files;
#[cfg(test)]
pub(crate) mod mmdb_fixture;
pub mod prefix;

use std::path::{Path, PathBuf};

use crate::record::FlowRecord;
use files::{AsInfo, FileError};
use prefix::PrefixTable;

/// Where AS numbers and names come from.
pub enum AsnDb {
    /// `prefix,asn[,name]` lines.
    Csv(PrefixTable<AsInfo>),
    /// A MaxMind-format ASN database (GeoLite2-ASN and compatible):
    /// `autonomous_system_number` and `autonomous_system_organization`.
    Mmdb(maxminddb::Reader<Vec<u8>>),
}

impl std::fmt::Debug for AsnDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AsnDb::Csv(t) => write!(f, "AsnDb::Csv({} prefixes)", t.len()),
            AsnDb::Mmdb(r) => write!(f, "AsnDb::Mmdb({})", r.metadata.database_type),
        }
    }
}

#[derive(serde::Deserialize)]
struct MmdbAsn<'a> {
    autonomous_system_number: Option<u32>,
    autonomous_system_organization: Option<&'a str>,
}

/// The marker that starts a MaxMind DB's metadata section.
const MMDB_MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";

impl AsnDb {
    /// A MaxMind DB when the bytes carry its metadata marker, else the CSV
    /// format. Errors name the file (and line, for CSV).
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<AsnDb, FileError> {
        if bytes.windows(MMDB_MARKER.len()).any(|w| w == MMDB_MARKER) {
            let bad = |reason: String| FileError::Format {
                path: path.display().to_string(),
                reason: format!("not a valid MaxMind DB: {reason}"),
            };
            // maxminddb 0.26 can panic (slice out of range) on a damaged
            // metadata section instead of returning an error: contain it.
            let r = std::panic::catch_unwind(move || maxminddb::Reader::from_source(bytes))
                .map_err(|_| bad("the reader failed on its metadata".into()))?
                .map_err(|e| bad(e.to_string()))?;
            return Ok(AsnDb::Mmdb(r));
        }
        let text = String::from_utf8(bytes).map_err(|_| FileError::Format {
            path: path.display().to_string(),
            reason: "neither a MaxMind DB nor UTF-8 text (`prefix,asn[,name]` lines)".into(),
        })?;
        Ok(AsnDb::Csv(files::parse_asn_csv(path, &text)?))
    }

    /// Reads and parses the file at `path` (see [`AsnDb::parse`]).
    pub fn load(path: &Path) -> Result<AsnDb, FileError> {
        let bytes = std::fs::read(path).map_err(|source| FileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        AsnDb::parse(path, bytes)
    }

    /// AS number and name of the network holding `a`.
    pub fn get(&self, a: std::net::IpAddr) -> Option<(u32, &str)> {
        match self {
            AsnDb::Csv(t) => t.get(a).map(|i| (i.asn, &*i.name)),
            AsnDb::Mmdb(r) => {
                // A lookup error (a corrupt record) counts as no match; a
                // panic in the reader on damaged data is contained the same
                // way.
                let m: MmdbAsn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    r.lookup::<MmdbAsn>(a).ok().flatten()
                }))
                .ok()??;
                Some((
                    m.autonomous_system_number?,
                    m.autonomous_system_organization.unwrap_or(""),
                ))
            }
        }
    }

    /// Every AS number with its name (the dashboard's labels). A MaxMind DB
    /// is walked once, network by network; records that do not decode are
    /// skipped.
    pub fn names(&self) -> std::collections::HashMap<u32, String> {
        let mut names = std::collections::HashMap::new();
        match self {
            AsnDb::Csv(t) => {
                for a in t.values() {
                    names.insert(a.asn, a.name.to_string());
                }
            }
            AsnDb::Mmdb(r) => {
                let all: ipnetwork::IpNetwork = if r.metadata.ip_version == 6 {
                    "::/0".parse().expect("valid network")
                } else {
                    "0.0.0.0/0".parse().expect("valid network")
                };
                let Ok(iter) = r.within::<MmdbAsn>(all) else {
                    return names;
                };
                for item in iter.flatten() {
                    if let Some(asn) = item.info.autonomous_system_number {
                        names.entry(asn).or_insert_with(|| {
                            item.info
                                .autonomous_system_organization
                                .unwrap_or("")
                                .to_string()
                        });
                    }
                }
            }
        }
        names
    }

    /// Prefixes (CSV) or networks (MaxMind DB nodes) in the database.
    pub fn size(&self) -> usize {
        match self {
            AsnDb::Csv(t) => t.len(),
            AsnDb::Mmdb(r) => r.metadata.node_count as usize,
        }
    }
}

/// The tables one enrichment pass uses.
#[derive(Debug, Default)]
pub struct Enricher {
    customers: PrefixTable<u32>,
    asn: Option<AsnDb>,
}

/// Where the tables come from, so they can be read again on SIGHUP.
#[derive(Clone, Debug)]
pub struct Sources {
    pub customers: PathBuf,
    /// ASN database: a MaxMind DB or `prefix,asn[,name]` CSV.
    pub asn_db: Option<PathBuf>,
}

impl Enricher {
    pub fn new(customers: PrefixTable<u32>, asn: Option<AsnDb>) -> Enricher {
        Enricher { customers, asn }
    }

    /// Reads every file; any error names the file and line.
    pub fn load(s: &Sources) -> Result<Enricher, FileError> {
        let customers = files::load(&s.customers, files::parse_customers)?;
        let asn = s.asn_db.as_deref().map(AsnDb::load).transpose()?;
        Ok(Enricher { customers, asn })
    }

    pub(crate) fn customer_prefixes(&self) -> usize {
        self.customers.len()
    }

    pub(crate) fn asn_prefixes(&self) -> usize {
        self.asn.as_ref().map_or(0, AsnDb::size)
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
            if let Some((asn, name)) = t.get(r.src_addr) {
                r.src_as = asn;
                set_name(&mut r.src_as_name, name);
            }
            if let Some((asn, name)) = t.get(r.dst_addr) {
                r.dst_as = asn;
                set_name(&mut r.dst_as_name, name);
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
        Enricher::new(c, Some(AsnDb::Csv(a)))
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

    /// `r` through `e`: its AS numbers and names.
    fn enriched_as<'r>(e: &Enricher, r: &'r mut FlowRecord) -> (u32, &'r str, u32, &'r str) {
        e.apply(r);
        (r.src_as, &r.src_as_name, r.dst_as, &r.dst_as_name)
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
    fn maxmind_asn_database_read_by_the_maxminddb_crate() {
        let db = mmdb_fixture::asn_mmdb(&[
            ("10.0.0.0/8", 64500, "EXAMPLE-NET"),
            ("10.1.0.0/16", 64510, "MORE-SPECIFIC"),
            ("198.51.100.0/24", 64501, "DOC-NET, Example Org"),
            ("2001:db8::/32", 64502, "V6-NET"),
        ]);
        let asn = AsnDb::parse(Path::new("asn.mmdb"), db).unwrap();
        assert!(matches!(asn, AsnDb::Mmdb(_)));
        let g = |a: &str| asn.get(a.parse().unwrap());
        assert_eq!(g("10.9.9.9"), Some((64500, "EXAMPLE-NET")));
        assert_eq!(g("10.1.2.3"), Some((64510, "MORE-SPECIFIC")));
        assert_eq!(g("198.51.100.77"), Some((64501, "DOC-NET, Example Org")));
        assert_eq!(g("2001:db8:1::1"), Some((64502, "V6-NET")));
        assert_eq!(g("192.0.2.1"), None);
        assert_eq!(g("2001:db9::1"), None);
        let e = Enricher::new(PrefixTable::default(), Some(asn));
        let mut r = flow("10.1.0.1", "198.51.100.1", 0);
        assert_eq!(
            enriched_as(&e, &mut r),
            (64510, "MORE-SPECIFIC", 64501, "DOC-NET, Example Org")
        );
        // Damaged: the marker without a valid database behind it.
        let e = AsnDb::parse(
            Path::new("bad.mmdb"),
            b"xx\xab\xcd\xefMaxMind.comxx".to_vec(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("bad.mmdb: not a valid MaxMind DB"),
            "{e}"
        );
        // Every AS with its name, for the dashboard.
        let db = mmdb_fixture::asn_mmdb(&[
            ("10.0.0.0/8", 64500, "EXAMPLE-NET"),
            ("10.1.0.0/16", 64510, "MORE-SPECIFIC"),
            ("2001:db8::/32", 64502, "V6-NET"),
        ]);
        let names = AsnDb::parse(Path::new("asn.mmdb"), db).unwrap().names();
        assert_eq!(
            names,
            std::collections::HashMap::from([
                (64500, "EXAMPLE-NET".to_string()),
                (64510, "MORE-SPECIFIC".to_string()),
                (64502, "V6-NET".to_string()),
            ])
        );
        // And CSV text goes to the CSV parser.
        let csv = AsnDb::parse(Path::new("a.csv"), b"10.0.0.0/8,64500\n".to_vec()).unwrap();
        assert_eq!(csv.get("10.0.0.1".parse().unwrap()), Some((64500, "")));
    }

    #[test]
    fn as_numbers_and_names_where_the_table_has_them() {
        let e = enricher();
        let mut r = flow("10.9.9.9", "198.51.100.1", 0);
        assert_eq!(enriched_as(&e, &mut r), (64500, "EXAMPLE-NET", 64501, ""));
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
