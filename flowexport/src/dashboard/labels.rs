//! The dashboard's label values: fixed tables, so that every label has a
//! bounded set of values.

use crate::record::FlowSummary;

/// Protocol label values: a fixed set.
pub(crate) fn proto_label(p: Option<u8>) -> &'static str {
    match p {
        None => "unknown",
        Some(1) => "icmp",
        Some(2) => "igmp",
        Some(6) => "tcp",
        Some(17) => "udp",
        Some(41) => "ipv6",
        Some(47) => "gre",
        Some(50) => "esp",
        Some(51) => "ah",
        Some(58) => "icmpv6",
        Some(89) => "ospf",
        Some(103) => "pim",
        Some(132) => "sctp",
        Some(_) => "other",
    }
}

/// Well-known application ports (IANA service names): the `app` label.
pub(crate) const APPS: &[(u16, &str)] = &[
    (20, "ftp-data"),
    (21, "ftp"),
    (22, "ssh"),
    (23, "telnet"),
    (25, "smtp"),
    (53, "dns"),
    (67, "dhcp"),
    (68, "dhcp"),
    (80, "http"),
    (110, "pop3"),
    (123, "ntp"),
    (143, "imap"),
    (161, "snmp"),
    (162, "snmp"),
    (179, "bgp"),
    (389, "ldap"),
    (443, "https"),
    (465, "smtps"),
    (514, "syslog"),
    (587, "submission"),
    (636, "ldaps"),
    (853, "domain-s"),
    (993, "imaps"),
    (995, "pop3s"),
    (1194, "openvpn"),
    (2055, "netflow"),
    (3306, "mysql"),
    (3389, "rdp"),
    (4739, "ipfix"),
    (5060, "sip"),
    (5432, "postgresql"),
    (6343, "sflow"),
    (6379, "redis"),
    (8080, "http-alt"),
    (8443, "https-alt"),
    (9092, "kafka"),
];

pub(crate) const APP_OTHER: u8 = 254;
pub(crate) const APP_NONE: u8 = 255;

/// The application of a flow, as an index into [`APPS`]: of its two ports
/// that are in the table, the lower (the server side is usually the
/// well-known one); [`APP_OTHER`] when neither is; [`APP_NONE`] for
/// protocols without ports.
pub(crate) fn app_index(f: &FlowSummary) -> u8 {
    if !matches!(f.proto, Some(6 | 17 | 132) | None) {
        return APP_NONE;
    }
    let find = |p: u16| APPS.binary_search_by_key(&p, |(port, _)| *port).ok();
    match (find(f.src_port), find(f.dst_port)) {
        (Some(a), Some(b)) => a.min(b) as u8,
        (Some(a), None) | (None, Some(a)) => a as u8,
        (None, None) => APP_OTHER,
    }
}

pub(crate) fn app_name(i: u8) -> &'static str {
    match i {
        APP_OTHER => "other",
        APP_NONE => "none",
        i => APPS[i as usize].1,
    }
}

pub(crate) fn direction_label(d: Option<u8>) -> &'static str {
    match d {
        Some(0) => "ingress",
        Some(1) => "egress",
        _ => "unknown",
    }
}

pub(crate) fn ip_version_label(v: Option<u8>) -> &'static str {
    match v {
        Some(4) => "4",
        Some(6) => "6",
        _ => "unknown",
    }
}
