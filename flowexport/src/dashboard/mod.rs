//! The dashboard's transform: Kafka messages into bounded Prometheus
//! counters (`flowexport dashboard`, also a drop-in for
//! neptune-networks/flow-exporter).
//!
//! Pipeline: message bytes → [`decode()`] (our protobuf, our JSON, or
//! pmacct's JSON) → [`FlowSummary`](crate::record::FlowSummary) →
//! [`Dashboard::add`] (counters, [`counters`]) with fixed label tables
//! ([`labels`]). All pure over their inputs; the Kafka loop is
//! [`crate::cmd::dashboard`].
//!
//! Cardinality is bounded by construction: `proto` and `app` come from
//! fixed tables (everything else is `other`), `direction` and `ip_version`
//! have three values each, and `cid` and `host` take at most
//! `--max-customers` / `--max-hosts` distinct values (later ones are
//! counted under `other`). The flow-exporter series are per AS pair and
//! host, as in flow-exporter, capped by `--max-as-pairs`.
pub mod counters;
pub mod decode;
pub mod labels;

pub use counters::Dashboard;
pub use decode::{decode, DecodeError, InputFormat};
