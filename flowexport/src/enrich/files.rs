//! The files `flowexport enrich` reads: the customer list (`prefix,cid`) and
//! the ASN table (`prefix,asn[,name]`). Pure parsers over text; the caller
//! reads the file. Every error names the file, the line and the reason, and
//! the tool refuses to start (or keeps its old tables on SIGHUP) on any.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::prefix::{Prefix, PrefixTable};

/// A bad line (or an unreadable file), with where it is.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
}

/// An AS from the ASN table: number and (possibly empty) name, shared by
/// every prefix of the AS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsInfo {
    pub asn: u32,
    pub name: Arc<str>,
}

/// Meaningful lines: `(line number, fields)`, with comments (`#` to the end
/// of the line) and blank lines skipped and fields trimmed. At most `max`
/// fields: the last keeps any further commas (AS names have them).
fn lines(text: &str, max: usize) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines().enumerate().filter_map(move |(i, l)| {
        let l = l.split('#').next().unwrap_or("").trim();
        (!l.is_empty()).then(|| (i + 1, l.splitn(max, ',').map(str::trim).collect()))
    })
}

/// Parses `text` of the file at `path` (used in messages) line by line:
/// `row` turns a line's fields into a prefix and value.
fn parse<T>(
    path: &Path,
    text: &str,
    max_fields: usize,
    mut row: impl FnMut(&[&str]) -> Result<(Prefix, T), String>,
) -> Result<PrefixTable<T>, FileError> {
    let mut first_line: HashMap<Prefix, usize> = HashMap::new();
    let mut entries = Vec::new();
    for (line, fields) in lines(text, max_fields) {
        let err = |reason: String| FileError::Line {
            path: path.display().to_string(),
            line,
            reason,
        };
        let (p, v) = row(&fields).map_err(err)?;
        if let Some(first) = first_line.insert(p, line) {
            return Err(err(format!(
                "duplicate prefix {p} (first on line {first}); keep one"
            )));
        }
        entries.push((p, v));
    }
    Ok(PrefixTable::new(entries))
}

/// The customer list: one `prefix,cid` per line, IPv4 or IPv6; `#`
/// comments and blank lines allowed. Customer ids are 1..=4294967295 (0 is
/// "no customer" in the records).
pub fn parse_customers(path: &Path, text: &str) -> Result<PrefixTable<u32>, FileError> {
    parse(path, text, 3, |f| {
        let [p, cid] = f else {
            return Err(format!(
                "expected `prefix,customer-id`, found {} field(s)",
                f.len()
            ));
        };
        let p = Prefix::parse(p).map_err(|e| e.to_string())?;
        let cid = match cid.parse::<u32>() {
            Ok(c) if c > 0 => c,
            _ => {
                return Err(format!(
                    "customer id {cid:?} is not a number from 1 to 4294967295 (0 means none)"
                ))
            }
        };
        Ok((p, cid))
    })
}

/// The ASN table as CSV: `prefix,asn[,name]` per line (`AS64500` or
/// `64500`); the name may contain commas. Comments and blank lines allowed.
pub fn parse_asn_csv(path: &Path, text: &str) -> Result<PrefixTable<AsInfo>, FileError> {
    let mut names: HashMap<(u32, String), Arc<str>> = HashMap::new();
    parse(path, text, 3, |f| {
        let (p, asn, name) = match f {
            [p, asn] => (p, asn, ""),
            [p, asn, name] => (p, asn, *name),
            _ => return Err("expected `prefix,asn[,name]`".into()),
        };
        let p = Prefix::parse(p).map_err(|e| e.to_string())?;
        let n = asn.strip_prefix("AS").unwrap_or(asn);
        let asn = n
            .parse::<u32>()
            .map_err(|_| format!("AS number {asn:?} is not a number from 0 to 4294967295"))?;
        let name = names
            .entry((asn, name.to_string()))
            .or_insert_with(|| name.into())
            .clone();
        Ok((p, AsInfo { asn, name }))
    })
}

/// Reads and parses a file with `f`.
pub fn load<T>(
    path: &Path,
    f: impl Fn(&Path, &str) -> Result<T, FileError>,
) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    f(path, &text)
}

/// Reads CIDR-Report's asn.txt: `ASN<whitespace>NAME, CC` per line. The
/// name is the text before the trailing `, CC` (as flow-exporter takes it),
/// or the whole rest of the line when there is no country code.
pub fn parse_asn_names(path: &Path, text: &str) -> Result<HashMap<u32, String>, FileError> {
    let mut names = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (asn, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
        let asn = asn.strip_prefix("AS").unwrap_or(asn);
        let Ok(asn) = asn.parse::<u32>() else {
            return Err(FileError::Line {
                path: path.display().to_string(),
                line: i + 1,
                reason: format!("{asn:?} is not an AS number; expected `ASN NAME, CC`"),
            });
        };
        let rest = rest.trim();
        let name = match rest.rsplit_once(", ") {
            Some((n, cc)) if cc.len() == 2 && cc.chars().all(|c| c.is_ascii_alphabetic()) => n,
            _ => rest,
        };
        names.insert(asn, name.to_string());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("customers.csv")
    }

    #[test]
    fn customers_with_comments_blank_lines_and_both_families() {
        let t = parse_customers(
            p(),
            "# customer list\n\n10.0.0.0/8, 100\n 10.1.0.0/16,101  # lab\n2001:db8::/32,200\n192.0.2.7,300\n",
        )
        .unwrap();
        assert_eq!(t.len(), 4);
        let g = |a: &str| t.get(a.parse().unwrap()).copied();
        assert_eq!(g("10.2.3.4"), Some(100));
        assert_eq!(g("10.1.3.4"), Some(101));
        assert_eq!(g("2001:db8::9"), Some(200));
        assert_eq!(g("192.0.2.7"), Some(300));
        assert_eq!(g("192.0.2.8"), None);
    }

    #[test]
    fn bad_customer_lines_name_file_line_and_reason() {
        let cases = [
            (
                "10.0.0.0/8,1\n10.0.0.0/33,2\n",
                "customers.csv line 2: prefix length \"33\" is not a number from 0 to 32",
            ),
            (
                "\n# x\n10.0.0.0/8\n",
                "customers.csv line 3: expected `prefix,customer-id`, found 1 field(s)",
            ),
            (
                "10.0.0.0/8,1,2\n",
                "customers.csv line 1: expected `prefix,customer-id`, found 3 field(s)",
            ),
            (
                "10.0.0.0/8,0\n",
                "customers.csv line 1: customer id \"0\" is not a number from 1 to 4294967295 (0 means none)",
            ),
            (
                "10.0.0.0/8,abc\n",
                "customers.csv line 1: customer id \"abc\" is not a number from 1 to 4294967295 (0 means none)",
            ),
            (
                "10.0.0.0/8,1\n\n10.0.0.0/8,2\n",
                "customers.csv line 3: duplicate prefix 10.0.0.0/8 (first on line 1); keep one",
            ),
            (
                "10.0.0.5/8,1\n",
                "customers.csv line 1: 10.0.0.5/8 has host bits set; write 10.0.0.0/8",
            ),
            (
                "nonsense,1\n",
                "customers.csv line 1: \"nonsense\" is not an IPv4 or IPv6 address",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_customers(p(), text).unwrap_err().to_string(),
                want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn asn_csv_with_and_without_names() {
        let t = parse_asn_csv(
            Path::new("asn.csv"),
            "8.8.8.0/24,AS15169,GOOGLE, US\n2001:4860::/32,15169,GOOGLE, US\n192.0.2.0/24,64500\n",
        )
        .unwrap();
        let g = |a: &str| t.get(a.parse().unwrap()).cloned();
        let google = g("8.8.8.8").unwrap();
        assert_eq!((google.asn, &*google.name), (15169, "GOOGLE, US"));
        // The same AS shares one name allocation.
        assert!(Arc::ptr_eq(&google.name, &g("2001:4860::1").unwrap().name));
        let anon = g("192.0.2.1").unwrap();
        assert_eq!((anon.asn, &*anon.name), (64500, ""));
        assert_eq!(g("198.51.100.1"), None);
        assert_eq!(
            parse_asn_csv(Path::new("asn.csv"), "8.8.8.0/24,ASX\n")
                .unwrap_err()
                .to_string(),
            "asn.csv line 1: AS number \"ASX\" is not a number from 0 to 4294967295"
        );
    }

    #[test]
    fn missing_file_says_which() {
        let e = load(Path::new("/nonexistent/customers.csv"), parse_customers).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/customers.csv: cannot read: "),
            "{e}"
        );
    }

    #[test]
    fn asn_names_from_cidr_report_format() {
        let n = parse_asn_names(
            Path::new("asn.txt"),
            "0\t-Reserved AS-, ZZ\n1\tLVLT-1 - Level 3 Parent, LLC, US\n397143\tNEPTUNE-NETWORKS - Neptune Networks, US\n64500 NO-COUNTRY\n",
        )
        .unwrap();
        assert_eq!(n[&1], "LVLT-1 - Level 3 Parent, LLC");
        assert_eq!(n[&397143], "NEPTUNE-NETWORKS - Neptune Networks");
        assert_eq!(n[&0], "-Reserved AS-");
        assert_eq!(n[&64500], "NO-COUNTRY");
        assert_eq!(
            parse_asn_names(Path::new("asn.txt"), "x NAME, US\n")
                .unwrap_err()
                .to_string(),
            "asn.txt line 1: \"x\" is not an AS number; expected `ASN NAME, CC`"
        );
    }
}
