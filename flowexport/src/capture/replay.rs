//! Counting, from the drain thread's CPU, the packets that missed their
//! per-CPU cache slot.
//!
//! At a million flows nearly every packet misses the programs' per-CPU cache
//! (another flow owns its slot), and counting it in the shared table means
//! one random access into a table of hundreds of MiB: ~300 ns on the
//! receiving CPU (`cargo xtask bench xdp -- --ring` measures it beside this
//! path). The programs instead append such a packet to the `MISSES` ring
//! (~50 ns), and the drain thread hands the records back to the kernel a
//! batch at a time, through `flowexport_replay` run with BPF_PROG_TEST_RUN:
//! the same table code counts them, in the kernel's table, from this CPU.
//! While the ring is full the programs count in the table themselves, so
//! nothing depends on the agent keeping up.
//!
//! Exactly once, also across a killed agent: the ring's consumer position
//! moves past a batch only after its replay call returned, and the replay
//! program itself stores the position after the batch in `REPLAYED` in the
//! same run that counts it. A new agent starts from the later of the two
//! (see [`Replay::new`]), so a batch counted just before a kill is not
//! counted again, and one not counted is still in the ring.
//!
//! The counts land in the table's current generation, at the records'
//! own times; the drain replays everything waiting before it flips the
//! epoch, so a drain sees all but the last microseconds' misses (those
//! are counted at the next one).

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aya::maps::MapData;
use aya::programs::ProgramFd;
use flowexport_common::{FallbackEvent, REPLAY_BATCH, REPLAY_CLAIM_OFFSET};

use super::bpf_sys::{map_shared, prog_test_run};
use super::drain::Claim;

/// `BPF_RINGBUF_BUSY_BIT`, `BPF_RINGBUF_DISCARD_BIT` and the record header's
/// size (include/uapi/linux/bpf.h).
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER: u64 = 8;
/// XDP_PASS, what `flowexport_replay` returns when it counted its batch.
const XDP_PASS: u32 = 2;

/// A BPF ring buffer read by position: records are copied out, and the
/// consumer position moves only when [`MissRing::commit`] says so (aya's
/// `RingBuf` moves it as each record is dropped).
pub(crate) struct MissRing {
    /// The consumer page (read-write).
    consumer: *mut u8,
    /// The producer page, then the data pages twice (read-only): a record
    /// that wraps round the end reads on into the second copy.
    producer: *const u8,
    producer_len: usize,
    page: usize,
    mask: u64,
    _map: MapData,
}

// SAFETY: the mappings are shared memory that the kernel writes; every read
// and write of the positions and headers goes through atomics, and the
// owner (the drain thread) is the only consumer.
unsafe impl Send for MissRing {}

impl MissRing {
    /// Maps the ring buffer `map` of `bytes` (a power of two, a multiple of
    /// the page size).
    pub(crate) fn new(map: MapData, bytes: u32) -> io::Result<MissRing> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let fd = map.fd().as_fd();
        // The consumer page, read-write; then the producer page and the data
        // pages twice, read-only (all the kernel allows).
        let consumer = map_shared(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer_len = page + 2 * bytes as usize;
        let producer = match map_shared(fd, producer_len, libc::PROT_READ, page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: the mapping made above.
                unsafe { libc::munmap(consumer.cast(), page) };
                return Err(e);
            }
        };
        Ok(MissRing {
            consumer,
            producer,
            producer_len,
            page,
            mask: u64::from(bytes) - 1,
            _map: map,
        })
    }

    fn consumer_word(&self) -> &AtomicU64 {
        // SAFETY: the consumer page starts with the kernel's consumer
        // position, an aligned unsigned long (64-bit here).
        unsafe { &*self.consumer.cast::<AtomicU64>() }
    }

    /// Where the next record to read starts.
    pub(crate) fn consumer_pos(&self) -> u64 {
        self.consumer_word().load(Ordering::Acquire)
    }

    /// Where the programs write next (records before it are written or
    /// being written).
    pub(crate) fn producer_pos(&self) -> u64 {
        // SAFETY: the producer page starts with the kernel's producer
        // position; the kernel stores it with release semantics.
        unsafe { &*self.producer.cast::<AtomicU64>() }.load(Ordering::Acquire)
    }

    /// Marks everything before `pos` read: the programs may write there
    /// again.
    pub(crate) fn commit(&self, pos: u64) {
        // Release: the records were read before their room is given back.
        self.consumer_word().store(pos, Ordering::Release);
    }

    /// Copies the records from `from` on, at most `max` of them, onto the
    /// end of `out` (`FallbackEvent`s, 80 bytes each), stopping at one
    /// still being written. Returns the position after the last record
    /// taken (discarded records and ones of another size are passed over),
    /// and how many were copied.
    pub(crate) fn read(&self, from: u64, max: usize, out: &mut Vec<u8>) -> (u64, usize) {
        let end = self.producer_pos();
        let mut pos = from;
        let mut n = 0;
        while pos != end && n < max {
            let off = self.page + (pos & self.mask) as usize;
            // SAFETY: `off` lies in the first copy of the data pages and a
            // record (header and data, at most the ring's size) in the two
            // copies: inside the mapping. The header is 8-aligned.
            let header = unsafe { &*self.producer.add(off).cast::<AtomicU32>() };
            // Acquire pairs with the kernel's commit (an xchg) of the record.
            let h = header.load(Ordering::Acquire);
            if h & BUSY_BIT != 0 {
                break;
            }
            let len = (h & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if h & DISCARD_BIT == 0 && len == size_of::<FallbackEvent>() {
                let data = off + HEADER as usize;
                debug_assert!(data + len <= self.producer_len);
                // SAFETY: the record's data, inside the mapping (above),
                // committed (not busy).
                out.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(self.producer.add(data), len)
                });
                n += 1;
            }
            pos += (HEADER + len as u64).next_multiple_of(8);
        }
        (pos, n)
    }
}

impl Drop for MissRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped; nothing refers to it
        // any more.
        unsafe {
            libc::munmap(self.consumer.cast(), self.page);
            libc::munmap(self.producer as *mut libc::c_void, self.producer_len);
        }
    }
}

/// The `MISSES` ring and the program that counts its records.
pub(crate) struct Replay {
    ring: MissRing,
    prog: ProgramFd,
    /// One call's frame: the position after the batch, then its records.
    frame: Vec<u8>,
}

impl Replay {
    /// `ring` of an object whose `flowexport_replay` is `prog`; `replayed`
    /// is `REPLAYED`'s value (the position after the last batch counted,
    /// kept by the maps across agents): reading starts at the later of it
    /// and the ring's own consumer position. Runs the program once on no
    /// record, so that a kernel that refuses the call fails the start, not
    /// a drain.
    pub(crate) fn new(ring: MissRing, prog: ProgramFd, replayed: u64) -> io::Result<Replay> {
        let pos = ring.consumer_pos();
        // Positions only grow; one within the ring's reach of the producer
        // is a batch counted by an agent killed before it moved the
        // consumer position on.
        if replayed > pos && replayed <= ring.producer_pos() {
            log::info!(
                "missed-packet ring: {} bytes of records counted by the last agent are passed \
                 over",
                replayed - pos
            );
            ring.commit(replayed);
        }
        // The smallest frame XDP takes (an Ethernet header's 14 bytes):
        // the position, and no record. The program stores the position,
        // which is where reading starts anyway.
        let mut probe = ring.consumer_pos().to_ne_bytes().to_vec();
        probe.resize(14, 0);
        replay(&prog, &mut probe, 0)?;
        Ok(Replay {
            ring,
            prog,
            frame: Vec::with_capacity(8 + REPLAY_BATCH * size_of::<FallbackEvent>()),
        })
    }

    /// Whether records are waiting.
    pub(crate) fn pending(&self) -> bool {
        self.ring.consumer_pos() != self.ring.producer_pos()
    }

    /// Counts every record waiting, a batch per call of the program:
    /// returns how many. The slots the program claimed for new flows go to
    /// `claims`, with the time of each one's first packet.
    pub(crate) fn run(&mut self, claims: &mut Vec<Claim>) -> io::Result<u64> {
        let mut total = 0;
        loop {
            let from = self.ring.consumer_pos();
            self.frame.clear();
            self.frame.extend_from_slice(&[0; 8]);
            let (end, n) = self.ring.read(from, REPLAY_BATCH, &mut self.frame);
            if end == from {
                return Ok(total);
            }
            if n > 0 {
                self.frame[..8].copy_from_slice(&end.to_ne_bytes());
                replay(&self.prog, &mut self.frame, n)?;
                claims.extend(
                    self.frame[8..]
                        .chunks_exact(size_of::<FallbackEvent>())
                        .filter_map(claim),
                );
            }
            self.ring.commit(end);
            total += n as u64;
        }
    }
}

/// The slot a replayed record's flow claimed, if it did (the program
/// leaves it at `REPLAY_CLAIM_OFFSET`, plus 1), with the record's time in
/// milliseconds, cut to 32 bits as the table keeps it.
fn claim(record: &[u8]) -> Option<Claim> {
    let slot = record.get(REPLAY_CLAIM_OFFSET..REPLAY_CLAIM_OFFSET + 4)?;
    let ts = std::mem::offset_of!(FallbackEvent, ts_ns);
    let ts = record.get(ts..ts + 8)?;
    let slot = u32::from_ne_bytes(slot.try_into().ok()?);
    let ns = u64::from_ne_bytes(ts.try_into().ok()?);
    Some((slot.checked_sub(1)?, (ns / 1_000_000) as u32))
}

/// One call of `flowexport_replay` on `frame` (a batch of `n` records),
/// which holds the frame as the program left it afterwards.
fn replay(prog: &ProgramFd, frame: &mut [u8], n: usize) -> io::Result<()> {
    match prog_test_run(prog.as_fd(), frame)? {
        XDP_PASS => Ok(()),
        rc => Err(io::Error::other(format!(
            "flowexport_replay returned {rc} instead of XDP_PASS on a batch of {n} records"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the ring holds it, and as the program leaves it after
    /// claiming slot 41 for its flow.
    #[test]
    fn claims_are_read_from_the_records_padding() {
        let ev = FallbackEvent {
            ts_ns: 1_234_567_890_123,
            packets: 1,
            bytes: 60,
            ..FallbackEvent::default()
        };
        // SAFETY: FallbackEvent is 80 bytes of plain integers.
        let mut record =
            unsafe { std::slice::from_raw_parts((&ev as *const FallbackEvent).cast::<u8>(), 80) }
                .to_vec();
        assert_eq!(claim(&record), None);
        record[REPLAY_CLAIM_OFFSET..REPLAY_CLAIM_OFFSET + 4].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(claim(&record), Some((41, 1_234_567)));
        // A frame cut short claims nothing.
        assert_eq!(claim(&record[..60]), None);
    }
}
