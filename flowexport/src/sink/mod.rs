//! Sinks: where flow records go. The agent's drain and each collector
//! worker hand every batch to a [`Fanout`] of the configured sinks.
pub mod ipfix;
pub mod kafka;
pub mod stdout;

use crate::rate_limited_log::RateLimitedLog;
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

/// Every configured sink behind one call: a batch goes to each sink; a
/// failing sink is counted (`flowexport_sink_errors_total{sink}`) and
/// logged (a line per sink every 10 s at most, with the count of those held
/// back), and the others still get the batch. Owned by one thread (the
/// agent's drain, or one collector worker with its own sink handles): no
/// lock on the way.
pub struct Fanout {
    sinks: Vec<Box<dyn Sink>>,
    errors: prometheus::IntCounterVec,
    log: RateLimitedLog<&'static str>,
}

impl Fanout {
    /// `errors` is the `flowexport_sink_errors_total` counter, by `sink`.
    pub fn new(sinks: Vec<Box<dyn Sink>>, errors: prometheus::IntCounterVec) -> Fanout {
        Fanout {
            sinks,
            errors,
            log: RateLimitedLog::with_target("flowexport::sink"),
        }
    }

    /// Hands `records` to every sink.
    pub fn send(&mut self, records: &[FlowRecord]) {
        for sink in &mut self.sinks {
            if let Err(e) = sink.send(records) {
                self.errors.with_label_values(&[sink.name()]).inc();
                self.log.error_for(sink.name(), || {
                    format!("{} records not delivered: {e}", records.len())
                });
            }
        }
    }

    /// Flushes every sink (at shutdown); a failure is counted and logged.
    pub fn flush(&mut self) {
        for sink in &mut self.sinks {
            if let Err(e) = sink.flush() {
                self.errors.with_label_values(&[sink.name()]).inc();
                log::error!("flushing {}: {e}", sink.name());
            }
        }
    }
}
