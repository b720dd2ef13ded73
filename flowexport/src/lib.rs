//! flowexport: a network-flow exporter and a Kafka flow bridge. Everything
//! is one pipeline, one module per stage, and every stage hands on the same
//! record, [`record::FlowRecord`]:
//!
//! ```text
//! sources                          transforms             sinks
//! capture: kernel tables ──drain──▶                      ┌▶ stdout JSON lines (codec::json)
//! codec::{netflow, sflow} ◀─UDP──  FlowRecord ──────────┼▶ Kafka (codec::protobuf / json)
//! Kafka (kafka::bridge) ──────────▶ enrich, split ──────┼▶ IPFIX / NetFlow v9 (codec::netflow::encode)
//! Kafka ──▶ codec::{protobuf::scan, pmacct} ▶ dashboard ┴▶ Prometheus counters
//! ```
//!
//! - [`capture`]: the agent's source: kernel programs, their loader, the
//!   shared flow table and the exact drain that turns counters into flows.
//! - [`codec`]: wire formats, pure functions over bytes (decoders for the
//!   collector, encoders for the sinks).
//! - [`sink`]: where records go (stdout, Kafka, IPFIX/NetFlow v9 over UDP).
//! - [`enrich`] and [`dashboard`]: the transforms of the Kafka commands.
//! - [`cmd`]: the five commands, thin wiring over the above; `kafka`
//!   (client configuration, consumer groups, the Kafka → Kafka loop),
//!   `runtime` (signals, metrics server) and `metrics` are their shared
//!   plumbing.
//!
//! ARCHITECTURE.md in the repository says where a new source, codec, sink
//! or command plugs in.

/// `FromStr` for a setting that takes one of a few keywords (`--capture`,
/// `--xdp-mode`, ...): each keyword, with its aliases after `|`, names a
/// variant; anything else is refused with the keywords to use instead.
macro_rules! from_keywords {
    ($ty:ident, $what:literal, { $($kw:literal $(| $alias:literal)* => $variant:ident),+ $(,)? }) => {
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($kw $(| $alias)* => Ok($ty::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?}: use {}",
                        $what,
                        crate::one_of(&[$($kw),+])
                    )),
                }
            }
        }
    };
}

/// "a, b or c".
pub(crate) fn one_of(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

pub mod capture;
pub mod cmd;
pub mod codec;
pub mod dashboard;
pub mod enrich;
pub(crate) mod kafka;
pub(crate) mod metrics;
pub(crate) mod rate_limited_log;
pub mod record;
pub(crate) mod runtime;
pub mod sink;
pub(crate) mod sockopt;
pub(crate) mod timeconv;

#[cfg(test)]
mod tests {
    use crate::capture::loader::{Capture, XdpModeChoice};

    #[test]
    fn keywords_parse_with_aliases_and_refuse_the_rest() {
        assert_eq!("drv".parse(), Ok(XdpModeChoice::Native));
        assert_eq!("generic".parse(), Ok(XdpModeChoice::Skb));
        assert_eq!("afxdp".parse(), Ok(Capture::Afxdp));
        assert_eq!(
            "XDP".parse::<Capture>(),
            Err("unknown capture \"XDP\": use auto, xdp, tc or afxdp".to_string())
        );
        assert_eq!(
            "x".parse::<XdpModeChoice>(),
            Err("unknown XDP mode \"x\": use native, skb or auto".to_string())
        );
        assert_eq!(super::one_of(&["a"]), "a");
        assert_eq!(super::one_of(&["a", "b"]), "a or b");
    }
}
