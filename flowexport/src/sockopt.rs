//! setsockopt(2) and getsockopt(2) for option values of plain data: the
//! UDP collector's SOL_SOCKET options and the AF_XDP sockets' SOL_XDP ones.

use std::io;
use std::os::fd::RawFd;

/// Sets option `opt` of `level` on socket `fd` to `value`.
pub(crate) fn set<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt reads size_of::<T>() bytes from `value`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A type the kernel may fill with any bytes: integers, arrays of them and
/// `#[repr(C)]` structs of integers.
///
/// # Safety
/// Every bit pattern of the type's size must be a valid value.
pub(crate) unsafe trait Plain: Copy {}

// SAFETY: integers and arrays of them have no invalid bit patterns.
unsafe impl Plain for libc::c_int {}
// SAFETY: as above.
unsafe impl<const N: usize> Plain for [u32; N] {}

/// Reads option `opt` of `level` of socket `fd` into `value`; returns the
/// bytes the kernel wrote.
pub(crate) fn get<T: Plain>(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    value: &mut T,
) -> io::Result<usize> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value` and sets
    // `len` to what it wrote; any bytes are a valid T (`Plain`).
    let r = unsafe { libc::getsockopt(fd, level, opt, std::ptr::from_mut(value).cast(), &mut len) };
    if r == 0 {
        Ok(len as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}
