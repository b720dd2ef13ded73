//! flowexport: a network-flow exporter. The data path is a pipeline, one
//! module per stage:
//!
//! capture (kernel programs + loader, [`capture`]) → exact drain into a
//! userspace flow table ([`capture::drain`]) → [`record::FlowRecord`] →
//! sinks ([`sink`]) and metrics ([`metrics`]).
pub mod agent;
pub mod bridge;
pub mod capture;
pub mod codec;
pub mod collect;
pub mod config;
pub mod consumers;
pub mod dashboard;
pub mod enrich;
pub mod kafka_client;
pub mod kafka_group;
pub mod metrics;
pub mod record;
pub mod runtime;
pub mod sink;
pub mod timeconv;
