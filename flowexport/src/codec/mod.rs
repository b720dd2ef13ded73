//! Wire formats: pure functions over bytes and records, no I/O.
pub mod ie;
pub mod json;
pub mod netflow;
pub mod pmacct;
pub mod protobuf;
pub(crate) mod reader;
pub mod sflow;
