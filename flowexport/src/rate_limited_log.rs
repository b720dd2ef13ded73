//! A log line at most every 10 s per key, with the count of the lines held
//! back: for errors that can repeat per record (deliveries, decoding,
//! malformed packets). The keys are few (an exporter and a reason, or one
//! key for the whole log).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_secs(10);

/// Logs at most one line per interval and key, counting what it held back.
pub(crate) struct RateLimitedLog<K = ()> {
    /// Per key: when its last line was logged, and the lines held back since.
    last: Mutex<HashMap<K, (Instant, u64)>>,
    /// The lines' log target.
    target: &'static str,
}

impl<K> Default for RateLimitedLog<K> {
    fn default() -> Self {
        RateLimitedLog::with_target("flowexport")
    }
}

impl<K> RateLimitedLog<K> {
    /// Lines with the log target `target` (what `RUST_LOG` filters on).
    pub(crate) fn with_target(target: &'static str) -> Self {
        RateLimitedLog {
            last: Mutex::new(HashMap::new()),
            target,
        }
    }
}

impl RateLimitedLog {
    pub(crate) fn error(&self, msg: impl FnOnce() -> String) {
        self.log_for((), log::Level::Error, msg);
    }

    pub(crate) fn warn(&self, msg: impl FnOnce() -> String) {
        self.log_for((), log::Level::Warn, msg);
    }
}

impl<K: Hash + Eq> RateLimitedLog<K> {
    /// Lines of `key` held back since its last line (None: none logged yet).
    #[cfg(test)]
    pub(crate) fn held(&self, key: &K) -> Option<u64> {
        self.last.lock().expect("log lock").get(key).map(|e| e.1)
    }

    /// An error, limited per `key`.
    pub(crate) fn error_for(&self, key: K, msg: impl FnOnce() -> String) {
        self.log_for(key, log::Level::Error, msg);
    }

    /// A warning, limited per `key`.
    pub(crate) fn warn_for(&self, key: K, msg: impl FnOnce() -> String) {
        self.log_for(key, log::Level::Warn, msg);
    }

    /// A line at `level`, limited per `key`.
    pub(crate) fn log_for(&self, key: K, level: log::Level, msg: impl FnOnce() -> String) {
        let mut last = self.last.lock().expect("log lock");
        let now = Instant::now();
        let held = match last.get_mut(&key) {
            Some((t, held)) if now.duration_since(*t) < INTERVAL => {
                *held += 1;
                return;
            }
            Some((t, held)) => {
                *t = now;
                std::mem::take(held)
            }
            None => {
                last.insert(key, (now, 0));
                0
            }
        };
        drop(last);
        if held > 0 {
            let what = if level == log::Level::Error {
                "errors"
            } else {
                "messages"
            };
            log::log!(
                target: self.target,
                level,
                "{} ({held} similar {what} in the last 10s not shown)",
                msg()
            );
        } else {
            log::log!(target: self.target, level, "{}", msg());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_log_holds_back_and_counts() {
        let log = RateLimitedLog::default();
        let held = |log: &RateLimitedLog| log.last.lock().unwrap()[&()].1;
        let line = || "x".to_string();
        log.warn(line);
        log.warn(line);
        log.error(line);
        // One line logged; the other two held back and counted for the next
        // line after the interval, whatever their level.
        assert_eq!(held(&log), 2);
        log.last.lock().unwrap().get_mut(&()).unwrap().0 = Instant::now() - INTERVAL;
        log.warn(line);
        assert_eq!(held(&log), 0);
        log.error(line);
        assert_eq!(held(&log), 1);
    }

    #[test]
    fn keys_are_limited_apart() {
        let log: RateLimitedLog<(u8, &str)> = RateLimitedLog::default();
        log.warn_for((1, "a"), || "x".into());
        log.warn_for((1, "a"), || "x".into());
        log.warn_for((2, "a"), || "x".into());
        log.warn_for((1, "b"), || "x".into());
        let last = log.last.lock().unwrap();
        assert_eq!(last.len(), 3);
        assert_eq!(
            (last[&(1, "a")].1, last[&(2, "a")].1, last[&(1, "b")].1),
            (1, 0, 0)
        );
    }
}
