//! Waiting for an RCU grace period from userspace.
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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
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
            std::mem::size_of::<T>() as libc::c_uint,
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

pub struct GracePeriod {
    inner: OwnedFd,
    outer: OwnedFd,
}

impl GracePeriod {
    pub fn new() -> io::Result<GracePeriod> {
        let inner = create_map(BPF_MAP_TYPE_ARRAY, 0)?;
        let outer = create_map(BPF_MAP_TYPE_ARRAY_OF_MAPS, inner.as_raw_fd() as u32)?;
        Ok(GracePeriod { inner, outer })
    }

    /// Returns once every BPF program run that began before the call is over.
    pub fn wait(&self) -> io::Result<()> {
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
