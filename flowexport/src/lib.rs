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
pub(crate) mod timeconv;
