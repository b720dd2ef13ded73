//! The five commands, each thin wiring over the shared stages: it reads its
//! flags, builds capture sources or decoders, transforms and sinks, and runs
//! them under `runtime::start`.
pub mod agent;
pub mod collect;
pub mod dashboard;
pub mod enrich;
pub mod flags;
pub mod split;
