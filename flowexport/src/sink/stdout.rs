//! The embedded default sink: one JSON object per line on stdout
//! ([`crate::codec::json`]).
//!
//! Two ways to write them:
//! - [`JsonLinesSink`] writes each batch before `send` returns. The agent
//!   uses it: a drain clears the kernel's counts only after their records
//!   were written (nothing lost to a `kill -9`), and its drain thread is
//!   not on the packet path.
//! - [`QueuedJsonLines`] hands the caller's records to a writer thread
//!   through a queue bounded in records, so that a decoder (`collect`) does
//!   not wait for each write. The writer formats them, which takes that
//!   work off the decoding thread; while the writer is behind (over 1024
//!   records queued), senders format their own batches, so that formatting
//!   scales with the workers. A slow reader of stdout shows
//!   in two metrics, `flowexport_stdout_records_waiting` and
//!   `flowexport_stdout_blocked_seconds_total` (time senders waited for room
//!   in a full queue), instead of as silent drops at the collector's
//!   sockets; nothing in the queue is dropped, and `flush` waits for it.
//!   The writer writes in chunks of 256 KiB or more where the rate allows
//!   (waiting at most 5 ms for one to fill): the page cache costs several
//!   times more per byte in small writes.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use prometheus::{Counter, IntGauge, Registry};

use super::{Sink, SinkError};
use crate::codec::json;
use crate::rate_limited_log::RateLimitedLog;
use crate::record::FlowRecord;

/// What a stdout sink does once its reader has gone away (a write failed
/// with EPIPE: `flowexport … | head`): it writes nothing more, every `send`
/// fails, and a hook runs once. The hook can be set after the sink was
/// built (the commands start their runtime later), and runs at once if the
/// reader is already gone.
#[derive(Clone, Default)]
pub struct OnBrokenPipe(Arc<Mutex<BrokenPipeState>>);

#[derive(Default)]
struct BrokenPipeState {
    broken: bool,
    hook: Option<Box<dyn FnOnce() + Send>>,
}

impl OnBrokenPipe {
    /// Runs `f` once the reader has gone away.
    pub fn set(&self, f: impl FnOnce() + Send + 'static) {
        let mut st = self.0.lock().expect("broken pipe state");
        if st.broken {
            drop(st);
            f();
        } else {
            st.hook = Some(Box::new(f));
        }
    }

    /// Whether the reader has gone away.
    pub fn broken(&self) -> bool {
        self.0.lock().expect("broken pipe state").broken
    }

    /// A command's outcome once it has stopped: an error if it stopped
    /// because the reader went away (a pipeline's writer exits non-zero).
    pub fn result(&self) -> std::io::Result<()> {
        if self.broken() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stopped: stdout was closed by its reader (broken pipe)",
            ));
        }
        Ok(())
    }

    /// Records that the reader has gone away; logs it and runs the hook the
    /// first time.
    fn fire(&self, records: usize) {
        let mut st = self.0.lock().expect("broken pipe state");
        if std::mem::replace(&mut st.broken, true) {
            return;
        }
        let hook = st.hook.take();
        drop(st);
        log::warn!(
            "stdout was closed by its reader (broken pipe): {records} records not written, \
             and none will be from now on"
        );
        if let Some(f) = hook {
            f();
        }
    }
}

/// Writes JSON lines to any writer (stdout in the agent), one write per batch.
pub struct JsonLinesSink<W: Write + Send> {
    out: W,
    line: Vec<u8>,
    closed: OnBrokenPipe,
}

impl<W: Write + Send> JsonLinesSink<W> {
    /// `closed`: what to do when the reader goes away.
    pub fn new(out: W, closed: OnBrokenPipe) -> Self {
        JsonLinesSink {
            out,
            line: Vec::with_capacity(64 * 1024),
            closed,
        }
    }
}

impl JsonLinesSink<std::io::Stdout> {
    pub fn stdout(closed: OnBrokenPipe) -> Self {
        Self::new(std::io::stdout(), closed)
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
        if self.closed.broken() {
            return Err(io_error(std::io::ErrorKind::BrokenPipe.into()));
        }
        self.line.clear();
        json::write_lines(&mut self.line, records);
        // One write per batch keeps lines whole even if stdout is a pipe
        // shared with nobody else; flush so a reader sees records promptly.
        let result = self
            .out
            .write_all(&self.line)
            .and_then(|()| self.out.flush());
        if let Err(e) = &result {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                self.closed.fire(records.len());
            }
        }
        result.map_err(io_error)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(io_error)
    }
}

/// Records the queue of [`QueuedJsonLines`] holds before senders wait: a
/// few milliseconds of the writer's time; 8 MiB of 256-byte `FlowRecord`s.
pub const QUEUE_RECORDS: usize = 32 << 10;

/// Records a sender sees queued (not yet taken by the writer) before it
/// formats its batch itself: the writer is then several writes behind, and
/// formatting on every sender's thread keeps up where one writer could not.
const BEHIND: usize = 1024;

/// A sender's batch: its records, which the writer formats, or (while the
/// writer is behind) the lines the sender formatted itself, and how many.
enum Batch {
    Records(Vec<FlowRecord>),
    Lines(Vec<u8>, usize),
}

impl Batch {
    fn records(&self) -> usize {
        match self {
            Batch::Records(r) => r.len(),
            Batch::Lines(_, n) => *n,
        }
    }
}

struct Queue {
    /// Batches, oldest first.
    batches: VecDeque<Batch>,
    /// Records queued, or taken by the writer and not yet written.
    records: usize,
    /// Records in `batches` (not taken by the writer yet).
    queued: usize,
    /// Emptied batches for senders to reuse.
    spare: Vec<Vec<FlowRecord>>,
    spare_lines: Vec<Vec<u8>>,
    /// The writer's last error, reported to the next sender.
    error: Option<std::io::Error>,
    closed: bool,
    /// The writer sleeps until `queued` reaches this: a sender that
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
    /// What happens once stdout's reader has gone away.
    closed: OnBrokenPipe,
}

/// JSON lines through a writer thread (see the module docs). The value
/// [`QueuedJsonLines::new`] returns owns the thread (dropping it writes what
/// is queued and ends it); [`QueuedJsonLines::handle`]s share its queue, so
/// that several threads queue without a lock around the sink.
pub struct QueuedJsonLines {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// This sender's formatting buffer (while the writer is behind), reused
    /// for every batch: it stays in the CPU's caches.
    scratch: Vec<u8>,
}

impl QueuedJsonLines {
    /// Writes to stdout; registers the queue's metrics in `registry`.
    /// `closed`: what to do when the reader goes away (records queued from
    /// then on are dropped).
    pub fn stdout(registry: &Registry, closed: OnBrokenPipe) -> std::io::Result<QueuedJsonLines> {
        QueuedJsonLines::new(std::io::stdout(), QUEUE_RECORDS, registry, closed)
    }

    /// Writes to `out` with a queue of `limit` records.
    pub fn new<W: Write + Send + 'static>(
        mut out: W,
        limit: usize,
        registry: &Registry,
        closed: OnBrokenPipe,
    ) -> std::io::Result<QueuedJsonLines> {
        let waiting = crate::metrics::gauge(
            registry,
            "flowexport_stdout_records_waiting",
            "Records queued for stdout and not yet written (a slow reader of stdout).",
        );
        let blocked = crate::metrics::float_counter(
            registry,
            "flowexport_stdout_blocked_seconds_total",
            "Time senders (collect's workers) waited for room in the full stdout queue.",
        );
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                batches: VecDeque::new(),
                records: 0,
                queued: 0,
                spare: Vec::new(),
                spare_lines: Vec::new(),
                error: None,
                closed: false,
                writer_wants: usize::MAX,
                hurry: false,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            limit: limit.max(1),
            waiting,
            blocked,
            closed,
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
/// in 32-256 KiB writes), and at low rates fewer, larger writes wake the
/// writer less often (256 KiB against 64 KiB: collect's JSON lines to
/// /dev/null got 2-16% more flows per CPU-second at 0.5-1M flows/s,
/// BENCHMARKS.md).
const MIN_WRITE: usize = 256 << 10;

/// How long the writer holds formatted lines back to fill [`MIN_WRITE`]:
/// the most a record waits for it (at low rates).
const LINGER: Duration = Duration::from_millis(5);

/// Bytes of a JSON line, at the least (for the writer's wake-up rule: a
/// line of flowexport's records takes 400-600).
const LINE_BYTES_MIN: usize = 400;

/// The writer thread: takes every queued batch at once and formats it into
/// its own buffer; writes the buffer once it holds [`MIN_WRITE`] bytes, when
/// [`LINGER`] has passed since its oldest line, or when someone waits; then
/// releases the written records' room in the queue.
///
/// The lines are formatted here, not by the senders, which takes that work
/// off the decoding threads: one `collect` worker took 2M flows/s into a
/// file without a socket drop in 5 of 6 runs, against 3 of 6 when it
/// formatted its own (`cargo xtask bench collect`, BENCHMARKS.md).
fn write_loop(s: &Shared, out: &mut dyn Write) {
    let mut taken: Vec<Batch> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(2 * MIN_WRITE);
    // Records formatted into `buf`, and when the oldest of them was.
    let mut pending = 0usize;
    let mut since: Option<Instant> = None;
    let log = RateLimitedLog::with_target(module_path!());
    let mut out = Output { out, log: &log };
    loop {
        let write_now;
        {
            let mut q = s.queue.lock().expect("stdout queue");
            // Return the batches formatted last round for senders to reuse.
            for b in taken.drain(..) {
                match b {
                    Batch::Records(mut r) if q.spare.len() < 64 => {
                        r.clear();
                        q.spare.push(r);
                    }
                    Batch::Lines(mut l, _) if q.spare_lines.len() < 64 => {
                        l.clear();
                        q.spare_lines.push(l);
                    }
                    _ => {}
                }
            }
            loop {
                if !q.batches.is_empty() || q.closed || q.hurry {
                    break;
                }
                match since {
                    None => {
                        q.writer_wants = 1;
                        q = s.work.wait(q).expect("stdout queue");
                    }
                    Some(t) => {
                        let until = t + LINGER;
                        let now = Instant::now();
                        if now >= until {
                            break;
                        }
                        // Woken by the batch that should fill the write,
                        // not by every batch.
                        q.writer_wants = MIN_WRITE.saturating_sub(buf.len()) / LINE_BYTES_MIN + 1;
                        q = s.work.wait_timeout(q, until - now).expect("stdout queue").0;
                    }
                }
            }
            q.writer_wants = usize::MAX;
            taken.extend(q.batches.drain(..));
            q.queued = 0;
            let lingered = since.is_some_and(|t| t.elapsed() >= LINGER);
            write_now = q.hurry || q.closed || lingered;
            q.hurry = false;
            if taken.is_empty() && pending == 0 && q.closed {
                return; // closed, and everything written
            }
        }
        for b in &taken {
            match b {
                Batch::Records(r) => {
                    json::write_lines(&mut buf, r);
                    pending += r.len();
                    if buf.len() >= MIN_WRITE {
                        out.write(s, &[&buf], pending);
                        buf.clear();
                        pending = 0;
                    }
                }
                // A sender's own lines (a batch or more long): written as
                // they are, after the lines before them.
                Batch::Lines(l, n) => {
                    out.write(s, &[&buf, l], pending + n);
                    buf.clear();
                    pending = 0;
                }
            }
        }
        // What is left waits for more lines, unless its time is up, someone
        // waits, or it holds half the queue's room (senders soon would).
        if pending > 0 && (write_now || pending * 2 >= s.limit) {
            out.write(s, &[&buf], pending);
            buf.clear();
            pending = 0;
        }
        since = match since {
            _ if pending == 0 => None,
            None => Some(Instant::now()),
            t => t,
        };
    }
}

/// The writer thread's output and its error log.
struct Output<'a> {
    out: &'a mut dyn Write,
    log: &'a RateLimitedLog,
}

impl Output<'_> {
    /// Writes `parts` (the lines of `records` records) in order, then
    /// releases their room in the queue. Once stdout's reader has gone away
    /// (EPIPE), drops them instead: the `OnBrokenPipe` hook runs,
    /// and every sender's next `send` fails.
    fn write(&mut self, s: &Shared, parts: &[&[u8]], records: usize) {
        let result = if s.closed.broken() {
            Err(std::io::ErrorKind::BrokenPipe.into())
        } else {
            write_parts(self.out, parts).and_then(|()| self.out.flush())
        };
        if let Err(e) = &result {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                s.closed.fire(records);
            } else {
                self.log
                    .error(|| format!("{records} records not written to stdout: {e}"));
            }
        }
        let mut q = s.queue.lock().expect("stdout queue");
        if let Err(e) = result {
            q.error = Some(e);
        }
        q.records -= records;
        s.waiting.sub(records as i64);
        s.room.notify_all();
    }
}

/// Writes the parts in order with as few `writev` calls as the writer
/// takes (no copy into one buffer first).
fn write_parts(out: &mut dyn Write, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
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

/// A batch as a sender gives it: to copy, or to take.
enum Given<'a> {
    Copy(&'a [FlowRecord]),
    Take(&'a mut Vec<FlowRecord>),
}

impl Given<'_> {
    fn records(&self) -> &[FlowRecord] {
        match self {
            Given::Copy(r) => r,
            Given::Take(r) => r,
        }
    }
}

impl QueuedJsonLines {
    /// Queues a batch for the writer thread to format (see `write_loop`),
    /// or, while it is behind, formats it here. Records the caller is done
    /// with are taken, not copied: the caller gets an emptied batch back.
    fn queue(&mut self, given: Given<'_>) -> Result<(), SinkError> {
        let records = given.records();
        if records.is_empty() {
            return Ok(());
        }
        let s = &*self.shared;
        let mut batch = {
            let mut q = s.queue.lock().expect("stdout queue");
            if q.queued >= BEHIND {
                Batch::Lines(q.spare_lines.pop().unwrap_or_default(), records.len())
            } else {
                Batch::Records(q.spare.pop().unwrap_or_default())
            }
        };
        match (&mut batch, given) {
            (Batch::Records(r), Given::Take(taken)) => std::mem::swap(r, taken),
            (Batch::Records(r), Given::Copy(records)) => r.extend_from_slice(records),
            (Batch::Lines(l, _), given) => {
                // Formatted in the warm scratch buffer, then moved into the
                // queued one with one large copy (formatting straight into a
                // cold buffer was slower: measured with `cargo xtask bench
                // collect`).
                self.scratch.clear();
                json::write_lines(&mut self.scratch, given.records());
                l.extend_from_slice(&self.scratch);
            }
        }
        let n = batch.records();
        let mut q = s.queue.lock().expect("stdout queue");
        if let Some(e) = q.error.take() {
            // stdout failed (the writer logged how many records that write
            // lost): this batch is refused too, and the caller counts it.
            return Err(io_error(e));
        }
        if q.closed {
            return Err(io_error(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the stdout writer has stopped",
            )));
        }
        if q.records > 0 && q.records + n > s.limit {
            q.hurry = true;
            s.work.notify_one();
            // Counted as it passes (every 100 ms at most), so that a reader
            // that never resumes shows too.
            let mut since = Instant::now();
            while q.records > 0 && q.records + n > s.limit {
                q = s
                    .room
                    .wait_timeout(q, Duration::from_millis(100))
                    .expect("stdout queue")
                    .0;
                s.blocked.inc_by(since.elapsed().as_secs_f64());
                since = Instant::now();
            }
        }
        q.records += n;
        q.queued += n;
        s.waiting.add(n as i64);
        q.batches.push_back(batch);
        if q.queued >= q.writer_wants {
            q.writer_wants = usize::MAX;
            s.work.notify_one();
        }
        Ok(())
    }
}

impl Sink for QueuedJsonLines {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        self.queue(Given::Copy(records))
    }

    fn take(&mut self, records: &mut Vec<FlowRecord>) -> Result<(), SinkError> {
        self.queue(Given::Take(records))
    }

    /// Waits until everything queued was written.
    fn flush(&mut self) -> Result<(), SinkError> {
        let s = &*self.shared;
        let mut q = s.queue.lock().expect("stdout queue");
        if q.records > 0 {
            q.hurry = true;
            s.work.notify_one();
        }
        while q.records > 0 {
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
        let mut sink = JsonLinesSink::new(Vec::new(), OnBrokenPipe::default());
        sink.send(&[rec.clone(), rec]).unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["src_addr"], "2001:db8::1");
        assert_eq!(v["tcp_flags"], 0x18);
        assert!(text.ends_with('\n'));
    }

    /// Takes at most 5 bytes per call (a pipe that is nearly full); shared,
    /// so the test reads what the writer thread wrote.
    #[derive(Clone, Default)]
    struct Trickle(Arc<Mutex<Vec<u8>>>);

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(5);
            self.0.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(i: u64) -> FlowRecord {
        FlowRecord {
            packets: i,
            bytes: i * 1500,
            src_addr: "10.0.0.1".parse().unwrap(),
            dst_addr: "2001:db8::2".parse().unwrap(),
            ..FlowRecord::default()
        }
    }

    /// A queued sink writing to `out` with a queue of `limit` records.
    fn queued(out: impl Write + Send + 'static, limit: usize) -> QueuedJsonLines {
        QueuedJsonLines::new(out, limit, &Registry::new(), OnBrokenPipe::default()).unwrap()
    }

    #[test]
    fn queued_records_come_out_as_the_same_lines_in_order_through_short_writes() {
        let out = Trickle::default();
        // A queue of 64 records: the writer writes before it has 256 KiB.
        let mut sink = queued(out.clone(), 64);
        let mut all = Vec::new();
        let mut n = 0;
        for size in (1..40).chain([64, 1, 200]) {
            let mut batch: Vec<FlowRecord> = (n..n + size).map(record).collect();
            n += size;
            all.extend(batch.iter().cloned());
            // Copied and taken (`Sink::take`) batches interleave, in order;
            // a taken batch leaves an empty vector behind.
            if size % 2 == 0 {
                sink.take(&mut batch).unwrap();
                assert!(batch.is_empty());
            } else {
                sink.send(&batch).unwrap();
            }
        }
        sink.flush().unwrap();
        let mut want = Vec::new();
        json::write_lines(&mut want, &all);
        assert_eq!(*out.0.lock().unwrap(), want);
        drop(sink);
        assert_eq!(*out.0.lock().unwrap(), want);
    }

    #[test]
    fn a_lone_record_is_written_without_a_flush() {
        let out = Trickle::default();
        let mut sink = queued(out.clone(), QUEUE_RECORDS);
        sink.send(&[record(7)]).unwrap();
        // Held back at most LINGER (5 ms) for more lines to come.
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.0.lock().unwrap().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut want = Vec::new();
        json::write_lines(&mut want, &[record(7)]);
        assert_eq!(*out.0.lock().unwrap(), want);
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
    fn senders_format_their_own_lines_while_the_writer_is_behind_and_order_holds() {
        let out = Gated::default();
        let mut sink = queued(out.clone(), QUEUE_RECORDS);
        let mut all = Vec::new();
        // The reader stalls: the writer blocks in its first write (after a
        // batch or two), and the rest queues up past BEHIND.
        for i in 0..40u64 {
            let batch: Vec<FlowRecord> = (i * 100..i * 100 + 100).map(record).collect();
            sink.send(&batch).unwrap();
            all.extend(batch);
        }
        // The sender formatted some batches itself.
        assert!(sink.scratch.capacity() > 0);
        {
            let (m, c) = &*out.0;
            m.lock().unwrap().0 = true;
            c.notify_all();
        }
        sink.flush().unwrap();
        drop(sink);
        let mut want = Vec::new();
        json::write_lines(&mut want, &all);
        assert!(out.0 .0.lock().unwrap().1 == want);
    }

    /// A pipe whose reader has gone away.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_that_went_away_calls_the_hook_once_and_sends_fail() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let registry = Registry::new();
        let closed = OnBrokenPipe::default();
        let mut sink =
            QueuedJsonLines::new(Closed, QUEUE_RECORDS, &registry, closed.clone()).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        closed.set(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        sink.send(&[record(1), record(2)]).unwrap();
        // flush waits for the write, which fails.
        assert!(sink.flush().is_err());
        assert!(closed.broken());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Later batches are dropped: sends fail (the caller counts them),
        // nothing waits, the hook is not called again.
        for i in 0..100 {
            let _ = sink.send(&[record(i)]);
        }
        assert!(sink.flush().is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A hook set afterwards runs at once.
        let c = calls.clone();
        closed.set(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let waiting = crate::metrics::render_registry(&registry)
            .lines()
            .find_map(|l| {
                l.strip_prefix("flowexport_stdout_records_waiting")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap();
        assert_eq!(waiting, 0.0);
        drop(sink);
    }

    #[test]
    fn the_agents_sink_stops_writing_once_the_reader_went_away() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let closed = OnBrokenPipe::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        closed.set(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        let mut sink = JsonLinesSink::new(Closed, closed.clone());
        assert!(sink.send(&[record(1)]).is_err());
        assert!(sink.send(&[record(2)]).is_err());
        assert!(closed.broken());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_stalled_reader_blocks_the_sender_and_loses_nothing() {
        let out = Gated::default();
        let registry = Registry::new();
        let mut sink =
            QueuedJsonLines::new(out.clone(), 20, &registry, OnBrokenPipe::default()).unwrap();
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
        // The reader stalls: the queue fills up (20 records) and the sender waits.
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
