//! The embedded default sink: one JSON object per line on stdout
//! ([`crate::codec::json`]).
//!
//! Two ways to write them:
//! - [`JsonLinesSink`] writes each batch before `send` returns. The agent
//!   uses it: a drain clears the kernel's counts only after their records
//!   were written (nothing lost to a `kill -9`), and its drain thread is
//!   not on the packet path.
//! - [`QueuedJsonLines`] formats in the caller's thread and hands the bytes
//!   to a writer thread through a queue bounded in bytes, so that a decoder
//!   (`collect`) does not wait for each write. A slow reader of stdout shows
//!   in two metrics, `flowexport_stdout_records_waiting` and
//!   `flowexport_stdout_blocked_seconds_total` (time senders waited for room
//!   in a full queue), instead of as silent drops at the collector's
//!   sockets; nothing in the queue is dropped, and `flush` waits for it.
//!   The writer writes in chunks of 64 KiB or more where the rate allows
//!   (waiting at most 5 ms for one to fill): the page cache costs several
//!   times more per byte in small writes.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use prometheus::{Counter, IntGauge, Registry};

use super::{Sink, SinkError};
use crate::codec::json;
use crate::record::FlowRecord;

/// Writes JSON lines to any writer (stdout in the agent), one write per batch.
pub struct JsonLinesSink<W: Write + Send> {
    out: W,
    line: Vec<u8>,
}

impl<W: Write + Send> JsonLinesSink<W> {
    pub fn new(out: W) -> Self {
        JsonLinesSink {
            out,
            line: Vec::with_capacity(64 * 1024),
        }
    }
}

impl JsonLinesSink<std::io::Stdout> {
    pub fn stdout() -> Self {
        Self::new(std::io::stdout())
    }
}

fn io_error(source: std::io::Error) -> SinkError {
    SinkError::Io {
        sink: "stdout",
        source,
    }
}

impl<W: Write + Send> Sink for JsonLinesSink<W> {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        self.line.clear();
        json::write_lines(&mut self.line, records);
        // One write per batch keeps lines whole even if stdout is a pipe
        // shared with nobody else; flush so a reader sees records promptly.
        self.out.write_all(&self.line).map_err(io_error)?;
        self.out.flush().map_err(io_error)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(io_error)
    }
}

/// Bytes the queue of [`QueuedJsonLines`] holds before senders wait:
/// ~35,000 records, a few milliseconds of a writer's time.
pub const QUEUE_BYTES: usize = 16 << 20;

struct Queue {
    /// Formatted batches and their record counts, oldest first.
    batches: VecDeque<(Vec<u8>, u64)>,
    /// Bytes queued or being written (released after the write).
    bytes: usize,
    /// Emptied buffers for senders to reuse.
    spare: Vec<Vec<u8>>,
    /// The writer's last error, reported to the next sender.
    error: Option<std::io::Error>,
    closed: bool,
    /// The writer sleeps until this many bytes are queued: a sender that
    /// brings the queue to it wakes the writer. `usize::MAX` while the
    /// writer is busy (it takes new batches with its next round, without a
    /// wake-up call).
    writer_wants: usize,
    /// Someone waits for the queue to empty (`flush`, or a sender for
    /// room): the writer writes what it has without lingering.
    hurry: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when batches arrive or the queue closes.
    work: Condvar,
    /// Signalled when the writer made room (or emptied the queue).
    room: Condvar,
    limit: usize,
    waiting: IntGauge,
    blocked: Counter,
}

/// JSON lines through a writer thread (see the module docs). The value
/// [`QueuedJsonLines::new`] returns owns the thread (dropping it writes what
/// is queued and ends it); [`QueuedJsonLines::handle`]s share its queue, so
/// that several threads format and queue without a lock around the sink.
pub struct QueuedJsonLines {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// This sender's formatting buffer, reused for every batch: it stays in
    /// the CPU's caches, while a queued buffer is usually cold memory.
    scratch: Vec<u8>,
}

impl QueuedJsonLines {
    /// Writes to stdout; registers the queue's metrics in `registry`.
    pub fn stdout(registry: &Registry) -> std::io::Result<QueuedJsonLines> {
        QueuedJsonLines::new(std::io::stdout(), QUEUE_BYTES, registry)
    }

    /// Writes to `out` with a queue of `limit` bytes.
    pub fn new<W: Write + Send + 'static>(
        mut out: W,
        limit: usize,
        registry: &Registry,
    ) -> std::io::Result<QueuedJsonLines> {
        let waiting = crate::metrics::gauge(
            registry,
            "flowexport_stdout_records_waiting",
            "Records formatted for stdout and not yet written (a slow reader of stdout).",
        );
        let blocked = crate::metrics::float_counter(
            registry,
            "flowexport_stdout_blocked_seconds_total",
            "Time senders (collect's workers) waited for room in the full stdout queue.",
        );
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                batches: VecDeque::new(),
                bytes: 0,
                spare: Vec::new(),
                error: None,
                closed: false,
                writer_wants: usize::MAX,
                hurry: false,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            limit,
            waiting,
            blocked,
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("stdout-writer".into())
            .spawn(move || write_loop(&s, &mut out))?;
        Ok(QueuedJsonLines {
            shared,
            writer: Some(writer),
            scratch: Vec::new(),
        })
    }
}

impl QueuedJsonLines {
    /// Another sender into the same queue and writer thread.
    pub fn handle(&self) -> QueuedJsonLines {
        QueuedJsonLines {
            shared: self.shared.clone(),
            writer: None,
            scratch: Vec::new(),
        }
    }
}

/// The writer writes at least this much at once when it can: smaller
/// writes cost the page cache several times more per byte (measured here,
/// ext4, 450-byte records: 0.4-0.6 us each in 4-16 KiB writes, 0.12-0.18 us
/// in 32-256 KiB writes).
const MIN_WRITE: usize = 64 << 10;

/// How long the writer waits for the queue to reach [`MIN_WRITE`] once a
/// batch is there: the most a record is held back for it (at low rates).
const LINGER: Duration = Duration::from_millis(5);

/// The writer thread: waits for a batch, then (up to [`LINGER`]) for
/// [`MIN_WRITE`] bytes, takes every queued batch at once, writes them as
/// one buffer, then releases their bytes.
fn write_loop(s: &Shared, out: &mut dyn Write) {
    let mut taken: Vec<(Vec<u8>, u64)> = Vec::new();
    // A queue smaller than two writes' worth would hold senders back.
    let min_write = MIN_WRITE.min(s.limit / 2).max(1);
    loop {
        {
            let mut q = s.queue.lock().expect("stdout queue");
            let mut deadline: Option<Instant> = None;
            while !q.closed {
                if q.batches.is_empty() {
                    q.hurry = false;
                    q.writer_wants = 1;
                    q = s.work.wait(q).expect("stdout queue");
                    continue;
                }
                // The writer has nothing in flight: `bytes` is what is queued.
                if q.bytes >= min_write || q.hurry {
                    break;
                }
                let now = Instant::now();
                let until = *deadline.get_or_insert(now + LINGER);
                if now >= until {
                    break;
                }
                q.writer_wants = min_write;
                q = s.work.wait_timeout(q, until - now).expect("stdout queue").0;
            }
            q.writer_wants = usize::MAX;
            q.hurry = false;
            if q.batches.is_empty() {
                return; // closed, and everything written
            }
            taken.extend(q.batches.drain(..));
        }
        let (mut bytes, mut records) = (0, 0);
        for (b, n) in &taken {
            bytes += b.len();
            records += n;
        }
        let result = write_batches(out, &taken).and_then(|()| out.flush());
        let mut q = s.queue.lock().expect("stdout queue");
        if let Err(e) = result {
            log::error!("{records} records not written to stdout: {e}");
            q.error = Some(e);
        }
        q.bytes -= bytes;
        s.waiting.sub(records as i64);
        for (mut b, _) in taken.drain(..) {
            if q.spare.len() < 64 {
                b.clear();
                q.spare.push(b);
            }
        }
        s.room.notify_all();
    }
}

/// Writes the batches in order with as few `writev` calls as the writer
/// takes (no copy into one buffer first).
fn write_batches(out: &mut dyn Write, batches: &[(Vec<u8>, u64)]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = batches.iter().map(|(b, _)| IoSlice::new(b)).collect();
    let mut left = &mut slices[..];
    while !left.is_empty() {
        match out.write_vectored(left) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Sink for QueuedJsonLines {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        if records.is_empty() {
            return Ok(());
        }
        // Formatted in the warm scratch buffer, then moved into the queued
        // one with one large copy (which fills cold cache lines without
        // reading them first; formatting straight into a cold buffer was
        // slower: measured with `cargo xtask bench collect`).
        self.scratch.clear();
        json::write_lines(&mut self.scratch, records);
        let s = &*self.shared;
        let mut buf = s
            .queue
            .lock()
            .expect("stdout queue")
            .spare
            .pop()
            .unwrap_or_default();
        buf.extend_from_slice(&self.scratch);
        let mut q = s.queue.lock().expect("stdout queue");
        if let Some(e) = q.error.take() {
            // stdout failed (the writer logged how many records that write
            // lost): this batch is refused too, and the caller counts it.
            buf.clear();
            q.spare.push(buf);
            return Err(io_error(e));
        }
        if q.closed {
            return Err(io_error(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the stdout writer has stopped",
            )));
        }
        if q.bytes > 0 && q.bytes + buf.len() > s.limit {
            q.hurry = true;
            s.work.notify_one();
            // Counted as it passes (every 100 ms at most), so that a reader
            // that never resumes shows too.
            let mut since = Instant::now();
            while q.bytes > 0 && q.bytes + buf.len() > s.limit {
                q = s
                    .room
                    .wait_timeout(q, Duration::from_millis(100))
                    .expect("stdout queue")
                    .0;
                s.blocked.inc_by(since.elapsed().as_secs_f64());
                since = Instant::now();
            }
        }
        q.bytes += buf.len();
        s.waiting.add(records.len() as i64);
        q.batches.push_back((buf, records.len() as u64));
        if q.bytes >= q.writer_wants {
            q.writer_wants = usize::MAX;
            s.work.notify_one();
        }
        Ok(())
    }

    /// Waits until everything queued was written.
    fn flush(&mut self) -> Result<(), SinkError> {
        let s = &*self.shared;
        let mut q = s.queue.lock().expect("stdout queue");
        if q.bytes > 0 {
            q.hurry = true;
            s.work.notify_one();
        }
        while q.bytes > 0 {
            q = s.room.wait(q).expect("stdout queue");
        }
        match q.error.take() {
            Some(e) => Err(io_error(e)),
            None => Ok(()),
        }
    }
}

impl Drop for QueuedJsonLines {
    fn drop(&mut self) {
        // Only the owner ends the writer (after it wrote everything queued).
        if let Some(w) = self.writer.take() {
            self.shared.queue.lock().expect("stdout queue").closed = true;
            self.shared.work.notify_one();
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_line_per_record() {
        let rec = crate::record::tests::sample();
        let mut sink = JsonLinesSink::new(Vec::new());
        sink.send(&[rec.clone(), rec]).unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["src_addr"], "2001:db8::1");
        assert_eq!(v["tcp_flags"], 0x18);
        assert!(text.ends_with('\n'));
    }

    /// Takes at most 5 bytes per call (a pipe that is nearly full).
    struct Trickle(Vec<u8>);

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(5);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn batches_are_written_whole_and_in_order_through_short_writes() {
        let batches: Vec<(Vec<u8>, u64)> = (0..20u8)
            .map(|i| (vec![b'a' + i; usize::from(i) * 3 + 1], 1))
            .collect();
        let mut out = Trickle(Vec::new());
        write_batches(&mut out, &batches).unwrap();
        assert_eq!(
            out.0,
            batches
                .iter()
                .flat_map(|(b, _)| b.clone())
                .collect::<Vec<u8>>()
        );
    }

    /// A writer that accepts nothing until its gate opens (a reader of
    /// stdout that stalls), then keeps every byte.
    /// Whether the gate is open, and what was written.
    type GateState = Mutex<(bool, Vec<u8>)>;

    #[derive(Clone, Default)]
    struct Gated(Arc<(GateState, Condvar)>);

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (m, c) = &*self.0;
            let mut g = m.lock().unwrap();
            while !g.0 {
                g = c.wait(g).unwrap();
            }
            g.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_blocks_the_sender_and_loses_nothing() {
        let out = Gated::default();
        let registry = Registry::new();
        let mut sink = QueuedJsonLines::new(out.clone(), 8 << 10, &registry).unwrap();
        let batch = |i: u32| -> Vec<FlowRecord> {
            (0..10)
                .map(|j| FlowRecord {
                    packets: (i * 10 + j).into(),
                    src_addr: "10.0.0.1".parse().unwrap(),
                    dst_addr: "10.0.0.2".parse().unwrap(),
                    ..FlowRecord::default()
                })
                .collect()
        };
        let sender = std::thread::spawn(move || {
            for i in 0..200 {
                sink.send(&batch(i)).unwrap();
            }
            sink.flush().unwrap();
            sink
        });
        // The reader stalls: the queue fills up (8 KiB) and the sender waits.
        std::thread::sleep(Duration::from_millis(300));
        let metric = |name: &str| {
            crate::metrics::render_registry(&registry)
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap()
        };
        let waiting = metric("flowexport_stdout_records_waiting");
        assert!(waiting > 0.0 && waiting < 2000.0, "{waiting}");
        assert!(!sender.is_finished());
        // The time blocked shows while the sender still waits.
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric("flowexport_stdout_blocked_seconds_total") == 0.0 && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(metric("flowexport_stdout_blocked_seconds_total") > 0.0);
        assert!(!sender.is_finished());
        // It resumes: every record arrives once, in order.
        {
            let (m, c) = &*out.0;
            m.lock().unwrap().0 = true;
            c.notify_all();
        }
        let sink = sender.join().unwrap();
        assert!(metric("flowexport_stdout_blocked_seconds_total") > 0.1);
        assert_eq!(metric("flowexport_stdout_records_waiting"), 0.0);
        drop(sink);
        let text = String::from_utf8(out.0 .0.lock().unwrap().1.clone()).unwrap();
        let packets: Vec<u64> = text
            .lines()
            .map(|l| crate::record::from_json(l.as_bytes()).unwrap().packets)
            .collect();
        assert_eq!(packets, (0..2000).collect::<Vec<u64>>());
    }
}
