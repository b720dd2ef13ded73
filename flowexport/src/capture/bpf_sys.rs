//! The few `bpf()` calls and mappings the drain needs beyond aya's map API:
//! waiting for an RCU grace period ([`GracePeriod`]), reading many entries
//! of a per-CPU array in one call ([`lookup_batch`]), and mapping a
//! BPF_F_MMAPABLE array into memory shared with the programs
//! ([`SharedMap`]).
//!
//! # Waiting for an RCU grace period from userspace
//!
//! XDP and TC programs run inside RCU read-side critical sections. When the
//! `bpf()` syscall updates an element of a map-of-maps, the kernel calls
//! `synchronize_rcu()` before returning (`maybe_wait_bpf_programs()` in
//! kernel/bpf/syscall.c), precisely so that userspace knows no program is
//! still running with what it saw before the update. We keep a tiny
//! ARRAY_OF_MAPS that no program uses and update it to get that guarantee:
//! after [`GracePeriod::wait`] returns, every program run that started before
//! the call has finished.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use aya::maps::MapData;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The leading fields of `union bpf_attr` for BPF_MAP_CREATE; the rest of the
/// 128-byte attribute must be zero, which `Default` + `_rest` provide.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    _rest: [u64; 13],
}

/// `union bpf_attr` for BPF_MAP_*_ELEM.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
    _rest: [u64; 12],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly sized, zero-padded bpf_attr for `cmd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn create_map(map_type: u32, inner_map_fd: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        inner_map_fd,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the syscall returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits for RCU grace periods (see the module docs).
pub(crate) struct GracePeriod {
    inner: OwnedFd,
    outer: OwnedFd,
}

impl GracePeriod {
    pub(crate) fn new() -> io::Result<GracePeriod> {
        let inner = create_map(BPF_MAP_TYPE_ARRAY, 0)?;
        let outer = create_map(BPF_MAP_TYPE_ARRAY_OF_MAPS, inner.as_raw_fd() as u32)?;
        Ok(GracePeriod { inner, outer })
    }

    /// Returns once every BPF program run that began before the call is over.
    pub(crate) fn wait(&self) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        let mut attr = MapElemAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: 0, // BPF_ANY
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }
}

/// `union bpf_attr` for BPF_MAP_*_BATCH.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
    _rest: [u64; 9],
}

/// Reads the values of keys `start..start + count` of an array map (u32
/// keys) with BPF_MAP_LOOKUP_BATCH (Linux 5.6+), one call instead of one per
/// key. `values` receives `count` values of `value_len` bytes each (for a
/// per-CPU array: the value size rounded up to 8, times the possible CPUs);
/// returns how many keys were read (fewer at the end of the map).
pub(crate) fn lookup_batch(
    map: BorrowedFd<'_>,
    start: u32,
    count: u32,
    value_len: usize,
    values: &mut Vec<u8>,
) -> io::Result<u32> {
    values.resize(count as usize * value_len, 0);
    let mut keys = vec![0u32; count as usize];
    // The batch continues after `in_batch`: key start - 1 (none for 0).
    let in_key: u32 = start.wrapping_sub(1);
    let mut out_key: u32 = 0;
    let mut attr = BatchAttr {
        in_batch: if start == 0 {
            0
        } else {
            &in_key as *const u32 as u64
        },
        out_batch: &mut out_key as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(_) => Ok(attr.count),
        // ENOENT: the end of the map; `count` says how many were read.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(attr.count),
        Err(e) => Err(e),
    }
}

/// Writes `keys[i] -> values[i]` into a map with BPF_MAP_UPDATE_BATCH
/// (Linux 5.6+), in chunks of at most 65536.
pub(crate) fn update_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len());
    for (k, v) in keys.chunks(65536).zip(values.chunks(65536)) {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Deletes `keys` from a map with BPF_MAP_DELETE_BATCH (Linux 5.6+); keys
/// that are not there are not an error.
pub(crate) fn delete_batch<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    for k in keys.chunks(65536) {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(_) => {}
            // A missing key stops the batch: delete the rest one by one
            // (after the keys it got through).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let done = attr.count as usize;
                for key in &k[(done + 1).min(k.len())..] {
                    let mut a = BatchAttr {
                        keys: key as *const K as u64,
                        count: 1,
                        map_fd: map.as_raw_fd() as u32,
                        ..Default::default()
                    };
                    match bpf(BPF_MAP_DELETE_BATCH, &mut a) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Maps `len` bytes of a map's fd from `offset`, shared (what the kernel
/// allows a map: a BPF_F_MMAPABLE array's values, a ring buffer's pages).
pub(crate) fn map_shared(
    fd: BorrowedFd<'_>,
    len: usize,
    prot: libc::c_int,
    offset: usize,
) -> io::Result<*mut u8> {
    // SAFETY: mmap of a map's fd with a fresh address; the result is
    // checked before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// A BPF_F_MMAPABLE array map mapped into this process, shared with the
/// programs: what either side stores, the other sees. Unmapped on drop
/// (the map itself lives as long as its fd, held here).
pub struct SharedMap {
    addr: *mut u8,
    len: usize,
    map: MapData,
}

// SAFETY: the mapping is plain shared memory; every access through it goes
// through the atomic views its users take (see `capture::table`).
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps the first `len` bytes of `map` (rounded up to whole pages),
    /// readable and writable.
    pub fn new(map: MapData, len: usize) -> io::Result<SharedMap> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = len.div_ceil(page) * page;
        let addr = map_shared(map.fd().as_fd(), len, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        Ok(SharedMap { addr, len, map })
    }

    /// The start of the mapping (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// Mapped bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The map's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped; nothing refers to it
        // any more (users hold the SharedMap while they use the memory).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `union bpf_attr` for BPF_PROG_TEST_RUN (the `test` member).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
    _rest: [u64; 8],
}

/// Runs `prog` once on `data` as its packet (BPF_PROG_TEST_RUN, on this
/// CPU, under the same RCU protection as a packet's run): its return value;
/// `data` then holds the packet as the program left it. The run completes
/// once begun, whatever happens to this thread.
pub(crate) fn prog_test_run(prog: BorrowedFd<'_>, data: &mut [u8]) -> io::Result<u32> {
    let len =
        u32::try_from(data.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: len,
        data_in: data.as_ptr() as u64,
        // The kernel copies the frame in before the run and out after it:
        // one buffer serves both.
        data_size_out: len,
        data_out: data.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr.retval)
}
