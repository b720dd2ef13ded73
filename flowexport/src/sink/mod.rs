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
    /// Delivers one batch the caller is done with. A sink that keeps the
    /// records (a queue) takes them instead of copying them, leaving an
    /// empty vector in `records` (one of its own, to be reused). By
    /// default the same as `send`.
    fn take(&mut self, records: &mut Vec<FlowRecord>) -> Result<(), SinkError> {
        self.send(records)
    }
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

    /// Hands `records` to every sink and leaves `records` empty: the last
    /// sink may take them ([`Sink::take`]), the others get them to copy.
    pub fn send(&mut self, records: &mut Vec<FlowRecord>) {
        let n = records.len();
        let last = self.sinks.len().saturating_sub(1);
        for (i, sink) in self.sinks.iter_mut().enumerate() {
            let result = if i == last {
                sink.take(records)
            } else {
                sink.send(records)
            };
            if let Err(e) = result {
                self.errors.with_label_values(&[sink.name()]).inc();
                self.log
                    .error_for(sink.name(), || format!("{n} records not delivered: {e}"));
            }
        }
        records.clear();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The batches a [`Keep`] sink was given, and whether it took each.
    type Given = Arc<Mutex<Vec<(Vec<FlowRecord>, bool)>>>;

    /// A sink that keeps what it was given; it takes batches when `.1`.
    struct Keep(Given, bool);

    impl Sink for Keep {
        fn name(&self) -> &'static str {
            "keep"
        }
        fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
            self.0.lock().unwrap().push((records.to_vec(), false));
            Ok(())
        }
        fn take(&mut self, records: &mut Vec<FlowRecord>) -> Result<(), SinkError> {
            if !self.1 {
                return self.send(records);
            }
            self.0.lock().unwrap().push((std::mem::take(records), true));
            Ok(())
        }
    }

    fn record(i: u64) -> FlowRecord {
        FlowRecord {
            packets: i,
            ..FlowRecord::default()
        }
    }

    #[test]
    fn every_sink_gets_the_batch_the_last_may_take_it_and_it_ends_empty() {
        let first = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(Mutex::new(Vec::new()));
        let errors =
            prometheus::IntCounterVec::new(prometheus::Opts::new("errors", "errors"), &["sink"])
                .unwrap();
        let mut fanout = Fanout::new(
            vec![
                Box::new(Keep(first.clone(), true)),
                Box::new(Keep(last.clone(), true)),
            ],
            errors,
        );
        let batch: Vec<FlowRecord> = (1..=3).map(record).collect();
        let mut given = batch.clone();
        fanout.send(&mut given);
        assert!(given.is_empty());
        // The first sink got a copy (send), the last took the batch.
        assert_eq!(*first.lock().unwrap(), vec![(batch.clone(), false)]);
        assert_eq!(*last.lock().unwrap(), vec![(batch.clone(), true)]);

        // A last sink that only copies: the batch is still left empty.
        let only = Arc::new(Mutex::new(Vec::new()));
        let errors =
            prometheus::IntCounterVec::new(prometheus::Opts::new("errors", "errors"), &["sink"])
                .unwrap();
        let mut fanout = Fanout::new(vec![Box::new(Keep(only.clone(), false))], errors);
        let mut given = batch.clone();
        fanout.send(&mut given);
        assert!(given.is_empty());
        assert_eq!(*only.lock().unwrap(), vec![(batch, false)]);
    }
}
