//! Filter rules (`--filter`, `[[filter]]` in the config file): what they
//! mean, how they are parsed, and their kernel form.
//!
//! A rule is comma-separated `key=value` pairs: `action=accept|reject`
//! (required), `cidr=` (either address), `src-cidr=`, `dst-cidr=`,
//! `proto=tcp|udp|udplite|icmp|icmpv6|sctp|N`, `port=` (either port),
//! `src-port=`, `dst-port=`, `direction=ingress|egress`. A packet matches a
//! rule when it matches every key the rule states. The first rule that
//! matches decides; when any rule accepts, a packet that matches none is
//! rejected (otherwise it is counted). Rejected packets form no flow; the
//! kernel counts them (`flowexport_filtered_packets_total`).
//!
//! In the kernel (`flowexport_filter` in flowexport-ebpf), each rule is one
//! bit, and every packet field has a table of the rules it can satisfy
//! ([`FilterSet`]: by protocol and direction, in a read-only global; by
//! address, two longest-prefix-match tries, one per family, whose entries
//! say which rules' CIDRs contain the prefix; by port, an array): the AND of
//! the masks is the set of matching rules, its lowest bit the first. No
//! loop over rules: the cost does not grow with their number.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use flowexport_common::{FilterMasks, FilterSet, DIR_EGRESS, DIR_INGRESS, FILTER_MAX_RULES};

use crate::enrich::prefix::Prefix;
use crate::record::ip_proto_number;

/// A bad rule: which rule, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter rule {rule:?}: {problem}")]
pub struct FilterError {
    pub rule: String,
    pub problem: String,
}

/// One parsed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The rule as written (for messages).
    pub text: String,
    pub accept: bool,
    /// `DIR_INGRESS` or `DIR_EGRESS`; None: both.
    pub direction: Option<u8>,
    pub proto: Option<u8>,
    pub port: Option<u16>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    pub cidr: Option<Prefix>,
    pub src_cidr: Option<Prefix>,
    pub dst_cidr: Option<Prefix>,
}

const KEYS: &str = "action, cidr, src-cidr, dst-cidr, proto, port, src-port, dst-port, direction";

/// Protocols whose packets have ports in the flow key.
fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

impl Rule {
    /// Parses `key=value[,key=value...]` (a `--filter` flag).
    pub fn parse(text: &str) -> Result<Rule, FilterError> {
        let mut pairs = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            let Some((k, v)) = part.split_once('=') else {
                return Err(FilterError {
                    rule: text.into(),
                    problem: format!("{part:?} is not key=value (keys: {KEYS})"),
                });
            };
            pairs.push((k.trim().to_string(), v.trim().to_string()));
        }
        Rule::from_pairs(text, pairs)
    }

    /// Parses a `[[filter]]` table of the config file: the same keys, as
    /// strings (ports and protocol numbers may be integers).
    pub(crate) fn from_table(table: &BTreeMap<String, toml::Value>) -> Result<Rule, FilterError> {
        let mut pairs = Vec::new();
        for (k, v) in table {
            let v = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                other => {
                    let text = table_text(table);
                    return Err(FilterError {
                        rule: text,
                        problem: format!("key {k}: {other} is not a string or a number"),
                    });
                }
            };
            pairs.push((k.clone(), v));
        }
        Rule::from_pairs(&table_text(table), pairs)
    }

    fn from_pairs(text: &str, pairs: Vec<(String, String)>) -> Result<Rule, FilterError> {
        let err = |key: &str, problem: String| FilterError {
            rule: text.into(),
            problem: format!("key {key}: {problem}"),
        };
        let mut rule = Rule {
            text: text.into(),
            accept: false,
            direction: None,
            proto: None,
            port: None,
            src_port: None,
            dst_port: None,
            cidr: None,
            src_cidr: None,
            dst_cidr: None,
        };
        let mut action = None;
        let mut seen = Vec::new();
        for (k, v) in pairs {
            if seen.contains(&k) {
                return Err(err(&k, "given twice".into()));
            }
            if v.is_empty() {
                return Err(err(&k, "has no value".into()));
            }
            let port = |v: &str| {
                v.parse::<u16>()
                    .map_err(|_| err(&k, format!("{v:?} is not a port number (0-65535)")))
            };
            let cidr = |v: &str| {
                Prefix::parse(v)
                    .map_err(|e| err(&k, format!("{e} (write ADDR/LEN, e.g. 10.0.0.0/8)")))
            };
            match k.as_str() {
                "action" => {
                    action = Some(match v.to_ascii_lowercase().as_str() {
                        "accept" => true,
                        "reject" => false,
                        _ => return Err(err(&k, format!("{v:?} is not accept or reject"))),
                    });
                }
                "direction" => {
                    rule.direction = Some(match v.to_ascii_lowercase().as_str() {
                        "ingress" => DIR_INGRESS,
                        "egress" => DIR_EGRESS,
                        _ => return Err(err(&k, format!("{v:?} is not ingress or egress"))),
                    });
                }
                "proto" => {
                    rule.proto = Some(match ip_proto_number(&v).or_else(|| v.parse().ok()) {
                        Some(p) => p,
                        None => {
                            return Err(err(
                                &k,
                                format!(
                                    "{v:?} is not tcp, udp, udplite, icmp, icmpv6, sctp or a \
                                     protocol number (0-255)"
                                ),
                            ))
                        }
                    });
                }
                "port" => rule.port = Some(port(&v)?),
                "src-port" => rule.src_port = Some(port(&v)?),
                "dst-port" => rule.dst_port = Some(port(&v)?),
                "cidr" => rule.cidr = Some(cidr(&v)?),
                "src-cidr" => rule.src_cidr = Some(cidr(&v)?),
                "dst-cidr" => rule.dst_cidr = Some(cidr(&v)?),
                _ => return Err(err(&k, format!("unknown key (keys: {KEYS})"))),
            }
            seen.push(k);
        }
        rule.accept = action.ok_or_else(|| FilterError {
            rule: text.into(),
            problem: "key action is missing: add action=accept or action=reject".into(),
        })?;
        let ports = [
            ("port", rule.port),
            ("src-port", rule.src_port),
            ("dst-port", rule.dst_port),
        ];
        if let (Some(p), Some((key, _))) = (rule.proto, ports.iter().find(|(_, v)| v.is_some())) {
            if !has_ports(p) {
                return Err(err(
                    key,
                    format!("protocol {p} has no ports; ports apply to tcp, udp, udplite and sctp"),
                ));
            }
        }
        let families: Vec<(&str, bool)> = [
            ("cidr", rule.cidr),
            ("src-cidr", rule.src_cidr),
            ("dst-cidr", rule.dst_cidr),
        ]
        .iter()
        .filter_map(|(k, c)| c.map(|c| (*k, c.addr.is_ipv4())))
        .collect();
        if let Some((k, _)) = families.iter().find(|(_, v4)| *v4 != families[0].1) {
            return Err(err(
                k,
                "mixes IPv4 and IPv6 with another CIDR of this rule; no packet could match \
                 (write one rule per family)"
                    .into(),
            ));
        }
        Ok(rule)
    }

    /// Whether the rule has a port key (then the kernel needs its port
    /// table).
    fn has_port(&self) -> bool {
        self.port.is_some() || self.src_port.is_some() || self.dst_port.is_some()
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A `[[filter]]` table written as a flag would be, for messages.
fn table_text(table: &BTreeMap<String, toml::Value>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (k, v) in table {
        match v {
            toml::Value::String(s) => parts.push(format!("{k}={s}")),
            other => parts.push(format!("{k}={other}")),
        }
    }
    parts.join(",")
}

/// The rules in the kernel's form: the global and the look-up tables'
/// entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelFilter {
    pub set: FilterSet,
    /// (prefix length, network, rules whose CIDRs contain it).
    pub v4: Vec<(u32, [u8; 4], FilterMasks)>,
    pub v6: Vec<(u32, [u8; 16], FilterMasks)>,
    /// (port, rules naming it).
    pub ports: Vec<(u16, FilterMasks)>,
}

impl KernelFilter {
    /// Entries of the kernel's port table (`FILTER_PORTS`): one per port
    /// when a rule names a port (65,536 x 12 bytes = 768 KiB), else the one
    /// entry an array map needs.
    pub(crate) fn port_table_entries(&self) -> u32 {
        if self.ports.is_empty() {
            1
        } else {
            1 << 16
        }
    }

    /// The port table's kernel memory, in bytes.
    pub(crate) fn port_table_bytes(&self) -> u64 {
        u64::from(self.port_table_entries()) * size_of::<FilterMasks>() as u64
    }
}

/// Builds the kernel form of `rules` (in order: rule i is bit i).
pub fn compile(rules: &[Rule]) -> Result<KernelFilter, FilterError> {
    if rules.len() > FILTER_MAX_RULES {
        return Err(FilterError {
            rule: rules[FILTER_MAX_RULES].text.clone(),
            problem: format!(
                "at most {FILTER_MAX_RULES} rules; merge rules (a CIDR covers many addresses)"
            ),
        });
    }
    let mut out = KernelFilter::default();
    let set = &mut out.set;
    set.count = rules.len() as u32;
    for (i, r) in rules.iter().enumerate() {
        let bit = 1u32 << i;
        let without = |has: bool, mask: &mut u32| {
            if !has {
                *mask |= bit;
            }
        };
        without(r.cidr.is_some(), &mut set.no_cidr);
        without(r.src_cidr.is_some(), &mut set.no_src_cidr);
        without(r.dst_cidr.is_some(), &mut set.no_dst_cidr);
        without(r.port.is_some(), &mut set.no_port);
        without(r.src_port.is_some(), &mut set.no_src_port);
        without(r.dst_port.is_some(), &mut set.no_dst_port);
        if r.accept {
            set.accept |= bit;
        }
        if r.has_port() {
            set.port_rules |= bit;
        }
        if r.cidr.is_some() || r.src_cidr.is_some() || r.dst_cidr.is_some() {
            set.cidr_rules |= bit;
        }
        for d in [DIR_INGRESS, DIR_EGRESS] {
            if r.direction.is_none_or(|x| x == d) {
                set.direction[d as usize] |= bit;
            }
        }
        for (p, mask) in set.proto.iter_mut().enumerate() {
            if r.proto.is_none_or(|x| x as usize == p) {
                *mask |= bit;
            }
        }
    }
    set.default_reject = (set.accept != 0) as u32;
    // Every port a rule names, with the rules naming it.
    let mut ports: BTreeMap<u16, FilterMasks> = BTreeMap::new();
    for (i, r) in rules.iter().enumerate() {
        let bit = 1u32 << i;
        if let Some(p) = r.port {
            ports.entry(p).or_default().either |= bit;
        }
        if let Some(p) = r.src_port {
            ports.entry(p).or_default().src |= bit;
        }
        if let Some(p) = r.dst_port {
            ports.entry(p).or_default().dst |= bit;
        }
    }
    out.ports = ports.into_iter().collect();
    // Every distinct prefix any rule names, with the rules whose CIDRs
    // contain it (itself and every shorter prefix around it).
    let mut prefixes: Vec<Prefix> = rules
        .iter()
        .flat_map(|r| [r.cidr, r.src_cidr, r.dst_cidr])
        .flatten()
        .collect();
    prefixes.sort_by_key(|p| (p.addr, p.len));
    prefixes.dedup();
    for p in prefixes {
        let mut m = FilterMasks::default();
        for (i, r) in rules.iter().enumerate() {
            let bit = 1u32 << i;
            let holds = |c: Option<Prefix>| c.is_some_and(|c| c.contains(&p));
            if holds(r.cidr) {
                m.either |= bit;
            }
            if holds(r.src_cidr) {
                m.src |= bit;
            }
            if holds(r.dst_cidr) {
                m.dst |= bit;
            }
        }
        match p.addr {
            IpAddr::V4(a) => out.v4.push((p.len.into(), a.octets(), m)),
            IpAddr::V6(a) => out.v6.push((p.len.into(), a.octets(), m)),
        }
    }
    Ok(out)
}

/// What the kernel decides for a packet, computed from the kernel form
/// the same way `flowexport_filter` does (for tests): `true` counted,
/// `false` left out. `(src, dst)` are the tries' answers for the addresses.
#[cfg(test)]
fn verdict(
    k: &KernelFilter,
    (proto, direction, sport, dport): (u8, u8, u16, u16),
    (src, dst): (FilterMasks, FilterMasks),
) -> bool {
    let s = &k.set;
    let mut m = s.proto[proto as usize] & s.direction[direction as usize];
    if m & s.cidr_rules != 0 {
        m &= (src.either | dst.either | s.no_cidr)
            & (src.src | s.no_src_cidr)
            & (dst.dst | s.no_dst_cidr);
    }
    if m & s.port_rules != 0 {
        let get = |p: u16| {
            k.ports
                .iter()
                .find(|e| e.0 == p)
                .map_or(FilterMasks::default(), |e| e.1)
        };
        if has_ports(proto) {
            let (ps, pd) = (get(sport), get(dport));
            m &= (ps.either | pd.either | s.no_port)
                & (ps.src | s.no_src_port)
                & (pd.dst | s.no_dst_port);
        } else {
            m &= !s.port_rules;
        }
    }
    if m == 0 {
        return s.default_reject == 0;
    }
    m & m.wrapping_neg() & s.accept != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        Rule::parse(s).unwrap()
    }

    fn problem(s: &str) -> String {
        Rule::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn parses_every_key() {
        let r = rule(
            "action=accept, cidr=10.0.0.0/8,src-cidr=10.1.0.0/16,dst-cidr=10.2.3.4,proto=tcp,\
             port=443,src-port=1024,dst-port=22,direction=egress",
        );
        assert!(r.accept);
        assert_eq!(r.direction, Some(DIR_EGRESS));
        assert_eq!(r.proto, Some(6));
        assert_eq!(
            (r.port, r.src_port, r.dst_port),
            (Some(443), Some(1024), Some(22))
        );
        assert_eq!(r.cidr.unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(r.dst_cidr.unwrap().to_string(), "10.2.3.4/32");
        assert_eq!(rule("action=reject,proto=47").proto, Some(47));
        assert_eq!(rule("action=REJECT,proto=ICMPv6").proto, Some(58));
        let k = compile(&[rule(
            "action=reject,proto=udp,dst-port=53,direction=ingress",
        )])
        .unwrap();
        assert_eq!(
            (k.set.accept, k.set.default_reject, k.set.cidr_rules),
            (0, 0, 0)
        );
        assert_eq!(k.set.direction, [1, 0]);
        assert_eq!((k.set.proto[17], k.set.proto[6]), (1, 0));
        assert_eq!(
            (k.set.no_dst_port, k.set.no_port, k.set.port_rules),
            (0, 1, 1)
        );
        assert_eq!(
            k.ports,
            vec![(
                53,
                FilterMasks {
                    either: 0,
                    src: 0,
                    dst: 1
                }
            )]
        );
    }

    #[test]
    fn bad_rules_name_the_rule_and_the_key() {
        let e = problem("action=drop,port=22");
        assert!(
            e.contains("\"action=drop,port=22\"") && e.contains("key action"),
            "{e}"
        );
        // Each rule, and what its error names.
        for (rule, names) in [
            ("port=22", "action is missing"),
            ("action=reject,port=70000", "key port"),
            ("action=reject,cidr=10.0.0.1/8", "host bits"),
            ("action=reject,cidr=10.0.0.0/33", "key cidr"),
            ("action=reject,proto=foo", "key proto"),
            ("action=reject,proto=icmp,port=8", "key port"),
            ("action=reject,colour=red", "unknown key"),
            ("action=reject,port=1,port=2", "given twice"),
            ("action=reject,port=", "no value"),
            ("action=reject,direction=up", "key direction"),
            (
                "action=reject,src-cidr=10.0.0.0/8,dst-cidr=::/0",
                "key dst-cidr",
            ),
            ("action=reject,22", "not key=value"),
        ] {
            let e = problem(rule);
            assert!(e.contains(names), "{rule}: {e}");
        }
    }

    #[test]
    fn config_tables_take_strings_and_numbers() {
        let t: BTreeMap<String, toml::Value> =
            toml::from_str("action = \"reject\"\nproto = \"tcp\"\nport = 22\n").unwrap();
        let r = Rule::from_table(&t).unwrap();
        assert_eq!((r.accept, r.proto, r.port), (false, Some(6), Some(22)));
        let t: BTreeMap<String, toml::Value> =
            toml::from_str("action = \"reject\"\nport = true\n").unwrap();
        let e = Rule::from_table(&t).unwrap_err().to_string();
        assert!(
            e.contains("action=reject,port=true") && e.contains("key port"),
            "{e}"
        );
    }

    #[test]
    fn trie_entries_carry_every_rule_whose_cidr_contains_them() {
        let rules = [
            rule("action=reject,cidr=10.0.0.0/8"),
            rule("action=accept,src-cidr=10.1.0.0/16"),
            rule("action=accept,dst-cidr=10.1.2.0/24,proto=udp"),
            rule("action=reject,cidr=2001:db8::/32"),
            rule("action=accept,proto=tcp"),
        ];
        let k = compile(&rules).unwrap();
        assert_eq!(k.set.count, 5);
        assert_eq!(k.set.default_reject, 1);
        assert_eq!(k.set.cidr_rules, 0b01111);
        let m = |len, a: [u8; 4]| k.v4.iter().find(|e| e.0 == len && e.1 == a).unwrap().2;
        let masks = |either, src, dst| FilterMasks { either, src, dst };
        assert_eq!(m(8, [10, 0, 0, 0]), masks(1, 0, 0));
        assert_eq!(m(16, [10, 1, 0, 0]), masks(1, 2, 0));
        assert_eq!(m(24, [10, 1, 2, 0]), masks(1, 2, 4));
        assert_eq!(k.v4.len(), 3);
        assert_eq!(k.v6.len(), 1);
        assert_eq!(k.v6[0].2.either, 8);
        assert_eq!(
            (k.set.accept, k.set.no_cidr, k.set.port_rules),
            (0b10110, 0b10110, 0)
        );

        // Verdicts: (proto, direction, ports) and the tries' answers.
        let udp = (17, DIR_INGRESS, 1, 2);
        let none = FilterMasks::default();
        // 10.1.2.3 -> 10.1.2.4: rule 0 (reject, either CIDR) comes first.
        assert!(!verdict(
            &k,
            udp,
            (m(24, [10, 1, 2, 0]), m(24, [10, 1, 2, 0]))
        ));
        // 192.0.2.1 -> 10.1.2.4 (udp): rule 0 again (the destination).
        assert!(!verdict(&k, udp, (none, m(24, [10, 1, 2, 0]))));
        // 192.0.2.1 -> 192.0.2.2: tcp accepted by rule 4, udp by no rule.
        assert!(verdict(&k, (6, DIR_EGRESS, 1, 2), (none, none)));
        assert!(
            !verdict(&k, udp, (none, none)),
            "an allow list: unmatched is left out"
        );

        let only_reject = compile(&[rule("action=reject,proto=tcp,port=22")]).unwrap();
        assert_eq!(
            (only_reject.set.default_reject, only_reject.set.cidr_rules),
            (0, 0)
        );
        assert!(only_reject.v4.is_empty());

        let many: Vec<Rule> = (0..33)
            .map(|i| rule(&format!("action=reject,port={i}")))
            .collect();
        let e = compile(&many).unwrap_err().to_string();
        assert!(e.contains("port=32") && e.contains("at most 32"), "{e}");
    }
}
