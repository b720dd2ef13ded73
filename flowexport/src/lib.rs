//! flowexport: a network-flow exporter. The data path is a pipeline, one
//! module per stage:
//!
//! capture (kernel programs + loader, [`capture`]) → exact drain into a
//! userspace flow table ([`capture::drain`]) → [`record::FlowRecord`] →
//! sinks ([`sink`]) and metrics ([`metrics`]).
pub mod capture;
pub mod cmd;
pub mod codec;
pub mod dashboard;
pub mod enrich;
pub mod kafka;
pub mod metrics;
pub mod record;
pub mod runtime;
pub mod sink;
pub mod timeconv;
