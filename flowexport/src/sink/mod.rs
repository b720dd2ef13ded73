//! Sinks: where flow records go. The agent (and later the bridge commands)
//! hand every batch of records to each configured sink.
pub mod ipfix;
pub mod kafka;
pub mod stdout;

use crate::record::FlowRecord;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{sink}: {source}")]
    Io {
        sink: &'static str,
        source: std::io::Error,
    },
}

pub trait Sink: Send {
    /// A short name for logs and the `sink` metric label.
    fn name(&self) -> &'static str;
    /// Delivers one batch. An error means the batch (or part of it) was not
    /// delivered; the caller counts and logs it.
    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError>;
    /// Flushes anything buffered; called at shutdown.
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
